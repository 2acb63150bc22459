"""Seeded Gaussian directions for the masked coordinates, and the update that uses them.

z comes from `zo.rng`: a counter-based generator defined by integer arithmetic and a stored
table, drawn directly on the device that uses it, with the same bits on every CPU and GPU.
"""

from __future__ import annotations

import torch

from fedmeerkat.zo.rng import draw_z

__all__ = ["draw_z", "sgd_update", "to_float32"]


def sgd_update(
    theta: torch.Tensor, z: torch.Tensor, g: float, lr: float, weight_decay: float = 0.0
) -> torch.Tensor:
    """theta <- theta*(1 - lr*wd) - lr*g*z, in place, as separately rounded float32 ops.

    One fused `add_(z, alpha=...)` may compile to an FMA on some CPUs/GPUs and not others;
    a multiply then a subtract are each correctly rounded IEEE ops, so client and server agree
    bit for bit on any hardware. Weight decay acts on the masked weights only (theta).
    """
    if weight_decay:
        theta.mul_(torch.tensor(1.0 - lr * weight_decay, dtype=torch.float32))
    theta.sub_(z * torch.tensor(lr * g, dtype=torch.float32))
    return theta


def to_float32(x: float) -> float:
    """Round a Python float to the nearest float32 (the wire format of a projected gradient)."""
    return float(torch.tensor(x, dtype=torch.float32).item())
