"""sals.LayerCache against plain dense attention and the float64 SALS reference."""

import math
import tracemalloc

import numpy as np
import pytest

import sals
from pysuite import (TOL, as64, assert_close, cast, check_selection, orthonormal, reference_for,
                     rope_for, structured_keys)
from reference import dense_attention


def _basis(rng, dk, proj):
    """An orthonormal [dk, dk] basis whose leading columns span proj (random if None)."""
    if proj is None:
        return orthonormal(rng, dk, dk)
    q, _ = np.linalg.qr(np.concatenate([proj, rng.standard_normal((dk, dk - proj.shape[1]))], 1))
    return q


def _decode_problem(rng, b, s, hq, hkv, d, proj):
    """A prompt of s tokens per sequence plus one decode token, pre-RoPE; key energy decays
    along a basis led by proj's columns, as calibrated projections see it."""
    k = structured_keys(rng, (b, s + 1, hkv, d), _basis(rng, hkv * d, proj))
    v = rng.standard_normal((b, s + 1, hkv, d)).astype(np.float32)
    q = rng.standard_normal((b, 1, hq, d)).astype(np.float32)
    pos = np.tile(np.arange(s + 1, dtype=np.int32), (b, 1))
    return k, v, q, pos


def _run_decode(cfg, proj, rope, k, v, q, pos, framework="numpy"):
    """Append the prompt, append the decode token, attend it. Returns (cache, out)."""
    s = k.shape[1] - 1
    kk, vv, qq = (cast(x, cfg.dtype, framework) for x in (k, v, q))
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(kk[:, :s], vv[:, :s], pos[:, :s])
    cache.append(kk[:, s:], vv[:, s:], pos[:, s:])
    out = cache.attend(qq, pos[:, s:])
    return cache, out, (kk, vv, qq)


# ---- dense equivalence --------------------------------------------------------------------

@pytest.mark.parametrize("s,hq,hkv,d", [
    (17, 4, 4, 64),      # GQA 1, shorter than sinks + recent
    (97, 6, 2, 64),      # GQA 3
    (97, 8, 2, 128),     # GQA 4
    (4099, 8, 1, 64),    # GQA 8, long
    (200, 2, 1, 256),    # head dim 256
])
def test_dense_equivalent_preset_equals_dense_attention(s, hq, hkv, d):
    rng = np.random.default_rng(s + hq + d)
    dk = hkv * d
    proj = orthonormal(rng, dk, dk)
    cfg = sals.Config.preset("dense-equivalent", hq, hkv, d, dtype="float32", max_tokens=s + 1)
    assert cfg.resolved_rank() == dk and cfg.resolved_score_rank() == dk
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, 1, s, hq, hkv, d, None)
    cache, out, _ = _run_decode(cfg, proj, rope, k, v, q, pos)
    want = dense_attention(q[0].astype(np.float64), k[0], v[0], pos[0, s:], pos[0],
                           rope.inv_freq)
    assert out.shape == (1, 1, hq, d) and out.dtype == np.float32
    assert_close(out[0], want, np.abs(v).max(), "float32")
    # every candidate was selected: the sparse step saw every token
    idx, count = cache.selected()
    assert count[0] == max(0, s + 1 - cfg.n_sink - cfg.n_recent)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_equivalent_16bit_storage(dtype):
    rng = np.random.default_rng(7)
    hq, hkv, d, s = 8, 2, 64, 300
    if dtype == "bfloat16":
        pytest.importorskip("torch")
    proj = orthonormal(rng, hkv * d, hkv * d)
    cfg = sals.Config.preset("dense-equivalent", hq, hkv, d, dtype=dtype, max_tokens=s + 1)
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, 1, s, hq, hkv, d, None)
    _, out, (kk, vv, qq) = _run_decode(cfg, proj, rope, k, v, q, pos)
    want = dense_attention(as64(qq)[0], as64(kk)[0], as64(vv)[0], pos[0, s:], pos[0],
                           rope.inv_freq)
    assert_close(out[0], want, np.abs(v).max(), dtype)


def test_prefill_chunk_is_causal_dense_attention():
    """T > 1: every visible (position <= query position) token, causally."""
    rng = np.random.default_rng(3)
    hq, hkv, d, s = 4, 2, 64, 97
    proj = orthonormal(rng, hkv * d, hkv * d)
    cfg = sals.Config.preset("dense-equivalent", hq, hkv, d, dtype="float32", max_tokens=s)
    rope = rope_for(d)
    k = rng.standard_normal((1, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((1, s, hkv, d)).astype(np.float32)
    q = rng.standard_normal((1, s, hq, d)).astype(np.float32)
    pos = np.arange(s, dtype=np.int32)[None] + 5
    with sals.LayerCache(cfg, rope, proj) as cache:
        cache.append(k, v, pos)
        out = cache.attend(q, pos)
        assert cache.selected()[1][0] == 0  # no sparse selection in a prefill chunk
    want = dense_attention(q[0].astype(np.float64), k[0], v[0], pos[0], pos[0], rope.inv_freq)
    assert_close(out[0], want, np.abs(v).max(), "float32")


# ---- each lossy knob against the reference ------------------------------------------------

KNOBS = {
    "rank": dict(rank=32, score_rank=32, budget_frac=1.0),
    "score_rank": dict(rank=128, score_rank=16, budget_frac=0.25),
    "budget": dict(rank=128, score_rank=128, budget_frac=0.125),
    "budget_tokens": dict(rank=128, score_rank=128, budget_tokens=40),
    "bits8": dict(rank=128, score_rank=128, budget_frac=1.0, value_bits=8),
    "bits4": dict(rank=128, score_rank=128, budget_frac=1.0, value_bits=4),
    "bits2": dict(rank=128, score_rank=128, budget_frac=1.0, value_bits=2),
    "sals-25": None,
    "sals-12.5": None,
}


@pytest.mark.parametrize("select_per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_lossy_knob_matches_reference(knob, select_per_head):
    rng = np.random.default_rng(list(KNOBS).index(knob))
    hq, hkv, d, s, b = 8, 2, 64, 400, 2
    dk = hkv * d
    if KNOBS[knob] is None:
        cfg = sals.Config.preset(knob, hq, hkv, d, dtype="float32", max_tokens=s + 1,
                                 max_batch=b, select_per_head=select_per_head)
    else:
        cfg = sals.Config(hq, hkv, d, dtype="float32", max_tokens=s + 1, max_batch=b,
                          select_per_head=select_per_head, **KNOBS[knob])
    proj = orthonormal(rng, dk, cfg.resolved_rank())
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, b, s, hq, hkv, d, proj)
    cache, out, _ = _run_decode(cfg, proj, rope, k, v, q, pos)
    ref = reference_for(cfg, proj, rope, b)
    ref.append(k, v, pos)
    np.testing.assert_array_equal(cache.lengths()[:b], ref.lengths())
    selection = check_selection(cache, ref, q, rel_tol=1e-4)
    want = ref.attend(q, pos[:, s:], selection=selection)
    assert_close(out, want, np.abs(v).max(), "float32")
    # the knob is really active: the result is far closer to the lossy reference than to dense
    dense = np.stack([dense_attention(q[i].astype(np.float64), k[i], v[i], pos[i, s:], pos[i],
                                      rope.inv_freq) for i in range(b)])
    assert np.abs(as64(out) - dense).max() > 100 * np.abs(as64(out) - want).max()


def test_dense_layer_attends_everything_with_rebuilt_keys():
    rng = np.random.default_rng(11)
    hq, hkv, d, s = 4, 1, 128, 150
    cfg = sals.Config(hq, hkv, d, rank=48, value_bits=4, dense=True, dtype="float32",
                      max_tokens=s + 1)
    proj = orthonormal(rng, hkv * d, 48)
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, 1, s, hq, hkv, d, proj)
    cache, out, _ = _run_decode(cfg, proj, rope, k, v, q, pos)
    ref = reference_for(cfg, proj, rope, 1)
    ref.append(k, v, pos)
    assert cache.selected()[1][0] == 0
    assert_close(out, ref.attend(q, pos[:, s:]), np.abs(v).max(), "float32")


@pytest.mark.parametrize("dtype,framework", [("float16", "numpy"), ("bfloat16", "torch"),
                                             ("float32", "torch")])
def test_storage_and_input_dtypes(dtype, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    hq, hkv, d, s = 6, 2, 64, 300
    cfg = sals.Config.preset("sals-25", hq, hkv, d, dtype=dtype, max_tokens=s + 1)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, 1, s, hq, hkv, d, proj)
    cache, out, (kk, vv, qq) = _run_decode(cfg, proj, rope, k, v, q, pos, framework)
    assert type(out) is type(qq) and str(out.dtype).endswith(dtype)
    ref = reference_for(cfg, proj, rope, 1)
    ref.append(as64(kk), as64(vv), pos)
    selection = check_selection(cache, ref, qq, rel_tol=3 * TOL[dtype])
    assert_close(out, ref.attend(as64(qq), pos[:, s:], selection=selection),
                 np.abs(v).max(), dtype)


# ---- batches, padding, layouts --------------------------------------------------------------

def test_ragged_batch_equals_per_sequence():
    """Left-padded sequences of different lengths in one batch give the same outputs as each
    sequence alone."""
    rng = np.random.default_rng(13)
    hq, hkv, d, b, t = 8, 2, 64, 3, 260
    lens = [260, 97, 181]
    cfg = sals.Config.preset("sals-12.5", hq, hkv, d, dtype="float32", max_tokens=t + 1,
                             max_batch=b, value_group=32)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    k, v, q, _ = _decode_problem(rng, b, t, hq, hkv, d, proj)
    pos = np.full((b, t + 1), -1, np.int32)
    for i, n in enumerate(lens):
        pos[i, t - n:] = np.arange(n + 1)
    k[pos < 0] = np.nan  # padding slots must never be read
    v[pos < 0] = np.nan
    cfg.check_finite = False
    batched = sals.LayerCache(cfg, rope, proj)
    batched.append(k[:, :t], v[:, :t], pos[:, :t])
    batched.append(k[:, t:], v[:, t:], pos[:, t:])
    out = batched.attend(q, pos[:, t:])
    np.testing.assert_array_equal(batched.lengths(), np.array(lens) + 1)
    idx_b, count_b = batched.selected()
    for i, n in enumerate(lens):
        single = sals.LayerCache(cfg, rope, proj)
        single.append(k[i:i + 1, t - n:t], v[i:i + 1, t - n:t], pos[i:i + 1, t - n:t])
        single.append(k[i:i + 1, t:], v[i:i + 1, t:], pos[i:i + 1, t:])
        one = single.attend(q[i:i + 1], pos[i:i + 1, t:])
        np.testing.assert_allclose(out[i], one[0], rtol=0, atol=1e-6)
        idx_s, count_s = single.selected()
        assert count_b[i] == count_s[0]
        assert set(idx_b[i, 0][idx_b[i, 0] >= 0]) == set(idx_s[0, 0][idx_s[0, 0] >= 0])


def _selected_as_before(cache):
    """selected() as it was: a [B, H, max_tokens] buffer, trimmed to the largest count."""
    cfg = cache.config
    heads = cfg.n_head_kv if cfg.select_per_head else 1
    b = max(cache._last_rows[1], 1)
    idx, count = np.empty((b, heads, cfg.max_tokens), np.int32), np.empty(b, np.int32)
    cache._c.selected(idx, count, None)
    return np.ascontiguousarray(idx[:, :, :int(count.max())]), count


@pytest.mark.parametrize("fields", [dict(select_per_head=True), dict(budget_tokens=7),
                                    dict(budget_frac=0.1), dict(dense=True)])
def test_selected_allocates_what_the_answer_needs(fields):
    """selected() sized its buffer by max_tokens (256 MiB per call on a long-context model);
    it now allocates about the answer, whose values are those of the old buffer."""
    rng = np.random.default_rng(19)
    hq, hkv, d, b, max_tokens = 4, 4, 8, 2, 1 << 20
    cfg = sals.Config(hq, hkv, d, rank=16, dtype="float32", max_batch=b,
                      max_tokens=max_tokens, n_sink=4, n_recent=8, **fields)
    cache = sals.LayerCache(cfg, rope_for(d), orthonormal(rng, hkv * d, 16))
    lens = [300, 41]  # ragged: the second sequence is left-padded
    pos = np.full((b, 300), -1, np.int32)
    for i, n in enumerate(lens):
        pos[i, 300 - n:] = np.arange(n)
    k = rng.standard_normal((b, 300, hkv, d)).astype(np.float32)
    cache.append(k, k, pos)
    cache.attend(rng.standard_normal((b, 1, hq, d)).astype(np.float32),
                 np.array([[299], [40]], np.int32))
    # The same answer after more tokens arrive (the selection was made at shorter lengths).
    for more in (0, 5):
        cache.append(k[:, :more], k[:, :more], pos[:, -1:] + 1 + np.arange(more, dtype=np.int32))
        tracemalloc.start()
        idx, count = cache.selected()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        old_idx, old_count = _selected_as_before(cache)
        np.testing.assert_array_equal(count, old_count)
        np.testing.assert_array_equal(idx, old_idx)
        assert peak < 64 * 1024, f"selected() allocated {peak} bytes"  # before: 32 MiB
    if not cfg.dense:
        frac = float(np.float32(cfg.budget_frac))  # the library's float32 field, in double
        assert count.tolist() == [min(cfg.budget_tokens or math.ceil(frac * n), n - 12)
                                  for n in lens]
    cache.reset()
    idx, count = cache.selected()
    assert idx.shape == (b, hkv if cfg.select_per_head else 1, 0) and count.tolist() == [0, 0]


def test_padding_query_row_is_zero():
    rng = np.random.default_rng(17)
    hq, hkv, d = 4, 2, 64
    cfg = sals.Config(hq, hkv, d, dtype="float32", max_tokens=64, max_batch=2)
    proj = orthonormal(rng, hkv * d, hkv * d)
    cache = sals.LayerCache(cfg, rope_for(d), proj)
    k = rng.standard_normal((2, 20, hkv, d)).astype(np.float32)
    cache.append(k, k, np.tile(np.arange(20, dtype=np.int32), (2, 1)))
    out = cache.attend(rng.standard_normal((2, 1, hq, d)).astype(np.float32),
                       np.array([[20], [-1]], np.int32))
    assert np.all(out[1] == 0) and np.any(out[0] != 0)


def test_non_contiguous_inputs():
    """[B, H, T, d] tensors viewed as [B, T, H, d] (strided, last dim contiguous) and a
    strided out= give the same result as contiguous copies."""
    rng = np.random.default_rng(19)
    hq, hkv, d, s = 6, 3, 64, 97
    cfg = sals.Config.preset("sals-25", hq, hkv, d, dtype="float32", max_tokens=s + 1)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    k, v, q, pos = _decode_problem(rng, 1, s, hq, hkv, d, proj)
    _, want, _ = _run_decode(cfg, proj, rope, k, v, q, pos)
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    vt = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not kt.flags.c_contiguous and not vt.flags.c_contiguous
    out_buf = np.zeros((1, 1, hq, 2 * d), np.float32)
    out = out_buf[..., :d]
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(kt[:, :s], vt[:, :s], pos[:, :s])
    cache.append(kt[:, s:], vt[:, s:], pos[:, s:])
    got = cache.attend(qt, pos[:, s:], out=out)
    assert got is out
    np.testing.assert_array_equal(out_buf[..., :d], want)
    assert np.all(out_buf[..., d:] == 0)


def test_many_decode_steps_track_the_reference():
    """Twenty decode steps: the recent window slides and candidates enter the latent cache."""
    rng = np.random.default_rng(23)
    hq, hkv, d, s, steps = 4, 1, 64, 120, 20
    cfg = sals.Config.preset("sals-25", hq, hkv, d, dtype="float32", max_tokens=s + steps,
                             n_recent=8, n_sink=4)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    k = structured_keys(rng, (1, s + steps, hkv, d), _basis(rng, hkv * d, proj))
    v = rng.standard_normal((1, s + steps, hkv, d)).astype(np.float32)
    pos = np.arange(s + steps, dtype=np.int32)[None]
    cache = sals.LayerCache(cfg, rope, proj)
    ref = reference_for(cfg, proj, rope, 1)
    cache.append(k[:, :s], v[:, :s], pos[:, :s])
    ref.append(k[:, :s], v[:, :s], pos[:, :s])
    for t in range(s, s + steps):
        cache.append(k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
        ref.append(k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
        q = rng.standard_normal((1, 1, hq, d)).astype(np.float32)
        out = cache.attend(q, pos[:, t:t + 1])
        sel = check_selection(cache, ref, q, rel_tol=1e-4)
        assert_close(out, ref.attend(q, pos[:, t:t + 1], selection=sel), np.abs(v).max(),
                     "float32", what=f"step {t}")


def test_memory_accounting():
    rng = np.random.default_rng(29)
    hq, hkv, d, s = 8, 2, 64, 500
    cfg = sals.Config.preset("sals-12.5", hq, hkv, d, max_tokens=s)
    dk = hkv * d
    proj = orthonormal(rng, dk, cfg.resolved_rank())
    with sals.LayerCache(cfg, rope_for(d), proj) as cache:
        empty = cache.memory()
        k = rng.standard_normal((1, s, hkv, d)).astype(np.float16)
        cache.append(k, k, np.arange(s, dtype=np.int32)[None])
        m = cache.memory()
    fields = {"latent_keys", "values", "value_scales", "exact_window", "positions",
              "projection", "total", "dense_fp16", "allocated"}
    assert set(m) == fields
    assert m["dense_fp16"] == 2 * s * dk * 2 and empty["dense_fp16"] == 0
    assert m["latent_keys"] == s * cfg.resolved_rank() * 2  # float16 latents
    assert m["values"] == s * dk * 2 // 8  # 2-bit codes
    assert m["total"] == sum(m[f] for f in ("latent_keys", "values", "value_scales",
                                            "exact_window", "positions", "projection"))
    assert m["allocated"] >= m["total"] and m["total"] < m["dense_fp16"]


def test_reset_close_and_context_manager():
    rng = np.random.default_rng(31)
    cfg = sals.Config(2, 1, 64, max_tokens=32)
    cache = sals.LayerCache(cfg, rope_for(64), orthonormal(rng, 64, 64))
    k = np.ones((1, 5, 1, 64), np.float16)
    cache.append(k, k, np.arange(5, dtype=np.int32)[None])
    assert cache.lengths()[0] == 5
    cache.reset()
    assert cache.lengths()[0] == 0
    cache.append(k, k, np.arange(5, dtype=np.int32)[None])  # capacity is free again
    assert cache.config is cfg
    cache.close()
    cache.close()  # idempotent
    assert cache.closed
    for call in (lambda: cache.append(k, k, np.arange(5, dtype=np.int32)[None]),
                 lambda: cache.attend(np.ones((1, 1, 2, 64), np.float16), [[5]]),
                 cache.lengths, cache.selected, cache.memory, cache.reset):
        with pytest.raises(ValueError, match="closed"):
            call()
