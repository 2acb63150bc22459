"""Meerkat-VP (paper Algorithm 1): virtual-path client selection.

Meerkat-VP = Meerkat + Virtual Path Client Selection: the server reads every client's GradIP
trajectory off its virtual path (federated/gradip.py), flags extreme non-IID clients and
early-stops them: from then on they run ONE local step per round (one scalar up). Their data
pointer (data/pointer.py) continues where it stopped, so over enough rounds they still visit
every example they hold.

Procedure, per client:
  1. Calibration, in one of two ways (`vp_calibration`):
     "round" (default, ours): the first round a client takes part in is its calibration round,
     in which it runs T_cali' = max(T, T_cali) local steps (`vp_calibration_steps`) instead of
     T. With every client in every round (the default) that is round 1 for all. The round is
     an ordinary round otherwise: same plan, and its updates are aggregated like any round's.
     "phase" (Algorithm 1 as written): in the first round a client takes part in, it first
     runs a calibration phase of T_cali local steps from the global model it received, on the
     batches its data pointer would give next, read from a copy of the pointer (so its
     training data order is Meerkat's), and uploads those T_cali scalars for GradIP only:
     they are never aggregated and the calibration path is thrown away. It then runs its
     ordinary T training steps from the same global model, aggregated as usual. The plan
     carries T + T_cali seeds (the round's T training seeds, then T_cali calibration seeds)
     and num_steps = T + T_cali; the reply carries the T training scalars, then the T_cali
     calibration scalars. Training is then step for step Meerkat's until clients are stopped
     (compute-matched, plus T_cali forward pairs per client for the measurement). Needs
     T <= T_cali (a client tells a calibration plan by num_steps > T_cali).
  2. Detection (Algorithm 1 step 2) on its first T_cali GradIPs, as magnitudes |GradIP| in
     the configured units (below): init_mean = mean of the first T_init, later_mean = mean of
     the last T_later; rho_later_client = init_mean / later_mean; rho_quie_client = share of the
     last T_later steps with |GradIP| < sigma. Flagged when rho_later_client > rho_later
     (`vp_later_ratio`) OR rho_quie_client > rho_quie (`vp_quiescent_ratio`).
  3. Early stopping: a flagged client runs 1 step in every later round.

Decisions the paper leaves open (also in the README):
  - Absolute GradIP. Definition 2.3 is a signed inner product, but with seeds drawn at random
    its sign is the sign of g * <c, z>, a coin flip from step to step (the cosine stays near
    zero, Fig. 8a). Signed, the mean of 20 steps is near zero and may be negative (the ratio
    of means is then meaningless), and "GradIP < sigma" would count every negative step as
    quiescent, so an IID client would sit at rho_quie ~ 0.5 by chance alone. The paper's
    plotted GradIP curves are all non-negative, and the mechanism it describes (the norm of
    the local gradient decays, Fig. 8b) is about magnitude. So both ratios use |GradIP|; the
    trajectories on disk keep the sign.
  - Calibration inside training. The calibration round is round 1 (a client's first round),
    with T_cali steps, aggregated like any other round, rather than a separate phase whose
    steps are thrown away: the paper's workflow (Fig. 5) starts with "Step 0: Local Training",
    a separate phase would cost every client T_cali extra forward pairs and a round trip that
    do not train the model, and its data would have to be either discarded or re-read. The
    cost of our choice is that round 1 is longer (T_cali vs T steps), so a non-IID client
    drifts further in that one round. Its learning rates are round 1's schedule, the last
    value held for the steps beyond T (lr schedules count T steps per round).
  - Units of sigma: "calib-unit" (default, `vp_gradip_units`) divides GradIP by ||c||, i.e.
    uses g * <c/||c||, z>. <c/||c||, z> ~ N(0, 1) whatever the model, mask size, calibration
    corpus or number of calibration sequences, so what remains is in units of the client's own
    projected gradient g (loss per unit step along z), and sigma = 1 means "|g| below about
    1". In "raw" units sigma would also scale with ||c||, a property of the reference gradient,
    not of the client. rho_later is unit-free either way.

Random Client Selection (`meerkat-random-select`) is in random_select.py.

State (calibration results, detected and stopped clients) is JSON metadata in
state_dict/load_state_dict, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated.client import ClientState, check_steps, run_client, sync_client
from fedmeerkat.federated.gradip import GRADIP_UNITS, GradIPRecorder, VPRatios, vp_ratios
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import (
    FedSettings,
    MeerkatServer,
    RoundOutcome,
    SentPlan,
    sampled_clients,
)
from fedmeerkat.federated.validate import Screened
from fedmeerkat.options import setting
from fedmeerkat.zo import draw_z, round_seeds

CALIBRATIONS = ("round", "phase")


@dataclass(frozen=True)
class VPSettings:
    """The config keys of Meerkat-VP (defaults from the paper's Tables 3 and 5)."""

    calibration_steps: int = setting(100, "local steps each client runs in the VP calibration phase (T_cali)", key="vp_calibration_steps", min=1)
    init_steps: int = setting(20, "earliest calibration steps averaged for the initial GradIP (T_init)", key="vp_init_steps", min=1)
    later_steps: int = setting(20, "latest calibration steps averaged for the later GradIP (T_later)", key="vp_later_steps", min=1)
    threshold: float = setting(1.0, "GradIP below this counts as quiescent (convergence threshold sigma)", key="vp_threshold", min=0)
    quiescent_ratio: float = setting(0.5, "flag a client whose share of quiescent later steps exceeds this (rho_quie)", key="vp_quiescent_ratio", min=0, max=1)
    later_ratio: float = setting(5.0, "flag a client whose initial/later mean GradIP ratio exceeds this (rho_later)", key="vp_later_ratio", gt=0)
    units: str = setting("calib-unit", "units of |GradIP| for vp_threshold: calib-unit (GradIP / ||calibration gradient||) or raw", key="vp_gradip_units", choices=GRADIP_UNITS)
    calibration: str = setting("round", "round: a client's first round runs max(T, T_cali) steps and is aggregated (ours) | phase: Algorithm 1's separate calibration phase of T_cali steps, measured and not aggregated, then T training steps", key="vp_calibration", choices=CALIBRATIONS)

    def check_common(self, common: dict[str, Any]) -> None:
        """Checks against the common keys {key: value} (called by config.validate_combination)."""
        if self.calibration == "phase" and common["local_steps"] > self.calibration_steps:
            raise ValueError(f"vp_calibration = 'phase' needs local_steps <= vp_calibration_steps "
                             f"(got {common['local_steps']} > {self.calibration_steps})")

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.units not in GRADIP_UNITS:
            raise ValueError(f"units must be one of {GRADIP_UNITS}, got {self.units!r}")
        if min(self.calibration_steps, self.init_steps, self.later_steps) < 1:
            raise ValueError("VP step counts must be >= 1")
        if self.init_steps + self.later_steps > self.calibration_steps:
            raise ValueError(f"vp_init_steps + vp_later_steps ({self.init_steps} + "
                             f"{self.later_steps}) exceed vp_calibration_steps "
                             f"({self.calibration_steps})")


def calibration_len(vp: VPSettings, local_steps: int) -> int:
    """Seeds of a client's calibration round: T + T_cali with a calibration phase, else
    max(T, T_cali)."""
    if vp.calibration == "phase":
        return local_steps + vp.calibration_steps
    return max(local_steps, vp.calibration_steps)


class VPServer(MeerkatServer):
    directions_ok = False
    method = "meerkat-vp"
    selection = "gradip"  # who is early-stopped: the flagged clients

    def __init__(self, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int], *,
                 vp: VPSettings | None = None):
        super().__init__(settings, theta0, client_sizes)
        self.vp = vp or VPSettings()
        self.calibrated: dict[int, VPRatios] = {}  # client -> its calibration result
        self.detected: list[int] = []  # flagged as extreme non-IID by GradIP
        self.stopped: list[int] = []  # early-stopped: one local step per round
        if self.phase and settings.local_steps > self.vp.calibration_steps:
            raise ValueError(f"calibration phase needs local_steps <= calibration_steps "
                             f"({settings.local_steps} > {self.vp.calibration_steps})")

    # ---- planning ----------------------------------------------------------------------
    @property
    def phase(self) -> bool:
        return self.vp.calibration == "phase"

    @property
    def calibration_len(self) -> int:
        """Steps a calibrating client runs in its round (and seeds of that round)."""
        return calibration_len(self.vp, self.settings.local_steps)

    @classmethod
    def planned_steps(cls, settings: FedSettings, client_sizes: Sequence[int], **options: Any
                      ) -> dict[int, int]:
        """As BaseServer's, with a client's first round its calibration round (more seeds);
        early stopping only lowers the count (one step a round)."""
        vp = options.get("vp") or VPSettings()
        first = calibration_len(vp, settings.local_steps)
        steps = super().planned_steps(settings, client_sizes)
        seen: set[int] = set()
        for r in range(1, settings.rounds + 1):
            for k in sampled_clients(settings, r, client_sizes):
                if k not in seen:
                    seen.add(k)
                    steps[k] += first - settings.seeds_per_round
        return steps

    def _calibrating(self, round_idx: int) -> bool:
        return any(k not in self.calibrated for k in self.participants(round_idx))

    def steps_for(self, round_idx: int, client_id: int) -> int:
        if client_id not in self.calibrated:
            return self.calibration_len
        if client_id in self.stopped:
            return 1
        return self.settings.local_steps

    def seeds(self, round_idx: int) -> list[int]:
        n = self.calibration_len if self._calibrating(round_idx) else self.settings.local_steps
        return round_seeds(self.settings.seed, round_idx, n)

    def update_seeds(self, seeds: list[int]) -> list[int]:
        if self.phase:  # the calibration seeds beyond T are measured, not aggregated
            return seeds[: self.settings.local_steps]
        return seeds

    # ---- detection ---------------------------------------------------------------------
    def aggregate(self, plan: SentPlan, usable: list[ClientReply], verdict: Screened
                  ) -> RoundOutcome:
        if self.calib_grad is None or self.calib_grad.numel() != self.theta.numel():
            raise ValueError(f"{self.method} needs the mask's calibration gradient (GradIP)")
        if self.phase:
            return self._aggregate_phase(plan, usable, verdict)
        outcome = super().aggregate(plan, usable, verdict)
        if outcome.arrays:
            self._detect(plan.round, outcome, outcome.arrays)
        return outcome

    def _aggregate_phase(self, plan: SentPlan, usable: list[ClientReply], verdict: Screened
                         ) -> RoundOutcome:
        """Algorithm 1 as written: the screen saw the whole replies (T training + T_cali
        calibration scalars for a calibrating client); each accepted calibrating reply is split
        into its T training scalars (aggregated as usual) and its T_cali calibration scalars
        (GradIP)."""
        t = self.settings.local_steps
        calib: dict[int, list[float]] = {}
        stripped = []
        for r in usable:
            if plan.steps[r.client_id] > t:  # a calibration plan: T + T_cali seeds
                calib[r.client_id] = list(r.scalars[t:])
                r = dataclasses.replace(r, scalars=list(r.scalars[:t]))
            stripped.append(r)
        outcome = super().aggregate(plan, stripped, verdict)
        ids = sorted(calib)
        if ids:
            assert self.calib_grad is not None
            recorder = GradIPRecorder(self.calib_grad)
            for i, seed in enumerate(plan.seeds[t:]):
                recorder(i, draw_z(seed, self.theta.numel(), device=self.theta.device))
            traj = recorder.trajectories(ids, [calib[k] for k in ids], self.vp.calibration_steps)
            outcome.arrays.update({f"calibration_{k}": v for k, v in traj.items()})
            self._detect(plan.round, outcome, traj)
        return outcome

    def _detect(self, round_idx: int, outcome: RoundOutcome,
                arrays: dict[str, torch.Tensor]) -> None:
        """Algorithm 1 step 2 on the new calibration trajectories in `arrays` (clients, gradip,
        calib_norm); records the flags in the outcome."""
        scale = float(arrays["calib_norm"][0]) if self.vp.units == "calib-unit" else 1.0
        if scale <= 0:
            raise ValueError("the calibration gradient is zero: GradIP is undefined")
        new: dict[int, VPRatios] = {}
        for k, row in zip(arrays["clients"].tolist(), arrays["gradip"], strict=True):
            if k in self.calibrated:
                continue
            new[k] = vp_ratios(row[: self.vp.calibration_steps].numpy(),
                               init_steps=self.vp.init_steps, later_steps=self.vp.later_steps,
                               threshold=self.vp.threshold, later_ratio=self.vp.later_ratio,
                               quiescent_ratio=self.vp.quiescent_ratio, scale=scale)
        if not new:
            return
        self.calibrated.update(new)
        self.detected = sorted(k for k, v in self.calibrated.items() if v.flagged)
        self._select(round_idx)
        outcome.extra["vp"] = {
            "calibrated": {str(k): v.to_dict() for k, v in sorted(new.items())},
            "detected": list(self.detected), "early_stopped": list(self.stopped),
            "selection": self.selection, "units": self.vp.units,
            "calibration": self.vp.calibration,
        }
        ratios = ", ".join(f"{k}: {v.rho_later:.2f}/{v.rho_quie:.2f}"
                           for k, v in sorted(new.items()))
        outcome.extra["log"] = (
            f"{self.method} calibrated clients {sorted(new)} (rho_later/rho_quie {ratios}; "
            f"limits {self.vp.later_ratio}/{self.vp.quiescent_ratio}); GradIP flags "
            f"{self.detected}; early-stopped ({self.selection}): {self.stopped}")

    def _select(self, round_idx: int) -> None:
        self.stopped = list(self.detected)

    def summary_extra(self) -> dict[str, Any]:
        return {
            "vp_selection": self.selection,
            "vp_detected": list(self.detected),
            "vp_early_stopped": list(self.stopped),
            "vp_ratios": {str(k): v.to_dict() for k, v in sorted(self.calibrated.items())},
            "vp_uncalibrated": [k for k in range(self.num_clients) if k not in self.calibrated],
            "vp_settings": dataclasses.asdict(self.vp),
        }

    # ---- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        meta["vp"] = {
            "calibrated": {str(k): v.to_dict() for k, v in sorted(self.calibrated.items())},
            "detected": list(self.detected),
            "stopped": list(self.stopped),
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        vp = meta["vp"]
        self.calibrated = {int(k): VPRatios.from_dict(v) for k, v in vp["calibrated"].items()}
        self.detected = [int(k) for k in vp["detected"]]
        self.stopped = [int(k) for k in vp["stopped"]]


def run_phase_client(state: ClientState, plan: RoundPlan, model: Any, *, calibration_steps: int,
                     eps: float, lr: list[float], batch_size: int, weight_decay: float = 0.0,
                     on_step: Any = None) -> ClientReply:
    """The client of vp_calibration = "phase". A plan with more than T_cali steps is a
    calibration plan: T_cali calibration steps along seeds[T:] from the global model, on a copy
    of the data pointer (measured, then thrown away), then the T training steps along
    seeds[:T] from the same global model and the real pointer. Reply: the T training scalars,
    then the T_cali calibration scalars; its loss is the training steps' mean. Any other plan
    is an ordinary round (run_client)."""
    common = dict(eps=eps, batch_size=batch_size, weight_decay=weight_decay, on_step=on_step)
    if plan.num_steps <= calibration_steps:
        return run_client(state, plan, model, lr=lr, **common)
    check_steps(plan, lr)
    t, n = plan.num_steps - calibration_steps, plan.num_steps
    theta = sync_client(state, plan, device=model.view.device)  # catch-up, once
    probe = ClientState(state.client_id, state.example_ids,
                        ClientDataPointer.from_state(state.pointer.state_dict()))
    calib = run_client(probe, RoundPlan(plan.round, plan.client_id, list(plan.seeds[t:n]),
                                        calibration_steps, theta), model, lr=lr[t:n], **common)
    train = run_client(state, RoundPlan(plan.round, plan.client_id, list(plan.seeds[:t]), t,
                                        theta), model, lr=lr[:t], **common)
    return dataclasses.replace(train, scalars=[*train.scalars, *calib.scalars])


def vp_client(settings: VPSettings) -> Any:
    """The client routine of Meerkat-VP (and random selection): run_client, or the calibration
    phase client."""
    if settings.calibration == "phase":
        return functools.partial(run_phase_client, calibration_steps=settings.calibration_steps)
    return run_client


METHOD = register(Method(
    "meerkat-vp", server=VPServer, settings=VPSettings, order=1, client=vp_client,
    server_options=lambda s: {"vp": s},
    summary="+ virtual-path client selection: GradIP calibration flags extreme non-IID clients, "
            "which then run one step per round", reference="paper Algorithm 1"))
