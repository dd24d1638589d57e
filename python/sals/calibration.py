"""Offline calibration: per-layer projections of pre-RoPE keys (numpy, float64).

For each layer, ``C = sum K^T K`` over the calibration keys ``K: [n_tokens, Dk]`` (all KV
heads concatenated, uncentered second moment, accumulated in float64) is eigendecomposed;
eigenvalues sort descending and the leading ``rank`` eigenvectors form ``U_r: [Dk, rank]``.

Query weighting (``query_weight`` alpha > 0, given the queries' energy per key dimension):
what attention needs of a rebuilt key is its dot product with the queries, so a dimension
that queries barely read may be rebuilt badly at no cost. With ``w_j`` the mean squared query
component that multiplies key dimension ``j`` (summed over the query heads reading that KV
head, and equal within each RoPE pair, which the caller arranges), the key scale is
``s = (w / mean(w)) ** (alpha / 2)`` and the projection is the PCA of the scaled keys,
``diag(s) C diag(s)``. The cache then stores ``s * k`` and attends with ``q / s``: the logits
are unchanged (a diagonal scale tied within RoPE pairs commutes with the rotation), while the
rank-r error is the error of the attention logits instead of the keys.

File format (``Calibration.save``): an ``.npz`` archive read with ``allow_pickle=False``:
  - ``header``: uint8 bytes of a UTF-8 JSON object: ``format`` "sals-calibration",
    ``version`` 1, ``fingerprint`` (dict naming the model it was made for), ``dtype`` (of the
    stored eigenvectors, "float32"), ``data`` (what text it saw), ``n_tokens``, ``layers``
    (per layer ``dk``, ``rank``, ``n_tokens``) and ``sha256`` (over every array, see
    ``_digest``);
  - ``eigenvalues_<i>``: float64 ``[Dk]``, descending;
  - ``eigenvectors_<i>``: float32 ``[Dk, rank]``;
  - ``key_scale_<i>``: float32 ``[Dk]``, positive, for the layers whose header entry has
    ``"key_scale": true`` (version 2; the header's ``query_weight`` is the alpha used).
Version 1 files (no key scales, no ``query_weight``) are read as well.
Loading checks all of it; anything wrong raises CalibrationError. It reads the JSON header
and every member's ``.npy`` header first, checks names, shapes and dtypes against the JSON
header and the total size against the file's, and only then reads the arrays: a crafted file
can neither make it allocate more than about its own size nor raise anything but
CalibrationError.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import _args
from ._files import replace_file
from .errors import CalibrationError, InvalidArgumentError, OutOfMemoryError

FORMAT = "sals-calibration"
VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Query energies below this fraction of the layer mean are raised to it: a dimension no query
#: reads would otherwise get a scale of 0 and queries divided by it.
MIN_QUERY_ENERGY = 1e-4
#: The largest query weight (alpha) accepted.
MAX_QUERY_WEIGHT = 4.0


def _as_float64_rows(keys, dk: int, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(keys, torch.Tensor):  # possibly bf16 or on a GPU
        if not keys.is_floating_point():
            raise InvalidArgumentError(f"{name}: expected a float dtype, got {keys.dtype}")
        keys = keys.detach().float().cpu().numpy()
    try:
        k = np.asarray(keys)
    except (TypeError, ValueError) as e:  # ragged nested lists, objects refusing conversion
        raise InvalidArgumentError(f"{name}: not an array ({e})") from None
    if k.ndim != 2 or k.shape[1] != dk:
        raise InvalidArgumentError(f"{name}: expected [N, {dk}], got shape {list(k.shape)}")
    if not np.issubdtype(k.dtype, np.floating):
        raise InvalidArgumentError(f"{name}: expected a float dtype, got {k.dtype}")
    k = k.astype(np.float64, copy=False)
    if not np.all(np.isfinite(k)):
        raise InvalidArgumentError(f"{name}: holds NaN or infinity")
    return k


def _check_sum(total: np.ndarray, name: str, what: str) -> None:
    """Refuse, naming the argument, a sum that overflowed float64 (its inputs are finite)."""
    if not np.all(np.isfinite(total)):
        raise InvalidArgumentError(f"{name}: values too large: the accumulated {what} "
                                   f"overflows float64")


class Calibrator:
    """Accumulates ``K^T K`` per layer, and the queries' energy per key dimension when given.
    ``dk_per_layer``: Dk (= n_head_kv * head_dim) of each layer, in layer order.

    ``finish`` leaves the sums as they are: it may be called again (another rank rule, another
    query weight), and ``update`` may add more keys after it. Wrong arguments raise
    InvalidArgumentError naming the argument and change nothing."""

    def __init__(self, dk_per_layer):
        if isinstance(dk_per_layer, (str, bytes)) or not isinstance(dk_per_layer, Iterable):
            raise InvalidArgumentError(
                f"dk_per_layer: expected a list of ints, got {type(dk_per_layer).__name__}")
        self._dk = [_args.integer(d, f"dk_per_layer[{i}]", 1) for i, d in enumerate(dk_per_layer)]
        if not self._dk:
            raise InvalidArgumentError("dk_per_layer: expected a non-empty list of positive ints")
        self._gram = []
        for i, d in enumerate(self._dk):
            try:
                self._gram.append(np.zeros((d, d), np.float64))
            except (MemoryError, ValueError):  # ValueError: more bytes than numpy can address
                raise OutOfMemoryError(f"dk_per_layer[{i}]: no memory for the {d} x {d} float64 "
                                       f"sums of layer {i}") from None
        self._tokens = [0] * len(self._dk)
        self._query = [np.zeros(d, np.float64) for d in self._dk]
        self._query_tokens = [0] * len(self._dk)

    def update(self, layer: int, keys, query_energy=None) -> None:
        """Add the keys of one batch. ``keys``: ``[N, Dk]`` pre-RoPE (after any k_norm), all KV
        heads concatenated; numpy or torch, any float dtype. ``query_energy``: ``[N, Dk]``,
        per token the squared query components that multiply each key dimension, summed over
        the query heads reading its KV head and tied within RoPE pairs (see the module
        docstring); needed for ``finish(query_weight=...)``."""
        layer = _args.integer(layer, "layer")
        if not 0 <= layer < len(self._dk):
            raise InvalidArgumentError(f"layer: expected 0..{len(self._dk) - 1}, got {layer}")
        k = _as_float64_rows(keys, self._dk[layer], "keys")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
            gram = self._gram[layer] + k.T @ k
        _check_sum(gram, "keys", "K^T K")
        query = None
        if query_energy is not None:
            e = _as_float64_rows(query_energy, self._dk[layer], "query_energy")
            if e.shape[0] != k.shape[0]:
                raise InvalidArgumentError(
                    f"query_energy: {e.shape[0]} rows for {k.shape[0]} keys")
            if np.any(e < 0):
                raise InvalidArgumentError("query_energy: holds negative values")
            with np.errstate(over="ignore", invalid="ignore"):
                query = self._query[layer] + e.sum(axis=0)
            _check_sum(query, "query_energy", "query energy")
        # Every argument checked: only now is anything changed.
        self._gram[layer] = gram
        self._tokens[layer] += k.shape[0]
        if query is not None:
            self._query[layer] = query
            self._query_tokens[layer] += k.shape[0]

    def finish(self, rank_frac: float | None = None, energy: float | None = None,
               rank: int | None = None, fingerprint: dict | None = None, data: str = "",
               query_weight: float = 0.0) -> "Calibration":
        """Eigendecompose every layer and choose its rank by exactly one rule:
        ``rank_frac`` (rank = round(rank_frac * Dk)), ``energy`` (the smallest rank keeping
        that fraction of the eigenvalue sum) or ``rank`` (the same for all layers).
        ``fingerprint``: JSON-serialisable dict identifying the model (checked on load);
        ``data``: a description of the calibration text. ``query_weight``: the alpha of
        query-weighted projections (module docstring; 0, the default, is plain PCA of the
        keys); above 0 every key given must have come with its ``query_energy``."""
        rules = [x is not None for x in (rank_frac, energy, rank)]
        if sum(rules) != 1:
            raise InvalidArgumentError("finish: give exactly one of rank_frac, energy, rank")
        rank_frac = _args.optional_real(rank_frac, "rank_frac")
        if rank_frac is not None and not 0 < rank_frac <= 1:
            raise InvalidArgumentError(f"rank_frac: expected (0, 1], got {rank_frac}")
        energy = _args.optional_real(energy, "energy")
        if energy is not None and not 0 < energy <= 1:
            raise InvalidArgumentError(f"energy: expected (0, 1], got {energy}")
        rank = _args.optional_integer(rank, "rank")
        query_weight = _args.real(query_weight, "query_weight")
        if not 0 <= query_weight <= MAX_QUERY_WEIGHT:
            raise InvalidArgumentError(
                f"query_weight: expected [0, {MAX_QUERY_WEIGHT:g}], got {query_weight}")
        fingerprint = {} if fingerprint is None else fingerprint
        if not isinstance(fingerprint, dict):
            raise InvalidArgumentError(
                f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
        try:  # refused now rather than by save()
            json.dumps(fingerprint)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"fingerprint: not JSON-serialisable ({e})") from None
        if not isinstance(data, str):
            raise InvalidArgumentError(f"data: expected a str, got {type(data).__name__}")
        layers = []
        for i, (dk, gram) in enumerate(zip(self._dk, self._gram)):
            if self._tokens[i] == 0:
                raise CalibrationError(f"layer {i}: no keys were given (call update first)")
            scale = None
            if query_weight > 0:
                if self._query_tokens[i] != self._tokens[i]:
                    raise CalibrationError(
                        f"layer {i}: query_weight needs the query energy of every key; it came "
                        f"with {self._query_tokens[i]} of {self._tokens[i]}")
                scale = key_scale(self._query[i] / self._query_tokens[i], query_weight)
                gram = gram * np.outer(scale, scale)
            w, u = np.linalg.eigh(gram)
            order = np.argsort(w)[::-1]
            w, u = w[order], u[:, order]
            # The Gram matrix is PSD: negative eigenvalues are rounding noise.
            w = np.maximum(w, 0.0)
            # Fix each eigenvector's sign (largest-magnitude entry positive) so that the same
            # keys always give the same file.
            pivot = np.argmax(np.abs(u), axis=0)
            u = u * np.where(u[pivot, np.arange(dk)] < 0, -1.0, 1.0)
            if rank is not None:
                r = rank
                if not 1 <= r <= dk:
                    raise InvalidArgumentError(f"rank: expected 1..{dk} for layer {i}, got {r}")
            elif rank_frac is not None:
                r = min(dk, max(1, int(round(rank_frac * dk))))
            else:
                r = _rank_for_energy(w, energy)
            layers.append(Layer(dk=dk, rank=r, eigenvalues=w,
                                eigenvectors=u[:, :r].astype(np.float32),
                                n_tokens=self._tokens[i],
                                key_scale=None if scale is None else scale.astype(np.float32)))
        return Calibration(layers, dict(fingerprint), data, query_weight)


def key_scale(query_energy: np.ndarray, query_weight: float) -> np.ndarray:
    """float64 ``[Dk]``: ``(w / mean(w)) ** (query_weight / 2)`` of the mean query energy per
    key dimension ``w``, with ``w`` raised to at least ``MIN_QUERY_ENERGY`` of its mean."""
    w = np.asarray(query_energy, np.float64)
    m = float(w.mean())
    if not m > 0:
        return np.ones_like(w)
    return np.maximum(w / m, MIN_QUERY_ENERGY) ** (query_weight / 2)


def _rank_for_energy(eigenvalues: np.ndarray, energy: float) -> int:
    total = float(eigenvalues.sum())
    if total <= 0:
        return 1
    kept = np.cumsum(eigenvalues) / total
    # A tiny tolerance so that energy=1.0 is reachable despite rounding of the cumulative sum.
    return int(min(len(kept), np.searchsorted(kept, energy - 1e-12) + 1))


@dataclass
class Layer:
    """One layer's calibration: ``eigenvalues`` float64 ``[dk]`` descending, ``eigenvectors``
    float32 ``[dk, rank]`` (orthonormal columns), ``n_tokens`` keys seen, ``key_scale``
    float32 ``[dk]`` (query-weighted projections: the eigen-pairs are those of the scaled
    keys) or None (plain PCA)."""

    dk: int
    rank: int
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    n_tokens: int
    key_scale: np.ndarray | None = None


class Calibration:
    """Per-layer projections with their eigenvalues and provenance."""

    def __init__(self, layers: list, fingerprint: dict, data: str = "",
                 query_weight: float = 0.0):
        self.layers = list(layers)
        self.fingerprint = dict(fingerprint)
        self.data = data
        self.query_weight = float(query_weight)

    @property
    def n_tokens(self) -> int:
        """Keys seen by every layer (the smallest per-layer count)."""
        return min(layer.n_tokens for layer in self.layers)

    def _layer(self, layer: int) -> Layer:
        layer = _args.integer(layer, "layer")
        if not 0 <= layer < len(self.layers):
            raise InvalidArgumentError(f"layer: expected 0..{len(self.layers) - 1}, got {layer}")
        return self.layers[layer]

    def projection(self, layer: int, rank: int | None = None) -> np.ndarray:
        """``U_r``: float32 ``[Dk, r]`` (C-contiguous) with ``r = rank`` or the layer's rank;
        ``rank`` may not exceed the stored rank."""
        lay = self._layer(layer)
        r = lay.rank if rank is None else _args.integer(rank, "rank")
        if not 1 <= r <= lay.rank:
            raise InvalidArgumentError(
                f"rank: expected 1..{lay.rank} (the stored rank of layer {layer}), got {r}")
        return np.ascontiguousarray(lay.eigenvectors[:, :r])

    def key_scale(self, layer: int) -> np.ndarray | None:
        """float32 ``[Dk]`` scale of the keys the projection was made for (``s`` of the module
        docstring), or None for plain PCA."""
        return self._layer(layer).key_scale

    def energy(self, layer: int, rank: int) -> float:
        """Fraction of the key energy (eigenvalue sum) the top ``rank`` directions keep."""
        lay = self._layer(layer)
        rank = _args.integer(rank, "rank")
        if not 0 <= rank <= lay.dk:
            raise InvalidArgumentError(f"rank: expected 0..{lay.dk}, got {rank}")
        total = float(lay.eigenvalues.sum())
        return float(lay.eigenvalues[:rank].sum() / total) if total > 0 else 0.0

    # ---- file format ------------------------------------------------------------------------

    def _arrays(self) -> dict:
        arrays = {}
        for i, lay in enumerate(self.layers):
            arrays[f"eigenvalues_{i}"] = np.ascontiguousarray(lay.eigenvalues, np.float64)
            arrays[f"eigenvectors_{i}"] = np.ascontiguousarray(lay.eigenvectors, np.float32)
            if lay.key_scale is not None:
                arrays[f"key_scale_{i}"] = np.ascontiguousarray(lay.key_scale, np.float32)
        return arrays

    def save(self, path) -> None:
        """Write the versioned ``.npz`` file (see the module docstring). The file is written
        next to ``path`` and renamed into place, so a crash never leaves a half file there; a
        ``path`` that exists and is not a regular file (a symlink, a device, a directory) is
        refused with InvalidArgumentError."""
        arrays = self._arrays()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "dtype": "float32",
            "data": self.data,
            "n_tokens": self.n_tokens,
            "query_weight": self.query_weight,
            "layers": [{"dk": lay.dk, "rank": lay.rank, "n_tokens": lay.n_tokens,
                        "key_scale": lay.key_scale is not None} for lay in self.layers],
            "sha256": _digest(arrays),
        }
        try:
            blob = json.dumps(header, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as e:  # ValueError: a circular reference
            raise InvalidArgumentError(f"fingerprint: not JSON-serialisable ({e})") from None
        replace_file(path, lambda f: np.savez(f, header=np.frombuffer(blob, np.uint8), **arrays),
                     "path")

    @classmethod
    def load(cls, path, fingerprint: dict | None = None) -> "Calibration":
        """Read and verify a file written by ``save``. With ``fingerprint``, every key it names
        must match the file's fingerprint. Raises CalibrationError on any problem (a missing
        file raises FileNotFoundError)."""
        path = os.fspath(path)
        if fingerprint is not None:
            try:  # compare as stored: JSON turns tuples into lists
                fingerprint = json.loads(json.dumps(fingerprint))
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(f"fingerprint: not JSON-serialisable ({e})") from None
            if not isinstance(fingerprint, dict):
                raise InvalidArgumentError("fingerprint: expected a dict")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # np.load would take any other bytes for a .npy or a pickle and say so confusingly.
            if not zipfile.is_zipfile(f):
                raise CalibrationError(
                    f"{path}: not a calibration file (not an .npz archive, or truncated)")
            f.seek(0)
            try:
                with zipfile.ZipFile(f) as z:
                    header, files = _read_archive(z, size)
            except CalibrationError as e:
                raise CalibrationError(f"{path}: {e}") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, OSError,
                    EOFError, KeyError, TypeError, AttributeError, OverflowError, IndexError,
                    NotImplementedError, RuntimeError) as e:
                # RuntimeError covers encrypted members and RecursionError (deep JSON).
                raise CalibrationError(
                    f"{path}: not a readable calibration file ({type(e).__name__}: {e})") from None
        if _digest(files) != header["sha256"]:
            raise CalibrationError(f"{path}: SHA-256 mismatch: the arrays were modified")
        file_fp = header["fingerprint"]
        if fingerprint is not None:
            differ = sorted(k for k in fingerprint if fingerprint[k] != file_fp.get(k))
            if differ:
                detail = ", ".join(f"{k}: file {file_fp.get(k)!r} != expected "
                                   f"{fingerprint.get(k)!r}" for k in differ)
                raise CalibrationError(f"{path}: fingerprint mismatch ({detail})")
        layers = [Layer(m["dk"], m["rank"], files[f"eigenvalues_{i}"],
                        files[f"eigenvectors_{i}"], m["n_tokens"], files.get(f"key_scale_{i}"))
                  for i, m in enumerate(header["layers"])]
        return cls(layers, file_fp, header["data"], header["query_weight"])

    def __repr__(self) -> str:
        ranks = [lay.rank for lay in self.layers]
        return (f"Calibration({len(self.layers)} layers, ranks={ranks}, "
                f"n_tokens={self.n_tokens}, query_weight={self.query_weight:g}, "
                f"fingerprint={self.fingerprint})")


def _digest(arrays: dict) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_npy_header(f, name: str):
    """(shape, dtype, fortran_order) from the .npy header at the start of stream f (numpy bounds
    the header's length); the stream is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CalibrationError(f"{name}: .npy format version {version} not supported")
    if any(not isinstance(n, int) or n < 0 for n in shape) or dtype.hasobject:
        raise CalibrationError(f"{name}: a {dtype} array of shape {shape}")
    return tuple(shape), dtype, fortran


def _npy_header(z: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(shape, dtype, fortran_order) of a member's .npy header, without reading its data."""
    with z.open(info) as f:
        return _read_npy_header(f, info.filename)


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, shape, dtype, fortran) -> np.ndarray:
    """The array of a member whose header was checked: exactly its bytes, nothing after."""
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    with z.open(info) as f:
        _read_npy_header(f, info.filename)
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):
            raise CalibrationError(f"{info.filename}: holds {len(data)} bytes of data, its header "
                                   f"says {nbytes}")
    arr = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


def _count(value, what: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CalibrationError(f"{what}: {value!r} is not an int >= {lo}")
    return value


def _read_archive(z: zipfile.ZipFile, size: int):
    """(checked header dict, {name: array}) of an open archive of `size` bytes."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CalibrationError("an array appears twice in the archive")
    members = {n[:-4]: i for n, i in zip(names, infos) if n.endswith(".npy")}
    if len(members) != len(infos):
        raise CalibrationError(f"members that are not .npy arrays: "
                               f"{sorted(n for n in names if not n.endswith('.npy'))}")
    if "header" not in members:
        raise CalibrationError(f"no header (not a {FORMAT} file)")
    # Every member's .npy header first; the archive's arrays may not outgrow the file.
    heads = {name: _npy_header(z, info) for name, info in members.items()}
    total = sum(int(np.prod(s, dtype=object)) * d.itemsize for s, d, _ in heads.values())
    if total > size:
        raise CalibrationError(f"its arrays claim {total} bytes, more than the file's {size}")
    shape, dtype, _ = heads["header"]
    if dtype != np.uint8 or len(shape) != 1:
        raise CalibrationError(f"corrupt header (a {dtype} array of shape {list(shape)})")
    raw = _read_member(z, members["header"], *heads["header"])
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CalibrationError(f"corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise CalibrationError(f"format is {got!r}, expected {FORMAT!r}")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not 2.0, not True
        raise CalibrationError(f"format version {version!r} is not supported (this sals reads "
                               f"versions {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("layers", "sha256", "fingerprint", "dtype"):
        if key not in header:
            raise CalibrationError(f"header lacks {key!r}")
    if header["dtype"] != "float32":
        raise CalibrationError(f"eigenvector dtype {header['dtype']!r}, expected 'float32'")
    for key, kind in (("sha256", str), ("fingerprint", dict), ("layers", list)):
        if not isinstance(header[key], kind):
            raise CalibrationError(f"header {key!r} is not a {kind.__name__}")
    header["data"] = str(header.get("data", ""))
    weight = header.get("query_weight", 0.0) if version >= 2 else 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_QUERY_WEIGHT:
        raise CalibrationError(
            f"query_weight: {weight!r} is not a number in [0, {MAX_QUERY_WEIGHT:g}]")
    header["query_weight"] = float(weight)
    layers = header["layers"]
    scaled = [isinstance(m, dict) and m.get("key_scale") is True for m in layers]
    if not layers or len(members) != 2 * len(layers) + sum(scaled) + 1:
        raise CalibrationError(f"{len(members) - 1} arrays for {len(layers)} layers")
    checked = []
    for i, meta in enumerate(layers):
        if not isinstance(meta, dict) or not {"dk", "rank", "n_tokens"} <= set(meta):
            raise CalibrationError(f"layer {i} is incomplete ({meta!r})")
        dk = _count(meta["dk"], f"layer {i}: dk", 1)
        r = _count(meta["rank"], f"layer {i}: rank", 1)
        n = _count(meta["n_tokens"], f"layer {i}: n_tokens")
        if r > dk:
            raise CalibrationError(f"layer {i}: rank {r} > dk {dk}")
        if not isinstance(meta.get("key_scale", False), bool):  # not 0, 1 or 1.0
            raise CalibrationError(f"layer {i}: key_scale is {meta.get('key_scale')!r}, "
                                   f"expected true or false")
        if scaled[i] and version < 2:
            raise CalibrationError(f"layer {i}: key_scale in a format version {version} file "
                                   f"(key scales came with version 2)")
        want = {f"eigenvalues_{i}": ((dk,), np.float64), f"eigenvectors_{i}": ((dk, r), np.float32)}
        if scaled[i]:
            want[f"key_scale_{i}"] = ((dk,), np.float32)
        for name, (wshape, wdtype) in want.items():
            if name not in heads:
                raise CalibrationError(f"layer {i} is incomplete (no {name})")
            shape, dtype, _ = heads[name]
            if tuple(shape) != wshape or dtype.kind != "f" or dtype.itemsize != np.dtype(
                    wdtype).itemsize:
                raise CalibrationError(
                    f"layer {i}: {name} is {dtype}{list(shape)}, expected "
                    f"{np.dtype(wdtype)}{list(wshape)} (dk={dk}, rank={r})")
        checked.append({"dk": dk, "rank": r, "n_tokens": n})
    header["layers"] = checked
    files = {name: _read_member(z, members[name], *heads[name])
             for name in members if name != "header"}
    for i in range(len(layers)):
        scale = files.get(f"key_scale_{i}")
        if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise CalibrationError(f"layer {i}: key_scale holds values that are not positive "
                                   f"and finite")
    return header, files
