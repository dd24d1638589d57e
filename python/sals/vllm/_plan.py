"""What the SALS backend does with one vLLM model: its settings (``additional_config["sals"]``),
the checks that refuse what it cannot serve, and each layer's Config, projection and key scale.

Every process that builds attention layers (the worker) and the process that parses the
configuration (the front end) derives the same plan from the VllmConfig; the front end does it
first, so that a wrong setting, model or calibration fails before an engine starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import numpy as np
import torch

from .. import CalibrationError, Config, InvalidArgumentError, PagedLayer, Rope, UnsupportedError
from .. import _args, _layers
from ..config import PRESETS

#: the key of vLLM's additional_config that holds SALS's settings
SETTINGS_KEY = "sals"

#: model_type -> the prefix of its transformers classes (the rotary embedding is read there)
SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

#: rotary types whose frequencies change with the sequence length: a key stored once cannot be
#: rebuilt at its position later with fixed frequencies
_DYNAMIC_ROPE = ("dynamic", "longrope")

#: Config fields the settings may set (the model decides the shapes and the softmax scale; vLLM
#: the batch and the token capacity)
_CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(Config)
                        if f.name not in ("n_head_q", "n_head_kv", "head_dim", "max_batch",
                                          "max_tokens", "n_threads", "scale"))
OPTIONS = ("calibration", "preset", "dense_layers", "window_capacity") + _CONFIG_OPTIONS


def settings_of(vllm_config) -> dict | None:
    """SALS's settings in a VllmConfig, None when SALS is not asked for."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if SETTINGS_KEY not in extra:
        return None
    settings = extra[SETTINGS_KEY]
    if not isinstance(settings, dict):
        raise InvalidArgumentError(
            f"additional_config.sals: expected an object of settings, got "
            f"{type(settings).__name__}")
    unknown = sorted(set(settings) - set(OPTIONS))
    if unknown:
        raise InvalidArgumentError(
            f"additional_config.sals.{unknown[0]}: not a SALS setting (settings: "
            f"{', '.join(OPTIONS)})")
    return settings


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One attention layer as sals._layers.layer_config reads it."""

    index: int
    n_head_q: int
    n_head_kv: int
    head_dim: int
    scaling: float

    @property
    def dk(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclasses.dataclass
class Plan:
    """The resolved settings of every layer of one model."""

    key: str                  # what the plan was made from (settings and model)
    model_type: str
    n_layers: int
    configs: list             # sals.Config per layer
    projections: list         # float32 [Dk, rank] per layer
    key_scales: list          # float32 [Dk] or None per layer
    rope: Rope
    slot_bytes: int
    window_capacity: int      # tokens per layer whose exact copies are kept (_windows)


def _key(vllm_config, settings: dict) -> str:
    model = vllm_config.model_config
    return json.dumps([settings, str(model.model), str(model.dtype)], sort_keys=True, default=str)


def _rope(hf_config, model_type: str) -> Rope:
    """The model's rotary embedding as transformers computes it (scalings folded into inv_freq),
    the frequencies sals.hf and the calibration use."""
    prefix = SUPPORTED[model_type]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    rotary = getattr(module, f"{prefix}RotaryEmbedding")(config=hf_config)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if any(kind in rope_type for kind in _DYNAMIC_ROPE):
        raise UnsupportedError(
            f"model: rope_type {rope_type!r} changes frequencies with the sequence length; SALS "
            f"rebuilds stored keys at fixed frequencies (default, linear, llama3, yarn)")
    return Rope(rotary.inv_freq.detach().float().cpu(),
                attention_scaling=float(rotary.attention_scaling))


def _model(vllm_config) -> tuple[str, object, dict]:
    """(model_type, hf text config, shape) of a model the backend serves; refuses the others."""
    model = vllm_config.model_config
    hf = model.hf_text_config
    model_type = getattr(hf, "model_type", None)
    archs = getattr(model.hf_config, "architectures", None) or ["?"]
    if model_type not in SUPPORTED:
        raise UnsupportedError(
            f"model: {archs[0]} (model_type {model_type!r}) is not supported by the SALS vLLM "
            f"backend; supported model types: {', '.join(SUPPORTED)} (Llama-like attention "
            f"with rotary embeddings)")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise UnsupportedError(
            f"parallel_config: tensor_parallel_size {parallel.tensor_parallel_size} and "
            f"pipeline_parallel_size {parallel.pipeline_parallel_size}; the SALS backend runs "
            f"unsharded models only (both 1)")
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window",
                                                            True) else None
    if window is not None or getattr(hf, "layer_types", None) and any(
            t != "full_attention" for t in hf.layer_types):
        raise UnsupportedError(
            f"model: {archs[0]} has sliding-window attention layers (sliding_window "
            f"{window}); SALS selects among all tokens of full-attention layers only")
    shape = dict(architecture=archs[0], model_type=model_type,
                 n_layers=int(hf.num_hidden_layers),
                 n_head_q=int(model.get_num_attention_heads(parallel)),
                 n_head_kv=int(model.get_num_kv_heads(parallel)),
                 head_dim=int(model.get_head_size()), hidden_size=int(hf.hidden_size),
                 vocab_size=int(hf.vocab_size))
    return model_type, hf, shape


def make_plan(vllm_config) -> Plan:
    """Every layer's settings for ``vllm_config`` (settings_of must not be None). Raises
    InvalidArgumentError naming a wrong setting, UnsupportedError for a model or configuration
    the backend cannot serve, CalibrationError for a calibration that does not fit the model."""
    settings = settings_of(vllm_config)
    model_type, hf, shape = _model(vllm_config)
    cache = vllm_config.cache_config
    if cache.cache_dtype != "auto":
        raise UnsupportedError(
            f"cache_config.cache_dtype: {cache.cache_dtype!r}; the SALS backend stores its own "
            f"compressed form (set value_bits / key_bits / dtype in additional_config.sals), "
            f"use kv_cache_dtype 'auto'")
    preset = settings.get("preset", "sals-25")
    if preset is not None and preset not in PRESETS:
        raise InvalidArgumentError(
            f"additional_config.sals.preset: {preset!r} is not one of {(*PRESETS, None)}")
    n_layers = shape["n_layers"]
    dense = settings.get("dense_layers")
    if dense is None:
        dense = sorted({0, 1, n_layers - 1} & set(range(n_layers)))
    if isinstance(dense, (str, bytes)) or not isinstance(dense, (list, tuple)):
        raise InvalidArgumentError(
            f"additional_config.sals.dense_layers: expected a list of layer indices, got "
            f"{dense!r}")
    dense = {_args.integer(i, "additional_config.sals.dense_layers") for i in dense}
    bad = sorted(i for i in dense if not 0 <= i < n_layers)
    if bad:
        raise InvalidArgumentError(
            f"additional_config.sals.dense_layers: {bad} outside 0..{n_layers - 1}")
    calibration = settings.get("calibration")
    if calibration is not None and not isinstance(calibration, str):
        raise InvalidArgumentError(
            f"additional_config.sals.calibration: expected the path of a .salscal file, got "
            f"{type(calibration).__name__}")
    # The weights digest of sals.hf's fingerprint reads transformers' separate k_proj, which
    # vLLM fuses: the plugin checks everything else the fingerprint names.
    expected = {k: v for k, v in shape.items()}
    try:
        calib = _layers.load_calibration(calibration, expected)
    except FileNotFoundError:
        raise InvalidArgumentError(
            f"additional_config.sals.calibration: {calibration!r}: no such file") from None
    overrides = {k: v for k, v in settings.items() if k in _CONFIG_OPTIONS}
    scaling = shape["head_dim"] ** -0.5  # Llama-like models; the layers pass their own
    configs, projections, key_scales, slot_bytes = [], [], [], set()
    for i in range(n_layers):
        layer = LayerShape(i, shape["n_head_q"], shape["n_head_kv"], shape["head_dim"], scaling)
        try:
            cfg, proj, scale = _layers.layer_config(
                layer, preset, overrides, i in dense, vllm_config.model_config.dtype, calib,
                remedy='additional_config {"sals": {"calibration": FILE}}')
            slot_bytes.add(PagedLayer.slot_bytes_for(cfg))
        except InvalidArgumentError as e:  # a Config field: name it as the setting it came from
            raise type(e)(f"additional_config.sals: {e}", e.status) from None
        configs.append(cfg)
        projections.append(proj)
        key_scales.append(scale)
    if len(slot_bytes) != 1:
        # vLLM gives every layer of a KV cache group the same page size
        raise CalibrationError(
            f"calibration: its layers keep different ranks ({sorted(c.rank for c in configs)}), "
            f"so the layers' slots differ ({sorted(slot_bytes)} bytes) and vLLM needs one page "
            f"size: set rank (or a preset) in additional_config.sals")
    width = configs[0].n_sink + configs[0].n_recent
    # Room for the windows of every sequence vLLM may run at once: rows of finished sequences
    # are given up by recency when a step needs them (_windows).
    capacity = settings.get("window_capacity",
                            vllm_config.scheduler_config.max_num_seqs * width)
    capacity = _args.integer(capacity, "additional_config.sals.window_capacity", 0)
    return Plan(_key(vllm_config, settings), model_type, n_layers, configs, projections,
                key_scales, _rope(hf, model_type), slot_bytes.pop(), capacity)


_current: Plan | None = None


def activate(vllm_config) -> Plan:
    """The plan of ``vllm_config``, made once per process and kept for customize_spec (which
    vLLM calls without a config)."""
    global _current
    settings = settings_of(vllm_config)
    if settings is None:
        raise InvalidArgumentError("additional_config.sals: missing (SALS is not enabled)")
    if _current is None or _current.key != _key(vllm_config, settings):
        _current = make_plan(vllm_config)
    return _current


def current() -> Plan:
    """The plan of this process's model (activate ran when its attention layers were built)."""
    if _current is None:
        raise UnsupportedError("sals.vllm: no SALS settings in this process (the SALS backend "
                               "is chosen through additional_config.sals)")
    return _current


def padded_slot_bytes(slot_bytes: int, dtype: torch.dtype) -> int:
    """A slot rounded up to whole elements of vLLM's cache dtype (vLLM views each layer's
    pages in it)."""
    size = torch.empty((), dtype=dtype).element_size()
    return math.ceil(slot_bytes / size) * size


def key_scale_tensor(scale: np.ndarray | None, head_dim: int) -> torch.Tensor | None:
    """A calibration's key scale [Dk] as [n_head_kv, head_dim] for broadcasting over tokens."""
    return None if scale is None else torch.from_numpy(np.asarray(scale, np.float32)).view(
        -1, head_dim)
