"""Compiled and CUDA-graph decode steps of a patched model (``sals.hf.patch(model, ...,
cuda_graph=True)`` and/or ``compile=True``).

A decode step (one new token per sequence into a non-empty SalsCache) runs the model's forward
without its cache-dependent Python: the host checks the step, then the forward only stores
each layer's key and value and attends (the patched attention's step path, reading the cache
of the :class:`Step` in ``PatchState.step``), then the host advances the rows' lengths
(``SalsLayer.row_slots``). Nothing in that forward reads a host value that changes from step
to step, so it can be

  - compiled (``compile``): ``torch.compile`` (inductor, ``fullgraph``) of the whole forward,
    the ``torch.ops.sals`` operators opaque inside it; compiled once per patch, at its first
    decode step (once more when a batch size, or an ExactLayer's cache size, first changes:
    torch.compile then makes it dynamic), and shared by every SalsCache of the patch: the
    cache comes in as objects holding tensors (operator handles, an ExactLayer's K/V), on
    which the compiled graph guards by shape, not identity;
  - captured (``cuda_graph``, CUDA only) as one CUDA graph per cache and batch size, compiled
    or not: later steps copy the step's token ids, positions and slot into the graph's static
    inputs and replay it, with no Python per layer, no host synchronisation and no
    allocation.

What a graph bakes in, and how the host keeps it right (FlashInfer's plan/run split):
  - sizes and device pointers: the graph belongs to one SalsCache and one batch size;
  - per-step lengths live on the device (the kernels read them); the host only reserves each
    replayed token's slot (``LayerCache.reserve``) and advances ``SalsLayer.row_slots``; an
    ExactLayer writes at the slot the static ``slot`` tensor holds;
  - positions come in through the static ``position_ids``; a decode token that the 2D
    ``attention_mask`` marks as padding is passed at position -1 (not stored, zero output), so
    the model's 4D mask is not needed (the forward runs without mask and cache; what
    transformers builds for one key then goes unused);
  - ``check_finite``: the device-side flags of earlier replays are read (without waiting) before
    each replay, so NaN/inf input still raises ``NotFiniteError``.

With ``cuda_graph`` the first decode step of a cache runs without a graph (it also warms up
cuBLAS, lazy module loading and, with ``compile``, compiles), the second is captured and
replayed, the rest replay.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from .. import CapacityError, InvalidArgumentError, UnsupportedError
from . import _arch
from .cache import SalsCache, SalsLayer

#: the option that makes a decode step what it is, and what it is called in errors
_WHAT = {"cuda_graph": "captured", "compile": "compiled"}

#: forward arguments a compiled or captured step accepts; their values are checked in
#: _check_kwargs
_ACCEPTED = frozenset({"input_ids", "attention_mask", "position_ids", "use_cache",
                       "logits_to_keep", "return_dict", "output_attentions",
                       "output_hidden_states"})


@dataclasses.dataclass
class Step:
    """The decode step a patched attention serves while ``PatchState.step`` holds it."""

    cache: SalsCache
    slot: torch.Tensor           # [1] int64 on the model's device: the rows' length before it


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    input_ids: torch.Tensor      # [B, 1] int64, static
    position_ids: torch.Tensor   # [B, 1] int64, static; -1 marks padding
    slot: torch.Tensor           # [1] int64, static
    output: object = None        # the captured forward's output (its logits are static)
    logits_to_keep: object = None


def check_model(info) -> None:
    """Refuse, at patch time, a model whose decode step cannot be captured."""
    sliding = [layer.index for layer in info.layers if layer.sliding]
    if sliding:
        raise UnsupportedError(
            f"cuda_graph: layers {sliding} are sliding-window layers, whose exact window cache "
            f"grows by concatenation and cannot be captured in a CUDA graph; patch without "
            f"cuda_graph=True")
    devices = {layer.device.type for layer in info.layers}
    if devices != {"cuda"}:
        raise UnsupportedError(
            f"cuda_graph: the model is on {sorted(devices)}; CUDA graphs need every layer on CUDA")


def check_compile(info) -> None:
    """Refuse, at patch time, ``compile=True`` where it cannot serve."""
    sliding = [layer.index for layer in info.layers if layer.sliding]
    if sliding:
        raise UnsupportedError(
            f"compile: layers {sliding} are sliding-window layers, whose exact window cache "
            f"grows by concatenation (a new shape, so a new compilation, every step); patch "
            f"without compile=True")
    if "inductor" not in torch.compiler.list_backends() or \
            not torch._dynamo.is_inductor_supported():
        raise UnsupportedError(
            f"compile: torch {torch.__version__} has no usable inductor (torch.compile) on this "
            f"Python; patch without compile=True")
    if any(layer.device.type == "cuda" for layer in info.layers):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UnsupportedError(
                "compile: inductor compiles CUDA models with Triton, which this environment "
                "lacks (pip install triton); patch without compile=True")


def step_forward(forward, compile: bool):
    """The function a decode step runs: ``forward`` (the model's own, unpatched) of one token
    per sequence with no cache argument and no mask, through ``torch.compile`` when asked
    (default mode: ``cuda_graph`` captures the step itself, so inductor's own CUDA graphs stay
    off)."""

    def step(input_ids, position_ids, logits_to_keep):
        return forward(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                       use_cache=False, logits_to_keep=logits_to_keep)

    return compiled(step) if compile else step


def compiled(fn):
    """``torch.compile(fn, fullgraph=True)`` of a private copy of ``fn``'s code. Dynamo keeps
    its compiled graphs, and counts recompilations against a limit of 8, per code object: one
    shared by every patch (or decoder) in the process would reach it after a few model shapes
    or settings, and fullgraph then fails. A copy of the code gives each caller its own."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                             fn.__defaults__, fn.__closure__)
    return torch.compile(own, fullgraph=True)


def is_decode_step(cache, given: dict) -> bool:
    """A forward that a captured step serves: one new token per sequence, a SalsCache that
    already holds the prompt (not a one-token chunk of ``sals.hf.prefill``, which fills a group
    of rows)."""
    if not isinstance(cache, SalsCache) or cache.filling:
        return False
    x = given.get("input_ids")
    if x is None:
        x = given.get("inputs_embeds")
    return x is not None and x.dim() >= 2 and x.shape[1] == 1 and cache.get_seq_length() > 0


def _check_kwargs(given: dict, cache: SalsCache, config, option: str) -> None:
    """Refuse what a captured step cannot serve: it returns the logits and the cache only.
    ``given``: the forward's arguments, ``**kwargs`` flattened; the cache may come under any
    name transformers takes it under (5.24 and 5.25 still map ``past_key_values`` to
    ``cache``)."""
    other = sorted(k for k, v in given.items()
                   if k not in _ACCEPTED and not (k in _arch.CACHE_ARGS and v is cache))
    if given.get("inputs_embeds") is not None:
        other.append("inputs_embeds")
    # a flag not passed takes the model config's value, as transformers reads it
    # (capture_outputs for output_*, can_return_tuple for return_dict)
    for flag in ("output_attentions", "output_hidden_states"):
        if flag in given:
            if given[flag]:
                other.append(flag)
        elif getattr(config, flag, False):
            other.append(f"config.{flag}")
    if given.get("return_dict") is False:
        other.append("return_dict=False")
    elif given.get("return_dict") is None and getattr(config, "return_dict", True) is False:
        other.append("config.return_dict=False")
    if other:
        raise UnsupportedError(
            f"{option}: a {_WHAT[option]} decode step takes input_ids, attention_mask, "
            f"position_ids and logits_to_keep only; got {sorted(set(other))} (patch without "
            f"{option}=True for these)")


def sals_layers(cache: SalsCache) -> list[SalsLayer]:
    """The cache's SALS layers (ExactLayers included): those a replayed step must account for
    with :func:`reserve` before and :func:`advance` after."""
    return [layer for layer in cache.layers if isinstance(layer, SalsLayer)]


def reserve(layers: list[SalsLayer], batch: int) -> None:
    """Before a replayed step of rows 0..batch-1: its appends run on the device only, so each
    layer reserves the step's slot in its library (and reports earlier deferred checks)."""
    for layer in layers:
        layer.reserve_step(batch)


def _step_positions(given: dict, cache: SalsCache, batch: int, device,
                    option: str) -> torch.Tensor:
    """[B, 1] int64 positions of the step's tokens, -1 where the 2D mask marks padding."""
    pos = given.get("position_ids")
    if pos is None:  # what the model does without position_ids: offset by the cache length
        pos = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long, device=device)
    pos = pos.to(device=device, dtype=torch.long).expand(batch, 1)
    mask = given.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise UnsupportedError(
                f"{option}: attention_mask must be the 2D [batch, keys] padding mask")
        pos = pos.masked_fill(mask[:, -1:].to(device) == 0, -1)
    return pos


def decode_step(state, cache: SalsCache, given: dict):
    """Run one decode step of the patched model: compiled and/or through its CUDA graph
    (capturing it on the cache's second decode step). Returns the model output."""
    option = "cuda_graph" if state.cuda_graph else "compile"
    cache_arg = state.info.cache_arg
    given = {**given, **given.get("kwargs", {})}  # the forward's **kwargs, flattened
    given.pop("kwargs", None)
    _check_kwargs(given, cache, state.info.config, option)
    keep = given.get("logits_to_keep")
    keep = 0 if keep is None else keep
    ids = given["input_ids"]
    batch = int(ids.shape[0])
    device = ids.device
    layers = sals_layers(cache)
    pos = _step_positions(given, cache, batch, device, option)
    past = _check_room(layers, batch)
    if not state.cuda_graph:
        # fresh row-major copies: the compiled step guards on strides, which callers' slices
        # vary (a [B, 1] column of a [B, S] tensor; even a [1, 1] one, that is "contiguous")
        slot = torch.full((1,), past, dtype=torch.long, device=device)
        ids, pos = (x.to(torch.long).clone(memory_format=torch.contiguous_format)
                    for x in (ids, pos))
        out = _run(state, cache, ids, pos, slot, keep)
        advance(layers, batch)
        return _result(out, cache_arg, cache, copy=False)
    graphs = cache.decode_graphs
    entry = graphs.get(batch)
    warm_up = entry is None
    if warm_up:  # the first decode step: no graph, on the static inputs a replay reads
        entry = graphs[batch] = _Graph(None, torch.zeros(batch, 1, dtype=torch.long,
                                                         device=device),
                                       torch.zeros(batch, 1, dtype=torch.long, device=device),
                                       torch.zeros(1, dtype=torch.long, device=device),
                                       logits_to_keep=keep)
    elif not (isinstance(keep, int) and keep == entry.logits_to_keep):
        raise InvalidArgumentError(
            f"logits_to_keep: {keep!r} differs from the value this cache's decode graph was "
            f"captured with ({entry.logits_to_keep!r})")
    entry.input_ids.copy_(ids)
    entry.position_ids.copy_(pos)
    entry.slot.fill_(past)
    if warm_up:
        out = _run(state, cache, entry.input_ids, entry.position_ids, entry.slot, keep)
        advance(layers, batch)
        return _result(out, cache_arg, cache, copy=False)
    if entry.graph is None:
        _capture(entry, state, cache, keep)
    else:
        reserve(layers, batch)
        entry.graph.replay()
    advance(layers, batch)
    return _result(entry.output, cache_arg, cache, copy=True)


def _check_room(layers: list[SalsLayer], batch: int) -> int:
    """The logical length of rows 0..batch-1 before the step, after checking that they hold one
    (every layer advances alike, so the first layer speaks for all) and that one more token
    fits: the step's forward checks nothing itself, and an ExactLayer's write past max_tokens
    would fail on the device."""
    first = layers[0]
    past = first.past(batch)
    if past + 1 > first.max_tokens:
        raise CapacityError(
            f"input_ids: one more token would pass max_tokens {first.max_tokens} of the "
            f"SalsCache ({past} token slots used); create the cache larger: "
            f"sals.hf.patch(..., max_tokens=N) or SalsCache(model, max_batch, max_tokens)")
    return past


def advance(layers: list[SalsLayer], batch: int) -> None:
    """After a step of rows 0..batch-1 (replayed or not): one more slot in each layer's
    ``row_slots``."""
    for layer in layers:
        layer.advance(batch, 1)


def _run(state, cache: SalsCache, input_ids, position_ids, slot, logits_to_keep):
    """The step's forward, with the patched attentions serving ``cache``. A forward that
    torch.compile cannot compile (a graph break, no compiler, the recompilation limit) is
    refused naming the cause; compilation happens before anything runs, so the cache is left as
    it was."""
    import torch._dynamo.exc as dynamo_exc

    state.step = Step(cache, slot)
    try:
        return state.step_forward(input_ids, position_ids, logits_to_keep)
    except (dynamo_exc.Unsupported, dynamo_exc.BackendCompilerFailed,
            dynamo_exc.FailOnRecompileLimitHit) as e:
        raise UnsupportedError(
            f"compile: torch.compile cannot compile the decode step of "
            f"{state.info.architecture} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0]}); patch without compile=True") from e
    finally:
        state.step = None


def _capture(entry: _Graph, state, cache: SalsCache, logits_to_keep) -> None:
    graph = torch.cuda.CUDAGraph()
    # the capture runs the forward's Python once (reserving this step's slots in the library);
    # nothing executes on the GPU until the replay below
    with torch.cuda.graph(graph):
        entry.output = _run(state, cache, entry.input_ids, entry.position_ids, entry.slot,
                            logits_to_keep)
    entry.graph = graph
    entry.graph.replay()


def _result(output, cache_arg: str, cache: SalsCache, copy: bool):
    """The step's output, holding the cache as a forward's would (the step's forward ran without
    it); a captured one with its logits copied, as the next replay overwrites them."""
    fields = {**dict(output.items()), cache_arg: cache}
    if copy:
        fields["logits"] = output.logits.clone()
    return type(output)(**fields)
