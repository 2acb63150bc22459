"""A hostile site for the real FLARE run of test_deploy_faults.py: the job's site handler
("deploy_hostile:hostile_site", allowed by FEDMEERKAT_DEPLOY_ALLOW) is the real one, except
that HOSTILE corrupts its train replies in the rounds of CORRUPT (one hostile kind a round)."""

from __future__ import annotations

import math

from fedmeerkat.deploy.framing import pack_reply, unpack, unpack_reply
from fedmeerkat.deploy.site import site
from fedmeerkat.federated import ClientReply, RoundPlan

HOSTILE = "site-2"


def _nan(reply: bytes) -> bytes:
    pid, compute_s, forward_s, items = unpack_reply(reply)
    for k, blob in items.items():
        r = ClientReply.from_bytes(blob)
        items[k] = ClientReply(r.round, k, [math.nan, *r.scalars[1:]], r.num_samples,
                               r.train_loss).to_bytes()
    return pack_reply(pid, compute_s, forward_s, items)


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
    1: (_nan, "non-finite scalar or loss"),
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


def hostile_site(site_name: str, site_arg: str):
    handle = site(site_name, site_arg)
    if site_name != HOSTILE:
        return handle

    def hostile(payload: bytes):
        reply = handle(payload)
        if payload[:1] != b"T":
            return reply
        r = RoundPlan.from_bytes(next(iter(unpack(payload).values()))).round
        return CORRUPT[r][0](reply) if r in CORRUPT else reply

    return hostile
