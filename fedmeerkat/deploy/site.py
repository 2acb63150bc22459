"""Meerkat's site on NVIDIA FLARE: one resident handler serving every message of a job.

Each site runs the same client routine as `fedmeerkat run` through a `ClientHost` on one model
loaded once for the job (fedmeerkat.deploy.site_trainer launches it), for the clients the site
hosts. Data placement (`site_arg`, base64 of JSON, built by fedmeerkat.deploy.meerkat.site_args):
{"run_dir": the prepared run folder as the site sees it, "clients": [ids], "overrides":
["key=value", ...], "evaluate": bool, "state_dir": str | None}. Every site loads the run's task
and its partition (same seed: the same split everywhere) and keeps its own clients' examples;
a site given its own `data_files` override splits its local file among its clients instead
(runners.prepare.site_split). Messages: fedmeerkat.deploy.framing.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmeerkat.deploy.framing import pack_reply, unpack
from fedmeerkat.deploy.site_state import SiteStateStore
from fedmeerkat.federated import RoundPlan
from fedmeerkat.federated.methods import get_method
from fedmeerkat.models.loading import model_fingerprint
from fedmeerkat.models.scoring import evaluate
from fedmeerkat.runners.client_host import ClientHost
from fedmeerkat.runners.prepare import (
    SharedModel,
    client_state,
    dp_of,
    prepare,
    settings_of,
    site_split,
    split_clients,
)
from fedmeerkat.runners.run_folder import MASK_FILE, SITE_STATE, load_run_config
from fedmeerkat.zo import SparseMask, SparseView


def site(site_name: str, site_arg: str) -> Callable[[bytes], bytes]:
    """The site trainer's handler: loads the model and the site's clients once, then serves
    every message of the job (fedmeerkat.deploy.site_trainer).

    After every round it serves, the hosted clients' state goes to the site's state folder
    (fedmeerkat.deploy.site_state; `state_dir` in the site argument, default
    RUN_DIR/site_state/SITE). A hello with "resume" loads the latest snapshot; one without
    clears the folder. A plan for a round the clients already went through (the server resumed
    from a checkpoint older than what the site served) restores the snapshot before it."""

    arg = json.loads(base64.urlsafe_b64decode(site_arg))
    run_dir = Path(arg["run_dir"])
    overrides = list(arg.get("overrides", []))
    cfg = load_run_config(run_dir, overrides)
    prep = prepare(cfg)
    local = any(o.startswith("data_files=") for o in overrides)
    hosted = [int(k) for k in arg["clients"]]
    if local:  # the site's own file, split among the clients it hosts
        mine = site_split(cfg, prep, hosted)
    else:  # the run's partition, computed identically everywhere
        parts = split_clients(cfg, prep)
        mine = {k: parts[k] for k in hosted}
    mask = SparseMask.load(run_dir / MASK_FILE)
    params = dict(prep.model.named_parameters())
    mask.check_model(params, model_fingerprint(prep.model))
    view = SparseView(params, mask)
    theta0 = view.gather()
    states = {k: client_state(cfg, k, p, theta0.clone()) for k, p in mine.items()}
    store = SiteStateStore(Path(arg.get("state_dir") or run_dir / SITE_STATE / site_name))

    def reset() -> None:  # the clients' initial state, in place (the host holds these objects)
        for k, s in states.items():
            fresh = client_state(cfg, k, mine[k], theta0.clone())
            s.pointer, s.theta, s.synced, s.extra = fresh.pointer, fresh.theta, 0, {}

    class TimedModel(SharedModel):
        """The shared model, adding up the seconds its forward passes take (`forward_s`)."""

        forward_s = 0.0

        def loss(self, example_ids: np.ndarray) -> float:
            t = time.perf_counter()
            try:
                return super().loss(example_ids)
            finally:
                self.forward_s += time.perf_counter() - t

        def example_losses(self, example_ids: np.ndarray) -> np.ndarray:
            t = time.perf_counter()
            try:
                return super().example_losses(example_ids)
            finally:
                self.forward_s += time.perf_counter() - t

    settings = settings_of(cfg)
    model = TimedModel(prep, view)
    if cfg.zo_estimator == "per-example":
        model.example_offsets()  # a mask off the linear layers is refused before round 1
    host = ClientHost(get_method(cfg.method), cfg.method_settings, settings, model, states,
                      dp=dp_of(cfg))
    evaluates = local or bool(arg.get("evaluate", False))
    served = 0  # the round the clients' state is at the end of
    print(f"site {site_name}: clients {hosted} ({[len(p) for p in mine.values()]} examples), "
          f"mask {mask.nnz:,}", file=sys.stderr, flush=True)

    def handle(payload: bytes) -> bytes:
        nonlocal served
        tag = payload[:1]
        if tag == b"H":
            hello = json.loads(payload[1:] or b"{}")
            if hello.get("resume"):
                if store.rounds():  # none: the clients' state in memory stands (a live site)
                    # a damaged snapshot falls back to the one before; the server decides
                    # whether that is recent enough (deploy.serve.check_sites_resumed)
                    served = store.load_latest(states, warn=lambda msg: print(
                        f"site {site_name}: {msg}", file=sys.stderr, flush=True))
                    host.states_replaced()
            else:
                store.clear()
            return b"H" + json.dumps({"clients": {k: s.num_samples for k, s in states.items()},
                                      "evaluates": evaluates, "pid": os.getpid(),
                                      "served": served, "state_dir": str(store.folder)}).encode()
        if tag == b"T":
            t = time.perf_counter()
            model.forward_s = 0.0
            plans = {k: RoundPlan.from_bytes(b) for k, b in unpack(payload).items()}
            r = max(p.round for p in plans.values())
            if r <= served:  # the server went back to an earlier checkpoint
                store.restore_before(r, states, reset)
                host.states_replaced()
            replies = {k: host.handle(p) for k, p in plans.items()}
            store.save(r, states)
            served = r
            return pack_reply(os.getpid(), time.perf_counter() - t, model.forward_s, replies)
        if tag == b"E":
            theta = torch.from_numpy(np.frombuffer(payload, dtype="<f4", offset=1).copy())
            view.write(theta.to(view.device))
            res = evaluate(prep.scorer, prep.test_ids, prep.test_labels, cfg.eval_batch_size)
            assert res.logits is not None and res.labels is not None
            return b"E" + json.dumps({"n": res.num_examples, "accuracy": res.accuracy,
                                      "loss": res.loss,
                                      "predicted_share": res.predicted_share,
                                      "logits": res.logits.tolist(),
                                      "labels": res.labels.tolist()}).encode()
        raise ValueError(f"unknown message tag {tag!r}")

    return handle
