"""Shared construction of test problems for the Python suite."""

from __future__ import annotations

import numpy as np

import sals
from reference import ReferenceCache, check_topk, round_to

# Output tolerance per storage/input dtype, relative to max|v|. Storage rounds every key and
# value once (unit roundoff 2^-24, 2^-11, 2^-8) and the C code accumulates in float32 in another
# order than the float64 reference; a few units of roundoff of the inputs bound the difference.
TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def orthonormal(rng, dk, rank):
    """[dk, rank] with orthonormal columns."""
    q, _ = np.linalg.qr(rng.standard_normal((dk, dk)))
    return np.ascontiguousarray(q[:, :rank]).astype(np.float32)


def structured_keys(rng, shape, basis, decay=0.8):
    """Keys [..., Hkv, d] whose energy decays along `basis` columns (like real pre-RoPE keys),
    so that a low-rank latent ranks tokens meaningfully."""
    dk = basis.shape[0]
    n = int(np.prod(shape[:-2]))
    z = rng.standard_normal((n, dk)) * (decay ** np.arange(dk) * 3 + 0.05)
    return (z @ basis.T).reshape(shape).astype(np.float32)


def rope_for(head_dim, theta=10000.0):
    return sals.Rope.default(head_dim, theta)


def cast(x, dtype, framework="numpy"):
    """x (float32 numpy) in `dtype` of `framework`; bf16 needs torch."""
    if framework == "torch" or dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))
    return x.astype(dtype)


def as64(x):
    """float64 numpy values of a numpy/torch tensor (exactly what sals saw)."""
    if hasattr(x, "detach"):
        return x.detach().float().numpy().astype(np.float64)
    return np.asarray(x, np.float64)


def reference_for(cfg: sals.Config, proj, rope: sals.Rope, batch):
    return ReferenceCache(
        cfg.n_head_q, cfg.n_head_kv, cfg.head_dim, proj, rope.inv_freq,
        score_rank=cfg.resolved_score_rank(), value_bits=cfg.value_bits,
        value_group=cfg.value_group, key_bits=cfg.key_bits, key_group=cfg.key_group,
        n_sink=cfg.n_sink, n_recent=cfg.n_recent,
        budget_frac=cfg.budget_frac, budget_tokens=cfg.budget_tokens,
        select_per_head=cfg.select_per_head, dense=cfg.dense, dtype=cfg.dtype,
        scale=cfg.scale, attention_scaling=rope.attention_scaling,
        interleaved=rope.interleaved, batch=batch)


def check_selection(cache: sals.LayerCache, ref: ReferenceCache, q, rel_tol):
    """Check the cache's last selection against the reference scores (sets, ties within
    rel_tol of the largest score) and return it as ref.attend's `selection` argument."""
    idx, count = cache.selected()
    return check_selected(idx, count, ref, q, rel_tol)


def check_selected(idx, count, ref: ReferenceCache, q, rel_tol):
    """check_selection for a selection given as idx [B, H, N] (-1 padded) and count [B]."""
    q = as64(q)
    selection = []
    for b in range(q.shape[0]):
        scores, cand = ref.scores(b, q[b, 0])
        k = ref.budget(int(ref.lengths()[b]), cand.size)
        assert count[b] == k, f"sequence {b}: selected {count[b]} tokens, expected {k}"
        heads = []
        for h in range(scores.shape[0]):
            chosen = set(int(j) for j in idx[b, h] if j >= 0)
            tol = rel_tol * (np.abs(scores[h]).max() if scores[h].size else 0.0)
            msg = check_topk(chosen, scores[h], cand, k, tol)
            assert not msg, f"sequence {b}, head {h}: {msg}"
            heads.append(chosen)
        selection.append(heads)
    return selection


def assert_close(out, ref, vmax, dtype, what="output"):
    err = np.abs(as64(out) - ref).max()
    bound = TOL[dtype] * vmax
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"


__all__ = ["TOL", "orthonormal", "structured_keys", "rope_for", "cast", "as64", "reference_for",
           "check_selection", "check_selected", "assert_close", "round_to"]


def positions(b, t, start=0):
    """[b, t] int32 positions start..start+t-1 for every sequence."""
    return np.tile(np.arange(start, start + t, dtype=np.int32), (b, 1))


def small_cache(hq, hkv, d, **overrides):
    """A float32 LayerCache with small windows (2 sinks, 4 recent) and a random orthonormal
    projection of the config's rank; ``overrides`` are Config fields."""
    fields = {"dtype": "float32", "max_tokens": 64, "max_batch": 2, "n_sink": 2, "n_recent": 4}
    cfg = sals.Config(hq, hkv, d, **{**fields, **overrides})
    proj = orthonormal(np.random.default_rng(1), hkv * d, cfg.resolved_rank())
    return sals.LayerCache(cfg, rope_for(d), proj)
