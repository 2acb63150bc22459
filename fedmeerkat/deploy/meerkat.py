"""Meerkat over NVIDIA FLARE: the server's round driver and the sites' resident handler.

The server side runs the same `RoundDriver` and server state machine as `fedmeerkat run`; each
site runs the same client routine through a `ClientHost` on one model loaded once for the job.
FLARE only moves bytes (fedmeerkat.deploy.job): one targeted task per site per round, carrying
the wire-format plans of the clients that site hosts (a site hosting one client gets one task
per client per round). Byte counts in metrics.jsonl are those plans and replies alone, as in a
local run; the framing below adds 7 bytes per site and 8 per client to a plan, 27 per site
and 8 per client to a reply, not counted.

    site payload : b"H" | JSON {"resume": bool}                   hello: which clients, sizes
                   b"T" | n u16 | (client u32 | len u32 | plan)*n  train one round
                   b"E" | theta f32[nnz]                           evaluate the global vector
    site reply   : b"H" | JSON {"clients": {id: num_samples}, "evaluates": bool, "pid": int,
                            "served": the round its clients' state is at, "state_dir": str}
                   b"T" | pid u32 | compute f64 | forward f64 | n u16 | (client u32 | len u32 | reply)*n
                   b"E" | JSON {"n", "accuracy", "loss", "predicted_share", "logits", "labels"}

In a "T" reply, pid is the resident trainer's process id and compute / forward the seconds the
site spent handling the round / in forward passes; the server writes them per round into
metrics.jsonl (`site_pids`, `site_compute_s`, `site_forward_s`, beside `exchange_s`, the
round's exchange wall time on the server).

Data placement (`site_arg`, base64 of JSON): {"run_dir": the prepared run folder as the site sees it,
"clients": [ids], "overrides": ["key=value", ...]}. Every site loads the run's task and its
partition (same seed: same split everywhere) and keeps its own clients' examples: the mapping
from site to clients is explicit, the data each client holds is the partition's. A site given
its own `data_files` override splits its local file among its clients instead.
Evaluation runs at the sites on their test split and is averaged by size; sites that read the
same shared test split (no data_files override) count it once (the first of them evaluates).
With evaluation="server" the server loads the run's model and task and evaluates itself.
Resume: the server continues from the run folder's checkpoint, each site from its state folder
(fedmeerkat.deploy.site_state).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

INITIAL_STATE = "initial_state.safetensors"


# ---- framing ----------------------------------------------------------------------------
# the head of a site's "T" reply: the trainer's PID, seconds in the handler (the clients'
# compute) and, of those, seconds in forward passes
REPLY_HEAD = struct.Struct("<Idd")


def pack(tag: bytes, items: dict[int, bytes], head: bytes = b"") -> bytes:
    parts = [tag, head, struct.pack("<H", len(items))]
    for k, blob in items.items():
        parts += [struct.pack("<II", k, len(blob)), blob]
    return b"".join(parts)


def unpack(blob: bytes, head: int = 0) -> dict[int, bytes]:
    (n,) = struct.unpack_from("<H", blob, 1 + head)
    at, out = 3 + head, {}
    for _ in range(n):
        k, m = struct.unpack_from("<II", blob, at)
        out[k] = blob[at + 8:at + 8 + m]
        if len(out[k]) != m:
            raise ValueError(f"payload truncated in client {k}'s message")
        at += 8 + m
    return out


def pack_reply(pid: int, compute_s: float, forward_s: float, items: dict[int, bytes]) -> bytes:
    return pack(b"T", items, REPLY_HEAD.pack(pid, compute_s, forward_s))


def unpack_reply(blob: bytes) -> tuple[int, float, float, dict[int, bytes]]:
    if blob[:1] != b"T":
        raise ValueError(f"not a train reply (tag {blob[:1]!r})")
    pid, compute_s, forward_s = REPLY_HEAD.unpack_from(blob, 1)
    return pid, compute_s, forward_s, unpack(blob, REPLY_HEAD.size)


# ---- server side --------------------------------------------------------------------------
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


def check_resume_overrides(overrides: list[str], run_dir: str | Path | None = None) -> None:
    """Keys a resumed deployed run may change: those `fedmeerkat run --resume` allows (rounds
    only with a constant lr_schedule, checked when `run_dir` is given)."""
    from fedmeerkat.config import ConfigError, parse_overrides
    from fedmeerkat.runners.run_folder import RESUMABLE_KEYS, load_run_config

    changes = parse_overrides(overrides)
    bad = sorted(set(changes) - set(RESUMABLE_KEYS))
    if bad:
        raise ConfigError(f"{bad[0]}: cannot change on --resume (only {', '.join(RESUMABLE_KEYS)})")
    if ("rounds" in changes and run_dir is not None
            and load_run_config(Path(run_dir)).lr_schedule != "constant"):
        raise ConfigError("rounds: cannot change on --resume with a decaying lr_schedule")


def serve(flare, run_dir: str, site_clients: dict[str, list[int]], resume: bool = False,
          overrides: list[str] | None = None, evaluation: str = "sites") -> None:
    """The FLARE controller's driver: the whole run, written into `run_dir` on the server.

    With `resume`, continue after the run folder's checkpoint (metrics.jsonl is cut back to
    it); `overrides` (key=value, RESUMABLE_KEYS only) change e.g. `rounds`. `evaluation`:
    "sites" asks the sites to evaluate the global vector on their test data (averaged by size),
    "server" loads the run's model and task here (runners.simulation.prepare) and evaluates
    itself."""
    from safetensors.torch import load_file

    from fedmeerkat.federated.methods import make_server
    from fedmeerkat.runners.driver import RoundDriver
    from fedmeerkat.runners.run_folder import (
        FINAL_STATE,
        MASK_FILE,
        MetricsLog,
        load_checkpoint,
        load_run_config,
        save_checkpoint,
        save_state,
        save_trajectories,
        write_json_atomic,
    )
    from fedmeerkat.runners.simulation import settings_of
    from fedmeerkat.zo import SparseMask

    if evaluation not in ("sites", "server"):
        raise ValueError(f"evaluation: {evaluation!r}, expected 'sites' or 'server'")
    overrides = list(overrides or [])
    if resume:
        check_resume_overrides(overrides, run_dir)
    elif overrides:
        raise ValueError("overrides apply to a resumed run only (the run folder fixes the rest)")
    start = time.time()
    out = Path(run_dir)
    cfg = load_run_config(out, overrides)
    log_file = open(out / "server.log", "a", buffering=1)

    def log(msg: str) -> None:
        print(msg, file=log_file)

    mask = SparseMask.load(out / MASK_FILE)
    theta0 = load_file(str(out / INITIAL_STATE))["theta"]
    hello_msg = b"H" + json.dumps({"resume": resume}).encode()
    hello = {s: json.loads(b[1:])
             for s, b in flare.exchange(0, {s: hello_msg for s in site_clients}).items()}
    if set(hello) != set(site_clients):
        raise RuntimeError(f"sites {sorted(set(site_clients) - set(hello))} did not answer hello")
    sizes = {int(k): n for h in hello.values() for k, n in h["clients"].items()}
    if sorted(sizes) != list(range(cfg.clients)):
        raise RuntimeError(f"sites host clients {sorted(sizes)}, the run has {cfg.clients}")
    server = make_server(cfg.method, settings_of(cfg), theta0, [sizes[k] for k in range(cfg.clients)],
                         method_settings=cfg.method_settings, calib_grad=mask.calib_grad)
    evaluators = [s for s, h in hello.items() if h["evaluates"]]
    metrics = MetricsLog(out / "metrics.jsonl")

    if evaluation == "server":
        from fedmeerkat.models.loading import model_fingerprint
        from fedmeerkat.models.scoring import evaluate as score
        from fedmeerkat.runners.simulation import prepare
        from fedmeerkat.zo import SparseView

        prep = prepare(cfg)
        params = dict(prep.model.named_parameters())
        mask.check_model(params, model_fingerprint(prep.model))
        view = SparseView(params, mask)

        def run_eval() -> dict[str, Any]:
            view.write(server.theta.to(view.device))
            res = score(prep.scorer, prep.test_ids, prep.test_labels, cfg.eval_batch_size)
            return {"test_accuracy": res.accuracy, "test_loss": res.loss,
                    "predicted_share": res.predicted_share, **res.metrics("test_")}
    else:
        def run_eval() -> dict[str, Any]:
            blob = b"E" + server.theta.cpu().numpy().astype("<f4").tobytes()
            got = flare.exchange(0, {s: blob for s in evaluators})
            res = [json.loads(b[1:]) for b in got.values()]
            n = sum(r["n"] for r in res)
            share = np.sum([np.array(r["predicted_share"]) * r["n"] for r in res], axis=0) / n
            # AUC, macro-F1 and best-shift accuracy are no averages: computed here, exactly,
            # from every site's label-word logits and labels (float32 survives JSON exactly)
            from fedmeerkat.models.scoring import label_metrics

            tf = label_metrics(
                np.concatenate([np.asarray(r["logits"], dtype=np.float32) for r in res]),
                np.concatenate([np.asarray(r["labels"], dtype=np.int64) for r in res]))
            return {"test_accuracy": sum(r["accuracy"] * r["n"] for r in res) / n,
                    "test_loss": sum(r["loss"] * r["n"] for r in res) / n,
                    "predicted_share": share.tolist(), **{f"test_{k}": v for k, v in tf.items()}}

    keys = ("test_accuracy", "test_loss", "predicted_share", "test_auc", "test_macro_f1",
            "test_best_shift_accuracy")
    if resume:
        load_checkpoint(out, server, [])  # the server's state; the clients' live at the sites
        records = [r for r in metrics.read() if r["round"] <= server.round]
        metrics.rewrite(records)  # drop a line written after the last checkpoint, if any
        initial = {k: records[0].get(k) for k in keys}
        last = {k: [r for r in records if r.get("test_accuracy") is not None][-1].get(k)
                for k in keys}
        every_round = cfg.clients_per_round in (0, cfg.clients)
        for s, h in hello.items():
            # with full participation every site served every round: no state means a lost folder
            if every_round and server.round > 0 and h["served"] == 0:
                raise RuntimeError(f"site {s} holds no client state in {h['state_dir']} (the "
                                   f"run is at round {server.round}); cannot resume its clients")
        log(f"resuming after round {server.round} of {cfg.rounds}")
    else:
        initial = last = run_eval()
        metrics.append({"round": 0, "train_loss": None, **initial, "bytes_up": 0, "bytes_down": 0})
        save_checkpoint(out, server, [])
        log(f"round 0: test accuracy {initial['test_accuracy']:.4f}")

    def evaluate(r: int) -> dict[str, Any] | None:
        nonlocal last
        if not (r == cfg.rounds or (cfg.eval_every and r % cfg.eval_every == 0)):
            return None
        last = run_eval()
        return last

    transport = SiteTransport(flare, site_clients)
    driver = RoundDriver(server, transport,
                         append_metrics=lambda rec: metrics.append({**rec, **transport.last}),
                         save_arrays=lambda r, a: save_trajectories(out, r, a),
                         checkpoint=lambda: save_checkpoint(out, server, []),
                         evaluate=evaluate, log=log, round_timeout=cfg.round_timeout,
                         min_clients=cfg.min_clients, round_retries=cfg.round_retries)
    for r in range(server.round + 1, cfg.rounds + 1):
        record = driver.run_round(r)
        log(f"round {r}: train loss {record['train_loss']:.4f}, {len(record['bytes'])} replies")
    save_state(out / FINAL_STATE, server.theta,
               {"round": str(server.round), "nnz": str(mask.nnz), "method": cfg.method})
    records = metrics.read()
    client_rounds = sum(len(r.get("bytes", {})) for r in records[1:])
    up, down = sum(r["bytes_up"] for r in records), sum(r["bytes_down"] for r in records)
    write_json_atomic(out / "summary.json", {
        "model": cfg.model, "task": cfg.task, "method": cfg.method, "transport": "nvflare",
        "sites": site_clients, "evaluation": evaluation,
        "initial_accuracy": initial["test_accuracy"], "final_accuracy": last["test_accuracy"],
        "initial_predicted_share": initial["predicted_share"],
        "final_predicted_share": last["predicted_share"],
        **{f"{when}_{k}": rec.get(f"test_{k}") for when, rec in (("initial", initial),
                                                                  ("final", last))
           for k in ("auc", "macro_f1", "best_shift_accuracy")},
        "rounds": server.round, "clients": cfg.clients, "local_steps": cfg.local_steps,
        "perturbations": cfg.perturbations, "zo_estimator": cfg.zo_estimator,
        "clients_per_round": cfg.clients_per_round or cfg.clients, "downlink": cfg.downlink,
        "density": mask.density, "mask_nnz": mask.nnz, "partition": cfg.partition,
        "upload_bytes_per_client": up / max(1, client_rounds),
        "download_bytes_per_client": down / max(1, client_rounds),
        "upload_bytes_total": up, "download_bytes_total": down,
        "bytes_note": "per participating client per round, mean; from the serialized messages",
        "wall_seconds": round(time.time() - start, 1), "out": str(out),
        **server.summary_extra()})
    log_file.close()


# ---- site side ----------------------------------------------------------------------------
def site(site_name: str, site_arg: str) -> Callable[[bytes], bytes]:
    """The site trainer's handler: loads the model and the site's clients once, then serves
    every message of the job (fedmeerkat.deploy.site_trainer).

    After every round it serves, the hosted clients' state goes to the site's state folder
    (fedmeerkat.deploy.site_state; `state_dir` in the site argument, default
    RUN_DIR/site_state/SITE). A hello with "resume" loads the latest snapshot; one without
    clears the folder. A plan for a round the clients already went through (the server resumed
    from a checkpoint older than what the site served) restores the snapshot before it."""
    from fedmeerkat.data.partition import partition
    from fedmeerkat.data.pointer import ClientDataPointer
    from fedmeerkat.deploy.site_state import SiteStateStore
    from fedmeerkat.federated import ClientState, RoundPlan
    from fedmeerkat.federated.methods import get_method
    from fedmeerkat.models.loading import model_fingerprint
    from fedmeerkat.models.scoring import evaluate
    from fedmeerkat.runners.client_host import ClientHost
    from fedmeerkat.runners.run_folder import MASK_FILE, load_run_config
    from fedmeerkat.runners.simulation import SharedModel, prepare, settings_of
    from fedmeerkat.zo import SparseMask, SparseView
    from fedmeerkat.zo.seeds import mix

    arg = json.loads(base64.urlsafe_b64decode(site_arg))
    run_dir = Path(arg["run_dir"])
    overrides = list(arg.get("overrides", []))
    cfg = load_run_config(run_dir, overrides)
    prep = prepare(cfg)
    local = any(o.startswith("data_files=") for o in overrides)
    hosted = [int(k) for k in arg["clients"]]
    if local:  # the site's own file, split among the clients it hosts
        parts = partition(prep.train_labels, len(hosted), cfg.partition, alpha=cfg.alpha,
                          seed=mix(cfg.seed, 7, hosted[0]), num_classes=prep.task.spec.num_classes,
                          min_size=cfg.min_partition_size)
        mine = dict(zip(hosted, parts, strict=True))
    else:  # the run's partition, computed identically everywhere
        parts = partition(prep.train_labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                          seed=cfg.seed, num_classes=prep.task.spec.num_classes,
                          min_size=cfg.min_partition_size)
        mine = {k: parts[k] for k in hosted}
    mask = SparseMask.load(run_dir / MASK_FILE)
    params = dict(prep.model.named_parameters())
    mask.check_model(params, model_fingerprint(prep.model))
    view = SparseView(params, mask)
    theta0 = view.gather()
    keep = cfg.downlink == "scalars"
    states = {k: ClientState(k, np.asarray(p, dtype=np.int64),
                             ClientDataPointer(len(p), seed=mix(cfg.seed, 2, k)),
                             theta0.clone() if keep else None) for k, p in mine.items()}
    store = SiteStateStore(Path(arg.get("state_dir") or run_dir / "site_state" / site_name))

    def reset() -> None:  # the clients' initial state, in place (the host holds these objects)
        for k, s in states.items():
            s.pointer = ClientDataPointer(len(mine[k]), seed=mix(cfg.seed, 2, k))
            s.theta, s.synced, s.extra = (theta0.clone() if keep else None), 0, {}

    class TimedModel(SharedModel):
        """The shared model, adding up the seconds its forward passes take (`forward_s`)."""

        forward_s = 0.0

        def loss(self, example_ids: np.ndarray) -> float:
            t = time.perf_counter()
            try:
                return super().loss(example_ids)
            finally:
                self.forward_s += time.perf_counter() - t

    settings = settings_of(cfg)
    model = TimedModel(prep, view)
    host = ClientHost(get_method(cfg.method), cfg.method_settings, settings, model, states)
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
                kept = store.rounds()
                if kept:
                    store.load(kept[-1], states)
                    host.states_replaced()
                    served = kept[-1]
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


# ---- preparing and submitting a run -------------------------------------------------------
def prepare_run(cfg, quiet: bool = False) -> Path:
    """Make the run folder a deployed run starts from, on a machine that has the model once:
    config.toml, mask.safetensors (computed or given), initial_state.safetensors (the model's
    values at the mask) and partition.json. The server then needs no model; copy the folder
    (config.toml and mask.safetensors) to each site."""
    from fedmeerkat.config import ConfigError
    from fedmeerkat.data.partition import label_histogram, partition
    from fedmeerkat.federated.methods import get_method
    from fedmeerkat.runners.run_folder import open_run_folder, save_state, write_json_atomic
    from fedmeerkat.runners.simulation import get_mask, prepare
    from fedmeerkat.runners.spaces import build_space

    if get_method(cfg.method).space(cfg.method_settings) != "mask":
        raise ConfigError(f"method: {cfg.method} trains no Meerkat mask; deployment runs the "
                          "methods that do (the server replays mask-sized vectors)")
    if cfg.lr_auto:  # the search trains a pilot on pooled examples: only a simulation has them
        raise ConfigError("lr_auto: simulation only (the search trains on the pooled training "
                          "data); run it with `fedmeerkat run` and deploy with its lr=")
    cfg, out = open_run_folder(cfg, resume=False)
    prep = prepare(cfg)
    parts = partition(prep.train_labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                      seed=cfg.seed, num_classes=prep.task.spec.num_classes,
                      min_size=cfg.min_partition_size)
    space = build_space(cfg, prep.model, out, resume=False,
                        make_mask=lambda: get_mask(cfg, prep, parts, quiet))
    save_state(out / INITIAL_STATE, space.view.gather(), {"nnz": str(space.mask.nnz)})
    hist = label_histogram(parts, prep.train_labels, prep.task.spec.num_classes)
    write_json_atomic(out / "partition.json", {"scheme": cfg.partition, "alpha": cfg.alpha,
                                               "histogram": hist.tolist(),
                                               "sizes": [len(p) for p in parts]})
    return out


def site_args(run_dir: str | Path, site_clients: dict[str, list[int]],
              site_overrides: dict[str, list[str]] | None = None,
              site_run_dirs: dict[str, str] | None = None, overrides: list[str] | None = None,
              evaluation: str = "sites",
              site_state_dirs: dict[str, str] | None = None) -> dict[str, str]:
    """Each site's argument for `site()` (see deploy_job)."""
    site_overrides = site_overrides or {}
    shared = [s for s in site_clients
              if not any(o.startswith("data_files=") for o in site_overrides.get(s, []))]
    # base64: FLARE reads "{...}" in a job config string as a variable to substitute
    return {s: base64.urlsafe_b64encode(json.dumps({
        "run_dir": str((site_run_dirs or {}).get(s, run_dir)), "clients": ks,
        "overrides": [*(overrides or []), *site_overrides.get(s, [])],
        "evaluate": evaluation == "sites" and bool(shared) and s == shared[0],
        "state_dir": (site_state_dirs or {}).get(s),
    }).encode()).decode() for s, ks in site_clients.items()}


def deploy_job(run_dir: str | Path, site_clients: dict[str, list[int]],
               site_overrides: dict[str, list[str]] | None = None,
               site_run_dirs: dict[str, str] | None = None, python: str = sys.executable,
               round_timeout: int = 3600, interval: float = 0.02, resume: bool = False,
               overrides: list[str] | None = None, evaluation: str = "sites",
               site_state_dirs: dict[str, str] | None = None):
    """The FLARE job of a prepared run: the server drives it from `run_dir`; each site hosts
    `site_clients[site]` and reads its copy of the run folder (`site_run_dirs`, default the same
    path). `interval` sets FLARE's three polling periods (their defaults cost 2 s a round).

    `resume` continues the run from its checkpoint (server) and the sites' state folders
    (`site_state_dirs`, default RUN_DIR/site_state/SITE in each site's copy); `overrides`
    (RESUMABLE_KEYS, e.g. rounds=20) go to the server and every site. `evaluation`: "sites" or
    "server" (the server loads the model)."""
    from fedmeerkat.deploy.job import make_job

    if evaluation not in ("sites", "server"):
        raise ValueError(f"evaluation: {evaluation!r}, expected 'sites' or 'server'")
    overrides = list(overrides or [])
    if overrides and not resume:
        raise ValueError("overrides apply to a resumed run only (the run folder fixes the rest)")
    check_resume_overrides(overrides)
    args = site_args(run_dir, site_clients, site_overrides, site_run_dirs, overrides,
                     evaluation, site_state_dirs)
    return make_job(Path(run_dir).name.replace(".", "_") or "fedmeerkat", args,
                    "fedmeerkat.deploy.meerkat:serve", "fedmeerkat.deploy.meerkat:site",
                    {"run_dir": str(Path(run_dir).resolve()), "site_clients": site_clients,
                     "resume": resume, "overrides": overrides, "evaluation": evaluation},
                    round_timeout=round_timeout, python=python, task_request_interval=interval,
                    task_fetch_interval=interval, task_check_period=interval)
