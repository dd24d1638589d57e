"""SALS cache operations as PyTorch operators, for ``torch.compile`` and CUDA graphs.

Importing this module (it needs torch; ``import sals`` never imports it) registers, in the
``sals`` operator namespace::

    sals::cache_append(Tensor k, Tensor v, Tensor positions, Tensor(a!) order, Tensor cache,
                       SymInt first=0) -> ()
    sals::cache_attend(Tensor q, Tensor positions, Tensor(a!) order, Tensor cache,
                       SymInt first=0) -> Tensor

with CPU and CUDA kernels (``sals.LayerCache.append`` / ``attend`` on the caller's current
stream) and fake (meta) implementations, so that ``torch.compile`` traces through them without a
graph break and a captured CUDA graph replays them.

``cache`` is the handle of a ``sals.LayerCache`` (:func:`handle`): a one-element int64 tensor on
the CPU holding the cache's number. Not an int: ``torch.compile`` guards on the value of an int
argument and would compile again for every cache (with ``fullgraph=True``, the 9th fails at the
recompile limit), while of a tensor it guards only dtype, shape and device; on the CPU, the
number is read without a device synchronisation, also while a CUDA graph is captured.

``order`` is the cache's one-element order tensor (:func:`order_tensor`): the cache's state lives
inside the library, where the compiler cannot see it, so both operators declare that they mutate
``order``; that keeps every append before the attend that follows it, and keeps both from being
removed as dead code. Nothing reads or writes its value.

Shapes are those of ``LayerCache.append`` / ``attend``: ``k, v [B, T, n_head_kv, head_dim]``,
``q [B, T, n_head_q, head_dim]`` (pre-RoPE), ``positions [B, T] int32`` (< 0 marks padding);
``cache_attend`` returns ``[B, T, n_head_q, head_dim]`` in q's dtype. ``first``: the operators
act on sequences ``first..first+B-1`` of the cache (``LayerCache.append(..., first=)``). A
SymInt, not an int: ``torch.compile`` would guard on an int's value and compile again for each
row range; a SymInt becomes a graph input once it takes a second value. A captured CUDA graph
replays the range it was captured with.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

from .cache import LayerCache
from .errors import InvalidArgumentError

_caches: "weakref.WeakValueDictionary[int, LayerCache]" = weakref.WeakValueDictionary()
_handles: "weakref.WeakKeyDictionary[LayerCache, torch.Tensor]" = weakref.WeakKeyDictionary()
_next_handle = itertools.count(1)


def handle(cache: LayerCache) -> torch.Tensor:
    """The operator handle of ``cache`` (see the module docstring; the same tensor for the
    cache's life; the registry holds the cache weakly, so a handle outliving its cache is
    refused, its number never reused)."""
    if not isinstance(cache, LayerCache):
        raise InvalidArgumentError(f"cache: expected sals.LayerCache, got {type(cache).__name__}")
    h = _handles.get(cache)
    if h is None:
        n = next(_next_handle)
        h = torch.tensor([n], dtype=torch.int64)
        _handles[cache] = h
        _caches[n] = cache
    return h


def order_tensor(device) -> torch.Tensor:
    """A fresh order tensor for one cache on ``device`` (see the module docstring)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _tensors(**named) -> None:
    """Every argument a tensor: torch's dispatcher lets None through for a Tensor argument,
    which would otherwise fail inside an operator with an AttributeError."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def _cache(h: torch.Tensor) -> LayerCache:
    _tensors(cache=h)
    if h.dtype != torch.int64 or h.numel() != 1 or h.device.type != "cpu":
        raise InvalidArgumentError(
            f"cache: expected a handle of sals.torch_ops.handle (one int64 on the cpu), got "
            f"{h.dtype} {list(h.shape)} on {h.device}")
    n = int(h)
    cache = _caches.get(n)
    if cache is None:
        raise InvalidArgumentError(f"cache: handle {n} names no live sals.LayerCache")
    return cache


_lib = torch.library.Library("sals", "DEF")
_lib.define("cache_append(Tensor k, Tensor v, Tensor positions, Tensor(a!) order, Tensor cache, "
            "SymInt first=0) -> ()")
_lib.define("cache_attend(Tensor q, Tensor positions, Tensor(a!) order, Tensor cache, "
            "SymInt first=0) -> Tensor")


def _on_device(x: torch.Tensor):
    """Make x's CUDA device current: DLPack refuses a CUDA tensor of another device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _append(k, v, positions, order, cache, first=0):
    _tensors(k=k, v=v, positions=positions, cache=cache)
    with _on_device(k):
        _cache(cache).append(k, v, positions, first=first)


def _attend(q, positions, order, cache, first=0):
    _tensors(q=q, positions=positions, cache=cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with _on_device(q):
        return _cache(cache).attend(q, positions, out=out, first=first)


for _key in ("CPU", "CUDA"):
    _lib.impl("cache_append", _append, _key)
    _lib.impl("cache_attend", _attend, _key)


@torch.library.register_fake("sals::cache_append")
def _append_fake(k, v, positions, order, cache, first=0):
    _tensors(k=k, v=v, positions=positions, cache=cache)


@torch.library.register_fake("sals::cache_attend")
def _attend_fake(q, positions, order, cache, first=0):
    _tensors(q=q, positions=positions, cache=cache)
    return q.new_empty(q.shape)
