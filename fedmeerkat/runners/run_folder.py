"""The run folder: every file a run writes or reads, in one module (`RunFolder`).

    config.toml               the resolved config (written once; `load_run_config`)
    mask.safetensors          the trainable space (mask, LoRA index or dense names/shapes)
    initial_state.safetensors a deployed run's initial values at the mask (`prepare_run`)
    partition.json            the clients' label histogram
    lr_search.json            lr=auto's search (runners/tune.py)
    metrics.jsonl             one line per round (`MetricsLog`)
    checkpoint.safetensors    everything to continue bit-identically, with its checksum
                              (`save_checkpoint`); checkpoint.prev.safetensors the one before
    trajectories/round_N.safetensors   per-round arrays (GradIP per client and step)
    final_state.safetensors   the final trainable vector (`save_state`, `load_run_state`)
    summary.json              (`write_json_atomic`); accuracy.png is drawn by report.plot_run
    server.log                the deployed server's log; site_state/SITE a site's snapshots;
                              flare_job/ the job `fedmeerkat deploy submit` exported
    .lock                     locked (flock) by the one process writing the folder
                              (`RunFolder.locked`); it holds that process's id

Writes go to a temp file, are fsynced and renamed, so a crash leaves the previous file whole.
Only safetensors and JSON/TOML are read: no pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedmeerkat.config import ConfigError, RunConfig, build_config, parse_overrides
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState
from fedmeerkat.federated.server import BaseServer
from fedmeerkat.options import InputError
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
        """The records. A last line cut short by a crash (no newline, not valid JSON) is
        left out (`repair` removes it from the file); a bad line before it is an error."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the half-written last line of an interrupted append
                raise InputError(f"{self.path}: line {i + 1} is not JSON (the file is damaged "
                                 "before its last line)") from None
        return records


CONFIG = "config.toml"
MASK_FILE = "mask.safetensors"
INITIAL_STATE = "initial_state.safetensors"
PARTITION = "partition.json"
LR_SEARCH_FILE = "lr_search.json"
METRICS = "metrics.jsonl"
FINAL_STATE = "final_state.safetensors"
# the trained values of the round with the best validation metric so far (Session._keep_best)
BEST_STATE = "best_state.safetensors"
STATES = {"final": FINAL_STATE, "best": BEST_STATE}  # what `eval` and `export` can read
SUMMARY = "summary.json"
PLOT = "accuracy.png"
SERVER_LOG = "server.log"
SITE_STATE = "site_state"
DP_LEDGER = "dp_ledger.json"  # the steps each client ran under DP (federated/dp.py)
FLARE_JOB = "flare_job"  # the exported FLARE job of `fedmeerkat deploy submit`
TRAJECTORIES = "trajectories"
LOCK = ".lock"


def default_out(cfg: RunConfig) -> Path:
    """The default run folder's name (before `claim_folder` makes it unique)."""
    return Path("runs") / f"{cfg.task}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"


def claim_folder(base: Path) -> Path:
    """Create and return a new folder `base`, or `base-2`, `base-3`, ... if taken: mkdir is
    atomic, so runs started in the same second, in any processes, get different folders."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def save_state(path: Path, theta: torch.Tensor, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"theta": theta.cpu().contiguous()}, str(tmp), metadata=meta)
    _fsync_replace(tmp, path)


def save_trajectories(out: Path, round_idx: int, arrays: dict[str, torch.Tensor]) -> None:
    """One round's trajectories (e.g. GradIP per client and step)."""
    traj = out / TRAJECTORIES
    traj.mkdir(exist_ok=True)
    tmp = traj / f"round_{round_idx:05d}.safetensors.tmp"
    save_file({k: v.cpu().contiguous() for k, v in arrays.items()}, str(tmp))
    _fsync_replace(tmp, traj / f"round_{round_idx:05d}.safetensors")


def drop_trajectories_after(out: Path, round_idx: int) -> None:
    """On resume: trajectories of rounds after the checkpoint are recomputed; remove them so a
    run resumed with fewer rounds leaves none behind."""
    for p in (out / TRAJECTORIES).glob("round_*.safetensors"):
        try:
            if int(p.name[len("round_"):-len(".safetensors")]) > round_idx:
                p.unlink()
        except ValueError:
            continue


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT = "checkpoint.safetensors"
PREVIOUS_CHECKPOINT = "checkpoint.prev.safetensors"  # the one before: used if the last is bad
# 3: a sha256 checksum of tensors and state, and the trainable space's digest, in the metadata.
# Every other version is refused like a damaged file (the previous checkpoint is tried): 2 (no
# checksum; never released) would load unverified, and one flipped bit turns "3" into "2";
# 1 (a copy per client) predates portable z, so its run cannot continue bit-identically.
CHECKPOINT_VERSION = "3"
# Keys a resumed run may change: they do not alter what the finished rounds computed.
# z and every update are bit-identical on any device, so the devices may change too.
# How long a round waits and how many replies it needs decide whether a round is applied, not
# what an applied round computes, so a run stopped for want of replies may resume with others.
# A larger privacy budget (dp_epsilon) changes when the run stops, not what a round computes
# (sigma is fixed in config.toml when the run starts).
RESUMABLE_KEYS = ("rounds", "eval_every", "eval_batch_size", "threads", "device", "server_device",
                  "round_timeout", "min_clients", "round_retries", "dp_epsilon")


class CheckpointError(InputError):
    """A checkpoint file is damaged (truncated, corrupt, checksum mismatch) or unreadable."""


class CheckpointMismatchError(InputError):
    """A sound checkpoint that belongs to another run (another trainable space or model)."""


class CheckpointWriteError(InputError):
    """A checkpoint could not be written (a full disk): the last one is left as it was."""


class RunFolderBusy(InputError):
    """Another writer (a run, a resume, a deployed server) holds the run folder's lock."""


def space_digest(space: SparseMask | DenseSpace) -> str:
    """Identity of a trainable space: tensor names, shapes, indices and the model fingerprint
    the mask was made for. A checkpoint records it; another space's checkpoint is refused."""
    h = hashlib.sha256()
    h.update(json.dumps([list(space.names), [list(s) for s in space.shapes],
                         space.meta.get("fingerprint_structure", ""),
                         space.meta.get("fingerprint_weights", "")]).encode())
    for idx in getattr(space, "indices", []):
        h.update(idx.to(torch.int64).contiguous().numpy().data)
    return h.hexdigest()


def checksum(tensors: dict[str, torch.Tensor], *header: str) -> str:
    """sha256 over the `header` strings and every tensor (name, dtype, shape, bytes, in name
    order): a checkpoint's (version, state, space) or a site snapshot's."""
    h = hashlib.sha256()
    h.update(json.dumps(list(header)).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(out: Path, server: BaseServer, states: list[ClientState],
                    space: str = "", wall_seconds: float | None = None) -> None:
    """Everything needed to continue bit-identically, with its checksum. The new file is
    written beside the old one and fsynced, the old one becomes checkpoint.prev.safetensors,
    and the new one takes its name: at every moment a whole checkpoint is on disk.
    `wall_seconds`: the run's wall time so far over every process that ran it (a resumed run
    goes on counting from it); not part of the model state."""
    tensors, server_meta = server.state_dict()
    for s in states:
        # clients at the same round share one copy (share_copies): stored once per round
        if s.theta is not None and f"clients.theta.round{s.synced}" not in tensors:
            tensors[f"clients.theta.round{s.synced}"] = s.theta.cpu().contiguous()
        for name, t in s.extra.items():  # method state of the client (FedDyn's h_k)
            tensors[f"client.{s.client_id}.extra.{name}"] = t.cpu().contiguous()
    meta: dict[str, Any] = {
        "server": server_meta,
        "clients": [{"pointer": s.pointer.state_dict(), "synced": s.synced} for s in states]}
    if wall_seconds is not None:
        meta["wall_seconds"] = round(wall_seconds, 1)
    state = json.dumps(meta)
    tmp = out / (CHECKPOINT + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={
            "version": CHECKPOINT_VERSION, "state": state, "space": space,
            "sha256": checksum(tensors, CHECKPOINT_VERSION, state, space)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, SafetensorError) as e:  # a full disk: safetensors reports it as its own
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointWriteError(f"{out}: writing {CHECKPOINT} failed ({first}); the last "
                                   "checkpoint is unchanged") from None
    if (out / CHECKPOINT).is_file():
        os.replace(out / CHECKPOINT, out / PREVIOUS_CHECKPOINT)
    os.replace(tmp, out / CHECKPOINT)
    fsync_dir(out)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: Path, space: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a checkpoint file, verified. CheckpointError if it is damaged,
    CheckpointMismatchError if it is sound but made for another trainable space."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError (truncated, corrupt header), OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path.name} is unreadable ({first})") from None
    version = meta_raw.get("version")
    if version != CHECKPOINT_VERSION:  # see CHECKPOINT_VERSION
        raise CheckpointError(f"{path.name} has checkpoint version {version!r}, this "
                              f"fedmeerkat reads version {CHECKPOINT_VERSION} only")
    want = checksum(tensors, version, meta_raw.get("state", ""), meta_raw.get("space", ""))
    if meta_raw.get("sha256") != want:
        raise CheckpointError(f"{path.name} fails its checksum (corrupt)")
    if space and meta_raw.get("space") != space:
        raise CheckpointMismatchError(
            f"{path}: checkpoint was made for another trainable space or model than this "
            "run folder's mask.safetensors; it cannot continue this run")
    try:
        state = json.loads(meta_raw["state"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} has no readable state") from None
    return tensors, state


def load_checkpoint(out: Path, server: BaseServer, states: list[ClientState],
                    space: str = "", log: Callable[[str], None] | None = None) -> float:
    """Restore the last sound checkpoint: checkpoint.safetensors, or, when that is missing,
    truncated or corrupt (one line to `log` says so), checkpoint.prev.safetensors. Returns
    the run's wall seconds up to that checkpoint (0 for a checkpoint that does not say)."""
    candidates = [p for p in (out / CHECKPOINT, out / PREVIOUS_CHECKPOINT) if p.is_file()]
    if not candidates:
        raise FileNotFoundError(f"{out} holds no {CHECKPOINT}: nothing to resume")
    if candidates[0].name != CHECKPOINT and log is not None:
        log(f"warning: {CHECKPOINT} is missing; resuming from {PREVIOUS_CHECKPOINT}")
    problems = []
    for i, path in enumerate(candidates):
        try:
            tensors, meta = read_checkpoint(path, space)
            break
        except CheckpointError as e:
            problems.append(str(e))
            if i + 1 < len(candidates) and log is not None:
                log(f"warning: {e}; resuming from {candidates[i + 1].name} instead")
    else:
        raise CheckpointError(f"{out}: no sound checkpoint to resume from: "
                              + "; ".join(problems))
    _apply_checkpoint(path, tensors, meta, server, states)
    return float(meta.get("wall_seconds", 0.0))  # checksummed: written by save_checkpoint


def _apply_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      server: BaseServer, states: list[ClientState]) -> None:
    if len(meta["clients"]) != len(states):
        raise CheckpointMismatchError(f"{path}: checkpoint has {len(meta['clients'])} clients, "
                                      f"run has {len(states)}")
    theta = tensors.get("server.theta")
    if theta is None or theta.numel() != server.theta.numel():
        raise CheckpointMismatchError(
            f"{path}: checkpoint holds {0 if theta is None else theta.numel()} trainable values, "
            f"this run's space has {server.theta.numel()}; it was made for another model or mask")
    server.load_state_dict(tensors, meta["server"])
    for s, c in zip(states, meta["clients"], strict=True):
        s.pointer = ClientDataPointer.from_state(c["pointer"])
        s.synced = int(c["synced"])
        # shared by the clients of that round (read only: sync_client copies on write)
        s.theta = tensors.get(f"clients.theta.round{s.synced}")
        pre = f"client.{s.client_id}.extra."
        s.extra = {k[len(pre):]: v.clone() for k, v in tensors.items() if k.startswith(pre)}


def open_run_folder(cfg: RunConfig, resume: bool) -> tuple[RunConfig, Path]:
    """The run folder: the existing one (resume), a new unique one (no out=), or out=, which
    must be new or empty. Its config.toml is created exclusively, so two runs given the same
    out= at once cannot both take it."""
    if resume:
        out = Path(cfg.out)
        if not any((out / c).is_file() for c in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
            raise FileNotFoundError(f"{out} holds no {CHECKPOINT}: nothing to resume")
        return cfg, out
    out = Path(cfg.out) if cfg.out else claim_folder(default_out(cfg))
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} exists and is not empty; choose another out= "
                              "or continue it with `fedmeerkat run --resume RUN_DIR`")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(out))
    try:
        with open(out / CONFIG, "x") as f:
            f.write(tomli_w.dumps(cfg.to_dict()))
    except FileExistsError:
        raise FileExistsError(f"run folder {out} was taken by another run just now; choose "
                              "another out=") from None
    return cfg, out


def read_run_config(run_dir: Path) -> dict:
    """A run folder's config.toml as written. A folder from before validation splits existed
    (no val_fraction) trained on the whole pool: it reads as val_fraction = 0, so resuming or
    evaluating it sees the training set it was trained on."""
    raw = tomllib.loads((run_dir / CONFIG).read_text())
    raw.setdefault("val_fraction", 0.0)
    return raw


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """A run folder's resolved config, with `key=value` overrides (eval, export). Its mask= is
    dropped: the folder has its own copy of the mask."""
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG})")
    raw = read_run_config(run_dir)
    raw.pop("mask", None)
    raw.update(parse_overrides(overrides or []))
    return build_config(raw)


def load_space(path: Path) -> SparseMask | DenseSpace:
    try:
        dense = is_dense_file(path)
    except Exception:  # missing or unreadable: SparseMask.load says which, in one line
        dense = False
    return DenseSpace.load(path) if dense else SparseMask.load(path)


def load_run_state(run_dir: Path, which: str = "final") -> tuple[SparseMask | DenseSpace,
                                                                 torch.Tensor]:
    """The run's space and its final vector, or (`which="best"`) the vector of the round with
    the best validation metric (checked against each other, and the best one against the
    round metrics.jsonl picks, so a stale file is refused rather than read)."""
    from safetensors.torch import load_file

    if which not in STATES:
        raise ValueError(f"unknown state {which!r}; choose one of {', '.join(STATES)}")
    state = run_dir / STATES[which]
    if not state.is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no {state.name} "
            + ("(did the run finish?)" if which == "final" else
               "(the run has no validation split, val_fraction=0, ran with keep_best=false, "
               "or predates best states)"))
    mask = load_space(run_dir / MASK_FILE)
    try:
        theta = load_file(str(state))["theta"]
        meta = state_meta(state)
    except Exception as e:  # truncated or corrupt (SafetensorError), no "theta"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{state}: unreadable ({first})") from None
    if theta.numel() != mask.nnz or not math.isfinite(float(theta.sum())):
        raise ValueError(f"{state}: state does not fit the run's mask")
    if which == "best":
        from fedmeerkat.runners.evaluation import best_round

        want = best_round(MetricsLog(run_dir / METRICS).read()).get("best_val_round")
        if str(want) != meta.get("round"):
            raise InputError(f"{state} holds round {meta.get('round')} but metrics.jsonl's "
                             f"best validation round is {want}; resume the run to rewrite it")
    return mask, theta


def state_meta(path: Path) -> dict[str, str]:
    """A state file's metadata (round, ...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class RunFolder:
    """One run's folder: its files' paths, its writes, and the one check of what a resumed
    run may change (`resume_config`). The simulation and the deployed server both use it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = MetricsLog(self.path / METRICS)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        """The path of one of this module's names (CONFIG, MASK_FILE, SUMMARY, ...)."""
        return self.path / name

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> tuple[RunConfig, RunFolder]:
        """A new run's folder, or the one to resume (`open_run_folder`), and cfg with out=."""
        cfg, out = open_run_folder(cfg, resume)
        return cfg, cls(out)

    def check_resume(self, overrides: list[str]) -> dict[str, Any]:
        """The changes `key=value` a resumed run may make (RESUMABLE_KEYS; rounds only with a
        constant lr_schedule); ConfigError names the first that it may not."""
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"{self.path} is not a run folder (no {CONFIG})")
        changes = parse_overrides(overrides)
        bad = sorted(set(changes) - set(RESUMABLE_KEYS))
        if bad:
            raise ConfigError(f"{bad[0]}: cannot change on --resume (only "
                              f"{', '.join(RESUMABLE_KEYS)})")
        if ("rounds" in changes
                and read_run_config(self.path).get("lr_schedule", "constant") != "constant"):
            raise ConfigError("rounds: cannot change on --resume with a decaying lr_schedule")
        return changes

    def resume_config(self, overrides: list[str] | None = None) -> RunConfig:
        """The config to continue this run with: its own, with the allowed `overrides`, out=
        this folder (wherever it was moved) and its own mask (mask= dropped)."""
        changes = self.check_resume(list(overrides or []))
        raw = read_run_config(self.path)
        raw.pop("mask", None)
        raw.update(changes)
        raw["out"] = str(self.path)
        return build_config(raw)

    def has_checkpoint(self) -> bool:
        return any((self.path / c).is_file() for c in (CHECKPOINT, PREVIOUS_CHECKPOINT))

    def holds_config_only(self) -> bool:
        """Nothing ran yet (a run that failed on its input): the folder can go."""
        return [p.name for p in self.path.iterdir()] == [CONFIG]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock for the block: a second writer, in another process or this
        one (flock holds per open file description), gets RunFolderBusy instead of writing
        checkpoints and metrics.jsonl interleaved with the first. The OS drops the lock when
        its holder exits, however it ends, so a crashed run leaves none behind."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise RunFolderBusy(f"run folder {self.path} is in use by another writer"
                                    + (f" (process {pid})" if pid else "")
                                    + "; wait for it to end or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # ---- writing ---------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        """Replace config.toml (lr=auto writes its pick, so a resumed run never searches)."""
        tmp = self.path / (CONFIG + ".tmp")
        tmp.write_text(tomli_w.dumps(cfg.to_dict()))
        _fsync_replace(tmp, self.path / CONFIG)

    def write_json(self, name: str, data: Any) -> None:
        write_json_atomic(self.path / name, data)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def save_checkpoint(self, server: BaseServer, states: list[ClientState],
                        space: str = "", wall_seconds: float | None = None) -> None:
        save_checkpoint(self.path, server, states, space, wall_seconds)

    def load_checkpoint(self, server: BaseServer, states: list[ClientState],
                        space: str = "", log: Callable[[str], None] | None = None) -> float:
        return load_checkpoint(self.path, server, states, space, log=log)

    def save_trajectories(self, round_idx: int, arrays: dict[str, torch.Tensor]) -> None:
        save_trajectories(self.path, round_idx, arrays)

    def drop_trajectories_after(self, round_idx: int) -> None:
        drop_trajectories_after(self.path, round_idx)

    def save_final_state(self, theta: torch.Tensor, meta: dict[str, str]) -> None:
        save_state(self.path / FINAL_STATE, theta, meta)

    def save_best_state(self, theta: torch.Tensor, meta: dict[str, str]) -> None:
        save_state(self.path / BEST_STATE, theta, meta)

    def best_state_round(self) -> str | None:
        """The round best_state.safetensors holds (None without one, or unreadable)."""
        try:
            return state_meta(self.path / BEST_STATE).get("round")
        except Exception:
            return None
