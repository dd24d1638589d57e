"""SalsCache: a transformers ``Cache`` whose attention layers hold one ``sals.LayerCache`` each
(latent keys, quantised values, exact sinks and recent window) and no dense keys or values.

Sliding-window layers (Gemma 3) keep transformers' own exact window cache
(``DynamicSlidingWindowLayer``): at most ``sliding_window - 1`` tokens, attended densely.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from .. import CapacityError, InvalidArgumentError, LayerCache, UnsupportedError, torch_ops
from . import _arch

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
    """One attention layer of a SalsCache. ``row_slots[r]`` counts the token slots appended to
    row (sequence) r, padding included: the logical length transformers sees (mask sizes,
    position offsets), while ``LayerCache.lengths()`` counts the tokens actually stored per
    sequence. A forward acts on rows ``first..first+B-1`` (``first`` is 0 except while
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
        super().__init__()
        self.layer_cache = layer_cache
        self.index = index
        self.device = device
        self.row_slots = np.zeros(layer_cache.config.max_batch, np.int64)
        self.first = 0
        self.is_initialized = True
        # the torch.ops.sals operators' view of the cache (sals.torch_ops)
        self.handle = torch_ops.handle(layer_cache)
        self.order = torch_ops.order_tensor(device)
        self.k_scale = self.q_scale = None
        if key_scale is not None:
            cfg = layer_cache.config
            # a copy: the calibration's arrays are read-only
            s = torch.tensor(key_scale, dtype=torch.float32).reshape(cfg.n_head_kv, cfg.head_dim)
            group = cfg.n_head_q // cfg.n_head_kv
            self.k_scale = s.to(device, dtype)
            self.q_scale = s.reciprocal().repeat_interleave(group, dim=0).to(device, dtype)

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

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: [B, T, Hkv, d] pre-RoPE; positions: [B, T] int32, < 0 for padding; into rows
        ``first..first+B-1``."""
        self._check_device(k, "k")
        if self.k_scale is not None:
            k = k * self.k_scale.to(k.dtype)
        batch = int(k.shape[0])
        try:
            # DLPack refuses tensors that require grad (a plain forward outside no_grad)
            torch.ops.sals.cache_append(k.detach(), v.detach(), positions, self.order,
                                        self.handle, self.first)
        except CapacityError as e:
            cfg = self.layer_cache.config
            raise CapacityError(
                f"{e} (SalsCache layer {self.index}: {self.slots} of {cfg.max_tokens} token slots "
                f"used, rows {self.first}..{self.first + batch - 1} of {cfg.max_batch}; create "
                f"the cache larger: sals.hf.patch(..., max_tokens=N) or SalsCache(model, "
                f"max_batch, max_tokens))") from e
        self.advance(batch, int(k.shape[1]))

    def attend(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q: [B, T, Hq, d] pre-RoPE of rows ``first..first+B-1`` -> [B, T, Hq, d] in q's
        dtype."""
        self._check_device(q, "q")
        if self.q_scale is not None:
            q = q * self.q_scale.to(q.dtype)
        return torch.ops.sals.cache_attend(q.detach(), positions, self.order, self.handle,
                                           self.first)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        return self.slots

    def get_max_length(self) -> int:
        return self.layer_cache.config.max_tokens

    def reset(self) -> None:
        self.layer_cache.reset()
        self.row_slots[:] = 0

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
        return f"SalsLayer(index={self.index}, slots={self.slots})"


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
    given to ``patch``). Every layer's memory is allocated here, on that layer's device.

    ``generate`` and a plain ``model(...)`` create one automatically when given none; pass one
    explicitly (``model(ids, **{sals.hf.CACHE_ARG: cache})``) to keep it across calls, e.g.
    chunked prefill or a hand-written decode loop.
    """

    def __init__(self, model, max_batch: int = 1, max_tokens: int | None = None):
        from .patch import patch_state  # patch imports this module

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
            cfg = dataclasses.replace(state.configs[info.index], max_batch=int(max_batch),
                                      max_tokens=int(max_tokens))
            with _device_guard(info.device):
                lc = LayerCache(cfg, state.ropes[info.index], state.projections[info.index],
                                device=str(info.device))
            layers.append(SalsLayer(lc, info.index, info.device, state.key_scales[info.index],
                                    info.module.q_proj.weight.dtype))
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
        (``total``, ``dense_fp16``, ...), plus ``window`` (exact keys and values of sliding-window
        layers, in the model's dtype) added to ``total``."""
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
                with _device_guard(layer.device):
                    layer.layer_cache.check(wait=True)

    def close(self) -> None:
        """Free every layer's memory now; the cache cannot be used afterwards."""
        self.decode_graphs.clear()  # their kernels point into the memory freed below
        for layer in self.layers:
            if isinstance(layer, SalsLayer):
                layer.layer_cache.close()

    def crop(self, tokens_to_remove: int) -> None:
        _unsupported("crop")

    def __repr__(self) -> str:
        n = sum(isinstance(layer, SalsLayer) for layer in self.layers)
        return (f"SalsCache(layers={len(self.layers)}, sals_layers={n}, "
                f"max_batch={self.max_batch}, max_tokens={self.max_tokens}, "
                f"seq_length={self.get_seq_length()})")
