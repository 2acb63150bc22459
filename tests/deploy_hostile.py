"""Hostile sites for the real FLARE runs of test_deploy_faults.py: the job's site handler
("deploy_hostile:hostile_site", allowed by FEDMEERKAT_DEPLOY_ALLOW) is the real one, except that

  - HOSTILE (site-2) corrupts its train replies in the rounds of CORRUPT (one hostile kind a
    round);
  - MAJORITY (site-1: the majority of the clients, and the one site that evaluates) corrupts
    its train replies in the rounds of MAJORITY_CORRUPT and its evaluation replies in the
    evaluations of EVAL_CORRUPT (every kind of test_deploy_faults.EVAL_FAULTS but "lost");
  - in a run folder named BAD_HELLO_RUN, HOSTILE's hello claims a client of the other site
    instead (the job must stop before round 1).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

from fedmeerkat.deploy.framing import pack_reply, unpack, unpack_reply
from fedmeerkat.deploy.site import site
from fedmeerkat.federated import ClientReply, RoundPlan

HOSTILE = "site-2"  # hosts client 2
MAJORITY = "site-1"  # hosts clients 0 and 1 (selftest.MEERKAT_SITES) and evaluates
BAD_HELLO_RUN = "bad_hello"


def _scalars(value: float, clients: tuple[int, ...] | None = None, every: bool = False):
    """The site's payload with the first (every: each) scalar of `clients` (None: all of its
    clients) set to `value`."""
    def edit(reply: bytes) -> bytes:
        pid, compute_s, forward_s, items = unpack_reply(reply)
        for k, blob in items.items():
            if clients is None or k in clients:
                r = ClientReply.from_bytes(blob)
                scalars = [value] * len(r.scalars) if every else [value, *r.scalars[1:]]
                items[k] = ClientReply(r.round, k, scalars, r.num_samples,
                                       r.train_loss).to_bytes()
        return pack_reply(pid, compute_s, forward_s, items)
    return edit


def _spoofed(reply: bytes) -> bytes:
    """Its client's reply, claiming to be client 0's (a client of the other site)."""
    pid, compute_s, forward_s, items = unpack_reply(reply)
    for k, blob in items.items():
        r = ClientReply.from_bytes(blob)
        items[k] = ClientReply(r.round, 0, r.scalars, r.num_samples, r.train_loss).to_bytes()
    return pack_reply(pid, compute_s, forward_s, items)


def _inside(fault: str):
    """HOSTILE's payload with its client's reply replaced by test_validation's `fault`."""
    from tests.test_validation import _corrupt

    def edit(reply: bytes) -> bytes:
        pid, compute_s, forward_s, items = unpack_reply(reply)
        for k in list(items):
            _corrupt(fault, items[k], items, k, 8)
        return pack_reply(pid, compute_s, forward_s, items)

    return edit


# round -> (what HOSTILE sends instead of its reply, the reason metrics.jsonl gives): three
# payloads FLARE delivers that are no site reply at all, then every hostile reply kind of the
# in-process suite inside a well-formed payload
CORRUPT = {
    1: (_scalars(math.nan), "non-finite scalar or loss"),
    2: (lambda reply: 7, "reply is not bytes (int)"),
    3: (lambda reply: reply[:-5], "truncated"),
    4: (_inside("inf"), "non-finite"),
    5: (_inside("huge"), "exceeds"),
    6: (_inside("nan-loss"), "non-finite"),
    7: (_inside("short"), "scalars, expected"),
    8: (_inside("long"), "scalars, expected"),
    9: (_inside("vector"), "expected a ClientReply, got VectorReply"),
    10: (_inside("garbage"), "header"),
    11: (_inside("other-round"), "reply is for round"),
    12: (lambda reply: _spoofed(reply), "names client 0"),
}
PAYLOAD_ROUNDS = (2, 3)  # the site's whole payload is unreadable: its client counts as missing

# round -> (what MAJORITY sends instead of its reply, the clients that leaves out, the reason):
# 1e30 from both of its clients (judged against the other site's median: a site hosting a
# majority casts one vote), then a NaN from one of them
MAJORITY_CORRUPT = {
    13: (_scalars(1e30, every=True), (0, 1), "the other source's median"),
    14: (_scalars(math.nan, clients=(1,)), (1,), "non-finite scalar or loss"),
}

# evaluation (0: the initial model's, i: that of round i) -> EVAL_FAULTS kind MAJORITY sends;
# the initial and the last evaluations are sound
EVAL_KINDS = ("int", "not-json", "array", "wrong-tag", "n-zero", "n-float", "nan-accuracy",
              "inf-loss", "int-beyond-float-loss", "int-beyond-float-logit", "share-length",
              "logits-short", "logits-nan", "logits-width", "labels-short", "labels-range",
              "labels-float")
EVAL_CORRUPT = dict(enumerate(EVAL_KINDS, start=1))
ROUNDS = len(EVAL_KINDS) + 1  # the run's rounds (eval_every=1: one evaluation each)


def _claims_another(reply: bytes) -> bytes:
    """HOSTILE's hello, also claiming client 0 (MAJORITY's)."""
    h = json.loads(reply[1:])
    h["clients"]["0"] = 10**9
    return b"H" + json.dumps(h).encode()


def hostile_site(site_name: str, site_arg: str):
    handle = site(site_name, site_arg)
    run = Path(json.loads(base64.urlsafe_b64decode(site_arg))["run_dir"]).name
    if run == BAD_HELLO_RUN:
        if site_name != HOSTILE:
            return handle
        return lambda payload: (_claims_another(handle(payload)) if payload[:1] == b"H"
                                else handle(payload))
    train = {HOSTILE: {r: c[0] for r, c in CORRUPT.items()},
             MAJORITY: {r: c[0] for r, c in MAJORITY_CORRUPT.items()}}.get(site_name, {})
    evaluations = 0

    def hostile(payload: bytes):
        nonlocal evaluations
        reply = handle(payload)
        if payload[:1] == b"T":
            r = RoundPlan.from_bytes(next(iter(unpack(payload).values()))).round
            return train[r](reply) if r in train else reply
        if payload[:1] == b"E" and site_name == MAJORITY:
            at, evaluations = evaluations, evaluations + 1
            if at in EVAL_CORRUPT:
                from tests.test_deploy_faults import EVAL_FAULTS

                return EVAL_FAULTS[EVAL_CORRUPT[at]][0](reply)
        return reply

    return hostile
