"""Threshold-free metrics beside accuracy (models/scoring.py): exact values on hand-made arrays,
brute-force agreement on random ones, and their place in every evaluation's output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedmeerkat.models.scoring import (
    EvalResult,
    best_shift_accuracy,
    format_metrics,
    label_metrics,
    macro_f1,
    roc_auc,
)


def test_roc_auc_counts_ties_as_half():
    # positives 0.35, 0.8, 0.4 vs negatives 0.1, 0.4: pairs won 1,0,1,1,1 and one tie (0.4, 0.4)
    assert roc_auc([0.1, 0.4, 0.35, 0.8, 0.4], [0, 0, 1, 1, 1]) == pytest.approx(4.5 / 6)
    assert roc_auc([1, 2, 3], [0, 1, 1]) == 1.0 and roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # constant scores: chance
    assert roc_auc([0.2, 0.9], [1, 1]) is None  # one class: undefined
    with pytest.raises(ValueError, match="labels in"):
        roc_auc([0.1, 0.2], [0, 2])


def test_roc_auc_equals_pairwise_count_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 6, size=30).astype(float)  # many ties
        y = rng.integers(0, 2, size=30)
        pos, neg = s[y == 1], s[y == 0]
        pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)]
        assert roc_auc(s, y) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_macro_f1_by_hand():
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2 predicted once,
    # never true -> 0; class 3 absent from both -> left out
    pred, y = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert macro_f1(pred, y, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(pred, y, 4) == macro_f1(pred, y, 3)
    # one class predicted for everything: accuracy 0.8, macro-F1 only (8/9 + 0) / 2
    assert macro_f1([1] * 10, [1] * 8 + [0] * 2, 2) == pytest.approx((16 / 18) / 2)


def test_best_shift_accuracy_by_hand_and_ties_stay_together():
    # cuts: all 1 -> 3/5; after -2 -> 4/5; after the tied -1s -> 4/5; after 0.5 -> 3/5; all 0 -> 2/5
    assert best_shift_accuracy([-2, -1, -1, 0.5, 3], [0, 1, 0, 1, 1]) == pytest.approx(0.8)
    # a cut between the two tied margins would give 1.0; no bias can do that
    assert best_shift_accuracy([0, 0, 1], [0, 1, 1]) == pytest.approx(2 / 3)
    # a pure bias error: every margin 1 too high; argmax gets 0.5, one shift fixes it all
    m, y = np.array([0.5, 0.8, 1.2, 1.6]), np.array([0, 0, 1, 1])
    assert ((m > 0) == y).mean() == 0.5 and best_shift_accuracy(m, y) == 1.0


def test_best_shift_accuracy_equals_brute_force_and_bounds_argmax_accuracy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = np.round(rng.normal(size=25), 1)  # ties
        y = rng.integers(0, 2, size=25)
        cuts = np.r_[m.min() - 1, (np.unique(m)[1:] + np.unique(m)[:-1]) / 2, m.max() + 1]
        brute = max(((m > c) == y).mean() for c in cuts)
        assert best_shift_accuracy(m, y) == pytest.approx(brute)
        assert best_shift_accuracy(m, y) >= ((m > 0) == y).mean()


def test_label_metrics_two_and_more_classes():
    logits = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [3.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1])
    out = label_metrics(logits, y)
    # margins -1, 2, 0, -2; argmax (ties -> class 0) predicts 0, 1, 0, 0
    assert out["auc"] == pytest.approx(roc_auc([-1, 2, 0, -2], y))
    assert out["macro_f1"] == pytest.approx(macro_f1([0, 1, 0, 0], y, 2))
    assert out["best_shift_accuracy"] == pytest.approx(best_shift_accuracy([-1, 2, 0, -2], y))
    three = label_metrics(np.eye(3)[[0, 1, 2, 2]], [0, 1, 2, 1])
    assert three["auc"] is None and three["best_shift_accuracy"] is None
    assert three["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    res = EvalResult(0.5, 0.7, [0.5, 0.5], 4, **out)
    rec = res.metrics("test_")
    assert set(rec) == {"test_auc", "test_macro_f1", "test_best_shift_accuracy"}
    assert format_metrics(rec).startswith("AUC ") and "macro-F1" in format_metrics(rec)
    assert format_metrics({"test_macro_f1": 0.25}) == "macro-F1 0.2500"
