"""Meerkat-FedDyn: FedDyn's dynamic regulariser on Meerkat's sparse ZO clients.

Reference: D. A. E. Acar et al., "Federated Learning Based on Dynamic Regularization" (FedDyn,
ICLR 2021); the Meerkat paper's "FedDyn adapted" baseline (Table 24, alpha = 0.01).

FedDyn's client k minimises  L_k(theta) - <h_k, theta> + alpha/2 ||theta - theta_g||^2  from the
global theta_g, then sets  h_k <- h_k - alpha (theta_k - theta_g).  The server keeps h:
    h       <- h - alpha/K * sum_{k in P} K p_k (theta_k - theta_g)   (p_k: FedAvg weights over
                                                                    the participants P; with
                                                                    uniform weights this is
                                                                    FedDyn's 1/K sum)
    theta_g <- sum_k p_k theta_k - h / alpha
Adaptation to Meerkat (all vectors live in the mask space, so a client's state is nnz floats):
the gradient of L_k is Meerkat's ZO estimate g z (z from the shared seed), and the regulariser's
gradient is known in closed form, so each local step is deterministic given g:
    theta <- theta*(1 - lr*wd) - lr * (g z - h_k + alpha (theta - theta_g))
(`feddyn_update`, separately rounded float32 ops). Because h_k starts at 0 and changes only by
the replayed trajectory, the server mirrors every client's h_k and replays each virtual path
exactly from theta_g, the seeds, the scalars and its mirror of h_k: the upload stays T float32
scalars (the normal reply), nothing else travels up. The downlink is the sparse vector
(downlink = sparse-weights): the server's correction h/alpha is not along seeded directions,
so the scalar downlink cannot carry it.

Keeping h_k in step when a reply is not applied. The server changes its mirror of h_k only for
replies it applies; a reply that is lost, late or rejected (federated/validate.py) leaves the
mirror as it was. So the client does not change h_k at the end of its round either: it keeps
the update  d = alpha (theta_k - theta_g)  pending (with the round it belongs to) and commits it
(h_k <- h_k - d, the very float32 op the server runs) only when its next plan says that round
was applied: FedDyn's plans carry `applied`, the last round in which the server applied this
client's reply (a version 2 plan, 4 bytes more; messages.py). Otherwise it discards d. Correct
because h_k is read only while the client trains, and the client trains only after receiving a
plan, which settles the pending update first; applying d late gives the same float32 result
as applying it at once (d does not depend on h_k). A retried round (runners/driver.py) is a
new plan of the same round: the first attempt was not applied, so its d is discarded. Cost:
one more nnz-float vector per client while an update is pending (checkpointed with h_k).
Clipping a reply (reply_bound_action = "clip") would make the server's path differ from the
client's, so this method rejects instead (`clip_ok = False`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from fedmeerkat.federated.client import ClientState, run_client
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import BaseServer, FedSettings, RoundOutcome, SentPlan
from fedmeerkat.federated.validate import Screened
from fedmeerkat.options import setting
from fedmeerkat.zo import draw_z
from fedmeerkat.zo.step import StepResult

H_KEY = "feddyn_h"
PENDING_KEY = "feddyn_pending"  # alpha (theta_k - theta_g) of the client's last round
PENDING_ROUND_KEY = "feddyn_pending_round"  # that round, as a 1-element int64 tensor


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@torch.no_grad()
def feddyn_update(theta: torch.Tensor, z: torch.Tensor, g: float, lr: float, h: torch.Tensor,
                  alpha: float, theta_g: torch.Tensor, weight_decay: float = 0.0) -> None:
    """theta <- theta*(1-lr*wd) - lr*(g z - h + alpha (theta - theta_g)), in place, as separately
    rounded float32 ops: client and server replay run this very function (bit-identical)."""
    if weight_decay:
        theta.mul_(_f32(1.0 - lr * weight_decay))
    d = (theta - theta_g) * _f32(alpha)
    d.sub_(h)
    d.add_(z * _f32(g))
    theta.sub_(d * _f32(lr))


@torch.no_grad()
def feddyn_state_update(h: torch.Tensor, theta_k: torch.Tensor, theta_g: torch.Tensor,
                        alpha: float) -> None:
    """h_k <- h_k - alpha (theta_k - theta_g), in place."""
    h.sub_((theta_k - theta_g) * _f32(alpha))


def client_h(state: ClientState, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The client's h_k, on `device` (the model's)."""
    if H_KEY not in state.extra:
        state.extra[H_KEY] = torch.zeros(n, dtype=torch.float32, device=device)
    elif state.extra[H_KEY].device != torch.device(device):
        state.extra[H_KEY] = state.extra[H_KEY].to(device)
    return state.extra[H_KEY]


def settle_pending(state: ClientState, applied: int) -> bool:
    """Commit the client's pending h_k update if the server applied its round (`applied` is
    the plan's acknowledgement), else discard it. True when it was committed."""
    d = state.extra.pop(PENDING_KEY, None)
    r = state.extra.pop(PENDING_ROUND_KEY, None)
    if d is None or r is None or int(r[0]) != applied:
        return False
    h = client_h(state, d.numel(), d.device)
    h.sub_(d.to(h.device))
    return True


def run_client_feddyn(
    state: ClientState,
    plan: RoundPlan,
    model,
    *,
    eps: float,
    lr: Sequence[float],
    batch_size: int,
    alpha: float,
    weight_decay: float = 0.0,
    on_step: Callable[[StepResult], object] | None = None,
) -> ClientReply:
    """T two-point ZO steps with the FedDyn correction; uploads T scalars. The round's h_k
    update stays pending until a later plan says the round was applied (module docstring)."""
    if plan.theta is None:
        raise ValueError("meerkat-feddyn needs the global vector in the plan (downlink=sparse-weights)")
    if plan.applied is None:
        raise ValueError("meerkat-feddyn needs plans that acknowledge applied rounds (wire v2)")
    settle_pending(state, plan.applied)
    theta_g = plan.theta.to(model.view.device)
    h = client_h(state, theta_g.numel(), theta_g.device)
    final: list[torch.Tensor] = []  # the local vector, updated in place step by step

    def update(theta: torch.Tensor, z: torch.Tensor, g: float, lr_t: float) -> None:
        feddyn_update(theta, z, g, lr_t, h, alpha, theta_g, weight_decay)
        final[:] = [theta]

    reply = run_client(state, plan, model, eps=eps, lr=lr, batch_size=batch_size,
                       on_step=on_step, update=update)
    if final:
        state.extra[PENDING_KEY] = (final[0] - theta_g) * _f32(alpha)  # = feddyn_state_update's
        state.extra[PENDING_ROUND_KEY] = torch.tensor([plan.round], dtype=torch.int64)
    return reply


@torch.no_grad()
def replay_feddyn(theta_g: torch.Tensor, seeds: Sequence[int], scalars: Sequence[float],
                  lrs: Sequence[float], h: torch.Tensor, alpha: float,
                  weight_decay: float = 0.0) -> torch.Tensor:
    """A client's final vector from theta_g, seeds, scalars and its h_k; h_k is updated in
    place exactly as the client did."""
    theta = theta_g.clone()
    for t, g in enumerate(scalars):
        z = draw_z(seeds[t], theta.numel(), device=theta.device)
        feddyn_update(theta, z, float(g), lrs[t], h, alpha, theta_g, weight_decay)
    feddyn_state_update(h, theta, theta_g, alpha)
    return theta


class FedDynServer(BaseServer):
    directions_ok = False
    method = "meerkat-feddyn"
    downlinks = ("sparse-weights",)  # the server's h/alpha correction is not along seeded directions
    acknowledges = True  # clients commit h_k updates only for applied rounds
    clip_ok = False  # a clipped path would differ from the client's own h_k update

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int],
                 *, alpha: float = 0.01):
        super().__init__(settings, theta0, client_sizes)
        self.alpha = float(alpha)
        self.h = torch.zeros_like(self.theta)
        self.h_clients = [torch.zeros_like(self.theta) for _ in client_sizes]  # mirrors of h_k

    def aggregate(self, plan: SentPlan, usable: list[ClientReply], verdict: Screened
                  ) -> RoundOutcome:
        if usable:
            weights = self._weights([r.client_id for r in usable])
            theta_g = self.theta
            mean = torch.zeros_like(theta_g)
            for w, r in zip(weights, usable, strict=True):
                theta_k = replay_feddyn(theta_g, plan.seeds, r.scalars, plan.lrs,
                                        self.h_clients[r.client_id], self.alpha,
                                        self.settings.weight_decay)
                mean.add_(theta_k * _f32(w))
            share = len(usable) / self.num_clients  # sum_k p_k * |P|/K = |P|/K
            self.h.sub_((mean - theta_g) * _f32(self.alpha * share))
            self.theta = mean - self.h * _f32(1.0 / self.alpha)
        return self._outcome(plan.round, usable, verdict)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors["server.feddyn_h"] = self.h.cpu()
        tensors["server.feddyn_h_clients"] = torch.stack(self.h_clients).cpu()
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        device = self.theta.device
        self.h = tensors["server.feddyn_h"].to(device, copy=True)
        self.h_clients = [h.to(device, copy=True) for h in tensors["server.feddyn_h_clients"]]


@dataclass(frozen=True)
class FedDynSettings:
    alpha: float = setting(0.01, "FedDyn regularisation strength", key="feddyn_alpha", gt=0)


METHOD = register(Method(
    "meerkat-feddyn", server=FedDynServer, settings=FedDynSettings, order=6,
    client=lambda s: partial(run_client_feddyn, alpha=s.alpha),
    server_options=lambda s: {"alpha": s.alpha},
    summary="FedDyn adapted to Meerkat", reference="Acar et al. 2021; paper Table 24"))
