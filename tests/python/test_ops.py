"""Every stateless stage against numpy float64."""

import numpy as np
import pytest

import sals
from pysuite import TOL, as64, cast, orthonormal
from reference import attention, check_topk, dequantize, pack, quantize, rope


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_project(dtype):
    if dtype == "bfloat16":
        pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = cast(rng.standard_normal((97, 256)).astype(np.float32), dtype)
    proj = orthonormal(rng, 256, 40)
    out = sals.project(x, proj)
    assert out.shape == (97, 40) and str(out.dtype).endswith(dtype)
    want = as64(x) @ proj.astype(np.float64)
    # the output is rounded to `dtype`; relative to the largest output
    assert np.abs(as64(out) - want).max() <= TOL[dtype] * np.abs(want).max()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim,scaling", [(64, 1.0), (32, 1.25)])
def test_rope_apply(interleaved, rotary_dim, scaling):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((17, 3, 64)).astype(np.float32)
    pos = rng.integers(0, 5000, 17).astype(np.int32)
    r = sals.Rope(1.0 / 500000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim),
                  attention_scaling=scaling, interleaved=interleaved)
    out = sals.rope_apply(x, pos, r)
    want = rope(x, pos, r.inv_freq, scaling, interleaved)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * scaling * np.abs(x).max())
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])
    # in place
    y = x.copy()
    assert sals.rope_apply(y, pos, r, out=y) is y
    np.testing.assert_array_equal(y, out)


def test_rope_none_is_identity():
    x = np.random.default_rng(3).standard_normal((5, 2, 64)).astype(np.float32)
    np.testing.assert_array_equal(sals.rope_apply(x, np.arange(5, dtype=np.int32),
                                                  sals.Rope.none()), x)


def test_rebuild_rope():
    rng = np.random.default_rng(4)
    hkv, d, r, n = 2, 128, 64, 97
    proj = orthonormal(rng, hkv * d, r)
    k_lat = rng.standard_normal((n, r)).astype(np.float32)
    pos = rng.integers(0, 9000, n).astype(np.int32)
    rp = sals.Rope.default(d)
    out = sals.rebuild_rope(k_lat, proj, pos, rp)
    assert out.shape == (n, hkv, d)
    want = rope((k_lat.astype(np.float64) @ proj.T.astype(np.float64)).reshape(n, hkv, d), pos,
                rp.inv_freq)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("heads", [1, 4])
def test_score_select(heads):
    rng = np.random.default_rng(5)
    b, s, r, r_star, n_sink, n_recent, budget = 3, 4099, 32, 16, 16, 64, 500
    q_lat = rng.standard_normal((b, heads, r)).astype(np.float32)
    k_lat = rng.standard_normal((b, s, r + 8)).astype(np.float32)
    lengths = np.array([4099, 1000, 700], np.int32)
    idx = sals.score_select(q_lat, k_lat, score_rank=r_star, budget=budget, n_sink=n_sink,
                            n_recent=n_recent, lengths=lengths)
    assert idx.shape == (b, heads, budget) and idx.dtype == np.int32
    for i in range(b):
        cand = np.arange(n_sink, lengths[i] - n_recent)
        for h in range(heads):
            scores = k_lat[i, cand, :r_star].astype(np.float64) @ q_lat[i, h, :r_star]
            chosen = set(idx[i, h][idx[i, h] >= 0].tolist())
            k = min(budget, cand.size)
            assert not check_topk(chosen, scores, cand, k, 1e-4 * np.abs(scores).max())
            assert np.count_nonzero(idx[i, h] < 0) == budget - k


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sparse_attention(shared, dtype):
    if dtype == "bfloat16":
        pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    b, s, hq, hkv, d = 2, 97, 8, 2, 64
    q = cast(rng.standard_normal((b, hq, d)).astype(np.float32), dtype)
    k = cast(rng.standard_normal((b, s, hkv, d)).astype(np.float32), dtype)
    v = cast(rng.standard_normal((b, s, hkv, d)).astype(np.float32), dtype)
    lengths = np.array([97, 40], np.int32)
    h = 1 if shared else hkv
    idx = np.full((b, h, 30), -1, np.int32)
    for i in range(b):
        for j in range(h):
            pick = rng.choice(lengths[i], 20, replace=False)
            idx[i, j, :20] = pick
    out = sals.sparse_attention(q, k, v, idx=idx, lengths=lengths)
    assert out.shape == (b, hq, d)
    g = hq // h
    for i in range(b):
        for j in range(h):
            sel = idx[i, j][idx[i, j] >= 0]
            heads = slice(j * g, (j + 1) * g)
            kv = slice(None) if shared else slice(j, j + 1)
            want = attention(as64(q)[i, heads], as64(k)[i, sel][:, kv], as64(v)[i, sel][:, kv],
                             1 / np.sqrt(d))
            err = np.abs(as64(out)[i, heads] - want).max()
            assert err <= TOL[dtype] * np.abs(as64(v)).max()


def test_sparse_attention_all_tokens_and_scale():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    k = rng.standard_normal((1, 17, 4, 64)).astype(np.float32)
    v = rng.standard_normal((1, 17, 4, 64)).astype(np.float32)
    out = sals.sparse_attention(q, k, v, scale=0.05)
    want = attention(q[0].astype(np.float64), k[0], v[0], 0.05)
    np.testing.assert_allclose(out[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_quantize_dequantize(bits, group):
    rng = np.random.default_rng(bits * group)
    v = (rng.standard_normal((97, 256)) * rng.uniform(0.1, 4, (97, 1))).astype(np.float32)
    packed, scale, zero = sals.quantize_values(v, bits, group)
    assert packed.shape == (97, 256 * bits // 8) and packed.dtype == np.uint8
    assert scale.shape == zero.shape == (97, 256 // group) and scale.dtype == np.float16
    codes, ref_scale, ref_zero = quantize(v, bits, group)
    # zero: the minimum rounded down to float16; scale: (max - zero) / levels rounded up
    np.testing.assert_array_equal(scale.astype(np.float64), ref_scale)
    np.testing.assert_array_equal(zero.astype(np.float64), ref_zero)
    # codes agree except where float32 and float64 round a value at a half step differently
    agree = np.mean(pack(codes, bits) == packed)
    assert agree > 0.999, f"only {agree:.4f} of packed bytes agree"
    out = sals.dequantize_values(packed, scale, zero, bits, group)
    assert out.shape == v.shape and out.dtype == np.float32
    step = np.repeat(scale.astype(np.float64), group, axis=1)
    assert np.all(np.abs(out - v) <= 0.5 * step * (1 + 1e-3) + 1e-3 * np.abs(v) + 1e-6)
    np.testing.assert_allclose(out, dequantize(codes, ref_scale, ref_zero, group),
                               rtol=0, atol=float(step.max()) * (1 + 1e-3))


def test_dequantize_dtypes_and_constant_groups():
    v = np.full((3, 64), 2.5, np.float32)
    packed, scale, zero = sals.quantize_values(v, 4, 32)
    assert np.all(scale.astype(np.float32) == 0)
    out16 = sals.dequantize_values(packed, scale, zero, 4, 32, dtype="float16")
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16.astype(np.float32), v)
