"""The in-process transport: every client runs on this process's one model, in client order.

Plans and replies still go through their bytes (the driver serializes, the host parses), so the
simulation exercises the wire format and counts its bytes exactly."""

from __future__ import annotations

import time
from collections.abc import Mapping

from fedmeerkat.federated import RoundPlan
from fedmeerkat.runners.client_host import ClientHost


class InProcessTransport:
    def __init__(self, host: ClientHost):
        self.host = host

    def exchange(self, round_idx: int, plans: Mapping[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        replies = {}
        for k in plans:  # one plan serialized and parsed at a time: memory flat in K
            # one process runs clients one after another: a deadline stops starting new ones
            # (a simulated deadline makes results depend on speed, so it is off by default)
            if deadline is not None and time.monotonic() > deadline:
                break
            replies[k] = self.host.handle(RoundPlan.from_bytes(plans[k]))
        return replies
