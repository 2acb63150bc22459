"""A site's persisted client state: one snapshot per round it served, so a restarted site (or a
site whose server restarted from an earlier checkpoint) continues bit-identically.

    STATE_DIR/round_RRRRRR.safetensors   the hosted clients' state after round R:
        tensors  theta.round{S}              a client's copy of the global vector of round S
                                             (scalar downlink; shared by clients synced to S)
                 client.{k}.extra.{name}     method state (FedDyn's h_k)
        metadata "state": {"format": "2", "round": R, "previous": the round of the snapshot
                  before (0: none, the clients' initial state), "clients": {k: {"pointer":
                  {...}, "synced": S}}}; "sha256": checksum of the tensors and "state"

Written to a temp file, fsynced and renamed, and the folder fsynced (a crash leaves the
previous snapshot whole); safetensors and JSON only, no pickle. The last KEEP snapshots are
kept: the server checkpoints after every round, so it is at most one round behind what a site
served. A damaged snapshot (unreadable, truncated, checksum mismatch) is passed over for the
one before (`load_latest`); whether that older state may continue the run is the server's
call (deploy.serve.check_sites_resumed). Format 1 (no checksum) is refused like a damaged one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState
from fedmeerkat.options import InputError
from fedmeerkat.runners.run_folder import checksum, fsync_dir

FORMAT = "2"
KEEP = 3
_NAME = re.compile(r"^round_(\d{6})\.safetensors$")


class SnapshotError(InputError):
    """A snapshot file that is damaged: unreadable, truncated or failing its checksum."""


class SiteStateStore:
    def __init__(self, folder: Path, keep: int = KEEP):
        self.folder, self.keep = Path(folder), keep

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))

    def path(self, round_idx: int) -> Path:
        return self.folder / f"round_{round_idx:06d}.safetensors"

    def clear(self) -> None:
        for r in self.rounds():
            self.path(r).unlink()

    def save(self, round_idx: int, states: dict[int, ClientState]) -> None:
        """The state of `states` after round `round_idx`; prunes all but the last `keep`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for s in states.values():
            if s.theta is not None and f"theta.round{s.synced}" not in tensors:
                tensors[f"theta.round{s.synced}"] = s.theta.cpu().contiguous()
            for name, t in s.extra.items():
                tensors[f"client.{s.client_id}.extra.{name}"] = t.cpu().contiguous()
        before = [r for r in self.rounds() if r < round_idx]
        meta = {"format": FORMAT, "round": round_idx, "previous": before[-1] if before else 0,
                "clients": {str(k): {"pointer": s.pointer.state_dict(), "synced": s.synced}
                            for k, s in states.items()}}
        tmp = self.path(round_idx).with_name(self.path(round_idx).name + ".tmp")
        state = json.dumps(meta)
        save_file(tensors, str(tmp), metadata={"state": state,
                                               "sha256": checksum(tensors, FORMAT, state)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(round_idx))
        fsync_dir(self.folder)
        for r in self.rounds()[:-self.keep]:
            self.path(r).unlink()

    def meta(self, round_idx: int) -> dict:
        """The snapshot's metadata; SnapshotError (one line) if the file is unreadable."""
        path = self.path(round_idx)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
        except Exception as e:  # as in load(): truncated, corrupt header, no state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SnapshotError(f"{path} is unreadable ({first})") from None
        if not isinstance(meta, dict):
            raise SnapshotError(f"{path}: not a format-{FORMAT} snapshot of round {round_idx}")
        return meta

    def load(self, round_idx: int, states: dict[int, ClientState]) -> None:
        """Set `states` (in place: a ClientHost holds them) to their state after round_idx;
        SnapshotError if the file is damaged (nothing is changed then)."""
        path = self.path(round_idx)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            state = raw["state"]
            meta = json.loads(state)
        except Exception as e:  # SafetensorError (truncated, corrupt header), OSError, no state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SnapshotError(f"{path} is unreadable ({first})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT \
                or meta.get("round") != round_idx:
            raise SnapshotError(f"{path}: not a format-{FORMAT} snapshot of round {round_idx}")
        if raw.get("sha256") != checksum(tensors, FORMAT, state):
            raise SnapshotError(f"{path} fails its checksum (corrupt)")
        if sorted(meta["clients"]) != sorted(str(k) for k in states):
            raise InputError(f"{path} holds clients {sorted(meta['clients'])}, this site "
                             f"hosts {sorted(states)}")
        for k, s in states.items():
            c = meta["clients"][str(k)]
            s.pointer = ClientDataPointer.from_state(c["pointer"])
            s.synced = int(c["synced"])
            if s.theta is not None:
                s.theta = tensors[f"theta.round{s.synced}"]
            pre = f"client.{k}.extra."
            s.extra = {n[len(pre):]: t.clone() for n, t in tensors.items() if n.startswith(pre)}

    def load_latest(self, states: dict[int, ClientState], warn: Callable[[str], None]) -> int:
        """Load the newest sound snapshot (a damaged one is passed over, with a warning) and
        return its round; 0 when there is none. SnapshotError when none is sound."""
        kept = self.rounds()
        problems = []
        for r in reversed(kept):
            try:
                self.load(r, states)
                return r
            except SnapshotError as e:
                problems.append(str(e))
                if r != kept[0]:
                    warn(f"warning: {e}; falling back to the snapshot of round "
                         f"{max(x for x in kept if x < r)}")
        if problems:
            raise SnapshotError(f"{self.folder}: no sound snapshot to resume from: "
                                + "; ".join(problems))
        return 0

    def restore_before(self, round_idx: int, states: dict[int, ClientState],
                       reset: Callable[[], None]) -> int:
        """Set `states` to their state at the start of round_idx: the latest snapshot of an
        earlier round, or `reset()` (the initial state) when there is none. Returns its round."""
        earlier = [r for r in self.rounds() if r < round_idx]
        if earlier:
            self.load(earlier[-1], states)
            return earlier[-1]
        kept = self.rounds()
        if kept and self.meta(kept[0]).get("previous") != 0:  # the one it needs was pruned
            raise RuntimeError(f"{self.folder}: no snapshot before round {round_idx} "
                               f"(kept: {kept})")
        reset()
        return 0
