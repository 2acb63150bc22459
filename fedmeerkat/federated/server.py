"""Server logic of federated Meerkat as a transport-free state machine.

    plans   = server.plan_round(r)                 # seeds, step counts, the model to start from
    replies = [run_client(...) for each plan]      # the runner decides how and where
    outcome = server.apply(r, replies)             # virtual paths, aggregation, bookkeeping

Seeds are derived (zo.seeds.round_seeds) and shared by every client in a round (DeComFL
lineage): one z per step then serves all clients, and the update can travel as scalars.

Downlink modes:
- `sparse-weights` (paper Algorithm 2): the server replays each client's virtual path, averages
  the final vectors and sends the averaged sparse vector.
- `scalars`: the server aggregates the scalars (federated/aggregate.py) and sends T+1 floats;
  every party applies them with the same code, so all copies of the model are bit-identical.
  With T=1 this is the paper's high-frequency synchronization (Algorithm 3). A client that
  missed rounds catches up from the aggregates it missed, or gets the vector when that is
  fewer bytes (`catchup_choices` records which).
Both modes compute the same model up to float32 summation order (tests/test_protocol.py).
Methods change who trains how much by overriding `steps_for` (see federated/methods/).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmeerkat.federated.aggregate import Aggregate, aggregate_scalars, apply_aggregate
from fedmeerkat.federated.gradip import GradIPRecorder, chain, round_summary
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.schedule import lr_at
from fedmeerkat.zo import replay_many, round_seeds
from fedmeerkat.zo.seeds import mix

DOWNLINKS = ("sparse-weights", "scalars")


@dataclass(frozen=True)
class FedSettings:
    local_steps: int
    lr: float
    eps: float
    batch_size: int
    seed: int
    weighting: str = "samples"  # FedAvg weights: "samples" or "uniform"
    rounds: int = 1  # total rounds (the lr schedule spans rounds * local_steps)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    downlink: str = "sparse-weights"
    clients_per_round: int = 0  # 0 = every client every round
    device: str = "cpu"  # where the server's vectors live and its z is drawn (any device)

    def lrs(self, round_idx: int, num_seeds: int | None = None) -> list[float]:
        """Learning rate of each local step of a round with `num_seeds` seeds (default T): the
        schedule counts T steps per round, and steps beyond T (Meerkat-VP's calibration round)
        keep the round's last value. Client and server both derive it from the plan."""
        first = (round_idx - 1) * self.local_steps
        total = self.rounds * self.local_steps
        base = [lr_at(self.lr, self.lr_schedule, first + t, total) for t in range(self.local_steps)]
        n = self.local_steps if num_seeds is None else num_seeds
        return (base + [base[-1]] * max(0, n - len(base)))[:n]


@dataclass
class RoundOutcome:
    round: int
    train_loss: float  # sample-weighted mean of the clients' round losses
    client_steps: dict[int, int]
    dropped: list[int] = field(default_factory=list)  # clients whose reply was unusable
    extra: dict[str, Any] = field(default_factory=dict)  # method metrics, into metrics.jsonl
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # per-round trajectories


class MeerkatServer:
    method = "meerkat"
    # Downlinks that can carry this method's update: the scalar one only when every update is
    # along seeded directions.
    downlinks: tuple[str, ...] = DOWNLINKS

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int]):
        if not client_sizes or min(client_sizes) <= 0:
            raise ValueError("every client needs at least one example")
        if settings.downlink not in self.downlinks:
            raise ValueError(f"{self.method} needs downlink in {self.downlinks}, "
                             f"got {settings.downlink!r}")
        if settings.clients_per_round > len(client_sizes):
            raise ValueError(f"clients_per_round={settings.clients_per_round} exceeds "
                             f"{len(client_sizes)} clients")
        self.settings = settings
        self.theta = theta0.detach().to(settings.device, torch.float32, copy=True)
        self.client_sizes = list(client_sizes)
        self.round = 0  # last completed round
        self.history: dict[int, Aggregate] = {}  # scalar aggregates of past rounds (scalars mode)
        self.synced = [0] * len(client_sizes)  # round whose global model each client holds
        self.catchup_choices: dict[int, str] = {}  # client -> "scalars:N" | "vector", this round
        # Called with (step, z) for every z drawn while applying a round (GradIP analytics).
        self.step_observer: Callable[[int, torch.Tensor], None] | None = None
        self.calib_grad: torch.Tensor | None = None  # mask's mean calibration gradient

    def summary_extra(self) -> dict[str, Any]:
        """Method-specific entries for summary.json."""
        return {}

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    # ---- planning ----------------------------------------------------------------------
    def participants(self, round_idx: int) -> list[int]:
        m = self.settings.clients_per_round
        if not m or m >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng(mix(self.settings.seed, 3, round_idx))
        return sorted(int(k) for k in rng.choice(self.num_clients, size=m, replace=False))

    def steps_for(self, round_idx: int, client_id: int) -> int:
        return self.settings.local_steps

    def seeds(self, round_idx: int) -> list[int]:
        return round_seeds(self.settings.seed, round_idx, self.settings.local_steps)

    def update_seeds(self, round_idx: int) -> list[int]:
        """The seeds the round's update runs along: the plans' seeds, or a prefix of them when
        a method has clients run steps that are measured but not aggregated (Meerkat-VP's
        calibration phase, vp_calibration = "phase")."""
        return self.seeds(round_idx)

    def lrs(self, round_idx: int) -> list[float]:
        """Learning rate of each local step (one per seed); clients derive the same list."""
        return self.settings.lrs(round_idx, len(self.seeds(round_idx)))

    def plan_round(self, round_idx: int) -> list[RoundPlan]:
        if round_idx != self.round + 1:
            raise ValueError(f"round {round_idx} planned after round {self.round}")
        seeds = self.seeds(round_idx)
        self.catchup_choices = {}
        plans = []
        for k in self.participants(round_idx):
            plan = RoundPlan(round_idx, k, seeds, self.steps_for(round_idx, k), self.theta)
            if self.settings.downlink == "scalars":
                plan = self._cheaper_sync(plan, k)
            plans.append(plan)
        return plans

    def _cheaper_sync(self, vector_plan: RoundPlan, k: int) -> RoundPlan:
        """Missed aggregates or the vector, whichever serializes to fewer bytes."""
        missed = [self.history[r] for r in range(self.synced[k] + 1, vector_plan.round)]
        scalar_plan = RoundPlan(vector_plan.round, k, vector_plan.seeds, vector_plan.num_steps,
                                None, missed)
        if scalar_plan.nbytes() <= vector_plan.nbytes():
            self.catchup_choices[k] = f"scalars:{len(missed)}"
            return scalar_plan
        self.catchup_choices[k] = "vector"
        return vector_plan

    # ---- aggregation -------------------------------------------------------------------
    def _check(self, round_idx: int, reply: ClientReply) -> bool:
        if reply.round != round_idx:
            raise ValueError(f"reply of client {reply.client_id} is for round {reply.round}")
        want = self.steps_for(round_idx, reply.client_id)
        if len(reply.scalars) != want:
            raise ValueError(f"client {reply.client_id} sent {len(reply.scalars)} scalars, "
                             f"expected {want}")
        # A diverged client (inf/nan loss) would poison the average: leave it out this round.
        return all(math.isfinite(g) for g in reply.scalars)

    def _sort_replies(self, round_idx: int, replies: list[Any], usable_if: Callable[[Any], bool]
                      ) -> tuple[list[Any], list[Any], list[int]]:
        """(replies in client order, usable ones, dropped client ids), after the common checks."""
        expected = set(self.participants(round_idx))
        got = [r.client_id for r in replies]
        if len(set(got)) != len(got) or not set(got) <= expected:
            raise ValueError(f"round {round_idx}: unexpected or repeated replies from {got}")
        replies = sorted(replies, key=lambda r: r.client_id)  # fixed order: deterministic sums
        for r in replies:
            if r.round != round_idx:
                raise ValueError(f"reply of client {r.client_id} is for round {r.round}")
            # a client that replied holds round r-1's model; one that did not is caught up
            # from where it was (sync_client skips aggregates it already applied)
            self.synced[r.client_id] = round_idx - 1
        usable = [r for r in replies if usable_if(r)]
        return replies, usable, [r.client_id for r in replies if r not in usable]

    def _outcome(self, round_idx: int, replies: list[Any], usable: list[Any], dropped: list[int],
                 steps_of: Callable[[Any], int]) -> RoundOutcome:
        """Close the round: sample-weighted mean loss of the usable clients, per-client counts."""
        self.round = round_idx
        sizes = {r.client_id: self.client_sizes[r.client_id] for r in usable}
        total = sum(sizes.values())
        loss = sum(r.train_loss * sizes[r.client_id] for r in usable) / total if total else math.nan
        return RoundOutcome(round=round_idx, train_loss=loss,
                            client_steps={r.client_id: steps_of(r) for r in replies},
                            dropped=dropped)

    def apply(self, round_idx: int, replies: list[ClientReply]) -> RoundOutcome:
        replies, usable, dropped = self._sort_replies(
            round_idx, replies, lambda r: self._check(round_idx, r))
        seeds, wd = self.update_seeds(round_idx), self.settings.weight_decay
        lrs = self.settings.lrs(round_idx, len(seeds))  # a prefix of self.lrs(round_idx)
        weights = self._weights([r.client_id for r in usable])
        scalars = [r.scalars for r in usable]
        # GradIP (federated/gradip.py) for every method whose vector lives where c does
        recorder = (GradIPRecorder(self.calib_grad) if self.calib_grad is not None
                    and self.calib_grad.numel() == self.theta.numel() else None)
        observer = chain(self.step_observer, recorder)
        if self.settings.downlink == "scalars":
            agg = aggregate_scalars(round_idx, seeds, scalars, weights, lrs, wd)
            apply_aggregate(self.theta, agg, on_step=observer)
            self.history[round_idx] = agg
        elif usable:  # Algorithm 2: replay every virtual path, average the final vectors
            finals = replay_many(self.theta, seeds, scalars, lrs, on_step=observer,
                                 weight_decay=wd)
            new = torch.zeros_like(self.theta)
            for w, theta_k in zip(weights, finals, strict=True):
                new.add_(theta_k * torch.tensor(w, dtype=torch.float32))
            self.theta = new
        outcome = self._outcome(round_idx, replies, usable, dropped, lambda r: len(r.scalars))
        if recorder is not None and usable:  # trajectories/round_XXXXX.safetensors
            outcome.arrays.update(recorder.trajectories([r.client_id for r in usable], scalars,
                                                        len(seeds)))
            outcome.extra["gradip_abs_mean"] = round_summary(outcome.arrays)
        return outcome

    def _weights(self, client_ids: list[int]) -> list[float]:
        if not client_ids:
            return []
        if self.settings.weighting == "uniform":
            return [1.0 / len(client_ids)] * len(client_ids)
        sizes = [self.client_sizes[k] for k in client_ids]
        return [s / sum(sizes) for s in sizes]

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): everything needed to continue bit-identically.
        CPU tensors; on the CPU they share memory with the live state (no model-size copy), so
        save them before the next round changes it."""
        tensors = {"server.theta": self.theta.cpu()}
        rounds = sorted(self.history)
        if rounds:  # flat: rounds may differ in length (Meerkat-VP's calibration round)
            tensors["server.history_coefs"] = torch.tensor(
                [c for r in rounds for c in self.history[r].coefs], dtype=torch.float32)
        meta = {
            "round": self.round,
            "synced": list(self.synced),
            "history": [{"round": r, "seeds": self.history[r].seeds, "decay": self.history[r].decay}
                        for r in rounds],
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.round = int(meta["round"])
        self.synced = [int(x) for x in meta["synced"]]
        self.theta = tensors["server.theta"].to(self.settings.device, torch.float32, copy=True)
        coefs = tensors.get("server.history_coefs")
        self.history = {}
        at = 0
        for h in meta["history"]:
            assert coefs is not None
            n = len(h["seeds"])
            self.history[int(h["round"])] = Aggregate(int(h["round"]), list(h["seeds"]),
                                                      coefs[at:at + n].tolist(), float(h["decay"]))
            at += n
