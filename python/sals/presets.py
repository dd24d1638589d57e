"""Presets as objects: what ``sals.Config.preset`` and ``sals.hf.patch(preset=...)`` accept
besides the names, which stay the string forms of the same objects.

- ``SALS_25`` and ``SALS_12_5`` (``Paper``): the paper's two settings, "sals-25" and
  "sals-12.5";
- ``DENSE_EQUIVALENT`` (``DenseEquivalent()``): "dense-equivalent", dense attention up to
  rounding;
- ``Auto(kv_fraction, kv_context)``: "auto", per-layer settings planned from a calibration for a
  memory target by ``sals.hf.patch`` (the rule is in ``sals.hf.auto``).

``parse`` turns a name or an object into the object.
"""

from __future__ import annotations

import dataclasses

from . import _args
from .errors import InvalidArgumentError

#: the context ``Auto`` plans for when not told (tokens)
DEFAULT_CONTEXT = 4096

# the paper's two settings, (rank_frac, value_bits) -> name
_PAPER = {(0.25, 4): "sals-25", (0.125, 2): "sals-12.5"}


@dataclasses.dataclass(frozen=True)
class Paper:
    """One of the paper's settings: rank ``rank_frac * Dk`` (at least 1), score rank half of
    it, ``value_bits``-bit values, a budget of 1/8 of the tokens, 16 sinks and 64 recent
    tokens. The paper has two, ``SALS_25`` (0.25, 4-bit values) and ``SALS_12_5`` (0.125,
    2-bit values); other pairs are refused: set ``sals.Config`` fields as overrides instead."""

    rank_frac: float
    value_bits: int

    def __post_init__(self):
        pair = (_args.real(self.rank_frac, "rank_frac"),
                _args.integer(self.value_bits, "value_bits"))
        if pair not in _PAPER:
            known = ", ".join(f"Paper{p} ({n})" for p, n in _PAPER.items())
            raise InvalidArgumentError(
                f"preset: Paper{pair} is not one of the paper's settings, {known}; set rank "
                f"and value_bits as sals.Config overrides instead")
        # numpy scalars compare equal to the plain numbers they hold: store those
        object.__setattr__(self, "rank_frac", pair[0])
        object.__setattr__(self, "value_bits", pair[1])

    @property
    def name(self) -> str:
        return _PAPER[(self.rank_frac, self.value_bits)]

    def config_fields(self, dk: int) -> dict:
        """The ``sals.Config`` fields of a layer of width ``dk`` (``n_head_kv * head_dim``)."""
        # rank_frac is 1/4 or 1/8: dk * rank_frac is exact, its floor dk // 4 or dk // 8
        rank = max(1, int(dk * self.rank_frac))
        return dict(rank=rank, score_rank=max(1, rank // 2), value_bits=self.value_bits,
                    budget_frac=0.125, n_sink=16, n_recent=64)


@dataclasses.dataclass(frozen=True)
class DenseEquivalent:
    """Full rank, a full budget and 16-bit values: dense attention up to rounding, with no
    calibration needed."""

    name = "dense-equivalent"

    def config_fields(self, dk: int) -> dict:
        """The ``sals.Config`` fields of a layer of width ``dk`` (``n_head_kv * head_dim``)."""
        return dict(rank=dk, score_rank=dk, value_bits=16, budget_frac=1.0)


@dataclasses.dataclass(frozen=True)
class Auto:
    """Per full-attention layer, the rank, score rank, latent key bits and value bits that hold
    ``kv_fraction`` (in (0, 1]) of dense fp16 K+V at ``kv_context`` tokens (0: per token, the
    paper's accounting), chosen from a calibration's eigenvalues. Only ``sals.hf.patch`` applies
    it, as it needs the model's layers and a calibration (``sals.hf.auto``)."""

    kv_fraction: float
    kv_context: int = DEFAULT_CONTEXT

    name = "auto"

    def __post_init__(self):
        fraction = _args.real(self.kv_fraction, "kv_fraction")
        if not 0 < fraction <= 1:
            raise InvalidArgumentError(f"kv_fraction: expected (0, 1], got {fraction}")
        object.__setattr__(self, "kv_fraction", fraction)
        object.__setattr__(self, "kv_context", _args.integer(self.kv_context, "kv_context", 0))


SALS_25 = Paper(0.25, 4)
SALS_12_5 = Paper(0.125, 2)
DENSE_EQUIVALENT = DenseEquivalent()

#: the presets that have a name of their own, by name ("auto" takes arguments)
NAMED = {p.name: p for p in (SALS_25, SALS_12_5, DENSE_EQUIVALENT)}

Preset = Paper | DenseEquivalent | Auto


def parse(preset, overrides: dict | None = None, *, arg: str = "preset") -> Preset | None:
    """``preset`` as an object: a preset object as it is, a name of ``NAMED`` as its object.

    ``overrides``: the caller's keyword options (``sals.hf.patch``'s ``**config_overrides``).
    Given, they make patch's forms valid too: None (no preset, returned as it is) and the name
    "auto", whose arguments ``kv_fraction`` (required) and ``kv_context`` are popped from them
    into ``Auto(kv_fraction, kv_context)``; beside any other preset those two are refused.
    Anything else raises InvalidArgumentError naming ``arg``.
    """
    if isinstance(preset, (Paper, DenseEquivalent, Auto)):
        parsed = preset
    elif isinstance(preset, str) and preset in NAMED:
        parsed = NAMED[preset]
    elif overrides is not None and preset is None:
        parsed = None
    elif overrides is not None and isinstance(preset, str) and preset == "auto":
        if "kv_fraction" not in overrides:
            raise InvalidArgumentError("kv_fraction: preset 'auto' needs kv_fraction=... "
                                       "(the fraction of dense fp16 K+V to keep, e.g. 0.156)")
        return Auto(overrides.pop("kv_fraction"), overrides.pop("kv_context", DEFAULT_CONTEXT))
    else:
        names = (*NAMED, "auto", None) if overrides is not None else tuple(NAMED)
        raise InvalidArgumentError(
            f"{arg}: unknown preset {preset!r}; expected one of {names} or a sals.presets "
            f"object")
    if overrides is not None and ("kv_fraction" in overrides or "kv_context" in overrides):
        # an Auto object holds its own: a second value beside it would be ambiguous
        raise InvalidArgumentError("kv_fraction, kv_context: only for preset='auto'")
    return parsed
