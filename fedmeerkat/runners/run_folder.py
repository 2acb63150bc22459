"""The run folder: every file a run writes or reads, in one module.

    config.toml               the resolved config (written once; `load_run_config`)
    mask.safetensors          the trainable space (mask, LoRA index or dense names/shapes)
    partition.json            the clients' label histogram
    metrics.jsonl             one line per round (`MetricsLog`)
    checkpoint.safetensors    everything to continue bit-identically (`save_checkpoint`)
    trajectories/round_N.safetensors   per-round arrays (GradIP per client and step)
    final_state.safetensors   the final trainable vector (`save_state`, `load_run_state`)
    summary.json              (`write_json_atomic`); accuracy.png is drawn by report.plot_run

Writes go to a temp file, are fsynced and renamed, so a crash leaves the previous file whole.
Only safetensors and JSON/TOML are read: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmeerkat.config import ConfigError, RunConfig, build_config, parse_overrides
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState
from fedmeerkat.federated.server import MeerkatServer
from fedmeerkat.zo import SparseMask
from fedmeerkat.zo.dense import DenseSpace, is_dense_file


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null reads as "not measured"
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def write_json_atomic(path: Path, data: Any) -> None:
    """temp file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most one line."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(_clean(r)) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


MASK_FILE = "mask.safetensors"
FINAL_STATE = "final_state.safetensors"


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.task}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"


def save_state(path: Path, theta: torch.Tensor, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"theta": theta.cpu().contiguous()}, str(tmp), metadata=meta)
    _fsync_replace(tmp, path)


def save_trajectories(out: Path, round_idx: int, arrays: dict[str, torch.Tensor]) -> None:
    """One round's trajectories (e.g. GradIP per client and step)."""
    traj = out / "trajectories"
    traj.mkdir(exist_ok=True)
    tmp = traj / f"round_{round_idx:05d}.safetensors.tmp"
    save_file({k: v.cpu().contiguous() for k, v in arrays.items()}, str(tmp))
    _fsync_replace(tmp, traj / f"round_{round_idx:05d}.safetensors")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_VERSION = "2"  # 2: client copies stored once per round (1, a copy per client, loads)
# Keys a resumed run may change: they do not alter what the finished rounds computed.
# z and every update are bit-identical on any device, so the devices may change too.
# How long a round waits and how many replies it needs decide whether a round is applied, not
# what an applied round computes, so a run stopped for want of replies may resume with others.
RESUMABLE_KEYS = ("rounds", "eval_every", "eval_batch_size", "threads", "device", "server_device",
                  "round_timeout", "min_clients", "round_retries")


def save_checkpoint(out: Path, server: MeerkatServer, states: list[ClientState]) -> None:
    """Everything needed to continue bit-identically, in one atomically replaced file."""
    tensors, server_meta = server.state_dict()
    for s in states:
        # clients at the same round share one copy (share_copies): stored once per round
        if s.theta is not None and f"clients.theta.round{s.synced}" not in tensors:
            tensors[f"clients.theta.round{s.synced}"] = s.theta.cpu().contiguous()
        for name, t in s.extra.items():  # method state of the client (FedDyn's h_k)
            tensors[f"client.{s.client_id}.extra.{name}"] = t.cpu().contiguous()
    meta = {"server": server_meta,
            "clients": [{"pointer": s.pointer.state_dict(), "synced": s.synced} for s in states]}
    tmp = out / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata={"version": CHECKPOINT_VERSION,
                                           "state": json.dumps(meta)})
    _fsync_replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path, server: MeerkatServer, states: list[ClientState]) -> None:
    path = out / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no {CHECKPOINT}: nothing to resume")
    with safe_open(str(path), framework="pt") as f:
        meta_raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_raw.get("version") != CHECKPOINT_VERSION:
        # version 1 (a copy per client) never shipped in a release and predates portable z:
        # a run it started cannot continue bit-identically, so it is refused, not converted
        raise ValueError(f"{path}: checkpoint version {meta_raw.get('version')!r}, this "
                         f"fedmeerkat reads version {CHECKPOINT_VERSION}; start the run again")
    meta = json.loads(meta_raw["state"])
    if len(meta["clients"]) != len(states):
        raise ValueError(f"{path}: checkpoint has {len(meta['clients'])} clients, run has {len(states)}")
    server.load_state_dict(tensors, meta["server"])
    for s, c in zip(states, meta["clients"], strict=True):
        s.pointer = ClientDataPointer.from_state(c["pointer"])
        s.synced = int(c["synced"])
        # shared by the clients of that round (read only: sync_client copies on write)
        s.theta = tensors.get(f"clients.theta.round{s.synced}")
        pre = f"client.{s.client_id}.extra."
        s.extra = {k[len(pre):]: v.clone() for k, v in tensors.items() if k.startswith(pre)}


def open_run_folder(cfg: RunConfig, resume: bool) -> tuple[RunConfig, Path]:
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{out} holds no {CHECKPOINT}: nothing to resume")
        return cfg, out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} exists and is not empty; choose another out= "
                              "or continue it with `fedmeerkat run --resume RUN_DIR`")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(out))
    (out / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    return cfg, out


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """A run folder's resolved config, with `key=value` overrides (eval, export). Its mask= is
    dropped: the folder has its own copy of the mask."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.toml)")
    raw = tomllib.loads((run_dir / "config.toml").read_text())
    raw.pop("mask", None)
    raw.update(parse_overrides(overrides or []))
    return build_config(raw)


def load_space(path: Path) -> SparseMask | DenseSpace:
    return DenseSpace.load(path) if is_dense_file(path) else SparseMask.load(path)


def load_run_state(run_dir: Path) -> tuple[SparseMask | DenseSpace, torch.Tensor]:
    """The finished run's space and final vector (checked against each other)."""
    from safetensors.torch import load_file

    state = run_dir / FINAL_STATE
    if not state.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {FINAL_STATE} (did the run finish?)")
    mask = load_space(run_dir / "mask.safetensors")
    theta = load_file(str(state))["theta"]
    if theta.numel() != mask.nnz or not math.isfinite(float(theta.sum())):
        raise ValueError(f"{state}: state does not fit the run's mask")
    return mask, theta
