"""sals: Sparse Attention in Latent Space (arXiv 2510.24273).

A compressed per-layer KV cache (``LayerCache``) that stores pre-RoPE keys as low-rank latents
and group-quantised values, selects the critical tokens of each decode step in the latent space
and attends exactly over them; the same storage in pages the caller owns (``PagedLayer``,
for serving engines); the stateless stages it is made of (``project``, ``rope_apply``,
``rebuild_rope``, ``score_select``, ``sparse_attention``, ``quantize_values``,
``dequantize_values``); and the offline calibration that produces the projections
(``Calibrator``, ``Calibration``).
"""

from __future__ import annotations

import os

from . import _C
from .cache import LayerCache
from .calibration import Calibration, Calibrator
from .config import Config, Rope
from .errors import (
    CalibrationError,
    CapacityError,
    DeviceError,
    InvalidArgumentError,
    NotFiniteError,
    OutOfMemoryError,
    SalsError,
    UnsupportedError,
)
from .ops import (
    dequantize_values,
    project,
    quantize_values,
    rebuild_rope,
    rope_apply,
    score_select,
    sparse_attention,
)
from .paged import PagedLayer

#: version of the loaded libsals (the package and the library are built together)
__version__ = _C.version()

_HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_available() -> bool:
    """True if libsals was built with CUDA kernels and a CUDA device is usable now."""
    return _C.cuda_available()


def get_include() -> str:
    """Directory holding ``sals/sals.h`` and ``sals/dlpack.h`` (pass it as ``-I``)."""
    installed = os.path.join(_HERE, "include")
    if os.path.isdir(installed):
        return installed
    # A source checkout (python/sals next to csrc/).
    return os.path.normpath(os.path.join(_HERE, "..", "..", "csrc", "include"))


def get_library() -> str:
    """Path of the libsals shared library this package loads (``libsals.so.<ABI>``): dlopen it,
    or link with ``-L<its dir> -lsals``."""
    libdir = os.path.join(_HERE, "lib")
    names = sorted(os.listdir(libdir)) if os.path.isdir(libdir) else []
    versioned = [n for n in names if n.startswith("libsals.so.")]
    if versioned:
        return os.path.join(libdir, versioned[0])
    if "libsals.so" in names:
        return os.path.join(libdir, "libsals.so")
    raise FileNotFoundError(f"libsals not found in {libdir}")


__all__ = [
    "Calibration", "CalibrationError", "Calibrator", "CapacityError", "Config", "DeviceError",
    "InvalidArgumentError", "LayerCache", "NotFiniteError", "OutOfMemoryError", "PagedLayer",
    "Rope", "SalsError", "UnsupportedError", "cuda_available", "dequantize_values", "get_include",
    "get_library", "project", "quantize_values", "rebuild_rope", "rope_apply", "score_select",
    "sparse_attention", "__version__",
]
