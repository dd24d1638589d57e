"""CUDA-graph decode for a patched model (``sals.hf.patch(model, ..., cuda_graph=True)``).

A decode step (one new token per sequence into a non-empty SalsCache on CUDA) is captured once
per cache and batch size as one CUDA graph of the whole model forward: every layer's
projections, the SALS operators (``torch.ops.sals``), norms, MLPs and the LM head. Later steps
copy the step's token ids and positions into the graph's static inputs and replay it: no Python
per layer, no host synchronisation, no allocation.

What the graph bakes in, and how the host keeps it right (FlashInfer's plan/run split):
  - sizes and device pointers: the graph belongs to one SalsCache and one batch size;
  - per-step lengths live on the device (the kernels read them); the host only reserves each
    replayed token's slot (``LayerCache.reserve``) and advances ``SalsLayer.row_slots``;
  - positions come in through the static ``position_ids``; a decode token that the 2D
    ``attention_mask`` marks as padding is passed at position -1 (not stored, zero output), so
    the model's 4D mask is not needed and is not built;
  - ``check_finite``: the device-side flags of earlier replays are read (without waiting) before
    each replay, so NaN/inf input still raises ``NotFiniteError``.

The first decode step of a cache runs eagerly (it also warms up cuBLAS and lazy module loading),
the second is captured and replayed, the rest replay.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import CapacityError, InvalidArgumentError, UnsupportedError
from . import _arch
from .cache import SalsCache, SalsLayer

#: forward arguments a captured step accepts; their values are checked in _check_kwargs
_ACCEPTED = frozenset({"input_ids", "attention_mask", "position_ids", "use_cache",
                       "logits_to_keep", "return_dict", "output_attentions",
                       "output_hidden_states"})


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    input_ids: torch.Tensor      # [B, 1] int64, static
    position_ids: torch.Tensor   # [B, 1] int64, static; -1 marks padding
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


def _check_kwargs(given: dict, cache: SalsCache, config) -> None:
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
            f"cuda_graph: a captured decode step takes input_ids, attention_mask, position_ids "
            f"and logits_to_keep only; got {sorted(set(other))} (patch without cuda_graph=True "
            f"for these)")


def _sals_layers(cache: SalsCache) -> list[SalsLayer]:
    return [layer for layer in cache.layers if isinstance(layer, SalsLayer)]


def _step_positions(given: dict, cache: SalsCache, batch: int, device) -> torch.Tensor:
    """[B, 1] int64 positions of the step's tokens, -1 where the 2D mask marks padding."""
    pos = given.get("position_ids")
    if pos is None:  # what the model does without position_ids: offset by the cache length
        pos = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long, device=device)
    pos = pos.to(device=device, dtype=torch.long).expand(batch, 1)
    mask = given.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise UnsupportedError(
                "cuda_graph: attention_mask must be the 2D [batch, keys] padding mask")
        pos = pos.masked_fill(mask[:, -1:].to(device) == 0, -1)
    return pos


def decode_step(original, state, cache: SalsCache, given: dict):
    """Run one decode step of the patched model through its CUDA graph (capturing it on the
    cache's second decode step). Returns the model output."""
    cache_arg = state.info.cache_arg
    given = {**given, **given.get("kwargs", {})}  # the forward's **kwargs, flattened
    given.pop("kwargs", None)
    _check_kwargs(given, cache, state.info.config)
    keep = given.get("logits_to_keep")
    keep = 0 if keep is None else keep
    ids = given["input_ids"]
    batch = int(ids.shape[0])
    device = ids.device
    layers = _sals_layers(cache)
    pos = _step_positions(given, cache, batch, device)
    graphs = cache.decode_graphs
    entry = graphs.get(batch)
    if entry is None:  # the first decode step: eager, with the same inputs a replay gets
        graphs[batch] = _Graph(None, torch.zeros_like(ids, dtype=torch.long),
                               torch.zeros_like(pos), logits_to_keep=keep)
        return original(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=True,
                        logits_to_keep=keep, **{cache_arg: cache})
    if not (isinstance(keep, int) and keep == entry.logits_to_keep):
        raise InvalidArgumentError(
            f"logits_to_keep: {keep!r} differs from the value this cache's decode graph was "
            f"captured with ({entry.logits_to_keep!r})")
    entry.input_ids.copy_(ids)
    entry.position_ids.copy_(pos)
    if entry.graph is None:
        _capture(entry, original, cache, cache_arg, keep)
    else:
        _reserve(layers, batch)
        entry.graph.replay()
    return _result(entry.output)


def _reserve(layers: list[SalsLayer], batch: int) -> None:
    """What the library's host code would have done for a replayed step: report deferred
    finite checks, reserve one slot per sequence, advance the logical length. Every SALS layer
    has appended the same slots, so one capacity check covers them all."""
    for layer in layers:
        if layer.layer_cache.config.check_finite:
            layer.layer_cache.check(wait=False)
    first = layers[0]
    if first.slots + 1 > first.layer_cache.config.max_tokens:
        raise CapacityError(
            f"input_ids: one more token would pass max_tokens {first.layer_cache.config.max_tokens}"
            f" of the SalsCache ({first.slots} token slots used); create the cache larger: "
            f"sals.hf.patch(..., max_tokens=N) or SalsCache(model, max_batch, max_tokens)")
    for layer in layers:
        layer.layer_cache.reserve(batch, 1)
        layer.advance(batch, 1)


def _capture(entry: _Graph, original, cache: SalsCache, cache_arg: str, logits_to_keep) -> None:
    graph = torch.cuda.CUDAGraph()
    # the capture runs the forward's Python once (reserving this step's slots in the library
    # and advancing slots); nothing executes on the GPU until the replay below
    with torch.cuda.graph(graph):
        entry.output = original(input_ids=entry.input_ids, position_ids=entry.position_ids,
                                attention_mask=None, use_cache=True,
                                logits_to_keep=logits_to_keep, **{cache_arg: cache})
    entry.graph = graph
    entry.graph.replay()


def _result(output):
    """The captured output with its logits copied: the next replay overwrites the static ones."""
    return type(output)(**{**dict(output.items()), "logits": output.logits.clone()})
