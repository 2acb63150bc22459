"""A round's global update in scalar form, so that it can travel as a few floats.

ZO-SGD's update is linear in the projected gradients. With a seed list shared by all clients,
the FedAvg of the clients' replayed vectors is

    theta_new = decay * theta - sum_t coef_t * z(seed_t)
    coef_t    = sum_k p_k * lr_t * g_k^t * prod_{s=t+1}^{T_k-1} (1 - lr_s * wd)
    decay     = sum_k p_k * prod_{s=0}^{T_k-1} (1 - lr_s * wd)          (1 without weight decay)

where client k ran T_k steps (g_k^t = 0 beyond). `coef_t` and `decay` are computed in float64
and rounded to float32 (the wire format); server and clients then run the very same
`apply_aggregate`, so every party's copy of the global model is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedmeerkat.zo import draw_z, to_float32


@dataclass(frozen=True)
class Aggregate:
    round: int
    seeds: list[int]
    coefs: list[float]  # float32 values, one per seed
    decay: float = 1.0  # float32 value

    def is_identity_decay(self) -> bool:
        return self.decay == 1.0


def aggregate_scalars(
    round_idx: int,
    seeds: Sequence[int],
    scalars_per_client: Sequence[Sequence[float]],
    weights: Sequence[float],
    lrs: Sequence[float],
    weight_decay: float = 0.0,
) -> Aggregate:
    coefs = [0.0] * len(seeds)
    if not scalars_per_client:  # nobody usable: the model stays as it is
        return Aggregate(round_idx, list(seeds), coefs, 1.0)
    decay = 0.0
    for scalars, p in zip(scalars_per_client, weights, strict=True):
        keep = [1.0 - lrs[s] * weight_decay for s in range(len(scalars))]
        tail = 1.0  # product of the decay factors of the steps after t
        for t in reversed(range(len(scalars))):
            coefs[t] += p * lrs[t] * scalars[t] * tail
            tail *= keep[t]
        decay += p * tail
    return Aggregate(
        round=round_idx,
        seeds=list(seeds),
        coefs=[to_float32(c) for c in coefs],
        decay=1.0 if weight_decay == 0 else to_float32(decay),
    )


@torch.no_grad()
def apply_aggregate(
    theta: torch.Tensor, agg: Aggregate, on_step: Callable[[int, torch.Tensor], None] | None = None
) -> torch.Tensor:
    """theta <- decay*theta - sum_t coef_t z_t, in place, as separately rounded float32 ops,
    on theta's device (z is drawn there)."""
    if not agg.is_identity_decay():
        theta.mul_(torch.tensor(agg.decay, dtype=torch.float32))
    for t, (seed, coef) in enumerate(zip(agg.seeds, agg.coefs, strict=True)):
        z = draw_z(seed, theta.numel(), device=theta.device)
        if on_step is not None:
            on_step(t, z)
        if coef != 0.0:
            theta.sub_(z * torch.tensor(coef, dtype=torch.float32))
    return theta
