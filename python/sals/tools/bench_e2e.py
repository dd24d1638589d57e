"""``python -m sals bench e2e``: end-to-end greedy decode speed, dense vs SALS.

For each model shape, context and batch, one run measures greedy decode of a prompt of random
token ids of the context's length, ``--new-tokens`` generated: the ``*-graph`` rows in one
GPT-Fast-class decode loop (``sals.tools.graph_decoder``), where dense and SALS differ in
attention only, the others through ``model.generate``:

- ``dense-graph``: the strong dense baseline, a GPT-Fast-class decode loop
  (``sals.tools.graph_decoder.DenseGraphDecoder``): the model's weights with fused QKV and gate/up
  copies, static K/V per layer, cuDNN SDPA over the cached tokens, the whole step one CUDA
  graph (its first two steps are the eager warm-up and the capture); prompts prefilled one
  sequence at a time; with ``--compile`` the step's forward is compiled by torch.compile
  first, as GPT-Fast does (the first step, not timed, compiles). On the CPU (``--model``) the same step runs eagerly; a model it does not
  implement (not Llama, Mistral or Qwen2) gets a "skipped" row;
- ``sals-25-graph`` / ``sals-12.5-graph``: the same decode loop
  (``SalsGraphDecoder``), its attention served by a SalsCache of the model patched with that
  preset (``--dense-kv`` and ``--compile`` apply as to ``dense-graph``); prompts prefilled
  one sequence at a time (``sals.hf.prefill``);
- ``dense-static-compiled``: transformers' static cache + torch.compile ("reduce-overhead",
  what ``generate`` does by itself with ``cache_implementation="static"``): what ``generate``
  users get; one warm-up generate of the same shapes first, so compilation is not timed;
- ``dense-dynamic``: transformers' default dynamic cache, eager;
- ``sals-25`` / ``sals-12.5``: the model patched with that preset and ``cuda_graph=True``
  (every decode step replayed as one CUDA graph; its first two steps are the eager warm-up and
  the capture, so ms per token is the median step). ``--dense-kv exact`` patches them with
  ``dense_kv="exact"`` (the dense layers attend over exact keys and values they keep instead
  of rebuilding every key), ``--compile`` with ``compile=True`` (the decode step's forward
  compiled by torch.compile, then captured; each row compiles at its first decode step,
  which is not timed).

Per row: TTFT (prompt to first token), ms per output token (median decode step), decode
tokens/s (batch / step time), peak GPU memory (torch's allocator peak plus the SALS caches'
own device allocation, which torch does not see; for the ``*-graph`` rows it includes the
fused weight copies) and the floor: bytes read per decode step (weights + K/V, or the SALS cache's
scored latent coordinates, selected latent rows and values) over the copy bandwidth measured in
the same run.

``--max-batch-context`` also finds, for the ``dense-graph``, ``sals-*-graph``, ``sals-25`` and
``sals-12.5`` settings among ``--settings``, the largest batch that runs at that context, prefill included,
and times its decode. Every one prefills its prompts one sequence at a time (SALS through
``sals.hf.prefill``, then ``generate``), so the cache, not the prompts' activations, decides
what fits. The batch is estimated from the memory budget (``--memory-gib``, or
``--memory-fraction`` of the device's) less the weights (and the dense decoder's fused copies)
and one prompt's activations, over the measured bytes of one sequence's cache; a batch that
runs out of memory is retried smaller until one runs.

GPU models have random weights of the real shapes (``SHAPES``); SALS projections are random
orthonormal matrices (decode time does not depend on their values). ``--model`` times a real
model from disk instead (e.g. SmolLM2 on the CPU, where the compiled row is left out and the
others run eagerly). Writes JSON (``--out``) and a PNG plot of tokens/s against context
(``--plot``); prints a table; shows a progress bar.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time

from . import _cli

SETTINGS = ("dense-graph", "sals-25-graph", "sals-12.5-graph", "dense-static-compiled",
            "dense-dynamic", "sals-25", "sals-12.5")

#: the rows timed in the decode loop of sals.tools.graph_decoder, not through generate
GRAPH_LOOP = ("dense-graph", "sals-25-graph", "sals-12.5-graph")

#: model shapes: (hidden, layers, heads, kv heads, intermediate, vocab, rope_theta)
SHAPES = {
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 10000.0),
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0),
}


def add_parser(subparsers) -> None:
    """Registers ``bench e2e``: its options and ``run``."""
    ap = subparsers.add_parser(
        "e2e", help="end-to-end decode: dense (graph loop, static+compile, dynamic) vs SALS "
                    "with CUDA graphs", description=__doc__.split("\n", 1)[1])
    ap.add_argument("--shapes", default="llama2-7b,llama3.1-8b",
                    help=f"comma-separated random-weight model shapes on the GPU, of "
                         f"{', '.join(SHAPES)} (default: both)")
    ap.add_argument("--model", default=None,
                    help="a real model instead (HF directory or .gguf on disk), e.g. SmolLM2 "
                         "on the CPU; SALS settings then need a calibration (computed and "
                         "cached like the demo's)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated rows of {', '.join(SETTINGS)} (default: all)")
    ap.add_argument("--contexts", default="4096,16384,32768",
                    help="comma-separated prompt lengths in tokens (default 4096,16384,32768)")
    ap.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=48,
                    help="tokens generated per run (default 48)")
    ap.add_argument("--max-batch-context", type=_cli.number(int, 0), default=0,
                    help="also time the dense-graph, sals-*-graph, sals-25 and sals-12.5 "
                         "settings (those of --settings) at the largest batch that runs at this context, "
                         "prompts prefilled one sequence at a time (0: skip; the issue's "
                         "regime is 32768)")
    ap.add_argument("--memory-fraction", type=_cli.number(float, 0, 1, above=True), default=0.9,
                    help="fraction of the GPU's memory (the host's for --model on the CPU) the "
                         "largest-batch search may fill (default 0.9)")
    ap.add_argument("--memory-gib", type=_cli.number(float, 0), default=0.0,
                    help="memory in GiB the largest-batch search may fill, weights included "
                         "(default 0: --memory-fraction of the device's)")
    ap.add_argument("--dense-kv", choices=("compressed", "exact"), default="compressed",
                    help="what the SALS rows' dense layers keep (sals.hf.patch's dense_kv): "
                         "the compressed cache, keys rebuilt every step (default, the paper's), "
                         "or exact keys and values")
    ap.add_argument("--compile", action="store_true",
                    help="compile the decode step's forward with torch.compile: the *-graph "
                         "rows' loop, and the SALS rows through generate (sals.hf.patch's "
                         "compile=True); on the GPU then captured in the CUDA graph")
    ap.add_argument("--out", default=None, help="write every row as JSON to this file")
    ap.add_argument("--plot", default=None, help="write a PNG of tokens/s against context")
    _cli.add_debug(ap)
    ap.set_defaults(run=run)


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _random_model(shape: str, torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, theta = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=131072, rope_theta=theta,
                         attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _random_calibration(model, torch):
    """A Calibration of random orthonormal full-rank projections, fingerprinted for ``model``
    (timing only: which tokens are selected does not change the work)."""
    import numpy as np

    from ..calibration import Calibration, Layer
    from ..hf import describe, fingerprint

    info = describe(model)
    device = next(model.parameters()).device
    layers = []
    for layer in info.layers:
        q, _ = torch.linalg.qr(torch.randn(layer.dk, layer.dk, device=device))
        rank = layer.dk // 4  # the largest rank of the SALS settings timed here
        layers.append(Layer(dk=layer.dk, rank=rank, eigenvalues=np.linspace(1.0, 0.0, layer.dk),
                            eigenvectors=q[:, :rank].cpu().numpy().astype(np.float32),
                            n_tokens=0))
    return Calibration(layers, fingerprint(model, info), data="random orthonormal")


class _Clock:
    """A logits processor recording when each token is chosen (generate waits for the logits
    every step anyway, to test its stopping criteria)."""

    def __init__(self, torch):
        self.torch, self.times = torch, []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            self.torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def _generate(model, ids, new_tokens, torch, prefill_rows=None, **kw) -> dict:
    """One timed generate. ``prefill_rows`` (a SALS-patched model): the prompts are first
    prefilled that many sequences at a time (``sals.hf.prefill``, inside the time to first
    token), and generate goes on from that cache."""
    from transformers import LogitsProcessorList

    import sals.hf

    from ..hf import CACHE_ARG

    clock = _Clock(torch)
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if prefill_rows:
        cache = sals.hf.SalsCache(model, ids.shape[0], ids.shape[1] - 1 + new_tokens)
        kw[CACHE_ARG] = sals.hf.prefill(model, cache, ids, rows=prefill_rows)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([clock]), **kw)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    cache = getattr(out, CACHE_ARG)
    mem = cache.memory() if hasattr(cache, "memory") else {}
    row = {**_timing(int(ids.shape[0]), clock.times[0] - start, steps),
           "peak_memory_bytes": _peak_memory(mem, ids.is_cuda, torch),
           "sals_cache_bytes": int(mem.get("allocated", 0))}
    # which attention the exact dense layers ran ("cudnn", or why cuDNN refused), as the
    # dense-graph row reports its own
    backends = {layer.attention_backend for layer in getattr(cache, "layers", ())
                if isinstance(layer, sals.hf.ExactLayer)}
    if backends:
        row["exact_attention"] = "; ".join(sorted(backends))
    return row


def _graph_loop(model, setting, ids, new_tokens, torch, compile: bool = False) -> dict:
    """A row of the decode loop (``dense-graph``: DenseGraphDecoder, ``sals-*-graph``:
    SalsGraphDecoder of the patched model; ``compile``: its step through torch.compile), timed
    as _generate times its rows: TTFT from the prefill's start to the first token, then one
    step per further token, each waited for; ms per token is the median step after the first
    two (the eager warm-up, which compiles, and the capture)."""
    from .graph_decoder import DenseGraphDecoder, SalsGraphDecoder
    from ..errors import InvalidArgumentError

    batch, S = (int(n) for n in ids.shape)
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    decoder = DenseGraphDecoder if setting == "dense-graph" else SalsGraphDecoder
    try:  # its cache and fused weight copies are allocated here, inside the peak
        dec = decoder(model, batch, S + new_tokens, compile=compile)
    except InvalidArgumentError as e:  # a --model of an architecture it does not implement
        return {"error": f"skipped: {e}"}

    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    dec.prefill(ids)
    sync()
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        dec.step()
        sync()
        steps.append(time.perf_counter() - start)
    mem = dec.cache.memory() if decoder is SalsGraphDecoder else {}
    row = {**_timing(batch, ttft, steps),
           "peak_memory_bytes": _peak_memory(mem, ids.is_cuda, torch),
           "fused_weight_bytes": dec.fused_bytes, "attention": dec.attention_backend,
           "compile": compile}
    if decoder is SalsGraphDecoder:
        row["sals_cache_bytes"] = int(mem.get("allocated", 0))
        dec.cache.close()
    return row


def _timing(batch: int, ttft_s: float, steps: list[float]) -> dict:
    """A row's times from the time to first token and the decode steps (seconds): ms per token
    is the median step after the first two (the eager warm-up and the capture)."""
    step_ms = 1e3 * statistics.median(steps[2:] if len(steps) > 4 else steps)
    return {"ttft_ms": 1e3 * ttft_s, "ms_per_token": step_ms,
            "tokens_per_s": batch * 1e3 / step_ms, "steps_ms": [1e3 * s for s in steps]}


def _peak_memory(mem: dict, cuda: bool, torch) -> int:
    """Peak bytes of a row: on CUDA torch's allocator peak plus the SALS caches' own device
    allocation (``mem``, a SalsCache's ``memory()``, or {}), which torch does not see, less
    the exact dense layers' K/V, which are torch tensors; on the CPU the caches' bytes."""
    sals_bytes = mem.get("allocated", 0)
    if not cuda:
        return int(sals_bytes)
    return int(torch.cuda.max_memory_allocated() + sals_bytes - mem.get("exact_kv_allocated", 0))


def attended_tokens(cfg, S: int) -> tuple[int, int]:
    """Candidates a sparse decode step selects at S tokens (the budget_frac rule) and the tokens
    it attends: those plus the sinks and the recent window."""
    nc = min(math.ceil(cfg.budget_frac * S), max(S - cfg.n_sink - cfg.n_recent, 0))
    return nc, nc + cfg.n_sink + cfg.n_recent


def step_bytes(model, setting: str, B: int, S: int) -> float:
    """Bytes one decode step reads: every weight once, plus K/V (dense, fp16) or the SALS
    cache's scored latent coordinates and selected tokens, per layer (exact K/V in the model's
    dtype for the dense layers patched with ``dense_kv="exact"``)."""
    from ..hf import patch_state

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not setting.startswith("sals"):
        cfg = model.config
        dk = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        return weights + cfg.num_hidden_layers * 2 * B * S * dk * 2
    state = patch_state(model)
    element = next(model.parameters()).element_size()
    total = weights + sum(B * S * 2 * state.info.layers[i].dk * element for i in state.exact)
    for cfg in state.configs.values():
        dk = cfg.n_head_kv * cfg.head_dim
        r, rs, bits = cfg.resolved_rank(), cfg.resolved_score_rank(), cfg.value_bits
        value_bytes = dk * (bits + 1) / 8 if bits < 16 else dk * 2
        if cfg.dense:
            total += B * S * (r * 2 + value_bytes)
            continue
        _, kept = attended_tokens(cfg, S)
        total += B * (S * rs * 2 + kept * (r * 2 + value_bytes))
    return total


def _copy_bandwidth(torch) -> float:
    """Bytes read + written per second by a 1 GiB device copy (median of 20)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (statistics.median(times[3:]) * 1e-3)


def _setting(model, setting: str, calib, torch, options: dict) -> dict:
    """Patch (or unpatch) ``model`` for ``setting`` (a SALS one with ``options``, more
    ``sals.hf.patch`` arguments); the generate kwargs of that row."""
    import sals.hf

    if sals.hf.is_patched(model):
        sals.hf.unpatch(model)
    if setting == "dense-static-compiled":
        return {"cache_implementation": "static"}
    if setting in ("dense-dynamic", "dense-graph"):
        return {}
    if setting in GRAPH_LOOP:  # the decode loop captures its own step
        sals.hf.patch(model, calibration=calib, preset=setting.removesuffix("-graph"),
                      dense_kv=options.get("dense_kv", "compressed"))
        return {}
    on_cuda = next(model.parameters()).is_cuda
    sals.hf.patch(model, calibration=calib, preset=setting, cuda_graph=on_cuda, **options)
    return {}


def run_row(model, setting, B, S, new_tokens, calib, bandwidth, torch,
            prefill_rows=None, options=None) -> dict:
    """One row: ``setting`` at batch B and context S. ``prefill_rows``: SALS prompts prefilled
    that many sequences at a time (dense-graph always prefills one at a time). ``options``:
    the SALS rows' other ``sals.hf.patch`` arguments (``dense_kv``, ``compile``), recorded in
    the row."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(B * 100003 + S)
    vocab = model.config.vocab_size  # ids clear of the special tokens at either end
    ids = torch.randint(vocab // 16, vocab - vocab // 16, (B, S), generator=gen).to(device)
    options = options or {}
    kw = _setting(model, setting, calib, torch, options)
    if setting in GRAPH_LOOP:
        result = _graph_loop(model, setting, ids, new_tokens, torch,
                             compile=options.get("compile", False))
    else:
        if setting == "dense-static-compiled":
            _generate(model, ids, new_tokens, torch, **kw)  # compiles; not timed
        rows = prefill_rows if setting.startswith("sals") else None
        result = _generate(model, ids, new_tokens, torch, prefill_rows=rows, **kw)
    row = {"setting": setting, "batch": B, "context": S, **result}
    if setting.startswith("sals"):
        row.update(options)
    if bandwidth and "error" not in row:
        row["floor_ms"] = 1e3 * step_bytes(model, setting, B, S + new_tokens // 2) / bandwidth
        row["of_floor"] = row["floor_ms"] / row["ms_per_token"]
    return row


#: the settings (of --settings) timed at the largest batch that runs (--max-batch-context)
LARGEST_BATCH_SETTINGS = ("dense-graph", "sals-25-graph", "sals-12.5-graph", "sals-25",
                          "sals-12.5")


def _memory_budget(args, on_gpu: bool, torch) -> float:
    """Bytes the largest-batch search may fill: --memory-gib, or --memory-fraction of the GPU's
    memory (of the host's on the CPU)."""
    if args.memory_gib > 0:
        return args.memory_gib * 2**30
    if on_gpu:
        return args.memory_fraction * torch.cuda.mem_get_info()[1]
    return args.memory_fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _largest_batch(model, setting, S, new_tokens, calib, budget: float, torch,
                   options: dict) -> int:
    """The largest batch whose caches fit in ``budget`` bytes beside the weights, the decode
    loop's fused weight copies (``*-graph`` rows) and one prompt's prefill activations (prompts are prefilled
    one at a time): from the bytes one sequence's cache takes (dense K+V in the model's dtype,
    or what a SALS cache allocates per sequence, workspace included)."""
    import sals.hf

    from .graph_decoder import fused_weight_bytes

    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    if setting.startswith("sals"):
        _setting(model, setting, calib, torch, options)
        # caches of one and two sequences: the difference is a sequence's, the rest is fixed
        # (the projections, a CPU cache's thread workspace)
        sizes = []
        for n in (1, 2):
            probe = sals.hf.SalsCache(model, n, S + new_tokens)
            sizes.append(probe.memory()["allocated"])
            probe.close()
        per_seq = sizes[1] - sizes[0]
        fixed = weights + sizes[0] - per_seq
        if setting in GRAPH_LOOP:
            fixed += fused_weight_bytes(model)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_seq = cfg.num_hidden_layers * 2 * (S + new_tokens) * cfg.num_key_value_heads * \
            head_dim * element
        fixed = weights + fused_weight_bytes(model)
    # one prompt's activations: a few hidden-size rows and the MLP's two intermediate rows per
    # token (the LM head runs on the last token only)
    act = S * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * element
    return max(int((budget - fixed - act) // per_seq), 0)


def _largest_batch_row(model, setting, S, new_tokens, calib, bandwidth, budget, torch,
                       options: dict) -> dict:
    """``setting`` timed at the largest batch that runs: the estimate of _largest_batch, then
    smaller batches (10% fewer, at least one fewer) while one runs out of memory; ``tried``
    lists the batches tried."""
    from .graph_decoder import check_model
    from ..errors import InvalidArgumentError

    if setting in GRAPH_LOOP:
        try:  # a --model of an architecture the decode loop does not implement
            check_model(model, S + new_tokens)
        except InvalidArgumentError as e:
            return {"setting": setting, "batch": 0, "context": S, "error": f"skipped: {e}"}
    batch = _largest_batch(model, setting, S, new_tokens, calib, budget, torch, options)
    tried, error = [], f"no batch fits {budget / 2**30:.2f} GiB"
    while batch >= 1:
        tried.append(batch)
        try:
            row = run_row(model, setting, batch, S, new_tokens, calib, bandwidth, torch,
                          prefill_rows=1, options=options)
            return {**row, "tried": tried, "prefill_rows": 1}
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            error = f"out of memory: {str(e).splitlines()[0]}"
        gc.collect()  # the failed attempt's tensors, held by its traceback until now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch = min(batch - 1, int(batch * 0.9))
    return {"setting": setting, "batch": 0, "context": S, "error": error, "tried": tried}


def run(args) -> int:
    """``bench e2e`` with parsed arguments (see :func:`add_parser`)."""
    import torch

    settings = _csv(args.settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        print(f"sals bench e2e: unknown settings {bad}; choose from {', '.join(SETTINGS)}",
              file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    import sals.hf

    on_gpu = args.model is None
    if on_gpu and not (torch.cuda.is_available() and sals.cuda_available()):
        print("sals bench e2e: random-weight GPU shapes need torch with CUDA and a CUDA build "
              "of sals (or --model for a real model on the CPU)", file=sys.stderr)
        return 1
    bandwidth = _copy_bandwidth(torch) if on_gpu else 0.0
    contexts, batches = _csv(args.contexts, int), _csv(args.batches, int)
    models = _csv(args.shapes) if on_gpu else [args.model]
    if not on_gpu:  # the compiled static-cache decode is a GPU row; the others run eagerly
        settings = [s for s in settings if s != "dense-static-compiled"]
    rows = []
    meta = _meta(args, torch, on_gpu, bandwidth)
    options = {"dense_kv": args.dense_kv, "compile": args.compile}

    def save():  # after every row, so that an interrupted run keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    largest = [s for s in settings if s in LARGEST_BATCH_SETTINGS] if args.max_batch_context \
        else []
    per_model = len(contexts) * len(batches) * len(settings) + len(largest)
    bar = tqdm(total=len(models) * per_model, unit="row")
    for name in models:
        if on_gpu:
            model = _random_model(name, torch)
            calib = _random_calibration(model, torch)
        else:
            from ..hf import calibrate, loading

            model, tok = loading.load(name, device="cpu")
            calib, _, _ = calibrate.cached_calibration(model, tok)
        for S in contexts:
            for B in batches:
                for setting in settings:
                    bar.set_description(f"{name} {setting} B={B} S={S}")
                    try:
                        row = run_row(model, setting, B, S, args.new_tokens, calib, bandwidth,
                                      torch, options=options)
                    except torch.cuda.OutOfMemoryError as e:
                        row = {"setting": setting, "batch": B, "context": S,
                               "error": f"out of memory: {str(e).splitlines()[0]}"}
                    row["model"] = os.path.basename(name)
                    rows.append(row)
                    save()
                    bar.update()
                    torch.cuda.empty_cache() if on_gpu else None
        if largest:
            budget = _memory_budget(args, on_gpu, torch)
            for setting in largest:
                bar.set_description(f"{name} {setting} largest batch")
                row = _largest_batch_row(model, setting, args.max_batch_context, args.new_tokens,
                                         calib, bandwidth, budget, torch, options)
                row.update(model=os.path.basename(name), largest_batch=True,
                           memory_budget_bytes=int(budget))
                rows.append(row)
                save()
                bar.update()
                torch.cuda.empty_cache() if on_gpu else None
        if sals.hf.is_patched(model):
            sals.hf.unpatch(model)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    bar.close()
    _print(rows)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _meta(args, torch, on_gpu: bool, bandwidth: float) -> dict:
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
            "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "copy_bytes_per_s": bandwidth, "new_tokens": args.new_tokens,
            "dense_kv": args.dense_kv, "compile": args.compile,
            "command": "python -m sals " + " ".join(sys.argv[1:])}


def _print(rows) -> None:
    print(f"{'model':<12} {'setting':<22} {'B':>3} {'S':>6} {'TTFT ms':>9} {'ms/tok':>8} "
          f"{'tok/s':>8} {'peak GiB':>8} {'floor ms':>8} {'of floor':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['setting']:<22} {r['batch']:>3} {r['context']:>6} "
                  f"{r['error']}")
            continue
        tag = " (largest batch)" if r.get("largest_batch") else ""
        setting = r["setting"] + ("+exact" if r.get("dense_kv") == "exact" else "") + \
            ("+compile" if r.get("compile") else "")
        print(f"{str(r['model'])[-12:]:<12} {setting:<22} {r['batch']:>3} {r['context']:>6} "
              f"{r['ttft_ms']:9.1f} {r['ms_per_token']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r['peak_memory_bytes'] / 2**30:8.1f} {r.get('floor_ms', float('nan')):8.2f} "
              f"{r.get('of_floor', float('nan')):8.0%}{tag}")


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["batch"]) for r in rows if "error" not in r and
                   not r.get("largest_batch")}, key=str)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 4),
                             squeeze=False)
    for ax, (model, batch) in zip(axes[0], keys):
        for setting in SETTINGS:
            pts = sorted((r["context"], r["tokens_per_s"]) for r in rows
                         if r["model"] == model and r["batch"] == batch and
                         r["setting"] == setting and "error" not in r and
                         not r.get("largest_batch"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=setting)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
               title=f"{model}, batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
