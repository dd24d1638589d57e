"""Calibration of a HuggingFace model: pre-RoPE keys of every layer -> ``sals.Calibration``.

Keys are taken where the model computes them: a forward pre-hook on each attention module
recomputes ``k_norm(k_proj(hidden))`` from the module's input (extra GEMMs per layer, only
while calibrating), so the keys are exactly those the patched forward stores. The same hook
takes the pre-RoPE queries' energy per key dimension for query-weighted projections
(``sals.calibration``; ``query_weight``, opt-in).

Default text, always offline: the docstrings of Python standard-library modules
(``sals.hf.corpus.stdlib_text``). ``text=`` takes any other text.
"""

from __future__ import annotations

import os
import sys

import torch

from .. import Calibration, CalibrationError, Calibrator, InvalidArgumentError
from . import _arch
from .corpus import calibration_text, stdlib_description, stdlib_text

def token_chunks(tokenizer, text: str, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Tokenise ``text`` and cut the first ``n_tokens`` tokens into ``[1, <= seq_len]``
    sequences (each one a separate forward pass, starting at position 0)."""
    if n_tokens < 1 or seq_len < 1:
        raise InvalidArgumentError(
            f"n_tokens, seq_len: expected >= 1, got {n_tokens}, {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < n_tokens:
        raise CalibrationError(
            f"text: holds {len(ids)} tokens, fewer than the {n_tokens} asked for")
    ids = torch.tensor(ids[:n_tokens], dtype=torch.long)
    return [ids[i:i + seq_len][None] for i in range(0, n_tokens, seq_len)]


#: The default alpha of query-weighted projections (``sals.calibration``): 0, plain PCA. On
#: SmolLM2 at rank Dk/4, alpha 1 cut the attention-output error of rebuilt keys by about a third
#: and raised SALS-25%'s eval score, but Gemma 3 270M's query energy is so uneven across key
#: dimensions (its scale spans up to 727x) that the weighted PCA drops dimensions its retrieval
#: needs, and it lost accuracy there (BENCHMARKS.md): opt-in.
QUERY_WEIGHT = 0.0


def rebuilt_keys(keys: torch.Tensor, projection, key_scale=None) -> torch.Tensor:
    """``keys: [N, Dk]`` as the cache rebuilds them from their rank-r latents,
    ``((k * s) U) U^T / s``, for a calibration layer's ``[Dk, r]`` projection ``U`` and key
    scale ``s`` (None: plain PCA, s = 1); in ``keys``' dtype and on its device."""
    u = torch.tensor(projection, dtype=keys.dtype, device=keys.device)  # copies: read-only arrays
    if key_scale is None:
        return (keys @ u) @ u.T
    s = torch.tensor(key_scale, dtype=keys.dtype, device=keys.device)
    return ((keys * s) @ u) @ u.T / s


def query_energy(q: torch.Tensor, n_head_kv: int, rotary_dim: int) -> torch.Tensor:
    """``[N, Dk]`` float32 query energy per key dimension from pre-RoPE queries
    ``q: [..., Hq, d]``: ``q**2`` summed over the query heads of each KV head (grouped-query
    attention reads KV head h from query heads ``h*G .. h*G+G-1``), then summed within each
    rotate-half RoPE pair ``(i, i + rotary_dim/2)`` and given to both dimensions of the pair,
    so that the key scale built from it commutes with the rotation."""
    hq, d = q.shape[-2:]
    e = q.detach().float().square().reshape(-1, n_head_kv, hq // n_head_kv, d).sum(2)
    half = rotary_dim // 2
    pair = e[..., :half] + e[..., half:rotary_dim]
    e = torch.cat([pair, pair, e[..., rotary_dim:]], dim=-1)
    return e.reshape(e.shape[0], n_head_kv * d)


def collect_keys(model, chunks, calibrator: Calibrator, progress: bool = True,
                 info: _arch.ModelInfo | None = None, queries: bool = True) -> None:
    """Run ``model`` over ``chunks`` (``[1, T]`` token ids) and add every layer's pre-RoPE keys
    ``[T, Dk]`` to ``calibrator``, with their :func:`query_energy` when ``queries``."""
    from tqdm.auto import tqdm

    info = _arch.describe(model) if info is None else info

    def hook(layer: _arch.LayerInfo):
        def pre_hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q, k, _ = _arch.pre_rope(module, hidden, with_query=queries, with_value=False)
            energy = None if q is None else query_energy(q, layer.n_head_kv,
                                                         2 * layer.inv_freq.numel())
            calibrator.update(layer.index, k.reshape(-1, layer.dk), energy)
        return pre_hook

    handles = [layer.module.register_forward_pre_hook(hook(layer), with_kwargs=True)
               for layer in info.layers]
    device = info.layers[0].device
    try:
        with torch.no_grad(), tqdm(total=sum(c.shape[1] for c in chunks), unit="tok",
                                   desc="calibrating", disable=not progress) as bar:
            for ids in chunks:
                model(ids.to(device), use_cache=False)
                bar.update(ids.shape[1])
    finally:
        for h in handles:
            h.remove()


def calibrate(model, tokenizer, n_tokens: int = 16384, seq_len: int = 1024,
              rank_frac: float | None = None, energy: float | None = None,
              text: str | None = None, data: str | None = None,
              progress: bool = True, query_weight: float = QUERY_WEIGHT) -> Calibration:
    """Calibrate ``model`` on ``n_tokens`` tokens of ``text`` (default: stdlib docstrings) and
    keep per layer ``rank_frac * Dk`` directions (default 0.25, enough for both paper
    presets) or the fewest keeping ``energy`` of the key energy. ``data`` describes the text
    in the file (default: what it is and how many tokens). ``query_weight``: alpha of the
    query-weighted projections (``sals.calibration``; 0 is plain PCA of the keys)."""
    if rank_frac is None and energy is None:
        rank_frac = 0.25
    info = _arch.describe(model)
    if text is None:
        text = stdlib_text()
        data = data or stdlib_description()
    calibrator = Calibrator([layer.dk for layer in info.layers])
    collect_keys(model, token_chunks(tokenizer, text, n_tokens, seq_len), calibrator,
                 progress=progress, info=info, queries=query_weight > 0)
    description = f"{data or 'user text'}; {n_tokens} tokens in sequences of {seq_len}"
    return calibrator.finish(rank_frac=rank_frac, energy=energy,
                             fingerprint=_arch.fingerprint(model, info), data=description,
                             query_weight=query_weight)


def cache_dir() -> str:
    """Where computed calibrations are kept: ``$SALS_CACHE_DIR``, else ``~/.cache/sals``."""
    return os.environ.get("SALS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "sals")


def cached_path(model, n_tokens: int = 4096, seq_len: int = 1024, source: str = "stdlib",
                rank_frac: float = 0.25, query_weight: float = QUERY_WEIGHT) -> str:
    """Where :func:`cached_calibration` keeps the calibration of ``model`` with these arguments
    (whether or not it is there yet): in :func:`cache_dir`, a file name that carries the
    model's weight digest, the source, the rank fraction, the query weight and the token
    count."""
    if source not in ("stdlib", "debian-docs"):
        raise InvalidArgumentError(
            f"source: expected 'stdlib' or 'debian-docs' for a cached calibration, got {source!r}")
    extra = "" if source == "stdlib" else f"-{source}"
    extra += "" if rank_frac == 0.25 else f"-r{rank_frac:g}"
    extra += f"-qw{query_weight:g}"
    fp = _arch.fingerprint(model)
    name = (f"{fp['model_type']}-{fp['weights_sha256'][:16]}{extra}-{n_tokens}tok-{seq_len}"
            f".salscal")
    return os.path.join(cache_dir(), name)


def cached_calibration(model, tokenizer, n_tokens: int = 4096, seq_len: int = 1024,
                       progress: bool = True, source: str = "stdlib",
                       rank_frac: float = 0.25, query_weight: float = QUERY_WEIGHT,
                       ) -> tuple[Calibration, str, bool]:
    """``(calibration, path, computed)``: the calibration of ``model`` on ``n_tokens`` tokens of
    ``source`` (``sals.hf.corpus.calibration_text``: "stdlib", the default, or "debian-docs")
    keeping ``rank_frac * Dk`` directions (default Dk/4; 1.0 for ``preset="auto"``) with
    ``query_weight`` (see :func:`calibrate`), from :func:`cache_dir`, computed and saved there
    first when missing or unreadable (:func:`cached_path` says where)."""
    fp = _arch.fingerprint(model)
    path = cached_path(model, n_tokens, seq_len, source, rank_frac, query_weight)
    if os.path.isfile(path):
        try:
            return Calibration.load(path, fingerprint=fp), path, False
        except CalibrationError:
            pass  # stale or damaged: compute it again below
    text = data = None
    if source != "stdlib":
        text, data = calibration_text(source)
    if progress:
        print(f"calibration: none cached for this model; computing it once from {n_tokens} "
              f"tokens of {data or stdlib_description()} (saved to {path})", file=sys.stderr,
              flush=True)
    calib = calibrate(model, tokenizer, n_tokens=n_tokens, seq_len=seq_len, rank_frac=rank_frac,
                      text=text, data=data, progress=progress, query_weight=query_weight)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    calib.save(path)
    return calib, path, True
