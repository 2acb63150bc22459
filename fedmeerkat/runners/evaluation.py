"""Evaluation: the records a run writes (metrics.jsonl lines, summary.json entries) and the
evaluators a session asks for them, whatever the transport.

    evaluator(theta) -> record     # eval_record's keys: test_* always, val_* or None

`LocalEvaluator` writes theta into a local model and scores the run's validation and test
sets (the simulation; the deployed server with evaluation="server"); the deployed server's
sites evaluator (fedmeerkat.deploy.server) asks the sites and merges their logits. A record
is the same dict either way, so the session, the summary and the reports need not know which.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from fedmeerkat.models.scoring import EvalResult, evaluate, format_metrics
from fedmeerkat.runners.prepare import Prepared


def primary_metric(rec: dict[str, Any], split: str = "val") -> float | None:
    """The one number model selection compares: ROC-AUC with two classes, macro-F1 with more
    (both threshold-free, so a pure recalibration cannot win), accuracy where neither exists."""
    for k in ("auc", "macro_f1", "accuracy"):
        v = rec.get(f"{split}_{k}")
        if v is not None:
            return float(v)
    return None


class Evaluator(Protocol):
    def __call__(self, theta: torch.Tensor) -> dict[str, Any]:
        """The model at `theta` (the server's vector) as a metrics.jsonl record's entries."""
        ...


class LocalEvaluator:
    """Scores `theta` on a local copy of the model: validation (if carved) and test."""

    def __init__(self, prep: Prepared, view: Any, batch_size: int):
        self.prep, self.view, self.batch_size = prep, view, batch_size

    def __call__(self, theta: torch.Tensor) -> dict[str, Any]:
        self.view.write(theta.to(self.view.device))
        return evaluate_splits(self.prep, self.batch_size)

    def reuse(self, initial: dict[str, Any]) -> dict[str, Any]:
        """Round 0 measured by an earlier run of the same model on the same sets (shared by
        experiments/claims.py and benchmarks/learning.py between runs that differ only in
        method, lr or mask), checked to be of this run's evaluation sets."""
        want = {"test_examples": len(self.prep.test_ids), "val_examples": len(self.prep.val_ids)}
        if any(initial.get(k) != v for k, v in want.items()):
            raise ValueError(f"the given initial evaluation has {initial.get('test_examples')} "
                             f"test / {initial.get('val_examples')} validation examples, this "
                             f"run {want['test_examples']} / {want['val_examples']}")
        return evaluated_part(initial)


def evaluate_splits(prep: Prepared, batch_size: int) -> dict[str, Any]:
    """The model as it is now on validation (if carved) and test: a metrics.jsonl record."""
    test = evaluate(prep.scorer, prep.test_ids, prep.test_labels, batch_size)
    val = (evaluate(prep.scorer, prep.val_ids, prep.val_labels, batch_size)
           if prep.val_ids else None)
    return eval_record(test, val)


def _fmt(share: list[float]) -> str:
    return "/".join(f"{s:.2f}" for s in share)


# ---- evaluation records (metrics.jsonl, summary.json); the deployed server uses them too -----
THRESHOLD_FREE = ("auc", "macro_f1", "best_shift_accuracy")  # models.scoring.label_metrics
SPLITS = ("test", "val")


def test_record(res: EvalResult) -> dict[str, Any]:
    """The test entries of an evaluation (metrics.jsonl, `fedmeerkat eval`)."""
    return {"test_accuracy": res.accuracy, "test_loss": res.loss,
            "predicted_share": res.predicted_share, **res.metrics("test_")}


def eval_record(res: EvalResult, val: EvalResult | None = None) -> dict[str, Any]:
    """An evaluation's entries of a metrics.jsonl line: test_* always, val_* when the run has a
    validation set (None otherwise, so every line has the same keys)."""
    out: dict[str, Any] = {**test_record(res), "test_examples": res.num_examples}
    out.update({"val_accuracy": None if val is None else val.accuracy,
                "val_loss": None if val is None else val.loss,
                **({f"val_{k}": None for k in THRESHOLD_FREE} if val is None
                   else val.metrics("val_")),
                "val_examples": 0 if val is None else val.num_examples})
    return out


EVAL_KEYS = ("test_accuracy", "test_loss", "predicted_share", "test_examples", "val_accuracy",
             "val_loss", "val_examples", *(f"{s}_{k}" for s in SPLITS for k in THRESHOLD_FREE))


def no_evaluation() -> dict[str, Any]:
    """The entries of an evaluation that could not be made (a deployed run whose evaluating
    sites all failed to answer usably): every metric None, as in a round not evaluated."""
    return dict.fromkeys(EVAL_KEYS)


def evaluated_part(rec: dict[str, Any]) -> dict[str, Any]:
    """The evaluation entries of a metrics line (older run folders lack some: None)."""
    return {k: rec.get(k) for k in EVAL_KEYS}


def eval_from_record(rec: dict[str, Any], n: int) -> EvalResult:
    """The test EvalResult a metrics line holds (run folders older than a metric give None)."""
    return EvalResult(rec["test_accuracy"], rec.get("test_loss", math.nan),
                      rec.get("predicted_share", []), n,
                      **{k: rec.get(f"test_{k}") for k in THRESHOLD_FREE})


def format_evaluation(rec: dict[str, Any]) -> str:
    """'test accuracy 0.586 (predicted share 0.02/0.98; AUC ...); validation AUC ...'"""
    if rec.get("test_accuracy") is None:
        return "no evaluation (test metrics missing)"
    text = (f"test accuracy {rec['test_accuracy']:.4f} (predicted share "
            f"{_fmt(rec['predicted_share'] or [])}; {format_metrics(rec)})")
    if rec.get("val_accuracy") is not None:
        text += (f"; validation accuracy {rec['val_accuracy']:.4f}, "
                 f"{format_metrics(rec, 'val_')}")
    return text


def best_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluated round with the best validation metric (primary_metric; the earliest on a
    tie) and its test metrics: selection never reads test. Empty without a validation set."""
    scored = [(primary_metric(r), -r["round"], r) for r in records
              if r.get("test_accuracy") is not None and primary_metric(r) is not None]
    if not scored:
        return {}
    _, _, r = max(scored, key=lambda x: (x[0], x[1]))
    return {"best_val_round": r["round"], "best_val_metric": primary_metric(r),
            **{f"best_val_round_test_{k}": r.get(f"test_{k}") for k in ("accuracy", *THRESHOLD_FREE)}}


def summary_metrics(initial: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """initial_* and final_* threshold-free test metrics (and initial_val_* / final_val_*
    with their validation accuracy) for summary.json."""
    out = {f"{when}_{k}": rec.get(f"test_{k}") for when, rec in (("initial", initial),
                                                                ("final", final))
           for k in THRESHOLD_FREE}
    out.update({f"{when}_val_{k}": rec.get(f"val_{k}") for when, rec in (("initial", initial),
                                                                        ("final", final))
                for k in ("accuracy", *THRESHOLD_FREE)})
    return out


# A change this small in the threshold-free metric is not called learning: on 1,000 test
# examples the spread of ROC-AUC between seeds of one setting is about this size.
GAIN_MARGIN = 0.01


def gain_verdict(initial: dict[str, Any], final: dict[str, Any]) -> str:
    """One line: is the change from the untrained model learning or recalibration? Learning
    raises the threshold-free test metric (ROC-AUC / macro-F1, primary_metric); recalibration
    raises accuracy alone (a shift of the label bias), which they do not see."""
    if initial.get("test_accuracy") is None or final.get("test_accuracy") is None:
        return "no evaluation of the initial or the final model: no verdict"
    a, b = primary_metric(initial, "test"), primary_metric(final, "test")
    d_acc = final["test_accuracy"] - initial["test_accuracy"]
    if a is None or b is None:
        return "no threshold-free metric: learning cannot be told from recalibration"
    name = "ROC-AUC" if initial.get("test_auc") is not None else "macro-F1"
    if b - a >= GAIN_MARGIN:
        return f"learning: test {name} {a:.3f} -> {b:.3f} (+{b - a:.3f})"
    if d_acc >= GAIN_MARGIN:
        return (f"recalibration, not learning: test accuracy +{d_acc:.3f} but {name} "
                f"{a:.3f} -> {b:.3f}")
    return f"no gain: test {name} {a:.3f} -> {b:.3f}, accuracy {d_acc:+.3f}"
