"""`lr=auto`: pick the learning rate on the validation split before the run starts.

Why: the lr that learns depends on the model, the task and the text length, and training
loss is a bad guide (a large lr lowers it by recalibrating the label bias while the ranking of
examples, ROC-AUC, gets worse). So each candidate lr trains a short centralized sparse-ZO path
from the untrained model on the run's training examples (the same batches and the same z
seeds for every candidate, so they differ in lr only), and the candidate with the best
validation metric (ROC-AUC with two classes, macro-F1 otherwise: `primary_metric` below)
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

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.zo import zo_step
from fedmeerkat.zo.seeds import mix

_LR_SEARCH_TAG = 0x6C72  # seed-stream domain of the search's batches and z ("lr")


def primary_metric(rec: dict[str, Any], split: str = "val") -> float | None:
    """The one number model selection compares: ROC-AUC with two classes, macro-F1 with more
    (both threshold-free, so a pure recalibration cannot win), accuracy where neither exists."""
    for k in ("auc", "macro_f1", "accuracy"):
        v = rec.get(f"{split}_{k}")
        if v is not None:
            return float(v)
    return None


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
        pointer = ClientDataPointer(num_train, seed=mix(seed, _LR_SEARCH_TAG, 0))
        losses = []
        for t in range(steps):
            ids = pointer.next_batch(batch_size)
            res = zo_step(view, theta, mix(seed, _LR_SEARCH_TAG, 1, t), eps=eps, lr=lr,
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
