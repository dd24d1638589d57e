"""Calibration: ranks, energy, the file format and its integrity checks."""

import json
import zipfile

import numpy as np
import pytest

import sals

FP = {"model": "tiny-llama", "revision": "abc123", "layers": 2}


def keys(rng, n, dk, decay):
    """Keys whose second moment has eigenvalues ~ decay**(2i) along a random basis."""
    basis, _ = np.linalg.qr(rng.standard_normal((dk, dk)))
    return (rng.standard_normal((n, dk)) * decay ** np.arange(dk)) @ basis.T, basis


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    cal = sals.Calibrator([64, 32])
    k0, _ = keys(rng, 3000, 64, 0.9)
    k1, _ = keys(rng, 2000, 32, 0.7)
    for chunk in np.array_split(k0, 3):
        cal.update(0, chunk)
    cal.update(1, k1[:1000])
    cal.update(1, k1[1000:])
    return cal.finish(rank_frac=0.25, fingerprint=FP, data="synthetic keys")


def test_matches_numpy_eigendecomposition():
    rng = np.random.default_rng(1)
    k, _ = keys(rng, 4000, 48, 0.85)
    cal = sals.Calibrator([48])
    cal.update(0, k.astype(np.float32))
    c = cal.finish(rank=12)
    gram = k.astype(np.float32).astype(np.float64).T @ k.astype(np.float32).astype(np.float64)
    w = np.sort(np.linalg.eigvalsh(gram))[::-1]
    np.testing.assert_allclose(c.layers[0].eigenvalues, np.maximum(w, 0), rtol=1e-9,
                               atol=1e-9 * w[0])
    u = c.projection(0)
    assert u.shape == (48, 12) and u.dtype == np.float32 and u.flags.c_contiguous
    np.testing.assert_allclose(u.T @ u, np.eye(12), atol=1e-5)
    # the span is the top-12 eigenspace: projecting the Gram matrix keeps its top eigenvalues
    np.testing.assert_allclose(np.linalg.eigvalsh(u.T.astype(np.float64) @ gram @ u)[::-1],
                               w[:12], rtol=1e-5)
    assert c.n_tokens == 4000


def test_rank_rules(calib):
    assert [lay.rank for lay in calib.layers] == [16, 8]
    assert [lay.dk for lay in calib.layers] == [64, 32]
    rng = np.random.default_rng(2)
    cal = sals.Calibrator([64])
    cal.update(0, keys(rng, 2000, 64, 0.8)[0])
    for energy in (0.5, 0.9, 0.99, 1.0):
        c = cal.finish(energy=energy)
        r = c.layers[0].rank
        assert c.energy(0, r) >= energy - 1e-12
        assert r == 1 or c.energy(0, r - 1) < energy
    assert cal.finish(rank=64).layers[0].rank == 64
    assert cal.finish(rank_frac=1.0).layers[0].rank == 64


def test_energy(calib):
    lay = calib.layers[0]
    assert np.all(np.diff(lay.eigenvalues) <= 0)
    assert calib.energy(0, 0) == 0.0 and calib.energy(0, 64) == pytest.approx(1.0)
    assert calib.energy(0, 16) == pytest.approx(lay.eigenvalues[:16].sum() / lay.eigenvalues.sum())
    # decay 0.9 per coordinate: energy of the top 16 of 64 = (1 - .81^16) / (1 - .81^64) ~ 0.966
    assert calib.energy(0, 16) == pytest.approx((1 - 0.81**16) / (1 - 0.81**64), abs=0.02)


def test_projection_ranks(calib):
    assert calib.projection(0, 4).shape == (64, 4)
    np.testing.assert_array_equal(calib.projection(0, 4), calib.projection(0)[:, :4])
    with pytest.raises(sals.InvalidArgumentError, match="rank"):
        calib.projection(0, 17)
    with pytest.raises(sals.InvalidArgumentError, match="layer"):
        calib.projection(2)


def test_round_trip(calib, tmp_path):
    path = tmp_path / "cal.npz"
    calib.save(path)
    back = sals.Calibration.load(path, fingerprint=FP)
    assert back.fingerprint == FP and back.data == "synthetic keys"
    assert back.n_tokens == calib.n_tokens == 2000
    for a, b in zip(calib.layers, back.layers):
        assert (a.dk, a.rank, a.n_tokens) == (b.dk, b.rank, b.n_tokens)
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
        np.testing.assert_array_equal(a.eigenvectors, b.eigenvectors)
    # deterministic: the same keys give the same bytes
    calib.save(tmp_path / "again.npz")
    assert (tmp_path / "again.npz").read_bytes() == path.read_bytes()
    # the keys named are checked (a subset is fine); no fingerprint skips the check
    assert sals.Calibration.load(path, fingerprint={"model": "tiny-llama"}).fingerprint == FP
    sals.Calibration.load(path)


def test_projection_drives_a_cache(calib):
    cfg = sals.Config(4, 1, 64, rank=16, max_tokens=8)
    with sals.LayerCache(cfg, sals.Rope.default(64), calib.projection(0)) as cache:
        k = np.ones((1, 3, 1, 64), np.float16)
        cache.append(k, k, np.arange(3, dtype=np.int32)[None])
        assert cache.lengths()[0] == 3


def _rewrite(src, dst, edit):
    """Copy the npz at src to dst, letting edit(name, bytes) change member contents (None
    leaves the member out)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)


def _header_edit(change):
    def edit(name, data):
        if name != "header.npy":
            return data
        import io
        arr = np.load(io.BytesIO(data))
        header = json.loads(arr.tobytes())
        change(header)
        out = io.BytesIO()
        np.save(out, np.frombuffer(json.dumps(header).encode(), np.uint8))
        return out.getvalue()
    return edit


@pytest.mark.parametrize("damage,match", [
    ("truncate", "not a calibration file"),
    ("garbage", "not a calibration file"),
    ("text", "not an .npz archive"),
    ("tamper_array", "SHA-256"),
    ("format", "format"),
    ("version", "version"),
    ("no_header", "no header"),
    ("rank_mismatch", "layer 0"),
])
def test_corrupt_files_are_refused(calib, tmp_path, damage, match):
    good = tmp_path / "good.npz"
    calib.save(good)
    bad = tmp_path / "bad.npz"
    raw = good.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 100)
    elif damage == "text":
        bad.write_bytes(b"garbage")
    elif damage == "tamper_array":
        def edit(name, data):
            if name != "eigenvectors_1.npy":
                return data
            b = bytearray(data)
            b[-3] ^= 0x40
            return bytes(b)
        _rewrite(good, bad, edit)
    elif damage == "format":
        _rewrite(good, bad, _header_edit(lambda h: h.update(format="other")))
    elif damage == "version":
        _rewrite(good, bad, _header_edit(lambda h: h.update(version=3)))
    elif damage == "no_header":
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
            for item in zin.infolist():
                if item.filename != "header.npy":
                    zout.writestr(item, zin.read(item.filename))
    elif damage == "rank_mismatch":
        def change(h):
            h["layers"][0]["rank"] = 15
        _rewrite(good, bad, _header_edit(change))
    with pytest.raises(sals.CalibrationError, match=match):
        sals.Calibration.load(bad)


def test_fingerprint_mismatch_names_keys(calib, tmp_path):
    path = tmp_path / "cal.npz"
    calib.save(path)
    other = dict(FP, revision="def456", extra=1)
    with pytest.raises(sals.CalibrationError, match="extra.*revision|revision.*extra") as e:
        sals.Calibration.load(path, fingerprint=other)
    assert "model" not in str(e.value).split("mismatch")[1]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sals.Calibration.load(tmp_path / "none.npz")


def test_bad_calibrator_input():
    with pytest.raises(sals.InvalidArgumentError, match="dk_per_layer"):
        sals.Calibrator([])
    cal = sals.Calibrator([8, 8])
    with pytest.raises(sals.InvalidArgumentError, match="layer"):
        cal.update(2, np.zeros((3, 8)))
    with pytest.raises(sals.InvalidArgumentError, match="keys"):
        cal.update(0, np.zeros((3, 9)))
    with pytest.raises(sals.InvalidArgumentError, match="keys"):
        cal.update(0, np.zeros((3, 8), np.int32))
    with pytest.raises(sals.InvalidArgumentError, match="keys"):
        cal.update(0, np.full((3, 8), np.nan))
    cal.update(0, np.random.default_rng(0).standard_normal((20, 8)))
    with pytest.raises(sals.CalibrationError, match="layer 1"):
        cal.finish(rank=2)
    cal.update(1, np.random.default_rng(1).standard_normal((20, 8)))
    with pytest.raises(sals.InvalidArgumentError, match="exactly one"):
        cal.finish(rank=2, energy=0.9)
    with pytest.raises(sals.InvalidArgumentError, match="exactly one"):
        cal.finish()
    with pytest.raises(sals.InvalidArgumentError, match="rank"):
        cal.finish(rank=9)
    with pytest.raises(sals.InvalidArgumentError, match="rank_frac"):
        cal.finish(rank_frac=1.5)
    with pytest.raises(sals.InvalidArgumentError, match="energy"):
        cal.finish(energy=0.0)
    with pytest.raises(sals.InvalidArgumentError, match="fingerprint"):
        cal.finish(rank=2, fingerprint={"f": object()}).save("/dev/null/x")


def _ragged():
    return [[1.0] * 8, [1.0] * 7]


_CIRCULAR = {}
_CIRCULAR["self"] = _CIRCULAR

# (call on a Calibrator([8, 8]) holding 20 keys per layer, the argument's name in the error).
# Each used to raise a bare ValueError or TypeError (or, where noted, to coerce silently).
_MISUSE = {
    "update-layer-str": (lambda c: c.update("a", np.ones((2, 8))), "layer"),
    "update-layer-none": (lambda c: c.update(None, np.ones((2, 8))), "layer"),
    "update-layer-float": (lambda c: c.update(1.5, np.ones((2, 8))), "layer"),  # was layer 1
    "update-layer-bool": (lambda c: c.update(True, np.ones((2, 8))), "layer"),  # was layer 1
    "update-keys-ragged": (lambda c: c.update(0, _ragged()), "keys"),
    "update-energy-ragged": (lambda c: c.update(0, np.ones((2, 8)), _ragged()), "query_energy"),
    "update-keys-overflow": (lambda c: c.update(0, np.full((2, 8), 1e200)), "keys"),
    "update-energy-overflow": (lambda c: c.update(0, np.ones((2, 8)), np.full((2, 8), 1e308)),
                               "query_energy"),
    "finish-rank-str": (lambda c: c.finish(rank="2"), "rank"),  # was rank 2
    "finish-rank-float": (lambda c: c.finish(rank=2.5), "rank"),  # was rank 2
    "finish-rank-frac-str": (lambda c: c.finish(rank_frac="0.5"), "rank_frac"),
    "finish-energy-bool": (lambda c: c.finish(energy=True), "energy"),  # was energy 1
    "finish-query-weight-str": (lambda c: c.finish(rank=2, query_weight="1"), "query_weight"),
    "finish-query-weight-none": (lambda c: c.finish(rank=2, query_weight=None), "query_weight"),
    "finish-fingerprint-str": (lambda c: c.finish(rank=2, fingerprint="model"), "fingerprint"),
    "finish-fingerprint-list": (lambda c: c.finish(rank=2, fingerprint=[1]), "fingerprint"),
    "finish-fingerprint-circular": (lambda c: c.finish(rank=2, fingerprint=_CIRCULAR),
                                    "fingerprint"),
    "finish-data-int": (lambda c: c.finish(rank=2, data=5), "data"),  # was "5"
    "projection-layer-str": (lambda c: c.finish(rank=2).projection("0"), "layer"),
    "projection-rank-str": (lambda c: c.finish(rank=2).projection(0, "a"), "rank"),
    "energy-rank-str": (lambda c: c.finish(rank=2).energy(0, "a"), "rank"),
}


@pytest.mark.parametrize("name", _MISUSE)
def test_calibrator_misuse_names_the_argument(name):
    call, arg = _MISUSE[name]
    rng = np.random.default_rng(0)
    cal = sals.Calibrator([8, 8])
    for layer in range(2):
        cal.update(layer, rng.standard_normal((20, 8)), rng.random((20, 8)))
    before = cal.finish(rank=3, query_weight=1.0)
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{arg}: "):
        call(cal)
    after = cal.finish(rank=3, query_weight=1.0)  # a refused update changed nothing
    assert [lay.n_tokens for lay in after.layers] == [20, 20]
    for i in range(2):
        np.testing.assert_array_equal(after.projection(i), before.projection(i))
        np.testing.assert_array_equal(after.key_scale(i), before.key_scale(i))


@pytest.mark.parametrize("dk_per_layer,arg", [
    (8, "dk_per_layer"), ("88", "dk_per_layer"), (None, "dk_per_layer"),
    (["a"], r"dk_per_layer\[0\]"), ([8, None], r"dk_per_layer\[1\]"),
    ([8, 8.5], r"dk_per_layer\[1\]"), ([0], r"dk_per_layer\[0\]"),
])
def test_calibrator_dk_per_layer(dk_per_layer, arg):
    with pytest.raises(sals.InvalidArgumentError, match=rf"^{arg}: "):
        sals.Calibrator(dk_per_layer)


@pytest.mark.parametrize("dk", [2**24, 2**31 - 1])  # 2 PiB of sums; more than numpy addresses
def test_calibrator_too_large_for_memory(dk):
    with pytest.raises(sals.OutOfMemoryError, match=rf"^dk_per_layer\[1\]: no memory for the "
                                                    rf"{dk} x {dk} float64 sums of layer 1$"):
        sals.Calibrator([8, dk])


def test_calibrator_integer_torch_keys_are_refused():
    torch = pytest.importorskip("torch")
    cal = sals.Calibrator([8])
    for bad in (torch.ones(3, 8, dtype=torch.int64), torch.ones(3, 8, dtype=torch.complex64)):
        with pytest.raises(sals.InvalidArgumentError, match="^keys: expected a float dtype"):
            cal.update(0, bad)  # was converted by .float(): ints accepted, imaginary parts lost
    with pytest.raises(sals.CalibrationError, match="layer 0: no keys"):
        cal.finish(rank=2)


def test_finish_again_and_update_after_finish():
    """Not misuse: finish leaves the sums as they are, so it can be called again and more keys
    can follow it."""
    rng = np.random.default_rng(4)
    k = rng.standard_normal((60, 8))
    cal = sals.Calibrator([8])
    cal.update(0, k[:30])
    first = cal.finish(rank=3)
    np.testing.assert_array_equal(cal.finish(rank=3).projection(0), first.projection(0))
    assert cal.finish(rank_frac=0.5).layers[0].rank == 4
    cal.update(0, k[30:])
    whole = sals.Calibrator([8])
    whole.update(0, k)
    assert cal.finish(rank=3).layers[0].n_tokens == 60
    np.testing.assert_allclose(cal.finish(rank=3).layers[0].eigenvalues,
                               whole.finish(rank=3).layers[0].eigenvalues, rtol=1e-12)


def test_torch_keys():
    torch = pytest.importorskip("torch")
    k = torch.randn(100, 16, dtype=torch.bfloat16, requires_grad=False)
    cal = sals.Calibrator([16])
    cal.update(0, k)
    assert cal.finish(rank=4).layers[0].n_tokens == 100


# ---- query-weighted projections ---------------------------------------------------------------

@pytest.fixture(scope="module")
def weighted():
    """Two layers of keys with query energies that are far from uniform, tied in pairs of an
    8-wide rotate-half RoPE; layer 1's last pair is never read (energy 0)."""
    rng = np.random.default_rng(3)
    cal = sals.Calibrator([16, 16])
    energies = []
    for layer in range(2):
        k, _ = keys(rng, 500, 16, 0.85)
        half = rng.gamma(0.5, size=(500, 2, 4))      # [N, heads, pairs]
        if layer == 1:
            half[..., 3] = 0
        e = np.concatenate([half, half], axis=-1).reshape(500, 16)
        energies.append(e)
        cal.update(layer, k[:200], e[:200])
        cal.update(layer, k[200:], e[200:])
    return cal, energies, rng


def test_query_weighted_projection_is_the_pca_of_scaled_keys(weighted):
    """key_scale = (w / mean w)^(alpha/2) of the mean query energy (floored at
    MIN_QUERY_ENERGY of the mean), and the eigen-pairs are those of diag(s) C diag(s)."""
    cal, energies, _ = weighted
    plain = cal.finish(rank=4)
    assert plain.query_weight == 0 and plain.key_scale(0) is None
    for alpha in (0.5, 1.0):
        c = cal.finish(rank=4, query_weight=alpha, fingerprint=FP)
        assert c.query_weight == alpha
        for i, e in enumerate(energies):
            w = e.mean(axis=0)
            s = np.maximum(w / w.mean(), sals.calibration.MIN_QUERY_ENERGY) ** (alpha / 2)
            np.testing.assert_allclose(c.key_scale(i), s, rtol=1e-6)
            gram = cal._gram[i] * np.outer(s, s)
            want = np.sort(np.linalg.eigvalsh(gram))[::-1]
            np.testing.assert_allclose(c.layers[i].eigenvalues, np.maximum(want, 0), rtol=1e-9,
                                       atol=1e-9 * want[0])
            u = c.projection(i).astype(np.float64)
            np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-6)
            # the columns span the leading eigenspace of the scaled Gram matrix
            np.testing.assert_allclose(np.trace(u.T @ gram @ u), want[:4].sum(), rtol=1e-6)
        # the unread pair gets the floor
        np.testing.assert_allclose(c.key_scale(1)[[3, 7]],
                                   sals.calibration.MIN_QUERY_ENERGY ** (alpha / 2), rtol=1e-6)


def test_query_weighted_file_round_trip_and_integrity(weighted, tmp_path):
    cal, _, _ = weighted
    c = cal.finish(rank_frac=0.5, query_weight=1.0, fingerprint=FP)
    path = tmp_path / "qw.salscal"
    c.save(path)
    back = sals.Calibration.load(path, fingerprint=FP)
    assert back.query_weight == 1.0 and "query_weight=1" in repr(back)
    for i in range(2):
        np.testing.assert_array_equal(back.key_scale(i), c.key_scale(i))
        np.testing.assert_array_equal(back.projection(i), c.projection(i))

    def tamper(name, data):
        if name != "key_scale_1.npy":
            return data
        b = bytearray(data)
        b[-2] ^= 0x01
        return bytes(b)

    bad = tmp_path / "bad.salscal"
    _rewrite(path, bad, tamper)
    with pytest.raises(sals.CalibrationError, match="SHA-256"):
        sals.Calibration.load(bad)

    def negative(name, data):
        if name != "key_scale_0.npy":
            return data
        import io
        arr = np.load(io.BytesIO(data))
        arr[0] = -1
        out = io.BytesIO()
        np.save(out, arr)
        return out.getvalue()

    _rewrite(path, bad, negative)
    with pytest.raises(sals.CalibrationError, match="layer 0: key_scale"):
        sals.Calibration.load(bad)

    def drop(name, data):
        return None if name == "key_scale_1.npy" else data

    _rewrite(path, bad, drop)
    with pytest.raises(sals.CalibrationError, match="arrays for 2 layers"):
        sals.Calibration.load(bad)
    for change, match in ((lambda h: h.update(query_weight=-1), "query_weight"),
                          (lambda h: h.update(query_weight=True), "query_weight"),
                          (lambda h: h["layers"][0].update(key_scale="yes"), "arrays for|key_scale"),
                          (lambda h: h.update(version=1), "layer 0: key_scale")):
        _rewrite(path, bad, _header_edit(change))
        with pytest.raises(sals.CalibrationError, match=match):
            sals.Calibration.load(bad)


def test_version_1_files_still_load(calib, tmp_path):
    """A file of format version 1 (plain PCA, no query_weight, no key_scale flags) loads as an
    unweighted calibration."""
    good = tmp_path / "v2.salscal"
    calib.save(good)
    old = tmp_path / "v1.salscal"

    def to_v1(h):
        h["version"] = 1
        del h["query_weight"]
        for layer in h["layers"]:
            del layer["key_scale"]

    _rewrite(good, old, _header_edit(to_v1))
    back = sals.Calibration.load(old, fingerprint=FP)
    assert back.query_weight == 0 and back.key_scale(0) is None
    np.testing.assert_array_equal(back.projection(1), calib.projection(1))


def test_bad_query_energy_input():
    rng = np.random.default_rng(0)
    cal = sals.Calibrator([8])
    k = rng.standard_normal((10, 8))
    with pytest.raises(sals.InvalidArgumentError, match="query_energy"):
        cal.update(0, k, np.ones((10, 9)))
    with pytest.raises(sals.InvalidArgumentError, match="query_energy: 9 rows"):
        cal.update(0, k, np.ones((9, 8)))
    with pytest.raises(sals.InvalidArgumentError, match="query_energy: holds negative"):
        cal.update(0, k, -np.ones((10, 8)))
    with pytest.raises(sals.InvalidArgumentError, match="query_energy: holds NaN"):
        cal.update(0, k, np.full((10, 8), np.nan))
    cal.update(0, k)  # keys without energies: fine for plain PCA only
    assert cal.finish(rank=2).key_scale(0) is None
    with pytest.raises(sals.CalibrationError, match="0 of 10"):
        cal.finish(rank=2, query_weight=1.0)
    cal.update(0, k, np.ones((10, 8)))
    with pytest.raises(sals.CalibrationError, match="10 of 20"):
        cal.finish(rank=2, query_weight=1.0)
    with pytest.raises(sals.InvalidArgumentError, match="query_weight"):
        cal.finish(rank=2, query_weight=-0.5)
