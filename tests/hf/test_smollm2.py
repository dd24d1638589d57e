"""The real SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head dim
64) on the CPU: dense equivalence, and the paper presets against measured bounds on a
739-token needle-in-a-haystack prompt (the demo's, shorter)."""

from __future__ import annotations

import os

import pytest
import sals
import sals.hf
import tiny
import torch
from sals.tools import demo
from sals.hf import CACHE_ARG

pytestmark = pytest.mark.slow

NEEDLE_ANSWER = "blue-harbor-4172"


@pytest.fixture(scope="module")
def haystack(smollm2):
    model, tokenizer = smollm2
    if sals.hf.is_patched(model):
        sals.hf.unpatch(model)
    ids = demo.haystack(tokenizer, 700, 0.4)["input_ids"]
    dense = model.generate(ids, max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        logits = model(dense).logits[:, ids.shape[1] - 1:-1]
    return ids, dense, logits


def test_dense_equivalent_is_token_identical(smollm2, haystack):
    model, tokenizer = smollm2
    ids, dense, ref = haystack
    assert NEEDLE_ANSWER in tokenizer.decode(dense[0, ids.shape[1]:])
    sals.hf.patch(model, preset="dense-equivalent", dtype="float32")
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), dense)
        got, _ = tiny.teacher_forced(model, ids, dense[:, ids.shape[1]:])
    finally:
        sals.hf.unpatch(model)
    assert (got - ref).abs().max().item() < 1e-3 * ref.std().item()


# preset -> (min top-1 agreement with dense, max mean KL(dense || sals) per step), about twice
# the loss measured with the 4096-token stdlib calibration (SALS-25: top-1 1.00, mean KL
# 0.010; SALS-12.5: top-1 0.95, mean KL 0.56)
BOUNDS = {"sals-25": (0.9, 0.03), "sals-12.5": (0.85, 1.2)}


@pytest.mark.parametrize("preset", list(BOUNDS))
def test_paper_presets_stay_close(smollm2, smollm2_calibration, haystack, preset):
    model, tokenizer = smollm2
    ids, dense, ref = haystack
    sals.hf.patch(model, calibration=smollm2_calibration, preset=preset)
    try:
        got, _ = tiny.teacher_forced(model, ids, dense[:, ids.shape[1]:])
        out = model.generate(ids, max_new_tokens=24, do_sample=False,
                             return_dict_in_generate=True)
    finally:
        sals.hf.unpatch(model)
    top1, kl = tiny.agreement(got, ref)
    mem = getattr(out, CACHE_ARG).memory()
    print(f"{preset}: top-1 {top1:.3f}, mean KL {kl:.4f}, "
          f"compression {mem['dense_fp16'] / mem['total']:.2f}x")
    min_top1, max_kl = BOUNDS[preset]
    assert top1 >= min_top1 and kl <= max_kl
    if preset == "sals-25":
        assert NEEDLE_ANSWER in tokenizer.decode(out.sequences[0, ids.shape[1]:])
    # keys r/Dk, values (bits+1)/16 plus exact windows: well below dense fp16 at 760 tokens
    assert mem["dense_fp16"] / mem["total"] > {"sals-25": 1.5, "sals-12.5": 2.0}[preset]


def test_calibration_of_smollm2(smollm2, smollm2_calibration):
    """Pre-RoPE keys are low-rank: Dk/4 keeps most of their energy in every layer."""
    model, _ = smollm2
    calib = smollm2_calibration
    assert len(calib.layers) == 30 and all(layer.dk == 192 for layer in calib.layers)
    assert calib.fingerprint == sals.hf.fingerprint(model)
    kept = [calib.energy(i, 48) for i in range(30)]
    assert min(kept) > 0.9, kept
    assert all(calib.energy(i, 24) < calib.energy(i, 48) for i in range(30))


def test_demo_runs(smollm2_calibration, capsys):
    """``python -m sals demo`` end to end, small: it reports the three settings."""
    assert demo.main(["--prompt-tokens", "400", "--new-tokens", "6",
                      "--calibration-tokens", "4096", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "calibration:" in text and "(cached;" in text
    for name in ("dense", "SALS-25%", "SALS-12.5%"):
        assert any(line.startswith(name) for line in text.splitlines()), text


def test_readme_quick_start_prints_the_answer_only(smollm2, smollm2_calibration, monkeypatch,
                                                   capsys):
    """README.md's quick start, as written, on the session's model (loading.load returns it):
    it prints the generated text without the chat template's end-of-turn token."""
    from sals.hf import loading

    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    section = text.index("## HuggingFace quick start")
    start = text.index("```python\n", section) + len("```python\n")
    code = text[start:text.index("\n```", start)]
    assert "print(tok.decode(" in code, code
    monkeypatch.setattr(loading, "load", lambda *args, **kwargs: smollm2)
    try:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    finally:
        if sals.hf.is_patched(smollm2[0]):
            sals.hf.unpatch(smollm2[0])
    out = capsys.readouterr().out.strip()
    assert out and "<|" not in out, out
