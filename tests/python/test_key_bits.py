"""Quantised latent keys (key_bits 8 and 4) against the float64 reference.

The projections here are signed permutations (orthonormal, every entry 0 or +-1), so the latent
coordinates U^T k are exact in float32 and the library quantises the very numbers the reference
quantises. With a dense projection the float32 latent differs from the float64 one in its last
bits, which can move a group's float16 zero or a code by one step: a real but legitimate
difference that no tolerance of rounding covers.
"""

import dataclasses

import numpy as np
import pytest

import sals
from pysuite import (TOL, as64, assert_close, cast, check_selection, positions, reference_for,
                     rope_for, structured_keys)

HQ, HKV, D = 6, 2, 48  # GQA 3, Dk 96
DK = HKV * D


def signed_permutation(rng, dk):
    """[dk, dk] with one +-1 per row and column, in random places."""
    u = np.zeros((dk, dk), np.float32)
    u[rng.permutation(dk), np.arange(dk)] = rng.choice([-1.0, 1.0], dk)
    return u


def problem(rng, cfg, b, s, t=1):
    """A prompt of s tokens and t more per sequence; key energy decays along the latent
    coordinates, as calibrated projections see it. Returns (proj, k, v, q, pos)."""
    basis = signed_permutation(rng, cfg.dk)
    proj = np.ascontiguousarray(basis[:, :cfg.resolved_rank()])
    k = structured_keys(rng, (b, s + t, cfg.n_head_kv, cfg.head_dim), basis)
    v = rng.standard_normal((b, s + t, cfg.n_head_kv, cfg.head_dim)).astype(np.float32)
    q = rng.standard_normal((b, t, cfg.n_head_q, cfg.head_dim)).astype(np.float32)
    return proj, k, v, q, positions(b, s + t)


def run(cfg, proj, k, v, q, pos, framework="numpy"):
    """Append the prompt, then the last q.shape[1] tokens, and attend their queries."""
    s = k.shape[1] - q.shape[1]
    kk, vv, qq = (cast(x, cfg.dtype, framework) for x in (k, v, q))
    cache = sals.LayerCache(cfg, rope_for(cfg.head_dim), proj)
    cache.append(kk[:, :s], vv[:, :s], pos[:, :s])
    cache.append(kk[:, s:], vv[:, s:], pos[:, s:])
    return cache, cache.attend(qq, pos[:, s:]), (kk, vv, qq)


# (key_bits, key_group, rank, score_rank): groups of 1 and of whole parts, no rest part,
# a rest part larger than the score part
CASES = [(8, 1, 48, 24), (8, 12, 48, 24), (8, 24, 48, 48), (4, 2, 48, 24), (4, 8, 48, 16),
         (4, 24, 72, 24)]


@pytest.mark.parametrize("select_per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("bits,group,rank,score_rank", CASES)
def test_decode_matches_reference(bits, group, rank, score_rank, select_per_head):
    rng = np.random.default_rng(bits * 100 + group + rank)
    b, s = 2, 211
    cfg = sals.Config(HQ, HKV, D, rank=rank, score_rank=score_rank, key_bits=bits,
                      key_group=group, budget_frac=0.25, select_per_head=select_per_head,
                      dtype="float32", max_batch=b, max_tokens=s + 1)
    proj, k, v, q, pos = problem(rng, cfg, b, s)
    cache, out, _ = run(cfg, proj, k, v, q, pos)
    rope = rope_for(D)
    ref = reference_for(cfg, proj, rope, b)
    ref.append(k, v, pos)
    np.testing.assert_array_equal(cache.lengths(), ref.lengths())
    selection = check_selection(cache, ref, q, rel_tol=1e-4)
    want = ref.attend(q, pos[:, s:], selection=selection)
    assert_close(out, want, np.abs(v).max(), "float32")
    # the quantisation is really active: 16-bit latent keys give a far different output
    # (except with groups of one coordinate: a float16 zero plus a code finer than float16)
    if group > 1:
        ref16 = reference_for(dataclasses.replace(cfg, key_bits=16), proj, rope, b)
        ref16.append(k, v, pos)
        assert np.abs(as64(out) - ref16.attend(q, pos[:, s:])).max() > \
            100 * np.abs(as64(out) - want).max()


@pytest.mark.parametrize("bits,group", [(8, 8), (4, 4)])
def test_dense_layer_and_prefill_chunk(bits, group):
    """Every visible token with rebuilt (dequantised) keys: a dense layer's decode step, and a
    second prefill chunk of 7 queries on a sparse layer."""
    rng = np.random.default_rng(bits + group)
    s, t = 150, 7
    for dense, tq in ((True, 1), (False, t)):
        cfg = sals.Config(HQ, HKV, D, rank=40, score_rank=16, key_bits=bits, key_group=group,
                          dense=dense, dtype="float32", max_tokens=s + tq)
        proj, k, v, q, pos = problem(rng, cfg, 1, s, tq)
        cache, out, _ = run(cfg, proj, k, v, q, pos)
        assert cache.selected()[1][0] == 0
        ref = reference_for(cfg, proj, rope_for(D), 1)
        ref.append(k, v, pos)
        assert_close(out, ref.attend(q, pos[:, s:]), np.abs(v).max(), "float32",
                     what=f"dense={dense}, {tq} queries")


@pytest.mark.parametrize("dtype,framework", [("float16", "numpy"), ("float32", "torch")])
@pytest.mark.parametrize("bits", [8, 4])
def test_storage_and_input_dtypes(bits, dtype, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(bits)
    s = 300
    cfg = sals.Config(HQ, HKV, D, rank=48, score_rank=24, key_bits=bits, key_group=8,
                      value_bits=4, value_group=16, dtype=dtype, max_tokens=s + 1)
    proj, k, v, q, pos = problem(rng, cfg, 1, s)
    cache, out, (kk, vv, qq) = run(cfg, proj, k, v, q, pos, framework)
    assert type(out) is type(qq) and str(out.dtype).endswith(dtype)
    ref = reference_for(cfg, proj, rope_for(D), 1)
    ref.append(as64(kk), as64(vv), pos)
    selection = check_selection(cache, ref, qq, rel_tol=3 * TOL[dtype])
    assert_close(out, ref.attend(as64(qq), pos[:, s:], selection=selection), np.abs(v).max(),
                 dtype)


def test_ragged_batch_equals_per_sequence_and_reference():
    rng = np.random.default_rng(41)
    b, t = 3, 230
    lens = [230, 97, 181]
    cfg = sals.Config(HQ, HKV, D, rank=48, score_rank=24, key_bits=4, key_group=8,
                      budget_frac=0.25, dtype="float32", max_batch=b, max_tokens=t + 1,
                      check_finite=False)
    proj, k, v, q, _ = problem(rng, cfg, b, t)
    pos = np.full((b, t + 1), -1, np.int32)
    for i, n in enumerate(lens):
        pos[i, t - n:] = np.arange(n + 1)
    k[pos < 0] = np.nan  # padding slots must never be read
    v[pos < 0] = np.nan
    batched, out, _ = run(cfg, proj, k, v, q, pos)
    np.testing.assert_array_equal(batched.lengths(), np.array(lens) + 1)
    idx_b, count_b = batched.selected()
    ref = reference_for(cfg, proj, rope_for(D), b)
    ref.append(k, v, pos)
    selection = check_selection(batched, ref, q, rel_tol=1e-4)
    assert_close(out, ref.attend(q, pos[:, t:], selection=selection), np.nanmax(np.abs(v)),
                 "float32")
    for i, n in enumerate(lens):
        sl = slice(t - n, t + 1)
        single, one, _ = run(cfg, proj, k[i:i + 1, sl], v[i:i + 1, sl], q[i:i + 1],
                             pos[i:i + 1, sl])
        np.testing.assert_allclose(out[i], one[0], rtol=0, atol=1e-6)
        idx_s, count_s = single.selected()
        assert count_b[i] == count_s[0]
        assert set(idx_b[i, 0][idx_b[i, 0] >= 0]) == set(idx_s[0, 0][idx_s[0, 0] >= 0])


def test_non_contiguous_inputs():
    """[B, H, T, d] tensors viewed as [B, T, H, d] and a strided out= give the same result as
    contiguous ones."""
    rng = np.random.default_rng(43)
    s = 97
    cfg = sals.Config(HQ, HKV, D, rank=48, score_rank=24, key_bits=8, key_group=4,
                      dtype="float32", max_tokens=s + 1)
    proj, k, v, q, pos = problem(rng, cfg, 1, s)
    _, want, _ = run(cfg, proj, k, v, q, pos)

    def strided(x):
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

    kt, vt, qt = strided(k), strided(v), strided(q)
    assert not kt.flags.c_contiguous
    out_buf = np.zeros((1, 1, HQ, 2 * D), np.float32)
    cache = sals.LayerCache(cfg, rope_for(D), proj)
    cache.append(kt[:, :s], vt[:, :s], pos[:, :s])
    cache.append(kt[:, s:], vt[:, s:], pos[:, s:])
    cache.attend(qt, pos[:, s:], out=out_buf[..., :D])
    np.testing.assert_array_equal(out_buf[..., :D], want)
    assert np.all(out_buf[..., D:] == 0)


@pytest.mark.parametrize("bits,group,rank,score_rank,dtype", [
    (8, 8, 48, 24, "float16"), (4, 2, 48, 24, "float32"), (4, 24, 72, 24, "bfloat16"),
    (8, 48, 48, 48, "float16"), (16, 32, 48, 24, "float16"), (16, 32, 48, 24, "float32")])
def test_memory_accounting(bits, group, rank, score_rank, dtype):
    """latent_keys counts what is held: codes plus a float16 scale and zero per group, or
    rank coordinates in dtype at 16 bits."""
    s = 137
    cfg = sals.Config(HQ, HKV, D, rank=rank, score_rank=score_rank, key_bits=bits,
                      key_group=group, dtype=dtype, max_tokens=s)
    rng = np.random.default_rng(47)
    proj = np.ascontiguousarray(signed_permutation(rng, DK)[:, :rank])
    with sals.LayerCache(cfg, rope_for(D), proj) as cache:
        assert cache.memory()["latent_keys"] == 0
        k = rng.standard_normal((1, s, HKV, D)).astype(np.float32)
        cache.append(k, k, positions(1, s))
        m = cache.memory()
    per_token = rank * 4 if dtype == "float32" else rank * 2
    if bits < 16:
        per_token = rank * bits // 8 + (rank // group) * 2 * 2
    assert m["latent_keys"] == s * per_token
    assert m["total"] == sum(m[f] for f in ("latent_keys", "values", "value_scales",
                                            "exact_window", "positions", "projection"))
    assert m["allocated"] >= m["total"]


def test_sixteen_bit_keys_are_unchanged():
    """key_bits 16 is the default and the presets'; its key_group is not used."""
    assert sals.Config(HQ, HKV, D).key_bits == 16 and sals.Config(HQ, HKV, D).key_group == 32
    for name in ("sals-25", "sals-12.5", "dense-equivalent"):
        assert sals.Config.preset(name, HQ, HKV, D).key_bits == 16
    rng = np.random.default_rng(53)
    cfg = sals.Config(HQ, HKV, D, rank=40, score_rank=20, dtype="float16", max_tokens=120)
    proj, k, v, q, pos = problem(rng, cfg, 1, 119)
    cache, out, _ = run(cfg, proj, k, v, q, pos)
    cfg.key_group = 7
    cache7, out7, _ = run(cfg, proj, k, v, q, pos)
    np.testing.assert_array_equal(out, out7)
    assert cache.memory() == cache7.memory()
    assert cache7.memory()["latent_keys"] == 120 * 40 * 2
