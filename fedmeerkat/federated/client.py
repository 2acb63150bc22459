"""Client logic: get the global model, run the round's plan on local data, return scalars.

A client is its data (global example ids), its data pointer and, in the scalar-downlink mode,
its copy of the global sparse vector (shared with the clients synced to the same round). The
runner lends it the one shared model through `LocalModel`, which keeps memory flat in the
number of clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated.aggregate import Aggregate, apply_aggregate
from fedmeerkat.federated.dp import DPSettings, PrivateSteps
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.zo import SparseView, StepResult, zo_multi_step, zo_step
from fedmeerkat.zo.per_example import ExampleOffsets
from fedmeerkat.zo.step import zo_step_private


class LocalModel(Protocol):
    """The model as a client sees it: the masked coordinates, and a loss on its examples."""

    view: SparseView

    def loss(self, example_ids: np.ndarray) -> float: ...

    def example_losses(self, example_ids: np.ndarray) -> np.ndarray:
        """Each example's loss (differentially private clients, federated/dp.py; the
        per-example estimator)."""
        ...

    def example_offsets(self) -> ExampleOffsets:
        """The model's per-example perturbation hooks (zo_estimator=per-example only)."""
        ...


@dataclass
class ClientState:
    client_id: int
    example_ids: np.ndarray  # indices into the task's training examples
    pointer: ClientDataPointer
    theta: torch.Tensor | None = None  # global vector of round `synced` (scalar downlink only)
    synced: int = 0
    # method-specific client state that persists across rounds (e.g. FedDyn's h_k), checkpointed
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(len(self.example_ids))


def sync_client(state: ClientState, plan: RoundPlan,
                apply: Callable[[torch.Tensor, Aggregate], object] = apply_aggregate,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The global sparse vector of round plan.round-1, from the vector or from aggregates
    (`apply` applies one aggregate in place; dense methods pass their per-tensor version).

    With `device`, the vector and the client's own copy live there (the model's device), so
    catch-up draws z where it is used. The client's copy is never changed in place (catch-up
    works on a new tensor), so clients at the same round may share one (`share_copies`)."""
    if plan.theta is not None:
        theta = plan.theta if device is None else plan.theta.to(device)
        if state.theta is not None:
            state.theta = theta.clone()
            state.synced = plan.round - 1
        return theta
    if state.theta is None:
        raise ValueError(f"client {state.client_id}: plan carries no vector and the client "
                         "holds no copy of the model")
    # aggregates the client already applied are skipped: the server counts a client as synced
    # only once its reply arrived, so after a lost reply it sends some of them again
    todo = [a for a in plan.catchup if a.round > state.synced]
    if [a.round for a in todo] != list(range(state.synced + 1, plan.round)):
        raise ValueError(f"client {state.client_id} holds round {state.synced}; cannot reach "
                         f"round {plan.round - 1} with aggregates of rounds "
                         f"{[a.round for a in plan.catchup]}")
    # copy on write: another client may hold this very tensor (a resume may also bring it from
    # the CPU)
    theta = state.theta.to(device if device is not None else state.theta.device, copy=True)
    for agg in todo:
        apply(theta, agg)
    state.theta = theta
    state.synced = plan.round - 1
    return state.theta


def share_copies(states: list[ClientState],
                 pool: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Let clients that hold the global vector of the same round share one tensor, so a
    simulation's memory does not grow with K (each client's copy is the global vector of the
    round it last synced, bit-identical across those clients). Checks the equality it relies
    on. `pool` (round -> the shared tensor, returned) carries the copies already shared, so a
    runner can share each client's copy right after its turn without comparing all pairs."""
    by_round: dict[int, torch.Tensor] = {} if pool is None else pool
    for s in states:
        if s.theta is None:
            continue
        first = by_round.setdefault(s.synced, s.theta)
        if s.theta is not first:
            if not torch.equal(s.theta, first.to(s.theta.device)):
                raise RuntimeError(f"client {s.client_id} holds another vector for round "
                                   f"{s.synced} than its peers")
            s.theta = first
    return by_round


def check_steps(plan: RoundPlan, lr: Sequence[float]) -> None:
    """A plan's step count fits its seeds and the learning rates derived for them."""
    if plan.num_steps > len(plan.seeds) or plan.num_steps > len(lr):
        raise ValueError(f"plan asks for {plan.num_steps} steps with {len(plan.seeds)} seeds")


# (index t of the step's first seed, the loss on the step's batch: its mean, or each example's
# with DP) -> one result per seed
Step = Callable[[int, Callable[[], Any]], list[StepResult]]


def run_steps(state: ClientState, plan: RoundPlan, model: LocalModel, step: Step, *,
              batch_size: int, seeds_per_step: int = 1,
              on_step: Callable[[StepResult], object] | None = None,
              dp: PrivateSteps | None = None, per_example: bool = False) -> ClientReply:
    """The round's loop of every ZO client, whatever its space: each step takes the next
    batch of the client's data and `seeds_per_step` seeds of the plan, and uploads one scalar
    per seed. With `dp`, a batch is a Poisson sample drawn from the client's secret generator
    and the step gets per-example losses (federated/dp.py), as it does with `per_example`."""
    scalars: list[float] = []
    losses: list[float] = []
    for t in range(0, plan.num_steps, seeds_per_step):
        loss_fn: Callable[[], Any]
        if dp is None:
            ids = state.example_ids[state.pointer.next_batch(batch_size)]
            loss_fn = functools.partial(model.example_losses if per_example else model.loss, ids)
        else:
            ids = state.example_ids[dp.batch(state.num_samples)]
            loss_fn = (functools.partial(model.example_losses, ids) if len(ids)
                       else lambda: np.zeros(0))  # an empty batch: no forward
        for res in step(t, loss_fn):
            scalars.append(res.g)
            losses.append(res.loss)
            if on_step is not None:
                on_step(res)
    return ClientReply(
        round=plan.round,
        client_id=state.client_id,
        scalars=scalars,
        num_samples=state.num_samples,
        # a private client's batch loss would be an unnoised statistic of its examples: it
        # reports 0 (the server records the loss as withheld) and keeps the losses local
        train_loss=0.0 if dp is not None else float(np.mean(losses)) if losses else float("nan"),
        losses=losses,
    )


def run_client(
    state: ClientState,
    plan: RoundPlan,
    model: LocalModel,
    *,
    eps: float,
    lr: Sequence[float],
    batch_size: int,
    weight_decay: float = 0.0,
    on_step: Callable[[StepResult], object] | None = None,
    update: Callable[[torch.Tensor, torch.Tensor, float, float], object] | None = None,
    perturbations: int = 1,
    estimator: str = "two-point",
    dp: DPSettings | None = None,
) -> ClientReply:
    """Algorithm 2, step 1: T two-point steps from the global sparse vector; upload T scalars.

    `update` replaces the plain SGD update (see zo.step.zo_step). With `perturbations` P > 1 or
    the one-sided or per-example estimator, each step takes P consecutive seeds of the plan on
    one batch (zo.step.zo_multi_step) and uploads one scalar per seed: plan.num_steps counts
    seeds.
    With `dp`, each scalar is differentially private (federated/dp.py)."""
    check_steps(plan, lr)
    if dp is not None and (perturbations != 1 or estimator != "two-point" or update is not None):
        raise ValueError("dp_clip runs plain two-point steps (perturbations=1, no update hook)")
    p = perturbations
    plain = p == 1 and estimator == "two-point"
    if not plain and update is not None:
        raise ValueError("an update hook runs one direction a step (perturbations=1)")
    if p < 1 or plan.num_steps % p:
        raise ValueError(f"plan asks for {plan.num_steps} seeds, not a multiple of "
                         f"perturbations={p}")
    per_example = estimator == "per-example"
    if per_example and batch_size % p:
        raise ValueError(f"batch_size={batch_size} is not a multiple of perturbations={p} "
                         "(zo_estimator=per-example)")
    offsets = model.example_offsets() if per_example else None
    device = model.view.device  # theta, z and the update live with the model
    theta = sync_client(state, plan, device=device).clone()
    model.view.write(theta)

    private = None if dp is None else PrivateSteps(dp, batch_size, state.extra,
                                                   state.client_id)

    def step(t: int, loss_fn: Callable[[], Any]) -> list[StepResult]:
        if private is not None:
            return [zo_step_private(model.view, theta, plan.seeds[t], eps=eps, lr=lr[t],
                                    weight_decay=weight_decay, losses_fn=loss_fn,
                                    privatize=private.scalar)]
        if plain:
            return [zo_step(model.view, theta, plan.seeds[t], eps=eps, lr=lr[t],
                            weight_decay=weight_decay, update=update, loss_fn=loss_fn)]
        return zo_multi_step(model.view, theta, plan.seeds[t:t + p], eps=eps, lrs=lr[t:t + p],
                             estimator=estimator, weight_decay=weight_decay, loss_fn=loss_fn,
                             offsets=offsets)

    reply = run_steps(state, plan, model, step, batch_size=batch_size, seeds_per_step=p,
                      on_step=on_step, dp=private, per_example=per_example)
    if private is not None:
        private.save()  # the generator continues where it stopped (and never leaves)
    return reply
