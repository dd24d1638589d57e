"""HuggingFace transformers drop-in: keep a causal LM's KV cache in SALS form.

    import sals.hf
    sals.hf.patch(model, calibration="model.salscal", preset="sals-25")
    out = model.generate(input_ids, max_new_tokens=64)      # a SalsCache is created for it
    sals.hf.unpatch(model)

A batch too large to prefill in one forward is filled a group of sequences at a time
(``sals.hf.prefill(model, cache, input_ids, rows=1)``), then generated from as usual.

Supported model types: see ``SUPPORTED`` (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) with
transformers 5.x. Calibrations come from ``python -m sals calibrate`` (``sals.hf.calibrate``).

The names below are imported on first use, so that importing a submodule that needs neither
torch nor transformers (the command line's argument parsing) stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types

#: public name -> submodule defining it
_EXPORTS = {
    "SUPPORTED": "_arch", "describe": "_arch", "fingerprint": "_arch",
    "modeling_function": "_arch", "pre_rope": "_arch", "patch_state": "state",
    "CACHE_ARG": "cache", "ExactLayer": "cache", "SalsCache": "cache", "SalsLayer": "cache",
    "is_patched": "patch", "patch": "patch", "unpatch": "patch", "prefill": "prefill",
}

__all__ = ["CACHE_ARG", "SUPPORTED", "ExactLayer", "SalsCache", "SalsLayer", "describe",
           "fingerprint", "is_patched", "modeling_function", "patch", "patch_state", "pre_rope",
           "prefill", "unpatch"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Loading the submodule sals.hf.patch binds it as this package's attribute `patch`;
        # the public `sals.hf.patch` is the function of that name, whichever import came first.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
