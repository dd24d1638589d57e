"""``python -m sals bench attention``: the decode attention operator on one GPU.

One run measures, for each shape (LLaMA2-7B: 32/32 heads, Llama-3.1-8B: 32/8 heads, d = 128),
context and batch:

- SALS-25% and SALS-12.5% (paper settings: r = Dk/4 with 4-bit values / r = Dk/8 with 2-bit
  values, r* = r/2, budget 1/8, 16 sinks, 64 recent): one full decode step (the query's own
  append, then attend) on a cache already filled to the context, replayed from a CUDA graph and
  timed with CUDA events (median over many replays);
- dense decode through ``torch.nn.functional.scaled_dot_product_attention`` on fp16 K/V with the
  FlashAttention backend and with the cuDNN backend;
- the floors of the step (:func:`floors`: the bytes it must read, scores of every token plus the
  selected latent rows and values, over the measured copy bandwidth; the rebuild's FLOPs over the
  measured bf16 matrix rate) and the fraction of the floor reached;
- per-kernel times of one SALS step (torch profiler), the kernel launches a step makes, and each
  kernel's own floor (the bytes it must move and the FLOPs it must do, :func:`kernel_floors`), so a
  note can say where the time goes and how far each kernel is from its floor.

Writes JSON (``--out``) and prints a table. Needs torch with CUDA and a CUDA build of sals.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time

from . import _cli, bench_e2e

SHAPES = {"llama2-7b": (32, 32, 128), "llama3.1-8b": (32, 8, 128)}
SETTINGS = ("sals-25", "sals-12.5")


def _median_ms(fn, iters: int, torch, *args) -> float:
    """Median of `iters` event-timed calls of fn(*args) (after 3 warm-up calls)."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure_ceilings(torch) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matrix rate, on random data."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    ms = _median_ms(torch.empty_like(src).copy_, 20, torch, src)
    bw = 2 * n / (ms * 1e-3)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(a.matmul, 20, torch, torch.randn_like(a))
    rate = 2 * m**3 / (ms * 1e-3)
    src = a = None  # free both before the benchmarks allocate
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flop_per_s": rate}


def floors(cfg, B: int, S: int, ceil: dict) -> dict:
    """The step's floors per layer, summed over the batch (S tokens per sequence): bytes read =
    S r* 2 (scores) + (selected + 80) (2 r + Dk (bits + 1) / 8) (latent rows and values), FLOPs
    = 2 (selected + 80) r Dk (the rebuild)."""
    dk = cfg.n_head_kv * cfg.head_dim
    r, rs, bits = cfg.rank, cfg.score_rank, cfg.value_bits
    _, kept = bench_e2e.attended_tokens(cfg, S)
    score_bytes = S * rs * 2
    gather_bytes = kept * (r * 2 + dk * (bits + 1) / 8)
    flops = 2 * kept * r * dk
    t_bytes = B * (score_bytes + gather_bytes) / ceil["copy_bytes_per_s"]
    t_flops = B * flops / ceil["bf16_flop_per_s"]
    return {
        "bytes": B * (score_bytes + gather_bytes),
        "flops": B * flops,
        "floor_ms": 1e3 * max(t_bytes, t_flops),
        "score_floor_ms": 1e3 * B * score_bytes / ceil["copy_bytes_per_s"],
        "attend_floor_ms": 1e3 * max(B * gather_bytes / ceil["copy_bytes_per_s"], t_flops),
        "bound": "flops" if t_flops > t_bytes else "bytes",
    }


def fill_cache(cache, B, S, Hkv, d, torch, chunk=2048):
    """Appends S random fp16 tokens to each of the B sequences of `cache` (a sals.LayerCache on
    CUDA), in chunks of `chunk` tokens."""
    for t0 in range(0, S, chunk):
        t = min(chunk, S - t0)
        k = torch.randn(B, t, Hkv, d, device="cuda", dtype=torch.float16)
        v = torch.randn(B, t, Hkv, d, device="cuda", dtype=torch.float16)
        pos = torch.arange(t0, t0 + t, device="cuda", dtype=torch.int32).expand(B, t).contiguous()
        cache.append(k, v, pos)
    torch.cuda.synchronize()


def kernel_floors(cfg, B: int, S: int, ceil: dict) -> dict:
    """The floor of each stage of one decode step (ms): the bytes the stage must read and write
    once over the copy bandwidth, or its FLOPs over the matrix rate, whichever is larger.
    Stages are named as in :data:`STAGE_OF_KERNEL`; float32 workspaces (scores, logits,
    partials) count as the kernels write and read them today, the projection as its float32
    copy. A fused kernel's floor is the sum of the stages it runs."""
    dk, d = cfg.n_head_kv * cfg.head_dim, cfg.head_dim
    r, rs, bits, hq = cfg.rank, cfg.score_rank, cfg.value_bits, cfg.n_head_q
    nc, kept = bench_e2e.attended_tokens(cfg, S)
    code_bytes = dk * (bits + 1) / 8  # codes + float16 scale and zero per 32 channels
    stage_bytes = {
        # v (and k for the exact window) in, codes and the window's copies out
        "values": B * (2 * dk * 2 + code_bytes + 2 * dk * 2),
        "key projection": dk * r * 4 + B * (dk * 2 + r * 2),
        "query fold": dk * rs * 4 + B * (hq * d * 2 + rs * 4),
        "score": B * S * (rs * 2 + 4),
        "top-k": B * (S * 4 + nc * 4),
        "rebuild": dk * r * 2 + B * (kept * r * 2 + 2 * 80 * dk * 2 + hq * kept * 4),
        "softmax+P.V": B * (hq * kept * 4 + kept * code_bytes + hq * d * 4),
        "merge": B * hq * d * 2,
    }
    flops = {"rebuild": 2 * B * kept * r * dk}
    out = {}
    for stage, nbytes in stage_bytes.items():
        t = max(nbytes / ceil["copy_bytes_per_s"], flops.get(stage, 0) / ceil["bf16_flop_per_s"])
        out[stage] = 1e3 * t
    return out


# Kernel name (as _kernel_times reports it) -> the stages of kernel_floors it runs.
STAGE_OF_KERNEL = (
    (r"^values_kernel", ("values",)),
    (r"KRowLoad", ("key projection",)),
    (r"QFoldLoad", ("query fold",)),
    (r"^score", ("score",)),
    (r"^topk", ("top-k",)),
    (r"^rebuild_logits", ("rebuild",)),
    (r"^softmax_pv", ("softmax+P.V", "merge")),  # its last block per KV head merges
)


def kernel_floor_ms(name: str, floors: dict) -> float | None:
    """The floor of kernel `name` from kernel_floors' stages, or None for a kernel no stage
    describes (e.g. a finite check)."""
    for pattern, stages in STAGE_OF_KERNEL:
        if re.search(pattern, name):
            return sum(floors[s] for s in stages)
    return None


def _kernel_times(step, torch, reps=5) -> tuple[dict, dict]:
    """Per-kernel device time of one step (mean over reps) and launches of each kernel per step,
    from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    launches: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and t > 0:
            # full kernel name with template arguments, without namespaces and parameters
            name = ev.key.replace("(anonymous namespace)::", "").replace("sals_cuda::", "")
            name = name.removeprefix("void ").split("(")[0]
            times[name] = times.get(name, 0.0) + t / 1e3 / reps
            launches[name] = launches.get(name, 0.0) + ev.count / reps
    return times, launches


def bench_sals(sals, torch, shape, setting, B, S, ceil, iters, graph_steps) -> dict:
    hq, hkv, d = SHAPES[shape]
    cfg = sals.Config.preset(
        setting,
        hq,
        hkv,
        d,
        max_batch=B,
        max_tokens=S + 64 + graph_steps * (iters + 8),
        dtype="float16",
        check_finite=False,
    )
    dk = hkv * d
    proj, _ = torch.linalg.qr(torch.randn(dk, dk, device="cuda", dtype=torch.float32))
    proj = proj[:, : cfg.rank].contiguous()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rope = sals.Rope(inv_freq.numpy())
    cache = sals.LayerCache(cfg, rope, proj, device="cuda")
    t0 = time.time()
    fill_cache(cache, B, S, hkv, d, torch)
    fill_s = time.time() - t0
    k1 = torch.randn(B, 1, hkv, d, device="cuda", dtype=torch.float16)
    v1 = torch.randn(B, 1, hkv, d, device="cuda", dtype=torch.float16)
    q1 = torch.randn(B, 1, hq, d, device="cuda", dtype=torch.float16)
    pos1 = torch.full((B, 1), S, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q1)

    def step():
        cache.append(k1, v1, pos1)
        cache.attend(q1, pos1, out=out)

    kernels, launches = _kernel_times(step, torch)
    stage_floors = kernel_floors(cfg, B, S, ceil)
    res = {
        "fill_s": fill_s,
        "kernels_ms": kernels,
        "kernel_floor_ms": {k: kernel_floor_ms(k, stage_floors) for k in kernels},
        "launches_per_step": sum(launches.values()),
        "graph": False,
    }
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph_steps):
                step()
        ms = _median_ms(g.replay, iters, torch) / graph_steps
        res["graph"] = True
    except RuntimeError as e:  # capture unsupported by this build: eager events instead
        res["graph_error"] = repr(e)
        ms = _median_ms(step, iters, torch)
    res["ms"] = ms
    res.update(floors(cfg, B, S, ceil))
    res["fraction_of_floor"] = res["floor_ms"] / ms
    cache.close()  # releases the cache's device memory
    torch.cuda.empty_cache()
    return res


def bench_dense(torch, shape, B, S, backend, iters) -> float | None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, d = SHAPES[shape]
    q = torch.randn(B, hq, 1, d, device="cuda", dtype=torch.float16)
    k = torch.randn(B, hkv, S, d, device="cuda", dtype=torch.float16)
    v = torch.randn(B, hkv, S, d, device="cuda", dtype=torch.float16)
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    F = torch.nn.functional
    gqa = hq != hkv

    def run():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    try:
        run()
        torch.cuda.synchronize()
    except RuntimeError:
        if not gqa:
            return None
        # backend without GQA support: expanded K/V (reads Hq/Hkv times the bytes)
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        gqa = False
        try:
            run()
        except RuntimeError:
            return None
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(10):
                run()
        return _median_ms(g.replay, iters, torch) / 10
    except RuntimeError:
        return _median_ms(run, iters, torch)
    finally:
        q = k = v = None  # free the dense K/V before the next configuration
        torch.cuda.empty_cache()


def _fits(shape, B, S, budget_bytes) -> bool:
    _, hkv, d = SHAPES[shape]
    dense = 2 * B * S * hkv * d * 2
    return dense * 1.25 < budget_bytes


def add_parser(subparsers) -> None:
    """Registers ``bench attention``: its options and ``run``."""
    p = subparsers.add_parser(
        "attention", help="the decode attention operator: SALS vs dense SDPA (one GPU)",
        description=__doc__.split("\n", 1)[1])
    p.add_argument("--shapes", type=_cli.csv(str, tuple(SHAPES)), default=",".join(SHAPES),
                   help="comma-separated attention shapes: llama2-7b (32 query / 32 KV heads, "
                        "d 128), llama3.1-8b (32 / 8, d 128)")
    p.add_argument("--settings", type=_cli.csv(str, SETTINGS), default=",".join(SETTINGS),
                   help="comma-separated SALS presets to time")
    p.add_argument("--contexts", type=_cli.csv(int), default="1024,4096,32768,131072",
                   help="comma-separated context lengths S (tokens already in the cache)")
    p.add_argument("--batches", type=_cli.csv(int), default="1,8,16",
                   help="comma-separated batch sizes B")
    p.add_argument("--iters", type=int, default=30,
                   help="timed replays per measurement (the median is reported)")
    p.add_argument("--graph-steps", type=int, default=10,
                   help="decode steps captured in one CUDA graph (a replay's time is divided "
                        "by this)")
    p.add_argument("--max-fill-tokens", type=int, default=1 << 20,
                   help="skip SALS rows whose cache fill exceeds this many tokens (B*S)")
    p.add_argument("--out", metavar="FILE",
                   help="write the results as JSON (rewritten after every row)")
    _cli.add_debug(p)
    p.set_defaults(run=run_attention)


def parser() -> _cli.ArgumentParser:
    """``python -m sals bench BENCHMARK [options]``. A benchmark is one subcommand: a module
    with ``add_parser(subparsers)`` that adds its parser and sets ``run`` (called with the
    parsed arguments; returns the exit status). Its imports of torch belong in ``run``, so that
    ``--help`` stays fast."""
    ap = _cli.ArgumentParser(prog="python -m sals bench",
                             description="Benchmarks of sals; each has its own --help.")
    _cli.add_debug(ap)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", help="",
                            title="benchmarks")
    add_parser(sub)
    bench_e2e.add_parser(sub)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


def run_attention(args) -> int:
    """``bench attention`` with parsed arguments (see :func:`add_parser`)."""
    import torch

    import sals

    if not torch.cuda.is_available() or not sals.cuda_available():
        why = ("torch sees no CUDA device" if not torch.cuda.is_available() else
               "this sals was built without CUDA (SALS_CUDA=OFF, or no nvcc at build time)")
        print(f"sals bench attention: error: needs a CUDA device and a CUDA build of sals: {why}",
              file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_properties(0)
    total = dev.total_memory
    ceil = measure_ceilings(torch)
    meta = {
        "gpu": dev.name,
        "torch": torch.__version__,
        "sals": sals.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **ceil,
    }
    print(
        f"# {dev.name}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceil['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    rows = []
    for shape in args.shapes:
        for S in args.contexts:
            for B in args.batches:
                row = {"shape": shape, "context": S, "batch": B}
                if not _fits(shape, B, S, 0.8 * total):
                    row["skipped"] = "dense fp16 K/V does not fit"
                    rows.append(row)
                    continue
                for backend in ("flash", "cudnn"):
                    try:
                        row[f"sdpa_{backend}_ms"] = bench_dense(
                            torch, shape, B, S, backend, args.iters
                        )
                    except torch.OutOfMemoryError:
                        row[f"sdpa_{backend}_ms"] = None
                        torch.cuda.empty_cache()
                for setting in args.settings:
                    if B * S > args.max_fill_tokens:
                        row[setting] = {"skipped": f"fill of {B * S} tokens over --max-fill-tokens"}
                        continue
                    try:
                        r = bench_sals(
                            sals, torch, shape, setting, B, S, ceil, args.iters, args.graph_steps
                        )
                    except (torch.OutOfMemoryError, MemoryError) as e:
                        r = {"skipped": f"out of memory: {e}"}
                        torch.cuda.empty_cache()
                    for backend in ("flash", "cudnn"):
                        d_ms = row.get(f"sdpa_{backend}_ms")
                        if d_ms and "ms" in r:
                            r[f"speedup_vs_{backend}"] = d_ms / r["ms"]
                    row[setting] = r
                rows.append(row)
                _print_row(row, args.settings)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _print_row(row, settings):
    head = f"{row['shape']:<12} S={row['context']:<6} B={row['batch']:<3}"
    print(
        f"{head} flash {_fmt(row.get('sdpa_flash_ms'))} ms  cudnn "
        f"{_fmt(row.get('sdpa_cudnn_ms'))} ms",
        flush=True,
    )
    for s in settings:
        r = row.get(s, {})
        if "ms" not in r:
            print(f"    {s:<10} {r.get('skipped', '-')}", flush=True)
            continue
        def kernel(name, ms):
            fl = r.get("kernel_floor_ms", {}).get(name)
            short = name.split("<")[0]
            return f"{short} {ms:.3f}" + (f" ({100 * fl / ms:.0f}%)" if fl else "")

        ks = ", ".join(kernel(k, v) for k, v in
                       sorted(r["kernels_ms"].items(), key=lambda kv: -kv[1])[:8])
        print(
            f"    {s:<10} {r['ms']:.3f} ms  x{_fmt(r.get('speedup_vs_flash'), '.2f')} flash "
            f"x{_fmt(r.get('speedup_vs_cudnn'), '.2f')} cudnn  floor {r['floor_ms']:.3f} ms "
            f"({r['bound']}) {100 * r['fraction_of_floor']:.0f}%  graph={r['graph']}  "
            f"fill {r['fill_s']:.1f}s",
            flush=True,
        )
        print(f"        {r['launches_per_step']:.0f} launches per step; kernels ms "
              f"(of their floor): {ks}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
