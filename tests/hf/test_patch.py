"""sals.hf.patch on tiny random models of every supported family (no download, CPU).

The dense-equivalence tests store the cache in float32: the tiny models' greedy choices are
separated by as little as ~4e-3 in logits, and float16 rounding of stored keys and values could
flip one; the float16 default is checked separately against a logit bound.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG, calibrate
from transformers import DynamicCache

FULL = {"preset": "dense-equivalent", "dtype": "float32"}
# small windows so that 40-token prompts leave real candidates to select among
SPARSE = {"n_sink": 2, "n_recent": 4, "budget_frac": 0.25, "dense_layers": []}


def _tiny_calibration(model, seed=7, rank_frac=0.5, query_weight=0.0):
    """A calibration of a tiny model on random token sequences (its keys are what matters)."""
    cal = sals.Calibrator([layer.dk for layer in sals.hf._arch.describe(model).layers])
    chunks = [tiny.prompt(64, seed=seed + i) for i in range(4)]
    calibrate.collect_keys(model, chunks, cal, progress=False)
    return cal.finish(rank_frac=rank_frac, fingerprint=sals.hf.fingerprint(model), data="random",
                      query_weight=query_weight)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_dense_equivalent_greedy_generate_is_token_identical(family):
    model = tiny.model(family)
    ids = tiny.prompt(40)
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    sals.hf.patch(model, **FULL)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = getattr(out, CACHE_ARG)
    assert isinstance(cache, sals.hf.SalsCache)
    assert cache.get_seq_length() == 40 + 24 - 1  # the last token is never fed back
    lengths = [layer.layer_cache.lengths()[0] for layer in cache.layers
               if isinstance(layer, sals.hf.SalsLayer)]
    assert lengths and all(n == 63 for n in lengths)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_dense_equivalent_sampling_matches_unpatched(family):
    model = tiny.model(family)
    ids = tiny.prompt(32, batch=2)
    torch.manual_seed(11)
    ref = model.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    sals.hf.patch(model, **FULL)
    torch.manual_seed(11)
    out = model.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_num_return_sequences_sizes_the_cache(family):
    model = tiny.model(family)
    ids = tiny.prompt(20)
    torch.manual_seed(3)
    ref = model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    sals.hf.patch(model, **FULL)
    torch.manual_seed(3)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert getattr(out, CACHE_ARG).max_batch == 3


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_forward_loop_matches_one_full_forward(family):
    """Prefill + one-token steps through an explicit SalsCache == one causal forward over the
    whole sequence (float32 rounding only)."""
    model = tiny.model(family)
    ids = tiny.prompt(50)
    ref = tiny.logits(model, ids)[:, 29:]
    sals.hf.patch(model, **FULL)
    got = tiny.decode_logits(model, ids[:, :30], ids[:, 30:], sals.hf.SalsCache(model, 1, 64))
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_float16_cache_stays_close(family):
    """The default float16 storage at full rank and budget only adds fp16 rounding."""
    model = tiny.model(family)
    ids = tiny.prompt(50)
    ref = tiny.logits(model, ids)[:, 29:]
    sals.hf.patch(model, preset="dense-equivalent")
    assert model._sals_patch.configs[1].dtype == "float16"
    got = tiny.decode_logits(model, ids[:, :30], ids[:, 30:], sals.hf.SalsCache(model, 1, 64))
    assert (got - ref).abs().max().item() < 5e-3


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_chunked_prefill(family):
    """A prompt fed in three chunks through one SalsCache gives the logits of a single forward:
    exact for the first chunk, dense attention over the (full-rank) cache for the others."""
    model = tiny.model(family)
    ids = tiny.prompt(45)
    ref = tiny.logits(model, ids)
    sals.hf.patch(model, **FULL)
    cache = sals.hf.SalsCache(model, 1, 64)
    got = torch.cat([tiny.logits(model, ids[:, a:b], **{CACHE_ARG: cache})
                     for a, b in ((0, 17), (17, 18), (18, 45))], 1)
    assert cache.get_seq_length() == 45
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_left_padded_batch_equals_sequences_alone(family):
    """Sparse SALS (selection active), a batch of three left-padded prompts of lengths 40, 23
    and 31 generates what each prompt generates alone, up to a near-tie: torch's batched and
    single-row float32 products round differently, which can swap a token at the budget's
    boundary or flip a greedy choice between two logits within 0.05 of each other. A sequence
    may leave its alone run only at such a step."""
    model = tiny.model(family)
    sals.hf.patch(model, dtype="float32", preset=None, **SPARSE)
    prompts = [tiny.prompt(n, seed=s) for n, s in ((40, 3), (23, 4), (31, 5))]
    alone = [model.generate(p, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                            output_scores=True) for p in prompts]
    ids, mask = tiny.left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    for i, (run, p) in enumerate(zip(alone, prompts)):
        ref, got = run.sequences[0, p.shape[1]:], out.sequences[i, ids.shape[1]:]
        differ = (got != ref).nonzero()
        if len(differ):
            top2 = run.scores[int(differ[0])][0].topk(2).values
            margin = (top2[0] - top2[1]).item()
            assert margin < 0.05, f"sequence {i} left its alone run where the margin was {margin}"
    # padding is not stored: each sequence holds its own tokens only
    layer = next(x for x in getattr(out, CACHE_ARG).layers if isinstance(x, sals.hf.SalsLayer))
    assert layer.layer_cache.lengths()[:3].tolist() == [40 + 11, 23 + 11, 31 + 11]
    assert getattr(out, CACHE_ARG).get_seq_length() == 40 + 11


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_matches_unpatched(attn):
    """Dense-equivalent SALS on a left-padded batch generates what the unpatched model
    generates for the same batch, with the float mask of eager attention and the boolean mask
    of SDPA."""
    model = tiny.model("qwen3", attn=attn)
    ids, mask = tiny.left_padded([tiny.prompt(n, seed=s) for n, s in ((30, 3), (17, 4))])
    kw = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(ids, **kw)
    sals.hf.patch(model, **FULL)
    assert torch.equal(model.generate(ids, **kw), ref)


def test_sparse_step_selects_a_budget():
    """With the sparse settings the decode step really selects: ceil(0.25 * S) candidates."""
    model = tiny.model("llama")
    sals.hf.patch(model, dtype="float32", preset=None, **SPARSE)
    cache = sals.hf.SalsCache(model, 1, 64)
    ids = tiny.prompt(41)
    with torch.no_grad():
        model(ids[:, :40], **{CACHE_ARG: cache})
        model(ids[:, 40:], **{CACHE_ARG: cache})
    idx, count = cache.layers[2].layer_cache.selected()
    assert count.tolist() == [int(np.ceil(0.25 * 41))]
    assert set(idx[0, 0, :count[0]].tolist()) <= set(range(2, 41 - 4))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_lossy_storage_stays_close(family):
    """Each lossy storage knob alone (all tokens selected), decode logits vs the unpatched model
    over 16 steps after a 48-token prompt, relative to the logits' standard deviation. Windows
    of 2 sinks + 4 recent tokens, so that most tokens are stored compressed. Bounds are about
    twice the largest error measured over these families."""
    model = tiny.model(family, initializer_range=0.05)
    ids = tiny.prompt(64)
    ref = tiny.logits(model, ids)[:, 47:]
    calib = _tiny_calibration(model)
    full = {"preset": "dense-equivalent", "n_sink": 2, "n_recent": 4, "dense_layers": []}
    knobs = {
        "float16": ({"dtype": "float16"}, 0.002),
        "values 8-bit": ({"dtype": "float32", "value_bits": 8}, 0.02),
        "values 4-bit": ({"dtype": "float32", "value_bits": 4}, 0.3),
        "values 2-bit": ({"dtype": "float32", "value_bits": 2}, 1.5),
        "rank Dk/2": ({"dtype": "float32", "calibration": calib, "rank": 32,
                       "score_rank": 32}, 1.0),
        "rank Dk/4": ({"dtype": "float32", "calibration": calib, "rank": 16,
                       "score_rank": 16}, 1.5),
    }
    errors = {}
    for name, (kw, _) in knobs.items():
        sals.hf.patch(model, **full, **kw)
        got = tiny.decode_logits(model, ids[:, :48], ids[:, 48:], sals.hf.SalsCache(model, 1, 64))
        errors[name] = (got - ref).abs().max().item() / ref.std().item()
    print(family, {k: round(v, 4) for k, v in errors.items()})
    for name, (_, bound) in knobs.items():
        assert 0 < errors[name] < bound, (name, errors[name])
    assert errors["values 8-bit"] < errors["values 4-bit"] < errors["values 2-bit"]
    assert errors["rank Dk/2"] < errors["rank Dk/4"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sparse_budget_error_vanishes_at_full_budget(family):
    """The selection knobs (budget, score rank) at full rank and float32 storage: error 0 up to
    rounding when the budget covers every token, and more error for smaller budgets. (How close
    sparse attention stays is a property of trained models, whose attention is peaked: see
    test_smollm2.py. Random tiny models attend almost uniformly, so any budget < 1 moves their
    logits by about one standard deviation.)"""
    model = tiny.model(family, initializer_range=0.05)
    ids = tiny.prompt(64)
    ref = tiny.logits(model, ids)[:, 47:]
    errors = {}
    for budget, score_rank in ((1.0, None), (1.0, 8), (0.5, None), (0.125, None), (0.125, 8)):
        sals.hf.patch(model, preset=None, dtype="float32", n_sink=2, n_recent=4, dense_layers=[],
                      budget_frac=budget, score_rank=score_rank)
        got = tiny.decode_logits(model, ids[:, :48], ids[:, 48:], sals.hf.SalsCache(model, 1, 64))
        errors[budget, score_rank] = (got - ref).abs().max().item() / ref.std().item()
    print(family, errors)
    assert errors[1.0, None] < 1e-4 and errors[1.0, 8] < 1e-4
    assert errors[0.125, None] > errors[0.5, None] > 100 * errors[1.0, None]
    assert errors[0.125, 8] > 100 * errors[1.0, None]


def test_query_energy_groups_heads_and_ties_rope_pairs():
    """calibrate.query_energy against a loop over heads: KV head h is read by query heads
    h*G .. h*G+G-1, and both dimensions of a RoPE pair (i, i + rotary_dim/2) get the pair's sum;
    dimensions past rotary_dim keep their own."""
    q = torch.randn(2, 5, 6, 10)  # [B, T, Hq=6, d=10], Hkv=2 (G=3), rotary_dim 8
    got = calibrate.query_energy(q, 2, 8).reshape(10, 2, 10)
    flat = q.reshape(10, 6, 10).double()
    for h in range(2):
        e = (flat[:, 3 * h:3 * h + 3] ** 2).sum(1)
        for i in range(4):
            torch.testing.assert_close(got[:, h, i].double(), e[:, i] + e[:, i + 4])
            torch.testing.assert_close(got[:, h, i + 4].double(), e[:, i] + e[:, i + 4])
        torch.testing.assert_close(got[:, h, 8:].double(), e[:, 8:])


def _rebuilt_keys_reference(model, calib, rank):
    """Hooks making an unpatched model attend over the keys a SALS cache rebuilds from a
    projection of the given rank: k -> ((k * s) U) U^T / s (s = 1 for plain PCA), applied
    after k_norm where the model has one."""
    handles = []
    for layer in sals.hf._arch.describe(model).layers:
        u = torch.from_numpy(calib.projection(layer.index, rank)).double()
        scale = calib.key_scale(layer.index)
        s = torch.ones(layer.dk, dtype=torch.float64) if scale is None else \
            torch.from_numpy(scale).double()
        m = (torch.diag(s) @ u @ u.T @ torch.diag(1 / s)).float()
        attn = layer.module
        target = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj

        def hook(module, args, out, m=m):
            return (out.reshape(*out.shape[:2], -1) @ m).reshape(out.shape)
        handles.append(target.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_query_weighted_keys_are_rebuilt_exactly_as_calibrated(family):
    """With a query-weighted calibration (the cache stores s * k, attends with q / s) at rank
    Dk/4, every layer dense over rebuilt keys and no exact windows, decode logits equal those of
    the unpatched model attending over ((k * s) U) U^T / s, and differ from those of plain PCA's
    rebuilt keys by far more than the tolerance. A one-token prompt makes prefill (exact keys
    in both) independent of the keys."""
    model = tiny.model(family, initializer_range=0.05)
    n_layers = len(sals.hf._arch.describe(model).layers)
    ids = tiny.prompt(24)
    refs, got = {}, {}
    for weight in (0.0, 1.0):
        calib = _tiny_calibration(model, query_weight=weight)
        handles = _rebuilt_keys_reference(model, calib, 16)
        try:
            refs[weight] = tiny.decode_logits(model, ids[:, :1], ids[:, 1:], DynamicCache())
        finally:
            for h in handles:
                h.remove()
        sals.hf.patch(model, calibration=calib, preset=None, rank=16, score_rank=16,
                      dtype="float32", n_sink=0, n_recent=0, dense_layers=range(n_layers))
        got[weight] = tiny.decode_logits(model, ids[:, :1], ids[:, 1:],
                                         sals.hf.SalsCache(model, 1, 24))
        sals.hf.unpatch(model)
    scale = refs[0.0].std().item()
    for weight in (0.0, 1.0):
        assert (got[weight] - refs[weight]).abs().max().item() < 1e-4 * scale, weight
    assert (refs[1.0] - refs[0.0]).abs().max().item() > 1e-2 * scale


def test_full_rank_ignores_the_key_scale():
    """At full rank the projection is the identity and no key scale is applied, so
    dense-equivalent stays token for token whatever the calibration."""
    model = tiny.model("llama")
    calib = _tiny_calibration(model, rank_frac=1.0, query_weight=1.0)
    assert calib.key_scale(0) is not None
    sals.hf.patch(model, calibration=calib, **FULL)
    state = sals.hf.patch.__globals__["patch_state"](model)
    assert all(s is None for s in state.key_scales.values())
    cache = sals.hf.SalsCache(model, 1, 8)
    assert all(layer.k_scale is None for layer in cache.layers)


def test_unpatch_restores_the_model():
    model = tiny.model("qwen3")
    ids = tiny.prompt(30)
    ref = tiny.logits(model, ids)
    ref_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    attn = model.model.layers[0].self_attn
    sals.hf.patch(model, **FULL)
    assert sals.hf.is_patched(model) and "forward" in vars(attn)
    sals.hf.unpatch(model)
    assert not sals.hf.is_patched(model)
    assert "forward" not in vars(attn) and "forward" not in vars(model)
    assert "_prepare_cache_for_generation" not in vars(model)
    assert torch.equal(tiny.logits(model, ids), ref)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_gen)
    assert isinstance(getattr(out, CACHE_ARG), DynamicCache)
    with pytest.raises(sals.InvalidArgumentError, match="not patched"):
        sals.hf.unpatch(model)


def test_plain_forward_creates_a_sals_cache_and_continues():
    model = tiny.model("llama")
    ids = tiny.prompt(30)
    ref = tiny.logits(model, ids)
    sals.hf.patch(model, max_tokens=40, **FULL)
    with torch.no_grad():
        out = model(ids[:, :25])
        cache = getattr(out, CACHE_ARG)
        assert isinstance(cache, sals.hf.SalsCache) and cache.max_tokens == 40
        step = model(ids[:, 25:], **{CACHE_ARG: cache}).logits
        # use_cache=False: the original attention, no cache at all
        assert getattr(model(ids, use_cache=False), CACHE_ARG) is None
    assert (step - ref[:, 25:]).abs().max().item() < 1e-4


def test_sals_cache_holds_no_dense_keys():
    model = tiny.model("gemma3")
    sals.hf.patch(model, preset=None, value_bits=4, **SPARSE)
    out = model.generate(tiny.prompt(40), max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
    cache = getattr(out, CACHE_ARG)
    for i, layer in enumerate(cache.layers):
        if model.config.layer_types[i] == "full_attention":
            assert isinstance(layer, sals.hf.SalsLayer) and layer.keys is None
        else:  # exact window: at most sliding_window - 1 tokens
            assert layer.keys.shape[-2] == model.config.sliding_window - 1
    mem = cache.memory()
    assert mem["window"] > 0 and mem["total"] > 0
    # 4-bit values with a float16 exact window still undercut dense fp16 at 43 tokens
    assert mem["total"] - mem["window"] - mem["projection"] < mem["dense_fp16"]


def test_errors_are_clear():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(sals.UnsupportedError, match="GPT2LMHeadModel.*supported: llama"):
        sals.hf.patch(gpt2)

    model = tiny.model("llama")
    with pytest.raises(sals.CalibrationError, match="rank 16 of Dk=64.*needs a calibration"):
        sals.hf.patch(model)  # sals-25 without a calibration
    other = tiny.model("llama", seed=1)
    with pytest.raises(sals.CalibrationError, match="another model.*weights_sha256"):
        sals.hf.patch(model, calibration=_tiny_calibration(other))
    with pytest.raises(sals.CalibrationError, match="another model.*n_layers"):
        sals.hf.patch(model, calibration=_tiny_calibration(
            tiny.model("llama", num_hidden_layers=2)))
    with pytest.raises(sals.InvalidArgumentError, match="dense_layers"):
        sals.hf.patch(model, dense_layers=[7], **FULL)
    with pytest.raises(sals.InvalidArgumentError, match="max_batch"):
        sals.hf.patch(model, max_batch=4, **FULL)
    with pytest.raises(sals.InvalidArgumentError, match="float64"):
        sals.hf.patch(tiny.model("llama", dtype=torch.float64), **FULL)
    with pytest.raises(sals.InvalidArgumentError, match="not patched"):
        sals.hf.SalsCache(model, 1, 8)

    sals.hf.patch(model, **FULL)
    ids = tiny.prompt(12)
    with pytest.raises(sals.InvalidArgumentError, match="in a SalsCache, got DynamicCache"):
        model(ids, **{CACHE_ARG: DynamicCache()})
    with pytest.raises(sals.CapacityError, match="max_tokens"):
        tiny.logits(model, ids, **{CACHE_ARG: sals.hf.SalsCache(model, 1, 8)})
    with pytest.raises(sals.UnsupportedError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)
    stale = sals.hf.SalsCache(model, 1, 16)
    sals.hf.patch(model, **FULL)  # a new patch: caches of the old one are refused
    with pytest.raises(sals.InvalidArgumentError, match="another patch"):
        tiny.logits(model, ids, **{CACHE_ARG: stale})


# the old name on purpose: transformers 5.24 warns that it goes in 5.40
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_patched_model_never_keeps_dense_kv():
    """Under every cache keyword this transformers knows (``past_key_values``, and ``cache``
    from 5.24 on), a non-SALS cache is refused by forward and generate; generate's own cache
    is a SalsCache whatever name transformers gives it."""
    model = tiny.model("llama")
    sals.hf.patch(model, **FULL)
    ids = tiny.prompt(12)
    for name in {"past_key_values", CACHE_ARG}:
        with pytest.raises(sals.InvalidArgumentError, match="in a SalsCache, got DynamicCache"):
            model(ids, **{name: DynamicCache()})
        with pytest.raises(sals.InvalidArgumentError, match="in a SalsCache, got DynamicCache"):
            model.generate(ids, max_new_tokens=2, do_sample=False, **{name: DynamicCache()})
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_ARG), sals.hf.SalsCache)
    assert getattr(out, CACHE_ARG).get_seq_length() == 12 + 2

    # a cache smuggled in under a keyword the patch does not know is refused, not updated
    attn = model.model.layers[0].self_attn
    hidden = torch.zeros(1, 3, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(sals.UnsupportedError, match="unknown keyword"):
        attn(hidden, position_embeddings=cos_sin, attention_mask=None,
             kv_store=DynamicCache())


def test_cuda_graph_refuses_what_it_cannot_capture():
    with pytest.raises(sals.UnsupportedError, match="cuda_graph: the model is on"):
        sals.hf.patch(tiny.model("llama"), cuda_graph=True, **FULL)
    with pytest.raises(sals.UnsupportedError, match="cuda_graph: layers .* sliding-window"):
        sals.hf.patch(tiny.model("gemma3"), cuda_graph=True, **FULL)
    with pytest.raises(sals.InvalidArgumentError, match="cuda_graph: expected a bool"):
        sals.hf.patch(tiny.model("llama"), cuda_graph="yes", **FULL)


# the old name on purpose: transformers 5.24 and 5.25 still take it, with a FutureWarning
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", sorted({"past_key_values", CACHE_ARG}))
@pytest.mark.parametrize("extra, config_flag, refused", [
    ({"output_hidden_states": True}, None, "'output_hidden_states'"),
    ({"output_attentions": True}, None, "'output_attentions'"),
    ({"return_dict": False}, None, "'return_dict=False'"),
    ({}, "output_hidden_states", "'config.output_hidden_states'"),
    ({}, "output_attentions", "'config.output_attentions'"),
])
def test_cuda_graph_decode_refuses_extra_outputs_under_every_cache_name(name, extra, config_flag,
                                                                        refused):
    """A captured decode step returns logits only: hidden states, attentions or tuples, asked
    for in the call or in the config, are refused, whichever name this transformers takes the
    cache under (on 5.24 and 5.25 a cache under past_key_values used to skip the graph path,
    and with it the refusal: issue 21, item 7). The refusal comes before any CUDA work, so a
    CPU model with the graph path switched on (patch refuses cuda_graph for it) checks it."""
    model = tiny.model("llama", attn="eager")  # eager: the config may ask for attentions
    sals.hf.patch(model, **FULL)
    sys.modules["sals.hf.patch"].patch_state(model).cuda_graph = True
    ids = tiny.prompt(8)
    cache = sals.hf.SalsCache(model, 1, 16)
    with torch.no_grad():
        model(ids, **{name: cache})
        if config_flag is not None:
            setattr(model.config, config_flag, True)
        with pytest.raises(sals.UnsupportedError, match=f"cuda_graph: .*got .*{refused}"):
            model(ids[:, :1], **{name: cache}, **extra)
        assert cache.get_seq_length() == 8  # refused before anything was stored
        if config_flag is not None:
            setattr(model.config, config_flag, False)
        # a plain step is served: the first decode step of a cache runs eagerly, even on the CPU
        assert model(ids[:, :1], **{name: cache}).logits.shape == (1, 1, 97)
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize("dtype, refused", [(torch.float16, True), (torch.float32, False)])
def test_key_scale_beyond_the_dtype_is_refused_at_patch_time(dtype, refused):
    """A query-weighted calibration whose 1/s overflows the model's dtype (float16 past 65504)
    is refused by patch, naming the layer and the cause, and the model stays unpatched; in
    float32 the same scale serves."""
    model = tiny.model("llama").to(dtype)
    made = _tiny_calibration(tiny.model("llama"), query_weight=1.0)
    for layer in made.layers:
        layer.key_scale = np.full(layer.dk, 1e-6, np.float32)  # 1/s = 1e6
    calib = sals.Calibration(made.layers, sals.hf.fingerprint(model), made.data, 1.0)
    if refused:
        with pytest.raises(sals.CalibrationError,
                           match=r"layer 0's key scale spans 1e-06\.\.1e-06 .*float16"):
            sals.hf.patch(model, calibration=calib, preset="sals-25", **SPARSE)
        assert not sals.hf.is_patched(model)
    else:
        sals.hf.patch(model, calibration=calib, preset="sals-25", **SPARSE)
        assert sals.hf.is_patched(model)
        sals.hf.unpatch(model)


@pytest.mark.parametrize("options, match", [
    ({"max_tokens": 47.9}, "^max_tokens: expected an int"),
    ({"max_tokens": True}, "^max_tokens: expected an int"),
    ({"dense_layers": [0.5]}, "^dense_layers: expected an int"),
    ({"foo": 1}, "^foo: not a patch option"),
    ({"preset": "auto", "kv_fraction": "0.3"}, "^kv_fraction: expected a real number"),
    ({"preset": "auto", "kv_fraction": 0.3, "kv_context": 4096.5}, "^kv_context: expected an int"),
])
def test_patch_options_of_the_wrong_type_are_refused(options, match):
    """Options are never coerced (47.9 tokens, "0.3", True) and an unknown keyword is named;
    the model stays unpatched."""
    model = tiny.model("llama")
    options = {"preset": "sals-25", **options}
    with pytest.raises(sals.InvalidArgumentError, match=match):
        sals.hf.patch(model, calibration=_tiny_calibration(model), **options)
    assert not sals.hf.is_patched(model)


def _patched(model, **options):
    """What patch(model, **options) sets per layer, and the logits of a short decode."""
    sals.hf.patch(model, **options)
    try:
        state = sals.hf.state.patch_state(model)
        ids = tiny.prompt(24)
        logits = tiny.decode_logits(model, ids[:, :16], ids[:, 16:], sals.hf.SalsCache(model, 1, 32))
        return state.configs, state.projections, state.exact, logits
    finally:
        sals.hf.unpatch(model)


@pytest.mark.parametrize("name, obj, options", [
    ("sals-25", sals.presets.SALS_25, {}),
    ("sals-12.5", sals.presets.SALS_12_5, {"dense_kv": "exact", "dense_layers": [0]}),
    ("dense-equivalent", sals.presets.DENSE_EQUIVALENT, {"dtype": "float32"}),
    ("auto", sals.presets.Auto(0.3), {}),
    ("auto", sals.presets.Auto(0.75, 0), {"kv_context": 0, "dense_kv": "exact",
                                          "dense_layers": [0]}),
])
def test_a_preset_name_and_its_object_patch_alike(name, obj, options):
    """patch(preset=NAME, **options) and patch(preset=OBJECT) set the same configs and
    projections and decode the same logits; "auto"'s arguments travel as keywords with the
    name and inside the object."""
    model = tiny.model("llama")
    calib = _tiny_calibration(model, rank_frac=1.0)
    by_object = {**SPARSE, **{k: v for k, v in options.items() if k != "kv_context"}}
    by_name = {**SPARSE, **options}
    if name == "auto":
        by_name["kv_fraction"] = obj.kv_fraction
    configs, projections, exact, logits = _patched(model, calibration=calib, preset=name,
                                                    **by_name)
    configs_o, projections_o, exact_o, logits_o = _patched(model, calibration=calib, preset=obj,
                                                           **by_object)
    assert configs == configs_o and exact == exact_o and configs
    assert bool(exact) == ("dense_kv" in options)
    assert projections.keys() == projections_o.keys()
    assert all(np.array_equal(projections[i], projections_o[i]) for i in projections)
    assert torch.equal(logits, logits_o)


@pytest.mark.parametrize("options, match", [
    ({"preset": 3}, r"^preset: unknown preset 3; expected one of \('sals-25', 'sals-12.5', "
                    r"'dense-equivalent', 'auto', None\) or a sals.presets object"),
    ({"preset": sals.presets.Auto(0.3), "kv_fraction": 0.3},
     r"^kv_fraction, kv_context: only for preset='auto'"),
    ({"preset": sals.presets.SALS_25, "kv_context": 0},
     r"^kv_fraction, kv_context: only for preset='auto'"),
    ({"preset": None, "kv_fraction": 0.3}, r"^kv_fraction, kv_context: only for preset='auto'"),
    ({"preset": "auto"}, r"^kv_fraction: preset 'auto' needs kv_fraction="),
    ({"preset": sals.presets.Auto(0.3), "rank": 16}, r"^rank: chosen per layer by preset 'auto'"),
])
def test_bad_presets_are_refused(options, match):
    model = tiny.model("llama")
    with pytest.raises(sals.InvalidArgumentError, match=match):
        sals.hf.patch(model, calibration=_tiny_calibration(model), **options)
    assert not sals.hf.is_patched(model)


def test_auto_objects_need_a_calibration():
    with pytest.raises(sals.CalibrationError, match="^calibration: preset 'auto' chooses"):
        sals.hf.patch(tiny.model("llama"), preset=sals.presets.Auto(0.3))


NEWEST = sals.hf._arch.NEWEST_TESTED_TRANSFORMERS  # "major.minor"
NEXT = f"{NEWEST.split('.')[0]}.{int(NEWEST.split('.')[1]) + 1}"


@pytest.mark.parametrize("version, warns", [
    ("5.17.0", False),
    (f"{NEWEST}.0", False),
    (f"{NEWEST}.3", False),  # a patch release of the newest tested one
    (f"{NEXT}.0.dev0", True),
    (f"{NEXT}.0", True),
    ("6.0.0", True),
])
def test_a_transformers_newer_than_tested_is_warned_about(monkeypatch, version, warns):
    """pyproject.toml sets no upper bound on transformers (pip would downgrade a newer one): a
    release newer than the newest tested one gets a warning naming both, not a refusal."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sals.hf._arch.warn_if_untested()
    message = (f"transformers {version} is newer than the newest release sals.hf is tested on "
               f"({NEWEST}); it may work (tested: transformers 5.17 to {NEWEST})")
    assert [str(w.message) for w in caught] == ([message] if warns else [])


def test_the_untested_transformers_warning_comes_once_on_import():
    """The check runs when sals.hf's transformers-facing modules are first imported, once."""
    code = textwrap.dedent("""
        import warnings
        import transformers
        transformers.__version__ = "9.0.0"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sals.hf.cache, sals.hf.patch, sals.hf.calibrate
        print(sum("transformers 9.0.0 is newer" in str(w.message) for w in caught))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_sals_passes_and_reads_the_cache_under_this_transformers_own_name():
    """transformers 5.24 renamed the KV cache ``past_key_values`` -> ``cache`` and warns on the
    old name (a FutureWarning from forwards and generate, a logged warning from outputs). What
    sals runs itself (generate and forwards of a patched model, the demo's generation, the
    eval's prefill and decode steps, bench e2e's timing) and a loop written as the README says
    emit neither."""
    from sals.tools import bench_e2e, demo
    from sals.tools.eval import runner

    model = tiny.model("llama")
    ids = tiny.prompt(12)
    assert sals.hf._arch.describe(model).cache_arg == CACHE_ARG
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers logs a message once per process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pre = runner.prefill(model, sals.hf._arch.describe(model), ids)
            dense = runner.greedy(model, pre, pre.cache, max_new=3, stop=set())
            bench_e2e._generate(model, ids, 2, torch)
            sals.hf.patch(model, **FULL)
            cache = sals.hf.SalsCache(model, 1, 16)
            tiny.logits(model, ids, **{CACHE_ARG: cache})
            assert runner.greedy(model, pre, cache, max_new=3, stop=set()) == dense
            demo.run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2)
            out = model.generate(ids, max_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True)
            assert isinstance(getattr(out, CACHE_ARG), sals.hf.SalsCache)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r.getMessage() for r in logged if "deprecated" in r.getMessage()]
