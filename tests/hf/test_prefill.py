"""sals.hf.prefill: a SalsCache filled a group of sequences (and a chunk of tokens) at a time
gives ``generate`` the tokens and, up to float rounding, the logits of a whole-batch prefill;
tiny random models of every family (CPU, seconds), then the real SmolLM2 with a calibrated
preset (slow)."""

from __future__ import annotations

import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import CACHE_ARG
from transformers import DynamicCache

# sparse decode steps (a quarter of the candidates), a dense layer (0) and sparse ones
SPARSE = {"preset": None, "dtype": "float32", "n_sink": 2, "n_recent": 4, "budget_frac": 0.25,
          "dense_layers": [0]}
NEW = 10


def _generate(model, ids, mask, cache=None, **kw):
    """Greedy generate with scores, through ``cache`` when given."""
    extra = {} if cache is None else {CACHE_ARG: cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=kw.pop("pad", 0), output_scores=True,
                         return_dict_in_generate=True, **extra, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def _grouped(model, ids, mask, rows, chunk_tokens=None, max_batch=None):
    cache = sals.hf.SalsCache(model, max_batch or ids.shape[0], ids.shape[1] - 1 + NEW)
    assert sals.hf.prefill(model, cache, ids, mask, rows=rows, chunk_tokens=chunk_tokens) is cache
    return cache


def _ragged(seed=3):
    """Left-padded prompts of 40, 23, 31 and 9 tokens."""
    return tiny.left_padded([tiny.prompt(n, seed=seed + i) for i, n in enumerate((40, 23, 31, 9))])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_groups_and_chunks_generate_what_the_whole_batch_does(family):
    model = tiny.model(family)
    sals.hf.patch(model, **SPARSE)
    ids, mask = _ragged()
    whole = _grouped(model, ids, mask, rows=4)
    want, want_logits = _generate(model, ids, mask, whole)
    assert whole.get_seq_length() == ids.shape[1] - 1 + NEW  # every slot the cache has
    for rows, chunk in ((1, None), (3, 7), (2, 2)):
        cache = _grouped(model, ids, mask, rows, chunk)
        got, logits = _generate(model, ids, mask, cache)
        assert torch.equal(got, want), (rows, chunk)
        assert (logits - want_logits).abs().max().item() < 1e-4, (rows, chunk)
        # each sequence holds its own tokens (no padding), as after a whole-batch prefill
        for a, b in zip(cache.layers, whole.layers):
            if isinstance(a, sals.hf.SalsLayer):
                assert a.layer_cache.lengths().tolist() == b.layer_cache.lengths().tolist()
                assert a.row_slots.tolist() == b.row_slots.tolist()
            else:  # sliding-window layers: the batch's window, padding columns zero
                assert a.keys.shape == b.keys.shape and a.cumulative_length == b.cumulative_length


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dense_equivalent_grouped_prefill_generates_what_the_unpatched_model_does(family):
    """At full rank and budget even the last prompt token's decode step (sparse attention over
    the filled cache, where a one-pass prefill attends exactly) changes nothing."""
    model = tiny.model(family)
    ids, mask = _ragged(seed=7)
    ref, ref_logits = _generate(model, ids, mask)
    sals.hf.patch(model, preset="dense-equivalent", dtype="float32")
    got, logits = _generate(model, ids, mask, _grouped(model, ids, mask, rows=1))
    assert torch.equal(got, ref)
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_a_loop_continues_from_a_grouped_prefill():
    """A hand-written decode loop (examples/decode_loop.py) after prefill: one token per step
    into the whole batch, positions and mask as generate makes them."""
    model = tiny.model("qwen3")
    sals.hf.patch(model, **SPARSE)
    ids, mask = _ragged(seed=11)
    want, _ = _generate(model, ids, mask, _grouped(model, ids, mask, rows=4))
    cache = _grouped(model, ids, mask, rows=1)
    token, position, out = ids[:, -1:], mask.sum(-1, keepdim=True) - 1, []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(token, attention_mask=mask, position_ids=position,
                           **{CACHE_ARG: cache}).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            position = position + 1
    assert torch.equal(torch.cat(out, 1), want)


def test_a_batch_larger_than_max_batch_rows_fills_part_of_a_cache():
    """A cache with spare rows: the prompts fill rows 0..B-1, generate uses those."""
    model = tiny.model("llama")
    sals.hf.patch(model, **SPARSE)
    ids, mask = _ragged(seed=5)
    want, _ = _generate(model, ids, mask, _grouped(model, ids, mask, rows=4))
    cache = _grouped(model, ids, mask, rows=3, max_batch=6)
    got, _ = _generate(model, ids, mask, cache)
    assert torch.equal(got, want)
    layer = cache.layers[1]
    assert layer.row_slots.tolist()[4:] == [0, 0] and layer.layer_cache.lengths()[4:].tolist() \
        == [0, 0]


def _bad_calls(model, ids, mask):
    other = tiny.model("llama")
    sals.hf.patch(other, **SPARSE)
    full = sals.hf.SalsCache(model, 4, 60)
    with torch.no_grad():
        model(ids[:, :5], attention_mask=mask[:, :5], **{CACHE_ARG: full})
    return [
        ({"cache": DynamicCache()}, sals.InvalidArgumentError,
         "cache: expected a sals.hf.SalsCache\\(model, ...\\), got DynamicCache"),
        ({"cache": sals.hf.SalsCache(other, 4, 60)}, sals.InvalidArgumentError,
         "cache: this SalsCache was made for another patch"),
        ({"cache": full}, sals.InvalidArgumentError, "cache: holds tokens already"),
        ({"input_ids": ids[0]}, sals.InvalidArgumentError, "input_ids: expected a non-empty"),
        ({"input_ids": ids.float()}, sals.InvalidArgumentError, "input_ids: expected"),
        ({"input_ids": ids[:, :0], "attention_mask": None}, sals.InvalidArgumentError,
         "input_ids: expected a non-empty"),
        ({"attention_mask": mask[:, 1:]}, sals.InvalidArgumentError,
         "attention_mask: expected None or a tensor of input_ids' shape"),
        ({"attention_mask": mask * 2}, sals.InvalidArgumentError,
         "attention_mask: expected 0 \\(padding\\) and 1"),
        ({"attention_mask": mask.flip(1)}, sals.InvalidArgumentError,
         "attention_mask: rows \\[1, 2, 3\\] end with padding"),
        ({"rows": 0}, sals.InvalidArgumentError, "rows: 0 not in 1.."),
        ({"rows": True}, sals.InvalidArgumentError, "rows: expected an int, got bool"),
        ({"chunk_tokens": 1}, sals.InvalidArgumentError, "chunk_tokens: 1 not in 2.."),
        ({"chunk_tokens": 2.5}, sals.InvalidArgumentError, "chunk_tokens: expected an int"),
        ({"cache": sals.hf.SalsCache(model, 3, 60)}, sals.CapacityError,
         "input_ids: 4 prompts, more than max_batch 3"),
        ({"cache": sals.hf.SalsCache(model, 4, 38)}, sals.CapacityError,
         "input_ids: prompts of 40 tokens need 39 token slots"),
    ]


def test_bad_arguments_are_named_and_store_nothing():
    model = tiny.model("gemma3")
    sals.hf.patch(model, **SPARSE)
    ids, mask = _ragged()
    for change, error, message in _bad_calls(model, ids, mask):
        args = {"cache": sals.hf.SalsCache(model, 4, 60), "input_ids": ids,
                "attention_mask": mask, **change}
        with pytest.raises(error, match=message):
            sals.hf.prefill(model, **args)
        if "cache" not in change:
            assert args["cache"].get_seq_length() == 0
            assert all(not layer.is_initialized or layer.get_seq_length() == 0
                       for layer in args["cache"].layers)
    with pytest.raises(sals.InvalidArgumentError, match="model: not patched"):
        sals.hf.prefill(tiny.model("llama"), sals.hf.SalsCache(model, 4, 60), ids, mask)


def test_a_forward_failing_midway_leaves_the_cache_empty():
    """A forward that raises in the second group (a hook on a decoder layer): the first group's
    rows are emptied again and the cache serves a new prefill as a fresh one does."""
    model = tiny.model("gemma3")
    sals.hf.patch(model, **SPARSE)
    ids, mask = _ragged()
    want, _ = _generate(model, ids, mask, _grouped(model, ids, mask, rows=2))
    calls = []

    def fail_second_group(module, args):
        calls.append(args[0].shape[0])
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated by a hook)")

    handle = model.model.layers[2].register_forward_pre_hook(fail_second_group)
    cache = sals.hf.SalsCache(model, 4, ids.shape[1] - 1 + NEW)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            sals.hf.prefill(model, cache, ids, mask, rows=2)
    finally:
        handle.remove()
    assert cache.first == 0 and not cache.filling
    for layer in cache.layers:
        if isinstance(layer, sals.hf.SalsLayer):
            assert not layer.row_slots.any() and not layer.layer_cache.lengths().any()
        else:
            assert layer.get_seq_length() == 0
    sals.hf.prefill(model, cache, ids, mask, rows=2)
    assert torch.equal(_generate(model, ids, mask, cache)[0], want)


# ---- the real SmolLM2 --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dense-equivalent", "sals-25"])
def test_smollm2_grouped_prefill_generates_what_the_whole_batch_does(smollm2,
                                                                     smollm2_calibration,
                                                                     preset):
    """Three chat prompts of different lengths (left-padded), prefilled one sequence at a time,
    generate the tokens of a whole-batch prefill; dense-equivalent logits agree within the
    dense-equivalence tolerance of test_smollm2.py. SALS-25% (float16 storage, 4-bit values)
    stays within 1% of the logits' deviation: a rounding difference of the batch's forward
    (measured 1e-5 of it) can move a stored value across a quantisation step."""
    from sals.tools import demo

    model, tokenizer = smollm2
    prompts = [demo.haystack(tokenizer, n, 0.5)["input_ids"] for n in (120, 40, 80)]
    pad = tokenizer.pad_token_id or 0
    ids, mask = tiny.left_padded(prompts, pad_id=pad)
    if preset == "sals-25":
        sals.hf.patch(model, calibration=smollm2_calibration, preset=preset)
    else:
        sals.hf.patch(model, preset=preset, dtype="float32")
    try:
        want, want_logits = _generate(model, ids, mask, _grouped(model, ids, mask, rows=3),
                                      pad=pad)
        got, logits = _generate(model, ids, mask, _grouped(model, ids, mask, rows=1), pad=pad)
    finally:
        sals.hf.unpatch(model)
    assert torch.equal(got, want)
    bound = {"dense-equivalent": 1e-3, "sals-25": 1e-2}[preset]
    assert (logits - want_logits).abs().max().item() < bound * want_logits.std().item()
