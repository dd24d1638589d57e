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
from .errors import InvalidArgumentError, OutOfMemoryError, SalsError, UnsupportedError

#: DLPack device types (DLDeviceType) of the devices sals runs on
KDLCPU, KDLCUDA = 1, 2


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
    name: str = "x"    # the Python argument it came from, for messages

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == KDLCUDA


#: the most elements (and the largest extent) a tensor may have, as in libsals
_MAX_ELEMENTS = 2**48


def tensor(x, name: str) -> Tensor:
    """Describe input ``x`` (argument ``name``) without copying it.

    torch tensors that require grad are detached (``__dlpack__`` refuses them); lists and scalars
    become numpy arrays (float64 data as float32, the widest dtype sals computes in). A shape
    of more than 2^48 elements is refused here, before an output could be sized from it."""
    t = _describe(x, name)
    n = 1
    for extent in t.shape:
        n *= max(int(extent), 1)
        if n > _MAX_ELEMENTS:
            raise InvalidArgumentError(f"{name}: too many elements (shape {list(t.shape)})")
    return t


def _describe(x, name: str) -> Tensor:
    if _torch_tensor(x):
        if x.requires_grad:
            x = x.detach()
        dev = x.device
        if dev.type in ("cuda", "cpu"):
            device = (KDLCUDA, dev.index or 0) if dev.type == "cuda" else (KDLCPU, 0)
        else:
            try:
                device = tuple(x.__dlpack_device__())
            except Exception as e:  # noqa: BLE001 - meta tensors, devices DLPack cannot name
                raise InvalidArgumentError(f"{name}: a torch tensor on {dev}, which DLPack "
                                           f"cannot export ({e})") from None
        return Tensor(x, "torch", tuple(x.shape), str(x.dtype).replace("torch.", ""), device,
                      name)
    if isinstance(x, np.ndarray):
        return Tensor(x, "numpy", x.shape, x.dtype.name, (KDLCPU, 0), name)
    if hasattr(x, "__dlpack__"):
        dev_type, dev_id, dtype, shape, _ = _C.describe(x, name)
        return Tensor(x, "dlpack", shape, dtype or "unknown", (dev_type, dev_id), name)
    if isinstance(x, (list, tuple, int, float)):
        arr = _array(x, name)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return Tensor(arr, "numpy", arr.shape, arr.dtype.name, (KDLCPU, 0), name)
    raise InvalidArgumentError(
        f"{name}: expected a tensor (numpy, torch or any DLPack producer), got "
        f"{type(x).__name__}")


def output(x, name: str) -> Tensor:
    """An ``out=`` argument: a tensor the call writes into. Lists and scalars are refused
    (they would become a temporary array and the result would be lost)."""
    if x is None or not (_torch_tensor(x) or isinstance(x, np.ndarray)
                         or hasattr(x, "__dlpack__")):
        raise InvalidArgumentError(
            f"{name}: expected a tensor to write into (numpy, torch or any DLPack producer), "
            f"got {type(x).__name__}")
    return tensor(x, name)


def _array(x, name: str) -> np.ndarray:
    """A list or scalar as a numpy array of numbers (ragged lists and strings are refused)."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgumentError(f"{name}: not an array of numbers ({e})") from None
    if arr.dtype.kind not in "biufc":
        raise InvalidArgumentError(f"{name}: not an array of numbers (dtype {arr.dtype})")
    return arr


#: dtypes an output can be allocated in (sals._C.Array's)
_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "float64")


def empty(like: Tensor, shape, dtype: str):
    """An uninitialised output of ``shape`` and ``dtype`` in ``like``'s framework and device.
    A dtype sals cannot allocate is an error naming ``like`` (the library would refuse it)."""
    shape = tuple(int(s) for s in shape)
    if dtype not in _DTYPES:
        raise InvalidArgumentError(
            f"{like.name}: dtype {dtype} not supported (float32/float16/bfloat16)")
    try:
        if like.framework == "torch":
            torch = sys.modules["torch"]
            return torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
        if like.framework == "numpy" and dtype != "bfloat16":
            return np.empty(shape, dtype=dtype)
        if like.device[0] != KDLCPU:
            raise UnsupportedError(
                f"{like.name}: cannot allocate an output on device {like.device} for a "
                f"{type(like.obj).__name__} input: pass out=")
        return _C.Array(shape, dtype)
    except MemoryError:
        raise OutOfMemoryError(f"{like.name}: no memory for an output of shape {list(shape)} "
                               f"({dtype})") from None
    except (ValueError, RuntimeError) as e:
        if isinstance(e, SalsError):
            raise
        raise InvalidArgumentError(f"{like.name}: cannot allocate an output of shape "
                                   f"{list(shape)} ({dtype}): {e}") from None


def index(x, name: str, like: Tensor) -> Tensor:
    """An int32 index/position input. Other integer dtypes are converted (after a range check)
    in their own framework; a list becomes an int32 tensor in ``like``'s framework and device."""
    if isinstance(x, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name}: expected integers, got bool")
    if isinstance(x, (list, tuple, int)):
        arr = _array(x, name)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{name}: expected integers, got {arr.dtype} values")
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
