"""``patch(..., dense_kv="exact")``: the dense layers keep exact keys and values
(``sals.hf.ExactLayer``) and attend over them with scaled_dot_product_attention, instead of
rebuilding every key from the compressed cache. Tiny random models of every family on the CPU;
``ExactLayer`` alone against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG
from test_patch import FULL, _tiny_calibration
from test_prefill import SPARSE, _generate, _grouped, _ragged

# sparse, lossy SALS layers (a quarter of the candidates, 4-bit values) beside exact dense ones
LOSSY = {"preset": None, "dtype": "float32", "n_sink": 2, "n_recent": 4, "budget_frac": 0.25,
         "value_bits": 4}


def _exact_layers(cache) -> list:
    return [layer for layer in cache.layers if isinstance(layer, sals.hf.ExactLayer)]


def _full_layers(model) -> list[int]:
    return [layer.index for layer in sals.hf._arch.describe(model).layers if not layer.sliding]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_dense_equivalent_with_exact_dense_layers_equals_the_unpatched_model(family):
    """Greedy tokens identical, and a forward loop's logits within the dense-equivalence
    tolerance (test_patch.py), with the paper's dense layers exact and with every layer."""
    model = tiny.model(family)
    ids = tiny.prompt(50, batch=2)
    ref_tokens = model.generate(ids[:, :40], max_new_tokens=16, do_sample=False)
    ref = tiny.logits(model, ids)[:, 29:]
    for dense_layers in (None, range(len(model.model.layers))):
        sals.hf.patch(model, dense_kv="exact", dense_layers=dense_layers, **FULL)
        out = model.generate(ids[:, :40], max_new_tokens=16, do_sample=False,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref_tokens)
        dense = {0, 1, 3} if dense_layers is None else {0, 1, 2, 3}
        exact = _exact_layers(getattr(out, CACHE_ARG))
        assert [layer.index for layer in exact] == sorted(set(_full_layers(model)) & dense)
        cache = sals.hf.SalsCache(model, 2, 64)
        got = tiny.decode_logits(model, ids[:, :30], ids[:, 30:], cache)
        assert (got - ref).abs().max().item() < 1e-4


def test_an_exact_dense_layer_is_the_unpatched_layer():
    """Layer 0 sees the model's own input whatever the others do: with lossy sparse layers
    around it, its attention output at every decode step of a left-padded batch equals the
    unpatched model's (the compressed dense layer's, rebuilt from 4-bit values, does not)."""
    model = tiny.model("qwen3", initializer_range=0.05)
    calib = _tiny_calibration(model, rank_frac=0.5)
    ids, mask = tiny.left_padded([tiny.prompt(n, seed=s) for n, s in ((30, 3), (19, 4))])
    steps = tiny.prompt(8, batch=2, seed=9)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, out: seen.append(out[0].detach().clone()))

    def layer0_outputs(cache=None):
        seen.clear()
        kv = {} if cache is None else {CACHE_ARG: cache}
        with torch.no_grad():
            if cache is None:  # the unpatched model over the whole sequence at once
                model(torch.cat([ids, steps], 1), attention_mask=full_mask)
                return seen[0][:, ids.shape[1] - 1:]
            model(ids, attention_mask=mask, **kv)
            for i in range(steps.shape[1]):
                n = ids.shape[1] + i + 1
                model(steps[:, i:i + 1], attention_mask=full_mask[:, :n], **kv)
        return torch.cat([seen[0][:, -1:]] + seen[1:], 1)

    ref = layer0_outputs()
    errors = {}
    for dense_kv in ("exact", "compressed"):
        sals.hf.patch(model, calibration=calib, rank=32, dense_layers=[0], dense_kv=dense_kv,
                      **LOSSY)
        got = layer0_outputs(sals.hf.SalsCache(model, 2, 64))
        errors[dense_kv] = (got - ref).abs().max().item() / ref.std().item()
    hook.remove()
    assert errors["exact"] < 1e-5
    assert errors["compressed"] > 100 * errors["exact"]


def _rope64(x, positions, rope):
    """float64 rotate-half RoPE of x [T, H, d] at positions [T]."""
    ang = positions.double()[:, None, None] * torch.from_numpy(rope.inv_freq).double()
    cos = torch.cat([ang.cos()] * 2, -1) * rope.attention_scaling
    sin = torch.cat([ang.sin()] * 2, -1) * rope.attention_scaling
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def test_exact_layer_alone_against_float64():
    """Chunks (the first one a single token), padded slots, decode steps, rows filled apart
    through ``first``, GQA 6:2, attention scaling: each query's output equals float64
    attention over the exactly rotated keys of its row's slots up to its own (padding
    excluded), and a padding query's output is zero."""
    torch.manual_seed(0)
    hq, hkv, d, scale = 6, 2, 16, 0.3
    rope = sals.Rope(np.linspace(1.0, 0.01, d // 2).astype(np.float32), attention_scaling=1.3)
    layer = sals.hf.ExactLayer(0, rope, hq, hkv, d, scale, 3, 40, torch.float32,
                               torch.device("cpu"))
    held = {r: ([], [], []) for r in range(3)}  # per row: keys, values, positions

    def step(first, batch, tokens, padded=()):
        k, v = torch.randn(batch, tokens, hkv, d), torch.randn(batch, tokens, hkv, d)
        q = torch.randn(batch, tokens, hq, d)
        past = int(layer.row_slots[first])
        pos = torch.arange(past, past + tokens, dtype=torch.int32).repeat(batch, 1) + 2
        for r, c in padded:
            pos[r, c] = -1
        layer.first = first
        layer.append(k, v, pos)
        out = layer.attend(q, pos)
        layer.first = 0
        for r in range(batch):
            keys, values, positions = held[first + r]
            keys.append(k[r]), values.append(v[r]), positions.append(pos[r])
            kk, vv, pp = (torch.cat(x).double() for x in held[first + r])
            kk = _rope64(kk, pp, rope)
            for t in range(tokens):
                if pos[r, t] < 0:
                    assert not out[r, t].any()
                    continue
                seen = (torch.arange(pp.shape[0]) <= past + t) & (pp >= 0)
                qr = _rope64(q[r, t:t + 1].double(), pos[r, t:t + 1], rope)[0]
                for h in range(hq):
                    p = (kk[seen, h // (hq // hkv)] @ qr[h] * scale).softmax(0)
                    want = p @ vv[seen, h // (hq // hkv)]
                    assert (out[r, t, h].double() - want).abs().max().item() < 1e-5

    step(0, 2, 1)                           # a one-token first chunk
    step(0, 2, 5, padded=[(1, 0), (1, 1)])  # a chunk with padding in row 1
    step(2, 1, 7, padded=[(0, 0)])          # row 2 alone, at its own length
    for _ in range(3):
        step(0, 2, 1)                       # decode steps of rows 0..1
    step(0, 2, 1, padded=[(1, 0)])          # a padding token in a decode step
    step(2, 1, 1)
    assert layer.row_slots.tolist() == [10, 10, 8]
    assert layer.filled.sum(1).tolist() == [10, 7, 7]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_grouped_prefill_and_generate_equal_the_whole_batch(family):
    """sals.hf.prefill by groups and chunks, then generate, with exact dense layers beside
    sparse ones: the whole batch's tokens and (within float rounding) logits. (16-bit values:
    a rounding difference of the batch's forward can move a quantised value across a step.)"""
    model = tiny.model(family)
    sals.hf.patch(model, dense_kv="exact", **{**SPARSE, "dense_layers": [0, 1]})
    ids, mask = _ragged()
    whole = _grouped(model, ids, mask, rows=4)
    assert _exact_layers(whole)
    want, want_logits = _generate(model, ids, mask, whole)
    for rows, chunk in ((1, None), (3, 7), (2, 2)):
        cache = _grouped(model, ids, mask, rows, chunk)
        got, logits = _generate(model, ids, mask, cache)
        assert torch.equal(got, want), (rows, chunk)
        assert (logits - want_logits).abs().max().item() < 1e-4, (rows, chunk)
        # the same tokens per row (a group's skipped leading columns are counted after its
        # forwards, so they are empty slots at its end, not at its start)
        for a, b in zip(_exact_layers(cache), _exact_layers(whole)):
            assert a.row_slots.tolist() == b.row_slots.tolist()
            assert a.filled.sum(1).tolist() == b.filled.sum(1).tolist()


def test_memory_counts_the_exact_keys_and_values():
    """Per exact layer: exact_kv = the slots used (padding's included) times 2 * Dk
    model-dtype elements, in total; dense_fp16 = 4 * Dk bytes per token held (padding not);
    allocated = the static tensors and the slot mask (exact_kv_allocated). The SALS layer
    holds what it holds in a compressed patch."""
    model = tiny.model("llama")
    ids, mask = tiny.left_padded([tiny.prompt(n, seed=s) for n, s in ((20, 3), (13, 4))])
    caches = {}
    for dense_kv in ("compressed", "exact"):
        sals.hf.patch(model, dense_kv=dense_kv, **LOSSY)  # dense layers 0, 1, 3
        caches[dense_kv] = sals.hf.SalsCache(model, 3, 32)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{CACHE_ARG: caches[dense_kv]})
    exact, compressed = (caches[k].memory() for k in ("exact", "compressed"))
    dk, slots, tokens = 2 * 32, 2 * 20, 20 + 13
    sparse = caches["exact"].layers[2].memory()
    assert sparse == caches["compressed"].layers[2].memory()
    assert exact["exact_kv"] == 3 * slots * 2 * dk * 4
    assert exact["total"] == exact["exact_kv"] + sparse["total"]
    assert exact["exact_kv_allocated"] == 3 * (2 * 3 * 32 * dk * 4 + 3 * 32)
    assert exact["allocated"] == exact["exact_kv_allocated"] + sparse["allocated"]
    assert exact["dense_fp16"] == compressed["dense_fp16"] == 4 * 4 * dk * tokens
    assert "exact_kv" not in compressed


def test_memory_total_is_the_layers_sum():
    model = tiny.model("llama")
    sals.hf.patch(model, dense_kv="exact", **LOSSY)
    cache = sals.hf.SalsCache(model, 1, 32)
    with torch.no_grad():
        model(tiny.prompt(20), **{CACHE_ARG: cache})
    layers = [layer.memory() for layer in cache.layers]
    assert cache.memory()["total"] == sum(m["total"] for m in layers)
    assert cache.memory()["allocated"] == sum(m["allocated"] for m in layers)
    per_slot = 2 * 64 * 4
    assert [m.get("exact_kv") for m in layers] == [20 * per_slot, 20 * per_slot, None,
                                                   20 * per_slot]


def test_reset_of_rows_leaves_the_others():
    """SalsCache.reset(first, batch) empties those rows of every layer (exact ones included);
    the others decode as before; a bad range is named and resets nothing; with sliding-window
    layers only a whole reset is possible."""
    model = tiny.model("llama")
    sals.hf.patch(model, dense_kv="exact", **LOSSY)
    ids = tiny.prompt(16, batch=3)
    cache = sals.hf.SalsCache(model, 3, 32)
    with torch.no_grad():
        model(ids[:, :12], **{CACHE_ARG: cache})
        for bad, error, match in (({"first": -1}, sals.InvalidArgumentError, "^first: -1"),
                                  ({"first": 2, "batch": 2}, sals.CapacityError,
                                   "^first: 2 \\+ batch 2 > max_batch 3"),
                                  ({"batch": -2}, sals.InvalidArgumentError, "^batch: -2"),
                                  ({"first": 1.0}, sals.InvalidArgumentError, "^first: ")):
            with pytest.raises(error, match=match):
                cache.reset(**bad)
        assert all(layer.row_slots.tolist() == [12] * 3 for layer in cache.layers)
        cache.reset(first=2, batch=1)
        for layer in cache.layers:
            assert layer.row_slots.tolist() == [12, 12, 0]
            if isinstance(layer, sals.hf.ExactLayer):
                assert layer.filled[:, :12].sum(1).tolist() == [12, 12, 0]
            else:
                assert layer.layer_cache.lengths().tolist() == [12, 12, 0]
        # rows 0..1 go on as a cache that never held row 2
        alone = sals.hf.SalsCache(model, 2, 32)
        model(ids[:2, :12], **{CACHE_ARG: alone})
        for i in range(12, 16):
            got = model(ids[:2, i:i + 1], **{CACHE_ARG: cache}).logits
            want = model(ids[:2, i:i + 1], **{CACHE_ARG: alone}).logits
            assert (got - want).abs().max().item() < 1e-6
        cache.reset()
        assert all(not layer.row_slots.any() for layer in cache.layers)

    gemma = tiny.model("gemma3")
    sals.hf.patch(gemma, dense_kv="exact", **LOSSY)
    cache = sals.hf.SalsCache(gemma, 2, 32)
    with pytest.raises(sals.UnsupportedError, match="^first, batch: rows 1..1 of 2; .*sliding"):
        cache.reset(first=1)
    cache.reset()


def test_bad_dense_kv_is_refused_naming_it():
    model = tiny.model("llama")
    ids = tiny.prompt(10)
    ref = tiny.logits(model, ids)
    for bad in ("Exact", "dense", None, True, ["exact"]):
        with pytest.raises(sals.InvalidArgumentError,
                           match=r"^dense_kv: expected one of \['compressed', 'exact'\], got"):
            sals.hf.patch(model, dense_kv=bad, **FULL)
        assert not sals.hf.is_patched(model)
    assert torch.equal(tiny.logits(model, ids), ref)
    # a refused re-patch keeps the previous patch, exact layers and all
    sals.hf.patch(model, dense_kv="exact", **FULL)
    with pytest.raises(sals.InvalidArgumentError, match="^dense_kv: "):
        sals.hf.patch(model, dense_kv="fast", **FULL)
    assert sals.hf.is_patched(model)
    assert _exact_layers(sals.hf.SalsCache(model, 1, 8))


def test_unpatch_restores_the_model():
    model = tiny.model("qwen2")
    ids = tiny.prompt(30)
    ref = tiny.logits(model, ids)
    sals.hf.patch(model, dense_kv="exact", **LOSSY)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    sals.hf.unpatch(model)
    assert not sals.hf.is_patched(model)
    assert torch.equal(tiny.logits(model, ids), ref)


def test_exact_layers_use_the_scale_override():
    """``scale`` applies to exact layers too (as it does to the SALS layers), 0 meaning
    1/sqrt(head_dim); the model's own scale by default."""
    model = tiny.model("gemma3")  # query_pre_attn_scalar 24: the model's scale is 24 ** -0.5
    for scale, want in ((None, 24 ** -0.5), (0.1, 0.1), (0, 32 ** -0.5)):
        extra = {} if scale is None else {"scale": scale}
        sals.hf.patch(model, dense_kv="exact", dense_layers=[1], **FULL, **extra)
        (layer,) = _exact_layers(sals.hf.SalsCache(model, 1, 8))
        assert math.isclose(layer.scale, want, rel_tol=1e-6)
    with pytest.raises(sals.InvalidArgumentError, match="^scale: "):
        sals.hf.patch(model, dense_kv="exact", dense_layers=[1, 3], scale="0.1", **FULL)


def test_capacity_is_checked_before_anything_is_stored():
    model = tiny.model("llama")
    sals.hf.patch(model, dense_kv="exact", **FULL)
    cache = sals.hf.SalsCache(model, 1, 12)
    ids = tiny.prompt(13)
    with torch.no_grad():
        with pytest.raises(sals.CapacityError, match="12 token slots"):
            model(ids, **{CACHE_ARG: cache})
        model(ids[:, :12], **{CACHE_ARG: cache})
        with pytest.raises(sals.CapacityError, match="max_tokens"):
            model(ids[:, 12:], **{CACHE_ARG: cache})
    assert all(layer.row_slots.tolist() == [12] for layer in cache.layers)


def test_auto_counts_the_exact_layers():
    """preset "auto" plans the SALS layers within what the exact dense layers leave of the
    target: a cache at kv_context tokens holds at most kv_fraction of dense fp16 K+V over
    every full-attention layer; a target below the exact layers' own bytes is refused naming
    them."""
    model = tiny.model("llama", dtype=torch.bfloat16)
    calib = _tiny_calibration(tiny.model("llama"), rank_frac=1.0)
    calib = sals.Calibration(calib.layers, sals.hf.fingerprint(model), calib.data)
    context = 512
    sals.hf.patch(model, calibration=calib, preset="auto", kv_fraction=0.5,
                  kv_context=context, dense_layers=[0], dense_kv="exact", n_sink=2, n_recent=4)
    cache = sals.hf.SalsCache(model, 1, context)
    with torch.no_grad():
        model(tiny.prompt(context), **{CACHE_ARG: cache})
    mem = cache.memory()
    assert mem["exact_kv"] == context * 2 * 64 * 2  # one layer, bfloat16: 1/4 of the target
    assert mem["dense_fp16"] == 4 * context * 4 * 64
    assert mem["total"] <= 0.5 * mem["dense_fp16"]
    assert mem["total"] - mem["exact_kv"] > 0.2 * mem["dense_fp16"]  # the rest is used
    sals.hf.unpatch(model)
    with pytest.raises(sals.InvalidArgumentError,
                       match=r"^kv_fraction: 0.4 is below .*the exact dense layers 0.7500\)"):
        sals.hf.patch(model, calibration=calib, preset="auto", kv_fraction=0.4,
                      kv_context=context, dense_kv="exact")
    assert not sals.hf.is_patched(model)


def test_the_bench_byte_floor_counts_the_exact_layers():
    """bench e2e's bytes per decode step: an exact dense layer reads 2 * Dk model-dtype
    elements per token (float32 here), a compressed one its latent keys and values (full
    rank and 16-bit values here: 2 * Dk * 2 bytes)."""
    from sals.tools import bench_e2e

    model = tiny.model("llama")
    floors = {}
    for dense_kv in ("compressed", "exact"):
        sals.hf.patch(model, dense_kv=dense_kv, **FULL)
        floors[dense_kv] = bench_e2e.step_bytes(model, "sals-25", 2, 100)
    assert floors["exact"] - floors["compressed"] == 3 * 2 * 100 * (2 * 64 * 4 - 2 * 64 * 2)


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_are_rotated_as_the_model_rotates_them(family, dtype):
    """sals.static_kv's RoPE from a layer's inv_freq and attention scaling gives the model's
    own cos, sin and rotated keys, bit for bit (Llama-3 frequency scaling; Gemma 3's
    full-attention layers)."""
    from sals import static_kv

    model = tiny.model(family, dtype=dtype)
    layer = next(x for x in sals.hf._arch.describe(model).layers if not x.sliding)
    positions = torch.tensor([[0, 5, 17, 300, 1023]])
    x = torch.randn(1, 2, 5, 32, dtype=dtype)
    rotary = model.model.rotary_emb
    kind = () if family != "gemma3" else ("full_attention",)
    cos, sin = rotary(x, positions, *kind)
    got_cos, got_sin = static_kv.rope_cos_sin(positions, layer.inv_freq,
                                              layer.attention_scaling, dtype)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    apply = sals.hf._arch.modeling_function(layer.module, "apply_rotary_pos_emb")
    want, _ = apply(x, x, cos, sin)
    assert torch.equal(static_kv.rotate(x, cos[:, None], sin[:, None]), want)


def test_attention_without_native_gqa_repeats_the_kv_heads(monkeypatch):
    """Where torch predates enable_gqa, each KV head is repeated for its query heads: the same
    attention."""
    from sals import static_kv

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 3, 7) > 0.3
    mask[..., 0] = True
    native = static_kv.attention(q, k, v, mask, 0.25)
    monkeypatch.setattr(static_kv, "NATIVE_GQA", False)
    repeated = static_kv.attention(q, k, v, mask, 0.25)
    assert (native - repeated).abs().max().item() < 1e-6
