"""One run session for every transport: the top of `fedmeerkat run` and of the deployed server.

    session = Session(cfg, folder, server, transport, evaluator, states, space)
    with folder.locked():             # one writer per run folder (RunFolder.locked)
        session.open(resume)          # round 0 (evaluated, checkpointed) or the last checkpoint
        session.train()               # the round driver with the run folder's hooks
        summary = session.finish()    # final_state.safetensors and summary.json

A session owns the run folder's life (metrics.jsonl, checkpoints, trajectories, the final
state, summary.json), the evaluation cadence (`eval_every`, always the last round) behind one
evaluator (runners/evaluation.py: a local model, or the deployed sites' results) and the one
round loop (runners/driver.py). What differs between transports is only what they hand it:
the transport, the evaluator, the client states a checkpoint holds (the simulation's; none on
the deployed server, whose clients' state lives at the sites) and a few summary entries.

It also keeps best_state.safetensors (`keep_best`), the trained values of the evaluated round
with the best validation metric (`best_round`'s pick), so that a run whose last rounds drift
(a constant lr over a long budget: README, "Longer runs") still hands over its best model
(`fedmeerkat export RUN_DIR --best`). The file is written after that round's checkpoint, so
it never holds a round the checkpoint has not reached; a resumed run writes it if the crash
came between the two.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmeerkat.config import RunConfig
from fedmeerkat.federated import BaseServer, ClientState, RoundPlan
from fedmeerkat.federated.dp import BudgetExhausted, PrivacyLedger
from fedmeerkat.options import InputError
from fedmeerkat.runners.driver import RoundDriver, RoundFailed, Transport
from fedmeerkat.runners.evaluation import (
    Evaluator,
    best_round,
    evaluated_part,
    format_evaluation,
    gain_verdict,
    primary_metric,
    summary_metrics,
)
from fedmeerkat.runners.run_folder import DP_LEDGER, SUMMARY, RunFolder, space_digest


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Session:
    cfg: RunConfig
    folder: RunFolder
    server: BaseServer
    transport: Transport
    evaluate: Evaluator  # the server's vector -> a metrics record (eval_record's keys)
    states: list[ClientState]  # the client states checkpoints hold ([]: they live elsewhere)
    space: Any  # SparseMask or DenseSpace: checkpoints carry its digest
    log: Callable[[str], None] = _stderr
    on_plans: Callable[[list[RoundPlan]], object] = lambda plans: None  # a progress bar
    record_extra: Callable[[], dict[str, Any]] = dict  # more entries of a round's line
    round_log: bool = False  # one line per round (the deployed server's log)
    resume_hint: str = ""  # how to continue after a failed round, added to its error
    ledger: PrivacyLedger | None = None  # DP runs: the steps each client ran (federated/dp.py)
    started: float = field(default_factory=time.time)
    # wall seconds of the processes that ran this run before this one (from the checkpoint)
    wall_before: float = 0.0
    initial: dict[str, Any] = field(default_factory=dict)  # round 0's evaluation
    last: dict[str, Any] = field(default_factory=dict)  # the latest evaluation
    # (round, validation metric) of the best evaluated round so far, and whether its state
    # still has to be written (after the round's checkpoint: _keep_best)
    best: tuple[int, float] | None = None
    best_due: bool = False

    def __post_init__(self) -> None:
        self.digest = space_digest(self.space)

    # ---- the three steps ---------------------------------------------------------------
    def open(self, resume: bool, initial: dict[str, Any] | None = None) -> None:
        """A new run: evaluate (or take `initial`, round 0 of the same model on the same
        sets, measured by an earlier run), write round 0 and the first checkpoint. A resumed
        run: restore the last sound checkpoint and cut metrics.jsonl and the trajectories
        back to it."""
        if resume:
            self._restore()
            return
        self.initial = (evaluated_part(initial) if initial is not None
                        else self.evaluate(self.server.theta))
        self.last = self.initial
        self.log(f"round 0: {format_evaluation(self.initial)}")
        self.folder.metrics.append({"round": 0, "train_loss": None, **self.initial,
                                    "bytes_up": 0, "bytes_down": 0})
        self.folder.save_checkpoint(self.server, self.states, self.digest, self._wall())
        self._consider_best(0, self.initial)
        self._keep_best()

    def train(self) -> None:
        """Rounds server.round + 1 .. cfg.rounds; a round that cannot get enough replies
        raises RoundFailed with the checkpoint at the round before."""
        cfg = self.cfg
        driver = RoundDriver(self.server, self.transport,
                             append_metrics=lambda rec: self.folder.metrics.append(
                                 {**rec, **self.record_extra(), **self._privacy()}),
                             save_arrays=self.folder.save_trajectories,
                             checkpoint=self._checkpoint,
                             evaluate=self._evaluate_due, log=self.log,
                             round_timeout=cfg.round_timeout, min_clients=cfg.min_clients,
                             loss_withheld=self.ledger is not None,
                             round_retries=cfg.round_retries, on_plans=self._planned)
        try:
            for r in range(self.server.round + 1, cfg.rounds + 1):
                record = driver.run_round(r)
                if self.round_log:
                    loss = record["train_loss"]
                    self.log(f"round {r}: train loss "
                             f"{'withheld (dp)' if loss is None else f'{loss:.4f}'}, "
                             f"{len(record['bytes'])} replies")
        except BudgetExhausted as e:
            raise RoundFailed(f"{e}; {self.folder} holds round {self.server.round}: continue "
                              f"with {self.resume_hint or 'a resume'} and a larger "
                              "dp_epsilon=") from None
        except RoundFailed as e:
            if not self.resume_hint:
                raise
            raise RoundFailed(f"{e}; {self.folder} holds round {self.server.round}: continue "
                              f"with {self.resume_hint}") from None

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """final_state.safetensors and summary.json (`extra`: the transport's own entries)."""
        cfg, server, space = self.cfg, self.server, self.space
        self.folder.save_final_state(server.theta, {"round": str(server.round),
                                                    "nnz": str(space.nnz), "method": cfg.method})
        records = self.folder.metrics.read()
        client_rounds = sum(len(r.get("bytes", {})) for r in records[1:])
        up = sum(r["bytes_up"] for r in records)
        down = sum(r["bytes_down"] for r in records)
        initial, last = self.initial, self.last
        summary = {
            "model": cfg.model, "task": cfg.task, "method": cfg.method,
            "initial_accuracy": initial["test_accuracy"], "final_accuracy": last["test_accuracy"],
            "initial_predicted_share": initial["predicted_share"],
            "final_predicted_share": last["predicted_share"],
            **summary_metrics(initial, last),
            **best_round(records),
            "gain": gain_verdict(initial, last),
            "rounds": server.round, "clients": cfg.clients, "local_steps": cfg.local_steps,
            "perturbations": cfg.perturbations, "zo_estimator": cfg.zo_estimator,
            "clients_per_round": cfg.clients_per_round or cfg.clients,
            "client_sampling": cfg.client_sampling, "downlink": cfg.downlink,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "eps": cfg.eps,
            "lr_schedule": cfg.lr_schedule, "density": space.density, "mask_nnz": space.nnz,
            "partition": cfg.partition, "alpha": cfg.alpha,
            "test_examples": initial.get("test_examples"),
            "val_examples": initial.get("val_examples"), "val_fraction": cfg.val_fraction,
            "upload_bytes_per_client": up / max(1, client_rounds),
            "download_bytes_per_client": down / max(1, client_rounds),
            "upload_bytes_total": up, "download_bytes_total": down,
            "bytes_note": "per participating client per round, mean; from the serialized "
                          "messages",
            **(extra or {}),
            **self._privacy_summary(),
            # this process's; the total counts every process that ran it, up to the
            # checkpoint each resumed from (time after a crash's last checkpoint is lost)
            "wall_seconds": round(time.time() - self.started, 1),
            "wall_seconds_total": round(self._wall(), 1),
            "out": str(self.folder),
            **server.summary_extra(),
        }
        self.folder.write_json(SUMMARY, summary)
        return summary

    def run(self, resume: bool, initial: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The three steps under the folder's lock. A resumed run writes nothing before them,
        and a new run's folder was claimed by its own process, so a second writer is refused
        before it writes anything."""
        with self.folder.locked():
            self.open(resume, initial)
            self.train()
            return self.finish(extra)

    # ---- helpers -----------------------------------------------------------------------
    def _wall(self) -> float:
        return self.wall_before + time.time() - self.started

    def _evaluate_due(self, r: int) -> dict[str, Any] | None:
        cfg = self.cfg
        if not (r == cfg.rounds or (cfg.eval_every and r % cfg.eval_every == 0)):
            return None
        result = self.evaluate(self.server.theta)
        if result.get("test_accuracy") is not None:  # a missing one keeps the last good one
            self.last = result
            self._consider_best(r, result)
        return result  # the driver logs it

    def _checkpoint(self) -> None:
        self.folder.save_checkpoint(self.server, self.states, self.digest, self._wall())
        self._keep_best()

    def _consider_best(self, r: int, result: dict[str, Any]) -> None:
        """Note round r if its validation metric beats every earlier round's (the earliest
        wins a tie, as in best_round); nothing without a validation split."""
        if not self.cfg.keep_best:
            return
        metric = primary_metric(result)
        if metric is not None and (self.best is None or metric > self.best[1]):
            self.best, self.best_due = (r, metric), True

    def _keep_best(self) -> None:
        """Write the noted best round's state (the server's vector is that round's: this runs
        right after the round's checkpoint)."""
        if self.best_due and self.best is not None:
            r, metric = self.best
            assert r == self.server.round, (r, self.server.round)
            self.folder.save_best_state(self.server.theta, {
                "round": str(r), "val_metric": repr(metric), "nnz": str(self.space.nnz),
                "method": self.cfg.method})
            self.best_due = False

    def _planned(self, plans: list[RoundPlan]) -> None:
        """Before a round's plans go out: a DP run counts their steps against each client's
        budget (and refuses the round if one would exceed it), kept on disk at once."""
        if self.ledger is not None:
            self.ledger.charge({p.client_id: p.num_steps for p in plans})
            self.folder.write_json(DP_LEDGER, {"steps": {str(k): v for k, v in
                                                         sorted(self.ledger.steps.items())}})
        self.on_plans(plans)

    def _privacy(self) -> dict[str, Any]:
        return {} if self.ledger is None else {"dp_epsilon": self.ledger.spent()}

    def _privacy_summary(self) -> dict[str, Any]:
        if self.ledger is None:
            return {}
        spent, dp = self.ledger.spent(), self.ledger.settings
        sigmas = {str(k): dp.sigma(k) for k in range(len(self.ledger.client_sizes))}
        return {"dp": {"clip": dp.clip, "noise_multiplier": max(sigmas.values()),
                       "noise_multiplier_per_client": sigmas,
                       "delta": dp.delta or "1/n per client", "budget": dp.epsilon or None,
                       "sampling": "Poisson, q = batch_size / n per client",
                       "accountant": "dp-accounting RDP (add or remove one example)",
                       "epsilon_spent": spent,
                       "epsilon_spent_max": max(spent.values(), default=0.0)}}

    def _restore(self) -> None:
        self.wall_before = self.folder.load_checkpoint(self.server, self.states, self.digest,
                                                       log=self.log)
        self.folder.drop_trajectories_after(self.server.round)
        # drop lines written after the checkpoint and a half-written last line, if any
        records = [r for r in self.folder.metrics.read() if r["round"] <= self.server.round]
        if not records:
            raise InputError(f"{self.folder}/metrics.jsonl lacks round 0; the run cannot be "
                             "resumed")
        self.folder.metrics.rewrite(records)
        if self.ledger is not None and self.folder.file(DP_LEDGER).is_file():
            # every step ever planned counts, the re-run round's included (conservative)
            self.ledger.steps = {int(k): int(v) for k, v in
                                 self.folder.read_json(DP_LEDGER)["steps"].items()}
        self.initial = evaluated_part(records[0])
        evaluated = [r for r in records if r.get("test_accuracy") is not None]
        self.last = evaluated_part(evaluated[-1] if evaluated else records[0])
        picked = best_round(records)
        if picked and self.cfg.keep_best:
            self.best = (picked["best_val_round"], picked["best_val_metric"])
            # a crash between the best round's checkpoint and its best state: write it now
            # (the restored vector is that round's); an earlier round's state is on disk
            self.best_due = (self.folder.best_state_round() != str(self.best[0])
                             and self.best[0] == self.server.round)
            self._keep_best()
        self.log(f"resuming {self.folder} after round {self.server.round} of {self.cfg.rounds}")
