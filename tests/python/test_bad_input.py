"""Bad input that used to crash, give a wrong answer silently, be refused though valid, or raise
an exception of the wrong kind: each class gets sals's own error naming the Python argument
(or, for valid input, the right answer)."""

import threading

import numpy as np
import pytest
import sals
from lying import NULL, Blocking, Lying, NoDevice, Raises, Returns
from pysuite import orthonormal, positions, rope_for, small_cache

HQ, HKV, D = 4, 2, 16
DK = HKV * D


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


pos = positions


def make(**overrides):
    return small_cache(HQ, HKV, D, **overrides)


def proj8():
    return orthonormal(np.random.default_rng(2), 8, 3)


# ---- crashes: DLTensors with a NULL shape or an absurd ndim --------------------------------

LIARS = [
    ("shape_null", dict(shape=NULL)),
    ("ndim_negative", dict(ndim=-3)),
    ("ndim_65", dict(ndim=65)),
    ("ndim_huge", dict(ndim=2**30)),
    ("ndim_5", dict(ndim=5, shape=(4, 8, 1, 1, 1), strides=(8, 1, 1, 1, 1))),
]


@pytest.mark.parametrize("kind,lie", LIARS, ids=[k for k, _ in LIARS])
def test_lying_dltensor_as_input_and_out(kind, lie):
    x = f32(4, 8)
    with pytest.raises(sals.InvalidArgumentError, match=r"^x: "):
        sals.project(Lying(x, **lie), proj8())
    with pytest.raises(sals.InvalidArgumentError, match=r"^out: "):
        sals.project(x, proj8(), out=Lying(np.zeros((4, 3), np.float32), **lie))
    cache = make()
    with pytest.raises(sals.InvalidArgumentError, match=r"^k: "):
        cache.append(Lying(f32(1, 2, HKV, D), **lie), f32(1, 2, HKV, D), pos(1, 2))
    with pytest.raises(sals.InvalidArgumentError, match=r"^out: "):
        cache.attend(f32(1, 1, HQ, D), pos(1, 1), out=Lying(np.zeros((1, 1, HQ, D), np.float32),
                                                            **lie))
    assert cache.lengths()[0] == 0


# ---- errors of the wrong kind: odd producers -----------------------------------------------

PRODUCERS = [
    ("returns_int", lambda: Returns(7)),
    ("returns_str", lambda: Returns("capsule")),
    ("raises_buffer", lambda: Raises(BufferError("no export"))),
    ("raises_type", lambda: Raises(TypeError("bad call"))),
    ("raises_attribute", lambda: Raises(AttributeError("gone"))),
    ("device_raises", lambda: Raises(RuntimeError("no device"), where="device")),
    ("device_str", lambda: Returns(None, device="cpu")),
    ("device_short", lambda: Returns(None, device=(1,))),
    ("device_none", lambda: Returns(None, device=None)),
    ("no_device", NoDevice),
    ("object", object),
    ("strings", lambda: ["a", "b"]),
    ("ragged", lambda: [[1.0], [2.0, 3.0]]),
    ("dict", dict),
]


@pytest.mark.parametrize("kind,make_x", PRODUCERS, ids=[k for k, _ in PRODUCERS])
def test_odd_producers_raise_library_errors(kind, make_x):
    with pytest.raises(sals.SalsError, match=r"^x: "):
        sals.project(make_x(), proj8())
    with pytest.raises(sals.SalsError, match=r"^q: "):
        make().attend(make_x(), pos(1, 1))
    with pytest.raises(sals.SalsError, match=r"^positions: "):
        make().append(f32(1, 1, HKV, D), f32(1, 1, HKV, D), make_x())
    with pytest.raises(sals.SalsError, match=r"^projection: "):
        sals.LayerCache(sals.Config(HQ, HKV, D), rope_for(D), make_x())


def test_producer_error_is_chained():
    with pytest.raises(sals.InvalidArgumentError, match="x: __dlpack__.. raised BufferError: "
                                                        "no export") as e:
        sals.project(Raises(BufferError("no export")), proj8())
    assert isinstance(e.value.__cause__, BufferError)
    with pytest.raises(KeyboardInterrupt):  # not an error: passes through
        sals.project(Raises(KeyboardInterrupt()), proj8())


def test_dlpack_major_version_is_unsupported():
    with pytest.raises(sals.UnsupportedError, match="x: DLPack major version 2"):
        sals.project(Lying(f32(4, 8), version=(2, 0)), proj8())


# ---- silent wrong answers ------------------------------------------------------------------

def test_out_must_be_a_tensor():
    x, p = f32(4, 8), proj8()
    for bad in ([[0.0] * 3] * 4, (1, 2), 3.0):
        with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
            sals.project(x, p, out=bad)
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        sals.rope_apply(f32(3, 1, 8), np.arange(3, dtype=np.int32), rope_for(8), out=[0])
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        sals.score_select(f32(1, 1, 4), f32(1, 9, 4), score_rank=2, budget=3, out=[[[0, 0, 0]]])
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        sals.rebuild_rope(f32(3, 4), orthonormal(np.random.default_rng(0), 8, 4),
                          np.arange(3, dtype=np.int32), rope_for(8), out=[0])
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        sals.sparse_attention(f32(1, 2, 8), f32(1, 3, 1, 8), f32(1, 3, 1, 8), out=[0])
    pk, sc, zr = sals.quantize_values(f32(2, 32), 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        sals.dequantize_values(pk, sc, zr, 4, 32, out=[0])
    cache = make()
    cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), pos(1, 3))
    with pytest.raises(sals.InvalidArgumentError, match="^out: expected a tensor"):
        cache.attend(f32(1, 1, HQ, D), pos(1, 1, 3), out=np.zeros((1, 1, HQ, D)).tolist())


def test_values_beyond_the_storage_dtype():
    k, v = f32(1, 3, HKV, D), f32(1, 3, HKV, D)
    cache = make(dtype="float16")
    big = k.copy()
    big[0, 1, 1, 3] = 7e4
    with pytest.raises(sals.NotFiniteError, match=r"^k: 70000 \(sequence 0, token 1, head 1\) "
                                                  r"overflows the float16 storage"):
        cache.append(big, v, pos(1, 3))
    with pytest.raises(sals.NotFiniteError, match=r"^v: -100000 \(sequence 0, token 0, head 0\)"):
        cache.append(k, np.where(np.arange(D) == 0, -1e5, v).astype(np.float32), pos(1, 3))
    # Each element fits float16, the latent U^T k does not (|U^T k| up to |k| = 6e4 * sqrt(Dk)).
    with pytest.raises(sals.NotFiniteError, match="^k: latent coordinate"):
        cache.append(np.full((1, 1, HKV, D), 6e4, np.float32), f32(1, 1, HKV, D), pos(1, 1))
    assert cache.lengths()[0] == 0
    cache = make(dtype="float32", value_bits=4, value_group=16)  # float16 scale and zero
    with pytest.raises(sals.NotFiniteError, match="^v: channels 0..15"):
        cache.append(k, np.full_like(v, 1e5), pos(1, 3))
    assert cache.lengths()[0] == 0
    # Quantised latent keys: a float16 scale and zero per group, whatever the storage. The
    # identity projection makes latent coordinate j equal k's channel j (of 32: score 0..15).
    cfg = sals.Config(HQ, HKV, D, score_rank=16, dtype="float32", max_tokens=8, key_bits=4,
                      key_group=8)
    cache = sals.LayerCache(cfg, rope_for(D), np.eye(DK, dtype=np.float32))
    wide = k[:, :1].copy()
    wide[0, 0, 1, 2] = -7e4  # channel 18: the first group past score_rank
    with pytest.raises(sals.NotFiniteError, match=r"^k: latent coordinates 16\.\.23 of "
                                                  r"\(sequence 0, token 0\) span more than the "
                                                  r"float16 scale and zero of 4-bit keys hold"):
        cache.append(wide, v[:, :1], pos(1, 1))
    wide[0, 0, 1, 2] = 1e6  # a group [~0, 1e6] needs a scale of 66667
    with pytest.raises(sals.NotFiniteError, match=r"^k: latent coordinates 16\.\.23 "):
        cache.append(wide, v[:, :1], pos(1, 1))
    assert cache.lengths()[0] == 0
    wide[0, 0, 1, 2] = -6e4  # within float16's range
    cache.append(wide, v[:, :1], pos(1, 1))
    assert cache.lengths()[0] == 1
    cache = make(dtype="float16", check_finite=False)  # the check is what check_finite buys
    cache.append(big, v, pos(1, 3))
    assert cache.lengths()[0] == 3
    with pytest.raises(sals.NotFiniteError, match="^v: row 1, channels 0..31 span more than"):
        sals.quantize_values(np.array([[0.0] * 32, [1e6] + [0.0] * 31], np.float32), 2, 32)


@pytest.mark.parametrize("fields,match", [
    (dict(key_bits=2), "^config.key_bits: 2 not one of 16, 8, 4"),
    (dict(key_bits=12), "^config.key_bits: 12 not one of 16, 8, 4"),
    (dict(key_bits=8, key_group=0), "^config.key_group: 0 must be >= 1"),
    (dict(key_bits=8, key_group=6), "^config.key_group: 6 does not divide score_rank 16"),
    (dict(key_bits=8, rank=24, key_group=16),
     "^config.key_group: 16 does not divide rank - score_rank 8"),
    (dict(key_bits=4, key_group=1),
     "^config.key_group: 1 groups of 4-bit codes do not fill whole bytes"),
])
def test_bad_key_quantisation(fields, match):
    cfg = sals.Config(HQ, HKV, D, **{"rank": DK, "score_rank": 16, **fields})
    with pytest.raises(sals.InvalidArgumentError, match=match):
        sals.LayerCache(cfg, rope_for(D), orthonormal(np.random.default_rng(0), DK,
                                                      cfg.resolved_rank()))
    # 16-bit keys ignore key_group
    cfg.key_bits = 16
    sals.LayerCache(cfg, rope_for(D), orthonormal(np.random.default_rng(0), DK,
                                                  cfg.resolved_rank())).close()


def attend_until_busy(cache, q, p, want, seconds=20.0):
    """Attend from two threads until one is refused; every call is right or refused."""
    seen, bad, stop = [], [], threading.Event()

    def work():
        while not stop.is_set():
            try:
                out = cache.attend(q, p)
                if not np.array_equal(out, want):
                    bad.append("wrong answer")
            except sals.InvalidArgumentError as e:
                if "one thread at a time" not in str(e):
                    bad.append(str(e))
                seen.append(str(e))
                stop.set()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return seen, bad


def test_one_cache_two_threads_is_refused_not_raced():
    cache = make(max_tokens=1024, max_batch=1)
    cache.append(f32(1, 1000, HKV, D), f32(1, 1000, HKV, D, seed=1), pos(1, 1000))
    q, p = f32(1, 1, HQ, D), pos(1, 1, 1000)
    want = cache.attend(q, p)
    seen, bad = attend_until_busy(cache, q, p, want)
    assert not bad, bad
    assert seen, "two threads never overlapped"
    np.testing.assert_array_equal(cache.attend(q, p), want)  # usable again


def test_close_while_another_thread_is_inside():
    cache = make()
    cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), pos(1, 3))
    entered, release = threading.Event(), threading.Event()
    q = Blocking(f32(1, 1, HQ, D), entered, release)
    result = {}

    def work():
        try:
            result["out"] = cache.attend(q, pos(1, 1, 3))
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    try:
        assert entered.wait(30)
        with pytest.raises(sals.InvalidArgumentError, match=r"close\(\) called while attend\(\)"):
            cache.close()
        with pytest.raises(sals.InvalidArgumentError, match=r"one thread at a time"):
            cache.lengths()
        assert not cache.closed
    finally:
        release.set()
        t.join()
    assert "error" not in result, result
    cache.close()
    assert cache.closed


def test_outputs_with_shared_elements_are_refused():
    x, p = f32(4, 8), proj8()
    buf = np.zeros(8, np.float32)
    rows = np.lib.stride_tricks.as_strided(buf, (4, 3), (0, 4), writeable=True)  # stride 0
    with pytest.raises(sals.InvalidArgumentError, match="^out: elements overlap in memory"):
        sals.project(x, p, out=rows)
    overlapping = np.lib.stride_tricks.as_strided(buf, (4, 3), (4, 4), writeable=True)
    with pytest.raises(sals.InvalidArgumentError, match="^out: elements overlap in memory"):
        sals.project(x, p, out=overlapping)
    assert np.all(buf == 0)
    torch = pytest.importorskip("torch")
    with pytest.raises(sals.InvalidArgumentError, match="^out: elements overlap in memory"):
        sals.project(x, p, out=torch.zeros(1, 3).expand(4, 3))
    cache = make()
    cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), pos(1, 3))
    with pytest.raises(sals.InvalidArgumentError, match="^out: elements overlap in memory"):
        cache.attend(f32(1, 1, HQ, D), pos(1, 1, 3), out=torch.zeros(1, 1, 1, D).expand(1, 1, HQ, D))


def test_attend_out_may_not_overlap_positions():
    cache = make()
    cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), pos(1, 3))
    raw = np.zeros(HQ * D, np.float32)
    positions = raw[:1].view(np.int32).reshape(1, 1)
    positions[0, 0] = 3
    out = raw.reshape(1, 1, HQ, D)
    with pytest.raises(sals.InvalidArgumentError, match="^out: overlaps positions"):
        cache.attend(f32(1, 1, HQ, D), positions, out=out)
    assert positions[0, 0] == 3


def test_misaligned_byte_offset():
    base = f32(40)
    x = Lying(base, shape=(4, 8), strides=None, byte_offset=2)
    with pytest.raises(sals.InvalidArgumentError, match=r"^x: data \+ byte_offset \(byte_offset 2\) "
                                                        r"is not aligned to the 4 bytes"):
        sals.project(x, proj8())
    aligned = Lying(base, shape=(4, 8), strides=None, byte_offset=8)  # two floats in
    np.testing.assert_allclose(np.from_dlpack(sals.project(aligned, proj8())),
                               base[2:34].reshape(4, 8) @ proj8(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [2**50 + 4, 2**62, 2**64 - 4])
def test_byte_offset_past_the_data(offset):
    """byte_offset was unbounded: 2^64 - 4 wrapped to the float before the array (read
    silently), larger ones read or wrote far past it. Now refused, naming the argument."""
    base = f32(40)
    x = Lying(base, shape=(4, 8), strides=None, byte_offset=offset)
    with pytest.raises(sals.InvalidArgumentError,
                       match=rf"^x: byte_offset {offset} points past the data \(more than 2\^48 "
                             r"elements beyond data\)$"):
        sals.project(x, proj8())
    cache = make()
    k = Lying(f32(1, 3, HKV, D), byte_offset=offset)
    with pytest.raises(sals.InvalidArgumentError, match=rf"^k: byte_offset {offset} points past"):
        cache.append(k, f32(1, 3, HKV, D), pos(1, 3))
    positions = Lying(pos(1, 3), byte_offset=offset)
    with pytest.raises(sals.InvalidArgumentError,
                       match=rf"^positions: byte_offset {offset} points past"):
        cache.append(f32(1, 3, HKV, D), f32(1, 3, HKV, D), positions)
    np.testing.assert_array_equal(cache.lengths(), [0] * cache.config.max_batch)


def test_sparse_attention_refuses_repeated_indices():
    q, k, v = f32(1, 4, 8), f32(1, 5, 2, 8), f32(1, 5, 2, 8)
    with pytest.raises(sals.InvalidArgumentError, match=r"^idx\[0, 0, 2\]: token 3 appears twice"):
        sals.sparse_attention(q, k, v, idx=np.array([[[3, 1, 3]]], np.int32))
    once = sals.sparse_attention(q, k, v, idx=np.array([[[3, 1, -1, -1]]], np.int32))
    np.testing.assert_allclose(once, sals.sparse_attention(q, k, v, idx=[[[1, 3]]]), rtol=1e-6)


# ---- valid input refused: empty tensors ----------------------------------------------------

@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_empty_batches_work(framework):
    if framework == "torch":
        torch = pytest.importorskip("torch")

        def z(*shape, dtype=np.float32):
            return torch.from_numpy(np.zeros(shape, dtype))
    else:
        def z(*shape, dtype=np.float32):
            # numpy exports empty arrays with any strides: make them zero, the worst case
            a = np.zeros(shape, dtype)
            return np.lib.stride_tricks.as_strided(a, shape, (0,) * len(shape), writeable=True)

    def n(x):
        return x.numpy() if hasattr(x, "numpy") else x

    assert n(sals.project(z(0, 8), proj8())).shape == (0, 3)
    assert n(sals.rope_apply(z(0, 2, 8), z(0, dtype=np.int32), rope_for(8))).shape == (0, 2, 8)
    assert n(sals.rebuild_rope(z(0, 4), orthonormal(np.random.default_rng(0), 16, 4),
                               z(0, dtype=np.int32), rope_for(8))).shape == (0, 2, 8)
    assert n(sals.score_select(z(0, 1, 4), z(0, 9, 4), score_rank=2, budget=3)).shape == (0, 1, 3)
    assert n(sals.sparse_attention(z(0, 2, 8), z(0, 3, 1, 8), z(0, 3, 1, 8))).shape == (0, 2, 8)
    packed, scale, zero = sals.quantize_values(z(0, 32), 4, 32)
    assert n(packed).shape == (0, 16) and n(scale).shape == (0, 1)
    assert n(sals.dequantize_values(packed, scale, zero, 4, 32)).shape == (0, 32)
    cache = make()
    cache.append(z(1, 0, HKV, D), z(1, 0, HKV, D), z(1, 0, dtype=np.int32))
    cache.append(z(0, 3, HKV, D), z(0, 3, HKV, D), z(0, 3, dtype=np.int32))
    assert n(cache.attend(z(0, 1, HQ, D), z(0, 1, dtype=np.int32))).shape == (0, 1, HQ, D)
    assert cache.lengths().tolist() == [0, 0]


# ---- silent coercions in Config and Rope ---------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("rank", 8.9), ("n_head_q", 4.7), ("score_rank", 3.0), ("max_tokens", "64"), ("dense", "false"),
    ("check_finite", "False"), ("select_per_head", 1), ("dense", None), ("n_sink", True),
    ("budget_frac", "0.5"), ("budget_frac", 0.5j), ("scale", "1"), ("dtype", ["float16"]),
    ("dtype", 1), ("value_bits", 2**40), ("key_bits", 4.0), ("key_bits", True),
    ("key_group", "32"),
])
def test_config_fields_of_the_wrong_kind(field, value):
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{field}: "):
        sals.Config(**{"n_head_q": HQ, "n_head_kv": HKV, "head_dim": D, field: value})
    cfg = sals.Config(HQ, HKV, D, max_tokens=8)
    setattr(cfg, field, value)  # set after construction: refused when a cache is made
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{field}: "):
        sals.LayerCache(cfg, rope_for(D), orthonormal(np.random.default_rng(0), DK, DK))


def test_config_accepts_numpy_scalars():
    cfg = sals.Config(np.int64(HQ), np.int32(HKV), D, rank=np.int16(DK), dense=np.bool_(True),
                      budget_frac=np.float32(0.5), max_tokens=8)
    with sals.LayerCache(cfg, rope_for(D), np.eye(DK, dtype=np.float32)) as cache:
        assert cache.config.dense
    with pytest.raises(sals.InvalidArgumentError, match="^n_head_q: "):
        sals.Config.preset("sals-25", "4", HKV, D)
    with pytest.raises(sals.InvalidArgumentError, match="^n_head_kv: "):
        sals.Config.preset("sals-25", HQ, 2.0, D)


@pytest.mark.parametrize("kwargs,name", [
    (dict(inv_freq=[1.0 + 1j, 0.5]), "inv_freq"),
    (dict(inv_freq=[[1.0, 0.5], [0.2, 0.1]]), "inv_freq"),
    (dict(inv_freq=1.0), "inv_freq"),
    (dict(inv_freq=["1.0"]), "inv_freq"),
    (dict(inv_freq=[[1.0], [2.0, 3.0]]), "inv_freq"),
    (dict(inv_freq=[1e300]), "inv_freq"),
    (dict(inv_freq=[1.0], interleaved="no"), "interleaved"),
    (dict(inv_freq=[1.0], interleaved=1), "interleaved"),
    (dict(inv_freq=[1.0], attention_scaling="2"), "attention_scaling"),
    (dict(inv_freq=[1.0], rotary_dim=2.0), "rotary_dim"),
])
def test_rope_arguments_of_the_wrong_kind(kwargs, name):
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{name}: "):
        sals.Rope(**kwargs)


def test_rope_from_torch_refuses_complex():
    torch = pytest.importorskip("torch")
    with pytest.raises(sals.InvalidArgumentError, match="^inv_freq: expected real"):
        sals.Rope(torch.tensor([1.0 + 1j]))
    np.testing.assert_array_equal(sals.Rope(torch.tensor([1.0, 0.5]).bfloat16()).inv_freq,
                                  [1.0, 0.5])


@pytest.mark.parametrize("fn,kwargs,name", [
    ("score_select", dict(score_rank=2.0, budget=3), "score_rank"),
    ("score_select", dict(score_rank=2, budget="3"), "budget"),
    ("score_select", dict(score_rank=2, budget=3, n_sink=0.5), "n_sink"),
    ("score_select", dict(score_rank=2, budget=3, n_recent=None), "n_recent"),
    ("score_select", dict(score_rank=2, budget=2**40), "budget"),
    ("score_select", dict(score_rank=2, budget=3, stream="s"), "stream"),
    ("quantize_values", dict(bits=4.0, group=32), "bits"),
    ("quantize_values", dict(bits=4, group=True), "group"),
    ("sparse_attention", dict(scale="0.1"), "scale"),
    ("sparse_attention", dict(scale=1j), "scale"),
    ("dequantize_values", dict(bits=4, group=32, dtype="int8"), "dtype"),
    ("dequantize_values", dict(bits=4, group=32.0), "group"),
    ("rebuild_rope", dict(head_dim=8.0), "head_dim"),
])
def test_scalar_arguments_of_the_wrong_kind(fn, kwargs, name):
    pk, sc, zr = sals.quantize_values(f32(2, 32), 4, 32)
    base = {
        "score_select": dict(q_lat=f32(1, 1, 4), k_lat=f32(1, 9, 4)),
        "quantize_values": dict(v=f32(2, 32)),
        "sparse_attention": dict(q=f32(1, 2, 8), k=f32(1, 3, 1, 8), v=f32(1, 3, 1, 8)),
        "dequantize_values": dict(packed=pk, scale=sc, zero=zr),
        "rebuild_rope": dict(k_lat=f32(3, 4), proj=orthonormal(np.random.default_rng(0), 16, 4),
                             pos=np.arange(3, dtype=np.int32), rope=rope_for(8)),
    }[fn]
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{name}: "):
        getattr(sals, fn)(**base, **kwargs)


@pytest.mark.parametrize("positions", [[[0.5, 1.0]], [[True, False]], [["0", "1"]],
                                       np.array([[0.0, 1.0]])])
def test_positions_must_be_integers(positions):
    with pytest.raises(sals.InvalidArgumentError, match="^positions: "):
        make().append(f32(1, 2, HKV, D), f32(1, 2, HKV, D), positions)


def test_projection_must_have_orthonormal_columns():
    cfg = sals.Config(HQ, HKV, D, rank=8, max_tokens=8)
    rng = np.random.default_rng(3)
    with pytest.raises(sals.InvalidArgumentError, match="^projection: column 0 has squared norm"):
        sals.LayerCache(cfg, rope_for(D), 2 * orthonormal(rng, DK, 8))
    skewed = orthonormal(rng, DK, 8)
    skewed[:, 1] = (skewed[:, 0] + skewed[:, 1]) / np.sqrt(2)  # unit norm, not orthogonal
    with pytest.raises(sals.InvalidArgumentError, match="^projection: columns are not orthogonal"):
        sals.LayerCache(cfg, rope_for(D), skewed)
    random = rng.standard_normal((DK, 8)).astype(np.float32)
    random /= np.linalg.norm(random, axis=0)
    with pytest.raises(sals.InvalidArgumentError, match="^projection: "):
        sals.LayerCache(cfg, rope_for(D), random)
    # float16 copies of orthonormal columns (rounding only) pass
    sals.LayerCache(cfg, rope_for(D), orthonormal(rng, DK, 8).astype(np.float16)).close()
    torch = pytest.importorskip("torch")
    sals.LayerCache(cfg, rope_for(D), torch.from_numpy(orthonormal(rng, DK, 8)).bfloat16()).close()


# ---- errors of the wrong kind: a closed cache ----------------------------------------------

def test_closed_cache_raises_invalid_argument():
    cache = make()
    cache.close()
    calls = {
        "append": lambda: cache.append(f32(1, 1, HKV, D), f32(1, 1, HKV, D), pos(1, 1)),
        "attend": lambda: cache.attend(f32(1, 1, HQ, D), pos(1, 1)),
        "lengths": cache.lengths,
        "selected": cache.selected,
        "memory": cache.memory,
        "reset": cache.reset,
    }
    for method, call in calls.items():
        with pytest.raises(sals.InvalidArgumentError, match=rf"^cache: is closed \({method}"):
            call()
        with pytest.raises(ValueError):  # as documented before: still a ValueError
            call()
    cache.close()  # idempotent


# ---- Python names in messages --------------------------------------------------------------

def test_messages_use_python_argument_names():
    cache = make()
    with pytest.raises(sals.InvalidArgumentError, match=r"^positions: dim 1 is 3, expected 2"):
        cache.append(f32(1, 2, HKV, D), f32(1, 2, HKV, D), pos(1, 3))
    with pytest.raises(sals.InvalidArgumentError, match=r"^positions: dim 1 is 2, expected 1"):
        cache.attend(f32(1, 1, HQ, D), pos(1, 2))
    with pytest.raises(sals.InvalidArgumentError, match=r"^out: dim 2 is 4, expected 3 \(budget\)"):
        sals.score_select(f32(1, 1, 4), f32(1, 9, 4), score_rank=2, budget=3,
                          out=np.zeros((1, 1, 4), np.int32))


def test_outputs_are_not_sized_from_unchecked_inputs():
    # a producer claiming 2^50 rows: refused by name before an output is allocated from it
    huge = Lying(np.zeros((16, 4), np.float32), shape=(2**50, 4), strides=None)
    with pytest.raises(sals.InvalidArgumentError, match="^proj: too many elements"):
        sals.rebuild_rope(f32(3, 4), huge, np.arange(3, dtype=np.int32), rope_for(8))
    pk, sc, zr = sals.quantize_values(f32(2, 32), 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match=r"^scale: dim 0 is 2, expected 3 "
                                                        r"\(packed.shape\[0\]\)"):
        sals.dequantize_values(np.zeros((3, 16), np.uint8), sc, zr, 4, 32)
    with pytest.raises(sals.InvalidArgumentError, match=r"^group: must divide D = 32 \(packed"):
        sals.dequantize_values(pk, sc, zr, 4, 24)
    with pytest.raises(sals.InvalidArgumentError, match=r"^group: must divide D = 33 \(v.shape"):
        sals.quantize_values(f32(2, 33), 4, 32)
