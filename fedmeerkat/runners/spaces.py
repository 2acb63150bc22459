"""The trainable space of a run: which coordinates a method trains, as one flat vector.

Every method trains a flat float32 vector theta laid out by a "space" and read/written into the
one model by a view (`gather`, `write`); everything downstream (server, client, wire, bytes,
checkpoints, final_state.safetensors) only sees theta. The kinds:
  - "mask"  : the Meerkat SparseMask over the decoder weights (meerkat, meerkat-vp,
              meerkat-random-select, meerkat-feddyn, fedavg-backprop with trainable=mask);
  - "lora"  : a SparseMask with ALL indices of the LoRA A/B matrices (lora-fedzo,
              fedavg-backprop with trainable=lora); the adapter is injected into the model first;
  - "dense" : every model parameter (full-fedzo), zo/dense.py's DenseSpace and DenseView.
The space is saved as the run folder's mask.safetensors (names and shapes only for "dense"), so
`--resume` and `fedmeerkat eval RUN_DIR` rebuild exactly the same layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeerkat.config import RunConfig
from fedmeerkat.federated.methods import get_method
from fedmeerkat.models.loading import model_fingerprint
from fedmeerkat.models.lora import LORA_TARGETS, add_lora, lora_mask
from fedmeerkat.runners.run_folder import MASK_FILE, load_run_state
from fedmeerkat.zo import SparseMask, SparseView
from fedmeerkat.zo.dense import DenseSpace, DenseView


@dataclass
class Space:
    kind: str  # "mask" | "lora" | "dense"
    mask: Any  # SparseMask or DenseSpace (names, shapes, nnz, eligible_numel, density, meta)
    view: Any  # SparseView or DenseView
    source: str
    server_options: dict[str, Any] = field(default_factory=dict)


def space_kind(cfg: RunConfig) -> str:
    """What `cfg.method` trains: "mask", "lora" or "dense" (the method's registry entry says)."""
    return get_method(cfg.method).space(cfg.method_settings)


def _add_lora(cfg: RunConfig, model) -> None:
    s = cfg.method_settings  # LoraSettings or a subclass: the lora space exists only there
    add_lora(model, rank=s.lora_rank, alpha=s.lora_alpha, seed=cfg.seed)


def build_space(cfg: RunConfig, model, folder: Path, *, resume: bool,
                make_mask: Callable[[], tuple[SparseMask, str]]) -> Space:
    """The run's space, bound to `model` (a LoRA adapter is injected for kind "lora").

    New runs save it to folder/mask.safetensors; resumed runs load it from there and check it
    against the model. `make_mask` gives the Meerkat mask and its source (kind "mask" only)."""
    kind = space_kind(cfg)
    path = folder / MASK_FILE
    params = dict(model.named_parameters())
    if kind == "dense":
        mask: Any = DenseSpace.load(path) if resume else DenseSpace.of_model(model)
        mask.check_model(params)
        source = "every parameter (dense)"
        view: Any = DenseView(params, mask)
        if not resume:
            mask.save(path)
        return Space(kind, mask, view, source, {"space": mask})
    if kind == "lora":
        _add_lora(cfg, model)
        params = dict(model.named_parameters())
        rank, alpha = cfg.method_settings.lora_rank, cfg.method_settings.lora_alpha
        mask = lora_mask(model, {"lora_rank": str(rank), "lora_alpha": repr(alpha),
                                 "lora_targets": ",".join(LORA_TARGETS)})
        if resume:
            mask = SparseMask.load(path)
            mask.check_model(params, {})
        source = f"LoRA adapter r={rank}, alpha={alpha} on {','.join(LORA_TARGETS)}"
    elif resume:
        mask, source = SparseMask.load(path), "run folder (resumed)"
        mask.check_model(params, model_fingerprint(model))
    else:
        mask, source = make_mask()
    if not resume:
        mask.save(path)
    return Space(kind, mask, SparseView(params, mask), source)


def restore_run_weights(run_dir: Path, cfg: RunConfig, model, which: str = "final") -> None:
    """Write a finished run's final_state.safetensors (or `which="best"`: its
    best_state.safetensors) into `model` (adds the LoRA adapter for LoRA runs first), for
    `fedmeerkat eval RUN_DIR` and export."""
    space, theta = load_run_state(run_dir, which)
    if space_kind(cfg) == "lora":
        _add_lora(cfg, model)
    params = dict(model.named_parameters())
    if isinstance(space, DenseSpace):
        space.check_model(params)
        DenseView(params, space).write(theta)
    else:
        space.check_model(params, {} if space_kind(cfg) == "lora" else model_fingerprint(model))
        SparseView(params, space).write(theta)
