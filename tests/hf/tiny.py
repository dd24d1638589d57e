"""Tiny randomly initialised causal LMs of every family sals.hf supports, built from configs
(nothing is downloaded), and the measurements the hf tests share. Shapes are small but keep the features that matter: GQA (4 query /
2 KV heads), head_dim 32, qkv bias (Qwen2), q_norm/k_norm (Qwen3, Gemma 3), Gemma 3's
query_pre_attn_scalar and sliding-window layers, Llama-3 RoPE frequency scaling."""

from __future__ import annotations

import torch
import transformers
from sals.hf import CACHE_ARG

COMMON = {
    "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "max_position_embeddings": 1024, "tie_word_embeddings": False, "initializer_range": 0.15,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None,  # generation never stops early
}

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3")


def config(family: str, **overrides):
    kw = dict(COMMON)
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "llama3":
        cls = transformers.LlamaConfig
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}
    elif family == "mistral":
        cls = transformers.MistralConfig
        kw["sliding_window"] = None
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        cls = transformers.Qwen3Config
    elif family == "gemma3":
        cls = transformers.Gemma3TextConfig
        kw.update(layer_types=["sliding_attention", "full_attention", "sliding_attention",
                               "full_attention"],
                  sliding_window=6, query_pre_attn_scalar=24)
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def model(family: str, seed: int = 0, dtype=torch.float32, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(config(family, **overrides),
                                                      attn_implementation=attn)
    return m.to(dtype).eval()


def prompt(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, n), generator=g)


def left_padded(prompts, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``[1, n_i]`` prompts, left-padded to the longest."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1]:] = p[0]
        mask[i, width - p.shape[1]:] = 1
    return ids, mask


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def decode_logits(model, prompt, steps, cache) -> torch.Tensor:
    """Logits of a prefill's last token, then of one forward per token of ``steps`` ([B, n]),
    through ``cache``: n + 1 positions."""
    with torch.no_grad():
        out = [model(prompt, **{CACHE_ARG: cache}).logits[:, -1:]]
        for i in range(steps.shape[1]):
            out.append(model(steps[:, i:i + 1], **{CACHE_ARG: cache}).logits)
    return torch.cat(out, 1)


def teacher_forced(model, ids, continuation):
    """(logits, cache): a patched model's logits for each token of ``continuation`` given the
    ones before it, one decode step per token, through a new SalsCache."""
    import sals.hf

    cache = sals.hf.SalsCache(model, ids.shape[0], ids.shape[1] + continuation.shape[1])
    return decode_logits(model, ids, continuation[:, :-1], cache), cache


def agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions with the same argmax, mean KL(ref || got) per position)."""
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return top1, kl
