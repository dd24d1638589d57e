"""Offline calibration: per-layer projections of pre-RoPE keys (numpy, float64).

For each layer, ``C = sum K^T K`` over the calibration keys ``K: [n_tokens, Dk]`` (all KV
heads concatenated, uncentered second moment, accumulated in float64) is eigendecomposed;
eigenvalues sort descending and the leading ``rank`` eigenvectors form ``U_r: [Dk, rank]``.

File format (``Calibration.save``): an ``.npz`` archive read with ``allow_pickle=False``:
  - ``header``: uint8 bytes of a UTF-8 JSON object: ``format`` "sals-calibration",
    ``version`` 1, ``fingerprint`` (dict naming the model it was made for), ``dtype`` (of the
    stored eigenvectors, "float32"), ``data`` (what text it saw), ``n_tokens``, ``layers``
    (per layer ``dk``, ``rank``, ``n_tokens``) and ``sha256`` (over every array, see
    ``_digest``);
  - ``eigenvalues_<i>``: float64 ``[Dk]``, descending;
  - ``eigenvectors_<i>``: float32 ``[Dk, rank]``.
Loading checks all of it; anything wrong raises CalibrationError.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationError, InvalidArgumentError

FORMAT = "sals-calibration"
VERSION = 1


def _as_float64_rows(keys, dk: int) -> np.ndarray:
    if hasattr(keys, "detach"):  # torch, possibly bf16 or on a GPU
        keys = keys.detach().float().cpu().numpy()
    k = np.asarray(keys)
    if k.ndim != 2 or k.shape[1] != dk:
        raise InvalidArgumentError(f"keys: expected [N, {dk}], got shape {list(k.shape)}")
    if not np.issubdtype(k.dtype, np.floating):
        raise InvalidArgumentError(f"keys: expected a float dtype, got {k.dtype}")
    k = k.astype(np.float64, copy=False)
    if not np.all(np.isfinite(k)):
        raise InvalidArgumentError("keys: hold NaN or infinity")
    return k


class Calibrator:
    """Accumulates ``K^T K`` per layer. ``dk_per_layer``: Dk (= n_head_kv * head_dim) of each
    layer, in layer order."""

    def __init__(self, dk_per_layer):
        self._dk = [int(d) for d in dk_per_layer]
        if not self._dk or min(self._dk) < 1:
            raise InvalidArgumentError(
                f"dk_per_layer: expected a non-empty list of positive ints, got {self._dk}")
        self._gram = [np.zeros((d, d), np.float64) for d in self._dk]
        self._tokens = [0] * len(self._dk)

    def update(self, layer: int, keys) -> None:
        """Add the keys of one batch. ``keys``: ``[N, Dk]`` pre-RoPE (after any k_norm), all KV
        heads concatenated; numpy or torch, any float dtype."""
        if not 0 <= int(layer) < len(self._dk):
            raise InvalidArgumentError(f"layer: expected 0..{len(self._dk) - 1}, got {layer}")
        k = _as_float64_rows(keys, self._dk[layer])
        self._gram[layer] += k.T @ k
        self._tokens[layer] += k.shape[0]

    def finish(self, rank_frac: float | None = None, energy: float | None = None,
               rank: int | None = None, fingerprint: dict | None = None, data: str = "",
               ) -> "Calibration":
        """Eigendecompose every layer and choose its rank by exactly one rule:
        ``rank_frac`` (rank = round(rank_frac * Dk)), ``energy`` (the smallest rank keeping
        that fraction of the eigenvalue sum) or ``rank`` (the same for all layers).
        ``fingerprint``: JSON-serialisable dict identifying the model (checked on load);
        ``data``: a description of the calibration text."""
        rules = [x is not None for x in (rank_frac, energy, rank)]
        if sum(rules) != 1:
            raise InvalidArgumentError("finish: give exactly one of rank_frac, energy, rank")
        if rank_frac is not None and not 0 < rank_frac <= 1:
            raise InvalidArgumentError(f"rank_frac: expected (0, 1], got {rank_frac}")
        if energy is not None and not 0 < energy <= 1:
            raise InvalidArgumentError(f"energy: expected (0, 1], got {energy}")
        layers = []
        for i, (dk, gram) in enumerate(zip(self._dk, self._gram)):
            if self._tokens[i] == 0:
                raise CalibrationError(f"layer {i}: no keys were given (call update first)")
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
                r = int(rank)
                if not 1 <= r <= dk:
                    raise InvalidArgumentError(f"rank: expected 1..{dk} for layer {i}, got {r}")
            elif rank_frac is not None:
                r = min(dk, max(1, int(round(rank_frac * dk))))
            else:
                r = _rank_for_energy(w, energy)
            layers.append(Layer(dk=dk, rank=r, eigenvalues=w,
                                eigenvectors=u[:, :r].astype(np.float32),
                                n_tokens=self._tokens[i]))
        return Calibration(layers, dict(fingerprint or {}), str(data))


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
    float32 ``[dk, rank]`` (orthonormal columns), ``n_tokens`` keys seen."""

    dk: int
    rank: int
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    n_tokens: int


class Calibration:
    """Per-layer projections with their eigenvalues and provenance."""

    def __init__(self, layers: list, fingerprint: dict, data: str = ""):
        self.layers = list(layers)
        self.fingerprint = dict(fingerprint)
        self.data = data

    @property
    def n_tokens(self) -> int:
        """Keys seen by every layer (the smallest per-layer count)."""
        return min(layer.n_tokens for layer in self.layers)

    def _layer(self, layer: int) -> Layer:
        if not 0 <= int(layer) < len(self.layers):
            raise InvalidArgumentError(f"layer: expected 0..{len(self.layers) - 1}, got {layer}")
        return self.layers[int(layer)]

    def projection(self, layer: int, rank: int | None = None) -> np.ndarray:
        """``U_r``: float32 ``[Dk, r]`` (C-contiguous) with ``r = rank`` or the layer's rank;
        ``rank`` may not exceed the stored rank."""
        lay = self._layer(layer)
        r = lay.rank if rank is None else int(rank)
        if not 1 <= r <= lay.rank:
            raise InvalidArgumentError(
                f"rank: expected 1..{lay.rank} (the stored rank of layer {layer}), got {r}")
        return np.ascontiguousarray(lay.eigenvectors[:, :r])

    def energy(self, layer: int, rank: int) -> float:
        """Fraction of the key energy (eigenvalue sum) the top ``rank`` directions keep."""
        lay = self._layer(layer)
        if not 0 <= int(rank) <= lay.dk:
            raise InvalidArgumentError(f"rank: expected 0..{lay.dk}, got {rank}")
        total = float(lay.eigenvalues.sum())
        return float(lay.eigenvalues[: int(rank)].sum() / total) if total > 0 else 0.0

    # ---- file format ------------------------------------------------------------------------

    def _arrays(self) -> dict:
        arrays = {}
        for i, lay in enumerate(self.layers):
            arrays[f"eigenvalues_{i}"] = np.ascontiguousarray(lay.eigenvalues, np.float64)
            arrays[f"eigenvectors_{i}"] = np.ascontiguousarray(lay.eigenvectors, np.float32)
        return arrays

    def save(self, path) -> None:
        """Write the versioned ``.npz`` file (see the module docstring). The file is written
        next to ``path`` and renamed into place, so a crash never leaves a half file there."""
        arrays = self._arrays()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "dtype": "float32",
            "data": self.data,
            "n_tokens": self.n_tokens,
            "layers": [{"dk": lay.dk, "rank": lay.rank, "n_tokens": lay.n_tokens}
                       for lay in self.layers],
            "sha256": _digest(arrays),
        }
        try:
            blob = json.dumps(header, sort_keys=True).encode("utf-8")
        except TypeError as e:
            raise InvalidArgumentError(f"fingerprint: not JSON-serialisable ({e})") from None
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(blob, np.uint8), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, fingerprint: dict | None = None) -> "Calibration":
        """Read and verify a file written by ``save``. With ``fingerprint``, every key it names
        must match the file's fingerprint. Raises CalibrationError on any problem (a missing
        file raises FileNotFoundError)."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        # np.load would take any other bytes for a .npy or a pickle and say so confusingly.
        if not zipfile.is_zipfile(io.BytesIO(raw)):
            raise CalibrationError(f"{path}: not a calibration file (not an .npz archive, or truncated)")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                files = {name: z[name] for name in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise CalibrationError(f"{path}: not a readable calibration file ({e})") from None
        if "header" not in files:
            raise CalibrationError(f"{path}: no header (not a {FORMAT} file)")
        try:
            header = json.loads(files.pop("header").tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CalibrationError(f"{path}: corrupt header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            got = header.get("format") if isinstance(header, dict) else None
            raise CalibrationError(f"{path}: format is {got!r}, expected {FORMAT!r}")
        if header.get("version") != VERSION:
            raise CalibrationError(
                f"{path}: format version {header.get('version')!r} is not supported "
                f"(this sals reads version {VERSION})")
        try:
            layer_meta = header["layers"]
            digest = header["sha256"]
            file_fp = header["fingerprint"]
            dtype = header["dtype"]
        except KeyError as e:
            raise CalibrationError(f"{path}: header lacks {e}") from None
        if dtype != "float32":
            raise CalibrationError(f"{path}: eigenvector dtype {dtype!r}, expected 'float32'")
        if _digest(files) != digest:
            raise CalibrationError(f"{path}: SHA-256 mismatch: the arrays were modified")
        if fingerprint is not None:
            # Compare as stored: JSON turns tuples into lists.
            fingerprint = json.loads(json.dumps(fingerprint))
            differ = sorted(k for k in fingerprint if fingerprint[k] != file_fp.get(k))
            if differ:
                detail = ", ".join(f"{k}: file {file_fp.get(k)!r} != expected "
                                   f"{fingerprint.get(k)!r}" for k in differ)
                raise CalibrationError(f"{path}: fingerprint mismatch ({detail})")
        layers = []
        for i, meta in enumerate(layer_meta):
            try:
                w = files[f"eigenvalues_{i}"]
                u = files[f"eigenvectors_{i}"]
                dk, r, n = int(meta["dk"]), int(meta["rank"]), int(meta["n_tokens"])
            except (KeyError, TypeError, ValueError) as e:
                raise CalibrationError(f"{path}: layer {i} is incomplete ({e})") from None
            if w.shape != (dk,) or u.shape != (dk, r) or u.dtype != np.float32 \
                    or w.dtype != np.float64:
                raise CalibrationError(
                    f"{path}: layer {i}: arrays {w.dtype}{list(w.shape)} / "
                    f"{u.dtype}{list(u.shape)} do not match dk={dk}, rank={r}")
            layers.append(Layer(dk, r, w, u, n))
        if len(files) != 2 * len(layers) or not layers:
            raise CalibrationError(f"{path}: {len(files)} arrays for {len(layers)} layers")
        return cls(layers, file_fp, str(header.get("data", "")))

    def __repr__(self) -> str:
        ranks = [lay.rank for lay in self.layers]
        return (f"Calibration({len(self.layers)} layers, ranks={ranks}, "
                f"n_tokens={self.n_tokens}, fingerprint={self.fingerprint})")


def _digest(arrays: dict) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()
