"""The round driver: one loop for every way of moving messages.

    plans   = server.plan_round(r)                        # federated/: a state machine
    replies = transport.exchange(r, plan bytes, deadline) # how bytes move: in process, FLARE, ...
    verdict = server.screen(r, parsed replies)            # which replies are usable
    outcome = server.apply(r, verdict)                    # if enough are, else plan r again
    metrics line, trajectories, checkpoint, evaluation    # the run folder (run_folder.py)

A transport only moves bytes: it delivers each client its plan and returns the replies that
arrived before the deadline. Byte counts are the lengths of those bytes, so they are the wire
format's whatever the transport adds around them.

Replies and dropouts (docs/reliability.md, "Replies and dropouts"):
- A round closes at its deadline (`round_timeout`) with the replies it has. A reply that is
  missing, cannot be parsed, names another client than the one the transport got it from, or
  fails the server's screen (federated/validate.py) leaves that client out of the round,
  exactly as if it had not been planned; the record says who (`missing`) and why
  (`rejected`: client -> reason). Such a client is caught up in its next round by the usual
  path (the vector, or the aggregates it missed).
- A round needs `min_clients` usable replies. With fewer, nothing is applied and the round is
  planned again (same round, same participants and seeds; the clients' data pointers have
  moved on, so a retry reads fresh batches), up to `round_retries` times; the earlier attempts
  are listed in the round's record (`retries`). If every attempt falls short, the driver
  writes a `failed` record and raises RoundFailed: the checkpoint still holds the last good
  round, so `fedmeerkat run --resume` continues from it (the CLI exits with code 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedmeerkat.federated import BaseServer, RoundPlan
from fedmeerkat.federated.messages import reply_from_bytes
from fedmeerkat.federated.validate import Screened
from fedmeerkat.models.scoring import format_metrics


class RoundFailed(RuntimeError):
    """A round got fewer than `min_clients` usable replies in every attempt; nothing of it was
    applied and the last checkpoint is that of the round before (resume continues there)."""


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
    """Moves bytes. A transport whose clients' replies come through fewer parties than
    clients (the deployed sites) also has `sources`, client -> its party: the screen's reply
    bound then counts each party once (federated/validate.py); without it every client is
    its own."""

    def exchange(self, round_idx: int, plans: Mapping[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        """Deliver plans (client id -> plan bytes); return the reply bytes that arrived by
        `deadline` (time.monotonic(); None = wait for all), client id -> bytes."""
        ...


@dataclass
class RoundDriver:
    server: BaseServer
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
    # differentially private clients report no training loss (federated/client.py): metrics
    # record it as null and the log says withheld
    loss_withheld: bool = False
    min_clients: int = 1  # usable replies a round needs to be applied
    round_retries: int = 2  # re-plans of a round below min_clients before the run stops
    on_plans: Callable[[list[RoundPlan]], object] = lambda plans: None  # e.g. a progress bar

    def run(self, last_round: int) -> None:
        for r in range(self.server.round + 1, last_round + 1):
            self.run_round(r)

    def _attempt(self, r: int) -> tuple[dict[int, list[int]], dict[int, str], list[int],
                                        Screened]:
        """One exchange of round r: (client -> [up, down] bytes, transport-level rejections,
        missing clients, the server's screen of the parsed replies)."""
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
            except ValueError as e:
                rejected[k] = str(e)
                continue
            if reply.client_id != k:  # the transport knows who sent it; the reply must agree
                rejected[k] = f"reply names client {reply.client_id}"
                continue
            sizes[k] = [len(got[k]), blobs.plans[k].nbytes()]  # nbytes == len(to_bytes())
            replies.append(reply)  # the server screens the rest (federated/validate.py)
        missing = sorted(set(blobs) - set(got))
        return sizes, rejected, missing, self.server.screen(
            r, replies, getattr(self.transport, "sources", None))

    def _loss(self, outcome: Any) -> str:
        return "withheld (dp)" if self.loss_withheld else f"{outcome.train_loss:.4f}"

    def run_round(self, r: int) -> dict[str, Any]:
        failed: list[dict[str, Any]] = []
        for attempt in range(1, self.round_retries + 2):
            sizes, rejected, missing, verdict = self._attempt(r)
            usable = len(verdict.accepted)
            if usable >= self.min_clients:
                break
            note: dict[str, Any] = {
                "attempt": attempt, "usable": usable,
                "bytes_up": sum(u for u, _ in sizes.values()),
                "bytes_down": sum(d for _, d in sizes.values())}
            if missing:
                note["missing"] = missing
            why = {**rejected, **verdict.rejected}
            if why:
                note["rejected"] = {str(k): v for k, v in sorted(why.items())}
            failed.append(note)
            self.log(f"round {r}: {usable} usable replies, min_clients={self.min_clients} "
                     f"(attempt {attempt} of {self.round_retries + 1}; missing {missing}, "
                     f"rejected {why})")
        else:
            # the run stops: the checkpoint still holds round r-1, nothing of round r applied
            self.append_metrics({"round": r, "failed": True, "train_loss": None,
                                 "test_accuracy": None,
                                 "bytes_up": sum(a["bytes_up"] for a in failed),
                                 "bytes_down": sum(a["bytes_down"] for a in failed),
                                 "attempts": failed})
            raise RoundFailed(f"round {r}: fewer than min_clients={self.min_clients} usable "
                              f"replies in {len(failed)} attempt(s); the run stops after round "
                              f"{self.server.round}")
        outcome = self.server.apply(r, verdict)
        rejected = {**rejected, **outcome.rejected}
        record: dict[str, Any] = {
            "round": r, "train_loss": None if self.loss_withheld else outcome.train_loss,
            "test_accuracy": None,
            "bytes_up": sum(u for u, _ in sizes.values()),
            "bytes_down": sum(d for _, d in sizes.values()),
            "bytes": {str(k): v for k, v in sizes.items()},  # client -> [up, down]
            "client_steps": outcome.client_steps, **outcome.extra,
        }
        if failed:  # earlier attempts of this round (their traffic is not in bytes_up/down)
            record["retries"] = failed
        if missing:
            record["missing"] = missing
            self.log(f"round {r}: no reply from clients {missing} by the deadline")
        if rejected:
            record["rejected"] = {str(k): v for k, v in sorted(rejected.items())}
            self.log(f"round {r}: left out replies {rejected}")
        if outcome.clipped:
            record["clipped"] = {str(k): v for k, v in sorted(outcome.clipped.items())}
            self.log(f"round {r}: clipped replies {outcome.clipped}")
        if self.server.catchup_choices:
            record["sync"] = {str(k): v for k, v in self.server.catchup_choices.items()}
            # scalars:0 (round 1) and scalars:1 (took part last round) are the normal case
            lagging = {k: v for k, v in self.server.catchup_choices.items()
                       if v not in ("scalars:0", "scalars:1")}
            if lagging:
                self.log(f"round {r}: catch-up {lagging}")
        if outcome.extra.get("log"):  # a method's one-line note (e.g. Meerkat-VP's flags)
            self.log(f"round {r}: {outcome.extra['log']}")
        result = self.evaluate(r)
        if result is not None and result.get("test_accuracy") is None:
            record.update(result)  # a deployed evaluation no site could give: the run goes on
            self.log(f"round {r}: train loss {self._loss(outcome)}, no evaluation (test "
                     "metrics missing)")
        elif result is not None:
            record.update(result)
            self.log(f"round {r}: train loss {self._loss(outcome)}, test accuracy "
                     f"{result['test_accuracy']:.4f} (predicted share "
                     f"{'/'.join(f'{s:.2f}' for s in result['predicted_share'])}; "
                     f"{format_metrics(result)})"
                     + (f"; validation accuracy {result['val_accuracy']:.4f}, "
                        f"{format_metrics(result, 'val_')}"
                        if result.get("val_accuracy") is not None else ""))
        if outcome.arrays:  # compact per-round trajectories (e.g. GradIP per client and step)
            self.save_arrays(r, outcome.arrays)
        self.append_metrics(record)
        self.checkpoint()
        return record
