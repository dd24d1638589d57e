"""The C ABI stands alone: libsals.so driven through ctypes and hand-built DLTensors over numpy
buffers, checked against a float64 numpy dense attention (full rank, full budget, 16-bit)."""

import ctypes
import glob
import importlib.util
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _find_library():
    env = os.environ.get("SALS_LIBRARY")
    if env:
        return env
    spec = importlib.util.find_spec("sals")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = pathlib.Path(loc) / "lib" / "libsals.so"
            if cand.exists():
                return str(cand)
    # A sanitizer build cannot be loaded into a plain interpreter: skip those.
    for cand in sorted(glob.glob(str(ROOT / "build*" / "libsals.so"))):
        cache = pathlib.Path(cand).parent / "CMakeCache.txt"
        if cache.exists() and "SALS_SANITIZE:BOOL=ON" in cache.read_text(errors="replace"):
            continue
        return cand
    return None


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class Config(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in (
        "n_head_q", "n_head_kv", "head_dim", "rank", "score_rank", "value_bits", "value_group",
        "key_bits", "key_group", "n_sink", "n_recent")] + [
        ("budget_frac", ctypes.c_float),
        ("budget_tokens", ctypes.c_int32),
        ("select_per_head", ctypes.c_int32),
        ("dense", ctypes.c_int32),
        ("max_batch", ctypes.c_int32),
        ("max_tokens", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("check_finite", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
        ("device", DLDevice),
    ]


class Rope(ctypes.Structure):
    _fields_ = [("inv_freq", ctypes.POINTER(ctypes.c_float)), ("rotary_dim", ctypes.c_int32),
                ("attention_scaling", ctypes.c_float), ("interleaved", ctypes.c_int32)]


class Memory(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "latent_keys", "values", "value_scales", "exact_window", "positions", "projection",
        "total", "dense_fp16", "allocated")]


_CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.int32): (0, 32)}


class View:
    """A DLTensor over a numpy array (strides in elements); keeps the array alive."""

    def __init__(self, arr):
        self.arr = arr
        code, bits = _CODES[arr.dtype]
        self.shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        self.strides = (ctypes.c_int64 * arr.ndim)(*(s // arr.itemsize for s in arr.strides))
        self.t = DLTensor(arr.ctypes.data, DLDevice(1, 0), arr.ndim, DLDataType(code, bits, 1),
                          self.shape, self.strides, 0)

    @property
    def ref(self):
        return ctypes.byref(self.t)


@pytest.fixture(scope="module")
def lib():
    path = _find_library()
    if path is None:
        pytest.skip("libsals.so not built (set SALS_LIBRARY or build with CMake)")
    L = ctypes.CDLL(path)
    L.sals_config_default.restype = Config
    L.sals_last_error.restype = ctypes.c_char_p
    L.sals_status_string.restype = ctypes.c_char_p
    L.sals_version.restype = ctypes.c_char_p
    L.sals_cache_create.argtypes = [ctypes.POINTER(Config), ctypes.POINTER(Rope),
                                    ctypes.POINTER(DLTensor), ctypes.POINTER(ctypes.c_void_p)]
    for name in ("sals_cache_append",):
        getattr(L, name).argtypes = [ctypes.c_void_p] + [ctypes.POINTER(DLTensor)] * 3 + [ctypes.c_void_p]
    L.sals_cache_attend.argtypes = L.sals_cache_append.argtypes
    L.sals_cache_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(Memory), ctypes.c_void_p]
    L.sals_cache_destroy.argtypes = [ctypes.c_void_p]
    return L


def _rope(x, pos, inv_freq):
    """Rotate-half RoPE in float64 with theta computed in float32, as sals.h documents."""
    theta = (pos.astype(np.float32)[..., None] * inv_freq[None, :]).astype(np.float64)
    c, s = np.cos(theta), np.sin(theta)
    half = inv_freq.shape[0]
    a, b = x[..., :half], x[..., half:2 * half]
    return np.concatenate([a * c - b * s, b * c + a * s, x[..., 2 * half:]], axis=-1)


def test_version_and_errors(lib):
    assert lib.sals_abi_version() == 2
    assert lib.sals_version().decode().count(".") == 2
    assert lib.sals_status_string(4) == b"SALS_ERR_CAPACITY"


def test_cache_decode_matches_dense(lib):
    hq, hkv, d, S = 4, 2, 16, 30
    dk = hkv * d
    rng = np.random.default_rng(0)
    cfg = lib.sals_config_default()
    cfg.n_head_q, cfg.n_head_kv, cfg.head_dim = hq, hkv, d
    cfg.rank = cfg.score_rank = dk
    cfg.value_bits, cfg.budget_frac = 16, 1.0
    cfg.n_sink, cfg.n_recent = 2, 4
    cfg.max_batch, cfg.max_tokens = 1, S + 1
    cfg.dtype = 0  # float32 storage
    inv_freq = (10000.0 ** (-np.arange(0, d, 2) / d)).astype(np.float32)
    rope = Rope(inv_freq.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), d, 1.0, 0)
    proj = View(np.eye(dk, dtype=np.float32))
    cache = ctypes.c_void_p()
    assert lib.sals_cache_create(ctypes.byref(cfg), ctypes.byref(rope), proj.ref,
                                 ctypes.byref(cache)) == 0, lib.sals_last_error()
    try:
        k = rng.standard_normal((1, S + 1, hkv, d)).astype(np.float32)
        v = rng.standard_normal((1, S + 1, hkv, d)).astype(np.float32)
        # Keys arrive as a non-contiguous [B, T, H, d] view of a [B, H, T, d] buffer (HF layout).
        k_hf = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        pos = np.arange(S + 1, dtype=np.int32)[None, :]
        assert lib.sals_cache_append(cache, View(k_hf).ref, View(v).ref, View(pos).ref, None) == 0, \
            lib.sals_last_error()
        q = rng.standard_normal((1, 1, hq, d)).astype(np.float32)
        out = np.zeros_like(q)
        qpos = np.array([[S]], dtype=np.int32)
        assert lib.sals_cache_attend(cache, View(q).ref, View(qpos).ref, View(out).ref, None) == 0, \
            lib.sals_last_error()

        qr = _rope(q[0, 0].astype(np.float64), np.full(hq, S), inv_freq)           # [hq, d]
        kr = _rope(k[0].astype(np.float64), np.arange(S + 1)[:, None], inv_freq)  # [S+1, hkv, d]
        kr = np.repeat(kr, hq // hkv, axis=1)                                      # GQA
        vr = np.repeat(v[0].astype(np.float64), hq // hkv, axis=1)
        logits = np.einsum("hd,shd->hs", qr, kr) / np.sqrt(d)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        ref = np.einsum("hs,shd->hd", w, vr)
        np.testing.assert_allclose(out[0, 0], ref, atol=1e-5, rtol=0)

        mem = Memory()
        assert lib.sals_cache_memory(cache, ctypes.byref(mem), None) == 0
        assert mem.dense_fp16 == 2 * (S + 1) * dk * 2
        assert mem.total == (mem.latent_keys + mem.values + mem.value_scales + mem.exact_window
                             + mem.positions + mem.projection)

        bad = View(np.zeros((1, 1, hq), dtype=np.float32))  # 3 dims instead of 4
        assert lib.sals_cache_attend(cache, bad.ref, View(qpos).ref, View(out).ref, None) == 1
        assert lib.sals_last_error() == b"q: expected 4 dims, got 3"
    finally:
        lib.sals_cache_destroy(cache)


def test_misaligned_byte_offset_is_refused(lib):
    lib.sals_project.argtypes = [ctypes.POINTER(DLTensor)] * 3 + [ctypes.c_void_p]
    x = View(np.zeros((4, 8), np.float32))
    proj = View(np.eye(8, 3, dtype=np.float32))
    out = View(np.zeros((4, 3), np.float32))
    x.t.byte_offset = 2  # half a float32 in
    assert lib.sals_project(x.ref, proj.ref, out.ref, None) == 1
    assert lib.sals_last_error().startswith(b"x: data + byte_offset (byte_offset 2) is not aligned")
    x.t.byte_offset = 0
    assert lib.sals_project(x.ref, proj.ref, out.ref, None) == 0
