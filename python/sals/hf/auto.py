"""``patch(model, calibration=..., preset="auto", kv_fraction=0.16)``: per-layer settings chosen
for a memory target instead of a fixed fraction of Dk.

The rule, per full-attention layer ``l`` (sliding-window layers keep their exact window and
are outside the target), for a sequence of ``S = kv_context`` tokens:

1. **Bytes.** The cache of a layer with rank ``r``, ``b``-bit values in groups of ``g`` and
   ``w = n_sink + n_recent`` exact tokens holds, exactly as ``LayerCache.memory()`` counts it,
   ``S * (e*r + values(b, g) + 4) + w * 2*Dk*e + 4*Dk*r`` bytes (``e`` the storage dtype's
   size, ``values(b, g) = Dk*b/8 + 4*Dk/g`` for quantised values, ``e*Dk`` for 16-bit; 4 bytes
   of position per token; the float32 projection). The target is
   ``sum_l bytes_l <= kv_fraction * sum_l 4*Dk*S`` (dense fp16 K+V of the same layers).
   ``kv_context=0`` counts one token's bytes only, without the exact windows and the
   projection: the paper's accounting, in which SALS-12.5% holds 0.156 (plus 4 bytes of
   position per token).
2. **Error.** A layer's key error is the key energy its rank drops,
   ``1 - sum(eig[:r]) / sum(eig)`` (the calibration's eigenvalues: the relative squared error
   of rebuilt keys on the calibration text); its value error is the relative squared error of
   uniform ``b``-bit quantisation of ``g`` Gaussian values, ``(2 c_g / (2^b - 1))^2 / 12`` with
   ``c_g`` the expected maximum of ``g`` standard normals, weighted by ``VALUE_WEIGHT`` = 1/20:
   quantisation noise is independent per token and averages out over the attended tokens,
   while a missing key direction biases every score (measured on SmolLM2: 2-bit values at rank
   Dk/4 kept SALS-25%'s accuracy, rank Dk/8 with 16-bit values did not).
3. **Greedy.** Every layer starts at the cheapest setting (rank ``MIN_RANK_FRAC * Dk`` =
   Dk/16, 2-bit values in the largest group that divides ``head_dim``, at most 128); then,
   while the budget
   allows, the single step with the largest error reduction per byte is taken: a rank step of
   ``Dk/RANK_STEPS`` directions on one layer, or the next value format on one layer
   (2 -> 4 -> 8 bits at the same group, then 16-bit). Ranks never pass what the calibration
   stores (calibrate with ``rank_frac=1.0`` to give the rule every direction).
4. **Scoring rank.** It costs decode-time reads, not memory: the smallest ``r* >= r/2`` whose
   leading directions keep ``SCORE_ENERGY`` (99.5%) of the energy the rank keeps.

A target below the cheapest setting's bytes (the exact windows and positions alone cost
``(w*4*Dk*e/2 + 4*S) / (4*Dk*S)``) raises ``InvalidArgumentError`` naming the floor.
Everything else (budget, sinks, recent window, dtype) is the ``sals.Config`` default or the
caller's override, identical on every layer.
"""

from __future__ import annotations

import dataclasses
import math

from .. import Calibration, CalibrationError, InvalidArgumentError

VALUE_WEIGHT = 0.05
MIN_RANK_FRAC = 1 / 16
RANK_STEPS = 48
SCORE_ENERGY = 0.995
DEFAULT_CONTEXT = 4096

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
    bytes: int               # at kv_context tokens, as LayerCache.memory()["total"] counts
    dense_fp16: int          # 4 * Dk * kv_context
    key_energy: float        # fraction of calibration key energy the rank keeps

    def overrides(self) -> dict:
        return {"rank": self.rank, "score_rank": self.score_rank,
                "value_bits": self.value_bits, "value_group": self.value_group}


def value_error(bits: int, group: int) -> float:
    """Relative squared error of uniform ``bits``-bit asymmetric quantisation of ``group``
    Gaussian values (0 for 16-bit values)."""
    if bits >= 16:
        return 0.0
    c = _EXPECTED_MAX.get(group) or math.sqrt(2 * math.log(group))
    return (2 * c / (2 ** bits - 1)) ** 2 / 12


def layer_bytes(dk: int, rank: int, bits: int, group: int, tokens: int, n_sink: int = 16,
                n_recent: int = 64, elem: int = 2) -> int:
    """Bytes of one layer's cache holding ``tokens`` tokens (LayerCache.memory()["total"]);
    ``tokens`` 0: the bytes of one more token (the paper's accounting, no fixed costs)."""
    values = elem * dk if bits >= 16 else dk * bits // 8 + 4 * (dk // group)
    if tokens == 0:
        return elem * rank + values + 4
    # as LayerCache.memory() counts them: a short sequence's sinks and recent tokens overlap
    exact = (min(tokens, n_sink) + min(tokens, n_recent)) * 2 * dk * elem
    return tokens * (elem * rank + values + 4) + exact + 4 * dk * rank


def _value_formats(head_dim: int) -> list[tuple[int, int]]:
    """Value formats from cheapest to exact: (bits, group), the group the largest divisor of
    head_dim up to 128 (whole bytes per group for every bit width)."""
    group = max(g for g in (8, 16, 32, 64, 128) if head_dim % g == 0) if head_dim % 8 == 0 \
        else None
    if group is None:
        return [(16, 32)]
    return [(2, group), (4, group), (8, group), (16, group)]


def plan(calibration: Calibration, layers, kv_fraction: float,
         kv_context: int = DEFAULT_CONTEXT, n_sink: int = 16, n_recent: int = 64,
         dtype: str = "float16") -> list[LayerPlan]:
    """Per-layer settings for ``layers`` (``[(index, n_head_kv, head_dim)]``, the
    full-attention layers) meeting ``kv_fraction`` of dense fp16 K+V at ``kv_context`` tokens
    (module docstring)."""
    kv_fraction = float(kv_fraction)
    if not 0 < kv_fraction <= 1:
        raise InvalidArgumentError(f"kv_fraction: expected (0, 1], got {kv_fraction}")
    kv_context = int(kv_context)
    if kv_context < 0:
        raise InvalidArgumentError(f"kv_context: expected >= 0, got {kv_context}")
    elem = 4 if dtype == "float32" else 2
    window = int(n_sink) + int(n_recent)
    state = []
    for index, n_head_kv, head_dim in layers:
        dk = n_head_kv * head_dim
        if index >= len(calibration.layers):
            raise CalibrationError(f"calibration: has no layer {index}")
        cal = calibration.layers[index]
        if cal.dk != dk:
            raise CalibrationError(f"calibration: layer {index} has Dk={cal.dk}, the model {dk}")
        eig = cal.eigenvalues
        total = float(eig.sum()) or 1.0
        cumulative = [0.0]
        for x in eig:
            cumulative.append(cumulative[-1] + float(x) / total)
        formats = _value_formats(head_dim)
        step = max(1, dk // RANK_STEPS)
        rank = min(cal.rank, max(1, round(dk * MIN_RANK_FRAC)))
        state.append({"index": index, "dk": dk, "max_rank": cal.rank, "cum": cumulative,
                      "formats": formats, "fmt": 0, "rank": rank, "step": step})

    def cost(s, rank=None, fmt=None) -> int:
        bits, group = s["formats"][s["fmt"] if fmt is None else fmt]
        return layer_bytes(s["dk"], s["rank"] if rank is None else rank, bits, group,
                           kv_context, n_sink, n_recent, elem)

    per_seq = max(1, kv_context)  # kv_context 0: bytes per token
    dense = sum(4 * s["dk"] * per_seq for s in state)
    budget = kv_fraction * dense
    spent = sum(cost(s) for s in state)
    if spent > budget:
        raise InvalidArgumentError(
            f"kv_fraction: {kv_fraction:g} is below what this model can reach at "
            f"{kv_context} tokens: {spent / dense:.4f} of dense fp16 K+V (rank "
            f"{MIN_RANK_FRAC:g}*Dk, 2-bit values, {window} exact tokens and the projection; "
            f"the exact windows alone cost "
            f"{min(kv_context, window) * 2 * elem / (4 * per_seq):.4f})")
    while True:
        # the best step may not fit while a cheaper one still does: take the best that fits
        candidates = []
        for s in state:
            here = cost(s)
            rank_up = min(s["max_rank"], s["rank"] + s["step"])
            if rank_up > s["rank"]:
                extra = cost(s, rank=rank_up) - here
                gain = s["cum"][rank_up] - s["cum"][s["rank"]]
                candidates.append((gain / extra, -s["index"], s, "rank", rank_up, extra))
            if s["fmt"] + 1 < len(s["formats"]):
                extra = cost(s, fmt=s["fmt"] + 1) - here
                gain = VALUE_WEIGHT * (value_error(*s["formats"][s["fmt"]])
                                       - value_error(*s["formats"][s["fmt"] + 1]))
                candidates.append((gain / extra, -s["index"], s, "fmt", s["fmt"] + 1, extra))
        fitting = [c for c in candidates if spent + c[5] <= budget and c[0] > 0]
        if not fitting:
            break
        _, _, s, kind, value, extra = max(fitting, key=lambda c: (c[0], c[1]))
        s[kind] = value
        spent += extra

    plans = []
    for s in state:
        rank, cum = s["rank"], s["cum"]
        score = max(1, rank // 2)
        while score < rank and cum[score] < SCORE_ENERGY * cum[rank]:
            score += 1
        bits, group = s["formats"][s["fmt"]]
        plans.append(LayerPlan(index=s["index"], dk=s["dk"], rank=rank, score_rank=score,
                               value_bits=bits, value_group=group, bytes=cost(s),
                               dense_fp16=4 * s["dk"] * per_seq, key_energy=cum[rank]))
    return plans


def layer_overrides(info, calibration: Calibration | None, overrides: dict) -> dict[int, dict]:
    """What ``patch(..., preset="auto")`` applies per layer: ``{layer: Config fields}``.
    Pops ``kv_fraction`` and ``kv_context`` from ``overrides`` (the other fields are the
    caller's ``sals.Config`` overrides, shared by every layer)."""
    if calibration is None:
        raise CalibrationError(
            "calibration: preset 'auto' chooses ranks from the calibration's eigenvalues; "
            "pass calibration=... (python -m sals calibrate --rank-frac 1.0 keeps every "
            "direction)")
    if "kv_fraction" not in overrides:
        raise InvalidArgumentError("kv_fraction: preset 'auto' needs kv_fraction=... "
                                   "(the fraction of dense fp16 K+V to keep, e.g. 0.156)")
    fraction = overrides.pop("kv_fraction")
    context = overrides.pop("kv_context", DEFAULT_CONTEXT)
    chosen = {"rank", "score_rank", "value_bits", "value_group"} & set(overrides)
    if chosen:
        raise InvalidArgumentError(
            f"{min(chosen)}: chosen per layer by preset 'auto'; drop it or use another "
            f"preset")
    full = [(layer.index, layer.n_head_kv, layer.head_dim) for layer in info.layers
            if not layer.sliding]
    plans = plan(calibration, full, fraction, context, n_sink=overrides.get("n_sink", 16),
                 n_recent=overrides.get("n_recent", 64),
                 dtype=overrides.get("dtype", "float16"))
    return {p.index: p.overrides() for p in plans}
