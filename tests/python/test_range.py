"""Sequence ranges (``first=``) of LayerCache and the torch operators: a cache filled one
sequence at a time, in chunks, in any order, attends exactly as one filled with the whole batch
and as the float64 reference; a range attend reports its own sequences' selection; a range
reset empties its sequences only; a bad ``first`` is refused, naming it, with nothing changed."""

import numpy as np
import pytest

import sals
from pysuite import (as64, assert_close, check_selection, orthonormal, reference_for,
                     rope_for, structured_keys)

HQ, HKV, D, B, T = 8, 2, 32, 4, 90
LENS = [90, 17, 55, 3]  # left-padded in the [B, T] batch; 3 and 17 are inside the windows


def _problem(seed=3, **fields):
    """A config (float32 storage, small windows, a quarter of the candidates selected), its
    projection and rope, and a left-padded batch: k, v [B, T + 1, HKV, D] (the last column is
    each sequence's decode token), q [B, 1, HQ, D], pos [B, T + 1] (-1 at padding)."""
    rng = np.random.default_rng(seed)
    cfg = sals.Config(HQ, HKV, D, **{"rank": 32, "dtype": "float32", "max_batch": B,
                                     "max_tokens": T + 1, "n_sink": 4, "n_recent": 8,
                                     "budget_frac": 0.25, "value_group": 16, **fields})
    proj = orthonormal(rng, HKV * D, cfg.resolved_rank())
    k = structured_keys(rng, (B, T + 1, HKV, D), orthonormal(rng, HKV * D, HKV * D))
    v = rng.standard_normal((B, T + 1, HKV, D)).astype(np.float32)
    q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
    pos = np.full((B, T + 1), -1, np.int32)
    for b, n in enumerate(LENS):
        pos[b, T - n:] = np.arange(n + 1)
    return cfg, proj, rope_for(D), k, v, q, pos


def _by_sequence(cache, k, v, pos, order, chunks):
    """Each sequence's real tokens alone, in chunks, sequences in `order`."""
    for b in order:
        start, c = T - LENS[b], 0
        while start < T:
            n = min(chunks[c % len(chunks)], T - start)
            cache.append(k[b:b + 1, start:start + n], v[b:b + 1, start:start + n],
                         pos[b:b + 1, start:start + n], first=b)
            start, c = start + n, c + 1


@pytest.mark.parametrize("fields", [{}, {"value_bits": 4, "rank": 24, "score_rank": 12},
                                    {"select_per_head": True, "key_bits": 8, "key_group": 8},
                                    {"dense": True}])
def test_filling_by_sequence_equals_the_batch_and_the_reference(fields):
    cfg, proj, rope, k, v, q, pos = _problem(**fields)
    whole = sals.LayerCache(cfg, rope, proj)
    whole.append(k[:, :T], v[:, :T], pos[:, :T])
    single = sals.LayerCache(cfg, rope, proj)
    _by_sequence(single, k, v, pos, order=[2, 0, 3, 1], chunks=[11, 1, 30])
    ref = reference_for(cfg, proj, rope, B)
    ref.append(k[:, :T], v[:, :T], pos[:, :T])
    np.testing.assert_array_equal(single.lengths(), LENS)
    for cache in (whole, single):  # the decode token of the whole batch
        cache.append(k[:, T:], v[:, T:], pos[:, T:])
    ref.append(k[:, T:], v[:, T:], pos[:, T:])

    want = whole.attend(q, pos[:, T:])
    np.testing.assert_array_equal(single.attend(q, pos[:, T:]), want)
    selection = None if cfg.dense else check_selection(single, ref, q, 1e-4)
    vmax = np.abs(v).max()
    assert_close(want, ref.attend(q, pos[:, T:], selection), vmax, "float32")
    # sequence by sequence again, attending one at a time
    whole_idx, whole_count = whole.selected()
    for b in (3, 1, 0, 2):
        one = single.attend(q[b:b + 1], pos[b:b + 1, T:], first=b)
        np.testing.assert_allclose(one[0], want[b], rtol=0, atol=1e-6)
        idx, count = single.selected()
        assert count.tolist() == [whole_count[b]]
        for h in range(idx.shape[1]):
            assert set(idx[0, h][idx[0, h] >= 0]) == set(whole_idx[b, h][whole_idx[b, h] >= 0])


def test_a_range_attend_keeps_the_other_selections():
    cfg, proj, rope, k, v, q, pos = _problem()
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(k, v, pos)
    cache.attend(q, pos[:, T:])
    idx, count = cache.selected()
    assert count[0] > 0 and count[2] > 0
    # a multi-token attend of sequences 1..2 drops their selection only
    cache.attend(np.repeat(q[1:3], 2, 1), pos[1:3, T - 1:], first=1)
    assert cache.selected()[1].tolist() == [0, 0]
    cache.attend(q[:1], pos[:1, T:], first=0)  # sequence 0 alone: as before
    idx0, count0 = cache.selected()
    assert count0.tolist() == [count[0]]
    assert set(idx0[0, 0][idx0[0, 0] >= 0]) == set(idx[0, 0][idx[0, 0] >= 0])


def test_reserve_per_sequence_and_reset_a_range():
    """One sequence full does not stop another; a range reset empties its sequences only, and a
    sequence admitted into a reset slot attends as it would in a fresh cache."""
    cfg, proj, rope, k, v, q, pos = _problem()
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(k[:1], v[:1], pos[:1], first=0)  # T + 1 = max_tokens slots of sequence 0
    with pytest.raises(sals.CapacityError, match="for sequence 0 would reserve"):
        cache.append(k[:1, :1], v[:1, :1], pos[:1, :1], first=0)
    cache.append(k[1:], v[1:], pos[1:], first=1)
    cache.attend(q, pos[:, T:])
    count = cache.selected()[1]
    cache.reset(first=1, batch=2)
    np.testing.assert_array_equal(cache.lengths(), [LENS[0] + 1, 0, 0, LENS[3] + 1])
    assert cache.selected()[1].tolist() == [count[0], 0, 0, count[3]]
    # admit sequence 0's tokens into slot 2 (reservations were reset too)
    cache.append(k[:1], v[:1], pos[:1], first=2)
    fresh = sals.LayerCache(cfg, rope, proj)
    fresh.append(k[:1], v[:1], pos[:1])
    np.testing.assert_array_equal(cache.attend(q[:1], pos[:1, T:], first=2),
                                  fresh.attend(q[:1], pos[:1, T:]))
    cache.reset(first=3)
    assert cache.lengths().tolist() == [LENS[0] + 1, 0, LENS[0] + 1, 0]
    cache.reset()
    assert cache.lengths().tolist() == [0] * B


@pytest.mark.parametrize("call", ["append", "attend", "reset"])
@pytest.mark.parametrize("first,error,message", [
    (-1, sals.InvalidArgumentError, "first: -1 must be >= 0"),
    (3, sals.CapacityError, r"first: 3 \+ batch 2 of (k|q) > max_batch 4|first: 3 \+ batch 2 >"),
    (5, sals.CapacityError, r"first: 5 \+ batch"),
    (True, sals.InvalidArgumentError, "first: expected an int, got bool"),
    (1.0, sals.InvalidArgumentError, "first: expected an int, got float"),
    (None, sals.InvalidArgumentError, "first: expected an int, got NoneType"),
])
def test_a_bad_first_is_named_and_changes_nothing(call, first, error, message):
    cfg, proj, rope, k, v, q, pos = _problem()
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(k[:, :T], v[:, :T], pos[:, :T])
    before = cache.attend(q, pos[:, T:])
    with pytest.raises(error, match=message):
        if call == "append":
            cache.append(k[:2, T:], v[:2, T:], pos[:2, T:], first=first)
        elif call == "attend":
            cache.attend(q[:2], pos[:2, T:], first=first)
        else:
            cache.reset(first=first, batch=2)
    np.testing.assert_array_equal(cache.lengths(), LENS)
    np.testing.assert_array_equal(cache.attend(q, pos[:, T:]), before)
    # every sequence still takes its decode token: nothing was reserved by the refused call
    cache.append(k[:, T:], v[:, T:], pos[:, T:])


def test_reset_refuses_a_bad_batch():
    cfg, proj, rope, *_ = _problem()
    cache = sals.LayerCache(cfg, rope, proj)
    with pytest.raises(sals.InvalidArgumentError, match="batch: -1 must be >= 0"):
        cache.reset(first=1, batch=-1)
    with pytest.raises(sals.InvalidArgumentError, match="batch: expected an int, got str"):
        cache.reset(batch="2")
    with pytest.raises(sals.CapacityError, match="batch: 5 > max_batch 4"):
        cache.reset(batch=5)


# ---- the torch operators ----------------------------------------------------------------------

def test_operators_take_a_range():
    torch = pytest.importorskip("torch")
    torch_ops = pytest.importorskip("sals.torch_ops")
    cfg, proj, rope, k, v, q, pos = _problem()
    eager, op = sals.LayerCache(cfg, rope, proj), sals.LayerCache(cfg, rope, proj)
    h, order = torch_ops.handle(op), torch_ops.order_tensor("cpu")
    kt, vt, qt, pt = (torch.from_numpy(x) for x in (k, v, q, pos))
    for b in (1, 3, 0, 2):
        eager.append(k[b:b + 1], v[b:b + 1], pos[b:b + 1], first=b)
        torch.ops.sals.cache_append(kt[b:b + 1], vt[b:b + 1], pt[b:b + 1], order, h, b)
    for first, n in ((0, 2), (2, 2), (3, 1)):
        want = eager.attend(q[first:first + n], pos[first:first + n, T:], first=first)
        got = torch.ops.sals.cache_attend(qt[first:first + n], pt[first:first + n, T:], order, h,
                                          first=first)
        np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(sals.CapacityError, match=r"first: 3 \+ batch 2 of q"):
        torch.ops.sals.cache_attend(qt[:2], pt[:2, T:], order, h, 3)
    torch.library.opcheck(torch.ops.sals.cache_attend, (qt[:1], pt[:1, T:], order, h, 2),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_serves_every_row_range_without_a_graph_break():
    """``first`` is a SymInt: after the second value dynamo makes it a graph input instead of
    compiling once per row range (an int would hit the recompile limit with fullgraph)."""
    torch = pytest.importorskip("torch")
    torch_ops = pytest.importorskip("sals.torch_ops")
    from torch._dynamo.utils import counters

    cfg, proj, rope, k, v, q, pos = _problem()
    cache = sals.LayerCache(cfg, rope, proj)
    cache.append(k[:, :T], v[:, :T], pos[:, :T])
    eager = sals.LayerCache(cfg, rope, proj)
    eager.append(k[:, :T], v[:, :T], pos[:, :T])
    h, order = torch_ops.handle(cache), torch_ops.order_tensor("cpu")

    def step(first, k1, v1, q1, p1):
        torch.ops.sals.cache_append(k1, v1, p1, order, h, first)
        return torch.ops.sals.cache_attend(q1, p1, order, h, first)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for first in (2, 0, 3, 1):
        s = slice(first, first + 1)
        got = compiled(first, *(torch.from_numpy(x[s, T:]) for x in (k, v)),
                       torch.from_numpy(q[s]), torch.from_numpy(pos[s, T:]))
        eager.append(k[s, T:], v[s, T:], pos[s, T:], first=first)
        np.testing.assert_array_equal(got.numpy(), eager.attend(q[s], pos[s, T:], first=first))
    assert counters["stats"]["unique_graphs"] <= 2
    np.testing.assert_array_equal(cache.lengths(), np.array(LENS) + 1)


def test_float16_storage_range_fill_matches_the_reference():
    """The same through 16-bit storage: exact equality with the batch fill, reference within
    the float16 tolerance."""
    cfg, proj, rope, k, v, q, pos = _problem(dtype="float16", value_bits=2)
    whole = sals.LayerCache(cfg, rope, proj)
    whole.append(k, v, pos)
    single = sals.LayerCache(cfg, rope, proj)
    _by_sequence(single, k, v, pos, order=[3, 2, 1, 0], chunks=[7])
    single.append(k[:, T:], v[:, T:], pos[:, T:])
    ref = reference_for(cfg, proj, rope, B)
    ref.append(k, v, pos)
    out = single.attend(q, pos[:, T:])
    np.testing.assert_array_equal(out, whole.attend(q, pos[:, T:]))
    selection = check_selection(single, ref, q, 1e-3)
    assert_close(out, ref.attend(as64(q), pos[:, T:], selection), np.abs(v).max(), "float16")


def test_cuda_range_fill_equals_the_batch_and_the_cpu():
    """On CUDA (skipped without one): sequence by sequence in chunks gives the whole-batch
    fill's decode output and the CPU's within float32 rounding (on CUDA the projection's kernel
    depends on the rows per append), with the same selections; a range attend gives each
    sequence its whole-batch output."""
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and sals.cuda_available()):
        pytest.skip("needs a CUDA device and sals built with CUDA")
    cfg, proj, rope, k, v, q, pos = _problem(value_bits=4, rank=24, score_rank=12)
    kt, vt, qt, pt = (torch.from_numpy(x).cuda() for x in (k, v, q, pos))
    outs, sels = {}, {}
    for name, device in (("whole", "cuda"), ("single", "cuda"), ("cpu", "cpu")):
        cache = sals.LayerCache(cfg, rope, proj, device=device)
        if name == "single":
            _by_sequence(cache, kt, vt, pt, order=[2, 0, 3, 1], chunks=[11, 1, 30])
            cache.append(kt[:, T:], vt[:, T:], pt[:, T:])
        elif name == "whole":
            cache.append(kt, vt, pt)
        else:
            cache.append(k, v, pos)
        x, p = (q, pos) if device == "cpu" else (qt, pt)
        out = cache.attend(x, p[:, T:])
        outs[name] = out.cpu().numpy() if hasattr(out, "cpu") else out
        sels[name] = cache.selected()
        if name == "single":
            for b in range(B):
                one = cache.attend(qt[b:b + 1], pt[b:b + 1, T:], first=b)
                np.testing.assert_allclose(one[0].cpu().numpy(), outs["single"][b], rtol=0,
                                           atol=1e-6)
    np.testing.assert_allclose(outs["single"], outs["whole"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outs["single"], outs["cpu"], rtol=0, atol=1e-4)
    for name in ("single", "cpu"):
        np.testing.assert_array_equal(sels[name][1], sels["whole"][1])
        for b in range(B):
            want = set(sels["whole"][0][b, 0][sels["whole"][0][b, 0] >= 0])
            assert set(sels[name][0][b, 0][sels[name][0][b, 0] >= 0]) == want, (name, b)
