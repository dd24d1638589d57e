"""SalsCache: a transformers ``Cache`` whose attention layers hold one ``sals.LayerCache`` each
(latent keys, quantised values, exact sinks and recent window) and no dense keys or values.

Dense layers patched with ``dense_kv="exact"`` hold exact keys and values instead
(``ExactLayer``, static tensors in the model's dtype). Sliding-window layers (Gemma 3) keep
transformers' own exact window cache (``DynamicSlidingWindowLayer``): at most
``sliding_window - 1`` tokens, attended densely.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from .. import (
    CapacityError,
    InvalidArgumentError,
    LayerCache,
    Rope,
    UnsupportedError,
    _args,
    static_kv,
    torch_ops,
)
from . import _arch
from .state import patch_state

#: the name this transformers gives the KV cache in model forwards and outputs:
#: "past_key_values" in 5.17, "cache" in 5.24, which warns that the old name goes in 5.40.
#: Pass a cache as ``model(ids, **{CACHE_ARG: cache})``, read one as ``getattr(out, CACHE_ARG)``.
CACHE_ARG = _arch.cache_argument(GenerationMixin.prepare_inputs_for_generation,
                                 "GenerationMixin.prepare_inputs_for_generation")


def _unsupported(what: str):
    raise UnsupportedError(
        f"SalsCache: {what} is not supported (beam search, assisted decoding and cache "
        f"cropping need dense keys); use greedy or sampling generation")


class SalsLayer(CacheLayerMixin):
    """One full-attention layer of a SalsCache: a ``sals.LayerCache`` (``layer_cache``), or, for
    an :class:`ExactLayer`, exact keys and values. ``row_slots[r]`` counts the token slots
    appended to row (sequence) r, padding included: the logical length transformers sees (mask
    sizes, position offsets), while ``LayerCache.lengths()`` counts the tokens actually stored
    per sequence. A forward acts on rows ``first..first+B-1`` (``first`` is 0 except while
    ``sals.hf.prefill`` fills a group of rows), which must hold one logical length: ``slots``.

    ``key_scale``: the calibration's ``[Dk]`` scale of query-weighted projections, or None.
    The layer then stores ``s * k`` and attends with ``q / s`` (per KV head, and per query head
    from its KV head's scale): the logits are those of ``q`` and ``k``, the projection sees the
    keys it was made for. ``dtype``: the model's, in which the scales are kept."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_cache: LayerCache, index: int, device: torch.device,
                 key_scale=None, dtype: torch.dtype = torch.float32):
        cfg = layer_cache.config
        self._init_rows(index, device, cfg.max_batch, cfg.max_tokens)
        self.layer_cache = layer_cache
        # the torch.ops.sals operators' view of the cache (sals.torch_ops)
        self.handle = torch_ops.handle(layer_cache)
        self.order = torch_ops.order_tensor(device)
        self.k_scale = self.q_scale = None
        if key_scale is not None:
            # a copy: the calibration's arrays are read-only
            s = torch.tensor(key_scale, dtype=torch.float32).reshape(cfg.n_head_kv, cfg.head_dim)
            group = cfg.n_head_q // cfg.n_head_kv
            self.k_scale = s.to(device, dtype)
            self.q_scale = s.reciprocal().repeat_interleave(group, dim=0).to(device, dtype)

    def _init_rows(self, index: int, device: torch.device, max_batch: int,
                   max_tokens: int) -> None:
        """What every kind of layer keeps: its place and the rows' logical lengths."""
        CacheLayerMixin.__init__(self)
        self.index = index
        self.device = device
        self.max_tokens = max_tokens
        self.row_slots = np.zeros(max_batch, np.int64)
        self.first = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        self.update(key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        raise InvalidArgumentError(
            f"SalsCache layer {self.index}: holds no dense keys; its attention module is not "
            f"patched (call sals.hf.patch(model) before using a SalsCache)")

    def _check_device(self, x: torch.Tensor, name: str) -> None:
        if x.device != self.device:
            raise InvalidArgumentError(
                f"{name}: on {x.device}, but SalsCache layer {self.index} lives on {self.device} "
                f"(create the cache after moving the model)")

    @property
    def slots(self) -> int:
        """The logical length of the rows a forward acts on (those from ``first``)."""
        return int(self.row_slots[self.first])

    def past(self, batch: int) -> int:
        """The logical length of rows ``first..first+batch-1``, which a forward appends to:
        one length, or InvalidArgumentError (CapacityError past max_batch)."""
        if self.first + batch > self.row_slots.size:
            raise CapacityError(
                f"input_ids: batch {batch} from row {self.first} passes max_batch "
                f"{self.row_slots.size} of the SalsCache (SalsCache(model, max_batch, ...))")
        rows = self.row_slots[self.first:self.first + batch]
        if (rows != rows[0]).any():
            raise InvalidArgumentError(
                f"input_ids: rows {self.first}..{self.first + batch - 1} of the SalsCache hold "
                f"{sorted(set(rows.tolist()))} token slots; one forward serves rows of one "
                f"length (fill a batch by groups with sals.hf.prefill)")
        return int(rows[0])

    def advance(self, batch: int, tokens: int) -> None:
        """Count ``tokens`` more slots in rows ``first..first+batch-1``."""
        self.row_slots[self.first:self.first + batch] += tokens

    def _capacity_error(self, batch: int, tokens: int, cause: str) -> CapacityError:
        return CapacityError(
            f"{cause} (SalsCache layer {self.index}: {self.slots} of {self.max_tokens} token "
            f"slots used, {tokens} more asked, rows {self.first}..{self.first + batch - 1} of "
            f"{self.row_slots.size}; create the cache larger: sals.hf.patch(..., max_tokens=N) "
            f"or SalsCache(model, max_batch, max_tokens))")

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: [B, T, Hkv, d] pre-RoPE; positions: [B, T] int32, < 0 for padding; into rows
        ``first..first+B-1``."""
        self._check_device(k, "k")
        try:
            self.store(k, v, positions)
        except CapacityError as e:
            raise self._capacity_error(int(k.shape[0]), int(k.shape[1]), str(e)) from e
        self.advance(int(k.shape[0]), int(k.shape[1]))

    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              slot: torch.Tensor | None = None) -> None:
        """``append`` without the host's bookkeeping (``row_slots``), for the decode steps that
        ``sals.hf.graphs`` runs compiled or captured, which keep it themselves. ``slot``: the
        rows' logical length as a one-element int64 tensor on the layer's device (an
        ExactLayer writes there; this layer's library keeps its own lengths)."""
        if self.k_scale is not None:
            k = k * self.k_scale.to(k.dtype)
        # DLPack refuses tensors that require grad (a plain forward outside no_grad)
        torch.ops.sals.cache_append(k.detach(), v.detach(), positions, self.order, self.handle,
                                    self.first)

    def attend(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q: [B, T, Hq, d] pre-RoPE of rows ``first..first+B-1`` -> [B, T, Hq, d] in q's
        dtype."""
        self._check_device(q, "q")
        if self.q_scale is not None:
            q = q * self.q_scale.to(q.dtype)
        return torch.ops.sals.cache_attend(q.detach(), positions, self.order, self.handle,
                                           self.first)

    def reserve_step(self, batch: int) -> None:
        """Account for a replayed decode step of rows ``0..batch-1`` (``sals.hf.graphs``): its
        appends ran on the device only. Reports the deferred finite checks of earlier steps
        without waiting, then reserves each row's slot in the library."""
        if self.layer_cache.config.check_finite:
            self.layer_cache.check(wait=False)
        self.layer_cache.reserve(batch, 1)

    def check(self) -> None:
        """Raise NotFiniteError for a deferred finite check (see SalsCache.check)."""
        with _device_guard(self.device):
            self.layer_cache.check(wait=True)

    def close(self) -> None:
        self.layer_cache.close()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        return self.slots

    def get_max_length(self) -> int:
        return self.max_tokens

    def _rows(self, first: int, batch: int | None) -> slice:
        """Rows ``first..first+batch-1`` (``batch`` None: to the last), checked as the library
        checks a range: InvalidArgumentError below 0, CapacityError past max_batch."""
        first = _args.integer(first, "first", -(2**63), 2**63 - 1)
        max_batch = self.row_slots.size
        batch = max(max_batch - first, 0) if batch is None else \
            _args.integer(batch, "batch", -(2**63), 2**63 - 1)
        for name, value in (("first", first), ("batch", batch)):
            if value < 0:
                raise InvalidArgumentError(f"{name}: {value} must be >= 0")
        if first + batch > max_batch:
            raise CapacityError(f"first: {first} + batch {batch} > max_batch {max_batch}")
        return slice(first, first + batch)

    def reset(self, first: int = 0, batch: int | None = None) -> None:
        """Empty rows ``first..first+batch-1`` (by default all of them); memory stays allocated.
        A bad range raises (naming ``first`` or ``batch``) and resets nothing."""
        rows = self._rows(first, batch)
        self.layer_cache.reset(first=rows.start, batch=rows.stop - rows.start)
        self.row_slots[rows] = 0

    def offload(self):
        _unsupported("offloading")

    def prefetch(self):
        _unsupported("offloading")

    def reorder_cache(self, beam_idx) -> None:
        _unsupported("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        _unsupported("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        _unsupported("batch_select_indices")

    def memory(self) -> dict:
        return self.layer_cache.memory()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, slots={self.slots})"


class ExactLayer(SalsLayer):
    """A dense layer of a SalsCache patched with ``dense_kv="exact"``: exact post-RoPE keys and
    values in static tensors of the model's dtype (``kv``, a ``sals.static_kv.StaticKV``,
    ``[max_batch, n_head_kv, max_tokens, head_dim]`` each) and which slots hold a token
    (``filled``, ``[max_batch, max_tokens]`` bool; padding holds a slot but no token), attended
    with ``scaled_dot_product_attention``: what the unpatched model computes, with no key
    rebuilt. No ``layer_cache``. Slot s of a row is its s-th token slot, as ``row_slots``
    counts them.

    ``rope``: the layer's rotary embedding (rotate-half over the whole head), applied to the
    pre-RoPE keys and queries given, as the model's rotary module does; ``scale``: the softmax
    scale; ``dtype``: the model's.

    A decode step (one token per row) attends over all ``max_tokens`` slots under the mask of
    those filled: fixed shapes and no host value, what a CUDA graph and ``torch.compile`` need;
    a chunk (T > 1) over the slots filled so far, causally. On CUDA the step runs cuDNN
    attention where cuDNN takes its inputs (``attention_backend`` says which, as
    ``DenseGraphDecoder`` does)."""

    layer_cache = None

    def __init__(self, index: int, rope: Rope, n_head_q: int, n_head_kv: int, head_dim: int,
                 scale: float, max_batch: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device):
        if rope.interleaved or rope.rotary_dim != head_dim:
            raise InvalidArgumentError(
                f"rope: an ExactLayer applies rotate-half RoPE over the whole head "
                f"({head_dim}), got rotary_dim {rope.rotary_dim}, interleaved {rope.interleaved}")
        self._init_rows(index, device, max_batch, max_tokens)
        self.n_head_q, self.n_head_kv, self.head_dim = n_head_q, n_head_kv, head_dim
        self.scale = float(scale)
        self.inv_freq = torch.from_numpy(rope.inv_freq.copy()).to(device)
        self.attention_scaling = float(rope.attention_scaling)
        self.kv = static_kv.StaticKV(max_batch, n_head_kv, max_tokens, head_dim, dtype, device)
        self.filled = torch.zeros(max_batch, max_tokens, dtype=torch.bool, device=device)
        self.attention_backend = "default"
        if device.type == "cuda":
            with _device_guard(device):  # decode shapes at the largest batch
                q = torch.zeros(max_batch, n_head_q, 1, head_dim, dtype=dtype, device=device)
                self.attention_backend = static_kv.choose_backend(
                    q, self.kv.keys, self.kv.values, self.filled[:, None, None, :], self.scale)

    def _check_open(self, method: str) -> None:
        if self.kv is None:
            raise InvalidArgumentError(f"cache: is closed ({method}() after close())")

    def _rotated(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, d] pre-RoPE -> [B, H, T, d] rotated at ``positions`` [B, T]."""
        cos, sin = static_kv.rope_cos_sin(positions, self.inv_freq, self.attention_scaling,
                                          x.dtype)
        return static_kv.rotate(x, cos[:, :, None], sin[:, :, None]).transpose(1, 2)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self._check_open("append")
        self._check_device(k, "k")
        batch, tokens = int(k.shape[0]), int(k.shape[1])
        past = self.past(batch)
        if past + tokens > self.max_tokens:
            raise self._capacity_error(batch, tokens, "k: the chunk passes max_tokens")
        self.store(k, v, positions, torch.full((1,), past, dtype=torch.long, device=self.device))
        self.advance(batch, tokens)

    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              slot: torch.Tensor) -> None:
        """Rotate the keys at ``positions`` and write keys and values to slots
        ``slot..slot+T-1`` of rows ``first..first+B-1``, marking those whose position is not
        padding as filled. Device work only, for graphs and compiled steps: nothing checked."""
        rows = slice(self.first, self.first + k.shape[0])
        slots = slot + torch.arange(k.shape[1], device=slot.device)
        # detached: the cache keeps values, not an autograd graph growing with every step
        self.kv.write(rows, slots, self._rotated(k.detach(), positions), v.detach().transpose(1, 2))
        self.filled[rows].index_copy_(1, slots, positions >= 0)

    def attend(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check_open("attend")
        self._check_device(q, "q")
        batch, tokens = q.shape[:2]
        rows = slice(self.first, self.first + batch)
        qr = self._rotated(q.detach(), positions)
        if tokens == 1:  # the whole cache, whose size a compiled step reads from its shapes
            mask = self.filled[rows, None, None, :]
            with static_kv.backend(self.attention_backend):
                out = self.kv.attend(rows, qr, mask, self.scale)
        else:
            window = self.slots  # the rows' logical length, this chunk included
            slot = torch.arange(window, device=q.device)
            causal = slot <= slot[window - tokens:, None]  # [T, window]
            mask = self.filled[rows, None, None, :window] & causal
            out = self.kv.attend(rows, qr, mask, self.scale, window)
        # a padding query attends to nothing it owns: its row is zero, as a SALS layer's
        return out.transpose(1, 2).masked_fill((positions < 0)[:, :, None, None], 0)

    def reserve_step(self, batch: int) -> None:
        pass  # nothing outside the device tensors, which the replay itself writes

    def check(self) -> None:
        pass  # no deferred finite checks: exact attention, as the unpatched model's

    def close(self) -> None:
        self.kv = self.filled = None

    def reset(self, first: int = 0, batch: int | None = None) -> None:
        self._check_open("reset")
        rows = self._rows(first, batch)
        self.filled[rows] = False  # the stale keys and values are masked out
        self.row_slots[rows] = 0

    def memory(self) -> dict:
        """``exact_kv``: bytes of the slots used (padding's included), also in ``total``;
        ``dense_fp16``: dense fp16 K and V of the tokens held; ``allocated``: the static
        tensors, all of it torch memory (``exact_kv_allocated``), unlike a LayerCache's."""
        self._check_open("memory")
        per_slot = 2 * self.n_head_kv * self.head_dim * self.kv.keys.element_size()
        held = int(self.row_slots.sum()) * per_slot
        allocated = self.kv.nbytes + self.filled.nbytes
        tokens = int(self.filled.sum())
        return {"exact_kv": held, "total": held, "dense_fp16": 4 * self.n_head_kv *
                self.head_dim * tokens, "allocated": allocated, "exact_kv_allocated": allocated}


class _device_guard:
    """Make the layer's CUDA device current for the call (DLPack export of a CUDA tensor that
    is not on the current device fails); nothing on the CPU."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class SalsCache(Cache):
    """The KV cache of a model patched by :func:`sals.hf.patch`.

    ``model``: the patched model; ``max_batch``: sequences (rows of input_ids); ``max_tokens``:
    token slots per sequence (prompt, padding and generated tokens; default: the ``max_tokens``
    given to ``patch``). Every layer's memory is allocated here, on that layer's device: a
    SalsLayer per full-attention layer (an ExactLayer for a dense layer patched with
    ``dense_kv="exact"``), transformers' window cache per sliding-window layer.

    ``generate`` and a plain ``model(...)`` create one automatically when given none; pass one
    explicitly (``model(ids, **{sals.hf.CACHE_ARG: cache})``) to keep it across calls, e.g.
    chunked prefill or a hand-written decode loop.
    """

    def __init__(self, model, max_batch: int = 1, max_tokens: int | None = None):
        state = patch_state(model)
        if max_tokens is None:
            max_tokens = state.max_tokens
        if max_tokens is None:
            raise InvalidArgumentError(
                "max_tokens: give SalsCache(model, max_batch, max_tokens) or "
                "sals.hf.patch(..., max_tokens=N)")
        if int(max_batch) < 1 or int(max_tokens) < 1:
            raise InvalidArgumentError(
                f"max_batch, max_tokens: expected >= 1, got {max_batch}, {max_tokens}")
        layers = []
        for info in state.info.layers:
            if info.sliding:
                layers.append(DynamicSlidingWindowLayer(sliding_window=info.sliding_window))
                continue
            dtype = info.module.q_proj.weight.dtype
            if info.index in state.exact:
                layers.append(ExactLayer(info.index, state.ropes[info.index], info.n_head_q,
                                         info.n_head_kv, info.head_dim, state.exact[info.index],
                                         int(max_batch), int(max_tokens), dtype, info.device))
                continue
            cfg = dataclasses.replace(state.configs[info.index], max_batch=int(max_batch),
                                      max_tokens=int(max_tokens))
            with _device_guard(info.device):
                lc = LayerCache(cfg, state.ropes[info.index], state.projections[info.index],
                                device=str(info.device))
            layers.append(SalsLayer(lc, info.index, info.device, state.key_scales[info.index],
                                    dtype))
        super().__init__(layers=layers)
        self.patch_state = state
        self.decode_graphs: dict = {}  # batch size -> captured decode step (sals.hf.graphs)
        self.max_batch = int(max_batch)
        self.max_tokens = int(max_tokens)
        self.filling = False  # sals.hf.prefill is filling a group of rows (no decode steps)

    @property
    def first(self) -> int:
        """The first row (sequence) that forwards through this cache act on: 0, except while
        ``sals.hf.prefill`` fills a group of rows."""
        return next((layer.first for layer in self.layers if isinstance(layer, SalsLayer)), 0)

    def _set_first(self, first: int) -> None:
        """Make forwards act on rows ``first..``, for ``sals.hf.prefill``: row ranges are
        consistent only through it, which also gives sliding-window layers (whose windows hold
        the whole batch) one window per group."""
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                layer.first = first

    def memory(self) -> dict:
        """Bytes held now, summed over layers: the ``sals_memory_t`` fields of the SALS layers
        (``total``, ``dense_fp16``, ``allocated``, ...); ``exact_kv`` and
        ``exact_kv_allocated``, the exact keys and values of ExactLayers (in ``total`` and
        ``allocated``; allocated through torch, unlike the library's); plus ``window`` (exact keys
        and values of sliding-window layers, in the model's dtype) added to ``total``."""
        out: dict = {}
        window = 0
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                for key, val in layer.memory().items():
                    out[key] = out.get(key, 0) + int(val)
            elif layer.is_initialized and layer.keys is not None:
                window += layer.keys.nbytes + layer.values.nbytes
        out["window"] = window
        out["total"] = out.get("total", 0) + window
        return out

    def check(self) -> None:
        """Raise NotFiniteError if a deferred finite check (CUDA) of any layer found NaN or
        infinity in an earlier step's input; waits for the current stream. A no-op on the CPU,
        whose checks raise at once."""
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                layer.check()

    def reset(self, first: int = 0, batch: int | None = None) -> None:
        """Empty sequences ``first..first+batch-1`` of every layer (by default all of them);
        memory stays allocated, and the other sequences are kept: a serving engine frees a
        finished sequence's row this way and fills it again with ``sals.hf.prefill``-like
        forwards. Sliding-window layers hold one window for the whole batch: with them only all
        sequences can be reset. A bad range raises, naming ``first`` or ``batch``, and resets
        nothing."""
        layers = [layer for layer in self.layers if isinstance(layer, SalsLayer)]
        rows = layers[0]._rows(first, batch) if layers else slice(0, self.max_batch)
        whole = rows.start == 0 and rows.stop == self.max_batch
        if not whole and len(layers) < len(self.layers):
            raise UnsupportedError(
                f"first, batch: rows {rows.start}..{rows.stop - 1} of {self.max_batch}; a "
                f"SalsCache with sliding-window layers resets all its sequences at once")
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                layer.reset(rows.start, rows.stop - rows.start)
            else:
                layer.reset()

    def close(self) -> None:
        """Free every layer's memory now; the cache cannot be used afterwards."""
        self.decode_graphs.clear()  # their kernels point into the memory freed below
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                layer.close()

    def crop(self, tokens_to_remove: int) -> None:
        _unsupported("crop")

    def __repr__(self) -> str:
        n = sum(isinstance(layer, SalsLayer) for layer in self.layers)
        return (f"SalsCache(layers={len(self.layers)}, sals_layers={n}, "
                f"max_batch={self.max_batch}, max_tokens={self.max_tokens}, "
                f"seq_length={self.get_seq_length()})")
