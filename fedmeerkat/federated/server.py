"""Server logic of the federated methods as transport-free state machines.

    plans   = server.plan_round(r)                 # seeds, step counts, the model to start from
    replies = [run_client(...) for each plan]      # the runner decides how and where
    verdict = server.screen(r, replies)            # which replies the round may use; no effects
    outcome = server.apply(r, verdict)             # the method's update, bookkeeping

`BaseServer` owns all of it but the update: `plan_round` keeps what it sent (`SentPlan`), so
screening and the update read the round as planned, not as the state would plan it after the
update began changing it. A method is its `aggregate` hook (and its planning: `steps_for`,
`seeds`, `update_seeds`); `MeerkatServer` is Meerkat's (see federated/methods/).

Seeds are derived (zo.seeds.round_seeds) and shared by every client in a round (DeComFL
lineage): one z per step then serves all clients, and the update can travel as scalars.
Nor do the learning rates travel: the downlink is seeds and scalars, and both sides derive
each seed's lr with `FedSettings.lrs` from the same run config and plan fields (round, number
of seeds). Sending them would cost 4 bytes per seed per client per round.

Downlink modes:
- `sparse-weights` (paper Algorithm 2): the server averages the clients' virtual paths (in
  closed form: one pass over the aggregated scalars, see `MeerkatServer.aggregate`) and sends
  the sparse vector.
- `scalars`: the server aggregates the scalars (federated/aggregate.py) and sends T+1 floats;
  every party applies them with the same code, so all copies of the model are bit-identical.
  With T=1 this is the paper's high-frequency synchronization (Algorithm 3). A client that
  missed rounds catches up from the aggregates it missed, or gets the vector when that is
  fewer bytes (`catchup_choices` records which).
Both modes compute the bit-identical model (tests/test_protocol.py); they differ in bytes.

Replies are screened before anything is applied (federated/validate.py: type, sender, round,
length, finiteness, a bound on |g|); `apply` uses only the replies the verdict accepted and
never raises on what a client sent. A rejected reply leaves the server exactly as if that
client had not replied: its `synced` and `applied` rounds stay where they were, so it is
caught up later like any client that missed the round. `screen` or `apply` of any round but
the one planned and not yet applied is the caller's bug and raises ValueError.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmeerkat.federated.aggregate import Aggregate, aggregate_scalars, apply_aggregate
from fedmeerkat.federated.gradip import GradIPRecorder, chain, round_summary
from fedmeerkat.federated.messages import MAX_CATCHUP, ClientReply, RoundPlan
from fedmeerkat.federated.schedule import lr_at
from fedmeerkat.federated.validate import (
    ReplyBound,
    Screened,
    clip_scalars,
    max_abs_scalar,
    screen_replies,
)
from fedmeerkat.zo import round_seeds
from fedmeerkat.zo.seeds import PARTICIPANTS, mix

DOWNLINKS = ("sparse-weights", "scalars")
CLIENT_SAMPLINGS = ("uniform", "size")  # sampled_clients


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
    # how clients_per_round are drawn: "uniform", or "size" (probability proportional to
    # examples: `sampled_clients`)
    client_sampling: str = "uniform"
    device: str = "cpu"  # where the server's vectors live and its z is drawn (any device)
    # screening of replies (federated/validate.py): bound on max |g| relative to the round's
    # median (0 = off), a fixed cap (0 = off), and what to do with a reply above it
    reply_bound: float = 100.0
    reply_bound_abs: float = 0.0
    reply_bound_action: str = "reject"
    # directions per local step (zo.step.zo_multi_step) and how each is estimated. A step of P
    # directions is P consecutive seeds ("virtual steps") of lr / P each to everything after
    # the client: plans carry T * P seeds and replies T * P scalars.
    perturbations: int = 1
    estimator: str = "two-point"

    @property
    def seeds_per_round(self) -> int:
        return self.local_steps * self.perturbations

    def lrs(self, round_idx: int, num_seeds: int | None = None) -> list[float]:
        """Learning rate of each seed of a round with `num_seeds` seeds (default T * P): the
        schedule counts T steps per round, each step's lr is split over its P directions, and
        seeds beyond T * P (Meerkat-VP's calibration round) keep the round's last value.
        The one place lrs are computed: the server calls it when it plans (SentPlan.lrs), each
        client with its plan's round and seed count (they never travel: module docstring)."""
        first = (round_idx - 1) * self.local_steps
        total = self.rounds * self.local_steps
        p = self.perturbations
        base = [lr_at(self.lr, self.lr_schedule, first + t, total) / p
                for t in range(self.local_steps) for _ in range(p)]
        n = self.seeds_per_round if num_seeds is None else num_seeds
        return (base + [base[-1]] * max(0, n - len(base)))[:n]


@dataclass
class RoundOutcome:
    round: int
    train_loss: float  # sample-weighted mean of the clients' round losses
    client_steps: dict[int, int]  # accepted clients -> their step count
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why its reply was unused
    clipped: dict[int, str] = field(default_factory=dict)  # client -> its reply was clipped
    extra: dict[str, Any] = field(default_factory=dict)  # method metrics, into metrics.jsonl
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # per-round trajectories


@dataclass(frozen=True)
class SentPlan:
    """What `plan_round` sent for a round, kept for `screen` and the update of that round."""

    round: int
    steps: dict[int, int]  # participant -> seeds it runs (RoundPlan.num_steps), in client order
    seeds: list[int]  # the plans' seeds
    update_seeds: list[int]  # the prefix of `seeds` the update runs along
    lrs: list[float]  # one per seed: FedSettings.lrs(round, len(seeds)), as every client has it

    @property
    def participants(self) -> list[int]:
        return list(self.steps)

    @property
    def update_lrs(self) -> list[float]:
        return self.lrs[: len(self.update_seeds)]


def sampled_clients(settings: FedSettings, round_idx: int, client_sizes: Sequence[int]
                    ) -> list[int]:
    """The clients taking part in round `round_idx`: all of them, or clients_per_round drawn
    from the run seed, so the whole schedule is known before the run starts. Drawn uniformly
    (Flower's default), or with client_sampling = "size" in proportion to each client's
    examples (without replacement; Li et al., ICLR 2020, "On the convergence of FedAvg on
    non-IID data", Scheme I). Why size: with few clients a round, a uniform draw weights every
    client's data alike whatever its size, so a client of a dozen examples in a Dirichlet split
    gets a tenth of a ten-client run's steps; drawn by size, one client a round steps on the
    pooled data's distribution in expectation (measured both ways in the learning benchmark:
    README, "Does it learn?", Federated)."""
    m, n = settings.clients_per_round, len(client_sizes)
    if not m or m >= n:
        return list(range(n))
    rng = np.random.default_rng(mix(settings.seed, PARTICIPANTS, round_idx))
    if settings.client_sampling == "size":
        p = np.asarray(client_sizes, dtype=np.float64)
        return sorted(int(k) for k in rng.choice(n, size=m, replace=False, p=p / p.sum()))
    return sorted(int(k) for k in rng.choice(n, size=m, replace=False))


class BaseServer(ABC):
    """Planning, screening, the bookkeeping of synced and applied rounds, the round's outcome
    and checkpoints, for every method; the method's update is `aggregate`."""

    method: str  # the registry's name
    # Downlinks that can carry this method's update: the scalar one only when every update is
    # along seeded directions.
    downlinks: tuple[str, ...] = DOWNLINKS
    reply_type: type = ClientReply  # the reply message this method expects
    clip_ok = True  # False: reply_bound_action = "clip" rejects instead (see validate.py)
    acknowledges = False  # plans tell each client the last round its reply was applied
    # perturbations > 1 / zo_estimator = one-sided (FedSettings): the client runs
    # zo.step.zo_multi_step. False where a method's steps are not plain seeded ZO-SGD steps
    # (its step counts, update hook or client routine assume one direction a step).
    directions_ok = True

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int]):
        # the sizes are the FedAvg weights (and a deployed site reports its own): a NaN, a
        # fraction or a bool would weight the average silently
        bad = next(((k, n) for k, n in enumerate(client_sizes)
                    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0),
                   None)
        if not client_sizes or bad is not None:
            raise ValueError("every client needs a positive integer number of examples (" +
                             ("no clients" if bad is None else f"client {bad[0]}: {bad[1]!r}") +
                             ")")
        if settings.downlink not in self.downlinks:
            raise ValueError(f"{self.method} needs downlink in {self.downlinks}, "
                             f"got {settings.downlink!r}")
        if not self.directions_ok and (settings.perturbations != 1
                                       or settings.estimator != "two-point"):
            raise ValueError(f"{self.method} runs one two-point direction a step "
                             "(perturbations=1, zo_estimator=two-point)")
        if settings.clients_per_round > len(client_sizes):
            raise ValueError(f"clients_per_round={settings.clients_per_round} exceeds "
                             f"{len(client_sizes)} clients")
        self.settings = settings
        self.bound = ReplyBound(settings.reply_bound, settings.reply_bound_abs,
                                settings.reply_bound_action)
        self.theta = theta0.detach().to(settings.device, torch.float32, copy=True)
        self.client_sizes = list(client_sizes)
        self.round = 0  # last completed round
        self.plan: SentPlan | None = None  # the last plan_round's; its round is in progress
        # scalars mode: the past rounds' aggregates some client may still be sent (pruned)
        self.history: dict[int, Aggregate] = {}
        self.synced = [0] * len(client_sizes)  # round whose global model each client holds
        self.applied = [0] * len(client_sizes)  # last round each client's reply was applied
        self.catchup_choices: dict[int, str] = {}  # client -> "scalars:N" | "vector", this round
        self.calib_grad: torch.Tensor | None = None  # mask's mean calibration gradient

    def summary_extra(self) -> dict[str, Any]:
        """Method-specific entries for summary.json."""
        return {}

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    # ---- planning ----------------------------------------------------------------------
    def participants(self, round_idx: int) -> list[int]:
        return sampled_clients(self.settings, round_idx, self.client_sizes)

    @classmethod
    def planned_steps(cls, settings: FedSettings, client_sizes: Sequence[int], **options: Any
                      ) -> dict[int, int]:
        """client -> the most seeds it can be planned to run over the whole run, known before
        the run starts (its seeded participation, `sampled_clients`, times the most seeds a
        round can give it); `options` are the method's server options. Differential privacy
        solves sigma for this (runners/prepare.with_solved_noise). A method that plans more
        seeds in some rounds (Meerkat-VP's calibration round) overrides it."""
        steps = dict.fromkeys(range(len(client_sizes)), 0)
        for r in range(1, settings.rounds + 1):
            for k in sampled_clients(settings, r, client_sizes):
                steps[k] += settings.seeds_per_round
        return steps

    def steps_for(self, round_idx: int, client_id: int) -> int:
        """Seeds (scalars) client_id runs in the round: T, or T * P with P directions a step."""
        return self.settings.seeds_per_round

    def seeds(self, round_idx: int) -> list[int]:
        return round_seeds(self.settings.seed, round_idx, self.settings.seeds_per_round)

    def update_seeds(self, seeds: list[int]) -> list[int]:
        """The prefix of the round's seeds the update runs along: all of them, or fewer when a
        method has clients run steps that are measured but not aggregated (Meerkat-VP's
        calibration phase, vp_calibration = "phase")."""
        return seeds

    def plan_round(self, round_idx: int) -> list[RoundPlan]:
        """The round's plans, one per participant; kept as `self.plan`. Planning the same
        round again (a retry) plans the same participants and seeds."""
        if round_idx != self.round + 1:
            raise ValueError(f"round {round_idx} planned after round {self.round}")
        seeds = self.seeds(round_idx)
        steps = {k: self.steps_for(round_idx, k) for k in self.participants(round_idx)}
        self.plan = SentPlan(round_idx, steps, seeds, self.update_seeds(seeds),
                             self.settings.lrs(round_idx, len(seeds)))
        self.catchup_choices = {}
        plans = []
        for k, n in steps.items():
            plan = RoundPlan(round_idx, k, seeds, n, self.theta,
                             applied=self.applied[k] if self.acknowledges else None)
            if self.settings.downlink == "scalars":
                plan = self._cheaper_sync(plan, k)
            plans.append(plan)
        return plans

    def _cheaper_sync(self, vector_plan: RoundPlan, k: int) -> RoundPlan:
        """Missed aggregates or the vector, whichever serializes to fewer bytes."""
        missed = self._catchup(self.synced[k], vector_plan.round)
        if missed is not None:
            self.catchup_choices[k] = f"scalars:{len(missed)}"
            return RoundPlan(vector_plan.round, k, vector_plan.seeds, vector_plan.num_steps,
                             None, missed, vector_plan.applied)
        self.catchup_choices[k] = "vector"
        return vector_plan

    def _catchup(self, synced: int, round_idx: int) -> list[Aggregate] | None:
        """The aggregates a client holding round `synced`'s model misses before `round_idx`, or
        None when the vector is no more bytes (both plans carry the same seeds and `applied`,
        so the catch-up is compared with the vector alone), when they exceed MAX_CATCHUP or
        when they were pruned (`_prune_history`)."""
        rounds = range(synced + 1, round_idx)
        if len(rounds) > MAX_CATCHUP or any(r not in self.history for r in rounds):
            return None
        missed = [self.history[r] for r in rounds]
        catchup = RoundPlan(round_idx, 0, [], 0, None, missed).nbytes()
        return missed if catchup <= RoundPlan(round_idx, 0, [], 0, self.theta).nbytes() else None

    def _prune_history(self) -> None:
        """Drop the aggregates no client will be sent. A client's catch-up from where it is
        only grows as rounds pass while the vector's size is fixed, so once the vector is
        cheaper (or the catch-up exceeds MAX_CATCHUP) it gets the vector until it syncs again:
        what is older than the oldest catch-up still worth sending can go. This bounds the
        history, and the checkpoint that holds it, whatever the number of rounds."""
        keep = self.round + 1
        for s in sorted(set(self.synced)):  # the slowest client whose catch-up still pays
            if self._catchup(s, self.round + 1) is not None:
                keep = s + 1
                break
        for r in [r for r in self.history if r < keep]:
            del self.history[r]

    def _planned(self, round_idx: int) -> SentPlan:
        """The kept plan of `round_idx` if that is the round in progress."""
        plan = self.plan
        if plan is None or plan.round != round_idx or round_idx != self.round + 1:
            raise ValueError(f"round {round_idx} is not in progress (last planned: "
                             f"{plan.round if plan else None}, last applied: {self.round})")
        return plan

    # ---- screening ---------------------------------------------------------------------
    def _magnitude(self, reply: Any) -> float:
        """m_k of the reply bound (validate.py): max |g| of a scalar reply."""
        return max_abs_scalar(reply)

    def _clip(self, reply: Any, limit: float) -> Any:
        return clip_scalars(reply, limit)

    def screen(self, round_idx: int, replies: list[Any],
               sources: Mapping[int, Hashable] | None = None) -> Screened:
        """Which replies the planned round `round_idx` may use, and why not the others;
        changes nothing. Pass the verdict to `apply`. `sources`: client -> who sends its
        replies (the deployed sites), for the reply bound's median (None: each client)."""
        return screen_replies(
            round_idx, replies, expected_steps=self._planned(round_idx).steps,
            reply_type=self.reply_type, bound=self.bound, magnitude=self._magnitude,
            clip=self._clip if self.clip_ok else None, vector_size=self.theta.numel(),
            sources=sources)

    # ---- the update --------------------------------------------------------------------
    def apply(self, round_idx: int, verdict: Screened) -> RoundOutcome:
        """Close the planned round with the replies `verdict` (this round's `screen`)
        accepted. Only an accepted client counts as holding round r-1's model and as applied
        this round; one whose reply was lost or rejected is caught up later from where it was
        (sync_client skips aggregates it already applied)."""
        plan = self._planned(round_idx)
        usable = verdict.accepted
        if any(r.round != round_idx or r.client_id not in plan.steps for r in usable):
            raise ValueError(f"the verdict is not one of round {round_idx}'s screen")
        outcome = self.aggregate(plan, usable, verdict)
        for r in usable:
            self.synced[r.client_id] = round_idx - 1
            self.applied[r.client_id] = round_idx
        self.round = round_idx
        self._prune_history()
        return outcome

    @abstractmethod
    def aggregate(self, plan: SentPlan, usable: list[Any], verdict: Screened) -> RoundOutcome:
        """The method's update of the global model from the usable replies (in client order)
        of the round `plan` sent, and the round's outcome (`_outcome`). `verdict` is the
        screen's, for the outcome's record; a method that reshapes replies passes its own
        `usable` on."""

    def _outcome(self, round_idx: int, usable: list[Any], verdict: Screened,
                 steps_of: Callable[[Any], int] = lambda r: len(r.scalars)) -> RoundOutcome:
        """The round's record: sample-weighted mean loss of the usable clients, their step
        counts (`steps_of` a reply), the screen's rejections and clips."""
        sizes = {r.client_id: self.client_sizes[r.client_id] for r in usable}
        total = sum(sizes.values())
        loss = sum(r.train_loss * sizes[r.client_id] for r in usable) / total if total else math.nan
        return RoundOutcome(round=round_idx, train_loss=loss,
                            client_steps={r.client_id: steps_of(r) for r in usable},
                            rejected=dict(verdict.rejected), clipped=dict(verdict.clipped))

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
            "applied": list(self.applied),
            "history": [{"round": r, "seeds": self.history[r].seeds, "decay": self.history[r].decay}
                        for r in rounds],
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.round = int(meta["round"])
        self.plan = None  # a plan is made from the state: one kept from before does not hold
        self.synced = [int(x) for x in meta["synced"]]
        # checkpoints written before acknowledgements: no client holds a pending update then
        self.applied = [int(x) for x in meta.get("applied", [0] * len(self.synced))]
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
        self._prune_history()  # a checkpoint written before pruning holds every round


class MeerkatServer(BaseServer):
    """Meerkat (paper Algorithm 2): FedAvg of the clients' virtual paths, in closed form."""

    method = "meerkat"

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int]):
        super().__init__(settings, theta0, client_sizes)
        # Called with (step, z) for every z drawn while applying a round (GradIP analytics).
        self.step_observer: Callable[[int, torch.Tensor], None] | None = None

    def aggregate(self, plan: SentPlan, usable: list[ClientReply], verdict: Screened
                  ) -> RoundOutcome:
        seeds, wd = plan.update_seeds, self.settings.weight_decay
        weights = self._weights([r.client_id for r in usable])
        scalars = [r.scalars for r in usable]
        # GradIP (federated/gradip.py) for every method whose vector lives where c does
        recorder = (GradIPRecorder(self.calib_grad) if self.calib_grad is not None
                    and self.calib_grad.numel() == self.theta.numel() else None)
        observer = chain(self.step_observer, recorder)
        # Algorithm 2 averages the clients' replayed virtual paths. Each path is linear in its
        # scalars (theta_k = decay_k theta - sum_t c_kt z_t), so their average is one pass
        # over the aggregated coefficients: the same model in exact arithmetic, drawn with T z
        # and T updates whatever K is (replaying K paths costs K*T updates and K copies). Both
        # downlinks therefore compute the bit-identical model; they differ only in what they
        # send. No server replays paths with zo.step.replay_many: tests/test_protocol.py does,
        # to check this identity, and benchmarks/step_cost.py times it; FedDyn replays each
        # client with its own step (replay_feddyn) to mirror its h_k.
        agg = aggregate_scalars(plan.round, seeds, scalars, weights, plan.update_lrs, wd)
        if usable:
            apply_aggregate(self.theta, agg, on_step=observer)
        if self.settings.downlink == "scalars":
            self.history[plan.round] = agg
        outcome = self._outcome(plan.round, usable, verdict)
        if recorder is not None and usable:  # trajectories/round_XXXXX.safetensors
            outcome.arrays.update(recorder.trajectories([r.client_id for r in usable], scalars,
                                                        len(seeds)))
            outcome.extra["gradip_abs_mean"] = round_summary(outcome.arrays)
        return outcome
