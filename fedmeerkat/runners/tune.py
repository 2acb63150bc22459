"""`lr=auto`: pick the learning rate on the validation split before the run starts.

Why: the lr that learns depends on the model, the task and the text length, and training
loss is a bad guide (a large lr lowers it by recalibrating the label bias while the ranking of
examples, ROC-AUC, gets worse). So each candidate lr trains a short centralized sparse-ZO path
from the untrained model on the run's training examples (the same batches and the same z
seeds for every candidate, so they differ in lr only), and the candidate with the best
validation metric (ROC-AUC with two classes, macro-F1 otherwise: evaluation.primary_metric)
wins; ties go to the smaller lr. Test data is never read.

Cost, printed before it starts: len(lr_auto_grid) x lr_auto_steps x 2 forwards of batch_size
examples, plus len(lr_auto_grid) + 1 evaluations of the validation set. With the defaults (4
candidates x 40 steps) that is 320 forwards, about as many as 160 steps of the run itself.

Bounded and short, so biased: a 40-step horizon favours a larger lr than a 1,000-step run
would want. The grid's top is kept at 1e-3 for that reason (at 1e-3, one client per round,
sparse ZO had cut ROC-AUC on rotten_tomatoes from 0.734 to 0.519 after 100 steps:
benchmarks/results/demo_sweep.json).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedmeerkat.config import RunConfig
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.models.scoring import evaluate
from fedmeerkat.runners.evaluation import eval_record, primary_metric
from fedmeerkat.runners.prepare import Prepared, SharedModel, log
from fedmeerkat.runners.run_folder import LR_SEARCH_FILE, RunFolder
from fedmeerkat.zo import zo_step
from fedmeerkat.zo.seeds import LR_SEARCH, mix


def search_cost(grid: list[float], steps: int, batch_size: int, val_examples: int) -> str:
    forwards = len(grid) * steps * 2
    return (f"{len(grid)} candidates x {steps} steps x 2 = {forwards} forwards of {batch_size} "
            f"examples, plus {len(grid) + 1} evaluations of {val_examples} validation examples")


def search_lr(*, view, theta0, train_loss: Callable[[np.ndarray], float], num_train: int,
              evaluate_val: Callable[[], dict[str, Any]], grid: list[float], steps: int,
              batch_size: int, eps: float, seed: int,
              log: Callable[[str], object]) -> dict[str, Any]:
    """Run the search; the model is left at theta0. Returns the record saved as
    lr_search.json: every candidate's validation metrics, the winner and the rule."""
    view.write(theta0)
    untrained = evaluate_val()
    candidates = []
    for lr in sorted(grid):
        theta = theta0.clone()
        pointer = ClientDataPointer(num_train, seed=mix(seed, LR_SEARCH, 0))
        losses = []
        for t in range(steps):
            ids = pointer.next_batch(batch_size)
            res = zo_step(view, theta, mix(seed, LR_SEARCH, 1, t), eps=eps, lr=lr,
                          loss_fn=functools.partial(train_loss, ids))
            losses.append(res.loss)
        view.write(theta)
        rec = evaluate_val()
        candidates.append({"lr": lr, "val_metric": primary_metric(rec),
                           "train_loss_last10": float(np.mean(losses[-10:])),
                           **{k: v for k, v in rec.items() if k.startswith("val_")}})
        log(f"lr=auto: lr {lr:g}: validation metric {candidates[-1]['val_metric']:.4f} "
            f"(untrained {primary_metric(untrained):.4f})")
    view.write(theta0)
    finite = [c for c in candidates if c["val_metric"] is not None
              and np.isfinite(c["val_metric"])]
    if not finite:
        raise ValueError("lr=auto: no candidate gave a validation metric")
    best = max(finite, key=lambda c: (c["val_metric"], -c["lr"]))
    base = primary_metric(untrained)
    return {"rule": "highest validation primary metric (ROC-AUC / macro-F1) after "
                    f"{steps} centralized steps from the untrained model; ties: smaller lr",
            "steps": steps, "batch_size": batch_size, "eps": eps, "grid": sorted(grid),
            "forwards": len(grid) * steps * 2, "untrained_val_metric": base,
            "candidates": candidates, "lr": best["lr"],
            "improves_on_untrained": base is None or best["val_metric"] > base}


def pick_lr(cfg: RunConfig, prep: Prepared, view: Any, theta0: torch.Tensor,
            folder: RunFolder) -> RunConfig:
    """lr=auto (runners/tune.py): search lr on the validation split, save the search as
    lr_search.json and the pick in config.toml (lr = the pick, lr_auto = false), so a
    resumed run trains with the same lr and never searches again. In simulation the search
    trains on the pooled training examples of all clients, a centralized pilot."""
    grid = [float(v) for v in cfg.lr_auto_grid]
    log(f"lr=auto: searching {', '.join(f'{v:g}' for v in sorted(grid))} on the validation "
        f"split: {search_cost(grid, cfg.lr_auto_steps, cfg.batch_size, len(prep.val_ids))}")
    start = time.time()
    model = SharedModel(prep, view)

    def evaluate_val() -> dict[str, Any]:
        val = evaluate(prep.scorer, prep.val_ids, prep.val_labels, cfg.eval_batch_size)
        return {k: v for k, v in eval_record(val, val).items() if k.startswith("val_")}

    found = search_lr(view=view, theta0=theta0, train_loss=model.loss,
                      num_train=len(prep.train_ids), evaluate_val=evaluate_val, grid=grid,
                      steps=cfg.lr_auto_steps, batch_size=cfg.batch_size, eps=cfg.eps,
                      seed=cfg.seed, log=log)
    found["wall_seconds"] = round(time.time() - start, 1)
    folder.write_json(LR_SEARCH_FILE, found)
    cfg = dataclasses.replace(cfg, lr=found["lr"], lr_auto=False)
    folder.write_config(cfg)
    note = "" if found["improves_on_untrained"] else (
        " (no candidate beat the untrained model on validation: the smallest harm is kept)")
    log(f"lr=auto: lr {found['lr']:g} ({found['forwards']} forwards, "
        f"{found['wall_seconds']:.0f} s){note}; saved in {folder.file(LR_SEARCH_FILE)}")
    return cfg
