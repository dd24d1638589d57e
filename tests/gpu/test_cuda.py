"""The CUDA backend against the CPU backend and float64, through the Python API.

Skipped unless torch has CUDA and sals was built with CUDA kernels.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sals = pytest.importorskip("sals")

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sals.cuda_available()), reason="no CUDA device or build"
)


def rel(a, b):
    a = torch.as_tensor(a).double().cpu()
    b = torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_rope(d, theta=10000.0):
    return sals.Rope(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d))


def make_proj(dk, rank, gen):
    q, _ = torch.linalg.qr(torch.randn(dk, dk, generator=gen, dtype=torch.float64))
    return q[:, :rank].float().contiguous()


def pair(cfg, rope, proj):
    return (
        sals.LayerCache(cfg, rope, proj, device="cpu"),
        sals.LayerCache(cfg, rope, proj.cuda(), device="cuda"),
    )


def run_both(cfg, B, T0, steps, dtype, seed, pad=True, noncontig=False):
    """Prefill (ragged) + decode steps on both backends; returns worst errors and overlap."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = cfg.n_head_q, cfg.n_head_kv, cfg.head_dim
    proj = make_proj(hkv * d, cfg.rank, gen)
    rope = make_rope(d)
    cpu, gpu = pair(cfg, rope, proj)
    pos = torch.arange(T0, dtype=torch.int32).repeat(B, 1)
    if pad:
        for b in range(B):
            pos[b, : 3 * b] = -1
            pos[b, 3 * b :] -= 3 * b

    def rnd(*shape):
        x = torch.randn(*shape, generator=gen).to(dtype)
        if noncontig:  # same values, strided batch/token/head dims
            big = torch.zeros(*shape[:-1], 2, shape[-1], dtype=dtype)
            big[..., 1, :] = x
            x = big[..., 1, :]
            assert not x.is_contiguous()
        return x

    k, v, q = rnd(B, T0, hkv, d), rnd(B, T0, hkv, d), rnd(B, T0, hq, d)
    for c, dev in ((cpu, "cpu"), (gpu, "cuda")):
        c.append(k.to(dev), v.to(dev), pos.to(dev))
    oc = cpu.attend(q, pos)
    og = gpu.attend(q.cuda(), pos.cuda())
    errs = [rel(og, oc)]
    overlap = 1.0
    last = pos.max(dim=1).values
    for s in range(steps):
        k1, v1, q1 = rnd(B, 1, hkv, d), rnd(B, 1, hkv, d), rnd(B, 1, hq, d)
        p1 = (last + 1 + s).view(B, 1).to(torch.int32)
        if pad and B > 1 and s == 1:
            p1[-1, 0] = -1
        cpu.append(k1, v1, p1)
        gpu.append(k1.cuda(), v1.cuda(), p1.cuda())
        oc = cpu.attend(q1, p1)
        og = gpu.attend(q1.cuda(), p1.cuda())
        assert og.is_cuda and og.dtype == q1.dtype
        errs.append(rel(og, oc))
        ic, nc = cpu.selected()
        ig, ng = gpu.selected()
        np.testing.assert_array_equal(nc, ng)
        for b in range(B):
            for h in range(ic.shape[1]):
                n = int(nc[b])
                if n:
                    a, g = set(ic[b, h, :n].tolist()), set(ig[b, h, :n].tolist())
                    overlap = min(overlap, len(a & g) / n)
    np.testing.assert_array_equal(cpu.lengths(), gpu.lengths())
    assert cpu.memory()["total"] == gpu.memory()["total"]
    cpu.close()
    gpu.close()
    return max(errs), overlap


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 128), (8, 2, 256), (8, 1, 128)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_equivalence(hq, hkv, d, dtype):
    cfg = sals.Config.preset(
        "dense-equivalent",
        hq,
        hkv,
        d,
        max_batch=3,
        max_tokens=160,
        dtype=dtype,
        n_sink=4,
        n_recent=8,
    )
    err, overlap = run_both(cfg, 3, 97, 3, getattr(torch, dtype), seed=hq + d)
    assert err < 1e-2 and overlap == 1.0


@pytest.mark.parametrize("setting", ["sals-25", "sals-12.5"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1), (12, 4)])
def test_sparse_vs_cpu(setting, hq, hkv):
    cfg = sals.Config.preset(
        setting, hq, hkv, 64, max_batch=4, max_tokens=4200, dtype="float16", n_sink=16, n_recent=64
    )
    err, overlap = run_both(cfg, 4, 4099, 2, torch.float16, seed=hq * 7 + hkv)
    assert overlap >= 0.9, overlap
    assert err < 5e-2, err


def test_per_head_selection_bf16_noncontiguous():
    cfg = sals.Config(
        8,
        2,
        128,
        rank=64,
        score_rank=32,
        value_bits=4,
        select_per_head=True,
        n_sink=4,
        n_recent=16,
        budget_frac=0.2,
        max_batch=2,
        max_tokens=300,
        dtype="bfloat16",
    )
    err, overlap = run_both(cfg, 2, 257, 2, torch.bfloat16, seed=5, noncontig=True)
    assert overlap >= 0.9 and err < 5e-2


@pytest.mark.parametrize("bits,group,d", [(4, 64, 64), (8, 128, 128), (2, 8, 128)])
def test_value_group_layouts(bits, group, d):
    """Decode with one scale per head (odd count: staged one by one) and many small groups."""
    cfg = sals.Config(
        8,
        2,
        d,
        rank=64,
        score_rank=32,
        value_bits=bits,
        value_group=group,
        n_sink=4,
        n_recent=16,
        budget_frac=0.25,
        max_batch=3,
        max_tokens=400,
        dtype="float16",
    )
    err, overlap = run_both(cfg, 3, 301, 3, torch.float16, seed=bits * 31 + group)
    assert overlap >= 0.9, overlap
    assert err < 5e-2, err


@pytest.mark.parametrize("bits,group,dtype", [(8, 32, "float16"), (4, 16, "bfloat16"),
                                               (4, 8, "float32")])
def test_quantised_keys_vs_cpu(bits, group, dtype):
    """Quantised latent keys on CUDA (quantised on append, dequantised when scoring and
    rebuilding) against the CPU cache: ragged prefill (T > 1), GQA, sparse decode steps."""
    cfg = sals.Config(
        8,
        2,
        64,
        rank=64,
        score_rank=32,
        key_bits=bits,
        key_group=group,
        value_bits=4,
        n_sink=4,
        n_recent=16,
        budget_frac=0.2,
        max_batch=3,
        max_tokens=400,
        dtype=dtype,
    )
    err, overlap = run_both(cfg, 3, 301, 3, getattr(torch, dtype), seed=bits * 7 + group)
    assert overlap >= 0.9, overlap
    assert err < (1e-3 if dtype == "float32" else 5e-2), err


def test_quantised_keys_latent_range_reported():
    """A latent group beyond the float16 scale and zero of quantised keys: the CPU refuses the
    append, CUDA stores it and reports it at the next check (check_finite's deferred flags)."""
    d, hkv = 16, 2
    cfg = sals.Config(2, hkv, d, score_rank=16, dtype="float32", max_tokens=8, key_bits=4,
                      key_group=8)
    eye = torch.eye(hkv * d)
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(1, 1, hkv, d, generator=gen)
    v = torch.randn(1, 1, hkv, d, generator=gen)
    k[0, 0, 1, 2] = -7e4  # latent coordinate 18 (identity projection): the rest part's group 0
    pos = torch.zeros(1, 1, dtype=torch.int32)
    gpu = sals.LayerCache(cfg, make_rope(d), eye.cuda(), device="cuda")
    gpu.append(k.cuda(), v.cuda(), pos.cuda())
    with pytest.raises(sals.NotFiniteError, match="^k: an earlier call's latent coordinates"):
        gpu.check()
    gpu.close()
    cpu = sals.LayerCache(cfg, make_rope(d), eye, device="cpu")
    with pytest.raises(sals.NotFiniteError, match=r"^k: latent coordinates 16\.\.23 "):
        cpu.append(k, v, pos)
    cpu.close()


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("arg", ["k", "v", "q", "padding"])
def test_finite_checks_name_the_argument(arg, dense):
    """check_finite on CUDA: a NaN in k, v or q of a decode step is reported once, naming the
    argument, by a later call (the checks run inside the kernels that read those inputs), and a
    NaN in a padding row (position -1) is not looked at, as on the CPU."""
    hq, hkv, d, B = 8, 2, 64, 2
    cfg = sals.Config.preset("sals-12.5", hq, hkv, d, max_batch=B, max_tokens=400,
                             dtype="float16", check_finite=True, dense=dense)
    gen = torch.Generator().manual_seed(5)
    cache = sals.LayerCache(cfg, make_rope(d), make_proj(hkv * d, cfg.rank, gen).cuda(),
                            device="cuda")

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).half().cuda()

    S = 300
    pos = torch.arange(S, dtype=torch.int32).repeat(B, 1).cuda()
    cache.append(rnd(B, S, hkv, d), rnd(B, S, hkv, d), pos)
    k, v, q = rnd(B, 1, hkv, d), rnd(B, 1, hkv, d), rnd(B, 1, hq, d)
    step = torch.full((B, 1), S, dtype=torch.int32).cuda()
    if arg == "padding":
        step[1, 0] = -1
        k[1, 0, 1, 3] = float("nan")
        v[1, 0, 0, 7] = float("nan")
        cache.append(k, v, step)
        cache.attend(q, step)
        cache.check()
    else:
        {"k": k, "v": v, "q": q}[arg][1, 0, 1, 5] = float("nan")
        # reported by the first call after the checking kernel completed: the attend (k, v)
        # or the check that waits for it
        with pytest.raises(sals.NotFiniteError, match=f"^{arg}: an earlier call's input"):
            cache.append(k, v, step)
            cache.attend(q, step)
            cache.check()
        cache.check()  # reported once
    cache.close()


@pytest.mark.parametrize("dense", [False, True])
def test_float32_general_path(dense):
    cfg = sals.Config(
        6,
        3,
        64,
        rank=17,
        score_rank=9,
        value_bits=8,
        n_sink=2,
        n_recent=5,
        budget_frac=0.3,
        dense=dense,
        max_batch=3,
        max_tokens=140,
        dtype="float32",
    )
    err, overlap = run_both(cfg, 3, 97, 2, torch.float32, seed=11)
    assert overlap >= 0.9 and err < 1e-3


def _rot64(x, pos, d, theta=10000.0):
    """Rotate-half RoPE in float64; x [..., T, H, d], pos [T]."""
    inv = torch.tensor(1.0 / theta ** (np.arange(0, d, 2) / d), dtype=torch.float64)
    th = pos.view(-1, 1).double() * inv.view(1, -1)
    c, s = th.cos()[:, None, :], th.sin()[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def _attention64(q, k, v, qpos, kpos, scale):
    """Causal attention in float64 of one sequence: q [T, Hq, d], k/v [S, Hkv, d] post-RoPE."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    logits = torch.einsum("thd,shd->hts", q, k) * scale
    logits = logits.masked_fill(kpos.view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
    return torch.einsum("hts,shd->thd", logits.softmax(-1), v)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 128), (8, 1, 256)])
def test_float64_reference_dense_equivalent(dtype, hq, hkv, d):
    """At full rank / full budget / 16-bit values the GPU equals float64 causal attention, for a
    prefill chunk (general kernel) and for decode steps (tensor-core rebuild kernels)."""
    gen = torch.Generator().manual_seed(3 + d)
    tdt = getattr(torch, dtype)
    S, steps = 97, 3
    cfg = sals.Config.preset(
        "dense-equivalent",
        hq,
        hkv,
        d,
        max_batch=1,
        max_tokens=S + steps,
        dtype=dtype,
        n_sink=4,
        n_recent=8,
    )
    proj = make_proj(hkv * d, hkv * d, gen)
    gpu = sals.LayerCache(cfg, make_rope(d), proj.cuda(), device="cuda")
    k, v, q = (torch.randn(S + steps, h, d, generator=gen).to(tdt) for h in (hkv, hkv, hq))
    pos = torch.arange(S + steps, dtype=torch.int32)
    gpu.append(k[None, :S].cuda(), v[None, :S].cuda(), pos[None, :S].cuda())
    outs = [gpu.attend(q[None, :S].cuda(), pos[None, :S].cuda())[0]]
    for t in range(S, S + steps):
        sl = slice(t, t + 1)
        gpu.append(k[None, sl].cuda(), v[None, sl].cuda(), pos[None, sl].cuda())
        outs.append(gpu.attend(q[None, sl].cuda(), pos[None, sl].cuda())[0])
    out = torch.cat(outs).double().cpu()
    kr = _rot64(k.double(), pos, d)
    ref = _attention64(_rot64(q.double(), pos, d), kr, v.double(), pos, pos, 1 / math.sqrt(d))
    tol = 2e-3 if dtype == "float16" else 1.5e-2
    assert rel(out[:S], ref[:S]) < tol
    assert rel(out[S:], ref[S:]) < tol
    gpu.close()


def test_current_stream_and_graph_replay():
    """Work goes to torch's current stream; a captured decode step replays like eager."""
    cfg = sals.Config.preset(
        "sals-12.5", 8, 2, 128, max_batch=2, max_tokens=1200, dtype="float16", check_finite=False
    )
    gen = torch.Generator().manual_seed(9)
    proj = make_proj(256, cfg.rank, gen).cuda()
    caches = [sals.LayerCache(cfg, make_rope(128), proj, device="cuda") for _ in range(2)]
    S = 1000
    k = torch.randn(2, S, 2, 128, generator=gen).half().cuda()
    v = torch.randn(2, S, 2, 128, generator=gen).half().cuda()
    pos = torch.arange(S, dtype=torch.int32).repeat(2, 1).cuda()
    for c in caches:
        c.append(k, v, pos)
    k1 = torch.randn(2, 1, 2, 128, generator=gen).half().cuda()
    v1 = torch.randn(2, 1, 2, 128, generator=gen).half().cuda()
    q1 = torch.randn(2, 1, 8, 128, generator=gen).half().cuda()
    p1 = torch.full((2, 1), S, dtype=torch.int32).cuda()
    eager = torch.empty_like(q1)
    caches[0].append(k1, v1, p1)
    caches[0].attend(q1, p1, out=eager)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    out = torch.zeros_like(q1)
    with torch.cuda.graph(g, stream=s):
        caches[1].append(k1, v1, p1)
        caches[1].attend(q1, p1, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert rel(out, eager) < 1e-3
    np.testing.assert_array_equal(caches[0].lengths(), caches[1].lengths())
    for c in caches:
        c.close()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stateless_quantize_and_ops(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randn(97, 256, generator=gen)
    pc, sc, zc = sals.quantize_values(v, bits, 32)
    pg, sg, zg = sals.quantize_values(v.cuda(), bits, 32)
    assert torch.equal(sc, sg.cpu()) and torch.equal(zc, zg.cpu())
    assert (pc != pg.cpu()).float().mean() < 1e-3
    dc = sals.dequantize_values(pc, sc, zc, bits, 32)
    dg = sals.dequantize_values(pg, sg, zg, bits, 32)
    assert rel(dg, dc) < 1e-2
    x = torch.randn(17, 3, 64, generator=gen)
    pos = torch.randint(0, 5000, (17,), generator=gen, dtype=torch.int32)
    rope = make_rope(64)
    assert rel(sals.rope_apply(x.cuda(), pos.cuda(), rope), sals.rope_apply(x, pos, rope)) < 1e-5
    proj = torch.randn(192, 40, generator=gen)
    kl = sals.project(x.reshape(17, 192), proj)
    assert rel(sals.project(x.reshape(17, 192).cuda(), proj.cuda()), kl) < 1e-5
    assert (
        rel(
            sals.rebuild_rope(kl.cuda(), proj.cuda(), pos.cuda(), rope),
            sals.rebuild_rope(kl, proj, pos, rope),
        )
        < 1e-5
    )


def test_stateless_sparse_attention_index_errors():
    """Out-of-range indices are an error on CUDA as on the CPU (same message); -1 is skipped."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 64, generator=gen)
    k = torch.randn(2, 50, 2, 64, generator=gen)
    v = torch.randn(2, 50, 2, 64, generator=gen)
    lengths = torch.tensor([50, 30], dtype=torch.int32)
    # distinct tokens per row: the CPU reference refuses a repeated index
    idx = torch.stack([torch.randperm(30, generator=gen)[:12] for _ in range(2)])[:, None]
    idx = idx.to(torch.int32)
    idx[0, 0, 3] = -1
    ref = sals.sparse_attention(q, k, v, idx, lengths)
    out = sals.sparse_attention(q.cuda(), k.cuda(), v.cuda(), idx.cuda(), lengths.cuda())
    assert rel(out, ref) < 1e-5
    bad = idx.clone()
    bad[1, 0, 5] = 30  # past length 30 of sequence 1
    for dev in ("cpu", "cuda"):
        with pytest.raises(sals.InvalidArgumentError, match=r"idx\[1, 0, 5\]: 30 not a token"):
            sals.sparse_attention(
                q.to(dev), k.to(dev), v.to(dev), bad.to(dev), lengths.to(dev)
            )


# ---- paged storage (sals.PagedLayer on a GPU) ------------------------------------------------

# Sequences of a paged step: (tokens stored, queries of this step): decode steps, a prefill
# chunk, a sequence without queries and a whole prompt, attended in one call.
PAGED_SEQS = [(300, 1), (57, 1), (1, 1), (130, 9), (40, 0), (33, 33)]


def paged_problem(cfg, block_size, gen, dtype):
    """Keys, values, queries and a shuffled block placement of PAGED_SEQS: (k, v [T, Hkv, d],
    slots [T] with padding rows, q [N, Hq, d], query_start, seq_lens, block table, blocks,
    window_rows for the append [T] and the attend [B, n_sink + n_recent])."""
    hq, hkv, d = cfg.n_head_q, cfg.n_head_kv, cfg.head_dim
    need = [-(-s // block_size) for s, _ in PAGED_SEQS]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(PAGED_SEQS), max(need) + 1), -1, dtype=torch.int32)
    width = cfg.n_sink + cfg.n_recent
    window_rows = torch.full((len(PAGED_SEQS), width), -1, dtype=torch.int32)
    slots, rows, at, row = [], [], 0, 0
    for b, (s, _) in enumerate(PAGED_SEQS):
        table[b, : need[b]] = order[at : at + need[b]]
        at += need[b]
        ns = min(s, cfg.n_sink)
        recent = max(ns, s - cfg.n_recent)
        for t in range(s):
            slots.append(int(table[b, t // block_size]) * block_size + t % block_size)
            copy = t < ns or t >= recent
            rows.append(row if copy else -1)
            if copy:
                window_rows[b, t if t < ns else width - s + t] = row
                row += 1
    slots = torch.tensor(slots, dtype=torch.int32)
    rows = torch.tensor(rows, dtype=torch.int32)
    pad = torch.arange(0, len(slots), 41)  # padding rows: skipped, their NaN keys never read
    keep = torch.ones(len(slots) + len(pad), dtype=torch.bool)
    keep[pad + torch.arange(len(pad))] = False
    all_slots = torch.full((len(keep),), -1, dtype=torch.int32)
    all_rows = torch.full((len(keep),), -1, dtype=torch.int32)
    all_slots[keep], all_rows[keep] = slots, rows
    k = torch.randn(len(keep), hkv, d, generator=gen).to(dtype)
    v = torch.randn(len(keep), hkv, d, generator=gen).to(dtype)
    k[~keep] = float("nan")
    n_q = [n for _, n in PAGED_SEQS]
    q = torch.randn(sum(n_q) + 2, hq, d, generator=gen).to(dtype)  # first and last rows unused
    q[0] = q[-1] = float("nan")
    qs = torch.tensor([1] + [1 + sum(n_q[: b + 1]) for b in range(len(n_q))], dtype=torch.int32)
    lens = torch.tensor([s for s, _ in PAGED_SEQS], dtype=torch.int32)
    return k, v, all_slots, all_rows, q, qs, lens, table, num_blocks, window_rows, row


def overlap_of(sel_c, sel_g):
    """The worst overlap of two selections [B, H, K] as sets, with equal counts."""
    worst = 1.0
    for b in range(sel_c.shape[0]):
        for h in range(sel_c.shape[1]):
            a = {int(x) for x in sel_c[b, h] if x >= 0}
            g = {int(x) for x in sel_g[b, h] if x >= 0}
            assert len(a) == len(g), (b, h, len(a), len(g))
            if a:
                worst = min(worst, len(a & g) / len(a))
    return worst


@pytest.mark.parametrize(
    "setting,dtype,per_head,window",
    [
        ("dense-equivalent", torch.float16, False, True),
        ("sals-25", torch.float16, False, True),
        ("sals-12.5", torch.bfloat16, True, False),
    ],
)
def test_paged_vs_cpu(setting, dtype, per_head, window):
    """One layer in pages on both devices: pages that are a non-contiguous view (as vLLM's KV
    memory is), shuffled blocks, padding rows, mixed decode steps, a prefill chunk, a whole
    prompt and a sequence without queries in one attend; outputs and selections against the
    CPU's, rows outside the sequences untouched."""
    gen = torch.Generator().manual_seed(len(setting) + per_head)
    name = str(dtype).replace("torch.", "")
    cfg = sals.Config.preset(
        setting, 8, 2, 64, dtype=name, n_sink=4, n_recent=8, select_per_head=per_head
    )
    proj = make_proj(cfg.dk, cfg.resolved_rank(), gen)
    rope = make_rope(64)
    cpu = sals.PagedLayer(cfg, rope, proj)
    gpu = sals.PagedLayer(cfg, rope, proj.cuda(), device="cuda")
    block_size = 16
    k, v, slots, rows, q, qs, lens, table, num_blocks, wrows, n_rows = paged_problem(
        cfg, block_size, gen, dtype
    )
    sb = cpu.slot_bytes
    wide = -(-sb // 16) * 16 + 16  # slots of a wider allocation: strided pages
    pages_c = torch.zeros(num_blocks, block_size, wide, dtype=torch.uint8)[:, :, :sb]
    pages_g = torch.zeros(num_blocks, block_size, wide, dtype=torch.uint8, device="cuda")[:, :, :sb]
    store_c = torch.zeros(n_rows, 2, cfg.n_head_kv, 64, dtype=dtype) if window else None
    store_g = store_c.cuda() if window else None
    cpu.append(k, v, slots, pages_c, rows if window else None, store_c)
    gpu.append(k.cuda(), v.cuda(), slots.cuda(), pages_g, rows.cuda() if window else None, store_g)
    gpu.check()  # the padding rows' NaN keys are not looked at
    if window:
        assert torch.equal(store_g.cpu(), store_c)
    out_c, sel_c = cpu.attend(
        q, qs, lens, table, pages_c, wrows if window else None, store_c, return_selected=True
    )
    out_g, sel_g = gpu.attend(
        q.cuda(),
        qs.cuda(),
        lens.cuda(),
        table.cuda(),
        pages_g,
        wrows.cuda() if window else None,
        store_g,
        out=torch.zeros_like(q, device="cuda"),
        return_selected=True,
    )
    gpu.check()  # q's first and last rows belong to no sequence
    assert out_g.is_cuda and sel_g.is_cuda
    assert torch.equal(out_g[0].cpu(), torch.zeros_like(q[0]))
    assert torch.equal(out_g[-1].cpu(), torch.zeros_like(q[-1]))
    tol = 5e-3 if setting == "dense-equivalent" else 3e-2
    assert rel(out_g[1:-1], out_c[1:-1]) < tol
    k_c = torch.as_tensor(sel_c)
    k_g = sel_g.cpu()[:, :, : k_c.shape[2]]
    assert (sel_g.cpu()[:, :, k_c.shape[2] :] == -1).all()
    assert overlap_of(k_c, k_g) >= 0.9


def test_paged_deferred_checks():
    """On CUDA an out-of-range index is skipped and a NaN input stored; check() (or the next
    call) raises, naming the argument, once."""
    gen = torch.Generator().manual_seed(5)
    cfg = sals.Config.preset("sals-25", 4, 2, 64, dtype="float16", n_sink=4, n_recent=8)
    proj = make_proj(cfg.dk, cfg.resolved_rank(), gen)
    gpu = sals.PagedLayer(cfg, make_rope(64), proj.cuda(), device="cuda")
    pages = torch.zeros(4, 8, gpu.slot_bytes, dtype=torch.uint8, device="cuda")
    k = torch.randn(10, 2, 64, generator=gen).half().cuda()
    v = torch.randn(10, 2, 64, generator=gen).half().cuda()
    slots = torch.arange(10, dtype=torch.int32, device="cuda")
    gpu.append(k, v, slots, pages)
    gpu.check()
    slots[4] = 32  # past the 4 x 8 slots
    gpu.append(k, v, slots, pages)
    with pytest.raises(sals.InvalidArgumentError, match="slot_mapping"):
        gpu.check()
    gpu.check()  # reported once
    slots[4] = 4
    v[2, 1, 3] = float("nan")
    gpu.append(k, v, slots, pages)
    torch.cuda.synchronize()
    with pytest.raises(sals.NotFiniteError, match="v: an earlier call"):
        gpu.append(k, v, slots, pages)  # the next call reports it
    q = torch.randn(1, 4, 64, generator=gen).half().cuda()
    qs = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    table = torch.tensor([[0, 7]], dtype=torch.int32, device="cuda")  # block 7 of 4
    out = torch.full_like(q, 3.0)
    gpu.attend(q, qs, torch.tensor([10], dtype=torch.int32, device="cuda"), table, pages, out=out)
    with pytest.raises(sals.InvalidArgumentError, match="block_table"):
        gpu.check()
    assert (out == 3.0).all()  # the sequence was not attended
    cpu = sals.PagedLayer(cfg, make_rope(64), proj)
    with pytest.raises(sals.InvalidArgumentError, match="made for cpu"):
        cpu.attend(q, qs, torch.tensor([10], dtype=torch.int32, device="cuda"), table, pages)
