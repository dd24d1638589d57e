"""One decode step on the CPU: sals.LayerCache (SALS-25%, SALS-12.5%) vs dense attention
(torch SDPA, fp32), for one Llama-3.1-8B attention layer (32 query / 8 KV heads, head dim 128),
plus the bytes each cache holds.

    python benchmarks/cpu_decode.py [--tokens 4096 32768] [--repeats 20] [--json out.json]

A SALS step = append the new token (project the key, quantise the value) + attend (fold and
project the query, score every candidate on r* latent coordinates, select, rebuild the
selected keys, RoPE, exact attention). The dense step = SDPA of one query over a post-RoPE
fp32 KV cache of the same length (appending to a preallocated dense cache is a copy and is
left out, which favours dense). Times are medians over --repeats steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as np

import sals

HQ, HKV, D = 32, 8, 128
DK = HKV * D


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_sals(preset: str, tokens: int, repeats: int, rng) -> dict:
    steps = repeats + 3
    cfg = sals.Config.preset(preset, HQ, HKV, D, max_tokens=tokens + steps, dtype="float16")
    proj = np.linalg.qr(rng.standard_normal((DK, DK)))[0][:, : cfg.resolved_rank()]
    rope = sals.Rope.default(D, theta=500000.0)
    cache = sals.LayerCache(cfg, rope, proj.astype(np.float32))
    chunk = 4096
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        k = rng.standard_normal((1, n, HKV, D)).astype(np.float16)
        v = rng.standard_normal((1, n, HKV, D)).astype(np.float16)
        cache.append(k, v, np.arange(start, start + n, dtype=np.int32)[None])
    k1 = rng.standard_normal((1, 1, HKV, D)).astype(np.float16)
    q1 = rng.standard_normal((1, 1, HQ, D)).astype(np.float16)
    out = np.empty_like(q1)
    state = {"pos": tokens}

    def step():
        p = np.array([[state["pos"]]], np.int32)
        cache.append(k1, k1, p)
        cache.attend(q1, p, out=out)
        state["pos"] += 1

    ms = median_ms(step, repeats)
    mem = cache.memory()
    _, count = cache.selected()
    cache.close()
    return {"ms": ms, "memory": mem, "selected": int(count[0]), "rank": cfg.resolved_rank(),
            "score_rank": cfg.resolved_score_rank(), "value_bits": cfg.value_bits}


def bench_dense(tokens: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    k = torch.randn(1, HKV, tokens, D)
    v = torch.randn(1, HKV, tokens, D)
    q = torch.randn(1, HQ, 1, D)

    def step():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return {"ms": median_ms(step, repeats), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {"cpu": cpu_model(), "cores": os.cpu_count(), "sals": sals.__version__,
               "date": time.strftime("%Y-%m-%d"), "rows": []}
    print(f"CPU: {results['cpu']} ({results['cores']} cores), sals {sals.__version__}")
    print("| tokens | method | step ms | vs dense | cache bytes | dense fp16 KV bytes | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        dense = bench_dense(tokens, args.repeats)
        dense_bytes = 2 * tokens * DK * 2
        print(f"| {tokens} | dense SDPA fp32 (torch {dense['torch']}, {dense['threads']} thr) | "
              f"{dense['ms']:.3f} | 1.00x | {dense_bytes} | {dense_bytes} | 1.00 |")
        results["rows"].append({"tokens": tokens, "method": "dense", **dense,
                                "bytes": dense_bytes})
        for preset in ("sals-25", "sals-12.5"):
            r = bench_sals(preset, tokens, args.repeats, rng)
            held, fp16 = r["memory"]["total"], r["memory"]["dense_fp16"]
            print(f"| {tokens} | {preset} (r={r['rank']}, r*={r['score_rank']}, "
                  f"{r['value_bits']}-bit, {r['selected']} selected) | {r['ms']:.3f} | "
                  f"{dense['ms'] / r['ms']:.2f}x | {held} | {fp16} | {held / fp16:.3f} |")
            results["rows"].append({"tokens": tokens, "method": preset, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
