"""FedAvg with first-order (back-propagation) local training: the upper bound of Table 24.

References: H. B. McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (FedAvg, AISTATS 2017); the Meerkat paper's back-propagation baseline
(Table 24), which trains the same trainable set with true gradients.

Trainable set (config `trainable`, this method only): `mask` = the Meerkat mask over the decoder
weights (the gradient of each masked tensor is computed by autograd, and plain SGD moves only
the masked coordinates), or `lora` = the LoRA adapter of lora-fedzo (all its coordinates).
Local step: theta <- theta*(1 - lr*wd) - lr * grad[mask], plain SGD, lr from the config.
Upload: the client's final trainable vector, float32 (`VectorReply`, kind "V" of the wire
format): nnz*4 + 31 bytes, against Meerkat's 4T + 27. Downlink: the averaged vector
(downlink = sparse-weights); a first-order update is not along seeded directions, so the scalar
downlink cannot carry it. Server: FedAvg (sample- or uniform-weighted) of the client vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmeerkat.federated.client import ClientState
from fedmeerkat.federated.messages import RoundPlan, VectorReply
from fedmeerkat.federated.methods.lora_fedzo import LoraSettings
from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import BaseServer, RoundOutcome, SentPlan
from fedmeerkat.federated.validate import Screened
from fedmeerkat.options import setting
from fedmeerkat.zo.step import StepResult


def masked_gradient(params: dict[str, torch.nn.Parameter], mask, loss: torch.Tensor) -> torch.Tensor:
    """d loss / d theta at the mask's coordinates, float32 on the model's device, in mask order."""
    tensors = [params[n] for n in mask.names]
    grads = torch.autograd.grad(loss, tensors)
    return torch.cat([gr.reshape(-1)[idx.to(gr.device)].float()
                      for gr, (_, idx, _) in zip(grads, mask.slices(), strict=True)])


def run_client_backprop(
    state: ClientState,
    plan: RoundPlan,
    model,
    *,
    eps: float = 0.0,  # unused: no perturbation; same signature as the ZO routines
    lr: Sequence[float],
    batch_size: int,
    weight_decay: float = 0.0,
    on_step: Callable[[StepResult], object] | None = None,
) -> VectorReply:
    """T SGD steps on the trainable vector; uploads the final vector.

    `model` has `view` (SparseView), `parameters` (name -> Parameter) and `loss_tensor(ids)`."""
    if plan.theta is None:
        raise ValueError("fedavg-backprop needs the global vector in the plan "
                         "(downlink=sparse-weights)")
    view, mask = model.view, model.view.mask
    theta = plan.theta.to(view.device, copy=True)
    view.write(theta)
    targets = [model.parameters[n] for n in mask.names]
    was = [p.requires_grad for p in targets]
    losses: list[float] = []
    try:
        for p in targets:
            p.requires_grad_(True)
        for t in range(plan.num_steps):
            ids = state.example_ids[state.pointer.next_batch(batch_size)]
            with torch.enable_grad():
                loss = model.loss_tensor(ids)
                grad = masked_gradient(model.parameters, mask, loss)
            with torch.no_grad():
                if weight_decay:
                    theta.mul_(torch.tensor(1.0 - lr[t] * weight_decay, dtype=torch.float32))
                theta.sub_(grad * torch.tensor(lr[t], dtype=torch.float32))
                view.write(theta)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(StepResult(g=float("nan"), loss_plus=losses[-1], loss_minus=losses[-1]))
    finally:
        for p, w in zip(targets, was, strict=True):
            p.requires_grad_(w)
    return VectorReply(round=plan.round, client_id=state.client_id, vector=theta,
                       num_samples=state.num_samples, num_steps=plan.num_steps,
                       train_loss=float(np.mean(losses)) if losses else float("nan"))


class BackpropServer(BaseServer):
    directions_ok = False
    method = "fedavg-backprop"
    downlinks = ("sparse-weights",)  # a first-order update is not along seeded directions

    reply_type = VectorReply

    def _magnitude(self, reply: VectorReply) -> float:
        """m_k of the reply bound: max |v_k - theta|, the size of the client's update."""
        return float((reply.vector.to(self.theta.device) - self.theta).abs().max())

    def _clip(self, reply: VectorReply, limit: float) -> VectorReply:
        delta = (reply.vector.to(self.theta.device) - self.theta).clamp_(-limit, limit)
        return dataclasses.replace(reply, vector=self.theta + delta)

    def aggregate(self, plan: SentPlan, usable: list[VectorReply], verdict: Screened
                  ) -> RoundOutcome:
        """FedAvg of the client vectors (the one method whose replies are not scalars)."""
        if usable:
            new = torch.zeros_like(self.theta)
            for w, r in zip(self._weights([r.client_id for r in usable]), usable, strict=True):
                new.add_(r.vector.to(new.device) * torch.tensor(w, dtype=torch.float32))
            self.theta = new
        return self._outcome(plan.round, usable, verdict, lambda r: r.num_steps)


@dataclass(frozen=True)
class BackpropSettings(LoraSettings):
    trainable: str = setting("mask", "what fedavg-backprop trains: the Meerkat mask's weights or "
                             "the LoRA adapter (lora_rank, lora_alpha)", choices=("mask", "lora"))


METHOD = register(Method(
    "fedavg-backprop", server=BackpropServer, settings=BackpropSettings, order=5,
    client=lambda s: run_client_backprop, space=lambda s: s.trainable, spaces=("mask", "lora"),
    summary="first-order local SGD of the same trainable set (`trainable=mask` or `lora`)",
    reference="paper Table 24 upper bound"))
