"""Screening of client replies: one place decides which replies a round may use.

The server's `screen` runs `screen_replies` on a round's replies and changes nothing; the round
driver (runners/driver.py) counts the usable replies in that verdict and, if there are enough,
passes it to the server's `apply`, so every transport (in process, NVIDIA FLARE) gets the same
checks and the round uses exactly the replies the verdict accepted. A reply
that fails one is left out of the round with a one-line reason (`rejected` in metrics.jsonl);
nothing a client sends makes the server raise, and the round then computes exactly what it
would have computed had that client not replied at all (tests/test_validation.py).

Checks, in this order (the first that fails is the reason):
  1. type: the message the method expects (ClientReply for the ZO methods, VectorReply for
     fedavg-backprop); a client id that is not an int is "unidentified" (key -1).
  2. sender: a client planned this round. Several replies naming one client: bit-identical
     copies (a retransmission) count once; different ones are all rejected ("conflicting
     replies"): there is no way to tell which is genuine, and keeping the first would make the
     result depend on arrival order.
  3. round: the round being applied.
  4. length: as many scalars as the plan's steps for that client (vector replies: its step
     count and one value per trainable coordinate).
  5. finiteness of every scalar (vector value) and of the reported loss (a diverged client
     would poison the average; its loss would poison the round's mean loss).
  6. magnitude bound, on m_k = max_t |g_k^t| (vector replies: max |v_k - theta|, the size of
     the client's update):
       - relative (`reply_bound`, default 100): m_k > reply_bound x the round's median of m
         over the replies that passed 1-5, taken over their sources: each source's median,
         then the median of those. A source is who sends a client's reply (`sources`: client
         -> source; deployed, its site; None: every client its own, as in process), so one
         party hosting many clients casts one vote and cannot set the median by itself.
         Robust to any minority of outlying sources, but with fewer than
         RELATIVE_MIN_REPLIES (3) sources a median cannot tell the outlier from the honest
         one (of two, the median is their mean): with exactly two sources each is judged
         against reply_bound x the OTHER source's median instead (one of two sites cannot
         poison a round), and with one the rule is skipped; so it is when the median is 0
         (nothing to compare to). Off with reply_bound = 0.
       - absolute (`reply_bound_abs`, default 0 = off): m_k > reply_bound_abs.
     The limit is the smaller of the active ones. `reply_bound_action = "reject"` (default)
     leaves the client out; "clip" keeps it with every scalar clipped to +-limit (rounded to
     float32; vector replies: theta + the update clipped per coordinate). Clipping is
     deterministic, so every party that applies the round agrees; the client's own local path
     then differs from the one the server averages, which costs nothing when the client next
     gets the server's vector or aggregate. Methods whose client state must equal the server's
     mirror (meerkat-feddyn) set `clip_ok = False`: for them "clip" rejects instead.
Why 100x the median by default: honest clients of one round share the model and the seeds, so
their projected gradients differ by data heterogeneity (a few x, rarely tens); the failures
the bound exists for (a 1e30, a broken client, a hostile one) are many orders of magnitude
off. With T=1, |g| of an honest client is roughly |N(0, s^2)|, and a false rejection needs the
round's median to fall below 1% of s, for 3 clients about 3 x 0.008^2 = 2e-4 per round, and a
rejected honest reply only leaves the client out of one round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmeerkat.federated.messages import ClientReply, VectorReply

REPLY_ACTIONS = ("reject", "clip")
RELATIVE_MIN_REPLIES = 3  # the relative bound needs a median of at least this many sources


@dataclass(frozen=True)
class ReplyBound:
    relative: float = 100.0  # x the round's median of max |g|; 0 = off
    absolute: float = 0.0  # fixed cap on max |g|; 0 = off
    action: str = "reject"  # or "clip"

    def __post_init__(self) -> None:
        if self.action not in REPLY_ACTIONS:
            raise ValueError(f"reply bound action must be one of {REPLY_ACTIONS}, "
                             f"got {self.action!r}")
        if not (self.relative == 0 or self.relative >= 1) or not self.absolute >= 0:
            raise ValueError("reply bounds: relative must be 0 (off) or >= 1, absolute >= 0")


@dataclass
class Screened:
    """The screen's verdict: usable replies in client order (clipped ones replaced by their
    clipped copy), and client -> reason for the rest and for the clipped ones."""

    accepted: list[Any] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, str] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _finite(reply: Any) -> bool:
    if isinstance(reply, VectorReply):
        ok = bool(torch.isfinite(reply.vector).all())
    else:
        ok = all(math.isfinite(g) for g in reply.scalars)
    return ok and math.isfinite(reply.train_loss)


def _wire(reply: Any) -> bytes:
    try:
        return reply.to_bytes()
    except Exception:  # an object that cannot even serialize: unequal to anything
        return repr(id(reply)).encode()


def screen_replies(
    round_idx: int,
    replies: Sequence[Any],
    *,
    expected_steps: dict[int, int],
    reply_type: type,
    bound: ReplyBound,
    magnitude: Callable[[Any], float],
    clip: Callable[[Any, float], Any] | None,
    vector_size: int | None = None,
    sources: Mapping[int, Hashable] | None = None,
) -> Screened:
    """Which of `replies` round `round_idx` may use (see the module docstring).

    `expected_steps`: planned client -> its step count this round. `magnitude(reply)` is m_k,
    `clip(reply, limit)` a clipped copy (None: this method cannot clip, so it rejects).
    `vector_size`: the trainable vector's length, for vector replies. `sources`: planned
    client -> who sends its replies (None: every client its own). Pure: never raises on a
    reply's content and changes nothing."""
    out = Screened()
    by_client: dict[int, list[Any]] = {}
    for r in replies:
        k = getattr(r, "client_id", None)
        if not isinstance(k, int) or isinstance(k, bool):
            out.rejected[-1] = "unidentified reply (no client id)"
            continue
        if not isinstance(r, reply_type):
            out.rejected[k] = f"expected a {reply_type.__name__}, got {type(r).__name__}"
            continue
        by_client.setdefault(k, []).append(r)
    candidates: list[Any] = []
    for k in sorted(by_client):
        if k in out.rejected:  # also sent a reply of the wrong type
            out.rejected[k] += f"; and {len(by_client[k])} other reply(ies)"
            continue
        mine = by_client[k]
        if k not in expected_steps:
            out.rejected[k] = "not planned this round"
            continue
        if len(mine) > 1 and len({_wire(r) for r in mine}) > 1:
            out.rejected[k] = f"{len(mine)} conflicting replies"
            continue
        r = mine[0]
        reason = _shape_problem(round_idx, r, expected_steps[k], vector_size)
        if reason:
            out.rejected[k] = reason
        elif not _finite(r):
            out.rejected[k] = "non-finite " + ("value" if isinstance(r, VectorReply)
                                               else "scalar") + " or loss"
        else:
            candidates.append(r)
    if not candidates:
        return out
    mags = [float(magnitude(r)) for r in candidates]
    by_source: dict[Hashable, list[float]] = {}
    for r, m in zip(candidates, mags, strict=True):
        by_source.setdefault(r.client_id if sources is None else sources[r.client_id],
                             []).append(m)
    limits: list[tuple[float, str]] = []
    if bound.relative and len(by_source) >= RELATIVE_MIN_REPLIES:
        # one source, one vote; a single reply's median is that reply's m, so with every
        # client its own source this is the median over clients, to the bit
        med = float(np.median([float(np.median(ms)) for ms in by_source.values()]))
        if med > 0:
            limits.append((bound.relative * med,
                           f"{_fmt(bound.relative)} x the round's median {_fmt(med)}"))
    if bound.absolute:
        limits.append((bound.absolute, "reply_bound_abs"))
    limit, why = min(limits) if limits else (math.inf, "")
    # two sources: their median is their mean, which an outlier drags along; each is judged
    # against the other's median instead, so one of two sites cannot poison the round
    pair: dict[Hashable, tuple[float, str]] = {}
    if bound.relative and len(by_source) == 2:
        (a, ma), (b, mb) = ((s, float(np.median(ms))) for s, ms in by_source.items())
        for src, other in ((a, mb), (b, ma)):
            if other > 0 and bound.relative * other < limit:
                pair[src] = (bound.relative * other, f"{_fmt(bound.relative)} x the other "
                                                     f"source's median {_fmt(other)}")
    for r, m in zip(candidates, mags, strict=True):
        k = r.client_id
        lim, why_k = pair.get(k if sources is None else sources[k], (limit, why))
        if not m > lim:
            out.accepted.append(r)
            continue
        note = f"max |{'v - theta' if isinstance(r, VectorReply) else 'g'}| {_fmt(m)} " \
               f"exceeds {_fmt(lim)} ({why_k})"
        if bound.action == "clip" and clip is not None:
            out.accepted.append(clip(r, lim))
            out.clipped[k] = note + "; clipped"
        else:
            out.rejected[k] = note
    return out


def _shape_problem(round_idx: int, r: Any, steps: int, vector_size: int | None) -> str:
    if r.round != round_idx:
        return f"reply is for round {r.round}, not {round_idx}"
    if isinstance(r, VectorReply):
        if r.num_steps != steps:
            return f"reply reports {r.num_steps} steps, the plan asked for {steps}"
        if vector_size is not None and r.vector.numel() != vector_size:
            return f"sent {r.vector.numel()} values, expected {vector_size}"
        return ""
    if len(r.scalars) != steps:
        return f"sent {len(r.scalars)} scalars, expected {steps}"
    return ""


def max_abs_scalar(reply: ClientReply) -> float:
    return max((abs(g) for g in reply.scalars), default=0.0)


def clip_scalars(reply: ClientReply, limit: float) -> ClientReply:
    """A copy with every scalar clipped to +-limit (limit rounded down to a float32, so the
    clipped scalars are what the wire would carry)."""
    lim = float(np.nextafter(np.float32(limit), np.float32(0)) if float(np.float32(limit)) > limit
                else np.float32(limit))
    return dataclasses.replace(reply, scalars=[min(max(g, -lim), lim) for g in reply.scalars])
