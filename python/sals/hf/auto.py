"""``patch(model, calibration=..., preset="auto", kv_fraction=0.16)`` (or
``preset=sals.presets.Auto(0.16)``): per-layer settings chosen for a memory target instead of a
fixed fraction of Dk.

The rule, per full-attention layer ``l`` (sliding-window layers keep their exact window and
are outside the target), for a sequence of ``S = kv_context`` tokens:

1. **Bytes.** The cache of a layer with rank ``r``, latent keys of ``kb`` bits, ``b``-bit
   values in groups of ``g`` and ``w = n_sink + n_recent`` exact tokens holds, exactly as
   ``LayerCache.memory()`` counts it,
   ``S * (keys(kb) + values(b, g) + 4) + w * 2*Dk*e + 4*Dk*r`` bytes (``e`` the storage
   dtype's size; ``keys(16) = e*r``, ``keys(kb) = r*kb/8 + 4*r/KEY_GROUP`` for quantised
   latent keys; ``values(b, g) = Dk*b/8 + 4*Dk/g`` for quantised values, ``e*Dk`` for 16-bit;
   4 bytes of position per token; the float32 projection). The target is
   ``sum_l bytes_l <= kv_fraction * sum_l 4*Dk*S`` (dense fp16 K+V of the same layers).
   ``kv_context=0`` counts one token's bytes only, without the exact windows and the
   projection: the paper's accounting, in which SALS-12.5% holds 0.156 (plus 4 bytes of
   position per token). Dense layers patched with ``dense_kv="exact"`` are not planned: they
   hold ``S * 2*Dk*m`` bytes of exact keys and values (``m`` the model dtype's size), which
   count in both sums, so the SALS layers share what they leave of the target.
2. **Error.** A layer's key error is the key energy its rank drops,
   ``1 - sum(eig[:r]) / sum(eig)`` (the calibration's eigenvalues: the relative squared error
   of rebuilt keys on the calibration text), plus, for quantised latent keys, the noise of
   each group of ``KEY_GROUP`` latent coordinates: ``KEY_GROUP * eig[first] * q(kb)`` over
   ``sum(eig)``, where the group's range follows its largest coordinate (the leading
   coordinate of a key holds most of its energy, so its group pays for it) and
   ``q(bits) = (2 c_g / (2^bits - 1))^2 / 12`` with ``c_g`` the expected maximum of ``g``
   standard normals. The value error is ``q(b)`` of groups of ``g`` values, weighted by
   ``VALUE_WEIGHT`` = 1/20: value noise is independent per token and averages out over the
   attended tokens, while a missing key direction biases every score (measured on SmolLM2:
   2-bit values at rank Dk/4 kept SALS-25%'s accuracy, rank Dk/8 with 16-bit values did not).
3. **Greedy.** Every layer starts at the cheapest setting (4-bit latent keys at rank
   ``KEY_GROUP``, or, where quantised keys are not available, 16-bit keys at rank
   ``MIN_RANK_FRAC * Dk`` = Dk/16; 2-bit values in the largest group that divides
   ``head_dim``, at most 128); then, while the budget allows, the single step with the
   largest error reduction per byte is taken: a rank step on one layer (``KEY_GROUP``
   directions for quantised keys, ``Dk/RANK_STEPS`` for 16-bit ones), the next key format
   (4 -> 8 -> 16 bits) or the next value format (2 -> 4 -> 8 bits at the same group, then
   16-bit). Ranks never pass what the calibration stores (calibrate with ``rank_frac=1.0``
   to give the rule every direction).
4. **Scoring rank.** It costs decode-time reads, not memory: the smallest ``r* >= r/2`` whose
   leading directions keep ``SCORE_ENERGY`` (99.5%) of the energy the rank keeps (a multiple
   of ``KEY_GROUP`` for quantised keys, whose groups never straddle the scoring part).

A target below the cheapest setting's bytes (the exact windows and
positions alone cost ``(w*4*Dk*e/2 + 4*S) / (4*Dk*S)``) raises ``InvalidArgumentError``
naming the floor. Everything else (budget, sinks, recent window, dtype) is the ``sals.Config``
default or the caller's override, identical on every layer.
"""

from __future__ import annotations

import dataclasses
import math

from .. import Calibration, CalibrationError, InvalidArgumentError, _args
from ..presets import DEFAULT_CONTEXT, Auto

VALUE_WEIGHT = 0.05
MIN_RANK_FRAC = 1 / 16
RANK_STEPS = 48
SCORE_ENERGY = 0.995
KEY_GROUP = 32
# latent key formats, cheapest first: (bits, group); 16 is the storage dtype
QUANTISED_KEY_FORMATS = ((4, KEY_GROUP), (8, KEY_GROUP), (16, KEY_GROUP))
FLOAT_KEY_FORMATS = ((16, KEY_GROUP),)

# expected maximum of g standard normal samples (half the expected range of a group)
_EXPECTED_MAX = {8: 1.42, 16: 1.77, 32: 2.04, 64: 2.33, 128: 2.58, 256: 2.80}


@dataclasses.dataclass
class LayerPlan:
    """What the rule chose for one layer, and what it predicts."""

    index: int
    dk: int
    rank: int
    score_rank: int
    value_bits: int
    value_group: int
    key_bits: int
    key_group: int
    bytes: int               # at kv_context tokens, as LayerCache.memory()["total"] counts
    dense_fp16: int          # 4 * Dk * kv_context
    key_energy: float        # fraction of calibration key energy the rank keeps
    key_error: float         # the rule's predicted relative squared key error (rank + codes)

    def overrides(self) -> dict:
        return {"rank": self.rank, "score_rank": self.score_rank,
                "value_bits": self.value_bits, "value_group": self.value_group,
                "key_bits": self.key_bits, "key_group": self.key_group}


def value_error(bits: int, group: int) -> float:
    """Relative squared error of uniform ``bits``-bit asymmetric quantisation of ``group``
    Gaussian values (0 for 16-bit values); also the per-coordinate noise of a quantised
    latent key group, relative to its largest coordinate's energy."""
    if bits >= 16:
        return 0.0
    c = _EXPECTED_MAX.get(group) or math.sqrt(2 * math.log(group))
    return (2 * c / (2 ** bits - 1)) ** 2 / 12


def _row_bytes(n: int, bits: int, group: int, elem: int) -> int:
    """Bytes of one token's ``n`` values or latent coordinates: ``elem`` each at 16 bits, else
    packed codes plus a float16 scale and zero per group."""
    return elem * n if bits >= 16 else n * bits // 8 + 4 * (n // group)


def layer_bytes(dk: int, rank: int, bits: int, group: int, tokens: int, n_sink: int = 16,
                n_recent: int = 64, elem: int = 2, key_bits: int = 16,
                key_group: int = KEY_GROUP) -> int:
    """Bytes of one layer's cache holding ``tokens`` tokens (LayerCache.memory()["total"]);
    ``tokens`` 0: the bytes of one more token (the paper's accounting, no fixed costs)."""
    values, keys = _row_bytes(dk, bits, group, elem), _row_bytes(rank, key_bits, key_group, elem)
    if tokens == 0:
        return keys + values + 4
    # as LayerCache.memory() counts them: a short sequence's sinks and recent tokens overlap
    exact = (min(tokens, n_sink) + min(tokens, n_recent)) * 2 * dk * elem
    return tokens * (keys + values + 4) + exact + 4 * dk * rank


def key_error(eig, rank: int, bits: int, group: int = KEY_GROUP) -> float:
    """The rule's relative squared error of rebuilt keys: the energy beyond ``rank`` plus, for
    quantised latent keys, each group's code noise set by its largest coordinate (module
    docstring, step 2). ``eig``: the calibration's eigenvalues, largest first."""
    total = float(sum(eig)) or 1.0
    err = float(sum(eig[rank:])) / total
    if bits < 16:
        noise = value_error(bits, group)
        err += sum(group * float(eig[first]) * noise for first in range(0, rank, group)) / total
    return err


def _value_formats(head_dim: int) -> list[tuple[int, int]]:
    """Value formats from cheapest to exact: (bits, group), the group the largest divisor of
    head_dim up to 128 (whole bytes per group for every bit width)."""
    group = max(g for g in (8, 16, 32, 64, 128) if head_dim % g == 0) if head_dim % 8 == 0 \
        else None
    if group is None:
        return [(16, 32)]
    return [(2, group), (4, group), (8, group), (16, group)]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A planned layer, as the calibration describes it."""

    index: int
    dk: int
    max_rank: int                       # the directions the calibration stores
    eig: list[float]                    # its eigenvalues, largest first
    cum: list[float]                    # cum[r]: the energy fraction the leading r directions keep
    value_formats: list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class _Setting:
    """A layer's setting while the greedy rule grows it: a rank and indices into its formats."""

    layer: _Layer
    key_formats: tuple[tuple[int, int], ...]
    rank: int
    kfmt: int = 0
    fmt: int = 0

    @property
    def key_format(self) -> tuple[int, int]:
        return self.key_formats[self.kfmt]

    @property
    def value_format(self) -> tuple[int, int]:
        return self.layer.value_formats[self.fmt]

    def rank_step(self) -> int:
        kbits, kgroup = self.key_format
        return kgroup if kbits < 16 else max(1, self.layer.dk // RANK_STEPS)


@dataclasses.dataclass(frozen=True)
class _Step:
    """A candidate step of the greedy rule: ``settings[at]`` becomes ``after``."""

    at: int
    after: _Setting
    gain: float  # the predicted error it removes
    extra: int   # the bytes it adds

    @property
    def rate(self) -> float:
        return self.gain / self.extra


@dataclasses.dataclass(frozen=True)
class _Run:
    """One run of the greedy rule: the bytes of its cheapest setting, and its plans with their
    predicted error (None and infinity when the cheapest setting did not fit)."""

    cheapest: int
    plans: list[LayerPlan] | None = None
    error: float = math.inf


def plan(calibration: Calibration, layers, kv_fraction: float,
         kv_context: int = DEFAULT_CONTEXT, n_sink: int = 16, n_recent: int = 64,
         dtype: str = "float16", quantised_keys: bool = True, exact=()) -> list[LayerPlan]:
    """Per-layer settings for ``layers`` (``[(index, n_head_kv, head_dim)]``, the
    full-attention layers that keep a SALS cache) meeting ``kv_fraction`` of dense fp16 K+V at
    ``kv_context`` tokens (module docstring); ``quantised_keys`` False keeps latent keys 16-bit.
    ``exact``: ``[(dk, element size)]`` of the dense layers that keep exact keys and values
    (``dense_kv="exact"``): part of the target's dense K+V, and ``2 * dk * element size`` bytes
    per token of it spent before any SALS layer's."""
    target = Auto(kv_fraction, kv_context)  # checks both as sals.presets.Auto does
    kv_fraction, kv_context = target.kv_fraction, target.kv_context
    elem = 4 if dtype == "float32" else 2
    window = int(n_sink) + int(n_recent)
    per_seq = max(1, kv_context)  # kv_context 0: bytes per token
    fixed = sum(2 * dk * size * per_seq for dk, size in exact)
    base = []
    for index, n_head_kv, head_dim in layers:
        dk = n_head_kv * head_dim
        if index >= len(calibration.layers):
            raise CalibrationError(f"calibration: has no layer {index}")
        cal = calibration.layers[index]
        if cal.dk != dk:
            raise CalibrationError(f"calibration: layer {index} has Dk={cal.dk}, the model {dk}")
        eig = [float(x) for x in cal.eigenvalues]
        total = sum(eig) or 1.0
        cumulative = [0.0]
        for x in eig:
            cumulative.append(cumulative[-1] + x / total)
        base.append(_Layer(index, dk, cal.rank, eig, cumulative, _value_formats(head_dim)))
    dense = sum(4 * b.dk * per_seq for b in base) + sum(4 * dk * per_seq for dk, _ in exact)
    budget = kv_fraction * dense - fixed

    def cost(s: _Setting) -> int:
        bits, group = s.value_format
        kbits, kgroup = s.key_format
        return layer_bytes(s.layer.dk, s.rank, bits, group, kv_context, n_sink, n_recent, elem,
                           kbits, kgroup)

    def kerr(s: _Setting) -> float:
        return key_error(s.layer.eig, s.rank, *s.key_format)

    def greedy(quantised: bool) -> _Run:
        settings = []
        for b in base:
            # quantised keys need whole groups: layers holding fewer directions stay 16-bit
            keys = QUANTISED_KEY_FORMATS if quantised and b.max_rank >= KEY_GROUP \
                else FLOAT_KEY_FORMATS
            rank = KEY_GROUP if keys[0][0] < 16 else \
                min(b.max_rank, max(1, round(b.dk * MIN_RANK_FRAC)))
            settings.append(_Setting(b, keys, rank))
        spent = sum(cost(s) for s in settings)
        if spent > budget:
            return _Run(spent)
        cheapest = spent
        while True:
            # the best step may not fit while a cheaper one still does: take the best that fits
            steps = []
            for at, s in enumerate(settings):
                here = cost(s)
                rank_up = min(s.layer.max_rank, s.rank + s.rank_step())
                if s.key_format[0] < 16:
                    rank_up -= rank_up % s.key_format[1]  # whole groups only
                if rank_up > s.rank:
                    up = dataclasses.replace(s, rank=rank_up)
                    steps.append(_Step(at, up, kerr(s) - kerr(up), cost(up) - here))
                if s.kfmt + 1 < len(s.key_formats):
                    up = dataclasses.replace(s, kfmt=s.kfmt + 1)
                    steps.append(_Step(at, up, kerr(s) - kerr(up), cost(up) - here))
                if s.fmt + 1 < len(s.layer.value_formats):
                    up = dataclasses.replace(s, fmt=s.fmt + 1)
                    gain = VALUE_WEIGHT * (value_error(*s.value_format)
                                           - value_error(*up.value_format))
                    steps.append(_Step(at, up, gain, cost(up) - here))
            fitting = [t for t in steps if spent + t.extra <= budget and t.rate > 0]
            if not fitting:
                break
            # ties go to the lowest layer index, then to the first step listed
            best = max(fitting, key=lambda t: (t.rate, -settings[t.at].layer.index))
            settings[best.at] = best.after
            spent += best.extra

        plans, error = [], 0.0
        for s in settings:
            rank, cum = s.rank, s.layer.cum
            kbits, kgroup = s.key_format
            unit = kgroup if kbits < 16 else 1  # a quantised scoring part holds whole groups
            score = max(unit, -(-(rank // 2) // unit) * unit)
            while score < rank and cum[score] < SCORE_ENERGY * cum[rank]:
                score += unit
            bits, group = s.value_format
            plans.append(LayerPlan(index=s.layer.index, dk=s.layer.dk, rank=rank,
                                   score_rank=score, value_bits=bits, value_group=group,
                                   key_bits=kbits, key_group=kgroup, bytes=cost(s),
                                   dense_fp16=4 * s.layer.dk * per_seq, key_energy=cum[rank],
                                   key_error=kerr(s)))
            error += kerr(s) + VALUE_WEIGHT * value_error(bits, group)
        return _Run(cheapest, plans, error)

    # quantised latent keys start at a whole group, which a small Dk may not afford: the rule
    # runs with and without them and keeps the plan it predicts to be more accurate
    runs = [greedy(q) for q in ((True, False) if quantised_keys else (False,))]
    feasible = [r for r in runs if r.plans is not None]
    if not feasible:
        cheapest = min(r.cheapest for r in runs)
        exact_part = f"; the exact dense layers {fixed / dense:.4f}" if exact else ""
        raise InvalidArgumentError(
            f"kv_fraction: {kv_fraction:g} is below what this model can reach at "
            f"{kv_context} tokens: {(cheapest + fixed) / dense:.4f} of dense fp16 K+V (the "
            f"cheapest keys, 2-bit values, {window} exact tokens and the projection; "
            f"the exact windows alone cost "
            f"{min(kv_context, window) * 2 * elem / (4 * per_seq):.4f}{exact_part})")
    return min(feasible, key=lambda r: r.error).plans


def layer_overrides(info, calibration: Calibration | None, target: Auto, overrides: dict,
                    exact=frozenset()) -> dict[int, dict]:
    """What ``patch(..., preset=target)`` applies per layer: ``{layer: Config fields}``.
    ``overrides``: the caller's other ``sals.Config`` fields, shared by every layer.
    ``exact``: the indices of the dense layers that keep exact keys and values in the model's
    dtype: not planned, but their bytes count against the target."""
    if calibration is None:
        raise CalibrationError(
            "calibration: preset 'auto' chooses ranks from the calibration's eigenvalues; "
            "pass calibration=... (python -m sals calibrate --rank-frac 1.0 keeps every "
            "direction)")
    chosen = {"rank", "score_rank", "value_bits", "value_group", "key_bits",
              "key_group"} & set(overrides)
    if chosen:
        raise InvalidArgumentError(
            f"{min(chosen)}: chosen per layer by preset 'auto'; drop it or use another "
            f"preset")
    full = [layer for layer in info.layers if not layer.sliding]
    plans = plan(calibration, [(layer.index, layer.n_head_kv, layer.head_dim) for layer in full
                               if layer.index not in exact],
                 target.kv_fraction, target.kv_context,
                 n_sink=_args.integer(overrides.get("n_sink", 16), "n_sink", 0),
                 n_recent=_args.integer(overrides.get("n_recent", 64), "n_recent", 0),
                 dtype=overrides.get("dtype", "float16"),
                 exact=[(layer.dk, layer.module.q_proj.weight.element_size())
                        for layer in full if layer.index in exact])
    return {p.index: p.overrides() for p in plans}
