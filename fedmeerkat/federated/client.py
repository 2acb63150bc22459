"""Client logic: get the global model, run the round's plan on local data, return scalars.

A client is its data (global example ids), its data pointer and, in the scalar-downlink mode,
its own copy of the global sparse vector. The runner lends it the one shared model through
`LocalModel`, which keeps memory flat in the number of clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated.aggregate import Aggregate, apply_aggregate
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.zo import SparseView, StepResult, zo_step


class LocalModel(Protocol):
    """The model as a client sees it: the masked coordinates, and a loss on its examples."""

    view: SparseView

    def loss(self, example_ids: np.ndarray) -> float: ...


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
    catch-up draws z where it is used."""
    if plan.theta is not None:
        theta = plan.theta if device is None else plan.theta.to(device)
        if state.theta is not None:
            state.theta = theta.clone()
            state.synced = plan.round - 1
        return theta
    if state.theta is None:
        raise ValueError(f"client {state.client_id}: plan carries no vector and the client "
                         "holds no copy of the model")
    rounds = [a.round for a in plan.catchup]
    if rounds != list(range(state.synced + 1, plan.round)):
        raise ValueError(f"client {state.client_id} holds round {state.synced}; "
                         f"cannot reach round {plan.round - 1} with aggregates of rounds {rounds}")
    if device is not None and state.theta.device != torch.device(device):
        state.theta = state.theta.to(device)  # e.g. after a resume (checkpoints hold CPU copies)
    for agg in plan.catchup:
        apply(state.theta, agg)
    state.synced = plan.round - 1
    return state.theta


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
) -> ClientReply:
    """Algorithm 2, step 1: T two-point steps from the global sparse vector; upload T scalars.

    `update` replaces the plain SGD update (see zo.step.zo_step)."""
    if plan.num_steps > len(plan.seeds) or plan.num_steps > len(lr):
        raise ValueError(f"plan asks for {plan.num_steps} steps with {len(plan.seeds)} seeds")
    device = model.view.device  # theta, z and the update live with the model
    theta = sync_client(state, plan, device=device).clone()
    model.view.write(theta)
    scalars: list[float] = []
    losses: list[float] = []
    for t in range(plan.num_steps):
        ids = state.example_ids[state.pointer.next_batch(batch_size)]
        res = zo_step(model.view, theta, plan.seeds[t], eps=eps, lr=lr[t],
                      weight_decay=weight_decay, update=update,
                      loss_fn=functools.partial(model.loss, ids))
        scalars.append(res.g)
        losses.append(res.loss)
        if on_step is not None:
            on_step(res)
    return ClientReply(
        round=plan.round,
        client_id=state.client_id,
        scalars=scalars,
        num_samples=state.num_samples,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        losses=losses,
    )
