"""sals.tools.graph_decoder on tiny random models. DenseGraphDecoder (bench e2e's dense-graph
baseline): the same greedy tokens as transformers' generate and the same logits as its forward
(CPU, float32). SalsGraphDecoder (the sals-*-graph rows): the same tokens and logits as the
patched model's own decode over the same cache settings. Bad input refused naming the argument;
on CUDA, graph replay equal to the eager step.
"""

from __future__ import annotations

import pytest
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG
from sals.tools.graph_decoder import DenseGraphDecoder, SalsGraphDecoder
from test_patch import FULL, _tiny_calibration

#: the families the decoder reproduces (bench e2e builds Llama shapes; llama3 is Llama-3.1's
#: RoPE scaling; qwen2 has a qkv bias)
FAMILIES = ("llama", "llama3", "mistral", "qwen2")


def _decode(dec, ids, new_tokens):
    """(tokens [B, new_tokens], logits [B, new_tokens, V]): prefill, then new_tokens - 1 steps,
    as generate(max_new_tokens=new_tokens) runs them."""
    logits, tokens = [dec.prefill(ids)], [dec.token.clone()]
    for _ in range(new_tokens - 1):
        logits.append(dec.step().clone())
        tokens.append(dec.token.clone())
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_logits_match_hf(family):
    model = tiny.model(family)
    ids = tiny.prompt(24, batch=3)
    n = 16
    ref = model.generate(ids, max_new_tokens=n, do_sample=False)
    # one sequence fewer than allocated, and exactly the tokens allocated
    dec = DenseGraphDecoder(model, max_batch=4, max_tokens=24 + n - 1)
    tokens, logits = _decode(dec, ids, n)
    assert torch.equal(tokens, ref[:, 24:])
    # the HF forward over prompt + generated tokens, at the positions that chose each token
    full = tiny.logits(model, ref[:, :-1])[:, 23:]
    assert (logits - full).abs().max().item() < 1e-4
    assert dec.attention_backend == "default"


def test_prefill_again_ignores_the_earlier_sequences():
    """A second, shorter prefill leaves the first prompt's keys beyond its length in the cache:
    the mask must hide them."""
    model = tiny.model("llama3")
    dec = DenseGraphDecoder(model, max_batch=2, max_tokens=64)
    _decode(dec, tiny.prompt(40, batch=2, seed=5), 8)
    ids = tiny.prompt(12, batch=1, seed=6)
    tokens, logits = _decode(dec, ids, 10)
    fresh_tokens, fresh_logits = _decode(DenseGraphDecoder(model, 1, 64), ids, 10)
    assert torch.equal(tokens, fresh_tokens)
    assert torch.equal(logits, fresh_logits)


def test_fused_weights_and_cache_are_counted():
    model = tiny.model("qwen2")
    dec = DenseGraphDecoder(model, max_batch=2, max_tokens=10)
    c = model.config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = (qkv * c.hidden_size + qkv + 2 * c.intermediate_size * c.hidden_size) * 4
    assert dec.fused_bytes == c.num_hidden_layers * per_layer
    assert dec.cache_bytes == c.num_hidden_layers * 2 * 2 * c.num_key_value_heads * 10 * 32 * 4


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_unsupported_architecture_is_refused(family):
    with pytest.raises(ValueError, match="model: .*not supported by DenseGraphDecoder"):
        DenseGraphDecoder(tiny.model(family), 1, 16)


def test_sliding_window_shorter_than_max_tokens_is_refused():
    model = tiny.model("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="max_tokens: 16 passes the model's sliding window"):
        DenseGraphDecoder(model, 1, 16)
    DenseGraphDecoder(model, 1, 8)  # a window that never masks anything is full attention


@pytest.mark.parametrize("kw, name", [({"max_batch": 0}, "max_batch"),
                                      ({"max_tokens": 2.5}, "max_tokens"),
                                      ({"max_batch": True}, "max_batch")])
def test_bad_sizes_are_refused(kw, name):
    args = {"max_batch": 2, "max_tokens": 16, **kw}
    with pytest.raises(ValueError, match=f"^{name}: expected a positive int"):
        DenseGraphDecoder(tiny.model("llama"), **args)


def test_bad_input_names_the_argument():
    dec = DenseGraphDecoder(tiny.model("llama"), max_batch=2, max_tokens=8)
    with pytest.raises(ValueError, match="^step: no prompt yet"):
        dec.step()
    with pytest.raises(ValueError, match=r"^ids: batch 3 is outside 1\.\.max_batch \(2\)"):
        dec.prefill(tiny.prompt(4, batch=3))
    with pytest.raises(ValueError, match=r"^ids: 8 prompt tokens; need 1\.\.7"):
        dec.prefill(tiny.prompt(8))
    with pytest.raises(ValueError, match="^ids: expected a .batch, tokens. tensor"):
        dec.prefill(tiny.prompt(4)[0])
    with pytest.raises(ValueError, match="^ids: expected"):
        dec.prefill(tiny.prompt(4).float())
    dec.prefill(tiny.prompt(6))
    dec.step()
    dec.step()  # the 8th token: the cache is full
    with pytest.raises(ValueError, match="^max_tokens: the sequences hold 8 tokens"):
        dec.step()


def _replay_equals_eager(graph, eager, cases, tol):
    """For each (batch, length) of ``cases`` (a new batch size: a new capture), 20 tokens of a
    random prompt from both decoders: the same tokens, logits within ``tol``. Yields each
    prompt and its tokens."""
    for batch, length in cases:
        ids = tiny.prompt(length, batch=batch, seed=length).cuda()
        got_tokens, got_logits = _decode(graph, ids, 20)
        ref_tokens, ref_logits = _decode(eager, ids, 20)
        assert graph._graph is not None
        assert torch.equal(got_tokens, ref_tokens)
        assert (got_logits - ref_logits).abs().max().item() <= tol
        yield ids, got_tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_equals_eager_step(family, dtype):
    """Graph replay == eager steps, across a change of batch size (a new capture); float32
    also == transformers' generate on the GPU. float16 selects cuDNN attention on sm80+."""
    model = tiny.model(family, dtype=dtype).cuda()
    graph = DenseGraphDecoder(model, max_batch=3, max_tokens=64)
    eager = DenseGraphDecoder(model, max_batch=3, max_tokens=64, cuda_graph=False)
    for ids, tokens in _replay_equals_eager(graph, eager, ((2, 30), (3, 17)), 1e-5):
        if dtype == torch.float32:
            hf = model.generate(ids, max_new_tokens=20, do_sample=False)
            assert torch.equal(tokens, hf[:, ids.shape[1]:])
    if dtype == torch.float16 and torch.cuda.get_device_capability() >= (8, 0):
        assert graph.attention_backend == "cudnn"


# sparse, lossy SALS layers (a quarter of the candidates, 4-bit values) and the paper's dense
# layers, compressed or exact
SPARSE = {"preset": None, "dtype": "float32", "n_sink": 2, "n_recent": 4, "budget_frac": 0.25,
          "value_bits": 4}


def _patched_reference(model, ids, n):
    """(tokens, logits) of the patched model's own greedy decode, prefilled as SalsGraphDecoder
    prefills (sals.hf.prefill one sequence at a time, the last prompt token a decode step)."""
    cache = sals.hf.SalsCache(model, ids.shape[0], ids.shape[1] - 1 + n)
    sals.hf.prefill(model, cache, ids, rows=1)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **{CACHE_ARG: cache})
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_sals_dense_equivalent_matches_the_dense_decoder(family):
    model = tiny.model(family)
    ids = tiny.prompt(24, batch=3)
    ref_tokens, ref_logits = _decode(DenseGraphDecoder(model, 3, 40), ids, 12)
    sals.hf.patch(model, **FULL)
    dec = SalsGraphDecoder(model, max_batch=4, max_tokens=40)
    tokens, logits = _decode(dec, ids, 12)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert dec.attention_backend == "sals"


@pytest.mark.parametrize("dense_kv", ["compressed", "exact"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sals_lossy_matches_the_patched_model(family, dense_kv):
    """Selection, 4-bit values and the dense layers (compressed or exact) as the patched model
    runs them: same tokens, logits equal up to the fused projections' rounding; a second
    prefill of another batch size starts over."""
    model = tiny.model(family)
    sals.hf.patch(model, calibration=_tiny_calibration(model), dense_kv=dense_kv, **SPARSE)
    dec = SalsGraphDecoder(model, max_batch=3, max_tokens=48)
    for batch, length, seed in ((3, 40, 2), (2, 30, 3)):
        ids = tiny.prompt(length, batch=batch, seed=seed)
        tokens, logits = _decode(dec, ids, 8)
        ref_tokens, ref_logits = _patched_reference(model, ids, 8)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["dense", "sals"])
def test_compiled_step_equals_eager(kind):
    """compile=True: the step's forward through torch.compile (the torch.ops.sals operators
    opaque inside it) gives the eager step's tokens and, within rounding, its logits, across a
    new batch size (a recompilation)."""
    pytest.importorskip("torch._inductor")
    model = tiny.model("llama3")
    if kind == "sals":
        sals.hf.patch(model, calibration=_tiny_calibration(model), dense_kv="exact", **SPARSE)
    make = DenseGraphDecoder if kind == "dense" else SalsGraphDecoder
    eager, compiled = make(model, 3, 48), make(model, 3, 48, compile=True)
    for batch, length in ((3, 40), (2, 30)):
        ids = tiny.prompt(length, batch=batch, seed=length)
        want_tokens, want_logits = _decode(eager, ids, 6)
        tokens, logits = _decode(compiled, ids, 6)
        assert torch.equal(tokens, want_tokens)
        assert (logits - want_logits).abs().max().item() < 1e-4


def test_sals_decoder_needs_a_plain_patch():
    model = tiny.model("llama")
    with pytest.raises(ValueError, match="not patched"):
        SalsGraphDecoder(model, 1, 16)
    sals.hf.patch(model, **FULL)
    dec = SalsGraphDecoder(model, max_batch=1, max_tokens=8)
    with pytest.raises(ValueError, match="^step: no prompt yet"):
        dec.step()
    with pytest.raises(ValueError, match=r"^ids: 8 prompt tokens; need 1\.\.7"):
        dec.prefill(tiny.prompt(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dense_kv, compile", [("compressed", False), ("exact", False),
                                               ("exact", True)])
def test_sals_cuda_graph_replay_equals_eager_step(dense_kv, compile):
    """The SALS decoder's replayed step (compiled or not) == its eager step (float16: the CUDA
    kernels), across a change of batch size. The compiled replay is held to the compiled eager
    step: compiled against uncompiled float16 differs by the fused kernels' rounding, which
    test_compiled_step_equals_eager bounds in float32."""
    if compile:
        pytest.importorskip("triton")
    model = tiny.model("llama3", dtype=torch.float16).cuda()
    sals.hf.patch(model, calibration=_tiny_calibration(model), dense_kv=dense_kv,
                  **dict(SPARSE, dtype="float16"))
    graph = SalsGraphDecoder(model, max_batch=3, max_tokens=64, compile=compile)
    eager = SalsGraphDecoder(model, max_batch=3, max_tokens=64, cuda_graph=False, compile=compile)
    for _ in _replay_equals_eager(graph, eager, ((2, 40), (3, 33)), 1e-3):
        pass
    graph.cache.check()
