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
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import numpy as np
import torch
from safetensors.torch import load_file

from fedmeerkat.deploy.framing import pack, unpack_reply
from fedmeerkat.federated.methods import make_server
from fedmeerkat.models.loading import model_fingerprint
from fedmeerkat.models.scoring import EvalResult, label_metrics
from fedmeerkat.runners.evaluation import LocalEvaluator, eval_record, no_evaluation
from fedmeerkat.runners.prepare import ledger_of, prepare, settings_of
from fedmeerkat.runners.run_folder import (
    INITIAL_STATE,
    MASK_FILE,
    PARTITION,
    SERVER_LOG,
    RunFolder,
    load_run_config,
)
from fedmeerkat.runners.session import Session
from fedmeerkat.zo import SparseMask, SparseView


class SiteTransport:
    """The round driver's Transport (client ids) over the FLARE transport (sites).

    Never raises on what a site sends: a site payload that cannot be read (not bytes, not a
    well-formed "T" reply) counts its clients as missing, and a reply for a client the site
    does not host is dropped; each with its reason in `last["site_rejected"]`. The clients'
    own replies go to the round driver, which parses and screens them as in process.
    After each exchange, `last` holds what the sites said about themselves: each site's trainer
    PID, its handler's seconds (compute) and forward-pass seconds, and the exchange's wall time."""

    def __init__(self, flare, site_clients: dict[str, list[int]],
                 log: Callable[[str], None] = print):
        self.flare, self.site_clients, self.log = flare, site_clients, log
        self.site_of = {k: s for s, ks in site_clients.items() for k in ks}
        self.last: dict[str, Any] = {}

    @property
    def sources(self) -> dict[int, str]:
        """client -> its site: the reply bound's median counts each site once (validate.py)."""
        return self.site_of

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
        pids, compute, forward, rejected = {}, {}, {}, {}
        for site, blob in got.items():
            try:
                pid, compute_s, forward_s, items = unpack_reply(blob)
            except ValueError as e:  # its clients count as missing
                rejected[site] = str(e)
                continue
            pids[site], compute[site], forward[site] = pid, compute_s, forward_s
            foreign = sorted(k for k in items if self.site_of.get(k) != site)
            if foreign:  # a site answers for its own clients only
                rejected[site] = f"answered for clients {foreign} it does not host (dropped)"
            replies.update((k, b) for k, b in items.items() if self.site_of.get(k) == site)
        self.last = {"site_pids": pids, "site_compute_s": compute, "site_forward_s": forward,
                     "exchange_s": wall, **({"site_rejected": rejected} if rejected else {})}
        if rejected:
            self.log(f"round {round_idx}: left out site replies {rejected}")
        return replies


class SitesEvaluator:
    """The global vector evaluated by the sites that evaluate (one per distinct test split).

    A site whose answer is not there by `timeout` (round_timeout; None: the job's) or cannot
    be used (`check_evaluation`) is left out with its reason (`eval_rejected`) and the others
    are merged; with none left the evaluation is missing (`no_evaluation`: test metrics None)
    and the run goes on. `classes`: the run's number of classes."""

    def __init__(self, flare, sites: list[str], classes: int, timeout: float | None = None,
                 log: Callable[[str], None] = print):
        self.flare, self.sites, self.classes = flare, sites, classes
        self.timeout, self.log = timeout, log

    def __call__(self, theta: torch.Tensor) -> dict[str, Any]:
        blob = b"E" + theta.cpu().numpy().astype("<f4").tobytes()
        got = self.flare.exchange(0, {s: blob for s in self.sites}, self.timeout)
        res, rejected = [], {}
        for s in self.sites:  # in a fixed order, whatever the order of arrival
            r = check_evaluation(got[s], self.classes) if s in got else "no reply in time"
            if isinstance(r, str):
                rejected[s] = r
            else:
                res.append(r)
        if rejected:
            self.log("evaluation: left out " + ", ".join(f"site {s} ({why})" for s, why in
                                                          rejected.items())
                     + ("" if res else "; no site's evaluation is usable: its metrics are "
                                       "missing"))
        if not res:
            return {**no_evaluation(), "eval_rejected": rejected}
        n = sum(r["n"] for r in res)
        share = np.sum([np.array(r["predicted_share"]) * r["n"] for r in res], axis=0) / n
        # AUC, macro-F1 and best-shift accuracy are no averages: computed here, exactly, from
        # every site's label-word logits and labels (float32 survives JSON exactly)
        tf = label_metrics(
            np.concatenate([np.asarray(r["logits"], dtype=np.float32) for r in res]),
            np.concatenate([np.asarray(r["labels"], dtype=np.int64) for r in res]))
        record = eval_record(EvalResult(sum(r["accuracy"] * r["n"] for r in res) / n,
                                        sum(r["loss"] * r["n"] for r in res) / n,
                                        share.tolist(), n, auc=tf["auc"],
                                        macro_f1=tf["macro_f1"],
                                        best_shift_accuracy=tf["best_shift_accuracy"]))
        return {**record, "eval_rejected": rejected} if rejected else record


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # a JSON integer beyond any float
        return False


def check_evaluation(blob: Any, classes: int) -> dict[str, Any] | str:
    """A site's evaluation reply (framing.py's "E"), or why it cannot be used."""
    if not isinstance(blob, bytes):
        return f"reply is not bytes ({type(blob).__name__})"
    if blob[:1] != b"E":
        return f"not an evaluation reply (tag {blob[:1]!r})"
    try:
        r = json.loads(blob[1:])
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON"
    if not isinstance(r, dict):
        return "not a JSON object"
    n = r.get("n")
    if not _is_int(n) or n <= 0:
        return f"n must be a positive integer, got {n!r}"
    if not (_is_finite(r.get("accuracy")) and 0 <= r["accuracy"] <= 1):
        return f"accuracy must be a number in [0, 1], got {r.get('accuracy')!r}"
    if not (_is_finite(r.get("loss")) and r["loss"] >= 0):
        return f"loss must be a finite number >= 0, got {r.get('loss')!r}"
    share = r.get("predicted_share")
    if not (isinstance(share, list) and len(share) == classes and all(map(_is_finite, share))):
        return f"predicted_share must be {classes} finite numbers"
    try:
        logits = np.asarray(r.get("logits"), dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        logits = np.zeros(0, dtype=np.float32)
    if logits.shape != (n, classes) or not np.isfinite(logits).all():
        return f"logits must be {n} rows of {classes} finite numbers (float32)"
    labels = r.get("labels")
    if not (isinstance(labels, list) and len(labels) == n
            and all(_is_int(y) and 0 <= y < classes for y in labels)):
        return f"labels must be {n} class indices in 0..{classes - 1}"
    return r


def num_classes(folder: RunFolder) -> int:
    """The run's number of classes, from partition.json (prepare_run; folders prepared before
    it named the classes have only the histogram)."""
    part = folder.read_json(PARTITION)
    return len(part["class_names"]) if "class_names" in part else len(part["histogram"][0])


def server_evaluator(cfg, mask: SparseMask) -> LocalEvaluator:
    """evaluation="server": the run's model and task, loaded here."""
    prep = prepare(cfg)
    params = dict(prep.model.named_parameters())
    mask.check_model(params, model_fingerprint(prep.model))
    return LocalEvaluator(prep, SparseView(params, mask), cfg.eval_batch_size)


MAX_CLIENT_EXAMPLES = 2**40  # a client size in a hello above this is no site's data


def hello(flare, site_clients: dict[str, list[int]], resume: bool,
          clients: int) -> dict[str, dict[str, Any]]:
    """Each site's hello (`check_hello`): the clients it hosts and their sizes, whether it
    evaluates, its PID and the round its clients' saved state is at."""
    hosted = sorted(k for ks in site_clients.values() for k in ks)
    if hosted != list(range(clients)):
        raise RuntimeError(f"sites host clients {hosted}, the run has {clients} (each on "
                           "exactly one site)")
    msg = b"H" + json.dumps({"resume": resume}).encode()
    got = flare.exchange(0, {s: msg for s in site_clients})
    if set(site_clients) - set(got):
        raise RuntimeError(f"sites {sorted(set(site_clients) - set(got))} did not answer hello")
    return {s: check_hello(s, got[s], ks) for s, ks in site_clients.items()}


def check_hello(site: str, blob: Any, assigned: list[int]) -> dict[str, Any]:
    """A site's hello, with "clients" as {client id: size}: the sizes become FedAvg weights, so
    they must be positive integers and of exactly the clients the run assigns the site (none
    of another site's). RuntimeError naming the site and what is wrong otherwise."""
    def bad(why: str) -> RuntimeError:
        return RuntimeError(f"site {site}: bad hello: {why}")

    if not isinstance(blob, bytes):
        raise bad(f"reply is not bytes ({type(blob).__name__})")
    if blob[:1] != b"H":
        raise bad(f"not a hello reply (tag {blob[:1]!r})")
    try:
        h = json.loads(blob[1:])
    except (ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(h, dict):
        raise bad("not a JSON object")
    if not isinstance(h.get("clients"), dict):
        raise bad("'clients' must map client ids to numbers of examples")
    sizes: dict[int, int] = {}
    for key, n in h["clients"].items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and key == str(int(key))):
            raise bad(f"client id {key[:20]!r} is not an integer")
        if not (_is_int(n) and 0 < n <= MAX_CLIENT_EXAMPLES):
            raise bad(f"client {key}: size {n!r} is not an integer in 1..2**40")
        sizes[int(key)] = n
    if sorted(sizes) != sorted(assigned):
        raise bad(f"claims clients {sorted(sizes)}, the run assigns it {sorted(assigned)}")
    if not isinstance(h.get("evaluates"), bool):
        raise bad(f"'evaluates' must be true or false, got {h.get('evaluates')!r}")
    return {**h, "clients": sizes}


def check_sites_resumed(server, hellos: dict[str, dict[str, Any]]) -> None:
    """Each site's saved client state (the round `served` of its hello) must be no older than
    the last round in which the server applied one of its clients' replies (`applied`, from
    the checkpoint): older state would go on from a stale data pointer or model copy, silently
    not bit-identical, or with scalars a trainer that cannot catch up. Rounds its clients sat
    out (partial participation, lost replies) do not count; newer state is fine (the site
    restores the snapshot before the round the server plans)."""
    for s, h in sorted(hellos.items()):
        k, last = max(((int(c), server.applied[int(c)]) for c in h["clients"]),
                      key=lambda ka: ka[1])
        if h["served"] < last:
            held = (f"client state of round {h['served']}" if h["served"] else "no client state")
            raise RuntimeError(f"site {s} holds {held} in {h['state_dir']}, but its client {k} "
                               f"took part in round {last} (the run is at round {server.round}); "
                               "cannot resume its clients: restore the site's state folder or "
                               "start the run again")


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
    # the session's steps with the sites' resume check between them, under the folder's lock
    with folder.locked(), open(folder.file(SERVER_LOG), "a", buffering=1) as log_file:
        def log(msg: str) -> None:
            print(msg, file=log_file)

        mask = SparseMask.load(folder.file(MASK_FILE))
        try:
            hellos = hello(flare, site_clients, resume, cfg.clients)
        except RuntimeError as e:  # the reason in the run folder too, not only FLARE's log
            print(f"stopped before round 1: {e}", file=log_file)
            raise
        sizes = {k: n for h in hellos.values() for k, n in h["clients"].items()}
        server = make_server(cfg.method, settings_of(cfg),
                             load_file(str(folder.file(INITIAL_STATE)))["theta"],
                             [sizes[k] for k in range(cfg.clients)],
                             method_settings=cfg.method_settings, calib_grad=mask.calib_grad)
        evaluating = [s for s, h in hellos.items() if h["evaluates"]]
        if evaluation == "sites" and not evaluating:
            raise RuntimeError(f"no site evaluates: the hellos of {sorted(hellos)} all say "
                               "evaluates=false (evaluation='sites' needs one)")
        evaluator = (server_evaluator(cfg, mask) if evaluation == "server" else
                     SitesEvaluator(flare, evaluating, num_classes(folder),
                                    cfg.round_timeout or None, log))
        transport = SiteTransport(flare, site_clients, log)
        session = Session(cfg, folder, server, transport, evaluator, [], mask, log=log,
                          record_extra=lambda: transport.last, round_log=True, started=started,
                          ledger=ledger_of(cfg, [sizes[k] for k in range(cfg.clients)]))
        session.open(resume)
        if resume:
            check_sites_resumed(server, hellos)
        session.train()
        session.finish({"transport": "nvflare", "sites": site_clients, "evaluation": evaluation})
