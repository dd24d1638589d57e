"""What sals.hf needs to know about a transformers model: its attention modules, their shapes,
rotary frequencies and layer types, read from the modules themselves (not from checkpoints).

Supported: the Llama-like attention of Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text). They
share one forward (transformers 5.x): q/k/v projections -> optional per-head q_norm/k_norm ->
rotate-half RoPE from ``position_embeddings=(cos, sin)`` -> cache -> attention -> o_proj.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import torch

from .. import InvalidArgumentError, UnsupportedError

#: model_type -> (attention class name, what is covered)
SUPPORTED = {
    "llama": ("LlamaAttention", "Llama 2/3/3.1 (incl. llama3 RoPE scaling), SmolLM2, TinyLlama"),
    "mistral": ("MistralAttention", "Mistral (no sliding window, v0.2+)"),
    "qwen2": ("Qwen2Attention", "Qwen2 / Qwen2.5 (qkv bias)"),
    "qwen3": ("Qwen3Attention", "Qwen3 dense (q_norm/k_norm)"),
    "gemma3_text": ("Gemma3Attention", ("Gemma 3 text (q_norm/k_norm, query_pre_attn_scalar, "
                    "sliding-window layers kept exact)")),
}

#: rotary types whose frequencies change with the sequence length: a key stored once cannot be
#: rebuilt at its position later with fixed inv_freq.
_DYNAMIC_ROPE = ("dynamic", "longrope")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: the transformers releases the HF layer is tested on: CI runs the HF tests on the oldest and
#: the newest (.ci/run pins both). pyproject.toml's [hf] extra states the oldest as its lower
#: bound and has no upper bound: a newer release gets a warning (warn_if_untested), not a
#: downgrade, since it usually works.
NEWEST_TESTED_TRANSFORMERS = "5.25"
TESTED_TRANSFORMERS = f"5.17 to {NEWEST_TESTED_TRANSFORMERS}"


def supported_text() -> str:
    return ", ".join(f"{k} ({v[1]})" for k, v in SUPPORTED.items())


@dataclasses.dataclass
class LayerInfo:
    """One decoder layer's attention as sals sees it."""

    index: int
    module: torch.nn.Module
    layer_type: str            # "full_attention" (SALS) or "sliding_attention" (exact window)
    sliding_window: int | None
    n_head_q: int
    n_head_kv: int
    head_dim: int
    scaling: float             # softmax scale the model uses (Gemma 3: query_pre_attn_scalar**-0.5)
    inv_freq: torch.Tensor     # [head_dim / 2] float32, scalings folded in
    attention_scaling: float   # multiplies cos and sin

    @property
    def dk(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def device(self) -> torch.device:
        return self.module.q_proj.weight.device

    @property
    def sliding(self) -> bool:
        return self.layer_type == "sliding_attention"


@dataclasses.dataclass
class ModelInfo:
    model_type: str
    architecture: str
    config: object             # the decoder's text config
    layers: list[LayerInfo]
    hidden_size: int
    vocab_size: int
    cache_arg: str             # the keyword transformers passes the KV cache under


#: the keyword of the KV cache in attention and model forwards: "past_key_values" in
#: transformers 5.17, "cache" in 5.24 (which still maps the old name, with a FutureWarning)
CACHE_ARGS = ("cache", "past_key_values")


def cache_argument(function, what: str) -> str:
    """The keyword under which ``function`` (an attention or model forward) takes the KV cache.
    A forward that takes it under neither known name would bypass the SALS cache: refused."""
    import inspect

    import transformers

    params = inspect.signature(function).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise UnsupportedError(
        f"model: {what} takes no {' or '.join(CACHE_ARGS)} argument in transformers "
        f"{transformers.__version__}; sals.hf cannot keep its KV cache in SALS form there "
        f"(tested: transformers {TESTED_TRANSFORMERS})")


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise InvalidArgumentError(
            f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _rotary(model, layer_type: str) -> tuple[torch.Tensor, float, str]:
    """(inv_freq, attention_scaling, rope_type) of the model's rotary module for a layer type.

    Gemma 3 keeps one set per layer type (``{layer_type}_inv_freq``); the others one
    ``inv_freq``. Llama-3, linear and YaRN scalings are folded into inv_freq by transformers.
    """
    for _, mod in model.named_modules():
        inv = getattr(mod, f"{layer_type}_inv_freq", None)
        if inv is not None:
            scaling = getattr(mod, f"{layer_type}_attention_scaling", 1.0)
            rope_type = getattr(mod, "rope_type", {}).get(layer_type, "default")
            return inv, float(scaling), rope_type
        inv = getattr(mod, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and hasattr(mod, "attention_scaling"):
            return inv, float(mod.attention_scaling), getattr(mod, "rope_type", "default")
    raise UnsupportedError(
        f"model: no rotary embedding module with inv_freq found in {type(model).__name__}")


def _check_transformers() -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise UnsupportedError(
            f"transformers {transformers.__version__}: sals.hf needs transformers 5.x "
            f"(attention modules, caches and masks changed in 5.0; tested: "
            f"{TESTED_TRANSFORMERS})")


def warn_if_untested() -> None:
    """Warn when the installed transformers is newer than NEWEST_TESTED_TRANSFORMERS. Its patch
    releases count as tested (transformers fixes bugs in them, it changes APIs in minor ones).
    Called once, below, when this module is first imported: by sals.hf's patch, SalsCache or
    calibrate, whichever comes first (importing the sals.hf package itself loads no
    transformers)."""
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__).release[:2]
    if installed > Version(NEWEST_TESTED_TRANSFORMERS).release:
        warnings.warn(
            f"transformers {transformers.__version__} is newer than the newest release sals.hf "
            f"is tested on ({NEWEST_TESTED_TRANSFORMERS}); it may work (tested: transformers "
            f"{TESTED_TRANSFORMERS})", UserWarning, stacklevel=2)


warn_if_untested()


def describe(model) -> ModelInfo:
    """Inspect ``model``; raise UnsupportedError naming it when its architecture is not one of
    SUPPORTED (or transformers is older than 5), InvalidArgumentError when its dtype or device
    cannot be used."""
    _check_transformers()
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    if model_type not in SUPPORTED:
        raise UnsupportedError(
            f"model: architecture {archs[0]} (model_type {model_type!r}) is not supported by "
            f"sals.hf; supported: {supported_text()}")
    attn_class = SUPPORTED[model_type][0]
    modules = sorted((m for m in model.modules() if type(m).__name__ == attn_class),
                     key=lambda m: m.layer_idx)
    n_layers = int(config.num_hidden_layers)
    if [m.layer_idx for m in modules] != list(range(n_layers)):
        raise UnsupportedError(
            f"model: expected {n_layers} {attn_class} modules with layer_idx 0..{n_layers - 1}, "
            f"found {[m.layer_idx for m in modules]}")
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    layers = []
    for m in modules:
        dtype = m.q_proj.weight.dtype
        if dtype not in _FLOAT_DTYPES:
            raise InvalidArgumentError(
                f"model: layer {m.layer_idx} weights are {dtype}; sals takes float32, float16 "
                f"or bfloat16 models")
        if m.q_proj.weight.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(
                f"model: layer {m.layer_idx} is on {m.q_proj.weight.device}; sals runs on cpu "
                f"or cuda")
        if getattr(m, "attn_logit_softcapping", None) is not None:
            raise UnsupportedError(
                f"model: layer {m.layer_idx} uses attention logit soft-capping, which sals "
                f"does not implement")
        layer_type = layer_types[m.layer_idx]
        if layer_type not in ("full_attention", "sliding_attention"):
            raise UnsupportedError(f"model: layer {m.layer_idx} has layer type {layer_type!r}")
        inv_freq, attention_scaling, rope_type = _rotary(model, layer_type)
        if any(kind in str(rope_type) for kind in _DYNAMIC_ROPE):
            raise UnsupportedError(
                f"model: rope_type {rope_type!r} changes frequencies with the sequence length; "
                f"sals needs fixed frequencies (default, linear, llama3, yarn)")
        layers.append(LayerInfo(
            index=m.layer_idx,
            module=m,
            layer_type=layer_type,
            sliding_window=None if layer_type == "full_attention" else _layer_kwargs(
                layer_kwargs, m.layer_idx).get("sliding_window"),
            n_head_q=int(config.num_attention_heads),
            n_head_kv=int(config.num_key_value_heads),
            head_dim=int(m.head_dim),
            scaling=float(m.scaling),
            inv_freq=inv_freq.detach().float().cpu(),
            attention_scaling=attention_scaling,
        ))
    cache_arg = cache_argument(type(modules[0]).forward, f"{attn_class}.forward")
    return ModelInfo(model_type=model_type, architecture=archs[0], config=config, layers=layers,
                     hidden_size=int(config.hidden_size), vocab_size=int(config.vocab_size),
                     cache_arg=cache_arg)


def _layer_kwargs(layer_kwargs, index: int) -> dict:
    """Cache-layer kwargs of one layer: transformers 5.17 returns one dict for all layers,
    5.24 a list with one dict per layer."""
    return layer_kwargs[index] if isinstance(layer_kwargs, (list, tuple)) else layer_kwargs


def modeling_function(module, name: str):
    """A function of the module's own modeling file (``apply_rotary_pos_emb``,
    ``eager_attention_forward``), so that prefill computes exactly what the model computes."""
    return getattr(sys.modules[type(module).__module__], name)


def pre_rope(module, hidden_states: torch.Tensor, with_query: bool = True,
             with_value: bool = True):
    """Pre-RoPE ``(q, k, v)`` of an attention module, each ``[B, T, H, head_dim]``.

    q and k are after q_norm/k_norm where the model has them (an RMSNorm over the last dim, so the
    layout does not matter). q is None without ``with_query`` (calibration without queries, the
    eval's prefill), v None without ``with_value`` (calibration).
    """
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    k = module.k_proj(hidden_states).view(shape)
    if hasattr(module, "k_norm"):
        k = module.k_norm(k)
    q = v = None
    if with_query:
        q = module.q_proj(hidden_states).view(shape)
        if hasattr(module, "q_norm"):
            q = module.q_norm(q)
    if with_value:
        v = module.v_proj(hidden_states).view(shape)
    return q, k, v


def _weights_digest(model, info: ModelInfo) -> str:
    """sha256 over a few weights (k_proj of the first and last layer, the first embedding rows),
    rounded to bfloat16 so that one checkpoint loaded in float32, float16 or bfloat16 gives the
    same digest while another checkpoint of the same shape does not."""
    import hashlib

    digest = hashlib.sha256()
    tensors = [info.layers[0].module.k_proj.weight, info.layers[-1].module.k_proj.weight]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None:
        tensors.append(embed.weight[:8])
    for t in tensors:
        bits = t.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(bits.numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model, info: ModelInfo | None = None) -> dict:
    """What identifies a model for a calibration: architecture, shapes and a weight digest."""
    info = describe(model) if info is None else info
    first = info.layers[0]
    return {
        "architecture": info.architecture,
        "model_type": info.model_type,
        "n_layers": len(info.layers),
        "n_head_q": first.n_head_q,
        "n_head_kv": first.n_head_kv,
        "head_dim": first.head_dim,
        "hidden_size": info.hidden_size,
        "vocab_size": info.vocab_size,
        "weights_sha256": _weights_digest(model, info),
    }
