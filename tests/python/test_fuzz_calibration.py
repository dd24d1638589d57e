"""Property-based calibration files of format version 2 (query-weighted layers with key
scales, a query weight), extending test_fuzz_inputs.py::test_calibration_load (random bytes,
flips and lying .npy headers of a plain file) and the crafted cases of test_calibration_files.py.

- Round trip: a random valid Calibration (1 to 3 layers, any Dk and rank, key scales on some
  layers, any query weight in range, a random JSON fingerprint and description) saved and
  loaded is exactly what was saved: every array bit for bit, ranks, token counts, fingerprint,
  description and query weight.
- Damage to a valid version 2 file: truncation, flipped or inserted bytes, a JSON header field
  replaced by a wrong type, a wrong value or removed, a member of the wrong shape or dtype
  (the digest recomputed, so that the shape checks are what refuses it), key scales that are
  not positive and finite, a member removed, duplicated or added, and a fingerprint the caller
  expects that the file does not have. The property: ``Calibration.load`` raises
  CalibrationError naming the file (and, for a header field or a member, that field or its
  layer), nothing else; or, where the damage changed nothing that is read (a flip in bytes
  nobody reads, a field the loader ignores), it loads exactly the calibration that was saved.

Examples per test: SALS_FUZZ_EXAMPLES (default 100; a few seconds on two cores),
derandomized.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile

import numpy as np
import pytest

pytest.importorskip("hypothesis")
import sals
from hypothesis import assume, given
from hypothesis import strategies as st
from fuzz import FUZZ
from sals.calibration import MAX_QUERY_WEIGHT, Calibration, Layer, _digest



# ---- random valid calibrations --------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False), st.text(max_size=8))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@st.composite
def calibrations(draw):
    layers = []
    scaled_any = False
    for _ in range(draw(st.integers(1, 3))):
        dk = draw(st.integers(1, 12))
        rank = draw(st.integers(1, dk))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        eig = np.sort(rng.exponential(size=dk) * draw(st.sampled_from([1e-30, 1.0, 1e30])))[::-1]
        if draw(st.booleans()):
            eig[draw(st.integers(0, dk - 1)):] = 0.0  # a rank-deficient layer
        vecs = rng.standard_normal((dk, rank)).astype(np.float32)
        scale = None
        if draw(st.booleans()):
            scale = np.exp(rng.uniform(-20, 20, dk)).astype(np.float32)  # positive, finite
            scaled_any = True
        n = draw(st.one_of(st.integers(0, 10), st.integers(0, 2**62)))
        layers.append(Layer(dk, rank, np.ascontiguousarray(eig), vecs, n, scale))
    weight = draw(st.one_of(st.just(0.0), st.floats(0, MAX_QUERY_WEIGHT)))
    if scaled_any and weight == 0:
        weight = 1.0
    fingerprint = draw(st.dictionaries(st.text(max_size=6), JSON, max_size=4))
    return Calibration(layers, fingerprint, draw(st.text(max_size=20)), weight)


def same(got: Calibration, want: Calibration) -> None:
    """got is exactly want: arrays bit for bit, with their dtypes; every scalar."""
    assert len(got.layers) == len(want.layers)
    for a, b in zip(got.layers, want.layers):
        assert (a.dk, a.rank, a.n_tokens) == (b.dk, b.rank, b.n_tokens)
        assert type(a.dk) is type(a.rank) is type(a.n_tokens) is int
        for x, y, dtype in ((a.eigenvalues, b.eigenvalues, np.float64),
                            (a.eigenvectors, b.eigenvectors, np.float32)):
            assert x.dtype == dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        assert (a.key_scale is None) == (b.key_scale is None)
        if b.key_scale is not None:
            assert a.key_scale.dtype == np.float32
            assert a.key_scale.tobytes() == np.asarray(b.key_scale, np.float32).tobytes()
    assert got.fingerprint == want.fingerprint
    assert got.data == want.data and got.query_weight == want.query_weight
    assert type(got.query_weight) is float


@FUZZ
@given(calibrations())
def test_random_calibrations_round_trip_exactly(calib):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.salscal")
        calib.save(path)
        back = Calibration.load(path)
        same(back, calib)
        same(Calibration.load(path, fingerprint=calib.fingerprint), calib)
        for i, layer in enumerate(back.layers):  # what patch reads of it
            assert back.projection(i).shape == (layer.dk, layer.rank)
            assert back.projection(i).flags.c_contiguous


# ---- damage to a valid version 2 file -------------------------------------------------------

FP = {"model_type": "llama", "n_layers": 3, "dk": [8, 4, 6]}


def _good() -> Calibration:
    rng = np.random.default_rng(3)
    layers = []
    for dk, rank, scaled in ((8, 4, True), (4, 2, False), (6, 6, True)):
        vecs = np.linalg.qr(rng.standard_normal((dk, dk)))[0][:, :rank].astype(np.float32)
        eig = np.sort(rng.exponential(size=dk))[::-1].copy()
        scale = np.exp(rng.uniform(-1, 1, dk)).astype(np.float32) if scaled else None
        layers.append(Layer(dk, rank, eig, vecs, 100 + dk, scale))
    return Calibration(layers, FP, "random keys", 1.0)


GOOD = _good()
_CACHE = {}


def good_members() -> tuple[dict, dict, dict]:
    """({member: bytes}, JSON header, {array name: array}) of GOOD saved: fresh copies."""
    if "members" not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.salscal")
            GOOD.save(path)
            with open(path, "rb") as f:
                _CACHE["bytes"] = f.read()
        with zipfile.ZipFile(io.BytesIO(_CACHE["bytes"])) as z:
            _CACHE["members"] = {n: z.read(n) for n in z.namelist()}
    members = dict(_CACHE["members"])
    header = json.loads(np.load(io.BytesIO(members["header.npy"])).tobytes())
    arrays = {n[:-4]: np.load(io.BytesIO(b)) for n, b in members.items() if n != "header.npy"}
    return members, header, arrays


def npy(arr) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def header_npy(header) -> bytes:
    return npy(np.frombuffer(json.dumps(header).encode(), np.uint8))


def archive(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return buf.getvalue()


def load_bytes(raw: bytes, fingerprint=None):
    """(Calibration or the CalibrationError, path) of `raw` written to a file."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "damaged.salscal")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            return Calibration.load(path, fingerprint=fingerprint), path
        except sals.CalibrationError as e:
            assert str(e).startswith(f"{path}: "), f"does not name the file: {e}"
            return e, path


# Replacements of header fields: (field, value) -> the words an error must contain (any of).
WRONG_TYPES = [None, True, 1.5, -1, "2", [], {}, [1], float("nan"), float("inf"), 2**70]
HEADER_FIELDS = ["format", "version", "dtype", "sha256", "fingerprint", "layers",
                 "query_weight", "data"]
LAYER_FIELDS = ["dk", "rank", "n_tokens", "key_scale"]
# what a message names for each field
NAMES = {"format": r"format", "version": r"version", "dtype": r"dtype",
         "sha256": r"sha256|SHA-256", "fingerprint": r"fingerprint", "layers": r"layers",
         "query_weight": r"query_weight", "data": r"data",
         "dk": r"layer \d+: .*dk|\bdk\b", "rank": r"layer \d+: .*rank|\brank\b",
         "n_tokens": r"layer \d+: n_tokens", "key_scale": r"key_scale|\d+ arrays for 3 layers"}


def header_value_ok(field: str, value, layer: int | None = None) -> bool:
    """Whether GOOD's header with `field` (of layer `layer`) set to `value` is a valid file
    of the same arrays."""
    if layer is not None:
        meta = GOOD.layers[layer]
        want = {"dk": meta.dk, "rank": meta.rank, "key_scale": meta.key_scale is not None}
        if field == "n_tokens":
            return type(value) is int and value >= 0
        return type(value) is type(want[field]) and value == want[field]
    if field == "format":
        return value == "sals-calibration"
    if field == "version":  # 1 would be right but for the key scales, new in version 2
        return type(value) is int and value == 2
    if field == "dtype":
        return value == "float32"
    if field == "fingerprint":
        return isinstance(value, dict)
    if field == "query_weight":
        return type(value) in (int, float) and 0 <= value <= MAX_QUERY_WEIGHT
    if field == "data":
        return True  # a description, never interpreted: loaded as str(value)
    return False  # sha256, layers: only the saved value is right


@FUZZ
@given(st.data())
def test_damaged_version_2_files_are_refused_or_load_exactly(data):
    draw = data.draw
    members, header, arrays = good_members()
    raw = None
    expect = None  # a regex the error must match; None: loading may succeed (exactly GOOD)
    want = GOOD
    fingerprint = None
    how = draw(st.sampled_from(["truncate", "flip", "insert", "header_field", "layer_field",
                                "member_shape", "member_data", "key_scale_value", "member_set",
                                "fingerprint_arg"]))
    if how in ("truncate", "flip", "insert"):
        raw = bytearray(_CACHE["bytes"])
        if how == "truncate":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
            expect = r"."
        elif how == "flip":
            for _ in range(draw(st.integers(1, 6))):
                raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        else:
            at = draw(st.integers(0, len(raw)))
            raw[at:at] = draw(st.binary(min_size=1, max_size=32))
        raw = bytes(raw)
    elif how == "header_field":
        field = draw(st.sampled_from(HEADER_FIELDS))
        value = draw(st.one_of(st.sampled_from(WRONG_TYPES + ["<missing>"]), st.text(max_size=4),
                               st.floats(-1, 5), st.integers(-2, 3)))
        if value == "<missing>":
            header.pop(field)
            ok = field in ("data", "query_weight")  # optional: "" and 0 (as for version 1)
            if field == "query_weight":
                want = Calibration(GOOD.layers, FP, GOOD.data, 0.0)
            elif field == "data":
                want = Calibration(GOOD.layers, FP, "", GOOD.query_weight)
        else:
            header[field] = value
            ok = header_value_ok(field, value)
            if ok and field != "format" and field != "version" and field != "dtype":
                fp = value if field == "fingerprint" else FP
                want = Calibration(GOOD.layers, fp,
                                   str(value) if field == "data" else GOOD.data,
                                   float(value) if field == "query_weight" else 1.0)
        members["header.npy"] = header_npy(header)
        expect = None if ok else NAMES[field] + r"|" + (r"lacks" if value == "<missing>" else "$^")
    elif how == "layer_field":
        layer = draw(st.integers(0, 2))
        field = draw(st.sampled_from(LAYER_FIELDS))
        meta = GOOD.layers[layer]
        near = {"dk": meta.dk, "rank": meta.rank, "n_tokens": meta.n_tokens,
                "key_scale": int(meta.key_scale is not None)}[field]
        value = draw(st.one_of(st.sampled_from(WRONG_TYPES + ["<missing>", False, 0, 1]),
                               st.integers(near - 2, near + 2).filter(lambda v: v != near),
                               st.just(float(near))))
        if value == "<missing>":
            header["layers"][layer].pop(field)
            ok = field == "key_scale" and meta.key_scale is None  # optional: false
            expect = None if ok else rf"layer {layer} is incomplete|key_scale|arrays for"
        else:
            header["layers"][layer][field] = value
            ok = header_value_ok(field, value, layer)
            expect = None if ok else rf"{NAMES[field]}|layer {layer}"
            if ok and field == "n_tokens":
                layers = [Layer(m.dk, m.rank, m.eigenvalues, m.eigenvectors,
                                value if i == layer else m.n_tokens, m.key_scale)
                          for i, m in enumerate(GOOD.layers)]
                want = Calibration(layers, FP, GOOD.data, GOOD.query_weight)
        members["header.npy"] = header_npy(header)
    elif how in ("member_shape", "member_data", "key_scale_value"):
        names = sorted(arrays)
        if how == "key_scale_value":
            names = [n for n in names if n.startswith("key_scale")]
        name = draw(st.sampled_from(names))
        arr = arrays[name]
        layer = int(name.rsplit("_", 1)[1])
        if how == "member_shape":
            change = draw(st.sampled_from(["grow", "shrink", "ndim", "dtype", "transpose"]))
            if change == "grow":
                axis = draw(st.integers(0, arr.ndim - 1))
                pad = [(0, 0)] * arr.ndim
                pad[axis] = (0, 1)
                arr = np.pad(arr, pad)
            elif change == "shrink":
                axis = draw(st.integers(0, arr.ndim - 1))
                arr = np.delete(arr, 0, axis) if arr.shape[axis] > 0 else arr[..., None]
            elif change == "ndim":
                arr = arr[None]
            elif change == "dtype":
                arr = arr.astype(draw(st.sampled_from(
                    [np.float16, np.int64, np.int32, np.complex64, np.uint8]
                    + ([np.float32] if arr.dtype == np.float64 else [np.float64]))))
            else:
                if arr.ndim < 2 or arr.shape[0] == arr.shape[1]:
                    arr = arr.reshape(-1)[:-1]
                else:
                    arr = np.ascontiguousarray(arr.T)
            expect = rf"layer {layer}: {name}|{name}"
        elif how == "member_data":
            arr = arr.copy()
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([0.5, -3.0, 7e3]))
            expect = rf"SHA-256 mismatch|layer {layer}: key_scale"
            if arr.tobytes() == arrays[name].tobytes():
                expect = None
        else:  # a key scale that is not positive and finite, the digest made consistent
            arr = arr.copy()
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(
                st.sampled_from([0.0, -1.0, np.nan, np.inf, -np.inf, -0.0]))
            expect = rf"layer {layer}: key_scale"
        members[name + ".npy"] = npy(arr)
        if how != "member_data":
            arrays[name] = arr
            header["sha256"] = _digest(arrays)  # consistent: the shape checks must refuse it
            members["header.npy"] = header_npy(header)
    elif how == "member_set":
        change = draw(st.sampled_from(["remove", "add", "add_other", "rename", "swap"]))
        names = sorted(n for n in members if n != "header.npy")
        name = draw(st.sampled_from(names))
        if change == "remove":
            del members[name]
            arrays.pop(name[:-4])
        elif change == "add":
            members["eigenvalues_3.npy"] = npy(np.zeros(4))
            arrays["eigenvalues_3"] = np.zeros(4)
        elif change == "add_other":
            members[draw(st.sampled_from(["notes.txt", "header.json", "x.npy.bak"]))] = b"x"
        elif change == "rename":  # e.g. key_scale_0 as key_scale_1 (a layer that has none)
            data_ = members.pop(name)
            new = draw(st.sampled_from([n for n in
                                        ("key_scale_1.npy", "key_scale_2.npy", "key_scale_0.npy",
                                         "eigenvalues_5.npy", "eigenvectors_3.npy")
                                        if n != name]))
            members[new] = data_
            arrays[new[:-4]] = arrays.pop(name[:-4])
        else:  # two layers' same kind of array swapped: shapes differ, refused
            kind = name.rsplit("_", 1)[0]
            others = [n for n in names if n.startswith(kind + "_") and n != name]
            assume(others)
            other = draw(st.sampled_from(others))
            members[name], members[other] = members[other], members[name]
            arrays[name[:-4]], arrays[other[:-4]] = arrays[other[:-4]], arrays[name[:-4]]
        if change != "add_other":
            header["sha256"] = _digest(arrays)
            members["header.npy"] = header_npy(header)
        expect = r"arrays for|layer \d|not \.npy arrays|no header|incomplete|eigen|key_scale"
    else:  # the caller expects a fingerprint the file does not have
        key = draw(st.sampled_from(["model_type", "n_layers", "dk", "other"]))
        value = draw(st.one_of(st.sampled_from(["qwen2", 2, [8, 4], None]), JSON))
        fingerprint = {key: value}
        if FP.get(key) == json.loads(json.dumps(value)) or (key not in FP and value is None):
            expect = None
        else:
            expect = rf"fingerprint mismatch \(.*{re.escape(key)}"
    if raw is None:
        raw = archive(members)
    got, path = load_bytes(raw, fingerprint)
    if isinstance(got, sals.CalibrationError):
        msg = str(got)[len(path) + 2:]
        assert expect is not None or how in ("flip", "insert"), \
            f"{how}: a valid file refused: {msg}"
        if expect is not None:
            assert re.search(expect, msg), f"{how}: {msg!r} does not match {expect!r}"
        return
    assert expect is None, f"{how}: loaded a damaged file"
    same(got, want)


def test_round_trip_keeps_extremes():
    """Values at the edges of what a file holds: denormals, 0, the largest float32 key scale,
    the largest query weight, huge token counts, a fingerprint of every JSON kind."""
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    layers = [Layer(3, 1, np.array([1e308, 1e-320, 0.0]),
                    np.array([[tiny], [-0.0], [np.finfo(np.float32).max]], np.float32),
                    2**63 - 1, np.array([tiny, 1.0, np.finfo(np.float32).max], np.float32))]
    calib = Calibration(layers, {"": [None, True, 1.5, -(2**80), {"é": "\u2028"}]}, "\x00",
                        MAX_QUERY_WEIGHT)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.salscal")
        calib.save(path)
        same(Calibration.load(path), calib)


@pytest.mark.parametrize("change, match", [
    (lambda h: h.update(version=2.0), "format version 2.0"),
    (lambda h: h["layers"][1].update(key_scale=0), "layer 1: key_scale is 0"),
    (lambda h: h["layers"][1].update(key_scale=1.0), "layer 1: key_scale is 1.0"),
    (lambda h: h["layers"][0].update(key_scale=1), "layer 0: key_scale|arrays for"),
    (lambda h: h.update(version=1), "layer 0: key_scale in a format version 1 file"),
])
def test_header_kinds_are_not_coerced(change, match):
    """JSON kinds are taken as written: 2.0 is no version and 0 / 1 / 1.0 no key_scale flag
    (they were read as 2, false and true)."""
    members, header, _ = good_members()
    change(header)
    members["header.npy"] = header_npy(header)
    got, _ = load_bytes(archive(members))
    assert isinstance(got, sals.CalibrationError), "loaded"
    assert re.search(match, str(got)), str(got)
