"""Per-layer settings from a preset, overrides and a calibration, shared by the model
integrations (sals.hf's patch, the sals.vllm plugin). Needs torch (imported by those layers,
never by ``import sals``)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import presets
from .calibration import Calibration
from .config import Config
from .errors import CalibrationError, InvalidArgumentError


def check_fingerprint(calib: Calibration, expected: dict) -> None:
    """Refuse a calibration whose fingerprint differs from ``expected`` in any key it names."""
    got = dict(calib.fingerprint or {})
    diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: calibration {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise CalibrationError(f"calibration: made for another model ({detail})")


def load_calibration(calibration, fingerprint: dict) -> Calibration | None:
    """None, a path or a sals.Calibration -> a Calibration made for ``fingerprint`` (or None)."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    if not isinstance(calibration, Calibration):
        raise InvalidArgumentError(
            f"calibration: expected None, a path or a sals.Calibration, got "
            f"{type(calibration).__name__}")
    check_fingerprint(calibration, fingerprint)
    return calibration


def config(info, preset: str | presets.Preset | None, overrides: dict, dense: bool,
           model_dtype: torch.dtype, calib: Calibration | None) -> Config:
    """One full-attention layer's checked Config (arguments as for ``layer_config``)."""
    fields = dict(overrides)
    fields.setdefault("scale", info.scaling)
    fields.setdefault("dtype", "bfloat16" if model_dtype == torch.bfloat16 else "float16")
    if preset is None and calib is not None and "rank" not in fields:
        fields["rank"] = calib.layers[info.index].rank
    if preset is not None:
        cfg = Config.preset(preset, info.n_head_q, info.n_head_kv, info.head_dim, **fields)
    else:
        cfg = Config(info.n_head_q, info.n_head_kv, info.head_dim, **fields)
    cfg = dataclasses.replace(cfg, dense=bool(cfg.dense or dense))
    cfg.check()  # out-of-range values are refused now, not when the first cache is made
    return cfg


def layer_config(info, preset: str | presets.Preset | None, overrides: dict, dense: bool,
                 model_dtype: torch.dtype, calib: Calibration | None,
                 remedy: str = "patch(model, calibration=FILE)",
                 ) -> tuple[Config, np.ndarray, np.ndarray | None]:
    """One full-attention layer's (Config, projection [Dk, rank], key scale or None).

    ``info``: the layer's ``index``, ``n_head_q``, ``n_head_kv``, ``head_dim``, ``dk`` and
    ``scaling`` (the model's softmax scale); ``preset``: a Config preset or None (Config's
    defaults, the calibration's rank); ``overrides``: Config fields; ``dense``: a dense layer;
    ``model_dtype``: the model's torch dtype (16-bit storage follows it); ``remedy``: how the
    caller passes a calibration, named when one is needed and missing. Full rank takes the
    identity; otherwise the calibration's leading eigenvectors, refused with CalibrationError
    naming the layer when it lacks them.
    """
    cfg = config(info, preset, overrides, dense, model_dtype, calib)
    rank = cfg.resolved_rank()
    if rank == info.dk:  # full rank: the identity is exact, whatever the calibration
        return cfg, np.eye(info.dk, dtype=np.float32), None
    if calib is None:
        name = None if preset is None else presets.parse(preset).name  # a name as given
        raise CalibrationError(
            f"calibration: preset {name!r} keeps rank {rank} of Dk={info.dk} at layer "
            f"{info.index}, which needs a calibration (python -m sals calibrate --model ... "
            f"--out FILE, then {remedy}); without one use "
            f"preset='dense-equivalent' or rank={info.dk}")
    stored = calib.layers[info.index]
    if stored.dk != info.dk:
        raise CalibrationError(
            f"calibration: layer {info.index} has Dk={stored.dk}, the model {info.dk}")
    if rank > stored.rank:
        raise CalibrationError(
            f"calibration: layer {info.index} stores rank {stored.rank}, the settings need "
            f"{rank} (calibrate with a larger --rank-frac)")
    scale = calib.key_scale(info.index)
    if scale is not None:
        check_key_scale(scale, info.index, calib.query_weight, model_dtype, cfg.dtype)
    return cfg, calib.projection(info.index, rank), scale


def check_key_scale(scale: np.ndarray, layer: int, query_weight: float,
                     model_dtype: torch.dtype, storage: str) -> None:
    """The cache stores s * k and attends with q / s (query-weighted projections): s and 1 / s
    must be finite in the model's dtype and s in the cache's storage dtype, or every step would
    fail on an infinity that q and k do not hold."""
    hi, lo = float(np.max(scale)), float(np.min(scale))
    for whose, dtype, largest in (("the model's", model_dtype, max(hi, 1.0 / lo)),
                                  ("the cache's", getattr(torch, storage), hi)):
        big = float(torch.finfo(dtype).max)
        if largest > big:
            raise CalibrationError(
                f"calibration: layer {layer}'s key scale spans {lo:.3g}..{hi:.3g} (query weight "
                f"{query_weight:g}); s and 1/s must stay below {big:.5g}, the largest finite "
                f"value of {whose} {str(dtype).removeprefix('torch.')}: calibrate with a smaller "
                f"--query-weight, or run the model in bfloat16 or float32")
