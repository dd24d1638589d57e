"""The memory-targeted preset's rule (sals.hf.auto.plan): its byte count is the cache's own,
it meets the target, spends rank where the spectrum is flat, and refuses unreachable
targets. numpy only (the rule needs no model)."""

import numpy as np
import pytest
import sals
from sals.hf import auto


def calibration(decays, dk=64, rank_frac=1.0):
    rng = np.random.default_rng(0)
    cal = sals.Calibrator([dk] * len(decays))
    for i, decay in enumerate(decays):
        basis, _ = np.linalg.qr(rng.standard_normal((dk, dk)))
        cal.update(i, (rng.standard_normal((2000, dk)) * decay ** np.arange(dk)) @ basis.T)
    return cal.finish(rank_frac=rank_frac)


@pytest.mark.parametrize("rank,bits,group,tokens", [(16, 2, 32, 300), (5, 4, 16, 97),
                                                    (64, 16, 32, 50), (8, 8, 32, 17)])
def test_layer_bytes_is_what_the_cache_holds(rank, bits, group, tokens):
    hkv, d = 2, 32
    cfg = sals.Config(4, hkv, d, rank=rank, value_bits=bits, value_group=group, max_tokens=512)
    proj = np.linalg.qr(np.random.default_rng(1).standard_normal((hkv * d, rank)))[0]
    rng = np.random.default_rng(2)
    with sals.LayerCache(cfg, sals.Rope.default(d), proj.astype(np.float32)) as cache:
        k = rng.standard_normal((1, tokens, hkv, d)).astype(np.float32)
        cache.append(k, k, np.arange(tokens, dtype=np.int32)[None])
        held = cache.memory()["total"]
    assert auto.layer_bytes(hkv * d, rank, bits, group, tokens, 16, 64) == held


@pytest.mark.parametrize("fraction,context", [(0.156, 0), (0.2, 4096), (0.35, 2048), (0.6, 0)])
def test_plan_meets_the_target(fraction, context):
    calib = calibration([0.95, 0.8, 0.9])
    plans = auto.plan(calib, [(i, 2, 32) for i in range(3)], fraction, context)
    spent = sum(p.bytes for p in plans) / sum(p.dense_fp16 for p in plans)
    assert spent <= fraction
    # no single further step fits: within one rank step (or value upgrade) of the target
    step = max(auto.layer_bytes(64, p.rank + 2, p.value_bits, p.value_group, context)
               - p.bytes for p in plans) / sum(p.dense_fp16 for p in plans)
    assert spent > fraction - 3 * step
    for p in plans:
        assert 1 <= p.score_rank <= p.rank <= 64 and p.value_bits in (2, 4, 8, 16)


def test_rank_goes_where_the_spectrum_is_flat_and_grows_with_the_target():
    calib = calibration([0.7, 0.97])        # layer 1 needs many more directions
    layers = [(0, 2, 32), (1, 2, 32)]
    low = auto.plan(calib, layers, 0.2, 0)
    high = auto.plan(calib, layers, 0.4, 0)
    assert low[1].rank > low[0].rank
    assert all(h.rank >= lo.rank and h.value_bits >= lo.value_bits for h, lo in zip(high, low))
    assert all(h.key_energy >= lo.key_energy for h, lo in zip(high, low))


def test_ranks_stay_within_the_calibration():
    calib = calibration([0.97, 0.97], rank_frac=0.25)
    plans = auto.plan(calib, [(0, 2, 32), (1, 2, 32)], 0.9, 0)
    assert all(p.rank <= 16 for p in plans)


def test_unreachable_target_names_the_floor():
    calib = calibration([0.9])
    with pytest.raises(sals.InvalidArgumentError, match="kv_fraction: 0.05 is below") as e:
        auto.plan(calib, [(0, 2, 32)], 0.05, 1024)
    assert "exact windows alone cost" in str(e.value)
    with pytest.raises(sals.InvalidArgumentError, match="kv_fraction"):
        auto.plan(calib, [(0, 2, 32)], 1.5)


def test_value_error_model():
    assert auto.value_error(16, 32) == 0.0
    assert auto.value_error(2, 32) > auto.value_error(4, 32) > auto.value_error(8, 32) > 0
    assert auto.value_error(2, 128) > auto.value_error(2, 32)
