"""Framework plumbing for the Python layer: what an input is, and outputs in its framework.

Inputs are anything that speaks DLPack (numpy, torch, CuPy, sals._C.Array, ...); Python lists
become numpy arrays. An output is allocated in the framework of the call's primary input:
torch in -> ``torch.empty`` on the same device, numpy in -> ``numpy.empty``, any other DLPack
producer -> ``sals._C.Array`` (host memory owned by sals).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from . import _C
from .errors import InvalidArgumentError, UnsupportedError

_KDLCPU, _KDLCUDA = 1, 2


def _torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # never import torch ourselves: it is optional
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass
class Tensor:
    """An input ready for sals._C, with what the Python layer needs to know about it."""

    obj: object        # what is handed to sals._C (detached torch tensor, numpy array, ...)
    framework: str     # "torch", "numpy" or "dlpack"
    shape: tuple
    dtype: str         # "float32", "float16", "bfloat16", "int32", ...
    device: tuple      # DLPack (device_type, device_id)

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == _KDLCUDA


def tensor(x, name: str) -> Tensor:
    """Describe input ``x`` (argument ``name``) without copying it.

    torch tensors that require grad are detached (``__dlpack__`` refuses them); lists and scalars
    become numpy arrays (float64 data as float32, the widest dtype sals computes in)."""
    if _torch_tensor(x):
        if x.requires_grad:
            x = x.detach()
        dev = x.device
        device = (_KDLCUDA, dev.index or 0) if dev.type == "cuda" else (
            (_KDLCPU, 0) if dev.type == "cpu" else tuple(x.__dlpack_device__()))
        return Tensor(x, "torch", tuple(x.shape), str(x.dtype).replace("torch.", ""), device)
    if isinstance(x, np.ndarray):
        return Tensor(x, "numpy", x.shape, x.dtype.name, (_KDLCPU, 0))
    if hasattr(x, "__dlpack__"):
        dev_type, dev_id, dtype, shape, _ = _C.describe(x)
        return Tensor(x, "dlpack", shape, dtype or "unknown", (dev_type, dev_id))
    if isinstance(x, (list, tuple, int, float)):
        arr = np.asarray(x)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return Tensor(arr, "numpy", arr.shape, arr.dtype.name, (_KDLCPU, 0))
    raise InvalidArgumentError(
        f"{name}: expected a tensor (numpy, torch or any DLPack producer), got "
        f"{type(x).__name__}")


def empty(like: Tensor, shape, dtype: str):
    """An uninitialised output of ``shape`` and ``dtype`` in ``like``'s framework and device."""
    shape = tuple(int(s) for s in shape)
    if like.framework == "torch":
        torch = sys.modules["torch"]
        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
    if like.framework == "numpy" and dtype != "bfloat16":
        return np.empty(shape, dtype=dtype)
    if like.device[0] != _KDLCPU:
        raise UnsupportedError(
            f"cannot allocate an output on device {like.device} for a "
            f"{type(like.obj).__name__} input: pass out=")
    return _C.Array(shape, dtype)


def index(x, name: str, like: Tensor) -> Tensor:
    """An int32 index/position input. Other integer dtypes are converted (after a range check)
    in their own framework; a list becomes an int32 tensor in ``like``'s framework and device."""
    if isinstance(x, (list, tuple, int)):
        arr = np.asarray(x, dtype=np.int64)
        _check_int32_range(arr, name)
        if like.framework == "torch":
            torch = sys.modules["torch"]
            x = torch.as_tensor(arr.astype(np.int32), device=like.obj.device)
        else:
            x = arr.astype(np.int32)
    t = tensor(x, name)
    if t.dtype == "int32":
        return t
    if not (t.dtype.startswith("int") or t.dtype.startswith("uint")):
        raise InvalidArgumentError(f"{name}: expected an integer dtype (int32), got {t.dtype}")
    if t.framework == "torch":
        torch = sys.modules["torch"]
        if t.obj.numel():
            lo, hi = int(t.obj.min()), int(t.obj.max())
            _check_int32_range(np.array([lo, hi]), name)
        return tensor(t.obj.to(torch.int32), name)
    if t.framework == "numpy":
        _check_int32_range(t.obj, name)
        return tensor(t.obj.astype(np.int32), name)
    raise InvalidArgumentError(f"{name}: expected int32, got {t.dtype}")


def _check_int32_range(arr, name: str) -> None:
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise InvalidArgumentError(f"{name}: values do not fit in int32")


def stream(t: Tensor):
    """The CUDA stream to pass explicitly, or None to let sals._C decide. sals._C takes torch's
    current stream from the DLPack exchange API (torch >= 2.10); for older torch we ask torch."""
    if t.framework == "torch" and t.is_cuda and not hasattr(type(t.obj),
                                                            "__dlpack_c_exchange_api__"):
        torch = sys.modules["torch"]
        return torch.cuda.current_stream(t.obj.device).cuda_stream
    return None


def to_numpy(x) -> np.ndarray:
    """A host numpy view or copy of a sals output (torch, numpy or sals._C.Array)."""
    if isinstance(x, np.ndarray):
        return x
    if _torch_tensor(x):
        return x.detach().cpu().numpy()
    return np.from_dlpack(x)
