"""DLPack exchange: numpy and torch both ways, sals._C.Array, and a ctypes producer that
exercises what numpy and torch never emit (byte_offset, NULL strides, legacy capsules,
READ_ONLY flags, producers without max_version)."""

import ctypes

import numpy as np
import pytest

import sals
from lying import (DLDataType, DLDevice, DLManagedTensorVersioned, DLPackVersion, DLTensor,
                   _capsule_new)
from sals import _C

# ---- a minimal DLPack producer built from the specification with ctypes -------------------
# (the DLPack structs are lying.py's; the legacy DLManagedTensor is only needed here)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_NAMES = {True: b"dltensor_versioned", False: b"dltensor"}
_CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.float16): (2, 16),
          np.dtype(np.int32): (0, 32), np.dtype(np.uint8): (1, 8)}


class Producer:
    """Exports `shape` elements of `base` starting `byte_offset` bytes in, with `strides`
    (elements) or NULL strides. Deleter NULL: the producer object owns the memory and outlives
    every call in these tests."""

    def __init__(self, base, shape, strides=None, byte_offset=0, versioned=True,
                 read_only=False):
        self.base, self.shape, self.strides = base, tuple(shape), strides
        self.byte_offset, self.versioned, self.read_only = byte_offset, versioned, read_only
        self.keep = []
        self.calls = []

    def __dlpack_device__(self):
        return (1, 0)

    def _tensor(self):
        shape = (ctypes.c_int64 * len(self.shape))(*self.shape)
        strides = None if self.strides is None else (ctypes.c_int64 * len(self.strides))(
            *self.strides)
        self.keep += [shape, strides]
        code, bits = _CODES[self.base.dtype]
        return DLTensor(self.base.ctypes.data, DLDevice(1, 0), len(self.shape),
                        DLDataType(code, bits, 1), shape,
                        None if strides is None else ctypes.cast(
                            strides, ctypes.POINTER(ctypes.c_int64)), self.byte_offset)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        self.calls.append(max_version)
        if self.versioned and max_version is not None and max_version[0] >= 1:
            mt = DLManagedTensorVersioned(DLPackVersion(1, 0), None, None,
                                          1 if self.read_only else 0, self._tensor())
        else:
            mt = DLManagedTensor(self._tensor(), None, None)
        self.keep.append(mt)
        return _capsule_new(ctypes.addressof(mt), _NAMES[isinstance(
            mt, DLManagedTensorVersioned)], None)


class OldProducer(Producer):
    """A pre-1.0 producer: __dlpack__ knows no max_version."""

    def __dlpack__(self, stream=None):
        return super().__dlpack__(stream)


# ---- tests --------------------------------------------------------------------------------


def _proj(rng, dk=8, r=3):
    return rng.standard_normal((dk, r)).astype(np.float32)


@pytest.mark.parametrize("strides", [None, (8, 1)], ids=["null_strides", "strides"])
@pytest.mark.parametrize("cls,versioned", [(Producer, True), (Producer, False),
                                           (OldProducer, False)],
                         ids=["versioned", "legacy", "old_producer"])
def test_byte_offset_strides_and_capsule_kinds(cls, versioned, strides):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(200).astype(np.float32)
    x = cls(base, (4, 8), strides=strides, byte_offset=10 * 4, versioned=versioned)
    proj = _proj(rng)
    out = sals.project(x, proj)
    assert isinstance(out, _C.Array) and out.shape == (4, 3) and out.dtype == "float32"
    want = base[10:42].reshape(4, 8).astype(np.float64) @ proj
    np.testing.assert_allclose(np.from_dlpack(out), want, rtol=1e-5, atol=1e-5)
    assert x.calls[0] == (1, 3) if cls is Producer else True


def test_padded_strides_with_offset():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(300).astype(np.float32)
    x = Producer(base, (4, 8), strides=(20, 1), byte_offset=12)  # rows 20 apart, 3 in
    proj = _proj(rng)
    want = np.stack([base[3 + 20 * i: 11 + 20 * i] for i in range(4)]).astype(np.float64) @ proj
    np.testing.assert_allclose(np.from_dlpack(sals.project(x, proj)), want, rtol=1e-5, atol=1e-5)


def test_read_only_inputs_ok_outputs_refused():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    proj = _proj(rng)
    ro = Producer(x, (4, 8), read_only=True)
    want = sals.project(x, proj)
    np.testing.assert_array_equal(np.from_dlpack(sals.project(ro, proj)), want)
    out = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="out.*read-only"):
        sals.project(x, proj, out=Producer(out, (4, 3), read_only=True))
    frozen = np.zeros((4, 3), np.float32)
    frozen.flags.writeable = False
    x.flags.writeable = False  # a read-only numpy input is fine
    np.testing.assert_array_equal(sals.project(x, proj), want)
    with pytest.raises((ValueError, BufferError), match="read-only|readonly"):
        sals.project(x, proj, out=frozen)
    assert np.all(frozen == 0)


def test_array_exports_to_numpy_and_torch_without_copy():
    a = _C.Array((3, 5), "float32")
    assert a.shape == (3, 5) and a.dtype == "float32" and a.nbytes == 60
    assert a.__dlpack_device__() == (1, 0)
    n = np.from_dlpack(a)  # versioned capsule (numpy asks max_version)
    n[1, 2] = 7.0
    assert np.from_dlpack(a)[1, 2] == 7.0
    torch = pytest.importorskip("torch")
    t = torch.from_dlpack(a)
    assert t[1, 2].item() == 7.0
    t[0, 0] = 3.0
    assert n[0, 0] == 3.0
    legacy = a.__dlpack__()  # no max_version: "dltensor"
    assert "dltensor" in repr(legacy) and "versioned" not in repr(legacy)
    tl = torch.utils.dlpack.from_dlpack(legacy)
    assert tl[0, 0].item() == 3.0
    del a, n  # the exports keep the memory alive
    assert t[1, 2].item() == 7.0 and tl[1, 2].item() == 7.0


def test_array_refuses_bad_exports():
    a = _C.Array((2,), "bfloat16")
    with pytest.raises(BufferError):
        a.__dlpack__(stream=5)
    with pytest.raises(BufferError):
        a.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError):
        a.__dlpack__(copy=True)
    with pytest.raises(ValueError, match="dtype"):
        _C.Array((2,), "complex64")
    unconsumed = a.__dlpack__(max_version=(1, 0))
    del unconsumed  # the capsule destructor frees an unconsumed export


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    proj = _proj(rng)
    out_np = sals.project(x, proj)
    assert isinstance(out_np, np.ndarray)
    out_t = sals.project(torch.from_numpy(x), torch.from_numpy(proj))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), out_np)
    # mixed frameworks: the result follows the first argument
    assert isinstance(sals.project(x, torch.from_numpy(proj)), np.ndarray)
    # torch out= into a numpy-backed tensor writes through
    buf = np.zeros((5, 3), np.float32)
    sals.project(torch.from_numpy(x), proj, out=torch.from_numpy(buf))
    np.testing.assert_array_equal(buf, out_np)


def test_torch_views_requires_grad_and_offsets():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    big = torch.from_numpy(rng.standard_normal((9, 20)).astype(np.float32))
    view = big[2:7, 5:13]  # storage offset, row stride 20
    proj = _proj(rng)
    want = view.numpy().astype(np.float64) @ proj
    np.testing.assert_allclose(sals.project(view, proj).numpy(), want, rtol=1e-5, atol=1e-5)
    leaf = view.clone().requires_grad_(True)
    out = sals.project(leaf, proj)
    assert not out.requires_grad
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_bf16_from_torch_and_generic_producer_output():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 8)).astype(np.float32)).bfloat16()
    proj = _proj(rng)
    out = sals.project(x, proj)
    assert out.dtype == torch.bfloat16
    ref = x.float().numpy().astype(np.float64) @ proj
    assert np.abs(out.float().numpy() - ref).max() <= 3e-2 * np.abs(ref).max()
    # numpy cannot hold bf16: a bf16 output from a generic producer is a sals._C.Array
    packed, scale, zero = sals.quantize_values(np.ones((2, 64), np.float32), 4, 32)
    arr = sals.dequantize_values(Producer(packed, packed.shape), scale, zero, 4, 32,
                                 dtype="bfloat16")
    assert isinstance(arr, _C.Array) and arr.dtype == "bfloat16"
    assert torch.all(torch.from_dlpack(arr).float() == 1.0)


def test_describe_and_non_dlpack_inputs():
    x = np.zeros((2, 3), np.float16)
    assert _C.describe(x) == (1, 0, "float16", (2, 3), 0)
    x.flags.writeable = False
    assert _C.describe(x)[4] == 1
    with pytest.raises(sals.InvalidArgumentError, match="x: expected a DLPack tensor"):
        _C.describe(object())
    with pytest.raises(sals.InvalidArgumentError, match="x"):
        sals.project(object(), np.zeros((3, 1), np.float32))
    # lists are converted (float64 data to float32)
    out = sals.project([[1.0, 2.0, 3.0]], np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(out, [[1.0, 2.0, 3.0]])


def test_torch_through_dunder_dlpack_and_exchange_api():
    """torch tensors import through the DLPack 1.3 exchange API; the same tensor behind a
    wrapper type without that table goes through torch's __dlpack__ (a versioned capsule)."""
    torch = pytest.importorskip("torch")

    class Wrap:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kwargs):
            return self.t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))[1:]
    proj = _proj(rng)
    direct = sals.project(x, proj)
    wrapped = sals.project(Wrap(x), proj)
    assert isinstance(wrapped, _C.Array)
    np.testing.assert_array_equal(np.from_dlpack(wrapped), direct.numpy())
    assert _C.describe(Wrap(x.half()))[2:4] == ("float16", (5, 8))
