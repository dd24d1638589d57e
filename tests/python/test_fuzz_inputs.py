"""Property-based bad input for every public function and method.

Each test builds a valid call with small random sizes (zero included), then breaks up to two
of its arguments with a random mutation: a wrong dtype, ndim or shape, a non-contiguous last
dimension, NaN or infinity, aliasing or overlapping outputs, Python junk, and DLPack producers
that lie (ndim, NULL shape, device, lanes, misaligned byte_offset, 2^50 elements) or fail.
Some mutations keep the call valid (other strides, float16, torch, lists of ints, an honest
generic producer). The property: a valid call returns the right answer (a float64 numpy
reference), an invalid one raises one of sals's own errors whose message names a broken
argument. Nothing else: no other exception, no crash.

Examples per test: SALS_FUZZ_EXAMPLES (default 100; the suite runs in well under a minute on
two cores). Runs are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import sals
from hypothesis import given
from hypothesis import strategies as st
from fuzz import FUZZ
from lying import NULL, Lying, Raises, Returns
from reference import attention, dequantize, rope

try:
    import torch
except ImportError:  # torch is optional: its mutations are skipped
    torch = None



# ---- mutations ----------------------------------------------------------------------------

class Arg:
    """A valid argument value and its role: "in" (float input), "index" (int32 input), "out"
    (a float output or None), "idx_out" (an int32 output or None), "scalar" (never mutated).
    `fixed`: the axes whose extent other arguments pin down (a changed extent there must fail);
    `like`: (shape, dtype) of an output; `extra`: the input an output may try to alias."""

    def __init__(self, value, role, like=None, extra=(), fixed=(), optional=False):
        self.value, self.role, self.like, self.extra = value, role, like, tuple(extra)
        self.fixed, self.optional = tuple(fixed), optional


IN_MUTATIONS = ["ok_padded_rows", "ok_f16", "ok_torch", "ok_generic", "ok_broadcast",
                "bad_f64", "bad_int", "bad_complex", "bad_ndim_plus", "bad_ndim_minus",
                "bad_shape", "bad_last_stride", "bad_nan", "bad_inf", "bad_none", "bad_str",
                "bad_strings", "bad_ragged", "lie_ndim", "lie_shape_null", "lie_cuda",
                "lie_lanes", "lie_misaligned", "lie_huge", "lie_returns", "lie_raises",
                "lie_device"]
INDEX_MUTATIONS = ["ok_list", "ok_int64", "ok_torch", "bad_float", "bad_bool", "bad_range",
                   "bad_ndim_plus", "bad_shape", "bad_none", "lie_shape_null", "lie_ndim",
                   "lie_misaligned", "lie_raises"]
OUT_MUTATIONS = ["ok_given", "ok_f16", "ok_padded_rows", "ok_generic", "bad_list",
                 "bad_readonly", "bad_shape", "bad_dtype", "bad_overlap", "bad_alias",
                 "bad_str", "lie_shape_null", "lie_ndim", "lie_returns"]


def padded_rows(x):
    """The same values with rows (dim 0) further apart: valid anywhere but a 1-D last dim."""
    if x.ndim == 0:
        return x, True
    big = np.zeros((x.shape[0] * 2,) + x.shape[1:], x.dtype)
    big[::2] = x
    view = big[::2]
    ok = x.ndim > 1 or x.shape[0] <= 1
    return view, ok


def mutate(arg: Arg, kind: str, draw, inputs: dict):
    """(value, ok) for `arg` mutated by `kind`; ok is False when the call must fail."""
    x = arg.value
    role = arg.role
    if role in ("out", "idx_out"):
        return mutate_out(arg, kind, inputs)
    if kind == "ok_padded_rows":
        return padded_rows(x)
    if kind == "ok_f16":
        return x.astype(np.float16), True
    if kind == "ok_torch":
        return (torch.from_numpy(np.ascontiguousarray(x)), True) if torch is not None else (x, True)
    if kind == "ok_generic":
        return Lying(np.ascontiguousarray(x)), True
    if kind == "ok_broadcast":
        if x.ndim == 0 or x.shape[0] == 0:
            return x, True
        row = x[:1]
        return np.broadcast_to(row, x.shape), True  # read-only zero-stride input: fine
    if kind == "ok_list":  # an empty list loses the shape of an empty array: then refused
        return x.tolist(), np.asarray(x.tolist()).shape == x.shape
    if kind == "ok_int64":
        return x.astype(np.int64), True
    if kind == "bad_f64":
        return x.astype(np.float64), False
    if kind == "bad_int":
        return (x * 3).astype(np.int32), False
    if kind == "bad_complex":
        return x.astype(np.complex64), False
    if kind == "bad_float":
        return x.astype(np.float32) + 0.5, False
    if kind == "bad_bool":
        return (x > 0).tolist() if x.size else [[True]], False
    if kind == "bad_range":
        big = x.astype(np.int64).copy()
        if big.size == 0:
            return np.array([2**40]), False
        big.flat[draw(st.integers(0, big.size - 1))] = 2**40
        return big, False
    if kind == "bad_ndim_plus":
        return x[None], False
    if kind == "bad_ndim_minus":
        return x.reshape(-1)[:1].reshape(()) if x.ndim == 1 else x.reshape(-1), False
    if kind == "bad_shape":
        if not arg.fixed:
            return x, True
        axis = draw(st.sampled_from(arg.fixed))
        shape = list(x.shape)
        shape[axis] += 1
        fill = -5 if role == "index" and x.dtype.kind == "i" else 0  # -5: no index, no position
        return np.full(shape, fill, x.dtype), False
    if kind == "bad_last_stride":
        if x.ndim == 0 or x.shape[-1] < 2 or x.size == 0:
            return x, True
        return np.repeat(x, 2, axis=-1)[..., ::2], False
    if kind in ("bad_nan", "bad_inf"):
        if x.size == 0:
            return x, True
        y = x.copy()
        y.flat[draw(st.integers(0, y.size - 1))] = np.nan if kind == "bad_nan" else -np.inf
        return y, False
    if kind == "bad_none":
        return None, arg.optional
    if kind == "bad_str":
        return "tensor", False
    if kind == "bad_strings":
        return [["a", "b"]], False
    if kind == "bad_ragged":
        return [[1.0], [2.0, 3.0]], False
    return lie(x, kind), False


def lie(x, kind):
    base = np.ascontiguousarray(x)
    if kind == "lie_ndim":
        return Lying(base, ndim=-1 if base.ndim % 2 else 70)
    if kind == "lie_shape_null":
        return Lying(base, shape=NULL) if base.ndim else Lying(base, ndim=2, shape=NULL)
    if kind == "lie_cuda":
        return Lying(base, device=(2, 0))
    if kind == "lie_lanes":
        code, bits, _ = Lying(base).dtype
        return Lying(base, dtype=(code, bits, 4))
    if kind == "lie_misaligned":
        if base.itemsize == 1:  # every offset is aligned for bytes: lie about lanes instead
            return lie(x, "lie_lanes")
        if base.size == 0:  # an element to misalign
            shape = tuple(max(n, 1) for n in base.shape)
            return Lying(np.zeros(int(np.prod(shape)) + 1, base.dtype), shape=shape,
                         strides=None, byte_offset=1)
        return Lying(base, byte_offset=1)
    if kind == "lie_huge":
        return Lying(base, shape=(2**50,) + base.shape[1:] if base.ndim else (2**50,),
                     strides=None)
    if kind == "lie_returns":
        return Returns(42)
    if kind == "lie_raises":
        return Raises(ValueError("refused"))
    if kind == "lie_device":
        return Returns(None, device="gpu")
    raise AssertionError(kind)


def mutate_out(arg: Arg, kind: str, inputs: dict):
    shape, dtype = arg.like
    if kind == "ok_given" or (kind == "bad_alias" and not arg.extra):
        return np.full(shape, 7, dtype), True
    if kind == "ok_f16":
        return (np.full(shape, 7, np.float16), True) if dtype == np.float32 else (
            np.full(shape, 7, dtype), True)
    if kind == "ok_padded_rows":
        view, ok = padded_rows(np.full(shape, 7, dtype))
        return view, ok
    if kind == "ok_generic":
        return Lying(np.full(shape, 7, dtype)), True
    if kind == "bad_list":
        return np.zeros(shape, dtype).tolist(), False
    if kind == "bad_readonly":
        a = np.zeros(shape, dtype)
        a.flags.writeable = False
        return a, False
    if kind == "bad_shape":
        s = list(shape)
        s[-1] += 1
        return np.zeros(s, dtype), False
    if kind == "bad_dtype":
        return np.zeros(shape, np.float32 if dtype == np.int32 else np.int32), False
    if kind == "bad_overlap":
        axis = next((i for i in range(len(shape) - 1) if shape[i] > 1), None)
        if axis is None or 0 in shape:  # no two elements to share memory
            return np.zeros(shape, dtype).tolist(), False
        buf = np.zeros(shape, dtype)
        strides = list(buf.strides)
        strides[axis] = 0
        return np.lib.stride_tricks.as_strided(buf, shape, strides, writeable=True), False
    if kind == "bad_alias":
        name = arg.extra[0]
        src = inputs[name]
        if not isinstance(src, np.ndarray) or src.shape != tuple(shape) or src.dtype != dtype \
                or src.size == 0 or not src.flags.writeable:
            return np.zeros(shape, dtype).tolist(), False
        return src, False
    if kind == "bad_str":
        return "out", False
    a = np.zeros(shape, dtype)
    return lie(a, kind), False


def pick_mutations(draw, args: dict):
    """{name: kind} for up to two arguments (none a fifth of the time). Two changed shapes
    could agree again: the second one becomes a wrong dtype instead."""
    names = [n for n, a in args.items() if a.role != "scalar"]
    count = min(draw(st.sampled_from([0, 1, 1, 1, 2])), len(names))
    chosen = draw(st.lists(st.sampled_from(names), min_size=count, max_size=count, unique=True))
    kinds = {}
    for n in chosen:
        role = args[n].role
        pool = {"in": IN_MUTATIONS, "index": INDEX_MUTATIONS}.get(role, OUT_MUTATIONS)
        kind = draw(st.sampled_from(pool))
        if kind == "bad_shape" and "bad_shape" in kinds.values():
            kind = {"in": "bad_f64", "index": "bad_float"}.get(role, "bad_dtype")
        kinds[n] = kind
    return kinds


def prepare(draw, args: dict, reads=True):
    """Mutated argument values, and the names of the broken ones. reads=False: the call has an
    empty output and reads no input (sals.h), so NaN or infinity in one is no error."""
    kinds = pick_mutations(draw, args)
    values, bad = {}, []
    for name, a in args.items():
        if name in kinds and a.role not in ("out", "idx_out"):
            values[name], ok = mutate(a, kinds[name], draw, values)
            ok = ok or (not reads and kinds[name] in ("bad_nan", "bad_inf"))
            if not ok:
                bad.append(name)
        else:
            values[name] = a.value
    for name, a in args.items():  # outputs last: they may alias a (mutated) input
        if name in kinds and a.role in ("out", "idx_out"):
            values[name], ok = mutate(a, kinds[name], draw, values)
            if not ok:
                bad.append(name)
    return values, bad, kinds


def expect_error(call, bad, kinds):
    with pytest.raises(sals.SalsError) as e:
        call()
    msg = str(e.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in bad), \
        f"error does not name any of {bad} ({kinds}): {type(e.value).__name__}: {msg}"


def host(x) -> np.ndarray:
    """float64 numpy values of an argument or a result (numpy, torch, Lying, _C.Array, list)."""
    if isinstance(x, Lying):
        x = x.base
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().float().numpy().astype(np.float64)
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        x = np.from_dlpack(x)
    return np.asarray(x, dtype=np.float64)


def close(got, want, rel=None):
    """got (any framework) equals the float64 reference within the rounding of its dtype."""
    dt = str(getattr(got.base if isinstance(got, Lying) else got, "dtype", "float32"))
    got = host(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    if rel is None:
        rel = 2e-3 if "16" in dt else 1e-4
    scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= rel * scale, f"max error {err:.3g} > {rel * scale:.3g}"


def f32(draw, *shape, lo=-2.0, hi=2.0):
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def orthonormal(draw, rows, cols):
    seed = draw(st.integers(0, 2**16))
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, rows)))
    return np.ascontiguousarray(q[:, :cols]).astype(np.float32)


SIZES = st.sampled_from([0, 1, 2, 3, 5])


# ---- stateless stages ---------------------------------------------------------------------

@FUZZ
@given(st.data())
def test_project(data):
    n, dk, r = data.draw(SIZES), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 5))
    args = {"x": Arg(f32(data.draw, n, dk), "in", fixed=(1,)),
            "proj": Arg(f32(data.draw, dk, r), "in", fixed=(0,)),
            "out": Arg(None, "out", like=((n, r), np.float32), extra=("x",))}
    values, bad, kinds = prepare(data.draw, args, reads=n > 0)
    call = lambda: sals.project(**values)
    if bad:
        return expect_error(call, bad, kinds)
    got = call()
    close(got, host(values["x"]) @ host(values["proj"]))
    if values["out"] is not None:
        assert got is values["out"]


@FUZZ
@given(st.data())
def test_rope_apply(data):
    n, h, d = data.draw(SIZES), data.draw(st.integers(1, 3)), 2 * data.draw(st.integers(1, 4))
    r = sals.Rope.default(d, interleaved=data.draw(st.booleans()))
    pos = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, 50, n).astype(np.int32)
    args = {"x": Arg(f32(data.draw, n, h, d), "in", fixed=(0,)),
            "pos": Arg(pos, "index", fixed=(0,)),
            "out": Arg(None, "out", like=((n, h, d), np.float32))}
    values, bad, kinds = prepare(data.draw, args)
    in_place = not bad and data.draw(st.booleans()) and isinstance(values["x"], np.ndarray) \
        and values["x"].dtype == np.float32 and values["x"].flags.writeable
    if in_place:
        values["out"] = values["x"]
    call = lambda: sals.rope_apply(rope=r, **values)
    if bad:
        return expect_error(call, bad, kinds)
    x64, p64 = host(values["x"]), np.asarray(host(values["pos"]), np.int64)
    want = rope(x64, p64, r.inv_freq, interleaved=r.interleaved)
    close(call(), want)


@FUZZ
@given(st.data())
def test_rebuild_rope(data):
    n, h, d, r = data.draw(SIZES), data.draw(st.integers(1, 2)), 2 * data.draw(st.integers(1, 3)), \
        data.draw(st.integers(1, 4))
    rp = sals.Rope.default(d)
    pos = np.arange(n, dtype=np.int32) * 3
    args = {"k_lat": Arg(f32(data.draw, n, r), "in", fixed=(0, 1)),
            "proj": Arg(f32(data.draw, h * d, r), "in", fixed=(0, 1)),
            "pos": Arg(pos, "index", fixed=(0,)),
            "out": Arg(None, "out", like=((n, h, d), np.float32))}
    values, bad, kinds = prepare(data.draw, args, reads=n > 0)
    call = lambda: sals.rebuild_rope(rope=rp, **values)
    if bad:
        return expect_error(call, bad, kinds)
    keys = (host(values["k_lat"]) @ host(values["proj"]).T).reshape(n, h, d)
    close(call(), rope(keys, np.asarray(host(values["pos"]), np.int64), rp.inv_freq))


@FUZZ
@given(st.data())
def test_score_select(data):
    b, h, s, r = data.draw(SIZES), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 12)), \
        data.draw(st.integers(1, 4))
    budget = data.draw(st.integers(1, s))
    args = {"q_lat": Arg(f32(data.draw, b, h, r), "in", fixed=(0,)),
            "k_lat": Arg(f32(data.draw, b, s, r), "in", fixed=(0,)),
            "out": Arg(None, "idx_out", like=((b, h, budget), np.int32))}
    values, bad, kinds = prepare(data.draw, args)
    call = lambda: sals.score_select(score_rank=r, budget=budget, **values)
    if bad:
        return expect_error(call, bad, kinds)
    idx = host(call()).astype(np.int64)
    scores = np.einsum("bhr,bsr->bhs", host(values["q_lat"])[..., :r],
                       host(values["k_lat"])[..., :r])
    for bi in range(b):
        for hi in range(h):
            chosen = set(idx[bi, hi].tolist())
            assert len(chosen) == budget and chosen <= set(range(s)), chosen
            row = scores[bi, hi]
            rest = [row[j] for j in range(s) if j not in chosen]
            tol = 1e-4 * max(1.0, np.abs(row).max())
            assert not rest or min(row[j] for j in chosen) >= max(rest) - tol


@FUZZ
@given(st.data())
def test_sparse_attention(data):
    b, hkv, g, s, d = data.draw(SIZES), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), \
        data.draw(st.integers(0, 6)), data.draw(st.integers(1, 8))
    args = {"q": Arg(f32(data.draw, b, hkv * g, d), "in", fixed=(0, 2)),
            "k": Arg(f32(data.draw, b, s, hkv, d), "in", fixed=(0, 1, 2, 3)),
            "v": Arg(f32(data.draw, b, s, hkv, d), "in", fixed=(0, 1, 2, 3)),
            "out": Arg(None, "out", like=((b, hkv * g, d), np.float32), extra=("q",))}
    use_idx = s > 0 and data.draw(st.booleans())
    if use_idx:
        n = data.draw(st.integers(1, s + 1))
        rng = np.random.default_rng(data.draw(st.integers(0, 99)))
        idx = np.full((b, 1, n), -1, np.int32)
        for bi in range(b):
            pick = rng.permutation(s)[: data.draw(st.integers(0, min(n, s)))]
            idx[bi, 0, : pick.size] = pick
        args["idx"] = Arg(idx, "index", fixed=(0,), optional=True)
    values, bad, kinds = prepare(data.draw, args)
    use_idx = use_idx and values["idx"] is not None
    if use_idx and not bad and b and data.draw(st.booleans()):
        row = values["idx"] if isinstance(values["idx"], np.ndarray) else None
        if row is not None and row.dtype == np.int32 and row.shape[2] >= 2 and row[0, 0, 0] >= 0:
            row = row.copy()
            row[0, 0, 1] = row[0, 0, 0]  # a repeated token
            values["idx"] = row
            bad = ["idx"]
        elif row is not None and row.dtype == np.int32 and row.size:
            row = row.copy()
            row[0, 0, 0] = s  # past the sequence
            values["idx"] = row
            bad = ["idx"]
    call = lambda: sals.sparse_attention(**values)
    if bad:
        if use_idx and {"k", "v"} & set(bad) and kinds.get("k", kinds.get("v", "")).startswith(
                ("bad_nan", "bad_inf")):
            return None  # a NaN in a token idx does not name is not read: no promise
        return expect_error(call, bad, kinds)
    got = call()
    q, k, v = host(values["q"]), host(values["k"]), host(values["v"])
    want = np.zeros(q.shape)
    for bi in range(b):
        toks = np.arange(s) if not use_idx else np.asarray(
            [t for t in host(values["idx"])[bi, 0].astype(np.int64) if t >= 0], np.int64)
        want[bi] = attention(q[bi], k[bi, toks], v[bi, toks], 1 / math.sqrt(d))
    close(got, want)


def unpack(packed, bits, d):
    p = host(packed).astype(np.uint16)
    per = 8 // bits
    codes = np.stack([(p >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1)
    return codes.reshape(p.shape[0], d)


@FUZZ
@given(st.data())
def test_quantize_and_dequantize(data):
    n, bits, group = data.draw(SIZES), data.draw(st.sampled_from([2, 4, 8])), data.draw(
        st.sampled_from([8, 16]))
    d = group * data.draw(st.integers(1, 3))
    vals = f32(data.draw, n, d, lo=-50, hi=50)
    big = data.draw(st.booleans()) and n > 0
    if big:
        vals[0, 0] = 3e7  # finite, but its float16 scale (> 3e7 / 255) is not
    values, bad, kinds = prepare(data.draw, {"v": Arg(vals, "in", fixed=(1,))})
    if big and "v" not in bad:
        bad = ["v"]  # every valid variant keeps the 3e7 (or makes it inf in float16)
    call = lambda: sals.quantize_values(bits=bits, group=group, **values)
    if bad:
        return expect_error(call, bad, kinds)
    packed, scale, zero = call()
    v64 = host(values["v"])
    codes = unpack(packed, bits, d)
    recon = dequantize(codes, host(scale), host(zero), group)
    err = np.abs(recon - v64)
    tol = np.repeat(host(scale), group, axis=1) / 2 * (1 + 1e-3) + 1e-6
    assert np.all(err <= tol)
    # dequantize what came back, with broken arguments of its own
    args = {"packed": Arg(host(packed).astype(np.uint8), "index", fixed=(0, 1)),
            "scale": Arg(host(scale).astype(np.float16), "in", fixed=(0, 1)),
            "zero": Arg(host(zero).astype(np.float16), "in", fixed=(0, 1)),
            "out": Arg(None, "out", like=((n, d), np.float32))}
    values, bad, kinds = prepare(data.draw, args)
    if kinds.get("packed") in ("ok_int64", "ok_list"):
        bad.append("packed")  # packed must be uint8: int64 (or a list, which becomes int64) fails
    call = lambda: sals.dequantize_values(bits=bits, group=group, **values)
    if bad:
        return expect_error(call, bad, kinds)
    close(call(), recon, rel=1e-3)


# ---- the cache ----------------------------------------------------------------------------

HQ, HKV, D = 4, 2, 8
DK = HKV * D


def cache_for(dtype="float32"):
    cfg = sals.Config.preset("dense-equivalent", HQ, HKV, D, dtype=dtype, max_tokens=16,
                             max_batch=2, n_sink=1, n_recent=2)
    return sals.LayerCache(cfg, sals.Rope.default(D), np.eye(DK, dtype=np.float32))


@FUZZ
@given(st.data())
def test_cache_append_attend(data):
    storage = data.draw(st.sampled_from(["float32", "float16"]))
    cache = cache_for(storage)
    b, t = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 4))
    k, v = f32(data.draw, b, t, HKV, D), f32(data.draw, b, t, HKV, D)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    args = {"k": Arg(k, "in", fixed=(0, 1, 2, 3)), "v": Arg(v, "in", fixed=(0, 1, 2, 3)),
            "positions": Arg(pos, "index", fixed=(0, 1))}
    values, bad, kinds = prepare(data.draw, args)
    big = storage == "float16" and not bad and b * t > 0 and data.draw(st.booleans())
    if big:  # finite float32 beyond float16: refused, since check_finite is on
        name = data.draw(st.sampled_from(["k", "v"]))
        arr = np.array(host(values[name]), np.float32)
        arr.flat[0] = 7e4
        values[name], bad = arr, [name]
    call = lambda: cache.append(**values)
    if bad:
        expect_error(call, bad, kinds)
        assert cache.lengths().tolist() == [0, 0]  # nothing stored
        k64 = v64 = np.zeros((b, 0, HKV, D))
        stored = 0
    else:
        call()
        k64, v64 = host(values["k"]), host(values["v"])
        stored = t if b else 0
        assert cache.lengths().tolist() == [stored if i < b else 0 for i in range(2)]
    qb = b if stored else data.draw(st.integers(0, 2))
    qt = data.draw(st.integers(1, 2))
    q = f32(data.draw, qb, qt, HQ, D)
    qpos = np.full((qb, qt), max(stored - 1, 0), np.int32)
    args = {"q": Arg(q, "in", fixed=(0, 1, 2, 3)), "positions": Arg(qpos, "index", fixed=(0, 1)),
            "out": Arg(None, "out", like=((qb, qt, HQ, D), np.float32), extra=("q",))}
    values, bad, kinds = prepare(data.draw, args)
    call = lambda: cache.attend(**values)
    if bad:
        return expect_error(call, bad, kinds)
    got = call()
    inv = sals.Rope.default(D).inv_freq
    q64 = host(values["q"])
    want = np.zeros(q64.shape)
    for bi in range(qb):
        if bi >= b or not stored:
            continue  # an empty sequence attends to nothing: zeros
        kr = rope(k64[bi].astype(np.float16 if storage == "float16" else np.float32)
                  .astype(np.float64), np.arange(stored), inv)
        vr = v64[bi].astype(np.float16 if storage == "float16" else np.float32).astype(np.float64)
        qr = rope(q64[bi], qpos[bi], inv)
        for ti in range(qt):
            want[bi, ti] = attention(qr[ti], kr, vr, 1 / math.sqrt(D))
    close(got, want, rel=3e-3 if storage == "float16" else None)
    idx, count = cache.selected()
    assert np.all(count >= 0) and idx.shape[0] == count.shape[0]
    mem = cache.memory()
    assert mem["total"] <= mem["allocated"]


@FUZZ
@given(st.data())
def test_cache_projection(data):
    rank = data.draw(st.integers(1, DK))
    cfg = sals.Config(HQ, HKV, D, rank=rank, dtype="float32", max_tokens=8)
    u = orthonormal(data.draw, DK, rank)
    if data.draw(st.booleans()):
        u = u * np.float32(data.draw(st.sampled_from([0.5, 1.01, 2.0])))  # not unit columns
        bad0 = ["projection"]
    else:
        bad0 = []
    values, bad, kinds = prepare(data.draw, {"projection": Arg(u, "in", fixed=(0, 1))})
    if kinds.get("projection") == "ok_broadcast" and DK > 1:
        bad = ["projection"]  # equal rows: the columns are no longer orthonormal
    bad = bad or bad0
    call = lambda: sals.LayerCache(cfg, sals.Rope.default(D), values["projection"])
    if bad:
        return expect_error(call, bad, kinds)
    with call() as cache:
        cache.append(np.ones((1, 1, HKV, D), np.float32), np.ones((1, 1, HKV, D), np.float32),
                     [[0]])
        assert cache.lengths()[0] == 1


@FUZZ
@given(st.data())
def test_cache_methods_after_close_or_with_junk(data):
    cache = cache_for()
    if data.draw(st.booleans()):
        cache.close()
        method = data.draw(st.sampled_from(["append", "attend", "lengths", "selected", "memory",
                                            "reset"]))
        call = {"append": lambda: cache.append(np.zeros((1, 1, HKV, D), np.float32),
                                               np.zeros((1, 1, HKV, D), np.float32), [[0]]),
                "attend": lambda: cache.attend(np.zeros((1, 1, HQ, D), np.float32), [[0]]),
                }.get(method, getattr(cache, method))
        with pytest.raises(sals.InvalidArgumentError, match=r"^cache: is closed"):
            call()
        return
    junk = data.draw(st.sampled_from([None, "q", 3, 2.5, [[1.0]], {}, Returns(1),
                                      Raises(TypeError("x")), Lying(np.zeros(3, np.float32),
                                                                    shape=NULL)]))
    stream = data.draw(st.sampled_from([None, "s", 1.5, -1]))
    which = data.draw(st.sampled_from(["q", "positions", "out", "stream"]))
    kwargs = {"q": np.zeros((1, 1, HQ, D), np.float32), "positions": [[0]]}
    if which == "stream":
        if stream is None:
            return
        kwargs["stream"] = stream
    else:
        kwargs[which] = junk
        if which == "out" and junk is None:
            return
    expect_error(lambda: cache.attend(**kwargs), [which], {which: repr(junk)})


# ---- Config, Rope, Calibration.load -------------------------------------------------------

def mixed_values(ints=None):
    """Values of every kind a field could be given, with ints from `ints` (default -2..70)."""
    ints = st.integers(-2, 70) if ints is None else ints
    return st.one_of(ints, ints.map(np.int64), ints.map(float), st.floats(allow_nan=True),
                     st.booleans(), st.booleans().map(np.bool_), st.text(max_size=3), st.none(),
                     st.complex_numbers(max_magnitude=4), st.just([1]),
                     st.integers(2**31, 2**70))


INT_FIELDS = ["n_head_q", "n_head_kv", "head_dim", "value_bits", "value_group", "key_bits",
              "key_group", "n_sink", "n_recent", "budget_tokens", "max_batch", "max_tokens",
              "n_threads"]
OPT_INT_FIELDS = ["rank", "score_rank"]
BOOL_FIELDS = ["select_per_head", "dense", "check_finite"]
REAL_FIELDS = ["budget_frac", "scale"]


def kind_ok(field, value):
    if field == "dtype":
        return isinstance(value, str) and value in ("float32", "float16", "bfloat16")
    if field in BOOL_FIELDS:
        return isinstance(value, (bool, np.bool_))
    if value is None and field in OPT_INT_FIELDS + ["scale"]:
        return True
    if field in REAL_FIELDS:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_))
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and -(2**31) <= int(value) < 2**31


@FUZZ
@given(st.data())
def test_config_and_cache_creation(data):
    fields = {"n_head_q": 4, "n_head_kv": 2, "head_dim": 8, "max_tokens": 8, "max_batch": 1,
              "dtype": "float32"}
    names = INT_FIELDS + OPT_INT_FIELDS + BOOL_FIELDS + REAL_FIELDS + ["dtype"]
    for name in data.draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        if name == "dtype":
            fields[name] = data.draw(st.sampled_from(["float16", "bfloat16", "int8", 1, None]))
        elif name in ("max_tokens", "max_batch", "n_head_q", "n_head_kv", "head_dim"):
            fields[name] = data.draw(mixed_values(st.integers(-1, 9)))
        else:
            fields[name] = data.draw(mixed_values())
    bad = [n for n, v in fields.items() if not kind_ok(n, v)]
    if bad:
        return expect_error(lambda: sals.Config(**fields), bad, fields)
    cfg = sals.Config(**fields)
    try:
        dk, rank = cfg.dk, cfg.resolved_rank()
    except sals.SalsError:
        return
    proj = np.eye(max(dk, 1), max(rank, 1), dtype=np.float32) if 0 < dk < 200 and \
        0 < rank <= dk else np.eye(2, dtype=np.float32)
    try:
        with sals.LayerCache(cfg, sals.Rope.default(8), proj) as cache:
            assert cache.lengths().shape == (int(cfg.max_batch),)
    except sals.SalsError as e:
        assert re.search(r"config\.|projection|rope|" + "|".join(names), str(e)), str(e)


@FUZZ
@given(st.data())
def test_huge_config_fields(data):
    """int32 sizes too large to allocate, or whose products overflow: the cache is made, or
    creation fails (refused or out of memory) naming config fields, one of them a huge one."""
    fields = {"n_head_q": 4, "n_head_kv": 2, "head_dim": 8, "rank": 16, "max_tokens": 8,
              "max_batch": 1, "dtype": "float32"}
    big = st.integers(2**20, 2**31 - 1)
    # max_batch at most 2^20: a cache that did allocate has its lengths zeroed (4 B each).
    sizes = {"max_tokens": big, "n_sink": big, "n_recent": big, "n_head_q": big,
             "max_batch": st.integers(2**10, 2**20)}
    huge = data.draw(st.lists(st.sampled_from(sorted(sizes)), min_size=1, max_size=3, unique=True))
    for name in huge:
        fields[name] = data.draw(sizes[name])
    cfg = sals.Config(**fields)
    try:
        sals.LayerCache(cfg, sals.Rope.default(8), np.eye(16, dtype=np.float32)).close()
    except (sals.InvalidArgumentError, sals.OutOfMemoryError) as e:
        named = re.match(r"^(config\.\w+(?:, config\.\w+)*): ", str(e))
        assert named, str(e)
        assert set(huge) & {f[len("config."):] for f in named[1].split(", ")}, (huge, str(e))


def inv_freq_values():
    return st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4),
        st.lists(st.integers(-5, 5), max_size=4),
        st.lists(st.complex_numbers(max_magnitude=2), min_size=1, max_size=2),
        st.lists(st.text(max_size=2), min_size=1, max_size=2),
        st.just([[1.0, 0.5], [0.25, 0.125]]), st.just([[1.0], [2.0, 3.0]]), st.just(1.0),
        st.just(None), st.just(np.ones(4, np.float16)), st.just(np.ones(3, np.complex64)),
        st.just(np.array([True, False])), st.just(np.zeros((2, 2), np.float32)),
        st.just(np.array(["a"])), st.just([1e300]))


@FUZZ
@given(inv=inv_freq_values(), scaling=mixed_values(st.integers(0, 3)),
       interleaved=mixed_values(st.integers(0, 1)), rotary=st.one_of(st.none(), mixed_values()))
def test_rope(inv, scaling, interleaved, rotary):
    try:
        r = sals.Rope(inv, attention_scaling=scaling, interleaved=interleaved, rotary_dim=rotary)
    except sals.InvalidArgumentError as e:
        assert re.match(r"^(inv_freq|attention_scaling|interleaved|rotary_dim): ", str(e)), str(e)
        return
    assert r.inv_freq.dtype == np.float32 and r.inv_freq.ndim == 1
    assert np.all(np.isfinite(r.inv_freq)) and r.rotary_dim == 2 * r.inv_freq.size
    assert isinstance(r.interleaved, bool) and isinstance(r.attention_scaling, float)
    assert not (isinstance(inv, list) and any(isinstance(z, (complex, str)) for z in inv))


_GOOD = {}


def good_file() -> bytes:
    if "bytes" not in _GOOD:
        rng = np.random.default_rng(0)
        cal = sals.Calibrator([8, 4])
        cal.update(0, rng.standard_normal((50, 8)))
        cal.update(1, rng.standard_normal((50, 4)))
        calib = cal.finish(rank_frac=0.5, fingerprint={"m": 1})
        with tempfile.TemporaryDirectory() as d:
            calib.save(os.path.join(d, "c.npz"))
            with open(os.path.join(d, "c.npz"), "rb") as f:
                _GOOD["bytes"] = f.read()
    return _GOOD["bytes"]


def npy_header(descr, shape) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (64 - (11 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


@FUZZ
@given(st.data())
def test_calibration_load(data):
    raw = bytearray(good_file())
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "member", "random"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=32))
    elif how == "random":
        raw = bytearray(data.draw(st.binary(max_size=256)))
    else:
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
            members = {n: z.read(n) for n in z.namelist()}
        name = data.draw(st.sampled_from(sorted(members)))
        descr = data.draw(st.sampled_from(["<f8", "<f4", "|u1", "|O", "<c8", "S3", ">f8"]))
        shape = data.draw(st.sampled_from([(), (0,), (8,), (8, 4), (2**40,), (-1,), (3, 2**62)]))
        members[name] = npy_header(descr, shape) + data.draw(st.binary(max_size=64))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        raw = bytearray(buf.getvalue())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.npz")
        with open(path, "wb") as f:
            f.write(bytes(raw))
        try:
            cal = sals.Calibration.load(path)
        except sals.CalibrationError:
            return
    # Accepted (a flip in bytes nobody reads): then it is the calibration that was saved.
    assert [lay.rank for lay in cal.layers] == [4, 2]
