"""`fedmeerkat gradip`: the paper's Figure 3 (and 8): GradIP of an IID vs a single-label client.

Two clients start from the same model and the same mask and each runs `steps` local ZO steps
on its own data, in one round of the ordinary protocol (plan -> run_client -> server.screen
-> server.apply), so the numbers come from the z the server draws exactly as in a federated run:
  - "iid": a seeded random sample of `examples` examples of the whole training set;
  - "single-label": a seeded random sample of `examples` of the remaining examples of class
    `label` (disjoint from the IID client's).
`examples` defaults to min(steps * batch_size, half the training set, half the class).
Both use the run config's model, task, mask, lr, eps and batch size (config file + key=value
overrides as for `run`); `out` is the folder for gradip.json and gradip.png.

The JSON holds, per client, the signed GradIP, its norm and cosine per step, the per-step
training loss (f+ + f-)/2, the label histogram, and the Meerkat-VP detector's verdict on the
trajectory with the config's vp_* settings (when steps >= vp_init_steps + vp_later_steps).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedmeerkat.config import RunConfig
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientReply, ClientState, FedSettings, RoundPlan, run_client
from fedmeerkat.federated.gradip import moving_average, vp_ratios
from fedmeerkat.federated.methods.vp import VPSettings
from fedmeerkat.federated.server import MeerkatServer
from fedmeerkat.runners.run_folder import write_json_atomic
from fedmeerkat.zo import SparseView
from fedmeerkat.zo.seeds import DATA_ORDER, GRADIP_PICK, mix

CLIENTS = ("iid", "single-label")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_clients(labels: np.ndarray, label: int, examples: int, seed: int
                 ) -> list[np.ndarray]:
    """[iid ids, single-label ids]: disjoint seeded samples of `examples` each."""
    rng = np.random.default_rng(mix(seed, GRADIP_PICK))
    iid = np.sort(rng.permutation(len(labels))[:examples])  # from the whole training set
    of_label = rng.permutation(np.setdiff1d(np.flatnonzero(labels == label), iid))
    if len(of_label) < examples:
        raise ValueError(f"class {label} has {len(of_label)} examples left for the "
                         f"single-label client, {examples} asked")
    return [iid, np.sort(of_label[:examples])]


def default_examples(labels: np.ndarray, label: int, steps: int, batch_size: int) -> int:
    """One epoch of `steps` batches, at most half the class (so the IID sample leaves enough)."""
    return max(1, min(steps * batch_size, len(labels) // 2, int((labels == label).sum()) // 2))


def run_gradip(cfg: RunConfig, *, steps: int = 100, label: int = 0, examples: int = 0,
               window: int = 10, quiet: bool = False) -> dict[str, Any]:
    """Run the experiment; returns the result (also written to out/gradip.json) with its path.
    The plot (gradip.png) is the CLI's: report.gradip_plot.plot_gradip."""
    from fedmeerkat.runners.prepare import SharedModel, get_mask, prepare

    start = time.time()
    out = Path(cfg.out) if cfg.out else Path("runs") / f"gradip-{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg)
    c = prep.task.spec.num_classes
    if not 0 <= label < c:
        raise ValueError(f"label {label} is not a class of {cfg.task} (0..{c - 1})")
    n = examples or default_examples(prep.train_labels, label, steps, cfg.batch_size)
    parts = pick_clients(prep.train_labels, label, n, cfg.seed)
    mask, source = get_mask(cfg, prep, parts, quiet)
    if mask.calib_grad is None:
        raise ValueError("the mask carries no calibration gradient: GradIP is undefined")
    log(f"mask: {mask.nnz:,} weights (density {mask.density:.2e}), {source}")
    view = SparseView(dict(prep.model.named_parameters()), mask)
    theta0 = view.gather()
    settings = FedSettings(local_steps=steps, lr=cfg.lr, eps=cfg.eps, batch_size=cfg.batch_size,
                           seed=cfg.seed, weighting="uniform", rounds=1,
                           lr_schedule=cfg.lr_schedule, weight_decay=cfg.weight_decay,
                           device=cfg.server_device or cfg.device)
    server = MeerkatServer(settings, theta0, [len(p) for p in parts])
    server.calib_grad = mask.calib_grad
    shared = SharedModel(prep, view)
    states = [ClientState(k, p, ClientDataPointer(len(p), seed=mix(cfg.seed, DATA_ORDER, k)))
              for k, p in enumerate(parts)]
    replies = []
    for plan in server.plan_round(1):  # both clients start from theta0 (the plan carries it)
        t0 = time.time()
        reply = run_client(states[plan.client_id], RoundPlan.from_bytes(plan.to_bytes()), shared,
                           eps=settings.eps, lr=settings.lrs(plan.round, len(plan.seeds)),
                           batch_size=settings.batch_size, weight_decay=settings.weight_decay)
        log(f"client {CLIENTS[plan.client_id]}: {steps} steps in {time.time() - t0:.0f} s, "
            f"loss {reply.losses[0]:.4f} -> {reply.losses[-1]:.4f}")
        replies.append(reply)
    losses = {r.client_id: r.losses for r in replies}  # local, not on the wire
    outcome = server.apply(1, server.screen(1, [ClientReply.from_bytes(r.to_bytes())
                                                for r in replies]))
    arr = outcome.arrays
    # the detector's settings: the config's vp_* keys (the CLI reads them as method=meerkat-vp)
    vp = cfg.method_settings if isinstance(cfg.method_settings, VPSettings) else VPSettings()
    c_norm = float(arr["calib_norm"][0])
    clients = []
    for i, k in enumerate(arr["clients"].tolist()):
        gradip = arr["gradip"][i].tolist()
        entry: dict[str, Any] = {
            "name": CLIENTS[k], "examples": len(parts[k]),
            "label_histogram": np.bincount(prep.train_labels[parts[k]], minlength=c).tolist(),
            "gradip": gradip, "norm": arr["norm"][i].tolist(), "cosine": arr["cosine"][i].tolist(),
            "loss": losses[k],
            "gradip_abs_moving_average": moving_average(np.abs(gradip), window).tolist(),
        }
        if steps >= vp.init_steps + vp.later_steps:
            scale = c_norm if vp.units == "calib-unit" else 1.0
            entry["vp"] = vp_ratios(gradip[: min(steps, vp.calibration_steps)],
                                    init_steps=vp.init_steps, later_steps=vp.later_steps,
                                    threshold=vp.threshold, later_ratio=vp.later_ratio,
                                    quiescent_ratio=vp.quiescent_ratio, scale=scale).to_dict()
        clients.append(entry)
    result = {
        "model": cfg.model, "task": cfg.task, "steps": steps, "label": label,
        "class_names": list(prep.task.spec.class_names), "density": mask.density,
        "mask_nnz": mask.nnz, "mask_source": source, "lr": cfg.lr, "eps": cfg.eps,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "calib_grad_norm": c_norm,
        "vp_gradip_units": vp.units, "moving_average_window": window,
        "clients": clients, "wall_seconds": round(time.time() - start, 1),
        "config": cfg.to_dict(),
    }
    write_json_atomic(out / "gradip.json", result)
    result["paths"] = {"json": str(out / "gradip.json")}
    return result
