"""The same patch on CUDA (skipped without a GPU and a CUDA build of sals): caches live on the
model's device, results match the CPU path."""

from __future__ import annotations

import pytest
import sals
import sals.hf
import tiny
import torch
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
    layers = [x for x in out.past_key_values.layers if isinstance(x, sals.hf.SalsLayer)]
    assert all(x.device.type == "cuda" and not x.layer_cache.config.check_finite
               for x in layers)


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
                         past_key_values=cache).logits[:, -1:]]
            for i in range(steps.shape[1]):
                n = ids.shape[1] + i + 1
                out.append(model(steps[:, i:i + 1].to(device), attention_mask=full_mask[:, :n],
                                 past_key_values=cache).logits)
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
