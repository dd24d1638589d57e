"""Tiny randomly initialised causal LMs of every family sals.hf supports, built from configs
(nothing is downloaded). Shapes are small but keep the features that matter: GQA (4 query /
2 KV heads), head_dim 32, qkv bias (Qwen2), q_norm/k_norm (Qwen3, Gemma 3), Gemma 3's
query_pre_attn_scalar and sliding-window layers, Llama-3 RoPE frequency scaling."""

from __future__ import annotations

import torch
import transformers

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
