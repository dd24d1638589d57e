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
    """Copy the npz at src to dst, letting edit(name, bytes) change member contents."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


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
        _rewrite(good, bad, _header_edit(lambda h: h.update(version=2)))
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


def test_torch_keys():
    torch = pytest.importorskip("torch")
    k = torch.randn(100, 16, dtype=torch.bfloat16, requires_grad=False)
    cal = sals.Calibrator([16])
    cal.update(0, k)
    assert cal.finish(rank=4).layers[0].n_tokens == 100
