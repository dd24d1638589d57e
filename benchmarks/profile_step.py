"""One SALS decode step (append + attend) on a filled cache, run a few times eagerly: a target
for Nsight Compute. The last step runs inside a profiler range, so
`ncu --profile-from-start off ... python3 benchmarks/profile_step.py ...` sees exactly the kernels
of one step (add `-k regex:rebuild_logits` for one of them).

    python3 benchmarks/profile_step.py SHAPE CONTEXT BATCH SETTING [STEPS]
e.g. llama2-7b 4096 16 sals-12.5. Shapes and settings are those of `python -m sals bench`.
"""

import sys

import torch

import sals
from sals.tools.bench import SHAPES, fill_cache


def main() -> None:
    shape, S, B, setting = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    hq, hkv, d = SHAPES[shape]
    cfg = sals.Config.preset(setting, hq, hkv, d, max_batch=B, max_tokens=S + 64,
                             dtype="float16", check_finite=False)
    proj, _ = torch.linalg.qr(torch.randn(hkv * d, hkv * d, device="cuda"))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cache = sals.LayerCache(cfg, sals.Rope(inv_freq.numpy()), proj[:, : cfg.rank].contiguous(),
                            device="cuda")
    fill_cache(cache, B, S, hkv, d, torch)
    q = torch.randn(B, 1, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(B, 1, hkv, d, device="cuda", dtype=torch.float16)
    pos = torch.full((B, 1), S, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    for i in range(steps):
        if i == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        cache.append(k, k, pos)
        cache.attend(q, pos, out=out)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    cache.close()


if __name__ == "__main__":
    main()
