"""Meerkat's server on NVIDIA FLARE: the run session of `fedmeerkat run` over the sites.

The FLARE controller calls `serve`; it hands the session (runners/session.py) a transport over
the sites (`SiteTransport`) and an evaluator: the sites' own test data (`SitesEvaluator`,
averaged by size, threshold-free metrics computed exactly from every site's logits), or, with
evaluation="server", the run's model and task loaded here. The server needs no model
otherwise: a prepared run folder (fedmeerkat.deploy.meerkat.prepare_run) gives the mask and
the initial values. Resume: the server continues from the run folder's checkpoint, each site
from its state folder (fedmeerkat.deploy.site_state).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedmeerkat.deploy.framing import pack, unpack_reply
from fedmeerkat.federated.methods import make_server
from fedmeerkat.models.loading import model_fingerprint
from fedmeerkat.models.scoring import EvalResult, label_metrics
from fedmeerkat.runners.evaluation import LocalEvaluator, eval_record
from fedmeerkat.runners.prepare import prepare, settings_of
from fedmeerkat.runners.run_folder import (
    INITIAL_STATE,
    MASK_FILE,
    SERVER_LOG,
    RunFolder,
    load_run_config,
)
from fedmeerkat.runners.session import Session
from fedmeerkat.zo import SparseMask, SparseView


class SiteTransport:
    """The round driver's Transport (client ids) over the FLARE transport (sites).

    After each exchange, `last` holds what the sites said about themselves: each site's trainer
    PID, its handler's seconds (compute) and forward-pass seconds, and the exchange's wall time."""

    def __init__(self, flare, site_clients: dict[str, list[int]]):
        self.flare, self.site_clients = flare, site_clients
        self.site_of = {k: s for s, ks in site_clients.items() for k in ks}
        self.last: dict[str, Any] = {}

    def exchange(self, round_idx: int, plans: Mapping[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        by_site: dict[str, dict[int, bytes]] = {}
        for k, blob in plans.items():
            by_site.setdefault(self.site_of[k], {})[k] = blob
        timeout = None if deadline is None else max(0.01, deadline - time.monotonic())
        t = time.perf_counter()
        got = self.flare.exchange(round_idx, {s: pack(b"T", m) for s, m in by_site.items()}, timeout)
        wall = time.perf_counter() - t
        replies: dict[int, bytes] = {}
        pids, compute, forward = {}, {}, {}
        for site, blob in got.items():
            try:
                pid, compute_s, forward_s, items = unpack_reply(blob)
            except (ValueError, struct.error):
                continue  # an unreadable site payload: its clients count as missing
            pids[site], compute[site], forward[site] = pid, compute_s, forward_s
            for k, reply in items.items():
                if self.site_of.get(k) == site:  # a site answers for its own clients only
                    replies[k] = reply
        self.last = {"site_pids": pids, "site_compute_s": compute, "site_forward_s": forward,
                     "exchange_s": wall}
        return replies


class SitesEvaluator:
    """The global vector evaluated by the sites that evaluate (one per distinct test split)."""

    def __init__(self, flare, sites: list[str]):
        self.flare, self.sites = flare, sites

    def __call__(self, theta: torch.Tensor) -> dict[str, Any]:
        blob = b"E" + theta.cpu().numpy().astype("<f4").tobytes()
        res = [json.loads(b[1:]) for b in self.flare.exchange(0, {s: blob for s in self.sites}).values()]
        n = sum(r["n"] for r in res)
        share = np.sum([np.array(r["predicted_share"]) * r["n"] for r in res], axis=0) / n
        # AUC, macro-F1 and best-shift accuracy are no averages: computed here, exactly, from
        # every site's label-word logits and labels (float32 survives JSON exactly)
        tf = label_metrics(
            np.concatenate([np.asarray(r["logits"], dtype=np.float32) for r in res]),
            np.concatenate([np.asarray(r["labels"], dtype=np.int64) for r in res]))
        return eval_record(EvalResult(sum(r["accuracy"] * r["n"] for r in res) / n,
                                      sum(r["loss"] * r["n"] for r in res) / n,
                                      share.tolist(), n, **tf))


def server_evaluator(cfg, mask: SparseMask) -> LocalEvaluator:
    """evaluation="server": the run's model and task, loaded here."""
    prep = prepare(cfg)
    params = dict(prep.model.named_parameters())
    mask.check_model(params, model_fingerprint(prep.model))
    return LocalEvaluator(prep, SparseView(params, mask), cfg.eval_batch_size)


def hello(flare, site_clients: dict[str, list[int]], resume: bool,
          clients: int) -> dict[str, dict[str, Any]]:
    """Each site's hello: the clients it hosts and their sizes, whether it evaluates, its PID
    and the round its clients' saved state is at."""
    msg = b"H" + json.dumps({"resume": resume}).encode()
    got = {s: json.loads(b[1:]) for s, b in flare.exchange(0, {s: msg for s in site_clients}).items()}
    if set(got) != set(site_clients):
        raise RuntimeError(f"sites {sorted(set(site_clients) - set(got))} did not answer hello")
    hosted = sorted(int(k) for h in got.values() for k in h["clients"])
    if hosted != list(range(clients)):
        raise RuntimeError(f"sites host clients {hosted}, the run has {clients}")
    return got


def check_sites_resumed(cfg, served_round: int, hellos: dict[str, dict[str, Any]]) -> None:
    """With full participation every site served every round: no state means a lost folder."""
    if cfg.clients_per_round in (0, cfg.clients) and served_round > 0:
        for s, h in hellos.items():
            if h["served"] == 0:
                raise RuntimeError(f"site {s} holds no client state in {h['state_dir']} (the "
                                   f"run is at round {served_round}); cannot resume its clients")


def run_config(folder: RunFolder, resume: bool, overrides: list[str] | None,
               evaluation: str):
    """The deployed run's config: the prepared folder's, or, resumed, with the allowed
    `overrides` (RunFolder.resume_config, the check `fedmeerkat run --resume` makes)."""
    if evaluation not in ("sites", "server"):
        raise ValueError(f"evaluation: {evaluation!r}, expected 'sites' or 'server'")
    if overrides and not resume:
        raise ValueError("overrides apply to a resumed run only (the run folder fixes the rest)")
    return folder.resume_config(overrides) if resume else load_run_config(folder.path)


def serve(flare, run_dir: str, site_clients: dict[str, list[int]], resume: bool = False,
          overrides: list[str] | None = None, evaluation: str = "sites") -> None:
    """The FLARE controller's driver: the whole run, written into `run_dir` on the server.
    `resume` continues after the folder's checkpoint with `overrides` (RESUMABLE_KEYS);
    `evaluation` is "sites" (their test data) or "server" (the model loaded here)."""
    started, folder = time.time(), RunFolder(run_dir)
    cfg = run_config(folder, resume, overrides, evaluation)
    with open(folder.file(SERVER_LOG), "a", buffering=1) as log_file:
        mask = SparseMask.load(folder.file(MASK_FILE))
        hellos = hello(flare, site_clients, resume, cfg.clients)
        sizes = {int(k): n for h in hellos.values() for k, n in h["clients"].items()}
        server = make_server(cfg.method, settings_of(cfg),
                             load_file(str(folder.file(INITIAL_STATE)))["theta"],
                             [sizes[k] for k in range(cfg.clients)],
                             method_settings=cfg.method_settings, calib_grad=mask.calib_grad)
        evaluator = (server_evaluator(cfg, mask) if evaluation == "server" else
                     SitesEvaluator(flare, [s for s, h in hellos.items() if h["evaluates"]]))
        transport = SiteTransport(flare, site_clients)
        session = Session(cfg, folder, server, transport, evaluator, [], mask,
                          log=lambda msg: print(msg, file=log_file),
                          record_extra=lambda: transport.last, round_log=True, started=started)
        session.open(resume)
        if resume:
            check_sites_resumed(cfg, server.round, hellos)
        session.train()
        session.finish({"transport": "nvflare", "sites": site_clients, "evaluation": evaluation})
