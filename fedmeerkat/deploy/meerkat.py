"""Meerkat over NVIDIA FLARE: the server's round driver and the sites' resident handler.

The server side runs the same `RoundDriver` and server state machine as `fedmeerkat run`; each
site runs the same client routine through a `ClientHost` on one model loaded once for the job.
FLARE only moves bytes (fedmeerkat.deploy.job): one targeted task per site per round, carrying
the wire-format plans of the clients that site hosts (a site hosting one client gets one task
per client per round). Byte counts in metrics.jsonl are those plans and replies alone, as in a
local run; the framing below adds 7 bytes per site and 8 per client, not counted.

    site payload : b"H"                                           hello: which clients, sizes
                   b"T" | n u16 | (client u32 | len u32 | plan)*n  train one round
                   b"E" | theta f32[nnz]                           evaluate the global vector
    site reply   : b"H" | JSON {"clients": {id: num_samples}, "evaluates": bool}
                   b"T" | n u16 | (client u32 | len u32 | reply)*n
                   b"E" | JSON {"n", "accuracy", "loss", "predicted_share", "logits", "labels"}

Data placement (`site_arg`, base64 of JSON): {"run_dir": the prepared run folder as the site sees it,
"clients": [ids], "overrides": ["key=value", ...]}. Every site loads the run's task and its
partition (same seed: same split everywhere) and keeps its own clients' examples: the mapping
from site to clients is explicit, the data each client holds is the partition's. A site given
its own `data_files` override splits its local file among its clients instead.
Evaluation runs at the sites on their test split and is averaged by size; sites that read the
same shared test split (no data_files override) count it once (the first of them evaluates).
"""

from __future__ import annotations

import base64
import json
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
def pack(tag: bytes, items: dict[int, bytes]) -> bytes:
    parts = [tag, struct.pack("<H", len(items))]
    for k, blob in items.items():
        parts += [struct.pack("<II", k, len(blob)), blob]
    return b"".join(parts)


def unpack(blob: bytes) -> dict[int, bytes]:
    (n,) = struct.unpack_from("<H", blob, 1)
    at, out = 3, {}
    for _ in range(n):
        k, m = struct.unpack_from("<II", blob, at)
        out[k] = blob[at + 8:at + 8 + m]
        if len(out[k]) != m:
            raise ValueError(f"payload truncated in client {k}'s message")
        at += 8 + m
    return out


# ---- server side --------------------------------------------------------------------------
class SiteTransport:
    """The round driver's Transport (client ids) over the FLARE transport (sites)."""

    def __init__(self, flare, site_clients: dict[str, list[int]]):
        self.flare, self.site_clients = flare, site_clients
        self.site_of = {k: s for s, ks in site_clients.items() for k in ks}

    def exchange(self, round_idx: int, plans: Mapping[int, bytes],
                 deadline: float | None) -> dict[int, bytes]:
        by_site: dict[str, dict[int, bytes]] = {}
        for k, blob in plans.items():
            by_site.setdefault(self.site_of[k], {})[k] = blob
        timeout = None if deadline is None else max(0.01, deadline - time.monotonic())
        got = self.flare.exchange(round_idx, {s: pack(b"T", m) for s, m in by_site.items()}, timeout)
        replies: dict[int, bytes] = {}
        for site, blob in got.items():
            try:
                for k, reply in unpack(blob).items():
                    if self.site_of.get(k) == site:  # a site answers for its own clients only
                        replies[k] = reply
            except (ValueError, struct.error):
                continue  # an unreadable site payload: its clients count as missing
        return replies


def serve(flare, run_dir: str, site_clients: dict[str, list[int]]) -> None:
    """The FLARE controller's driver: the whole run, written into `run_dir` on the server."""
    from fedmeerkat.federated.methods import make_server
    from fedmeerkat.runners.driver import RoundDriver
    from fedmeerkat.runners.run_folder import (
        FINAL_STATE,
        MASK_FILE,
        MetricsLog,
        load_run_config,
        save_checkpoint,
        save_state,
        save_trajectories,
        write_json_atomic,
    )
    from fedmeerkat.runners.simulation import settings_of
    from fedmeerkat.zo import SparseMask

    start = time.time()
    out = Path(run_dir)
    cfg = load_run_config(out)
    log_file = open(out / "server.log", "a", buffering=1)

    def log(msg: str) -> None:
        print(msg, file=log_file)

    mask = SparseMask.load(out / MASK_FILE)
    from safetensors.torch import load_file

    theta0 = load_file(str(out / INITIAL_STATE))["theta"]
    hello = {s: json.loads(b[1:]) for s, b in flare.exchange(0, {s: b"H" for s in site_clients}).items()}
    if set(hello) != set(site_clients):
        raise RuntimeError(f"sites {sorted(set(site_clients) - set(hello))} did not answer hello")
    sizes = {int(k): n for h in hello.values() for k, n in h["clients"].items()}
    if sorted(sizes) != list(range(cfg.clients)):
        raise RuntimeError(f"sites host clients {sorted(sizes)}, the run has {cfg.clients}")
    server = make_server(cfg.method, settings_of(cfg), theta0, [sizes[k] for k in range(cfg.clients)],
                         method_settings=cfg.method_settings, calib_grad=mask.calib_grad)
    evaluators = [s for s, h in hello.items() if h["evaluates"]]
    metrics = MetricsLog(out / "metrics.jsonl")
    results: list[dict[str, Any]] = []

    def site_eval() -> dict[str, Any]:
        blob = b"E" + server.theta.cpu().numpy().astype("<f4").tobytes()
        got = flare.exchange(0, {s: blob for s in evaluators})
        res = [json.loads(b[1:]) for b in got.values()]
        n = sum(r["n"] for r in res)
        share = np.sum([np.array(r["predicted_share"]) * r["n"] for r in res], axis=0) / n
        # AUC, macro-F1 and best-shift accuracy are no averages: computed here, exactly, from
        # every site's label-word logits and labels (float32 values survive JSON exactly)
        from fedmeerkat.models.scoring import label_metrics

        tf = label_metrics(np.concatenate([np.asarray(r["logits"], dtype=np.float32) for r in res]),
                           np.concatenate([np.asarray(r["labels"], dtype=np.int64) for r in res]))
        return {"test_accuracy": sum(r["accuracy"] * r["n"] for r in res) / n,
                "test_loss": sum(r["loss"] * r["n"] for r in res) / n,
                "predicted_share": share.tolist(), **{f"test_{k}": v for k, v in tf.items()}}

    def evaluate(r: int) -> dict[str, Any] | None:
        if not (r == cfg.rounds or (cfg.eval_every and r % cfg.eval_every == 0)):
            return None
        results.append(site_eval())
        return results[-1]

    results.append(site_eval())
    metrics.append({"round": 0, "train_loss": None, **results[0], "bytes_up": 0, "bytes_down": 0})
    log(f"round 0: test accuracy {results[0]['test_accuracy']:.4f}")
    driver = RoundDriver(server, SiteTransport(flare, site_clients), append_metrics=metrics.append,
                         save_arrays=lambda r, a: save_trajectories(out, r, a),
                         checkpoint=lambda: save_checkpoint(out, server, []),
                         evaluate=evaluate, log=log, round_timeout=cfg.round_timeout,
                         min_clients=cfg.min_clients, round_retries=cfg.round_retries)
    for r in range(1, cfg.rounds + 1):
        record = driver.run_round(r)
        log(f"round {r}: train loss {record['train_loss']:.4f}, {len(record['bytes'])} replies")
    save_state(out / FINAL_STATE, server.theta,
               {"round": str(server.round), "nnz": str(mask.nnz), "method": cfg.method})
    records = metrics.read()
    client_rounds = sum(len(r.get("bytes", {})) for r in records[1:])
    up, down = sum(r["bytes_up"] for r in records), sum(r["bytes_down"] for r in records)
    write_json_atomic(out / "summary.json", {
        "model": cfg.model, "task": cfg.task, "method": cfg.method, "transport": "nvflare",
        "sites": site_clients, "initial_accuracy": results[0]["test_accuracy"],
        "final_accuracy": results[-1]["test_accuracy"],
        "initial_predicted_share": results[0]["predicted_share"],
        "final_predicted_share": results[-1]["predicted_share"],
        **{f"{when}_{k}": results[i].get(f"test_{k}") for when, i in (("initial", 0), ("final", -1))
           for k in ("auc", "macro_f1", "best_shift_accuracy")},
        "rounds": server.round, "clients": cfg.clients, "local_steps": cfg.local_steps,
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
    every message of the job (fedmeerkat.deploy.site_trainer)."""
    from fedmeerkat.data.partition import partition
    from fedmeerkat.data.pointer import ClientDataPointer
    from fedmeerkat.federated import ClientState
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
    settings = settings_of(cfg)
    host = ClientHost(get_method(cfg.method), cfg.method_settings, settings,
                      SharedModel(prep, view), states)
    evaluates = local or bool(arg.get("evaluate", False))
    print(f"site {site_name}: clients {hosted} ({[len(p) for p in mine.values()]} examples), "
          f"mask {mask.nnz:,}", file=sys.stderr, flush=True)

    def handle(payload: bytes) -> bytes:
        tag = payload[:1]
        if tag == b"H":
            return b"H" + json.dumps({"clients": {k: s.num_samples for k, s in states.items()},
                                      "evaluates": evaluates}).encode()
        if tag == b"T":
            return pack(b"T", {k: host.handle_bytes(plan) for k, plan in unpack(payload).items()})
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


def deploy_job(run_dir: str | Path, site_clients: dict[str, list[int]],
               site_overrides: dict[str, list[str]] | None = None,
               site_run_dirs: dict[str, str] | None = None, python: str = sys.executable,
               round_timeout: int = 3600, interval: float = 0.02):
    """The FLARE job of a prepared run: the server drives it from `run_dir`; each site hosts
    `site_clients[site]` and reads its copy of the run folder (`site_run_dirs`, default the same
    path). `interval` sets FLARE's three polling periods (their defaults cost 2 s a round)."""
    from fedmeerkat.deploy.job import make_job

    site_overrides = site_overrides or {}
    shared = [s for s in site_clients
              if not any(o.startswith("data_files=") for o in site_overrides.get(s, []))]
    # base64: FLARE reads "{...}" in a job config string as a variable to substitute
    args = {s: base64.urlsafe_b64encode(json.dumps({
        "run_dir": str((site_run_dirs or {}).get(s, run_dir)), "clients": ks,
        "overrides": site_overrides.get(s, []), "evaluate": bool(shared) and s == shared[0],
    }).encode()).decode() for s, ks in site_clients.items()}
    return make_job(Path(run_dir).name.replace(".", "_") or "fedmeerkat", args,
                    "fedmeerkat.deploy.meerkat:serve", "fedmeerkat.deploy.meerkat:site",
                    {"run_dir": str(Path(run_dir).resolve()), "site_clients": site_clients},
                    round_timeout=round_timeout, python=python, task_request_interval=interval,
                    task_fetch_interval=interval, task_check_period=interval)
