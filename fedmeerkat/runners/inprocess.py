"""The in-process transport: every client runs on this process's one model, in client order.

Plans and replies still go through their bytes (the driver serializes, the host parses), so the
simulation exercises the wire format and counts its bytes exactly."""

from __future__ import annotations

import time
from collections.abc import Callable

from fedmeerkat.federated import RoundPlan
from fedmeerkat.runners.client_host import ClientHost


class InProcessTransport:
    def __init__(self, host: ClientHost,
                 on_plans: Callable[[list[RoundPlan]], object] | None = None):
        self.host = host
        self.on_plans = on_plans  # e.g. the progress bar learns the round's step count

    def exchange(self, round_idx: int, plans: dict[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        parsed = {k: RoundPlan.from_bytes(blob) for k, blob in plans.items()}
        if self.on_plans is not None:
            self.on_plans(list(parsed.values()))
        replies = {}
        for k, plan in parsed.items():
            # one process runs clients one after another: a deadline stops starting new ones
            # (a simulated deadline makes results depend on speed, so it is off by default)
            if deadline is not None and time.monotonic() > deadline:
                break
            replies[k] = self.host.handle(plan)
        return replies
