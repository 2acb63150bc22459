"""A site's persisted client state: one snapshot per round it served, so a restarted site (or a
site whose server restarted from an earlier checkpoint) continues bit-identically.

    STATE_DIR/round_RRRRRR.safetensors   the hosted clients' state after round R:
        tensors  theta.round{S}              a client's copy of the global vector of round S
                                             (scalar downlink; shared by clients synced to S)
                 client.{k}.extra.{name}     method state (FedDyn's h_k)
        metadata {"format": "1", "round": R, "previous": the round of the snapshot before
                  (0: none, the clients' initial state), "clients": {k: {"pointer": {...},
                  "synced": S}}}

Written to a temp file, fsynced and renamed (a crash leaves the previous snapshot whole);
safetensors and JSON only, no pickle. The last KEEP snapshots are kept: the server checkpoints
after every round, so it is at most one round behind what a site served.
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

FORMAT = "1"
KEEP = 3
_NAME = re.compile(r"^round_(\d{6})\.safetensors$")


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
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(round_idx))
        for r in self.rounds()[:-self.keep]:
            self.path(r).unlink()

    def meta(self, round_idx: int) -> dict:
        with safe_open(str(self.path(round_idx)), framework="pt") as f:
            return json.loads((f.metadata() or {})["state"])

    def load(self, round_idx: int, states: dict[int, ClientState]) -> None:
        """Set `states` (in place: a ClientHost holds them) to their state after round_idx."""
        with safe_open(str(self.path(round_idx)), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT or int(meta["round"]) != round_idx:
            raise ValueError(f"{self.path(round_idx)}: not a format-{FORMAT} snapshot of "
                             f"round {round_idx}")
        if sorted(meta["clients"]) != sorted(str(k) for k in states):
            raise ValueError(f"{self.path(round_idx)} holds clients {sorted(meta['clients'])}, "
                             f"this site hosts {sorted(states)}")
        for k, s in states.items():
            c = meta["clients"][str(k)]
            s.pointer = ClientDataPointer.from_state(c["pointer"])
            s.synced = int(c["synced"])
            if s.theta is not None:
                s.theta = tensors[f"theta.round{s.synced}"]
            pre = f"client.{k}.extra."
            s.extra = {n[len(pre):]: t.clone() for n, t in tensors.items() if n.startswith(pre)}

    def restore_before(self, round_idx: int, states: dict[int, ClientState],
                       reset: Callable[[], None]) -> int:
        """Set `states` to their state at the start of round_idx: the latest snapshot of an
        earlier round, or `reset()` (the initial state) when there is none. Returns its round."""
        earlier = [r for r in self.rounds() if r < round_idx]
        if earlier:
            self.load(earlier[-1], states)
            return earlier[-1]
        kept = self.rounds()
        if kept and self.meta(kept[0])["previous"] != 0:  # the one it needs was pruned
            raise RuntimeError(f"{self.folder}: no snapshot before round {round_idx} "
                               f"(kept: {kept})")
        reset()
        return 0
