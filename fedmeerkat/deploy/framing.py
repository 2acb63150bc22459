"""The bytes Meerkat's server and sites exchange over FLARE: one message per site per round.

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
round's exchange wall time on the server). The framing adds 7 bytes per site and 8 per client
to a plan, 27 per site and 8 per client to a reply; metrics.jsonl counts the plans and replies
alone, as in a local run.
"""

from __future__ import annotations

import struct

# the head of a site's "T" reply: the trainer's PID, seconds in the handler (the clients'
# compute) and, of those, seconds in forward passes
REPLY_HEAD = struct.Struct("<Idd")


def pack(tag: bytes, items: dict[int, bytes], head: bytes = b"") -> bytes:
    parts = [tag, head, struct.pack("<H", len(items))]
    for k, blob in items.items():
        parts += [struct.pack("<II", k, len(blob)), blob]
    return b"".join(parts)


def unpack(blob: bytes, head: int = 0) -> dict[int, bytes]:
    """client -> message of a payload; ValueError (one line) unless it is exactly that."""
    try:
        (n,) = struct.unpack_from("<H", blob, 1 + head)
        at, out = 3 + head, {}
        for _ in range(n):
            k, m = struct.unpack_from("<II", blob, at)
            if k in out:  # which of the two is meant cannot be told
                raise ValueError(f"client {k} appears twice")
            out[k] = blob[at + 8:at + 8 + m]
            if len(out[k]) != m:
                raise ValueError(f"payload truncated in client {k}'s message")
            at += 8 + m
    except struct.error:
        raise ValueError(f"payload truncated ({len(blob)} bytes)") from None
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} trailing bytes after {n} messages")
    return out


def pack_reply(pid: int, compute_s: float, forward_s: float, items: dict[int, bytes]) -> bytes:
    return pack(b"T", items, REPLY_HEAD.pack(pid, compute_s, forward_s))


def unpack_reply(blob: bytes) -> tuple[int, float, float, dict[int, bytes]]:
    """A site's "T" reply; ValueError (one line) for anything else a site may send."""
    if not isinstance(blob, bytes):
        raise ValueError(f"reply is not bytes ({type(blob).__name__})")
    if blob[:1] != b"T":
        raise ValueError(f"not a train reply (tag {blob[:1]!r})")
    if len(blob) < 1 + REPLY_HEAD.size:
        raise ValueError(f"payload truncated ({len(blob)} bytes)")
    pid, compute_s, forward_s = REPLY_HEAD.unpack_from(blob, 1)
    return pid, compute_s, forward_s, unpack(blob, REPLY_HEAD.size)
