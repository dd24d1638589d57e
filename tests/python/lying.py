"""DLPack producers that misbehave, for bad-input tests: a ctypes-built DLTensor over a numpy
array whose every field can lie (ndim, shape NULL, strides, byte_offset, dtype, device), and
producers whose __dlpack__ / __dlpack_device__ return garbage or raise."""

from __future__ import annotations

import ctypes

import numpy as np


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", DLTensor)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.float16): (2, 16),
         np.dtype(np.int32): (0, 32), np.dtype(np.int64): (0, 64), np.dtype(np.uint8): (1, 8),
         np.dtype(np.float64): (2, 64)}

NULL = "null"  # shape=NULL / strides=NULL


class Lying:
    """Exports `base` (a numpy array, kept alive here) through a DLTensor whose fields default
    to the truth and can each be overridden: ndim, shape (a tuple or NULL), strides (elements,
    a tuple or None for NULL), byte_offset, dtype (code, bits, lanes), device (in the tensor)
    and dlpack_device (what __dlpack_device__ says). No deleter: the object owns the memory."""

    def __init__(self, base, *, ndim=None, shape=None, strides="truth", byte_offset=0,
                 dtype=None, device=(1, 0), dlpack_device=None, version=(1, 0)):
        self.base = np.asarray(base)
        self.shape = tuple(self.base.shape) if shape is None else shape
        if ndim is None:
            ndim = len(self.shape) if isinstance(self.shape, tuple) else self.base.ndim
        self.ndim = ndim
        if strides == "truth":
            strides = tuple(s // self.base.itemsize for s in self.base.strides)
        self.strides, self.byte_offset = strides, byte_offset
        self.dtype = CODES.get(self.base.dtype, (2, 32)) + (1,) if dtype is None else dtype
        self.device = device
        self.dlpack_device = device if dlpack_device is None else dlpack_device
        self.version = version
        self.keep = []

    def __dlpack_device__(self):
        return self.dlpack_device

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        shape = None
        if self.shape != NULL:
            shape = (ctypes.c_int64 * max(len(self.shape), 1))(*self.shape)
        strides = None
        if self.strides is not None:
            strides = (ctypes.c_int64 * max(len(self.strides), 1))(*self.strides)
        code, bits, lanes = self.dtype
        t = DLTensor(self.base.ctypes.data if self.base.size else None,
                     DLDevice(*self.device), self.ndim, DLDataType(code, bits, lanes),
                     None if shape is None else ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64)),
                     None if strides is None else ctypes.cast(strides,
                                                              ctypes.POINTER(ctypes.c_int64)),
                     self.byte_offset)
        mt = DLManagedTensorVersioned(DLPackVersion(*self.version), None, None, 0, t)
        self.keep += [shape, strides, mt]
        return _capsule_new(ctypes.addressof(mt), b"dltensor_versioned", None)


class Returns:
    """__dlpack__ returns `value` (not a capsule); __dlpack_device__ says `device`."""

    def __init__(self, value, device=(1, 0)):
        self.value, self.device = value, device

    def __dlpack__(self, **kwargs):
        return self.value

    def __dlpack_device__(self):
        return self.device


class Raises:
    """__dlpack__ (or __dlpack_device__ when `where` is "device") raises `exc`."""

    def __init__(self, exc, where="dlpack"):
        self.exc, self.where = exc, where

    def __dlpack__(self, **kwargs):
        raise self.exc

    def __dlpack_device__(self):
        if self.where == "device":
            raise self.exc
        return (1, 0)


class NoDevice:
    """__dlpack__ but no __dlpack_device__."""

    def __dlpack__(self, **kwargs):
        return np.zeros(3, np.float32).__dlpack__(**kwargs)


class Blocking:
    """A working producer over `arr` whose `block_on`-th __dlpack__ call sets `entered` and waits
    for `release` (threading.Events). The Python layer describes a generic producer once, then
    the binding imports it inside the cache call: block_on=2 holds that call inside the cache."""

    def __init__(self, arr, entered, release, block_on=2):
        self.arr, self.entered, self.release, self.block_on = arr, entered, release, block_on
        self.calls = 0

    def __dlpack__(self, **kwargs):
        self.calls += 1
        if self.calls == self.block_on:
            self.entered.set()
            self.release.wait(30)
        return self.arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (1, 0)
