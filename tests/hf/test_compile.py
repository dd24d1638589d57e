"""``patch(..., compile=True)`` on the CPU: each decode step's forward runs through
torch.compile (inductor, one graph with the torch.ops.sals operators inside), compiled once per
patch and shared by its caches. The compiled steps give the eager patched model's tokens and,
within float rounding, its logits; what cannot be compiled is refused naming ``compile``.
(On CUDA the compiled step is also captured in a CUDA graph: tests/hf/test_hf_cuda.py.)"""

from __future__ import annotations

import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG
from test_prefill import _ragged

pytest.importorskip("torch._inductor")
from torch._dynamo.utils import counters  # noqa: E402

# sparse SALS with 4-bit values, and the dense layers (0, 1, L-1) exact or compressed
LOSSY = {"preset": None, "dtype": "float32", "n_sink": 2, "n_recent": 4, "budget_frac": 0.25,
         "value_bits": 4}
COMPILABLE = [f for f in tiny.FAMILIES if f != "gemma3"]  # gemma3: sliding-window layers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from threads, and on a busy two-core machine torch's
    second thread makes every matmul wait (test_fuzz_patch.py does the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _generate(model, ids, mask, cache=None, new=10):
    extra = {} if cache is None else {CACHE_ARG: cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         **extra)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1), getattr(out, CACHE_ARG)


@pytest.mark.parametrize("family, dense_kv", [(f, "exact") for f in COMPILABLE]
                         + [("llama", "compressed")])
def test_compiled_generate_equals_eager_and_compiles_once(family, dense_kv):
    """A left-padded batch (padding at position -1 in the compiled step), sparse selection,
    4-bit values: the tokens and logits of the eager patch, from one compilation serving every
    decode step of two caches (and only decode steps: no Python of the attention runs)."""
    model = tiny.model(family)
    ids, mask = _ragged()
    sals.hf.patch(model, dense_kv=dense_kv, **LOSSY)
    want, want_scores, _ = _generate(model, ids, mask)
    sals.hf.patch(model, dense_kv=dense_kv, compile=True, **LOSSY)
    before = _compiled_graphs()
    for _ in range(2):  # generate makes a new SalsCache each time
        got, scores, cache = _generate(model, ids, mask)
        assert torch.equal(got, want)
        assert (scores - want_scores).abs().max().item() < 1e-4
    assert _compiled_graphs() == before + 1
    assert cache.decode_graphs == {}  # no CUDA graphs on the CPU
    assert sals.hf.patch.__globals__["patch_state"](model).step is None


def test_compiled_steps_run_no_attention_python(monkeypatch):
    """Replayed compiled steps do not run the patched attention's Python (a call counter that
    dynamo does not trace stays still), and a new patch compiles its own step."""
    model = tiny.model("llama")
    calls = []
    store = sals.hf.SalsLayer.store

    def counted(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            calls.append(self.index)
        return store(self, *args, **kwargs)

    monkeypatch.setattr(sals.hf.SalsLayer, "store", counted)
    ids = tiny.prompt(20, batch=2)
    for dense_kv in ("compressed", "exact"):
        sals.hf.patch(model, dense_kv=dense_kv, compile=True, **LOSSY)
        before = _compiled_graphs()
        cache = sals.hf.SalsCache(model, 2, 32)
        with torch.no_grad():
            model(ids[:, :12], **{CACHE_ARG: cache})
            calls.clear()
            for i in range(12, 20):
                model(ids[:, i:i + 1], **{CACHE_ARG: cache})
        assert calls == [] and _compiled_graphs() == before + 1
        assert all(layer.row_slots.tolist() == [20, 20] for layer in cache.layers)


def test_compiled_decode_after_a_grouped_prefill():
    """sals.hf.prefill one sequence at a time (eager forwards over row ranges), then compiled
    decode steps of the whole batch: the eager patch's tokens."""
    model = tiny.model("qwen3")
    ids, mask = _ragged(seed=11)
    results = {}
    for compile in (False, True):
        sals.hf.patch(model, dense_kv="exact", compile=compile, **LOSSY)
        cache = sals.hf.SalsCache(model, 4, ids.shape[1] - 1 + 10)
        sals.hf.prefill(model, cache, ids, mask, rows=1)
        results[compile] = _generate(model, ids, mask, cache)[:2]
    assert torch.equal(results[True][0], results[False][0])
    assert (results[True][1] - results[False][1]).abs().max().item() < 1e-4


def test_compile_is_refused_where_it_cannot_serve(monkeypatch):
    with pytest.raises(sals.UnsupportedError,
                       match=r"^compile: layers \[0, 2\] are sliding-window layers"):
        sals.hf.patch(tiny.model("gemma3"), compile=True, preset="dense-equivalent")
    model = tiny.model("llama")
    for bad in ("yes", 1, None):
        with pytest.raises(sals.InvalidArgumentError, match="^compile: expected a bool"):
            sals.hf.patch(model, compile=bad, preset="dense-equivalent")
    monkeypatch.setattr(torch._dynamo, "is_inductor_supported", lambda: False)
    with pytest.raises(sals.UnsupportedError, match="^compile: torch .* has no usable inductor"):
        sals.hf.patch(model, compile=True, preset="dense-equivalent")
    assert not sals.hf.is_patched(model)


def test_a_forward_that_does_not_compile_is_refused_and_stores_nothing():
    """A graph break (here a hook on a decoder layer) makes the compiled step fail before it
    runs: refused naming compile and the cause, the cache as it was; an eager patch serves."""
    model = tiny.model("llama")
    handle = model.model.layers[1].register_forward_hook(
        lambda *args: torch._dynamo.graph_break())
    ids = tiny.prompt(12)
    sals.hf.patch(model, dense_kv="exact", compile=True, **LOSSY)
    cache = sals.hf.SalsCache(model, 1, 16)
    with torch.no_grad():
        model(ids[:, :10], **{CACHE_ARG: cache})
        with pytest.raises(sals.UnsupportedError,
                           match=r"^compile: torch.compile cannot compile the decode step of "
                                 r"LlamaForCausalLM \(Unsupported: .*; patch without "
                                 r"compile=True"):
            model(ids[:, 10:11], **{CACHE_ARG: cache})
        assert all(layer.row_slots.tolist() == [10] for layer in cache.layers)
        assert cache.layers[2].layer_cache.lengths().tolist() == [10]
        assert cache.layers[0].filled.sum().item() == 10
        sals.hf.patch(model, dense_kv="exact", **LOSSY)
        cache = sals.hf.SalsCache(model, 1, 16)
        model(ids[:, :10], **{CACHE_ARG: cache})
        model(ids[:, 10:11], **{CACHE_ARG: cache})
    handle.remove()


def test_compiled_step_refusals_name_compile():
    """What a compiled step cannot return (hidden states, attentions, tuples) is refused
    naming compile, and a step past max_tokens is refused before anything is stored."""
    model = tiny.model("llama", attn="eager")
    sals.hf.patch(model, dense_kv="exact", compile=True, **LOSSY)
    ids = tiny.prompt(12)
    cache = sals.hf.SalsCache(model, 1, 11)
    with torch.no_grad():
        model(ids[:, :11], **{CACHE_ARG: cache})
        with pytest.raises(sals.UnsupportedError,
                           match=r"^compile: a compiled decode step takes .*got "
                                 r"\['output_hidden_states'\] \(patch without compile=True"):
            model(ids[:, 11:], **{CACHE_ARG: cache}, output_hidden_states=True)
        with pytest.raises(sals.CapacityError, match="pass max_tokens 11"):
            model(ids[:, 11:], **{CACHE_ARG: cache})
    assert all(layer.row_slots.tolist() == [11] for layer in cache.layers)
    assert cache.layers[0].filled.sum().item() == 11


def test_new_cache_sizes_compile_once_more_then_run_dynamic():
    """Exact layers' tensors are sized by the cache: a second max_tokens compiles the step
    once more (torch.compile then makes the size dynamic; not even that where an earlier
    compilation of the step's code saw sizes change), later sizes compile nothing: ten sizes,
    far past torch's recompilation limit of 8, all served."""
    model = tiny.model("llama")
    sals.hf.patch(model, dense_kv="exact", compile=True, preset="dense-equivalent",
                  dtype="float32")
    ids = tiny.prompt(24, batch=2)
    ref = tiny.logits(model, ids)[:, 15:]
    before = _compiled_graphs()
    for max_tokens in (30, 40, 50, 60, 70, 80, 90, 100, 110, 120):
        cache = sals.hf.SalsCache(model, 2, max_tokens)
        got = tiny.decode_logits(model, ids[:, :16], ids[:, 16:], cache)
        assert (got - ref).abs().max().item() < 1e-4
    assert before + 1 <= _compiled_graphs() <= before + 2
