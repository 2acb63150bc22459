"""The round driver: one loop for every way of moving messages.

    plans   = server.plan_round(r)                        # federated/: a state machine
    replies = transport.exchange(r, plan bytes, deadline) # how bytes move: in process, FLARE, ...
    outcome = server.apply(r, parsed replies)
    metrics line, trajectories, checkpoint, evaluation    # the run folder (run_folder.py)

A transport only moves bytes: it delivers each client its plan and returns the replies that
arrived before the deadline. Byte counts are the lengths of those bytes, so they are the wire
format's whatever the transport adds around them. A reply that is missing or cannot be parsed
leaves that client out of the round (the server never sees it); the round record says which
and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedmeerkat.federated import MeerkatServer, RoundPlan
from fedmeerkat.federated.messages import reply_from_bytes
from fedmeerkat.models.scoring import format_metrics


class PlanBytes(Mapping[int, bytes]):
    """client id -> plan bytes, serialized when read: in the sparse-weights mode each plan
    carries the global vector, so K serialized plans held at once would grow with K."""

    def __init__(self, plans: list[RoundPlan]):
        self.plans = {p.client_id: p for p in plans}

    def __getitem__(self, k: int) -> bytes:
        return self.plans[k].to_bytes()

    def __iter__(self) -> Iterator[int]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


class Transport(Protocol):
    def exchange(self, round_idx: int, plans: Mapping[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        """Deliver plans (client id -> plan bytes); return the reply bytes that arrived by
        `deadline` (time.monotonic(); None = wait for all), client id -> bytes."""
        ...


@dataclass
class RoundDriver:
    server: MeerkatServer
    transport: Transport
    # run folder hooks: append a metrics line, save a round's trajectories, checkpoint
    append_metrics: Callable[[dict[str, Any]], None]
    save_arrays: Callable[[int, dict[str, torch.Tensor]], None]
    checkpoint: Callable[[], None]
    # round -> test metrics {"test_accuracy", "test_loss", "predicted_share"} or None when no
    # evaluation is due that round
    evaluate: Callable[[int], dict[str, Any] | None] = lambda r: None
    log: Callable[[str], None] = print
    round_timeout: float = 0.0  # seconds a round waits for replies (0 = no deadline)
    on_plans: Callable[[list[RoundPlan]], object] = lambda plans: None  # e.g. a progress bar

    def run(self, last_round: int) -> None:
        for r in range(self.server.round + 1, last_round + 1):
            self.run_round(r)

    def run_round(self, r: int) -> dict[str, Any]:
        plans = self.server.plan_round(r)
        self.on_plans(plans)
        blobs = PlanBytes(plans)
        deadline = time.monotonic() + self.round_timeout if self.round_timeout > 0 else None
        got = self.transport.exchange(r, blobs, deadline)
        replies: list[Any] = []  # ClientReply, or VectorReply (first-order baselines)
        sizes: dict[int, list[int]] = {}
        rejected: dict[int, str] = {}
        for k in sorted(got):
            if k not in blobs:
                rejected[k] = "not planned this round"
                continue
            try:
                reply = reply_from_bytes(got[k])
                if reply.client_id != k or reply.round != r:
                    raise ValueError(f"reply names client {reply.client_id} round {reply.round}")
            except ValueError as e:
                rejected[k] = str(e)
                continue
            sizes[k] = [len(got[k]), blobs.plans[k].nbytes()]  # nbytes == len(to_bytes())
            replies.append(reply)
        missing = sorted(set(blobs) - set(got))
        outcome = self.server.apply(r, replies)
        record: dict[str, Any] = {
            "round": r, "train_loss": outcome.train_loss, "test_accuracy": None,
            "bytes_up": sum(u for u, _ in sizes.values()),
            "bytes_down": sum(d for _, d in sizes.values()),
            "bytes": {str(k): v for k, v in sizes.items()},  # client -> [up, down]
            "client_steps": outcome.client_steps, "dropped": outcome.dropped, **outcome.extra,
        }
        if missing:
            record["missing"] = missing
            self.log(f"round {r}: no reply from clients {missing} by the deadline")
        if rejected:
            record["rejected"] = {str(k): v for k, v in rejected.items()}
            self.log(f"round {r}: rejected replies {rejected}")
        if self.server.catchup_choices:
            record["sync"] = {str(k): v for k, v in self.server.catchup_choices.items()}
            # scalars:0 (round 1) and scalars:1 (took part last round) are the normal case
            lagging = {k: v for k, v in self.server.catchup_choices.items()
                       if v not in ("scalars:0", "scalars:1")}
            if lagging:
                self.log(f"round {r}: catch-up {lagging}")
        if outcome.extra.get("log"):  # a method's one-line note (e.g. Meerkat-VP's flags)
            self.log(f"round {r}: {outcome.extra['log']}")
        if outcome.dropped:
            self.log(f"round {r}: left out clients {outcome.dropped} (non-finite scalars)")
        result = self.evaluate(r)
        if result is not None:
            record.update(result)
            self.log(f"round {r}: train loss {outcome.train_loss:.4f}, test accuracy "
                     f"{result['test_accuracy']:.4f} (predicted share "
                     f"{'/'.join(f'{s:.2f}' for s in result['predicted_share'])}; "
                     f"{format_metrics(result)})")
        if outcome.arrays:  # compact per-round trajectories (e.g. GradIP per client and step)
            self.save_arrays(r, outcome.arrays)
        self.append_metrics(record)
        self.checkpoint()
        return record
