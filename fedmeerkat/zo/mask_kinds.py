"""Other ways to pick the static mask (the paper's mask baselines, Tables 10, 11, 20, 21).

All at the same density u over the same eligible set as the calibration mask, with the same
exact global count k = max(1, round(u * eligible_numel)):
  - `weight_magnitude_mask`: the k eligible weights of largest |w| (exact global top-k).
  - `random_mask`: k eligible coordinates uniformly at random without replacement, seeded.
    (Not `normal_() < ratio`, a known bug of earlier code that keeps about half the weights.)
  - `union_masks`: the union of several masks over the same tensors (UnionMask: one mask per
    client, merged by the server); its density is u or more.
The task-data mask is `compute_mask` on task text instead of general text. None of these
carries a GradIP reference gradient; `masked_mean_gradient` adds one afterwards.
Pure torch (plus numpy for the seeded sampling); no federated code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from fedmeerkat.zo.calibration import topk_global
from fedmeerkat.zo.mask import DEFAULT_ELIGIBLE, SparseMask, eligible_parameters
from fedmeerkat.zo.seeds import RANDOM_MASK

# Seed-sequence tag of the random mask's numpy Generator (fixed: changing it changes the masks).


def mask_size(density: float, eligible_numel: int) -> int:
    """k = max(1, round(density * eligible_numel)), the count every mask kind keeps."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * eligible_numel))


class _AbsScores(Mapping):
    """|w| per tensor, computed on access, so only one float32 copy is alive at a time."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]]):
        self._params = dict(params)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._params[name].detach().float().abs()  # on the model's device

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def _info(kind: str, density: float, rule: str, meta: Mapping[str, str] | None) -> dict[str, str]:
    info = {"mask_kind": kind, "density": repr(density), "rule": rule}
    info.update(meta or {})
    return info


def weight_magnitude_mask(
    model: torch.nn.Module,
    *,
    density: float = 1e-3,
    rule: str = DEFAULT_ELIGIBLE,
    meta: Mapping[str, str] | None = None,
) -> SparseMask:
    """The k eligible weights of largest absolute value (ties broken by torch.topk)."""
    params = eligible_parameters(model.named_parameters(), rule)
    k = mask_size(density, sum(p.numel() for _, p in params))
    chosen = topk_global(_AbsScores(params), k)
    return SparseMask([n for n, _ in params], [chosen[n] for n, _ in params],
                      [tuple(p.shape) for _, p in params],
                      meta=_info("weight-magnitude", density, rule, meta))


def random_mask(
    model: torch.nn.Module,
    *,
    density: float = 1e-3,
    seed: int = 0,
    rule: str = DEFAULT_ELIGIBLE,
    meta: Mapping[str, str] | None = None,
) -> SparseMask:
    """Exactly k eligible coordinates, uniform over all k-subsets, from `seed`.

    Global flat positions over the concatenated eligible tensors are drawn without replacement
    (`_distinct_positions`, memory O(k)) and mapped to tensors by their offsets; above density
    1/2 the excluded positions are drawn instead. No random tensor of the eligible size is made.
    """
    params = eligible_parameters(model.named_parameters(), rule)
    sizes = [p.numel() for _, p in params]
    total = sum(sizes)
    k = mask_size(density, total)
    rng = np.random.default_rng([RANDOM_MASK, seed])
    complement = k > total // 2
    pos = np.sort(_distinct_positions(rng, total, total - k if complement else k))
    offsets = np.cumsum([0, *sizes])
    cuts = np.searchsorted(pos, offsets)
    indices = []
    for i, size in enumerate(sizes):
        local = pos[cuts[i]:cuts[i + 1]] - offsets[i]
        if complement:
            keep = np.ones(size, dtype=bool)
            keep[local] = False
            local = np.flatnonzero(keep)
        indices.append(torch.from_numpy(local.astype(np.int64)))
    info = _info("random", density, rule, meta)
    info["seed"] = str(seed)
    return SparseMask([n for n, _ in params], indices, [tuple(p.shape) for _, p in params],
                      meta=info)


def _distinct_positions(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """The first k distinct values of a stream of uniform draws from range(total): a uniform
    random k-subset (sequential sampling without replacement). Meant for k <= total / 2, where
    fewer than 2k draws are needed on average."""
    chosen = np.zeros(0, dtype=np.int64)
    while len(chosen) < k:
        need = k - len(chosen)
        cand = np.concatenate([chosen, rng.integers(0, total, size=need + need // 4 + 16)])
        _, first = np.unique(cand, return_index=True)
        chosen = cand[np.sort(first)[:k]]  # keeps draw order, so earlier picks stay picked
    return chosen


def union_masks(masks: Sequence[SparseMask], meta: Mapping[str, str] | None = None) -> SparseMask:
    """Coordinate-wise union of masks over the same tensors (same names, order and shapes).

    Metadata: mask_kind=union, union_density (the union's share of the eligible weights),
    union_parts (how many masks) and part_nnz (their sizes, comma separated). The union carries
    no calibration gradient (the parts' gradients are not defined on each other's indices).
    """
    if not masks:
        raise ValueError("union of no masks")
    first = masks[0]
    for m in masks[1:]:
        if m.names != first.names or [tuple(s) for s in m.shapes] != [tuple(s) for s in first.shapes]:
            raise ValueError("masks to unite cover different tensors")
    indices = [torch.unique(torch.cat([m.indices[i] for m in masks])) for i in range(len(first.names))]
    union = SparseMask(list(first.names), indices, [tuple(s) for s in first.shapes])
    info = {k: v for k, v in first.meta.items() if k not in ("num_sequences", "density")}
    info.update({"mask_kind": "union", "union_density": repr(union.density),
                 "union_parts": str(len(masks)), "part_nnz": ",".join(str(m.nnz) for m in masks)})
    if "density" in first.meta:
        info["density"] = first.meta["density"]
    info.update(meta or {})
    union.meta = info
    return union
