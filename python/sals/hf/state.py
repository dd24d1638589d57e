"""What ``sals.hf.patch`` attaches to a model (``PatchState``), read by the caches, the decode
steps and the prefill made for that model."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import Calibration, Config, InvalidArgumentError, Rope
from . import _arch

#: the model attribute holding its PatchState
STATE_ATTR = "_sals_patch"


@dataclasses.dataclass
class PatchState:
    """What ``patch`` attached to a model: per-layer configs, ropes, projections and key scales
    (None: unscaled; see ``sals.calibration``) of the layers keeping a SALS cache, and the
    softmax scale of the dense layers keeping exact keys and values (``exact``), used by every
    SalsCache made for it; the decode-step options; and what ``unpatch`` restores."""

    info: _arch.ModelInfo
    configs: dict[int, Config]
    ropes: dict[int, Rope]
    projections: dict[int, np.ndarray]
    key_scales: dict[int, np.ndarray | None]
    max_tokens: int | None
    calibration: Calibration | None
    cuda_graph: bool = False
    compile: bool = False
    exact: dict[int, float] = dataclasses.field(default_factory=dict)
    step_forward: object = None  # the decode step's forward (sals.hf.graphs), compiled or not
    step: object = None          # the decode step running now (sals.hf.graphs.Step), or None
    saved: list = dataclasses.field(default_factory=list)  # (object, attribute, value or None)


def patch_state(model) -> PatchState:
    """The PatchState of a patched ``model``; InvalidArgumentError if it is not patched."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise InvalidArgumentError("model: not patched; call sals.hf.patch(model) first")
    return state
