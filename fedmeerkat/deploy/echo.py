"""Echo handler and driver: the transport's own test load (no model, no data).

The reply carries the trainer's PID and a per-process counter, so a test can tell that one
resident process per site answered every round.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from fedmeerkat.deploy.transport import Transport


def echo_handler(site: str, site_arg: str) -> Callable[[bytes], bytes]:
    """Site side: reply with who answered, how often, and the payload's round and size."""
    count = 0

    def handle(payload: bytes) -> bytes:
        nonlocal count
        count += 1
        head = json.loads(payload.split(b"\n", 1)[0])
        time.sleep(head.get("sleep_s", 0.0))  # to miss a deadline on purpose
        return json.dumps({"site": site, "site_arg": site_arg, "pid": os.getpid(), "count": count,
                           "round": head["round"], "payload_bytes": len(payload)}).encode()

    return handle


def echo_driver(transport: Transport, rounds: int = 3, payload_bytes: int = 0,
                out: str = "echo.json", late_site: str | None = None, late_sleep_s: float = 2.0,
                late_timeout_s: float = 1.0) -> None:
    """Server side: `rounds` exchanges; writes per-round times and replies to out_dir/out.

    With late_site, two more rounds: in the first, late_site sleeps late_sleep_s before
    answering and the exchange waits only late_timeout_s; the second is a normal round.
    """
    plan: list[tuple[int, dict[str, float], float | None]] = [(r, {}, None) for r in range(rounds)]
    if late_site:
        plan += [(rounds, {late_site: late_sleep_s}, late_timeout_s), (rounds + 1, {}, None)]
    records = []
    for r, sleeps, timeout_s in plan:
        payloads = {s: json.dumps({"round": r, "sleep_s": sleeps.get(s, 0.0)}).encode()
                    + b"\n" + b"x" * payload_bytes for s in transport.sites}
        t = time.perf_counter()
        replies = transport.exchange(r, payloads, timeout_s)
        records.append({"round": r, "seconds": time.perf_counter() - t, "timeout_s": timeout_s,
                        "replies": {s: json.loads(b) for s, b in replies.items()}})
    (transport.out_dir / out).write_text(json.dumps({"sites": transport.sites,
                                                     "rounds": records}, indent=1))
