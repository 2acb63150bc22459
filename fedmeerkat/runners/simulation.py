"""In-process simulation of a federated run: one model, K clients, messages moved in memory.

The runner owns the single model instance and lends it to each client in turn; a client is
only its example ids and data pointer. Every plan and reply is serialized and parsed back, so
the byte counts are those of the real wire format and the simulation exercises it. The run
itself (round 0, checkpoints, the rounds, the summary) is the session every transport shares
(runners/session.py); this module hands it the in-process transport and a local evaluator.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedmeerkat.config import RunConfig
from fedmeerkat.data.partition import format_histogram, label_histogram
from fedmeerkat.federated import RoundPlan
from fedmeerkat.federated.messages import MAX_VECTOR
from fedmeerkat.federated.methods import get_method, make_server
from fedmeerkat.options import InputError
from fedmeerkat.runners.client_host import ClientHost
from fedmeerkat.runners.evaluation import LocalEvaluator
from fedmeerkat.runners.inprocess import InProcessTransport
from fedmeerkat.runners.prepare import (
    Prepared,
    SharedModel,
    class_names,
    client_state,
    dp_of,
    get_mask,
    ledger_of,
    log,
    partition_record,
    prepare,
    settings_of,
    split_clients,
    with_solved_noise,
)
from fedmeerkat.runners.run_folder import PARTITION, RunFolder
from fedmeerkat.runners.session import Session
from fedmeerkat.runners.spaces import Space, build_space
from fedmeerkat.runners.tune import pick_lr
from fedmeerkat.zo import StepResult
from fedmeerkat.zo.dense import z_cache
from fedmeerkat.zo.step import eps_resolution_warning


def run(cfg: RunConfig, *, quiet: bool = False, resume: bool = False,
        initial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run federated training as configured; returns the summary (also in out/summary.json).

    With `resume`, `cfg.out` is an existing run folder: training continues after the last
    checkpointed round and ends bit-identical to a run that was never interrupted.
    `initial`: the round-0 evaluation record (metrics.jsonl's first line) of this same model
    on these same validation and test sets, taken by an earlier run, so it is not computed
    again (LocalEvaluator.reuse checks it is of this run's sets).
    """
    started = time.time()
    cfg, folder = RunFolder.open(cfg, resume)
    prep, parts = _load(cfg, folder, resume)
    space = build_space(cfg, prep.model, folder.path, resume=resume,
                        make_mask=lambda: get_mask(cfg, prep, parts, quiet))
    _check_space(space)
    theta0 = space.view.gather()
    if cfg.lr_auto and not resume:
        cfg = pick_lr(cfg, prep, space.view, theta0, folder)
    if not resume and (solved := with_solved_noise(cfg, [len(p) for p in parts])) is not cfg:
        cfg = solved
        folder.write_config(cfg)  # the sigmas dp_epsilon asks for, kept for resumes
    _warn_eps(prep, theta0, cfg.eps)
    shared0 = theta0.clone() if cfg.downlink == "scalars" else None  # one copy for all
    states = [client_state(cfg, k, p, shared0) for k, p in enumerate(parts)]
    server = make_server(cfg.method, settings_of(cfg), theta0, [s.num_samples for s in states],
                         method_settings=cfg.method_settings, calib_grad=space.mask.calib_grad,
                         **space.server_options)
    del theta0  # the server holds its own copy: no spare model-size vector for full-fedzo
    progress = Progress(server, cfg.rounds, quiet)
    shared = SharedModel(prep, space.view)
    if cfg.zo_estimator == "per-example":
        shared.example_offsets()  # a mask off the linear layers is refused before round 1
    host = ClientHost(get_method(cfg.method), cfg.method_settings, server.settings,
                      shared, {s.client_id: s for s in states},
                      progress.on_step, dp=dp_of(cfg))
    evaluator = LocalEvaluator(prep, space.view, cfg.eval_batch_size)
    session = Session(cfg, folder, server, InProcessTransport(host), evaluator, states,
                      space.mask, log=progress.write, on_plans=progress.on_plans,
                      resume_hint=f"`fedmeerkat run --resume {folder}`", started=started,
                      ledger=ledger_of(cfg, [s.num_samples for s in states]))
    progress.session = session
    try:
        with z_cache(cfg.z_cache_mb << 20):  # full-fedzo only: see zo.dense.z_cache
            return session.run(resume, None if initial is None or resume
                               else evaluator.reuse(initial), extra={
                "mask_source": space.source,
                "mask_kind": space.mask.meta.get("mask_kind", cfg.mask_kind),
                "trainable_space": space.kind, "train_examples": len(prep.train_ids),
                "dense_model_bytes": sum(p.numel() * p.element_size()
                                         for p in prep.model.parameters())})
    finally:
        progress.close()


def _load(cfg: RunConfig, folder: RunFolder, resume: bool) -> tuple[Prepared, list[np.ndarray]]:
    """The prepared run and its clients' examples; partition.json for a new run. Input that
    cannot be used removes a new run's folder, so the same command works once it is fixed."""
    try:
        prep = prepare(cfg)
        parts = split_clients(cfg, prep)
    except InputError:
        if not resume and folder.holds_config_only():
            shutil.rmtree(folder.path)
        raise
    hist = label_histogram(parts, prep.train_labels, prep.task.spec.num_classes)
    log(f"partition {cfg.partition}"
        + (f" (alpha={cfg.alpha})" if "dirichlet" in cfg.partition else ""))
    log(format_histogram(hist, class_names(prep)))
    if not resume:
        folder.write_json(PARTITION, partition_record(cfg, prep, parts))
    return prep, parts


def _check_space(space: Space) -> None:
    mask = space.mask
    if mask.nnz > MAX_VECTOR:
        raise InputError(f"the trainable space has {mask.nnz:,} values, more than the "
                         f"{MAX_VECTOR:,} a plan or reply can carry (federated/messages.py)")
    log(f"trainable ({space.kind}): {mask.nnz:,} of {mask.eligible_numel:,} eligible values "
        f"(density {mask.density:.2e}), {space.source}")


def _warn_eps(prep: Prepared, theta0: torch.Tensor, eps: float) -> None:
    dtypes = {p.dtype for p in prep.model.parameters()}
    warn = eps_resolution_warning(theta0, eps, min(dtypes, key=lambda d: torch.finfo(d).bits))
    if warn:
        log(f"warning: {warn}")


class Progress:
    """The run's progress bar: steps, the recent training loss, the last test accuracy."""

    def __init__(self, server, rounds: int, quiet: bool):
        # round 1's step count for every round; VP's early stops change it (on_plans)
        self.per_round = sum(server.steps_for(1, k) for k in server.participants(1))
        self.rounds = rounds
        self.bar = tqdm(total=None, desc="training", unit="step", disable=quiet,
                        file=sys.stderr, dynamic_ncols=True)
        self.losses: list[float] = []
        self.session: Session | None = None

    def on_step(self, res: StepResult) -> None:
        self.bar.update(1)
        self.losses.append(res.loss)
        acc = self.session.last.get("test_accuracy") if self.session else None
        self.bar.set_postfix(loss=f"{np.mean(self.losses[-10:]):.4f}",
                             acc="-" if acc is None else f"{acc:.3f}")

    def on_plans(self, plans: list[RoundPlan]) -> None:
        if self.bar.total is None and plans:  # the first round run (after a resume, too)
            self.bar.total = self.per_round * (self.rounds - plans[0].round + 1)
        self.bar.total = (self.bar.total or 0) + sum(p.num_steps for p in plans) - self.per_round

    def write(self, msg: str) -> None:
        self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
