"""sals.hf.patch / unpatch: replace each attention module's forward with one that keeps the
model's KV cache in SALS form (see the README), so that ``model.generate`` and plain forward loops
work unchanged.

Per attention layer and forward call (hidden states of B sequences, T new tokens):
  - pre-RoPE q, k, v are computed from the module's own projections and norms;
  - positions come from ``position_ids``; a new token is padding when the model's 4D mask
    forbids it from attending to itself (left-padded batches), and is then passed at position -1
    (not stored, zero output);
  - on an empty cache (prefill) the model's own attention function runs on exact, rotated keys
    with the model's mask, then the chunk is appended to the SALS cache;
  - otherwise the chunk is appended and ``LayerCache.attend`` answers: a sparse SALS step for
    one token on a sparse layer, dense attention over rebuilt keys for a chunk or a dense layer
    (with ``dense_kv="exact"``, a dense layer's ``ExactLayer`` attends over exact keys instead).
Sliding-window layers (Gemma 3) run the original forward on an exact window cache.

A decode step run by ``sals.hf.graphs`` (``cuda_graph`` or ``compile``) takes a shorter path:
the step's host bookkeeping is done there, so the attention forward only stores and attends.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import (
    Config,
    InvalidArgumentError,
    Rope,
    UnsupportedError,
    _args,
    _layers,
    cuda_available,
    presets,
)
from . import _arch, graphs
from .cache import SalsCache, SalsLayer, _unsupported
from .state import STATE_ATTR, PatchState, patch_state

#: what a dense layer keeps (patch's dense_kv): the compressed cache, attended over keys rebuilt
#: for every token (the paper), or exact keys and values in the model's dtype
DENSE_KV = ("compressed", "exact")


def _exact_scale(info: _arch.LayerInfo, overrides: dict, model_dtype: torch.dtype) -> float:
    """The softmax scale of a dense layer keeping exact keys and values: the model's, or a
    ``scale`` override read and checked as every layer's ``sals.Config`` reads it (0 meaning
    ``1/sqrt(head_dim)``). Its other fields concern the SALS cache it does not keep, but are
    checked alike, so that a patch whose every layer is exact refuses what another refuses."""
    cfg = _layers.config(info, None, overrides, True, model_dtype, None)
    return cfg.scale or info.head_dim ** -0.5


def patch(model, calibration=None, preset: str | presets.Preset | None = "sals-25",
          dense_layers=None,
          max_tokens: int | None = None, cuda_graph: bool = False, dense_kv: str = "compressed",
          compile: bool = False, **config_overrides):
    """Make ``model`` keep its KV cache in SALS form. Returns ``model`` (patched in place).

    ``calibration``: a ``sals.Calibration`` or the path of one (``python -m sals calibrate``);
    it must have been made for this model (else ``sals.CalibrationError``). None means the
    identity projection at full rank, so only full-rank settings are accepted
    (``preset="dense-equivalent"`` or ``rank=Dk``).
    ``preset``: "sals-25", "sals-12.5", "dense-equivalent" (see ``sals.Config.preset``), None
    (``sals.Config`` defaults, with the calibration's per-layer rank) or "auto": per layer the
    rank, score rank and value bits that hold ``kv_fraction`` of dense fp16 K+V at
    ``kv_context`` tokens (default 4096), chosen from the calibration's eigenvalues by the rule
    in ``sals.hf.auto``; or the same as a ``sals.presets`` object (``presets.SALS_25``, ...,
    ``presets.Auto(kv_fraction, kv_context)``, which takes no ``kv_fraction=`` keyword).
    ``dense_layers``: layer indices attended densely over every token; default the paper's
    ``(0, 1, L-1)``.
    ``dense_kv``: what a dense layer keeps. "compressed" (the default, the paper's): the SALS
    cache of the other layers, every key rebuilt from the latent one at each step. "exact":
    exact keys and values in static tensors of the model's dtype (``sals.hf.ExactLayer``),
    attended with ``scaled_dot_product_attention``: no rebuild, and the unpatched model's
    attention in those layers, for ``2 * Dk`` model-dtype elements per token and layer
    (counted in ``SalsCache.memory()`` and in preset "auto"'s target).
    ``max_tokens``: token slots per sequence of the caches created automatically by a plain
    forward (``generate`` sizes its cache from the prompt and ``max_new_tokens``).
    ``cuda_graph``: run each decode step (one new token per sequence into a non-empty cache)
    of a CUDA model as one captured CUDA graph of the whole forward (``sals.hf.graphs``):
    ``generate`` and hand-written loops then pay no Python per layer. Models with
    sliding-window layers (Gemma 3) and CPU models are refused with UnsupportedError.
    ``compile``: run each decode step's forward through ``torch.compile`` (inductor, one graph
    with the ``torch.ops.sals`` operators inside, compiled at the first decode step and shared
    by every cache of the patch; on CUDA with ``cuda_graph``, captured in the step's graph), so
    norms, RoPE, activations and residual adds run as fused kernels. CPU or CUDA; models with
    sliding-window layers, and a torch without a working inductor, are refused with
    UnsupportedError.
    ``config_overrides``: any ``sals.Config`` field (``budget_frac``, ``value_bits``,
    ``dtype``, ``n_sink``, ...), applied to every layer (``scale`` to exact layers too).

    Patching a patched model replaces the previous patch (which stays if the new options are
    refused). Unsupported architectures raise
    ``sals.UnsupportedError`` naming the supported ones.
    """
    previous = getattr(model, STATE_ATTR, None)
    if previous is not None:
        # what the previous patch installed, put back if the new options are refused
        installed = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in previous.saved]
        unpatch(model)
    try:
        state = _patch_state(model, calibration, preset, dense_layers, max_tokens, cuda_graph,
                             dense_kv, compile, config_overrides)
    except BaseException:
        if previous is not None:
            for obj, name, value in installed:
                object.__setattr__(obj, name, value)
            object.__setattr__(model, STATE_ATTR, previous)
        raise
    for layer in state.info.layers:
        _replace(state, layer.module, "forward",
                 types.MethodType(_attention_forward(state, layer), layer.module))
    _replace(state, model, "forward", _model_forward(model, state))
    if hasattr(model, "_prepare_cache_for_generation"):
        _replace(state, model, "_prepare_cache_for_generation", _prepare_cache(model, state))
    object.__setattr__(model, STATE_ATTR, state)
    return model


def _patch_state(model, calibration, preset, dense_layers, max_tokens, cuda_graph, dense_kv,
                 compile, config_overrides: dict) -> PatchState:
    """patch's options checked and turned into each layer's settings; changes nothing."""
    info = _arch.describe(model)
    n_layers = len(info.layers)
    if dense_layers is None:
        dense_layers = sorted({0, 1, n_layers - 1} & set(range(n_layers)))
    if isinstance(dense_layers, (str, bytes)) or not isinstance(dense_layers, Iterable):
        raise InvalidArgumentError(
            f"dense_layers: expected layer indices (e.g. [0, 1]), got {dense_layers!r}")
    dense_layers = {_args.integer(i, "dense_layers") for i in dense_layers}
    bad = sorted(i for i in dense_layers if not 0 <= i < n_layers)
    if bad:
        raise InvalidArgumentError(f"dense_layers: {bad} outside 0..{n_layers - 1}")
    cuda_graph = _args.boolean(cuda_graph, "cuda_graph")
    if cuda_graph:
        graphs.check_model(info)
    dense_kv = _args.choice(dense_kv, "dense_kv", DENSE_KV)
    compile = _args.boolean(compile, "compile")
    if compile:
        graphs.check_compile(info)
    max_tokens = _args.optional_integer(max_tokens, "max_tokens", 1)
    config_overrides = dict(config_overrides)
    preset = presets.parse(preset, config_overrides)  # pops "auto"'s kv_fraction and kv_context
    for bad_key in ("max_batch", "n_head_q", "n_head_kv", "head_dim"):
        if bad_key in config_overrides:
            raise InvalidArgumentError(
                f"{bad_key}: set by the model or the cache, not a patch option")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise InvalidArgumentError(
            f"{unknown[0]}: not a patch option (sals.Config fields: {sorted(known)})")
    if any(layer.device.type == "cuda" for layer in info.layers) and not cuda_available():
        raise UnsupportedError(
            "model: is on CUDA, but this sals build has no usable CUDA backend "
            "(sals.cuda_available() is False)")
    calib = _layers.load_calibration(calibration, _arch.fingerprint(model, info))
    exact = {}
    if dense_kv == "exact":
        exact = {layer.index: _exact_scale(layer, config_overrides,
                                           layer.module.q_proj.weight.dtype)
                 for layer in info.layers if layer.index in dense_layers and not layer.sliding}
    per_layer = {}
    if isinstance(preset, presets.Auto):  # per-layer rank, score rank and value bits
        from . import auto

        per_layer = auto.layer_overrides(info, calib, preset, config_overrides, frozenset(exact))
        preset = None
    configs, ropes, projections, scales = {}, {}, {}, {}
    for layer in info.layers:
        if layer.sliding:
            continue
        i = layer.index
        ropes[i] = Rope(layer.inv_freq, attention_scaling=layer.attention_scaling)
        if i in exact:
            continue
        configs[i], projections[i], scales[i] = _layers.layer_config(
            layer, preset, {**config_overrides, **per_layer.get(i, {})}, i in dense_layers,
            layer.module.q_proj.weight.dtype, calib)
    state = PatchState(info, configs, ropes, projections, scales, max_tokens, calib, cuda_graph,
                       compile, exact)
    state.step_forward = graphs.step_forward(model.forward, compile)
    return state


def _replace(state: PatchState, obj, name: str, value) -> None:
    """Set an instance attribute, remembering what the instance itself held (usually nothing:
    the class attribute shows through again after unpatch)."""
    state.saved.append((obj, name, obj.__dict__.get(name)))
    object.__setattr__(obj, name, value)


def unpatch(model):
    """Restore the forwards ``patch`` replaced. Returns ``model``. Existing SalsCaches of the
    model can no longer be used with it."""
    state = patch_state(model)
    for obj, name, old in reversed(state.saved):
        if old is None:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, old)
    model.__dict__.pop(STATE_ATTR, None)
    return model


def is_patched(model) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def _padding(mask, past: int, batch: int, length: int) -> torch.Tensor | None:
    """[B, T] bool, True where a new token is padding: its own column of the model's mask
    forbids it (left-padded prompts). None when the mask has no padding to say."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedError(
            f"attention_mask: {type(mask).__name__} masks (flex attention) are not supported; "
            f"use attn_implementation 'sdpa' or 'eager'")
    if mask.shape[-1] != past + length:
        raise InvalidArgumentError(
            f"attention_mask: covers {mask.shape[-1]} keys, expected {past} cached + {length} new")
    t = torch.arange(length, device=mask.device)
    if mask.dim() == 4:
        own = mask[:, 0, t, past + t]
    elif mask.dim() == 2:  # flash attention passes the 2D padding mask itself
        own = mask[:, past:]
    else:
        raise InvalidArgumentError(f"attention_mask: expected 2 or 4 dims, got {mask.dim()}")
    if own.dtype != torch.bool:
        own = own > torch.finfo(own.dtype).min / 2 if own.is_floating_point() else own != 0
    return ~own.expand(batch, length)


def _positions(position_ids, padding, past: int, batch: int, length: int,
               device: torch.device) -> torch.Tensor:
    """[B, T] int32 positions for the sals cache, -1 at padding."""
    if position_ids is None:  # what the model itself does without position_ids
        position_ids = torch.arange(past, past + length, device=device)[None]
    pos = position_ids.to(device=device, dtype=torch.int32).expand(batch, length)
    if padding is not None:
        pos = pos.masked_fill(padding.to(device), -1)
    return pos.contiguous()


def _take_cache(kwargs: dict, cache_arg: str):
    """Pop the KV cache from an attention forward's keyword arguments, under the name this
    transformers uses or the deprecated one. A Cache under any other keyword would be updated
    by the model's own forward behind SALS's back: refused."""
    given = [kwargs.pop(name, None) for name in _arch.CACHE_ARGS]
    caches = [c for c in given if c is not None]
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise UnsupportedError(
                f"{name}: a {type(value).__name__} reached a SALS-patched attention under an "
                f"unknown keyword (this transformers passes its cache as {cache_arg!r}); "
                f"tested: transformers {_arch.TESTED_TRANSFORMERS}")
    if len(caches) > 1 and caches[0] is not caches[1]:
        raise InvalidArgumentError(
            f"{cache_arg}: two different caches given (as {' and '.join(_arch.CACHE_ARGS)})")
    return caches[0] if caches else None


def _check_cache(cache, state: PatchState) -> None:
    """A patched model keeps its KV only in a SalsCache of its own patch: anything else would
    run dense (or corrupt the other patch's cache) in silence."""
    if not isinstance(cache, SalsCache):
        raise InvalidArgumentError(
            f"{state.info.cache_arg}: a model patched by sals.hf keeps its KV cache in a "
            f"SalsCache, got {type(cache).__name__} (pass none, or sals.hf.SalsCache(model, ...))")
    if cache.patch_state is not state:
        raise InvalidArgumentError(
            f"{state.info.cache_arg}: this SalsCache was made for another patch of the model; "
            f"create a new one")


def _attention_forward(state: PatchState, info: _arch.LayerInfo):
    module = info.module
    original = module.forward
    apply_rope = _arch.modeling_function(module, "apply_rotary_pos_emb")
    eager = _arch.modeling_function(module, "eager_attention_forward")

    cache_arg = state.info.cache_arg

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        step = state.step
        if step is not None:
            # a decode step of sals.hf.graphs, compiled or captured: it checked the cache and
            # the rows, advances them and passes padding at position -1; only store and attend
            layer: SalsLayer = step.cache.layers[info.index]
            batch = hidden_states.shape[0]
            q, k, v = _arch.pre_rope(self, hidden_states)
            positions = _positions(kwargs["position_ids"], None, 0, batch, 1, q.device)
            layer.store(k, v, positions, step.slot)
            out = layer.attend(q, positions)
            return self.o_proj(out.reshape(batch, 1, -1)), None
        cache = _take_cache(kwargs, cache_arg)
        if cache is not None:
            _check_cache(cache, state)
        if cache is None or info.sliding:
            return original(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **{cache_arg: cache}, **kwargs)
        layer: SalsLayer = cache.layers[info.index]
        batch, length = hidden_states.shape[:2]
        q, k, v = _arch.pre_rope(self, hidden_states)
        past = layer.past(batch)
        padding = _padding(attention_mask, past, batch, length)
        positions = _positions(kwargs.get("position_ids"), padding, past, batch, length,
                               q.device)
        if past == 0:
            # prefill: the model's own attention on exact keys, then compress the chunk
            cos, sin = position_embeddings
            qr, kr = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager)
            out, _ = attend(self, qr, kr, v.transpose(1, 2), attention_mask, dropout=0.0,
                            scaling=self.scaling, **kwargs)
            layer.append(k, v, positions)
        else:
            layer.append(k, v, positions)
            out = layer.attend(q, positions)
        return self.o_proj(out.reshape(batch, length, -1).contiguous()), None

    return forward


def _model_forward(model, state: PatchState):
    """The model's forward, creating a SalsCache when the call would otherwise make a
    DynamicCache (``use_cache`` on and no cache given)."""
    original = model.forward
    signature = inspect.signature(original)
    cache_arg = _arch.cache_argument(original, f"{type(model).__name__}.forward")
    # names this transformers still maps to cache_arg (CACHE_ARGS lists the newest first):
    # past_key_values in 5.24 and 5.25, none in 5.17
    old_names = _arch.CACHE_ARGS[_arch.CACHE_ARGS.index(cache_arg) + 1:]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        given = bound.arguments
        extra = given.get("kwargs", {})  # **kwargs: where a deprecated cache name lands
        cache = given.get(cache_arg)
        if cache_arg not in given:  # transformers uses the old name's cache only then
            cache = next((extra[name] for name in old_names if extra.get(name) is not None), None)
        # before handing an old name to transformers: a decode step is compiled or captured
        # (or refused for what it cannot serve) whatever name its cache came under
        if (state.cuda_graph or state.compile) and graphs.is_decode_step(cache, given):
            _check_cache(cache, state)
            return graphs.decode_step(state, cache, given)
        if any(extra.get(name) is not None for name in _arch.CACHE_ARGS if name != cache_arg):
            return original(*args, **kwargs)  # transformers maps the old name itself
        use_cache = given.get("use_cache")
        if use_cache is None:
            use_cache = getattr(state.info.config, "use_cache", True)
        if cache is None and use_cache:
            x = given.get("input_ids")
            if x is None:
                x = given.get("inputs_embeds")
            if x is not None:
                batch, length = x.shape[:2]
                bound.arguments[cache_arg] = SalsCache(
                    model, batch, max(length, state.max_tokens or 0))
                return original(*bound.args, **bound.kwargs)
        return original(*args, **kwargs)

    return forward


def _prepare_cache(model, state: PatchState):
    """``generate``'s cache preparation, making a SalsCache sized for the call (batch x
    num_return_sequences sequences, prompt + max_new_tokens - 1 slots) when given none."""
    original = model._prepare_cache_for_generation
    cache_arg = state.info.cache_arg

    def prepare(generation_config, model_kwargs, *args):
        # transformers 5.x: (..., generation_mode, batch_size, max_cache_length)
        batch_size, max_cache_length = args[-2], args[-1]
        if model_kwargs.get(cache_arg) is None and generation_config.use_cache:
            if generation_config.num_beams > 1:
                _unsupported("beam search (num_beams > 1)")
            if generation_config.cache_implementation is not None:
                raise InvalidArgumentError(
                    f"cache_implementation: {generation_config.cache_implementation!r} "
                    f"conflicts with a SALS-patched model (it brings its own cache)")
            model_kwargs[cache_arg] = SalsCache(
                model, batch_size * generation_config.num_return_sequences,
                max(int(max_cache_length), state.max_tokens or 0))
        return original(generation_config, model_kwargs, *args)

    return prepare
