"""One model serving a group of clients: plans in, reply bytes out.

The in-process transport holds one host for all K clients; a deployed site holds one for the
clients it hosts. Both run the same client routine of the method's registry entry, so a client
computes the same reply wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedmeerkat.federated import ClientState, FedSettings, LocalModel, RoundPlan, share_copies
from fedmeerkat.federated.dp import DPSettings
from fedmeerkat.federated.registry import Method
from fedmeerkat.zo import StepResult


class ClientHost:
    def __init__(self, method: Method, method_settings, settings: FedSettings, model: LocalModel,
                 states: dict[int, ClientState],
                 on_step: Callable[[StepResult], object] | None = None,
                 dp: DPSettings | None = None):
        self.routine = method.client(method_settings)
        self.dp = dp  # differentially private scalars (federated/dp.py); config.py checks
        self.settings = settings
        self.model = model
        self.states = states
        self.on_step = on_step
        self._pool: dict[int, torch.Tensor] = {}
        self._pool_round = -1

    def handle(self, plan: RoundPlan) -> bytes:
        """Run one client's round; return its serialized reply."""
        state = self.states.get(plan.client_id)
        if state is None:
            raise ValueError(f"client {plan.client_id} is not hosted here "
                             f"(hosted: {sorted(self.states)})")
        if plan.round != self._pool_round:  # round -> the one copy of that round's vector
            self._pool, self._pool_round = share_copies(list(self.states.values())), plan.round
        s = self.settings
        # only methods whose server allows it see these (config.py and the server refuse the
        # others), so routines of one direction a step need not take them
        directions = ({"perturbations": s.perturbations, "estimator": s.estimator}
                      if s.perturbations != 1 or s.estimator != "two-point" else {})
        if self.dp is not None:
            directions["dp"] = self.dp
        reply = self.routine(state, plan, self.model, eps=s.eps,
                             lr=s.lrs(plan.round, len(plan.seeds)), batch_size=s.batch_size,
                             weight_decay=s.weight_decay, on_step=self.on_step, **directions)
        share_copies([state], self._pool)  # memory flat in K (scalar downlink)
        return reply.to_bytes()

    def states_replaced(self) -> None:
        """The clients' states were set from elsewhere (a deployed site restoring a snapshot):
        forget the copies shared so far."""
        self._pool, self._pool_round = {}, -1
