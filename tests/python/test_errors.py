"""Bad input to every argument of every public function: a clear exception of the right class
naming the argument, never a crash, and nothing modified."""

import numpy as np
import pytest
import sals
from pysuite import orthonormal, positions, rope_for, small_cache

HQ, HKV, D = 4, 2, 64
DK = HKV * D


def f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


pos = positions


def make(**overrides):
    return small_cache(HQ, HKV, D, **overrides)


# ---- cache creation -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("n_head_q", 3), ("n_head_q", 0), ("n_head_kv", 0), ("head_dim", 0), ("rank", 0),
    ("rank", DK + 1), ("score_rank", 0), ("score_rank", 200), ("value_bits", 3),
    ("value_group", 48), ("value_group", 0), ("n_sink", -1), ("n_recent", -1),
    ("budget_frac", 0.0), ("budget_frac", 1.5), ("budget_tokens", -1), ("max_batch", 0),
    ("max_tokens", 0), ("scale", -1.0), ("n_threads", -1), ("n_threads", 1025),
    ("n_threads", 2**31 - 1),
])
def test_bad_config_field(field, value):
    # 4-bit values: value_group only matters when values are quantised
    cfg = sals.Config(HQ, HKV, D, rank=128, score_rank=64, value_bits=4, max_tokens=64)
    setattr(cfg, field, value)
    rank = cfg.resolved_rank() if 0 < cfg.resolved_rank() <= DK else DK
    with pytest.raises(sals.InvalidArgumentError, match=field):
        sals.LayerCache(cfg, rope_for(D), orthonormal(np.random.default_rng(0), DK, rank))


def test_bad_config_python_side():
    with pytest.raises(sals.InvalidArgumentError, match="dtype"):
        make(dtype="int8")
    with pytest.raises(sals.InvalidArgumentError, match="config"):
        sals.LayerCache({"n_head_q": 4}, rope_for(D), orthonormal(np.random.default_rng(0), DK, DK))
    with pytest.raises(sals.InvalidArgumentError, match="name"):
        sals.Config.preset("sals-50", HQ, HKV, D)


def test_bad_device():
    cfg = sals.Config(HQ, HKV, D, max_tokens=8)
    proj = orthonormal(np.random.default_rng(0), DK, DK)
    with pytest.raises(sals.InvalidArgumentError, match="device"):
        sals.LayerCache(cfg, rope_for(D), proj, device="tpu:0")
    if not sals.cuda_available():
        # With torch loaded, "cuda" consults torch's current device: a CPU-only torch must not
        # turn that into torch's own assertion.
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        for device in ("cuda:0", "cuda"):
            with pytest.raises(sals.SalsError, match="config.device"):
                sals.LayerCache(cfg, rope_for(D), proj, device=device)


def test_bad_projection_and_rope():
    cfg = sals.Config(HQ, HKV, D, rank=32, max_tokens=8)
    rng = np.random.default_rng(0)
    with pytest.raises(sals.InvalidArgumentError, match="projection"):
        sals.LayerCache(cfg, rope_for(D), orthonormal(rng, DK, 33))
    with pytest.raises(sals.InvalidArgumentError, match="projection"):
        sals.LayerCache(cfg, rope_for(D), np.zeros((DK, 32), np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="projection"):
        sals.LayerCache(cfg, rope_for(D), np.zeros((DK, 32, 1), np.float32))
    bad = orthonormal(rng, DK, 32)
    bad[3, 4] = np.nan
    with pytest.raises(sals.NotFiniteError, match="projection"):
        sals.LayerCache(cfg, rope_for(D), bad)
    with pytest.raises(sals.InvalidArgumentError, match="rope"):
        sals.LayerCache(cfg, "rope", orthonormal(rng, DK, 32))
    with pytest.raises(sals.InvalidArgumentError, match="rotary_dim"):
        sals.LayerCache(cfg, sals.Rope.default(2 * D), orthonormal(rng, DK, 32))
    with pytest.raises(sals.InvalidArgumentError, match="inv_freq"):
        sals.Rope([1.0, float("nan")])
    with pytest.raises(sals.InvalidArgumentError, match="rotary_dim"):
        sals.Rope([1.0, 0.5], rotary_dim=6)


# ---- append / attend --------------------------------------------------------------------

def naming(exc, *cases):
    """Parametrize rows: each case raises `exc` with a message naming the argument it breaks,
    the case's name up to its last underscore (k_ndim -> k, q_pos_shape -> q_pos)."""
    return [(case, exc, rf"\b{case.rsplit('_', 1)[0]}\b") for case in cases]


@pytest.mark.parametrize("case,exc,match", [
    *naming(sals.InvalidArgumentError, "k_ndim", "k_heads", "k_dtype", "k_stride", "v_shape",
            "v_dtype", "positions_shape"),
    ("pos_float", sals.InvalidArgumentError, "positions"),
    ("pos_range", sals.InvalidArgumentError, "positions"),
    *naming(sals.NotFiniteError, "k_nan", "v_inf"),
    ("batch", sals.CapacityError, "batch"),
    ("tokens", sals.CapacityError, "max_tokens"),
])
def test_bad_append(case, exc, match):
    cache = make()
    k, v, p = f32(1, 5, HKV, D), f32(1, 5, HKV, D), pos(1, 5)
    if case == "k_ndim":
        k = k[0]
    elif case == "k_heads":
        k = f32(1, 5, HKV + 1, D)
    elif case == "k_dtype":
        k = k.astype(np.float64)
    elif case == "k_stride":
        k = f32(1, 5, HKV, 2 * D)[..., ::2]
    elif case == "v_shape":
        v = f32(1, 4, HKV, D)
    elif case == "v_dtype":
        v = (v * 10).astype(np.int32)
    elif case == "positions_shape":
        p = pos(1, 4)
    elif case == "pos_float":
        p = p.astype(np.float32)
    elif case == "pos_range":
        p = p.astype(np.int64) + 2**40
    elif case == "k_nan":
        k[0, 2, 1, 7] = np.nan
    elif case == "v_inf":
        v[0, 0, 0, 0] = np.inf
    elif case == "batch":
        k, v, p = f32(3, 5, HKV, D), f32(3, 5, HKV, D), pos(3, 5)
    elif case == "tokens":
        k, v, p = f32(1, 65, HKV, D), f32(1, 65, HKV, D), pos(1, 65)
    with pytest.raises(exc, match=match):
        cache.append(k, v, p)
    assert cache.lengths()[0] == 0  # nothing was stored


def test_capacity_is_checked_across_calls():
    cache = make(max_tokens=8)
    cache.append(f32(1, 6, HKV, D), f32(1, 6, HKV, D), pos(1, 6))
    with pytest.raises(sals.CapacityError):
        cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), pos(1, 3, 6))
    assert cache.lengths()[0] == 6


@pytest.mark.parametrize("case,exc,match", [
    *naming(sals.InvalidArgumentError, "q_heads", "q_dim", "q_dtype", "positions_shape",
            "out_shape", "out_dtype", "out_alias"),
    *naming(sals.NotFiniteError, "q_nan"),
    *naming(ValueError, "out_readonly"),
    ("batch", sals.SalsError, "batch|\\bq\\b"),
])
def test_bad_attend(case, exc, match):
    cache = make()
    cache.append(f32(1, 20, HKV, D), f32(1, 20, HKV, D), pos(1, 20))
    q, p, out = f32(1, 1, HQ, D), pos(1, 1, 20), None
    if case == "q_heads":
        q = f32(1, 1, HQ + 1, D)
    elif case == "q_dim":
        q = f32(1, 1, HQ, D + 1)
    elif case == "q_dtype":
        q = q.astype(np.float64)
    elif case == "q_nan":
        q[0, 0, 0, 0] = np.nan
    elif case == "positions_shape":
        p = pos(1, 2, 20)
    elif case == "out_shape":
        out = f32(1, 1, HQ, D - 1)
    elif case == "out_dtype":
        out = np.zeros((1, 1, HQ, D), np.int32)
    elif case == "out_alias":
        out = q
    elif case == "out_readonly":
        out = np.zeros((1, 1, HQ, D), np.float32)
        out.flags.writeable = False
    elif case == "batch":
        q, p = f32(3, 1, HQ, D), pos(3, 1, 20)
    with pytest.raises(exc, match=match):
        cache.attend(q, p, out=out)


# ---- stateless stages ---------------------------------------------------------------------

def test_bad_project():
    x, proj = f32(5, 8), f32(8, 3)
    with pytest.raises(sals.InvalidArgumentError, match=r"\bx\b"):
        sals.project(f32(5, 8, 1), proj)
    with pytest.raises(sals.InvalidArgumentError, match="proj"):
        sals.project(x, f32(9, 3))
    with pytest.raises(sals.InvalidArgumentError, match=r"\bx\b"):
        sals.project(x.astype(np.float64), proj)
    with pytest.raises(sals.InvalidArgumentError, match="out"):
        sals.project(x, proj, out=f32(5, 4))
    with pytest.raises(sals.InvalidArgumentError, match=r"\bx\b"):
        sals.project(f32(5, 16)[:, ::2], proj)


def test_bad_rope_apply():
    x, p, r = f32(5, 2, 64), np.arange(5, dtype=np.int32), rope_for(64)
    with pytest.raises(sals.InvalidArgumentError, match="pos"):
        sals.rope_apply(x, np.arange(4, dtype=np.int32), r)
    with pytest.raises(sals.InvalidArgumentError, match=r"\bx\b"):
        sals.rope_apply(f32(5, 64), p, r)
    with pytest.raises(sals.InvalidArgumentError, match="rope"):
        sals.rope_apply(x, p, None)
    with pytest.raises(sals.InvalidArgumentError, match="rotary_dim"):
        sals.rope_apply(x, p, rope_for(128))
    with pytest.raises(sals.InvalidArgumentError, match="out"):
        sals.rope_apply(x, p, r, out=f32(5, 2, 32))


def test_bad_rebuild_rope():
    k_lat, proj, p, r = f32(5, 16), f32(128, 16), np.arange(5, dtype=np.int32), rope_for(64)
    with pytest.raises(sals.InvalidArgumentError, match="proj"):
        sals.rebuild_rope(k_lat, f32(128, 17), p, r)
    with pytest.raises(sals.InvalidArgumentError, match="proj"):
        sals.rebuild_rope(k_lat, f32(100, 16), p, r)
    with pytest.raises(sals.InvalidArgumentError, match="pos"):
        sals.rebuild_rope(k_lat, proj, np.arange(6, dtype=np.int32), r)
    with pytest.raises(sals.InvalidArgumentError, match="k_lat"):
        sals.rebuild_rope(f32(5), proj, p, r)
    with pytest.raises(sals.InvalidArgumentError, match="head_dim"):
        sals.rebuild_rope(k_lat, proj, p, sals.Rope.none())
    with pytest.raises(sals.InvalidArgumentError, match="out"):
        sals.rebuild_rope(k_lat, proj, p, r, out=f32(5, 1, 64))


def test_bad_score_select():
    q, k = f32(2, 1, 16), f32(2, 100, 16)
    with pytest.raises(sals.InvalidArgumentError, match="budget"):
        sals.score_select(q, k, score_rank=8, budget=100 - 10 - 10 + 1, n_sink=10, n_recent=10)
    with pytest.raises(sals.InvalidArgumentError, match="budget"):
        sals.score_select(q, k, score_rank=8, budget=0)
    with pytest.raises(sals.InvalidArgumentError, match="score_rank"):
        sals.score_select(q, k, score_rank=17, budget=5)
    with pytest.raises(sals.InvalidArgumentError, match="lengths"):
        sals.score_select(q, k, score_rank=8, budget=5, lengths=np.array([100, 101], np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="lengths"):
        sals.score_select(q, k, score_rank=8, budget=5, lengths=np.array([100], np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="k_lat"):
        sals.score_select(q, f32(3, 100, 16), score_rank=8, budget=5)
    with pytest.raises(sals.InvalidArgumentError, match=r"^out: dtype int64"):  # not "idx"
        sals.score_select(q, k, score_rank=8, budget=5, out=np.zeros((2, 1, 5), np.int64))


def test_bad_sparse_attention():
    q, k, v = f32(2, 4, 64), f32(2, 10, 2, 64), f32(2, 10, 2, 64)
    with pytest.raises(sals.InvalidArgumentError, match="idx"):
        sals.sparse_attention(q, k, v, idx=np.array([[[0, 10]], [[1, 2]]], np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="idx"):
        sals.sparse_attention(q, k, v, idx=np.zeros((2, 3, 2), np.int32))
    with pytest.raises(sals.InvalidArgumentError, match=r"\bv\b"):
        sals.sparse_attention(q, k, f32(2, 9, 2, 64))
    with pytest.raises(sals.InvalidArgumentError, match=r"\bq\b"):
        sals.sparse_attention(f32(2, 3, 64), k, v)
    with pytest.raises(sals.InvalidArgumentError, match="lengths"):
        sals.sparse_attention(q, k, v, lengths=np.array([11, 3], np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="out"):
        sals.sparse_attention(q, k, v, out=f32(2, 4, 32))


def test_bad_quantize_and_dequantize():
    v = f32(4, 64)
    with pytest.raises(sals.InvalidArgumentError, match="bits"):
        sals.quantize_values(v, 3, 32)
    with pytest.raises(sals.InvalidArgumentError, match="group"):
        sals.quantize_values(v, 4, 48)
    with pytest.raises(sals.InvalidArgumentError, match=r"\bv\b"):
        sals.quantize_values(f32(64), 4, 32)
    packed, scale, zero = sals.quantize_values(v, 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match="scale"):
        sals.dequantize_values(packed, scale[:, :1], zero, 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match="zero"):
        sals.dequantize_values(packed, scale, zero.astype(np.float32), 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match="packed"):
        sals.dequantize_values(packed.astype(np.float32), scale, zero, 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match="bits"):
        sals.dequantize_values(packed, scale, zero, 5, 32)
    with pytest.raises(sals.InvalidArgumentError, match="out"):
        sals.dequantize_values(packed, scale, zero, 4, 32, out=np.zeros((4, 64), np.int32))


# ---- NaN and infinity in stateless inputs (checked on the CPU, not on CUDA: sals.h) --------

def stateless_inputs():
    """Finite arguments of every stateless function, by function name."""
    rng = np.random.default_rng(2)

    def g(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    packed, scale, zero = sals.quantize_values(g(4, 64), 4, 32)
    return {
        "project": dict(x=g(5, 8), proj=g(8, 3)),
        "rope_apply": dict(x=g(5, 2, 64), pos=np.arange(5, dtype=np.int32), rope=rope_for(64)),
        "score_select": dict(q_lat=g(2, 1, 16), k_lat=g(2, 100, 16), score_rank=8, budget=5,
                             n_sink=4, n_recent=8),
        "rebuild_rope": dict(k_lat=g(5, 16), proj=g(128, 16), pos=np.arange(5, dtype=np.int32),
                             rope=rope_for(64)),
        "sparse_attention": dict(q=g(2, 4, 64), k=g(2, 10, 2, 64), v=g(2, 10, 2, 64)),
        "quantize_values": dict(v=g(4, 64), bits=4, group=32),
        "dequantize_values": dict(packed=packed, scale=scale, zero=zero, bits=4, group=32),
    }


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fn,arg,at,row", [
    ("project", "x", (2, 5), "row 2"),
    ("project", "proj", (7, 1), "row 7"),
    ("rope_apply", "x", (3, 1, 10), r"row \[3, 1\]"),
    ("score_select", "q_lat", (1, 0, 2), r"row \[1, 0\]"),
    ("score_select", "k_lat", (0, 50, 3), r"row \[0, 50\]"),
    ("rebuild_rope", "k_lat", (4, 0), "row 4"),
    ("rebuild_rope", "proj", (100, 3), "row 100"),
    ("sparse_attention", "q", (1, 3, 0), r"row \[1, 3\]"),
    ("sparse_attention", "k", (0, 7, 1, 5), r"row \[0, 7, 1\]"),
    ("sparse_attention", "v", (1, 2, 0, 63), r"row \[1, 2, 0\]"),
    ("quantize_values", "v", (3, 63), "row 3"),
    ("dequantize_values", "scale", (2, 1), "row 2"),
    ("dequantize_values", "zero", (0, 0), "row 0"),
])
def test_stateless_not_finite(fn, arg, at, row, value):
    kwargs = stateless_inputs()[fn]
    good = getattr(sals, fn)(**kwargs)
    kwargs[arg] = kwargs[arg].copy()
    kwargs[arg][at] = value
    if fn != "quantize_values":  # the only one without out=
        kwargs["out"] = np.full_like(good, 7)
    with pytest.raises(sals.NotFiniteError, match=rf"^{arg}: holds NaN or infinity at {row}$"):
        getattr(sals, fn)(**kwargs)
    if "out" in kwargs:
        assert np.all(kwargs["out"] == 7)  # nothing written


def test_stateless_not_finite_in_place_and_16_bit():
    torch = pytest.importorskip("torch")
    x = f32(5, 2, 64)
    x[1, 0, 3] = np.inf
    before = x.copy()
    with pytest.raises(sals.NotFiniteError, match=r"^x: holds NaN or infinity at row \[1, 0\]$"):
        sals.rope_apply(x, np.arange(5, dtype=np.int32), rope_for(64), out=x)
    np.testing.assert_array_equal(x, before)
    for dtype in (torch.float16, torch.bfloat16):
        v = torch.zeros(3, 64, dtype=dtype)
        v[2, 5] = float("nan")
        with pytest.raises(sals.NotFiniteError, match="^v: holds NaN or infinity at row 2$"):
            sals.quantize_values(v, 2, 32)
        k = torch.zeros(1, 4, 1, 64, dtype=dtype)
        k[0, 3, 0, 0] = float("-inf")
        q = torch.zeros(1, 2, 64, dtype=dtype)
        with pytest.raises(sals.NotFiniteError, match=r"^k: holds NaN or infinity at row \[0, 3, 0\]$"):
            sals.sparse_attention(q, k, torch.zeros_like(k))


def test_stateless_unread_elements_are_not_checked():
    """Only what a call reads must be finite: padding past `lengths`, tokens outside idx,
    sinks and recent tokens when scoring, latent coordinates past score_rank."""
    kw = stateless_inputs()["score_select"]
    lengths = np.array([100, 60], np.int32)
    k_lat, q_lat = kw["k_lat"], kw["q_lat"]
    k_lat[0, 2] = np.nan  # a sink
    k_lat[0, 95] = np.inf  # a recent token
    k_lat[1, 70] = np.nan  # past length 60
    k_lat[:, :, 8:] = np.nan  # past score_rank 8
    q_lat[:, :, 8:] = np.inf
    idx = sals.score_select(lengths=lengths, **kw)
    assert idx.min() >= 4 and idx[0].max() < 92 and idx[1].max() < 52
    q, k, v = (stateless_inputs()["sparse_attention"][n] for n in "qkv")
    k[0, 9], v[1, 6:] = np.nan, np.inf  # past lengths 9 and 6
    lengths = np.array([9, 6], np.int32)
    out = sals.sparse_attention(q, k, v, lengths=lengths)
    assert np.all(np.isfinite(out))
    k[0, 0, 1] = np.nan  # token 0 is not in idx for head 1
    idx = np.array([[[1, 0], [2, 3]], [[4, -1], [5, 1]]], np.int32)  # per KV head
    assert np.all(np.isfinite(sals.sparse_attention(q, k, v, idx=idx, lengths=lengths)))
    with pytest.raises(sals.NotFiniteError, match=r"^k: holds NaN or infinity at row \[0, 0, 1\]$"):
        sals.sparse_attention(q, k, v, idx=idx[:, :1], lengths=lengths)  # shared: all heads


def test_error_classes():
    assert issubclass(sals.InvalidArgumentError, ValueError)
    assert issubclass(sals.NotFiniteError, ValueError)
    assert issubclass(sals.CalibrationError, ValueError)
    assert issubclass(sals.DeviceError, RuntimeError)
    assert issubclass(sals.OutOfMemoryError, MemoryError)
    for cls, status in [(sals.InvalidArgumentError, 1), (sals.UnsupportedError, 2),
                        (sals.OutOfMemoryError, 3), (sals.CapacityError, 4),
                        (sals.NotFiniteError, 5), (sals.DeviceError, 6)]:
        assert issubclass(cls, sals.SalsError) and cls.status == status
    try:
        sals.project(f32(5, 8), f32(9, 3))
    except sals.SalsError as e:
        assert e.status == 1 and str(e)
