"""Stateless SALS stages on caller tensors (experiments, framework-managed memory).

Every function takes DLPack tensors (numpy, torch, ...) on one device, writes ``out`` when
given, and otherwise returns a new tensor in the framework of its first argument. CUDA work
runs on the current torch stream of the inputs (or ``stream=``). Arguments are validated by the
C library; errors name the argument. NaN or infinity in what a function reads of a CPU input
raises NotFiniteError naming the argument and row; CUDA inputs are not checked. Scalar
arguments must be of their kind (ints are ``int`` or numpy integers, never floats or bools);
``out`` must be a tensor (a list would be a temporary copy, and the result lost).
"""

from __future__ import annotations

from . import _C, _args
from . import _tensors as _t
from .config import Rope
from .errors import InvalidArgumentError


def _dims(t: _t.Tensor, name: str, n: int, layout: str) -> tuple:
    if len(t.shape) != n:
        raise InvalidArgumentError(f"{name}: expected {n} dims {layout}, got {len(t.shape)}")
    return t.shape


def _rope(rope) -> tuple:
    if not isinstance(rope, Rope):
        raise InvalidArgumentError(f"rope: expected sals.Rope, got {type(rope).__name__}")
    return rope._to_c()


def _pick(stream, primary: _t.Tensor):
    return stream if stream is not None else _t.stream(primary)


def _out(out, like: _t.Tensor, shape, dtype: str):
    return _t.empty(like, shape, dtype) if out is None else out


def _stream(stream):
    """An explicit stream: an int (a cudaStream_t) or None."""
    if stream is None:
        return None
    return _args.integer(stream, "stream", 0, 2**64 - 1)


def project(x, proj, out=None, stream=None):
    """``out[n] = x[n] @ proj``. x: ``[N, Dk]``, proj: ``[Dk, R]`` -> ``[N, R]`` (x's dtype)."""
    xt, pt = _t.tensor(x, "x"), _t.tensor(proj, "proj")
    stream = _stream(stream)
    if out is None:
        n = _dims(xt, "x", 2, "[N, Dk]")[0]
        r = _dims(pt, "proj", 2, "[Dk, R]")[1]
        out = _t.empty(xt, (n, r), xt.dtype)
    _C.project(xt.obj, pt.obj, _t.output(out, "out").obj, _pick(stream, xt))
    return out


def rope_apply(x, pos, rope: Rope, out=None, stream=None):
    """Rotate ``x`` at ``pos``. x: ``[N, H, head_dim]``, pos: ``[N]`` int32 -> like x.
    ``out`` may be ``x`` itself (in place)."""
    xt = _t.tensor(x, "x")
    pt = _t.index(pos, "pos", xt)
    rope_c = _rope(rope)
    stream = _stream(stream)
    out = _out(out, xt, xt.shape, xt.dtype)
    _C.rope_apply(xt.obj, pt.obj, rope_c, _t.output(out, "out").obj, _pick(stream, xt))
    return out


def rebuild_rope(k_lat, proj, pos, rope: Rope, head_dim: int | None = None, out=None,
                 stream=None):
    """Rebuild keys from latents and rotate each at its own position:
    ``out[n] = RoPE(reshape(proj @ k_lat[n], [H, head_dim]), pos[n])``.

    k_lat: ``[N, R]``, proj: ``[H * head_dim, R]``, pos: ``[N]`` int32 ->
    ``[N, H, head_dim]`` (k_lat's dtype). ``head_dim`` None means ``rope.rotary_dim``.
    """
    kt, pt = _t.tensor(k_lat, "k_lat"), _t.tensor(proj, "proj")
    post = _t.index(pos, "pos", kt)
    rope_c = _rope(rope)
    stream = _stream(stream)
    head_dim = _args.optional_integer(head_dim, "head_dim")
    if out is None:
        d = rope_c[1] if head_dim is None else head_dim
        if d <= 0:
            raise InvalidArgumentError(
                "head_dim: required when rope has no rotary dims" if head_dim is None
                else f"head_dim: {d} must be >= 1")
        n = _dims(kt, "k_lat", 2, "[N, R]")[0]
        dk = _dims(pt, "proj", 2, "[H * head_dim, R]")[0]
        if dk % d:
            raise InvalidArgumentError(f"proj: {dk} rows are not a multiple of head_dim {d}")
        out = _t.empty(kt, (n, dk // d, d), kt.dtype)
    _C.rebuild_rope(kt.obj, pt.obj, post.obj, rope_c, _t.output(out, "out").obj,
                    _pick(stream, kt))
    return out


def score_select(q_lat, k_lat, score_rank: int, budget: int, n_sink: int = 0, n_recent: int = 0,
                 lengths=None, out=None, stream=None):
    """Indices of the ``budget`` best-scoring candidates per sequence and selection head.

    Scores ``s[j] = q_lat[b, h, :score_rank] . k_lat[b, j, :score_rank]`` over candidates
    ``j in [n_sink, length_b - n_recent)``. q_lat: ``[B, H, R]``, k_lat: ``[B, S, R']``,
    lengths: ``[B]`` int32 or None (= S) -> int32 ``[B, H, budget]`` (any order within a row;
    -1 where a sequence has fewer candidates). ``budget`` in ``1 .. S - n_sink - n_recent``.
    """
    qt, kt = _t.tensor(q_lat, "q_lat"), _t.tensor(k_lat, "k_lat")
    lt = None if lengths is None else _t.index(lengths, "lengths", qt)
    score_rank = _args.integer(score_rank, "score_rank")
    budget = _args.integer(budget, "budget")
    n_sink = _args.integer(n_sink, "n_sink")
    n_recent = _args.integer(n_recent, "n_recent")
    stream = _stream(stream)
    if out is None:
        b, h, _ = _dims(qt, "q_lat", 3, "[B, H, R]")
        s = _dims(kt, "k_lat", 3, "[B, S, R']")[1]
        cand = s - max(n_sink, 0) - max(n_recent, 0)
        if not 1 <= budget <= cand:  # before allocating [B, H, budget]
            raise InvalidArgumentError(
                f"budget: {budget} not in 1..{cand} (S - n_sink - n_recent candidates)")
        out = _t.empty(qt, (b, h, budget), "int32")
    _C.score_select(qt.obj, kt.obj, None if lt is None else lt.obj, score_rank, n_sink, n_recent,
                    budget, _t.output(out, "out").obj, _pick(stream, qt))
    return out


def sparse_attention(q, k, v, idx=None, lengths=None, scale: float | None = None, out=None,
                     stream=None):
    """Exact softmax attention of one query per sequence over a subset of tokens.

    q: ``[B, Hq, d]`` (rotated), k, v: ``[B, S, Hkv, d]`` (k rotated), idx: ``[B, H, N]`` int32
    with H = 1 (shared) or Hkv, -1 entries ignored, None = tokens ``0 .. length_b - 1``;
    lengths: ``[B]`` int32 or None (= S); scale None = ``1/sqrt(d)`` -> ``[B, Hq, d]``
    (q's dtype). A sequence with nothing to attend gets a zero row. A token may appear once per
    idx row: a repeat raises InvalidArgumentError on the CPU (CUDA does not check it).
    """
    qt, kt, vt = _t.tensor(q, "q"), _t.tensor(k, "k"), _t.tensor(v, "v")
    it = None if idx is None else _t.index(idx, "idx", qt)
    lt = None if lengths is None else _t.index(lengths, "lengths", qt)
    scale = _args.optional_real(scale, "scale")
    stream = _stream(stream)
    if out is None:
        _dims(qt, "q", 3, "[B, Hq, d]")
        out = _t.empty(qt, qt.shape, qt.dtype)
    _C.sparse_attention(qt.obj, kt.obj, vt.obj, None if it is None else it.obj,
                        None if lt is None else lt.obj, 0.0 if scale is None else scale,
                        _t.output(out, "out").obj, _pick(stream, qt))
    return out


def quantize_values(v, bits: int, group: int = 32, stream=None):
    """Asymmetric group quantisation of rows (KIVI style), groups along the channel axis.

    v: ``[N, D]`` float -> ``(packed uint8 [N, D * bits / 8], scale float16 [N, D / group],
    zero float16 [N, D / group])`` with ``x ~ zero + code * scale``, codes packed little-endian
    (first channel in the low bits). bits in {2, 4, 8}; group divides D. On the CPU, a group
    whose float16 scale or zero would be infinite (values beyond float16's range) raises
    NotFiniteError naming v.
    """
    vt = _t.tensor(v, "v")
    n, d = _dims(vt, "v", 2, "[N, D]")
    bits, group = _args.integer(bits, "bits"), _args.integer(group, "group")
    stream = _stream(stream)
    if bits not in (2, 4, 8):
        raise InvalidArgumentError(f"bits: expected 2, 4 or 8, got {bits}")
    if group <= 0 or d % group:
        raise InvalidArgumentError(f"group: must divide D = {d} (v.shape[1]), got {group}")
    packed = _t.empty(vt, (n, d * bits // 8), "uint8")
    scale = _t.empty(vt, (n, d // group), "float16")
    zero = _t.empty(vt, (n, d // group), "float16")
    _C.quantize_values(vt.obj, bits, group, _t.tensor(packed, "packed").obj,
                       _t.tensor(scale, "scale").obj, _t.tensor(zero, "zero").obj,
                       _pick(stream, vt))
    return packed, scale, zero


def dequantize_values(packed, scale, zero, bits: int, group: int = 32, dtype: str = "float32",
                      out=None, stream=None):
    """Inverse of quantize_values: ``out[n, c] = zero + code * scale``.

    packed: ``[N, D * bits / 8]`` uint8, scale, zero: ``[N, D / group]`` float16 ->
    ``[N, D]`` of ``dtype`` ("float32", "float16" or "bfloat16").
    """
    pt = _t.tensor(packed, "packed")
    st, zt = _t.tensor(scale, "scale"), _t.tensor(zero, "zero")
    bits, group = _args.integer(bits, "bits"), _args.integer(group, "group")
    stream = _stream(stream)
    if out is None:
        dtype = _args.choice(dtype, "dtype", ("float32", "float16", "bfloat16"))
        n, w = _dims(pt, "packed", 2, "[N, D * bits / 8]")
        if bits not in (2, 4, 8):
            raise InvalidArgumentError(f"bits: expected 2, 4 or 8, got {bits}")
        d = w * 8 // bits
        if group <= 0 or d % group:  # the output is sized from packed: name it, not out
            raise InvalidArgumentError(
                f"group: must divide D = {d} (packed.shape[1] * 8 / bits), got {group}")
        for t, tn in ((st, "scale"), (zt, "zero")):
            if len(t.shape) == 2 and t.shape[0] != n:
                raise InvalidArgumentError(
                    f"{tn}: dim 0 is {t.shape[0]}, expected {n} (packed.shape[0])")
        out = _t.empty(pt, (n, d), dtype)
    _C.dequantize_values(pt.obj, st.obj, zt.obj, bits, group, _t.output(out, "out").obj,
                         _pick(stream, pt))
    return out
