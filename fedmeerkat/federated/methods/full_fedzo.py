"""Full-FedZO: zeroth-order fine-tuning of ALL parameters, MeZO style, with Meerkat's protocol.

References: S. Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO,
NeurIPS 2023) for the dense in-place ZO step; the Meerkat paper's Full-FedZO baseline (Sec. 3,
Tables 15, 23, 24), which runs it in the same federated loop.

Space: every model parameter (zo/dense.py: `DenseSpace`, `DenseView`, per-tensor z from
`mix(seed, tensor index)`). Protocol: the same seeds and scalars as Meerkat; the upload is T
float32 scalars.
- downlink `sparse-weights`: the plan carries the whole model as float32 (the paper's Full-FedZO
  downloads the full model every round, 2.875 GB for Qwen2-1.5B in fp16, Table 23), counted
  honestly by serialization.
- downlink `scalars`: T+1 floats per round; every party applies the aggregate in place over its
  dense copy, one tensor's z at a time (bit-identical copies on every party).
In both modes the server never replays K dense virtual paths (K model-size vectors): it applies
the scalar aggregate (federated/aggregate.py), which equals the FedAvg of the replays exactly in
math and up to float32 summation order in floats.
Memory (simulation): the one model is every client's working copy (in-place MeZO steps); the
server's global model is one flat float32 copy, written back into the model before each client
and after each round. With downlink=scalars each client's copy of the global model is the one of
the round it last synced, shared by every client at that round (federated.client.share_copies),
so a simulation holds one dense float32 copy per distinct round, not K; a client catching up
works on a transient copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedmeerkat.federated.aggregate import aggregate_scalars
from fedmeerkat.federated.client import ClientState, check_steps, run_steps, sync_client
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import BaseServer, FedSettings, RoundOutcome, SentPlan
from fedmeerkat.federated.validate import Screened
from fedmeerkat.zo.dense import DenseSpace, DenseView, apply_aggregate_dense, dense_zo_step
from fedmeerkat.zo.step import StepResult


class FullFedZOServer(BaseServer):
    directions_ok = False
    method = "full-fedzo"

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int],
                 *, space: DenseSpace):
        super().__init__(settings, theta0, client_sizes)
        if theta0.numel() != space.nnz:
            raise ValueError(f"theta0 has {theta0.numel()} values, the dense space {space.nnz}")
        self.space = space

    def aggregate(self, plan: SentPlan, usable: list[ClientReply], verdict: Screened
                  ) -> RoundOutcome:
        agg = aggregate_scalars(plan.round, plan.update_seeds, [r.scalars for r in usable],
                                self._weights([r.client_id for r in usable]),
                                plan.update_lrs, self.settings.weight_decay)
        apply_aggregate_dense(self.theta, self.space, agg)
        if self.settings.downlink == "scalars":
            self.history[plan.round] = agg
        return self._outcome(plan.round, usable, verdict)


def run_client_dense(
    state: ClientState,
    plan: RoundPlan,
    model,
    *,
    eps: float,
    lr: Sequence[float],
    batch_size: int,
    weight_decay: float = 0.0,
    on_step: Callable[[StepResult], object] | None = None,
) -> ClientReply:
    """T in-place MeZO steps from the global model on the client's data; upload T scalars.

    `model.view` is a DenseView; the global model is written into it (no extra copy)."""
    view: DenseView = model.view
    check_steps(plan, lr)
    space = view.mask
    view.write(sync_client(state, plan, lambda th, agg: apply_aggregate_dense(th, space, agg)))

    def step(t: int, loss_fn: Callable[[], float]) -> list[StepResult]:
        return [dense_zo_step(view, plan.seeds[t], eps=eps, lr=lr[t], weight_decay=weight_decay,
                              loss_fn=loss_fn)]

    return run_steps(state, plan, model, step, batch_size=batch_size, on_step=on_step)


METHOD = register(Method(
    "full-fedzo", server=FullFedZOServer, client=lambda s: run_client_dense, order=3,
    space=lambda s: "dense", spaces=("dense",),
    summary="ZO on every weight, MeZO style", reference="Malladi et al. 2023"))
