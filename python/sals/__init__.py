"""sals: Sparse Attention in Latent Space (arXiv 2510.24273).

A compressed per-layer KV cache (``LayerCache``) that stores pre-RoPE keys as low-rank latents
and group-quantised values, selects the critical tokens of each decode step in the latent space
and attends exactly over them; the same storage in pages the caller owns (``PagedLayer``,
for serving engines); the stateless stages it is made of (``project``, ``rope_apply``,
``rebuild_rope``, ``score_select``, ``sparse_attention``, ``quantize_values``,
``dequantize_values``); and the offline calibration that produces the projections
(``Calibrator``, ``Calibration``). Presets, by name or as ``sals.presets`` objects, set a layer's
``Config`` (``Config.preset``) or a whole model's (``sals.hf.patch``).
"""

from __future__ import annotations

import os

from . import _C, presets
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

# The build installs libsals and its headers beside the extension (the rpath $ORIGIN/lib): in a
# wheel that is the package directory; in an editable install, the build's tree, apart from the
# Python sources.
_BUILT = os.path.dirname(os.path.abspath(_C.__file__))


def cuda_available() -> bool:
    """True if libsals was built with CUDA kernels and a CUDA device is usable now."""
    return _C.cuda_available()


def get_include() -> str:
    """Directory holding ``sals/sals.h`` and ``sals/dlpack.h`` (pass it as ``-I``)."""
    return os.path.join(_BUILT, "include")


def get_library() -> str:
    """Path of the libsals shared library this package loads (``libsals.so.<ABI>``): dlopen it,
    or link with ``-L<its dir> -lsals``."""
    path = os.path.join(_BUILT, "lib", f"libsals.so.{_C.abi_version()}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"libsals not found: {path}")
    return path


__all__ = [
    "Calibration", "CalibrationError", "Calibrator", "CapacityError", "Config", "DeviceError",
    "InvalidArgumentError", "LayerCache", "NotFiniteError", "OutOfMemoryError", "PagedLayer",
    "Rope", "SalsError", "UnsupportedError", "cuda_available", "dequantize_values", "get_include",
    "get_library", "presets", "project", "quantize_values", "rebuild_rope", "rope_apply",
    "score_select", "sparse_attention", "__version__",
]
