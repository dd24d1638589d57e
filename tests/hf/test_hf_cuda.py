"""The same patch on CUDA (skipped without a GPU and a CUDA build of sals): caches live on the
model's device, results match the CPU path."""

from __future__ import annotations

import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG
from test_patch import FULL, SPARSE

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sals.cuda_available()),
    reason="needs a CUDA device and sals built with CUDA")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_cuda_dense_equivalent_generate_is_token_identical(family):
    model = tiny.model(family).cuda()
    ids = tiny.prompt(40, batch=2).cuda()
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    sals.hf.patch(model, **FULL)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    layers = [x for x in getattr(out, CACHE_ARG).layers if isinstance(x, sals.hf.SalsLayer)]
    assert all(x.device.type == "cuda" and x.layer_cache.config.check_finite for x in layers)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_cuda_matches_cpu_with_sparse_selection(family):
    """Sparse SALS with 4-bit values on a left-padded batch: CUDA logits == CPU logits."""
    prompts = [tiny.prompt(n, seed=s) for n, s in ((40, 3), (23, 4))]
    ids, mask = tiny.left_padded(prompts)
    steps = tiny.prompt(8, batch=2, seed=9)
    logits = {}
    for device in ("cpu", "cuda"):
        model = tiny.model(family).to(device)
        sals.hf.patch(model, dtype="float32", preset=None, value_bits=4, **SPARSE)
        cache = sals.hf.SalsCache(model, 2, 64)
        full_mask = torch.cat([mask, torch.ones_like(steps)], 1).to(device)
        with torch.no_grad():
            out = [model(ids.to(device), attention_mask=mask.to(device),
                         **{CACHE_ARG: cache}).logits[:, -1:]]
            for i in range(steps.shape[1]):
                n = ids.shape[1] + i + 1
                out.append(model(steps[:, i:i + 1].to(device), attention_mask=full_mask[:, :n],
                                 **{CACHE_ARG: cache}).logits)
        logits[device] = torch.cat(out, 1).cpu()
    assert (logits["cuda"] - logits["cpu"]).abs().max().item() < 1e-3


def test_cuda_bfloat16_model():
    """A bf16 model gets a bf16 cache; dense-equivalent decode stays within bf16 rounding."""
    model = tiny.model("llama", dtype=torch.bfloat16).cuda()
    ids = tiny.prompt(50).cuda()
    ref = tiny.logits(model, ids)[:, 29:].float()
    sals.hf.patch(model, preset="dense-equivalent")
    assert model._sals_patch.configs[0].dtype == "bfloat16"
    got = tiny.decode_logits(model, ids[:, :30], ids[:, 30:], sals.hf.SalsCache(model, 1, 64))
    assert (got.float() - ref).abs().max().item() < 0.1 * ref.std().item()


GRAPH_FAMILIES = [f for f in tiny.FAMILIES if f != "gemma3"]  # gemma3: sliding layers


def _generate(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1), getattr(out, CACHE_ARG)


@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_cuda_graph_decode_equals_eager_decode(family):
    """Sparse SALS with 4-bit values: graph-replayed decode gives the eager path's tokens and
    logits, and dense-equivalent through graphs still equals dense."""
    model = tiny.model(family).cuda()
    ids = tiny.prompt(40, batch=2).cuda()
    dense = model.generate(ids, max_new_tokens=24, do_sample=False)
    sals.hf.patch(model, dtype="float32", preset=None, value_bits=4, **SPARSE)
    eager, eager_logits, _ = _generate(model, ids)
    sals.hf.patch(model, dtype="float32", preset=None, value_bits=4, cuda_graph=True, **SPARSE)
    graph, graph_logits, cache = _generate(model, ids)
    assert torch.equal(graph, eager)
    assert (graph_logits - eager_logits).abs().max().item() < 1e-4
    assert set(cache.decode_graphs) == {2} and cache.decode_graphs[2].graph is not None
    sals.hf.patch(model, cuda_graph=True, **FULL)
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), dense)


@pytest.mark.parametrize("dense_kv", ["compressed", "exact"])
def test_cuda_graph_left_padded_batch_and_hand_written_loop(dense_kv):
    prompts = [tiny.prompt(n, seed=s) for n, s in ((40, 3), (23, 4))]
    ids, mask = tiny.left_padded(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    model = tiny.model("llama").cuda()
    out = {}
    for graph in (False, True):
        sals.hf.patch(model, dtype="float32", preset=None, value_bits=4, cuda_graph=graph,
                      dense_kv=dense_kv, **{**SPARSE, "dense_layers": [0, 3]})
        out[graph] = model.generate(ids, attention_mask=mask, max_new_tokens=16,
                                    do_sample=False)
    assert torch.equal(out[True], out[False])

    # a hand-written loop over one SalsCache, with a padded decode token in sequence 1
    cache = sals.hf.SalsCache(model, 2, 64)
    steps = tiny.prompt(6, batch=2, seed=9).cuda()
    with torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_ARG: cache})
        full = torch.cat([mask, torch.ones_like(steps)], 1)
        full[1, ids.shape[1] + 3] = 0
        logits = []
        for i in range(steps.shape[1]):
            n = ids.shape[1] + i + 1
            pos = (full[:, :n].cumsum(1) - 1)[:, -1:]
            logits.append(model(steps[:, i:i + 1], attention_mask=full[:, :n],
                                position_ids=pos, **{CACHE_ARG: cache}).logits)
    assert cache.layers[0].slots == ids.shape[1] + steps.shape[1]
    lengths = cache.layers[2].layer_cache.lengths().tolist()
    assert lengths == [40 + 6, 23 + 5]  # the padded step stored nothing for sequence 1


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_cuda_graph_errors_are_clear():
    model = tiny.model("llama").cuda()
    ids = tiny.prompt(20).cuda()
    sals.hf.patch(model, cuda_graph=True, **FULL)
    cache = sals.hf.SalsCache(model, 1, 23)
    with torch.no_grad():
        model(ids, **{CACHE_ARG: cache})
        for i in range(3):
            model(ids[:, i:i + 1], **{CACHE_ARG: cache})
        with pytest.raises(sals.CapacityError, match="max_tokens 23"):
            model(ids[:, :1], **{CACHE_ARG: cache})
        cache = sals.hf.SalsCache(model, 1, 40)
        model(ids, **{CACHE_ARG: cache})
        # under either name: 5.24 and 5.25 still take past_key_values (issue 21, item 7)
        for name in {"past_key_values", CACHE_ARG}:
            with pytest.raises(sals.UnsupportedError, match="output_hidden_states"):
                model(ids[:, :1], **{name: cache}, output_hidden_states=True)
        # NaN input to a replayed step is reported by the next step
        model(ids[:, :1], **{CACHE_ARG: cache})
        model(ids[:, :1], **{CACHE_ARG: cache})
        emb = model.get_input_embeddings().weight
        saved = emb[ids[0, 0]].clone()
        emb.data[ids[0, 0]] = float("nan")
        model(ids[:, :1], **{CACHE_ARG: cache})
        emb.data[ids[0, 0]] = saved
        with pytest.raises(sals.NotFiniteError):
            torch.cuda.synchronize()
            model(ids[:, 1:2], **{CACHE_ARG: cache})


@pytest.mark.parametrize("dense_kv", ["compressed", "exact"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_grouped_prefill_generates_what_the_whole_batch_does(family, dense_kv):
    """sals.hf.prefill on CUDA, one sequence at a time and two at a time in chunks, then
    generate (every decode step a CUDA graph where the model allows one: not Gemma 3's sliding
    window): the tokens of a whole-batch prefill, logits within float rounding of it. Values
    are 16-bit: with quantised values a later chunk attends over dequantised values (not the
    prompt's exact ones), and a rounding-level difference in a latent key can move a code."""
    prompts = [tiny.prompt(n, seed=s) for n, s in ((40, 3), (23, 4), (31, 5))]
    ids, mask = (x.cuda() for x in tiny.left_padded(prompts))
    model = tiny.model(family).cuda()
    sals.hf.patch(model, dtype="float32", preset=None, value_bits=16,
                  cuda_graph=family != "gemma3", dense_kv=dense_kv,
                  **{**SPARSE, "dense_layers": [0, 1]})

    def run(rows, chunk_tokens):
        cache = sals.hf.SalsCache(model, 3, ids.shape[1] - 1 + 12)
        sals.hf.prefill(model, cache, ids, mask, rows=rows, chunk_tokens=chunk_tokens)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **{CACHE_ARG: cache})
        return out.sequences, torch.stack(out.scores, 1)

    want, want_scores = run(3, None)
    for rows, chunk_tokens in ((1, None), (2, 5)):
        got, scores = run(rows, chunk_tokens)
        assert torch.equal(got, want), (rows, chunk_tokens)
        assert (scores - want_scores).abs().max().item() < 1e-3, (rows, chunk_tokens)


# ---- exact dense layers and compiled steps (issue 20, item 2) ---------------------------------

def _exact(cache) -> list:
    return [layer for layer in cache.layers if isinstance(layer, sals.hf.ExactLayer)]


@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_cuda_exact_dense_layers_graph_equals_eager(family):
    """dense_kv="exact" beside sparse 4-bit layers: graph replays give the eager path's tokens
    and logits; dense-equivalent with exact dense layers through graphs equals dense."""
    model = tiny.model(family).cuda()
    ids = tiny.prompt(40, batch=2).cuda()
    dense = model.generate(ids, max_new_tokens=24, do_sample=False)
    options = {"dtype": "float32", "preset": None, "value_bits": 4, "dense_kv": "exact",
               **SPARSE, "dense_layers": [0, 3]}
    sals.hf.patch(model, **options)
    eager, eager_logits, _ = _generate(model, ids)
    sals.hf.patch(model, cuda_graph=True, **options)
    graph, graph_logits, cache = _generate(model, ids)
    assert [layer.index for layer in _exact(cache)] == [0, 3]
    assert cache.decode_graphs[2].graph is not None
    assert torch.equal(graph, eager)
    assert (graph_logits - eager_logits).abs().max().item() < 1e-4
    sals.hf.patch(model, cuda_graph=True, dense_kv="exact", **FULL)
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), dense)


def test_cuda_exact_layer_selects_cudnn_and_stays_within_bfloat16():
    """A bfloat16 model: the exact layers run cuDNN attention where the GPU has it (sm80+),
    and dense-equivalent decode stays within bf16 rounding of the unpatched model."""
    model = tiny.model("llama", dtype=torch.bfloat16).cuda()
    ids = tiny.prompt(50).cuda()
    ref = tiny.logits(model, ids)[:, 29:].float()
    sals.hf.patch(model, preset="dense-equivalent", dense_kv="exact", cuda_graph=True)
    cache = sals.hf.SalsCache(model, 1, 64)
    backends = {layer.attention_backend for layer in _exact(cache)}
    if torch.cuda.get_device_capability() >= (8, 0):
        assert backends == {"cudnn"}, backends
    got = tiny.decode_logits(model, ids[:, :30], ids[:, 30:], cache)
    assert (got.float() - ref).abs().max().item() < 0.1 * ref.std().item()


@pytest.mark.parametrize("family, dense_kv", [("llama", "compressed"), ("llama", "exact"),
                                              ("qwen3", "exact")])
def test_cuda_compiled_step_equals_eager(family, dense_kv):
    """compile=True, with and without cuda_graph: the eager patch's tokens and logits on a
    left-padded batch; one compilation per patch serves every step of two caches."""
    from torch._dynamo.utils import counters

    prompts = [tiny.prompt(n, seed=s) for n, s in ((40, 3), (23, 4))]
    ids, mask = (x.cuda() for x in tiny.left_padded(prompts))
    model = tiny.model(family).cuda()
    options = {"dtype": "float32", "preset": None, "value_bits": 4, "dense_kv": dense_kv,
               **SPARSE, "dense_layers": [0, 3]}
    sals.hf.patch(model, **options)
    want, want_logits, _ = _generate(model, ids, attention_mask=mask, pad_token_id=0)
    for graph in (False, True):
        sals.hf.patch(model, compile=True, cuda_graph=graph, **options)
        before = counters["stats"]["unique_graphs"]
        for _ in range(2):
            got, logits, cache = _generate(model, ids, attention_mask=mask, pad_token_id=0)
            assert torch.equal(got, want), graph
            assert (logits - want_logits).abs().max().item() < 1e-4, graph
        assert counters["stats"]["unique_graphs"] == before + 1, graph
        captured = cache.decode_graphs.get(2)  # keyed by batch size; none without graphs
        assert (captured is not None and captured.graph is not None) == graph
