"""Seeded train/test splitting and subsampling shared by every task source.

Every random choice here uses its own numpy Generator derived from (split_seed, purpose), so
changing, say, `max_test` never changes which examples land in the training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Purpose tags for the seed sequence (fixed: changing them changes every split).
_SPLIT, _TRAIN_SUB, _TEST_SUB, _VAL = 0, 1, 2, 3


def _rng(split_seed: int, purpose: int) -> np.random.Generator:
    if split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    return np.random.default_rng([split_seed, purpose])


def stratified_split(
    labels: Sequence[int], test_fraction: float, split_seed: int, *, purpose: int = _SPLIT
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each in shuffled order, with about `test_fraction` of every class
    in test. A class with at least two examples keeps at least one on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = _rng(split_seed, purpose)
    y = np.asarray(labels, dtype=np.int64)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr = rng.permutation(np.concatenate(train)) if train else np.zeros(0, np.int64)
    te = rng.permutation(np.concatenate(test)) if test else np.zeros(0, np.int64)
    return tr, te


def validation_split(
    labels: Sequence[int], val_fraction: float, max_val: int | None, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a training pool: a seeded, stratified validation share of
    `val_fraction`, at most `max_val` examples (None or 0: no cap). The cap lowers the share
    rather than dropping examples, so whatever is not validation stays training data. Its own
    seed stream: the same pool and seed always give the same validation set."""
    n = len(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    size = int(round(n * val_fraction))
    if max_val:
        size = min(size, max_val)
    if size == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    if n - size < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training data of {n} examples")
    return stratified_split(labels, size / n, split_seed, purpose=_VAL)


def subsample_indices(n: int, cap: int | None, split_seed: int, which: str) -> np.ndarray | None:
    """Seeded random subset of range(n) of size `cap` (None when no subsampling is needed).

    The subset keeps the source order; it is a seed-defined sample, not the first `cap` rows
    (hub files are often sorted by label)."""
    if cap is None or cap >= n:
        return None
    if cap < 1:
        raise ValueError(f"max_{which} must be >= 1, got {cap}")
    rng = _rng(split_seed, _TRAIN_SUB if which == "train" else _TEST_SUB)
    return np.sort(rng.choice(n, size=cap, replace=False))


def take(items: Sequence[T], idx: np.ndarray | None) -> list[T]:
    return list(items) if idx is None else [items[int(i)] for i in idx]
