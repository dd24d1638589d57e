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


@pytest.mark.parametrize("rank,bits,group,tokens,key_bits", [
    (16, 2, 32, 300, 16), (5, 4, 16, 97, 16), (64, 16, 32, 50, 16), (8, 8, 32, 17, 16),
    (32, 2, 32, 300, 4), (64, 4, 16, 97, 8), (64, 16, 32, 50, 4)])
def test_layer_bytes_is_what_the_cache_holds(rank, bits, group, tokens, key_bits):
    hkv, d = 2, 32
    cfg = sals.Config(4, hkv, d, rank=rank, score_rank=rank if key_bits < 16 else None,
                      value_bits=bits, value_group=group, key_bits=key_bits,
                      key_group=auto.KEY_GROUP, max_tokens=512)
    proj = np.linalg.qr(np.random.default_rng(1).standard_normal((hkv * d, rank)))[0]
    rng = np.random.default_rng(2)
    with sals.LayerCache(cfg, sals.Rope.default(d), proj.astype(np.float32)) as cache:
        k = rng.standard_normal((1, tokens, hkv, d)).astype(np.float32)
        cache.append(k, k, np.arange(tokens, dtype=np.int32)[None])
        held = cache.memory()["total"]
    assert auto.layer_bytes(hkv * d, rank, bits, group, tokens, 16, 64, key_bits=key_bits) == held


@pytest.mark.parametrize("quantised", [True, False])
@pytest.mark.parametrize("fraction,context", [(0.156, 0), (0.2, 4096), (0.35, 2048), (0.6, 0)])
def test_plan_meets_the_target(fraction, context, quantised):
    calib = calibration([0.95, 0.8, 0.9])
    plans = auto.plan(calib, [(i, 2, 32) for i in range(3)], fraction, context,
                      quantised_keys=quantised)
    spent = sum(p.bytes for p in plans) / sum(p.dense_fp16 for p in plans)
    assert spent <= fraction
    # no single further step fits: within one rank step (or format upgrade) of the target
    step = max(auto.layer_bytes(64, p.rank + (p.key_group if p.key_bits < 16 else 2),
                                p.value_bits, p.value_group, context, key_bits=p.key_bits)
               - p.bytes for p in plans) / sum(p.dense_fp16 for p in plans)
    assert spent > fraction - 3 * step
    for p in plans:
        assert 1 <= p.score_rank <= p.rank <= 64 and p.value_bits in (2, 4, 8, 16)
        assert p.key_bits in ((4, 8, 16) if quantised else (16,))
        if p.key_bits < 16:  # whole groups in the scoring part and the rest
            assert p.rank % p.key_group == 0 and p.score_rank % p.key_group == 0


def test_key_error_model():
    eig = np.array([8.0] + [1.0] * 63)
    assert auto.key_error(eig, 64, 16) == 0.0
    assert auto.key_error(eig, 32, 16) == pytest.approx(32 / 71)
    # the leading coordinate's group pays for its range: 4-bit codes there cost more than
    # 8-bit ones, and more than the same codes on a flat spectrum
    assert auto.key_error(eig, 64, 4) > auto.key_error(eig, 64, 8) > 0
    flat = np.ones(64)
    assert auto.key_error(eig, 64, 4) > auto.key_error(flat, 64, 4)


def test_quantised_keys_buy_rank_at_the_same_bytes():
    calib = calibration([0.99, 0.99], dk=256)
    layers = [(0, 2, 128), (1, 2, 128)]
    fp16 = auto.plan(calib, layers, 0.156, 0, quantised_keys=False)
    quantised = auto.plan(calib, layers, 0.156, 0)
    assert all(q.rank > f.rank and q.key_bits < 16 for q, f in zip(quantised, fp16))
    assert sum(q.key_error for q in quantised) < sum(f.key_error for f in fp16)


def test_rank_goes_where_the_spectrum_is_flat_and_grows_with_the_target():
    calib = calibration([0.7, 0.97], dk=256)  # layer 1 needs many more directions
    layers = [(0, 2, 128), (1, 2, 128)]
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


@pytest.mark.parametrize("fraction,context", [(0.6, 0), (0.7, 2048)])
def test_exact_dense_layers_take_their_share_of_the_target(fraction, context):
    """Two layers planned beside one exact float16 layer of Dk 64: the target is a fraction of
    the three layers' dense fp16 K+V, of which the exact layer holds a third (2 * Dk * 2 bytes
    per token): the planned ones get what is left, and less than without it."""
    calib = calibration([0.95, 0.8, 0.9])
    layers = [(1, 2, 32), (2, 2, 32)]
    plans = auto.plan(calib, layers, fraction, context, exact=[(64, 2)])
    per_seq = max(context, 1)
    dense = 3 * 4 * 64 * per_seq
    exact = 2 * 64 * 2 * per_seq
    spent = sum(p.bytes for p in plans) + exact
    assert spent <= fraction * dense
    step = max(auto.layer_bytes(64, p.rank + (p.key_group if p.key_bits < 16 else 2),
                                p.value_bits, p.value_group, context, key_bits=p.key_bits)
               - p.bytes for p in plans)
    assert spent > fraction * dense - 3 * step
    alone = auto.plan(calib, layers, fraction, context)
    assert sum(p.bytes for p in plans) < sum(p.bytes for p in alone)
    # four exact layers beside the two: 4/6 of dense already
    with pytest.raises(sals.InvalidArgumentError,
                       match=r"kv_fraction: 0.6 is below .*the exact dense layers 0.6667\)"):
        auto.plan(calib, layers, 0.6, context, exact=[(64, 2)] * 4)
