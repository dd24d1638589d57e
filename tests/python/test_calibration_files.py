"""Crafted calibration files: every one raises CalibrationError, before allocating much more
than the file's size; save writes through a fresh temporary file, never a planted one."""

import io
import json
import os
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest
import sals
from sals.calibration import _digest

FP = {"model": "tiny"}


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    cal = sals.Calibrator([16, 8])
    cal.update(0, rng.standard_normal((200, 16)))
    cal.update(1, rng.standard_normal((200, 8)))
    return cal.finish(rank_frac=0.5, fingerprint=FP, data="noise")


def npy(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy member with a literal header dict (anything, even a lie) and raw data."""
    pad = 64 - (10 + len(header) + 1) % 64
    text = (header + " " * pad + "\n").encode("latin1")
    if version == (1, 0):
        length = len(text).to_bytes(2, "little")
    else:
        length = len(text).to_bytes(4, "little")
    return b"\x93NUMPY" + bytes(version) + length + text + data


def npy_array(arr) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def header_member(header) -> bytes:
    return npy_array(np.frombuffer(json.dumps(header).encode(), np.uint8))


def good_members(calib, tmp_path):
    """{member name: bytes} of a valid file, and its JSON header (a dict to edit)."""
    path = tmp_path / "good.npz"
    calib.save(path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(np.load(io.BytesIO(members["header.npy"])).tobytes())
    return members, header


def write(tmp_path, members: dict, name="bad.npz", compression=zipfile.ZIP_STORED) -> str:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression) as z:
        for n, data in members.items():
            z.writestr(n, data)
    return str(path)


def refused(path, match=None):
    with pytest.raises(sals.CalibrationError, match=match):
        sals.Calibration.load(path)


def test_good_file_round_trips(calib, tmp_path):
    members, _ = good_members(calib, tmp_path)
    back = sals.Calibration.load(write(tmp_path, members), fingerprint=FP)
    np.testing.assert_array_equal(back.projection(0), calib.projection(0))


def test_header_claiming_a_huge_shape(calib, tmp_path):
    members, _ = good_members(calib, tmp_path)
    members["eigenvalues_0.npy"] = npy("{'descr': '<f8', 'fortran_order': False, "
                                       "'shape': (1099511627776,), }", b"\0" * 64)
    refused(write(tmp_path, members), "claim .* bytes, more than the file")
    members["header.npy"] = npy("{'descr': '|u1', 'fortran_order': False, "
                                "'shape': (1099511627776,), }", b"{}")
    refused(write(tmp_path, members), "claim .* bytes, more than the file")


def test_compressed_bomb_is_not_inflated(calib, tmp_path):
    """A 32 MiB member that deflates to a few KiB: refused from the headers alone."""
    members, header = good_members(calib, tmp_path)
    dk = 2048
    header["layers"][0].update(dk=dk, rank=dk)
    members["header.npy"] = header_member(header)
    members["eigenvalues_0.npy"] = npy_array(np.zeros(dk))
    members["eigenvectors_0.npy"] = npy_array(np.zeros((dk, dk), np.float32))
    path = write(tmp_path, members, compression=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 1 << 20
    tracemalloc.start()
    try:
        refused(path, "more than the file")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"loading a crafted file allocated {peak} bytes"


@pytest.mark.parametrize("change,match", [
    (lambda h: h.update(layers="abc"), "layers"),
    (lambda h: h.update(layers=[]), "arrays for 0 layers"),
    (lambda h: h["layers"][0].update(dk="16"), "layer 0: dk"),
    (lambda h: h["layers"][0].update(rank=True), "layer 0: rank"),
    (lambda h: h["layers"][0].update(rank=1e400), "layer 0: rank"),  # json: inf (OverflowError)
    (lambda h: h["layers"][0].update(n_tokens=-1), "layer 0: n_tokens"),
    (lambda h: h["layers"][0].update(rank=17), "layer 0: rank 17 > dk 16"),
    (lambda h: h["layers"].__setitem__(0, [16, 8, 200]), "layer 0 is incomplete"),
    (lambda h: h["layers"][0].pop("n_tokens"), "layer 0 is incomplete"),
    (lambda h: h.update(fingerprint=["model"]), "fingerprint"),
    (lambda h: h.update(sha256=7), "sha256"),
    (lambda h: h.update(version=True), "version"),
    (lambda h: h.update(version=1.0 + 1e-9), "version"),
    (lambda h: h.pop("sha256"), "sha256"),
    (lambda h: h.update(dtype="float16"), "dtype"),
])
def test_malformed_header_fields(calib, tmp_path, change, match):
    members, header = good_members(calib, tmp_path)
    change(header)
    members["header.npy"] = header_member(header)
    refused(write(tmp_path, members), match)


@pytest.mark.parametrize("header_bytes,match", [
    (b"[1, 2, 3]", "format"),
    (b'"text"', "format"),
    (b"[" * 100000 + b"]" * 100000, "corrupt header|format"),
    (b"\xff\xfe", "corrupt header"),
])
def test_header_that_is_not_a_json_object(calib, tmp_path, header_bytes, match):
    members, _ = good_members(calib, tmp_path)
    members["header.npy"] = npy_array(np.frombuffer(header_bytes, np.uint8))
    refused(write(tmp_path, members), match)


@pytest.mark.parametrize("member,data,match", [
    ("header.npy", npy_array(np.zeros(3)), "corrupt header"),
    ("header.npy", npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8),
     "header|readable"),
    ("eigenvalues_0.npy", npy_array(np.zeros(16, np.float32)), "layer 0: eigenvalues_0"),
    ("eigenvalues_0.npy", npy_array(np.zeros(16, np.complex128)), "layer 0: eigenvalues_0"),
    ("eigenvectors_1.npy", npy_array(np.zeros((8, 3), np.float32)), "layer 1: eigenvectors_1"),
    ("eigenvalues_0.npy", npy_array(np.zeros(16)) + b"trailing", "holds|SHA-256"),
    ("eigenvalues_0.npy", npy_array(np.zeros(16))[:-8], "holds 120 bytes"),
    ("eigenvalues_0.npy", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (16,), }",
                              b"\0" * 128, version=(3, 0)), "version"),
    ("eigenvalues_0.npy", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (-16,), }"),
     "readable|shape"),
    ("eigenvalues_0.npy", npy("not a dict"), "readable"),
    ("eigenvalues_0.npy", b"\x93NUMPY", "readable"),
    ("eigenvalues_0.npy", b"PK", "readable"),
    ("notes.txt", b"hello", "not .npy arrays"),
    ("eigenvalues_9.npy", npy_array(np.zeros(16)), "arrays for 2 layers"),
])
def test_crafted_members(calib, tmp_path, member, data, match):
    members, _ = good_members(calib, tmp_path)
    members[member] = data
    refused(write(tmp_path, members), match)


def test_duplicate_and_missing_members(calib, tmp_path):
    members, _ = good_members(calib, tmp_path)
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        with pytest.warns(UserWarning):
            z.writestr("eigenvalues_0.npy", members["eigenvalues_0.npy"])
    refused(str(path), "twice")
    del members["eigenvectors_1.npy"]
    members["eigenvectors_9.npy"] = npy_array(np.zeros((8, 4), np.float32))
    refused(write(tmp_path, members), "layer 1 is incomplete")


def test_unsupported_compression_method(calib, tmp_path):
    members, _ = good_members(calib, tmp_path)
    with open(write(tmp_path, members), "rb") as f:
        raw = bytearray(f.read())
    # Method 99 in every local and central header: zipfile raises NotImplementedError.
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = raw.find(sig)
        while i >= 0:
            raw[i + off:i + off + 2] = (99).to_bytes(2, "little")
            i = raw.find(sig, i + 4)
    path = tmp_path / "method.npz"
    path.write_bytes(bytes(raw))
    refused(str(path), "readable")


def test_fingerprint_argument_is_checked(calib, tmp_path):
    members, _ = good_members(calib, tmp_path)
    path = write(tmp_path, members)
    with pytest.raises(sals.InvalidArgumentError, match="fingerprint"):
        sals.Calibration.load(path, fingerprint={"model": object()})
    with pytest.raises(sals.InvalidArgumentError, match="fingerprint"):
        sals.Calibration.load(path, fingerprint=["model"])


def test_digest_still_guards_the_data(calib, tmp_path):
    members, header = good_members(calib, tmp_path)
    members["eigenvalues_0.npy"] = npy_array(np.ones(16))
    refused(write(tmp_path, members), "SHA-256")
    files = {n[:-4]: np.load(io.BytesIO(d)) for n, d in members.items() if n != "header.npy"}
    header["sha256"] = _digest(files)  # consistent again: accepted
    members["header.npy"] = header_member(header)
    assert sals.Calibration.load(write(tmp_path, members)).layers[0].eigenvalues[0] == 1.0


# ---- save ---------------------------------------------------------------------------------

def test_save_does_not_follow_a_planted_symlink(calib, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "cal.npz"
    os.symlink(victim, str(path) + ".tmp")
    calib.save(path)
    assert victim.read_bytes() == b"precious"
    assert sals.Calibration.load(path).fingerprint == FP
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "cal.npz.tmp", "victim"]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_save_failure_leaves_no_temporary_file(calib, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        calib.save(tmp_path / "cal.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_save_refuses_a_target_that_is_not_a_regular_file(calib, tmp_path, kind):
    """A symlink, a directory or a pipe (as a device would be) at the path is refused, naming
    the path, and left as it was; nothing else is written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "cal.npz"
    if kind == "symlink":
        os.symlink(victim, path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(sals.InvalidArgumentError, match=r"^path: .*cal\.npz.* exists and is"):
        calib.save(path)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "victim"]
    assert {"symlink": os.path.islink, "directory": os.path.isdir,
            "fifo": lambda p: stat.S_ISFIFO(os.lstat(p).st_mode)}[kind](path)


def test_save_replaces_a_regular_file(calib, tmp_path):
    path = tmp_path / "cal.npz"
    path.write_bytes(b"an older calibration")
    calib.save(path)
    assert sals.Calibration.load(path).fingerprint == FP
    assert [p.name for p in tmp_path.iterdir()] == ["cal.npz"]
