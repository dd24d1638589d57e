"""Config presets and defaults, Rope construction."""

import numpy as np
import pytest

import sals


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 32, 128), (9, 3, 64)])
def test_presets_are_the_papers(hq, hkv, d):
    dk = hkv * d
    s25 = sals.Config.preset("sals-25", hq, hkv, d)
    s12 = sals.Config.preset("sals-12.5", hq, hkv, d, max_tokens=100)
    for cfg, frac, bits in ((s25, 4, 4), (s12, 8, 2)):
        assert cfg.resolved_rank() == dk // frac and cfg.value_bits == bits
        assert cfg.resolved_score_rank() == dk // frac // 2
        assert (cfg.budget_frac, cfg.n_sink, cfg.n_recent) == (0.125, 16, 64)
        assert not cfg.select_per_head and not cfg.dense
    assert s12.max_tokens == 100
    dense = sals.Config.preset("dense-equivalent", hq, hkv, d)
    assert dense.resolved_rank() == dense.resolved_score_rank() == dk
    assert dense.value_bits == 16 and dense.budget_frac == 1.0


def test_rank_defaults():
    cfg = sals.Config(8, 2, 64)
    assert cfg.dk == 128 and cfg.resolved_rank() == 128 and cfg.resolved_score_rank() == 128
    cfg.rank = 40
    assert cfg.resolved_score_rank() == 20
    cfg.score_rank = 7
    assert cfg.resolved_score_rank() == 7


def test_cache_reports_the_resolved_config():
    cfg = sals.Config.preset("sals-25", 4, 2, 64, max_tokens=16, dtype="bfloat16")
    proj = np.linalg.qr(np.random.default_rng(0).standard_normal((128, 128)))[0][:, :32]
    with sals.LayerCache(cfg, sals.Rope.default(64), proj.astype(np.float32)) as cache:
        c = cache._c.config()
    assert (c["rank"], c["score_rank"], c["value_bits"], c["dtype"]) == (32, 16, 4, 2)
    assert (c["device_type"], c["device_id"], c["max_tokens"]) == (1, 0, 16)
    assert (c["key_bits"], c["key_group"]) == (16, 32)
    cfg.key_bits, cfg.key_group = 4, 8
    with sals.LayerCache(cfg, sals.Rope.default(64), proj.astype(np.float32)) as cache:
        assert (cache._c.config()["key_bits"], cache._c.config()["key_group"]) == (4, 8)


_HUGE_IDS = ["tokens", "window-sum", "window", "rows", "oom"]


@pytest.mark.parametrize("fields,error,message", ids=_HUGE_IDS, argvalues=[
    (dict(max_batch=2**20, max_tokens=2**31 - 1), sals.InvalidArgumentError,
     r"^config\.max_batch, config\.max_tokens: max_batch 1048576 \* max_tokens 2147483647 token "
     r"slots would take about [\d.]+e\+17 bytes, more than the 2\^52"),
    (dict(n_sink=2**30, n_recent=2**30), sals.InvalidArgumentError,
     r"^config\.n_sink, config\.n_recent: n_sink 1073741824 \+ n_recent 1073741824 is more than "
     r"2147483647$"),
    (dict(max_batch=2**20, n_sink=2**30), sals.InvalidArgumentError,
     r"^config\.max_batch, config\.n_sink, config\.n_recent: max_batch 1048576 \* \(n_sink "
     r"1073741824 \+ n_recent 64\) exact window slots would take about"),
    (dict(n_head_q=2**30, max_batch=2), sals.InvalidArgumentError,
     r"^config\.max_batch, config\.n_head_q: max_batch 2 \* n_head_q 1073741824 query rows are "
     r"more than 2147483647$"),
    # Within the bound, but its 2^49-byte value store exceeds every address space.
    (dict(max_batch=2**13, max_tokens=2**30), sals.OutOfMemoryError,
     r"^config\.max_batch, config\.max_tokens: out of host memory allocating the cache \(\d+ "
     r"bytes\); the largest part is max_batch 8192 \* max_tokens 1073741824 token slots "
     r"\(about [\d.]+e\+15 bytes\)$"),
])
def test_huge_fields_are_named(fields, error, message):
    """Sizes that overflow, or that no device could hold, were an out-of-memory error naming no
    field; now the fields responsible are named."""
    cfg = sals.Config(**(dict(n_head_q=4, n_head_kv=2, head_dim=8, rank=16, dtype="float32")
                         | fields))
    proj = np.eye(16, dtype=np.float32)
    with pytest.raises(error, match=message):
        sals.LayerCache(cfg, sals.Rope.default(8), proj)


def test_rope_inputs():
    torch = pytest.importorskip("torch")
    r = sals.Rope(torch.tensor([1.0, 0.5], requires_grad=True), attention_scaling=2.0,
                  interleaved=True)
    assert r.rotary_dim == 4 and r.inv_freq.dtype == np.float32
    assert r.attention_scaling == 2.0 and r.interleaved
    d = sals.Rope.default(8, theta=100.0)
    np.testing.assert_allclose(d.inv_freq, 100.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert sals.Rope.none().rotary_dim == 0


@pytest.mark.parametrize("fields,message", [
    (dict(n_sink=-1), r"^config\.n_sink: -1 must be >= 0$"),
    (dict(n_head_q=6), r"^config\.n_head_q: 6 is not a multiple of n_head_kv 4$"),
    (dict(rank=40), r"^config\.rank: 40 > Dk 32"),
    (dict(value_bits=3), r"^config\.value_bits: 3 not one of 16, 8, 4, 2$"),
    (dict(budget_frac=1.5), r"^config\.budget_frac: 1\.5 not in \(0, 1\]$"),
    (dict(n_threads=5000), r"^config\.n_threads: 5000 must be <= 1024"),
])
def test_check_refuses_what_a_cache_would(fields, message):
    """Config.check makes the C library's checks of a cache's config (sals_config_check)
    without making one: the same error, naming the field."""
    cfg = sals.Config(**(dict(n_head_q=8, n_head_kv=4, head_dim=8) | fields))
    with pytest.raises(sals.InvalidArgumentError, match=message):
        cfg.check()
    with pytest.raises(sals.InvalidArgumentError, match=message):
        sals.LayerCache(cfg, sals.Rope.default(8), np.eye(32, dtype=np.float32)[:, :cfg.resolved_rank()])


def test_check_passes_a_valid_config():
    assert sals.Config.preset("sals-25", 8, 4, 64).check() is None
