"""Cache configuration (mirrors ``sals_config_t``) and rotary embedding (``sals_rope_t``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from . import _C, _args, presets
from ._tensors import KDLCPU
from .errors import InvalidArgumentError

#: storage dtype names and their ``sals_dtype_t`` values
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}

#: the names Config.preset accepts
PRESETS = tuple(presets.NAMED)
_INT_FIELDS = ("n_head_q", "n_head_kv", "head_dim", "value_bits", "value_group", "key_bits",
               "key_group", "n_sink", "n_recent", "budget_tokens", "max_batch", "max_tokens",
               "n_threads")
_BOOL_FIELDS = ("select_per_head", "dense", "check_finite")


@dataclasses.dataclass
class Config:
    """One attention layer's cache settings (``sals_config_t``).

    Shapes: keys/values ``[B, T, n_head_kv, head_dim]``, queries ``[B, T, n_head_q, head_dim]``,
    ``Dk = n_head_kv * head_dim``, projection ``[Dk, rank]``.

    ``rank`` None means ``Dk`` (full rank); ``score_rank`` None means ``rank // 2``, or ``rank``
    when ``rank == Dk``. ``value_bits`` is 16 (unquantised, stored in ``dtype``), 8, 4 or 2.
    ``key_bits`` is 16 (latent keys stored in ``dtype``), 8 or 4: latent coordinates quantised
    like values, in groups of ``key_group`` (which must divide ``score_rank`` and
    ``rank - score_rank``), with a float16 scale and zero per group (CPU and CUDA). ``budget_tokens`` > 0 fixes the number of selected
    candidates, otherwise ``ceil(budget_frac * S)``. ``dtype`` is the storage type of 16-bit
    latent keys, exact windows and 16-bit values: "float16", "bfloat16" or "float32". ``scale``
    None means ``1/sqrt(head_dim)``. ``n_threads`` (at most 1024) 0 uses one CPU thread per
    online core.
    ``check_finite`` (default True) refuses NaN/inf inputs with NotFiniteError and, on the CPU,
    appended values the storage cannot hold (beyond float16's 65504 for ``dtype="float16"``, or
    for the float16 scale and zero of quantised values or latent keys).

    Fields are checked for their kind at construction and again when a cache is made (values
    and ranges are checked by the C library): int fields take ``int`` or numpy integers (not
    ``bool``), bool fields ``bool`` or ``numpy.bool_`` (not 0/1 or strings), ``budget_frac``
    and ``scale`` real numbers; anything else raises InvalidArgumentError naming the field.
    """

    n_head_q: int
    n_head_kv: int
    head_dim: int
    rank: int | None = None
    score_rank: int | None = None
    value_bits: int = 16
    value_group: int = 32
    key_bits: int = 16
    key_group: int = 32
    n_sink: int = 16
    n_recent: int = 64
    budget_frac: float = 0.125
    budget_tokens: int = 0
    select_per_head: bool = False
    dense: bool = False
    max_batch: int = 1
    max_tokens: int = 4096
    dtype: str = "float16"
    scale: float | None = None
    check_finite: bool = True
    n_threads: int = 0

    def __post_init__(self):
        self._checked()

    def _checked(self) -> dict:
        """Every field checked for its kind, as plain Python values."""
        f = {}
        for name in _INT_FIELDS:
            f[name] = _args.integer(getattr(self, name), name)
        for name in ("rank", "score_rank"):
            f[name] = _args.optional_integer(getattr(self, name), name)
        for name in _BOOL_FIELDS:
            f[name] = _args.boolean(getattr(self, name), name)
        f["budget_frac"] = _args.real(self.budget_frac, "budget_frac")
        f["scale"] = _args.optional_real(self.scale, "scale")
        f["dtype"] = _args.choice(self.dtype, "dtype", DTYPES)
        return f

    @property
    def dk(self) -> int:
        """``n_head_kv * head_dim``: the width of all KV heads' keys concatenated."""
        return (_args.integer(self.n_head_kv, "n_head_kv")
                * _args.integer(self.head_dim, "head_dim"))

    def resolved_rank(self) -> int:
        """``rank``, or ``Dk`` when it is None."""
        rank = _args.optional_integer(self.rank, "rank")
        return self.dk if rank is None else rank

    def resolved_score_rank(self) -> int:
        """``score_rank``, or its default: ``rank // 2`` (``rank`` at full rank), at least 1."""
        score_rank = _args.optional_integer(self.score_rank, "score_rank")
        if score_rank is not None:
            return score_rank
        rank = self.resolved_rank()
        return rank if rank == self.dk else max(1, rank // 2)

    def most_selected(self, length: int) -> int:
        """The most candidates a sparse step selects in a sequence of ``length`` tokens: the
        budget rule (sals.h) clamped to the candidates, 0 on a dense layer. Non-decreasing in
        ``length``."""
        if self.dense:
            return 0  # a dense layer never selects
        candidates = max(length - self.n_sink - self.n_recent, 0)
        if self.budget_tokens > 0:
            budget = self.budget_tokens
        else:
            # As the library computes it: the float32 field times S, in double, rounded up.
            budget = math.ceil(float(np.float32(self.budget_frac)) * length)
        return min(budget, candidates)

    @classmethod
    def preset(cls, name: str | presets.Preset, n_head_q: int, n_head_kv: int, head_dim: int,
               **overrides: Any):
        """The paper's settings, by name or as a ``sals.presets`` object.

        - ``"sals-25"`` (``presets.SALS_25``): rank ``Dk/4``, 4-bit values;
        - ``"sals-12.5"`` (``presets.SALS_12_5``): rank ``Dk/8``, 2-bit values;
          both with score rank ``rank/2``, budget 1/8, 16 sinks and 64 recent tokens;
        - ``"dense-equivalent"`` (``presets.DENSE_EQUIVALENT``): full rank, full budget, 16-bit
          values (equals dense attention up to rounding).

        ``presets.Auto`` is refused: its settings are planned per layer by ``sals.hf.patch``.
        ``overrides`` set any other field (``max_tokens``, ``dtype``, ...).
        """
        dk = _args.integer(n_head_kv, "n_head_kv") * _args.integer(head_dim, "head_dim")
        preset = presets.parse(name, arg="name")
        if isinstance(preset, presets.Auto):
            raise InvalidArgumentError(
                "name: preset 'auto' plans each layer's settings from a calibration; use "
                "sals.hf.patch(model, calibration=..., preset=...)")
        return cls(n_head_q, n_head_kv, head_dim, **{**preset.config_fields(dk), **overrides})

    def check(self) -> None:
        """Check every value and relation as making a cache does (``sals_config_check``:
        ranges, ``n_head_q`` a multiple of ``n_head_kv``, ``rank <= Dk``, groups dividing their
        dimensions, size limits), without making one: InvalidArgumentError naming the field.
        The device is checked when a cache is made."""
        _C.config_check(self._to_c(KDLCPU, 0))

    def _to_c(self, device_type: int, device_id: int) -> dict:
        """The dict sals._C.Cache reads (``sals_config_t`` fields); the C library validates
        values, this only resolves defaults and names."""
        f = self._checked()
        c = {name: f[name] for name in _INT_FIELDS}
        c.update({name: int(f[name]) for name in _BOOL_FIELDS})
        c.update(rank=self.resolved_rank(), score_rank=self.resolved_score_rank(),
                 budget_frac=f["budget_frac"], dtype=DTYPES[f["dtype"]],
                 scale=0.0 if f["scale"] is None else f["scale"], device_type=device_type,
                 device_id=device_id)
        return c


class Rope:
    """Rotary position embedding as HF models describe it (``sals_rope_t``).

    ``inv_freq``: ``[rotary_dim / 2]`` frequencies (any array: torch, numpy, list), copied as
    float32; model-specific scalings (Llama-3, linear, YaRN) are already folded in.
    ``attention_scaling`` multiplies cos and sin. ``interleaved`` False pairs channels
    ``(i, i + rotary_dim/2)`` (rotate-half: Llama, Mistral, Qwen, Gemma), True pairs
    ``(2i, 2i+1)``. ``rotary_dim`` None means ``2 * len(inv_freq)``; channels past it are not
    rotated. ``inv_freq`` must be 1-D and real (integer or float), ``interleaved`` a bool,
    ``attention_scaling`` a real number: anything else raises InvalidArgumentError.
    """

    def __init__(self, inv_freq, attention_scaling: float = 1.0, interleaved: bool = False,
                 rotary_dim: int | None = None):
        freq = _inv_freq(inv_freq)
        self.inv_freq = freq
        rotary_dim = _args.optional_integer(rotary_dim, "rotary_dim")
        self.rotary_dim = 2 * freq.size if rotary_dim is None else rotary_dim
        if self.rotary_dim != 2 * freq.size:
            raise InvalidArgumentError(
                f"rotary_dim: {self.rotary_dim} needs {self.rotary_dim // 2} inv_freq entries, "
                f"got {freq.size}")
        self.attention_scaling = _args.real(attention_scaling, "attention_scaling")
        self.interleaved = _args.boolean(interleaved, "interleaved")

    @classmethod
    def none(cls) -> "Rope":
        """No rotary embedding (rotary_dim 0)."""
        return cls(np.zeros(0, np.float32))

    @classmethod
    def default(cls, head_dim: int, theta: float = 10000.0, **kwargs) -> "Rope":
        """The standard frequencies ``theta ** (-2i / head_dim)``, i < head_dim / 2."""
        i = np.arange(0, head_dim, 2, dtype=np.float64)
        return cls((1.0 / theta ** (i / head_dim)).astype(np.float32), **kwargs)

    def _to_c(self) -> tuple:
        freq = _inv_freq(self.inv_freq)
        rotary_dim = _args.integer(self.rotary_dim, "rotary_dim")
        return (freq.tobytes(), rotary_dim, _args.real(self.attention_scaling, "attention_scaling"),
                int(_args.boolean(self.interleaved, "interleaved")))

    def __repr__(self) -> str:
        return (f"Rope(rotary_dim={self.rotary_dim}, attention_scaling={self.attention_scaling}, "
                f"interleaved={self.interleaved})")


def _inv_freq(inv_freq) -> np.ndarray:
    """inv_freq as a contiguous float32 numpy vector: 1-D, real, finite."""
    if hasattr(inv_freq, "detach"):  # torch: leave autograd and the device
        if inv_freq.is_complex():
            raise InvalidArgumentError(f"inv_freq: expected real values, got {inv_freq.dtype}")
        inv_freq = inv_freq.detach().cpu()
        if inv_freq.dtype.is_floating_point:
            inv_freq = inv_freq.float()
        inv_freq = inv_freq.numpy()
    try:
        arr = np.asarray(inv_freq)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"inv_freq: not an array of numbers ({e})") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"inv_freq: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgumentError(f"inv_freq: expected 1 dim [rotary_dim / 2], got shape "
                                   f"{list(arr.shape)}")
    with np.errstate(over="ignore"):
        freq = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(freq)):
        raise InvalidArgumentError("inv_freq: holds NaN or infinity (or values beyond float32)")
    return freq
