"""sals.PagedLayer (sals_paged_*): tokens in caller-owned pages, against the float64 reference
(no exact windows: paged storage rebuilds sinks and recent tokens too) and dense attention."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import sals
from pysuite import (as64, assert_close, cast, check_selected, orthonormal, reference_for,
                     rope_for, structured_keys)
from reference import dense_attention, quantize


# ---- building paged problems -----------------------------------------------------------------

def place(rng, lengths, block_size, spare=3):
    """Random, disjoint block placement of sequences of `lengths` tokens: (block_table
    [B, max_blocks] int32, num_blocks). Unused table entries hold garbage the library must not
    read, and a few blocks of the pages belong to no sequence."""
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + spare
    order = rng.permutation(num_blocks).astype(np.int32)
    width = max(max(need), 1) + 1
    table = np.full((len(lengths), width), 10**6, np.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = order[at:at + n]
        at += n
    return table, num_blocks


def slot_mapping(table, block_size, b, tokens):
    """Slots (block * block_size + offset) of sequence b's token indices."""
    tokens = np.asarray(tokens)
    return (table[b, tokens // block_size] * block_size + tokens % block_size).astype(np.int32)


def store(layer, ks, vs, table, num_blocks, block_size, chunks=1):
    """Pages holding every sequence's tokens (ks[b], vs[b]: [S_b, Hkv, d]), appended in
    `chunks` calls that each take a piece of every sequence."""
    pages = np.zeros((num_blocks, block_size, layer.slot_bytes), np.uint8)
    for c in range(chunks):
        k_parts, v_parts, s_parts = [], [], []
        for b, (k, v) in enumerate(zip(ks, vs)):
            lo, hi = len(k) * c // chunks, len(k) * (c + 1) // chunks
            k_parts.append(k[lo:hi])
            v_parts.append(v[lo:hi])
            s_parts.append(slot_mapping(table, block_size, b, np.arange(lo, hi)))
        layer.append(np.concatenate(k_parts), np.concatenate(v_parts), np.concatenate(s_parts),
                     pages)
    return pages


def problem(rng, lengths, hq, hkv, d, proj=None):
    """Per sequence keys and values [S_b, Hkv, d], key energy decaying along a basis led by
    proj's columns (as calibrated projections see it)."""
    dk = hkv * d
    basis = orthonormal(rng, dk, dk)
    if proj is not None:
        extra = rng.standard_normal((dk, dk - proj.shape[1]))
        basis, _ = np.linalg.qr(np.concatenate([proj, extra], 1))
    ks = [structured_keys(rng, (n, hkv, d), basis) for n in lengths]
    vs = [rng.standard_normal((n, hkv, d)).astype(np.float32) for n in lengths]
    return ks, vs


def queries(rng, n_queries, hq, d):
    """Packed queries of every sequence and query_start [B + 1]."""
    q = rng.standard_normal((sum(n_queries), hq, d)).astype(np.float32)
    return q, np.concatenate([[0], np.cumsum(n_queries)]).astype(np.int32)


def reference_out(cfg, proj, rope, ks, vs, q, qs, selections=None):
    """The float64 reference, sequence by sequence: no exact windows, token i at position i."""
    out = np.zeros(q.shape)
    for b, (k, v) in enumerate(zip(ks, vs)):
        n = qs[b + 1] - qs[b]
        if n == 0:
            continue
        ref = reference_for(cfg, proj, rope, 1)
        ref.exact_windows = False
        s = len(k)
        ref.append(k[None], v[None], np.arange(s, dtype=np.int32)[None])
        sel = None if selections is None or selections[b] is None else [selections[b]]
        got = ref.attend(q[None, qs[b]:qs[b + 1]], np.arange(s - n, s, dtype=np.int32)[None],
                         selection=sel)
        out[qs[b]:qs[b + 1]] = got[0]
    return out


# ---- slot layout --------------------------------------------------------------------------

def documented_slot_bytes(cfg: sals.Config) -> int:
    """sals.h's slot layout, summed independently of the library."""
    e = 4 if cfg.dtype == "float32" else 2
    dk, r = cfg.dk, cfg.resolved_rank()
    size, align = 0, 1
    if cfg.key_bits == 16:
        size, align = size + r * e, e
    if cfg.value_bits == 16:
        size, align = size + dk * e, e
    if cfg.key_bits < 16:
        size, align = size + 4 * r // cfg.key_group + r * cfg.key_bits // 8, max(align, 2)
    if cfg.value_bits < 16:
        size, align = size + 4 * dk // cfg.value_group + dk * cfg.value_bits // 8, max(align, 2)
    return -(-size // align) * align


LAYOUTS = {
    "dense-f32": dict(rank=64, score_rank=64, dtype="float32"),
    "sals-25-f16": dict(rank=16, score_rank=8, value_bits=4, dtype="float16"),
    "keys4-values2": dict(rank=32, score_rank=16, key_bits=4, key_group=8, value_bits=2,
                          dtype="bfloat16"),
    "keys8-f32-values16": dict(rank=48, score_rank=16, key_bits=8, key_group=16, dtype="float32"),
    "odd-padding": dict(rank=3, score_rank=1, value_bits=8, value_group=16, dtype="float16"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_slot_bytes_follow_the_documented_layout(name):
    cfg = sals.Config(4, 2, 32, **LAYOUTS[name])
    assert sals.PagedLayer.slot_bytes_for(cfg) == documented_slot_bytes(cfg)


def test_slots_hold_the_documented_fields():
    """Decode a slot byte by byte as sals.h documents it: 4-bit latent keys and 2-bit values
    with their float16 scales and zeros, against the reference quantisation."""
    rng = np.random.default_rng(0)
    hq, hkv, d = 4, 2, 32
    cfg = sals.Config(hq, hkv, d, rank=32, score_rank=16, key_bits=4, key_group=8,
                      value_bits=2, value_group=16, dtype="float16")
    proj = orthonormal(rng, hkv * d, 32)
    layer = sals.PagedLayer(cfg, rope_for(d), proj)
    k = rng.standard_normal((3, hkv, d)).astype(np.float32)
    v = rng.standard_normal((3, hkv, d)).astype(np.float32)
    pages = np.zeros((2, 4, layer.slot_bytes), np.uint8)
    layer.append(k, v, np.array([6, 1, -1], np.int32), pages)
    assert not pages[1, 3].any() and not pages[0, 0].any()  # slots 7 and 0 untouched
    dk = hkv * d
    ngk, ngv = 32 // 8, dk // 16
    for n, slot in ((0, pages[1, 2]), (1, pages[0, 1])):
        f16 = slot[:4 * ngk + 4 * ngv].view(np.float16).astype(np.float64)
        key_scale = np.concatenate([f16[0:2], f16[4:6]])
        key_zero = np.concatenate([f16[2:4], f16[6:8]])
        val_scale, val_zero = f16[8:8 + ngv], f16[8 + ngv:8 + 2 * ngv]
        at = 4 * ngk + 4 * ngv
        key_codes = slot[at:at + 16]
        val_codes = slot[at + 16:at + 16 + dk // 4]
        assert layer.slot_bytes == at + 16 + dk // 4
        # values: exactly the reference's quantisation of v
        codes, sc, zr = quantize(v[n].reshape(1, dk), 2, 16)
        np.testing.assert_array_equal(val_scale, sc[0])
        np.testing.assert_array_equal(val_zero, zr[0])
        unpacked = np.stack([(val_codes >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)
        np.testing.assert_array_equal(unpacked, codes[0])
        # latent keys: the two parts' 4-bit codes dequantise to U^T k within the code step
        nibbles = np.stack([key_codes & 15, key_codes >> 4], 1).reshape(-1).astype(np.float64)
        lat = np.repeat(key_zero, 8) + nibbles * np.repeat(key_scale, 8)
        want = k[n].reshape(dk).astype(np.float64) @ proj.astype(np.float64)
        assert np.all(np.abs(lat - want) <= 0.5 * np.repeat(key_scale, 8) * 1.001 + 1e-6)


# ---- dense equivalence ----------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 64), (8, 1, 128)])
def test_dense_equivalent_equals_dense_attention(block_size, hq, hkv, d):
    """Full rank, full budget, 16-bit float32 values: decode steps, a prefill chunk and a
    first prefill in one batch equal causal dense attention over the exact keys."""
    rng = np.random.default_rng(block_size + hq + d)
    dk = hkv * d
    cfg = sals.Config.preset("dense-equivalent", hq, hkv, d, dtype="float32", n_sink=4,
                             n_recent=8)
    rope = rope_for(d)
    layer = sals.PagedLayer(cfg, rope, orthonormal(rng, dk, dk))
    lengths, n_queries = [97, 17, 40, 1], [1, 5, 40, 1]
    ks, vs = problem(rng, lengths, hq, hkv, d)
    table, nb = place(rng, lengths, block_size)
    pages = store(layer, ks, vs, table, nb, block_size, chunks=2)
    q, qs = queries(rng, n_queries, hq, d)
    out, selected = layer.attend(q, qs, np.array(lengths, np.int32), table, pages,
                                 return_selected=True)
    for b, (k, v) in enumerate(zip(ks, vs)):
        s, n = lengths[b], n_queries[b]
        want = dense_attention(q[qs[b]:qs[b + 1]].astype(np.float64), k, v,
                               np.arange(s - n, s), np.arange(s), rope.inv_freq)
        assert_close(out[qs[b]:qs[b + 1]], want, np.abs(v).max(), "float32", f"sequence {b}")
    # the decode step of the 97-token sequence selected every candidate
    assert (selected[0] >= 0).sum() == 97 - 4 - 8 and (selected[1:] == -1).all()


# ---- each lossy knob against the reference ------------------------------------------------

KNOBS = {
    "rank": dict(rank=32, score_rank=32, budget_frac=1.0),
    "score_rank": dict(rank=96, score_rank=16, budget_frac=0.25),
    "budget_tokens": dict(rank=128, score_rank=128, budget_tokens=40),
    "bits4": dict(rank=128, score_rank=128, budget_frac=1.0, value_bits=4),
    "keys8": dict(rank=64, score_rank=32, key_bits=8, budget_frac=0.25),
    "keys4-bits2": dict(rank=64, score_rank=32, key_bits=4, value_bits=2, budget_frac=0.25),
    "sals-25": None,
}


@pytest.mark.parametrize("select_per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_decode_matches_reference(knob, select_per_head):
    rng = np.random.default_rng(list(KNOBS).index(knob))
    hq, hkv, d = 8, 2, 64
    fields = dict(dtype="float32", select_per_head=select_per_head)
    if KNOBS[knob] is None:
        cfg = sals.Config.preset(knob, hq, hkv, d, **fields)
    else:
        cfg = sals.Config(hq, hkv, d, **fields, **KNOBS[knob])
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    layer = sals.PagedLayer(cfg, rope, proj)
    lengths = [400, 230, 81]
    ks, vs = problem(rng, lengths, hq, hkv, d, proj)
    table, nb = place(rng, lengths, 16)
    pages = store(layer, ks, vs, table, nb, 16)
    q, qs = queries(rng, [1, 1, 1], hq, d)
    out, selected = layer.attend(q, qs, np.array(lengths, np.int32), table, pages,
                                 return_selected=True)
    selections = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        ref = reference_for(cfg, proj, rope, 1)
        ref.exact_windows = False
        ref.append(k[None], v[None], np.arange(len(k), dtype=np.int32)[None])
        count = np.array([(selected[b, 0] >= 0).sum()])
        selections.append(check_selected(selected[b:b + 1], count, ref, q[None, b:b + 1],
                                         rel_tol=1e-4)[0])
    want = reference_out(cfg, proj, rope, ks, vs, q, qs, selections)
    assert_close(out, want, max(np.abs(v).max() for v in vs), "float32")
    # the knob is really active: far closer to the lossy reference than to dense attention
    dense = np.concatenate([dense_attention(q[b:b + 1].astype(np.float64), k, v,
                                            [len(k) - 1], np.arange(len(k)), rope.inv_freq)
                            for b, (k, v) in enumerate(zip(ks, vs))])
    assert np.abs(out - dense).max() > 100 * np.abs(out - want).max()


@pytest.mark.parametrize("dense", [False, True], ids=["sparse_layer", "dense_layer"])
def test_chunked_prefill_attends_rebuilt_keys(dense):
    """Prefill in three chunks (append a chunk, attend its queries) and a dense layer's decode
    step: every visible token, rebuilt and dequantised, causally."""
    rng = np.random.default_rng(21)
    hq, hkv, d, s = 6, 3, 32, 150
    cfg = sals.Config(hq, hkv, d, rank=24, score_rank=12, value_bits=4, dense=dense,
                      dtype="float16")
    proj = orthonormal(rng, hkv * d, 24)
    rope = rope_for(d)
    layer = sals.PagedLayer(cfg, rope, proj)
    (k,), (v,) = problem(rng, [s], hq, hkv, d, proj)
    table, nb = place(rng, [s], 8)
    pages = np.zeros((nb, 8, layer.slot_bytes), np.uint8)
    q = rng.standard_normal((s, hq, d)).astype(np.float32)
    out = np.zeros((s, hq, d), np.float32)
    bounds = [0, 64, 149, 150] if dense else [0, 64, 130, 150]
    for lo, hi in zip(bounds, bounds[1:]):
        layer.append(k[lo:hi], v[lo:hi], slot_mapping(table, 8, 0, np.arange(lo, hi)), pages)
        out[lo:hi] = layer.attend(q[lo:hi], [0, hi - lo], [hi], table, pages)
    for lo, hi in zip(bounds, bounds[1:]):
        want = reference_out(cfg, proj, rope, [k[:hi]], [v[:hi]], q[lo:hi], [0, hi - lo])
        assert_close(out[lo:hi], want, np.abs(v).max(), "float16", f"chunk {lo}..{hi}")


# ---- window store: exact sinks and recent tokens ---------------------------------------------

def window_store(cfg, lengths, dtype=np.float32):
    """A window store holding every sequence's sinks and recent tokens, rows given in reverse
    order (any rows will do): (window [rows, 2, Hkv, d], per sequence the row of each token or
    -1, window_rows [B, n_sink + n_recent] for attend)."""
    w = cfg.n_sink + cfg.n_recent
    window = np.zeros((w * len(lengths) + 5, 2, cfg.n_head_kv, cfg.head_dim), dtype)
    token_rows, table = [], np.full((len(lengths), w), -1, np.int32)
    free = list(range(window.shape[0]))[::-1]
    for b, s in enumerate(lengths):
        rows = np.full(s, -1, np.int32)
        for t in range(s):
            if t < cfg.n_sink or t >= s - cfg.n_recent:
                rows[t] = free.pop()
                table[b, t if t < cfg.n_sink else cfg.n_sink + cfg.n_recent - s + t] = rows[t]
        token_rows.append(rows)
    return window, token_rows, table


@pytest.mark.parametrize("select_per_head", [False, True], ids=["shared", "per_head"])
def test_window_store_attends_as_the_cache(select_per_head):
    """With its sinks and recent tokens in a window store, paged storage gives what LayerCache
    gives (which keeps them exact itself): decode steps and a prefill chunk, SALS-12.5."""
    rng = np.random.default_rng(91)
    hq, hkv, d = 8, 2, 64
    cfg = sals.Config.preset("sals-12.5", hq, hkv, d, dtype="float32", max_batch=1,
                             max_tokens=400, select_per_head=select_per_head)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    rope = rope_for(d)
    layer = sals.PagedLayer(cfg, rope, proj)
    lengths = [333, 150]
    ks, vs = problem(rng, lengths, hq, hkv, d, proj)
    table, nb = place(rng, lengths, 16)
    window, token_rows, window_rows = window_store(cfg, lengths)
    pages = np.zeros((nb, 16, layer.slot_bytes), np.uint8)
    for b in range(2):
        layer.append(ks[b], vs[b], slot_mapping(table, 16, b, np.arange(lengths[b])), pages,
                     token_rows[b], window)
    q, qs = queries(rng, [1, 7], hq, d)
    out, selected = layer.attend(q, qs, lengths, table, pages, window_rows, window,
                                 return_selected=True)
    for b in range(2):
        n = qs[b + 1] - qs[b]
        s = lengths[b]
        with sals.LayerCache(cfg, rope, proj) as cache:
            pos = np.arange(s, dtype=np.int32)[None]
            cache.append(ks[b][None], vs[b][None], pos)
            want = cache.attend(q[None, qs[b]:qs[b + 1]], pos[:, s - n:])[0]
            if n == 1:
                idx, _ = cache.selected()
                assert [set(r[r >= 0]) for r in idx[0]] == [set(r[r >= 0]) for r in selected[b]]
        np.testing.assert_allclose(out[qs[b]:qs[b + 1]], want, rtol=0, atol=2e-6)
    # without the store (or with one that keeps nothing) the same tokens are rebuilt
    bare = layer.attend(q, qs, lengths, table, pages)
    none = layer.attend(q, qs, lengths, table, pages, np.full_like(window_rows, -1), window)
    np.testing.assert_array_equal(bare, none)
    assert np.abs(bare - out).max() > 1e-3


WINDOW_FAULTS = {
    "rows without a store": (dict(window=None), r"^window: is NULL but window_rows is given"),
    "row beyond the store": (dict(rows=np.array([0, 9], np.int32)),
                             r"^window_rows\[1\]: row 9 beyond the window's 4 rows"),
    "row twice": (dict(rows=np.array([2, 2], np.int32)), r"^window_rows: row 2 appears twice"),
    "store shape": (dict(window=np.zeros((4, 2, 3, 16), np.float32)),
                    r"^window: dim 2 is 3, expected 2 \(n_head_kv\)"),
}


@pytest.mark.parametrize("fault", list(WINDOW_FAULTS))
def test_window_store_refuses_bad_input(small, fault):
    layer, pages, args = small
    changed, message = WINDOW_FAULTS[fault]
    a = dict(rows=np.array([0, 1], np.int32), window=np.zeros((4, 2, 2, 16), np.float32))
    a.update(changed)
    before = pages.copy()
    with pytest.raises(sals.InvalidArgumentError, match=message):
        layer.append(np.ones((2, 2, 16), np.float32), np.ones((2, 2, 16), np.float32),
                     np.array([3, 6], np.int32), pages, a["rows"], a["window"])
    np.testing.assert_array_equal(pages, before)
    rows = np.zeros((2, 3), np.int32)
    rows[1, 2] = 4
    with pytest.raises(sals.InvalidArgumentError, match=r"^window_rows\[1, 2\]: 4 not a row"):
        layer.attend(args["q"], args["query_start"], args["seq_lens"], args["block_table"], pages,
                     rows, np.zeros((4, 2, 2, 16), np.float32))


# ---- placement, batching, threads ----------------------------------------------------------

def test_block_placement_does_not_change_the_result():
    """The same tokens in other blocks, in blocks of another size, appended in other chunks:
    the same outputs and selections, exactly."""
    rng = np.random.default_rng(31)
    hq, hkv, d = 9, 3, 64
    cfg = sals.Config.preset("sals-25", hq, hkv, d, n_sink=4, n_recent=16, select_per_head=True)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    layer = sals.PagedLayer(cfg, rope_for(d), proj)
    lengths = [300, 75]
    ks, vs = problem(rng, lengths, hq, hkv, d, proj)
    q, qs = queries(rng, [1, 1], hq, d)
    results = []
    for block_size, chunks in ((16, 1), (5, 3), (1, 2)):
        table, nb = place(np.random.default_rng(block_size), lengths, block_size)
        pages = store(layer, ks, vs, table, nb, block_size, chunks)
        results.append(layer.attend(q, qs, lengths, table, pages, return_selected=True))
    for out, sel in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        for a, b in zip(np.sort(sel, axis=2), np.sort(results[0][1], axis=2)):
            np.testing.assert_array_equal(a, b)


def test_mixed_batch_equals_each_sequence_alone():
    """Decode steps, a prefill chunk and a sequence without queries in one call give what each
    gives alone; out rows outside the sequences' query ranges are not written."""
    rng = np.random.default_rng(41)
    hq, hkv, d = 8, 2, 64
    cfg = sals.Config.preset("sals-12.5", hq, hkv, d, n_sink=2, n_recent=8)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    layer = sals.PagedLayer(cfg, rope_for(d), proj)
    lengths, n_queries = [210, 90, 33, 500], [1, 12, 0, 1]
    ks, vs = problem(rng, lengths, hq, hkv, d, proj)
    table, nb = place(rng, lengths, 16)
    pages = store(layer, ks, vs, table, nb, 16)
    q, qs = queries(rng, n_queries, hq, d)
    qpad = np.concatenate([q, rng.standard_normal((3, hq, d)).astype(np.float32)])
    out = np.full(qpad.shape, 7.0, np.float32)
    layer.attend(qpad, qs, lengths, table, pages, out=out)
    assert (out[len(q):] == 7.0).all()
    for b in range(4):
        if n_queries[b] == 0:
            continue
        alone = layer.attend(q[qs[b]:qs[b + 1]], [0, n_queries[b]], lengths[b:b + 1],
                             table[b:b + 1], pages)
        np.testing.assert_allclose(out[qs[b]:qs[b + 1]], alone, rtol=0, atol=1e-6)


def test_concurrent_calls_share_one_layer():
    """A PagedLayer holds no tokens: threads attending different pages at once get what they
    get alone."""
    rng = np.random.default_rng(51)
    hq, hkv, d = 4, 2, 64
    cfg = sals.Config.preset("sals-25", hq, hkv, d, n_sink=2, n_recent=4)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    layer = sals.PagedLayer(cfg, rope_for(d), proj)
    jobs = []
    for i in range(4):
        ks, vs = problem(rng, [120 + 30 * i], hq, hkv, d, proj)
        table, nb = place(rng, [len(ks[0])], 16)
        pages = store(layer, ks, vs, table, nb, 16)
        q, qs = queries(rng, [1], hq, d)
        jobs.append((q, qs, [len(ks[0])], table, pages))
    alone = [layer.attend(*job) for job in jobs]
    got = [None] * len(jobs)

    def run(i):
        for _ in range(20):
            got[i] = layer.attend(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, alone):
        np.testing.assert_array_equal(a, b)


def test_torch_tensors_and_int64_indices():
    """What vLLM hands over: torch bfloat16 q/k/v, int64 slot mapping and block table, torch
    uint8 pages; the same result as float32 numpy inputs of the same values."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(61)
    hq, hkv, d = 6, 2, 64
    cfg = sals.Config.preset("sals-25", hq, hkv, d, dtype="bfloat16", n_sink=4, n_recent=8)
    proj = orthonormal(rng, hkv * d, cfg.resolved_rank())
    layer = sals.PagedLayer(cfg, rope_for(d), proj)
    (k,), (v,) = problem(rng, [140], hq, hkv, d, proj)
    kb, vb = cast(k, "bfloat16"), cast(v, "bfloat16")
    table, nb = place(rng, [140], 16)
    slots = slot_mapping(table, 16, 0, np.arange(140))
    pages_t = torch.zeros((nb, 16, layer.slot_bytes), dtype=torch.uint8)
    layer.append(kb, vb, torch.from_numpy(slots.astype(np.int64)), pages_t)
    pages_n = np.zeros((nb, 16, layer.slot_bytes), np.uint8)
    layer.append(as64(kb).astype(np.float32), as64(vb).astype(np.float32), slots, pages_n)
    np.testing.assert_array_equal(pages_t.numpy(), pages_n)
    q = cast(rng.standard_normal((1, hq, d)).astype(np.float32), "bfloat16")
    out = layer.attend(q, torch.tensor([0, 1]), torch.tensor([140]),
                       torch.from_numpy(table.astype(np.int64)), pages_t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    want = layer.attend(as64(q).astype(np.float32), [0, 1], [140], table, pages_n)
    assert_close(out, as64(want), np.abs(v).max(), "bfloat16")


# ---- bad input ----------------------------------------------------------------------------

@pytest.fixture
def small():
    """A layer, pages holding two sequences (10 and 3 tokens, blocks of 4), and valid attend
    arguments."""
    rng = np.random.default_rng(71)
    cfg = sals.Config(4, 2, 16, rank=16, score_rank=8, value_bits=4, value_group=16,
                      n_sink=1, n_recent=2, dtype="float32")
    layer = sals.PagedLayer(cfg, rope_for(16), orthonormal(rng, 32, 16))
    ks, vs = problem(rng, [10, 3], 4, 2, 16)
    table, nb = place(rng, [10, 3], 4)
    pages = store(layer, ks, vs, table, nb, 4)
    q, qs = queries(rng, [1, 3], 4, 16)
    return layer, pages, dict(q=q, query_start=qs, seq_lens=np.array([10, 3], np.int32),
                              block_table=table)


def _attend(layer, args, **changed):
    a = {**args, "out": None, **changed}
    return layer.attend(a["q"], a["query_start"], a["seq_lens"], a["block_table"], a["pages"],
                        out=a["out"])


ATTEND_FAULTS = {
    "query_start decreasing": (dict(query_start=np.array([0, 3, 1], np.int32)),
                               r"^query_start\[2\]: 1 not in 3\.\.4"),
    "query_start past q": (dict(query_start=np.array([0, 1, 5], np.int32)),
                           r"^query_start\[2\]: 5 not in 1\.\.4"),
    "query_start length": (dict(query_start=np.array([0, 4], np.int32)),
                           r"^query_start: dim 0 is 2, expected 3"),
    "seq_lens below queries": (dict(seq_lens=np.array([10, 2], np.int32)),
                               r"^seq_lens\[1\]: 2 not in 3\.\."),
    "seq_lens past the table": (dict(seq_lens=np.array([10, 17], np.int32)),
                                r"^seq_lens\[1\]: 17 not in 3\.\.16"),
    "block out of range": (dict(block_table=np.array([[0, 1, 99, 0], [2, 0, 0, 0]], np.int32)),
                           r"^block_table\[0, 2\]: 99 not a block of pages"),
    "negative block": (dict(block_table=np.array([[0, 1, 3, 0], [-1, 0, 0, 0]], np.int32)),
                       r"^block_table\[1, 0\]: -1 not a block of pages"),
    "q heads": (dict(q=np.zeros((4, 2, 16), np.float32)), r"^q: dim 1 is 2, expected 4"),
    "q dtype": (dict(q=np.zeros((4, 4, 16), np.float64)), r"^q: dtype float64"),
    "pages slot size": (dict(pages=np.zeros((6, 4, 7), np.uint8)),
                        r"^pages: dim 2 is 7, expected \d+ \(slot_bytes"),
    "pages dtype": (dict(pages=np.zeros((6, 4, 1), np.float32)), r"^pages: dtype float32"),
    "pages misaligned": (dict(pages=np.zeros(7 * 4 * 88 + 1, np.uint8)[1:].reshape(7, 4, 88)),
                         r"^pages: data \+ byte_offset and the strides .* multiples of 4"),
    "out shape": (dict(out=np.zeros((3, 4, 16), np.float32)), r"^out: dim 0 is 3, expected 4"),
}


@pytest.mark.parametrize("fault", list(ATTEND_FAULTS))
def test_attend_refuses_bad_input_naming_it(small, fault):
    layer, pages, args = small
    changed, message = ATTEND_FAULTS[fault]
    out = np.full((4, 4, 16), 3.0, np.float32)
    if "out" not in changed:
        changed = {**changed, "out": out}
    with pytest.raises(sals.InvalidArgumentError, match=message):
        _attend(layer, args, **{"pages": pages, **changed})
    assert (out == 3.0).all()  # nothing written


def test_attend_refuses_nan_queries_and_too_small_selection(small):
    layer, pages, args = small
    q = args["q"].copy()
    q[2, 1, 5] = np.nan
    with pytest.raises(sals.NotFiniteError, match=r"^q: holds NaN or infinity at row \[2, 1\]"):
        _attend(layer, args, pages=pages, q=q)
    out = np.zeros((4, 4, 16), np.float32)
    sel = np.zeros((2, 1, 1), np.int32)
    lengths = np.array([10, 3], np.int32)
    with pytest.raises(sals.InvalidArgumentError, match=r"^selected: dim 2 is 1, fewer than"):
        layer._p.attend(args["q"], args["query_start"], lengths, args["block_table"], pages, out,
                        selected=sel)


APPEND_FAULTS = {
    "slot past the pages": (dict(slot_mapping=np.array([0, 28], np.int32)),
                            sals.InvalidArgumentError,
                            r"^slot_mapping\[1\]: slot 28 beyond the pages' 28 slots"),
    "slot twice": (dict(slot_mapping=np.array([5, 5], np.int32)), sals.InvalidArgumentError,
                   r"^slot_mapping: slot 5 appears twice"),
    "slot_mapping length": (dict(slot_mapping=np.array([0, 1, 2], np.int32)),
                            sals.InvalidArgumentError, r"^slot_mapping: dim 0 is 3, expected 2"),
    "v shape": (dict(v=np.zeros((2, 2, 8), np.float32)), sals.InvalidArgumentError,
                r"^v: dim 2 is 8, expected 16"),
    "k heads": (dict(k=np.zeros((2, 3, 16), np.float32)), sals.InvalidArgumentError,
                r"^k: dim 1 is 3, expected 2"),
    "nan key": (dict(k=np.array([np.zeros((2, 16)), np.full((2, 16), np.nan)], np.float32)),
                sals.NotFiniteError, r"^k: holds NaN or infinity at row \[1, 0\]"),
    "value beyond float16 groups": (dict(v=np.array([np.zeros((2, 16)), np.full((2, 16), 1e30)],
                                                    np.float32)),
                                    sals.NotFiniteError,
                                    r"^v: channels 0\.\.15 of \(token 1\) span more"),
}


@pytest.mark.parametrize("fault", list(APPEND_FAULTS))
def test_append_refuses_bad_input_naming_it(small, fault):
    layer, pages, _ = small
    changed, error, message = APPEND_FAULTS[fault]
    a = dict(k=np.ones((2, 2, 16), np.float32), v=np.ones((2, 2, 16), np.float32),
             slot_mapping=np.array([3, 6], np.int32))
    a.update(changed)
    before = pages.copy()
    with pytest.raises(error, match=message):
        layer.append(a["k"], a["v"], a["slot_mapping"], pages)
    np.testing.assert_array_equal(pages, before)


def test_padding_tokens_are_not_read(small):
    """A negative slot skips its token: NaN there is no error and nothing is written."""
    layer, pages, _ = small
    before = pages.copy()
    k = np.full((2, 2, 16), np.nan, np.float32)
    layer.append(k, k, np.array([-1, -5], np.int32), pages)
    np.testing.assert_array_equal(pages, before)


def test_settings_are_checked_at_creation():
    rng = np.random.default_rng(81)
    cfg = sals.Config(4, 2, 16, rank=8, score_rank=8)
    with pytest.raises(sals.InvalidArgumentError, match=r"^projection: dim 1 is 16, expected 8"):
        sals.PagedLayer(cfg, rope_for(16), orthonormal(rng, 32, 16))
    with pytest.raises(sals.InvalidArgumentError, match=r"^projection: column 0 has squared norm"):
        sals.PagedLayer(cfg, rope_for(16), 2 * orthonormal(rng, 32, 8))
    with pytest.raises(sals.InvalidArgumentError, match=r"^config.score_rank: 9 > rank 8"):
        sals.PagedLayer.slot_bytes_for(sals.Config(4, 2, 16, rank=8, score_rank=9))
    with pytest.raises(sals.InvalidArgumentError, match=r"^config: expected sals.Config"):
        sals.PagedLayer.slot_bytes_for({"rank": 8})
    # the cache-only fields are not used: any max_batch / max_tokens goes
    layer = sals.PagedLayer(sals.Config(4, 2, 16, rank=8, max_batch=10**9, max_tokens=10**9),
                            rope_for(16), orthonormal(rng, 32, 8))
    assert layer.slot_bytes == documented_slot_bytes(layer.config)



def test_device_of_the_settings():
    """A layer is made for a device: "cpu" (the default) or a GPU, where CUDA is usable; an
    unknown device is refused, and check() has nothing to report on the CPU."""
    rng = np.random.default_rng(82)
    cfg = sals.Config(4, 2, 16, rank=8)
    proj = orthonormal(rng, 32, 8)
    with pytest.raises(sals.InvalidArgumentError, match="device"):
        sals.PagedLayer(cfg, rope_for(16), proj, device="tpu:0")
    if not sals.cuda_available():
        with pytest.raises(sals.SalsError, match="config.device"):
            sals.PagedLayer(cfg, rope_for(16), proj, device="cuda:0")
    layer = sals.PagedLayer(cfg, rope_for(16), proj, device="cpu")
    layer.check()
    layer.check(wait=False)
