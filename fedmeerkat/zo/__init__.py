"""Sparse zeroth-order core: pure torch, no federated code."""

from fedmeerkat.zo.calibration import compute_mask, topk_global
from fedmeerkat.zo.mask import DEFAULT_ELIGIBLE, MaskMismatchError, SparseMask, eligible_parameters
from fedmeerkat.zo.perturb import draw_z, sgd_update, to_float32
from fedmeerkat.zo.seeds import round_seeds, step_seed
from fedmeerkat.zo.sparse import SparseView
from fedmeerkat.zo.step import (
    ESTIMATORS,
    StepResult,
    forwards_per_direction,
    replay,
    replay_many,
    zo_multi_step,
    zo_step,
)

__all__ = [
    "DEFAULT_ELIGIBLE", "ESTIMATORS", "MaskMismatchError", "SparseMask", "SparseView", "StepResult",
    "compute_mask", "draw_z", "eligible_parameters", "forwards_per_direction", "replay", "replay_many", "round_seeds",
    "sgd_update", "step_seed", "to_float32", "topk_global", "zo_multi_step", "zo_step",
]
