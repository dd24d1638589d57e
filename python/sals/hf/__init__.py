"""HuggingFace transformers drop-in: keep a causal LM's KV cache in SALS form.

    import sals.hf
    sals.hf.patch(model, calibration="model.salscal", preset="sals-25")
    out = model.generate(input_ids, max_new_tokens=64)      # a SalsCache is created for it
    sals.hf.unpatch(model)

Supported model types: see ``SUPPORTED`` (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) with
transformers 5.x. Calibrations come from ``python -m sals calibrate`` (``sals.hf.calibrate``).
"""

from __future__ import annotations

from ._arch import SUPPORTED, fingerprint, pre_rope
from .cache import SalsCache, SalsLayer
from .patch import is_patched, patch, unpatch

__all__ = ["SUPPORTED", "SalsCache", "SalsLayer", "fingerprint", "is_patched", "patch",
           "pre_rope", "unpatch"]
