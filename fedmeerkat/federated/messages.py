"""What crosses the wire, with an explicit, versioned, compact binary serialization.

All integers and floats are little-endian; seeds are uint64, scalars and vectors float32. No
pickle, no JSON: a T=1 reply is 30 bytes, so per-round byte counts measure the protocol, not a
container's header. Byte counts in the metrics are `len(msg.to_bytes())` of exactly this.
The sparse vector's indices never travel: the mask is fixed and both sides hold it.

    header : b"FMK" | version u8 | kind u8 ("P" plan, "R" reply)
    plan   : round u32 | client u32 | num_steps u16 | n_seeds u16 | seeds u64[n]
             | has_theta u8 [| n u32 | theta f32[n]]
             | n_catchup u16 | per aggregate: round u32 | decay f32 | n u16 | seeds u64[n]
                                              | coefs f32[n]
             [| applied u32]                   (version 2 plans only, see below)
    reply  : round u32 | client u32 | num_samples u64 | train_loss f32 | n u16 | scalars f32[n]
    vreply : round u32 | client u32 | num_samples u64 | train_loss f32 | num_steps u16
             | n u32 | vector f32[n]                      (kind "V": first-order baselines,
             the client's final trainable vector, e.g. fedavg-backprop; VectorReply)

Versions. Every message is version 1 except a plan that carries an acknowledgement: version 2
adds `applied`, the last round in which the server applied this client's reply (0 = none
yet). Only methods whose client keeps state that must follow the server's decision (FedDyn's
h_k: the client commits its update only once the server says its reply was applied) send it,
so every other method's messages and byte counts are those of version 1. A reader takes both
versions of a plan and only version 1 of a reply.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmeerkat.federated.aggregate import Aggregate

MAGIC = b"FMK"
WIRE_VERSION = 1
ACK_VERSION = 2  # a plan with the `applied` acknowledgement


def _max(fmt: str) -> int:
    return 2 ** (8 * struct.calcsize("<" + fmt)) - 1


# What the fields above can encode; the config refuses values beyond them before a run starts.
MAX_STEPS = _max("H")  # num_steps and n_seeds (the seeds of one round, one per local step)
MAX_ROUND = _max("I")  # round
MAX_CLIENT_ID = _max("I")  # client (ids 0..K-1, so K <= MAX_CLIENT_ID + 1)
MAX_CATCHUP = _max("H")  # aggregates in one plan's catch-up
MAX_VECTOR = _max("I")  # values in theta / a VectorReply vector


class _Reader:
    def __init__(self, blob: bytes, kind: bytes, versions: tuple[int, ...] = (WIRE_VERSION,)):
        if (blob[:3] != MAGIC or blob[3:4] not in [bytes([v]) for v in versions]
                or blob[4:5] != kind):
            want = "/".join(f"v{v}" for v in versions)
            raise ValueError(f"expected a {want} {kind.decode()!r} message, got header "
                             f"{blob[:5]!r}")
        self.blob, self.pos, self.version = blob, 5, blob[3]

    def take(self, fmt: str) -> tuple:
        try:
            vals = struct.unpack_from("<" + fmt, self.blob, self.pos)
        except struct.error:
            raise ValueError(f"message truncated at byte {self.pos} of {len(self.blob)}") from None
        self.pos += struct.calcsize("<" + fmt)
        return vals

    def array(self, dtype: str, n: int) -> np.ndarray:
        if self.pos + n * np.dtype(dtype).itemsize > len(self.blob):
            raise ValueError(f"message truncated: {n} x {dtype} at byte {self.pos} of "
                             f"{len(self.blob)}")
        arr = np.frombuffer(self.blob, dtype=np.dtype(dtype).newbyteorder("<"), count=n,
                            offset=self.pos)
        self.pos += arr.nbytes
        return arr

    def done(self) -> None:
        if self.pos != len(self.blob):
            raise ValueError(f"{len(self.blob) - self.pos} trailing bytes in message")


def _u64(xs: list[int]) -> bytes:
    return np.asarray(xs, dtype="<u8").tobytes()


def _f32(xs) -> bytes:
    """Little-endian float32 bytes. A tensor (any device) is not copied here beyond the move to
    the CPU: the one copy is the caller's `b"".join`, so a model-size vector costs one copy."""
    if isinstance(xs, torch.Tensor):
        arr = xs.detach().to("cpu", torch.float32).contiguous().numpy()
        view: Any = arr.astype("<f4", copy=False).data.cast("B")  # joins like bytes
        return view
    return np.asarray(xs, dtype="<f4").tobytes()


@dataclass
class RoundPlan:
    """Server -> client at the start of a round.

    The client gets the global model of round-1 in one of two forms: `theta`, the sparse vector
    itself, or `catchup`, the scalar aggregates of the rounds it has not applied yet (for a
    client that took part last round, just the previous round's T+1 floats and T seeds).
    """

    round: int
    client_id: int
    seeds: list[int]  # one per local step; clients may be told to run fewer (num_steps)
    num_steps: int
    theta: torch.Tensor | None = None
    catchup: list[Aggregate] = field(default_factory=list)
    # the last round in which the server applied this client's reply (0 = none), for methods
    # with client state that must follow the server's decision (meerkat-feddyn); None = not
    # sent (a version 1 plan)
    applied: int | None = None

    def to_bytes(self) -> bytes:
        version = WIRE_VERSION if self.applied is None else ACK_VERSION
        parts = [MAGIC, bytes([version]), b"P",
                 struct.pack("<IIHH", self.round, self.client_id, self.num_steps, len(self.seeds)),
                 _u64(self.seeds), struct.pack("<B", self.theta is not None)]
        if self.theta is not None:
            parts += [struct.pack("<I", self.theta.numel()), _f32(self.theta)]
        parts.append(struct.pack("<H", len(self.catchup)))
        for a in self.catchup:
            parts += [struct.pack("<IfH", a.round, a.decay, len(a.seeds)), _u64(a.seeds),
                      _f32(a.coefs)]
        if self.applied is not None:
            parts.append(struct.pack("<I", self.applied))
        return b"".join(parts)

    def nbytes(self) -> int:
        """len(self.to_bytes()) without serializing (the server compares sync options)."""
        n = 5 + 12 + 8 * len(self.seeds) + 1 + 2
        if self.theta is not None:
            n += 4 + 4 * self.theta.numel()
        if self.applied is not None:
            n += 4
        return n + sum(10 + 12 * len(a.seeds) for a in self.catchup)

    @classmethod
    def from_bytes(cls, blob: bytes) -> RoundPlan:
        r = _Reader(blob, b"P", (WIRE_VERSION, ACK_VERSION))
        round_idx, client, steps, n = r.take("IIHH")
        seeds = [int(s) for s in r.array("u8", n)]
        theta = None
        if r.take("B")[0]:
            (m,) = r.take("I")
            theta = torch.from_numpy(r.array("f4", m).astype(np.float32))
        catchup = []
        for _ in range(r.take("H")[0]):
            ar, decay, k = r.take("IfH")
            a_seeds = [int(s) for s in r.array("u8", k)]
            coefs = [float(c) for c in r.array("f4", k)]
            catchup.append(Aggregate(ar, a_seeds, coefs, float(decay)))
        applied = int(r.take("I")[0]) if r.version == ACK_VERSION else None
        r.done()
        return cls(round_idx, client, seeds, steps, theta, catchup, applied)


@dataclass
class ClientReply:
    """Client -> server at the end of a round: one float32 scalar per local step."""

    round: int
    client_id: int
    scalars: list[float]
    num_samples: int  # the client's dataset size, for sample-weighted FedAvg
    train_loss: float = float("nan")  # mean of (f+ + f-)/2 over the round, for monitoring
    losses: list[float] = field(default_factory=list, repr=False)  # per step, stays local

    def to_bytes(self) -> bytes:
        return b"".join([
            MAGIC, bytes([WIRE_VERSION]), b"R",
            struct.pack("<IIQfH", self.round, self.client_id, self.num_samples,
                        self.train_loss, len(self.scalars)),
            _f32(self.scalars),
        ])

    @classmethod
    def from_bytes(cls, blob: bytes) -> ClientReply:
        r = _Reader(blob, b"R")
        round_idx, client, n_samples, loss, n = r.take("IIQfH")
        scalars = [float(g) for g in r.array("f4", n)]
        r.done()
        return cls(round_idx, client, scalars, n_samples, float(loss))


def reply_from_bytes(blob: bytes) -> ClientReply | VectorReply:
    """A client's reply of either kind (the kind byte says which); ValueError if malformed."""
    if len(blob) < len(MAGIC) + 2:
        raise ValueError(f"reply of {len(blob)} bytes is too short")
    kind = blob[len(MAGIC) + 1:len(MAGIC) + 2]
    if kind == b"V":
        return VectorReply.from_bytes(blob)
    return ClientReply.from_bytes(blob)


@dataclass
class VectorReply:
    """Client -> server for methods whose update is not a function of seeds and scalars
    (fedavg-backprop): the client's final trainable vector, float32, in the space's order."""

    round: int
    client_id: int
    vector: torch.Tensor
    num_samples: int
    num_steps: int
    train_loss: float = float("nan")

    def to_bytes(self) -> bytes:
        return b"".join([
            MAGIC, bytes([WIRE_VERSION]), b"V",
            struct.pack("<IIQfHI", self.round, self.client_id, self.num_samples,
                        self.train_loss, self.num_steps, self.vector.numel()),
            _f32(self.vector),
        ])

    @classmethod
    def from_bytes(cls, blob: bytes) -> VectorReply:
        r = _Reader(blob, b"V")
        round_idx, client, n_samples, loss, steps, n = r.take("IIQfHI")
        vector = torch.from_numpy(r.array("f4", n).astype(np.float32))
        r.done()
        return cls(round_idx, client, vector, n_samples, steps, float(loss))
