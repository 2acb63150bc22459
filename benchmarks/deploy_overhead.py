"""FLARE transport cost per round: a provisioned server and 2 sites on this machine, mutual TLS.

Runs the echo job (fedmeerkat.deploy.selftest: no model, no data; each site's resident trainer
answers with a few bytes) for --rounds rounds and reports the median exchange time per round,
i.e. what a deployed round costs beyond the clients' own work, with FLARE's polling tuned to
0.02 s (fedmeerkat.deploy.job.make_job). Round 0 includes launching each site's trainer and is
reported apart. With --payload-bytes N the server sends each site N extra bytes per round (e.g.
424704, the sparse-weights download of SmolLM2 at density 1e-3 in results/bytes.json).
Inside private namespaces (unshare) where available, so the figure is loopback only.
Writes results/deploy_empty.json (or --name).

    python benchmarks/deploy_overhead.py [--rounds 30] [--payload-bytes 0] [--name NAME]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from importlib.metadata import version

from _common import write_result

from fedmeerkat.deploy import selftest

TARGET_S = 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--payload-bytes", type=int, default=0)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    netns_missing = selftest.netns_available()
    with tempfile.TemporaryDirectory() as tmp:
        r = selftest.launch(f"{tmp}/run", ["--rounds", str(args.rounds), "--payload-bytes",
                                           str(args.payload_bytes)], netns=netns_missing is None)
    if r["returncode"] != 0:
        raise SystemExit(r.get("error") or r["output"])
    rounds = r["echo"]["rounds"]
    times = [x["seconds"] for x in rounds]
    later = times[1:]
    pids = {s: sorted({x["replies"][s]["pid"] for x in rounds}) for s in r["sites"]}
    median = statistics.median(later)
    print(f"round 0 {times[0]:.3f} s; rounds 1-{len(later)}: median {median:.3f} s "
          f"(min {min(later):.3f}, max {max(later):.3f}); target < {TARGET_S} s")
    name = args.name or ("deploy_empty" if args.payload_bytes == 0
                         else f"deploy_payload_{args.payload_bytes}")
    write_result(name, {
        "versions": {"nvflare": version("nvflare"), "grpcio": version("grpcio")},
        "setup": {"sites": len(r["sites"]), "transport": "gRPC, mutual TLS, 127.0.0.1",
                  "polling_s": 0.02, "payload_bytes_per_site": args.payload_bytes,
                  "private_namespaces": netns_missing is None,
                  "why_no_namespaces": netns_missing},
        "round_median_s": median, "round_min_s": min(later), "round_max_s": max(later),
        "target_s": TARGET_S, "meets_target": median < TARGET_S,
        "first_round_s": times[0], "rounds": len(times), "round_s": times,
        "all_replies": all(set(x["replies"]) == set(r["sites"]) for x in rounds),
        "trainer_pids_per_site": pids,
        "startup": {"provision_s": r["provision_s"], "sites_ready_s": r["sites_ready_s"]},
        "job_s": r["job_s"], "total_s": r["total_s"],
    })


if __name__ == "__main__":
    main()
