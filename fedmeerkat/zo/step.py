"""The two-point sparse ZO-SGD step (paper Eq. 1) and the replay of a client's virtual path.

The replay runs exactly the client's update, so a replayed trajectory equals the client's own
bit for bit (tests/test_zo_core.py). The server does not replay: it averages the paths in
closed form (federated/aggregate.py), and the tests check that against `replay_many`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmeerkat.zo.per_example import ExampleOffsets
from fedmeerkat.zo.perturb import draw_z, sgd_update, to_float32
from fedmeerkat.zo.sparse import SparseView


@dataclass(frozen=True)
class StepResult:
    g: float  # projected gradient, already rounded to float32 (what travels on the wire)
    loss_plus: float
    loss_minus: float

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


@torch.no_grad()
def zo_step(
    view: SparseView,
    theta: torch.Tensor,
    seed: int,
    *,
    eps: float,
    lr: float,
    loss_fn: Callable[[], float],
    weight_decay: float = 0.0,
    update: Callable[[torch.Tensor, torch.Tensor, float, float], object] | None = None,
) -> StepResult:
    """One step: f(theta+eps z), f(theta-eps z), g, theta -= lr*g*z (in place), model synced.

    `theta` (float32) lives on the model's device: z is drawn there, and the only host-device
    traffic is reading the two losses. Outside the forwards the step's op count does not depend
    on how many matrices the mask touches: the z draw, two perturbations, the update and three
    one-op writes.
    `loss_fn` evaluates the loss of the model as currently written, on a batch the caller fixed.
    `update(theta, z, g, lr)` replaces plain SGD for methods with extra terms (FedDyn); a
    server that replays such a client must run the same function (FedDyn's replay_feddyn).
    """
    z = draw_z(seed, theta.numel(), device=theta.device)  # on the model's device, no copies
    view.write(theta + eps * z)
    loss_plus = float(loss_fn())
    view.write(theta - eps * z)
    loss_minus = float(loss_fn())
    g = to_float32((loss_plus - loss_minus) / (2.0 * eps))
    if update is None:
        sgd_update(theta, z, g, lr, weight_decay)
    else:
        update(theta, z, g, lr)
    view.write(theta)
    return StepResult(g=g, loss_plus=loss_plus, loss_minus=loss_minus)


@torch.no_grad()
def zo_step_private(
    view: SparseView,
    theta: torch.Tensor,
    seed: int,
    *,
    eps: float,
    lr: float,
    losses_fn: Callable[[], np.ndarray],
    privatize: Callable[[np.ndarray], float],
    weight_decay: float = 0.0,
) -> StepResult:
    """`zo_step` with per-example losses: the same two forwards give each example's
    difference d_i = (f_i(theta+eps z) - f_i(theta-eps z)) / 2eps, and `privatize(d)` makes the
    step's scalar (federated/dp.py: clip, sum, secret noise, / expected batch). `losses_fn`
    returns the per-example losses of the batch the caller fixed (empty: no forward, loss 0)."""
    z = draw_z(seed, theta.numel(), device=theta.device)
    view.write(theta + eps * z)
    plus = np.asarray(losses_fn(), dtype=np.float64)
    view.write(theta - eps * z)
    minus = np.asarray(losses_fn(), dtype=np.float64)
    g = to_float32(privatize((plus - minus) / (2.0 * eps)))
    sgd_update(theta, z, g, lr, weight_decay)
    view.write(theta)
    return StepResult(g=g, loss_plus=float(plus.mean()) if plus.size else 0.0,
                      loss_minus=float(minus.mean()) if minus.size else 0.0)


ESTIMATORS = ("two-point", "one-sided", "per-example")


def forwards_per_direction(estimator: str, perturbations: int) -> float:
    """Forward passes per seeded direction (per uploaded scalar)."""
    if estimator == "two-point":
        return 2.0
    if estimator == "one-sided":
        return (perturbations + 1) / perturbations
    if estimator == "per-example":  # the step's two forwards carry all P directions
        return 2.0 / perturbations
    raise ValueError(f"unknown zo_estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


@torch.no_grad()
def zo_multi_step(
    view: SparseView,
    theta: torch.Tensor,
    seeds: Sequence[int],
    *,
    eps: float,
    lrs: Sequence[float],
    loss_fn: Callable[[], Any],
    estimator: str = "two-point",
    weight_decay: float = 0.0,
    offsets: ExampleOffsets | None = None,
) -> list[StepResult]:
    """One step along P = len(seeds) directions, all estimated at the same theta on the same
    batch, then applied as P plain SGD updates in seed order (lrs: one per direction, the
    step's lr / P, so the update is lr times the mean of the P estimates).

    estimator "two-point": g_i = (f(theta+eps z_i) - f(theta-eps z_i)) / (2 eps), 2P forwards
    (MeZO's n-SPSA; DeComFL's P perturbations). "one-sided": g_i = (f(theta+eps z_i) - f(theta))
    / eps with the one baseline f(theta) shared by the P directions, P+1 forwards (FZOO's
    batched one-sided estimate, without its step normalisation). "per-example": two forwards
    in all; example i of the batch is scored at theta +- eps z_(i mod P) through `offsets`
    (zo.per_example), so `loss_fn` returns each example's loss, and g_j is the mean of
    (f_i(theta+eps z_j) - f_i(theta-eps z_j)) / (2 eps) over direction j's examples (GRZO's
    one perturbation per example, Tan et al. 2026). The batch must be a multiple of P, and the
    model must hold theta as written (the hooks add to it; every step leaves it so).

    Each direction uploads its own scalar, and applying the P updates one after another is
    exactly what a replay does with P consecutive seeds (`replay_many`), so the protocol, the
    virtual path and the scalar downlink stay those of plain Meerkat.
    Memory: theta, its updated copy and one z, each nnz floats (per-example: all P z at once).
    """
    if len(seeds) != len(lrs) or not seeds:
        raise ValueError(f"{len(seeds)} seeds for {len(lrs)} learning rates")
    forwards_per_direction(estimator, len(seeds))  # checks the name
    if estimator == "per-example":
        if offsets is None:
            raise ValueError("the per-example estimator needs the model's ExampleOffsets")
        return _per_example_step(view, theta, seeds, eps=eps, lrs=lrs, losses_fn=loss_fn,
                                 offsets=offsets, weight_decay=weight_decay)
    new = theta.clone()
    base = None
    if estimator == "one-sided":
        view.write(theta)
        base = float(loss_fn())
    out = []
    for seed, lr in zip(seeds, lrs, strict=True):
        z = draw_z(seed, theta.numel(), device=theta.device)
        view.write(theta + eps * z)
        loss_plus = float(loss_fn())
        if base is None:
            view.write(theta - eps * z)
            loss_minus = float(loss_fn())
            g = to_float32((loss_plus - loss_minus) / (2.0 * eps))
        else:
            loss_minus = base
            g = to_float32((loss_plus - base) / eps)
        sgd_update(new, z, g, lr, weight_decay)
        out.append(StepResult(g=g, loss_plus=loss_plus, loss_minus=loss_minus))
    theta.copy_(new)
    view.write(theta)
    return out


def _per_example_step(view: SparseView, theta: torch.Tensor, seeds: Sequence[int], *, eps: float,
                      lrs: Sequence[float], losses_fn: Callable[[], Any],
                      offsets: ExampleOffsets, weight_decay: float) -> list[StepResult]:
    # the hooks add the offsets to the weights as written: the model must hold theta, as
    # run_client leaves it after syncing and every step leaves it after its update
    p = len(seeds)
    zs = torch.stack([draw_z(seed, theta.numel(), device=theta.device) for seed in seeds])
    # one [P, nnz] buffer for both sides (negation is exact: -(eps z) == (-eps) z bit for bit)
    shift = eps * zs
    with offsets.applied(shift):
        plus = np.asarray(losses_fn(), dtype=np.float64)
    with offsets.applied(shift.neg_()):
        minus = np.asarray(losses_fn(), dtype=np.float64)
    del shift
    if plus.size % p or plus.size == 0:
        raise ValueError(f"a batch of {plus.size} examples for {p} per-example directions "
                         "(batch_size must be a multiple of perturbations)")
    # example i belongs to direction i mod P
    diff = ((plus - minus) / (2.0 * eps)).reshape(-1, p)
    up, down = plus.reshape(-1, p).mean(axis=0), minus.reshape(-1, p).mean(axis=0)
    out = []
    for j, lr in enumerate(lrs):
        g = to_float32(float(diff[:, j].mean()))
        sgd_update(theta, zs[j], g, lr, weight_decay)  # the order replay applies them in
        out.append(StepResult(g=g, loss_plus=float(up[j]), loss_minus=float(down[j])))
    view.write(theta)
    return out


def _lr_at(lr: float | Sequence[float], t: int) -> float:
    return float(lr) if isinstance(lr, int | float) else float(lr[t])


@torch.no_grad()
def replay(
    theta0: torch.Tensor,
    seeds: Sequence[int],
    scalars: Sequence[float],
    lr: float | Sequence[float],
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """A client's final sparse vector from its start, seeds and uploaded scalars (no model).
    Runs on theta0's device."""
    return replay_many(theta0, seeds, [scalars], lr, weight_decay=weight_decay)[0]


@torch.no_grad()
def replay_many(
    theta0: torch.Tensor,
    seeds: Sequence[int],
    scalars_per_client: Sequence[Sequence[float]],
    lr: float | Sequence[float],
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    weight_decay: float = 0.0,
) -> list[torch.Tensor]:
    """Replay several clients that share the seed list; z is drawn once per step for all.

    Client k ran len(scalars_per_client[k]) <= len(seeds) steps, using seeds[:len]. `on_step(t,
    z)` lets analytics (GradIP) reuse each drawn z. lr is one value or one per step.
    """
    thetas = [theta0.clone() for _ in scalars_per_client]
    steps = max((len(s) for s in scalars_per_client), default=0)
    if steps > len(seeds):
        raise ValueError(f"a client reported {steps} scalars for {len(seeds)} seeds")
    for t in range(steps):
        z = draw_z(seeds[t], theta0.numel(), device=theta0.device)
        if on_step is not None:
            on_step(t, z)
        for theta, scalars in zip(thetas, scalars_per_client, strict=True):
            if t < len(scalars):
                sgd_update(theta, z, float(scalars[t]), _lr_at(lr, t), weight_decay)
    return thetas


def eps_resolution_warning(theta: torch.Tensor, eps: float, dtype: torch.dtype) -> str | None:
    """A warning when a model of `dtype` cannot resolve eps*z at typical masked weight sizes.

    The model receives `theta ± eps*z` rounded to its dtype (the fp32 master copy stays
    exact). When eps is below half the dtype's spacing at the median |w|, most perturbations
    of a typical weight round away and the two losses compare nearly the same model.
    """
    if dtype == torch.float32 or theta.numel() == 0:
        return None
    med = float(theta.detach().abs().float().median())
    if med == 0.0:
        return None
    spacing = float(torch.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(med))
    if eps >= spacing / 2:
        return None
    return (f"eps={eps:g} is below half the {str(dtype).removeprefix('torch.')} spacing "
            f"({spacing:.2g}) at the median masked |w| ({med:.2g}): most perturbations round "
            f"away in the model. Raise eps to at least {spacing:.2g} or use dtype=float32.")
