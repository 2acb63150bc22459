"""Simulation memory against the number of clients K, in both downlink modes.

Each (downlink, K) runs in a fresh process: one round of Meerkat on the packaged SmolLM2 (a
random mask at density 1e-3 with a 2-sequence GradIP reference pass; 1 local step of batch 1 per client; 50
test examples), then reads the process's peak RSS. With `downlink=scalars` every client keeps
the global vector of the round it last synced; clients at the same round share one copy
(`federated.client.share_copies`), so the peak should not grow with K. Target: peak at K=100
within 5% of K=5 in both modes. Writes benchmarks/results/clients_memory.json.

    python benchmarks/clients_memory.py [--clients 5,100] [--repeats 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

from _common import write_result


def child(model: str, downlink: str, k: int, out: str) -> dict:
    from fedmeerkat.config import load_config
    from fedmeerkat.runners.simulation import run

    cfg = load_config(None, [f"model={model}", "task=rotten_tomatoes", f"clients={k}",
                             "rounds=1", "local_steps=1", "batch_size=1", "max_length=32",
                             "max_test=50", "mask_kind=random", "density=1e-3", "eval_every=0",
                             "calib_sequences=2", "calib_seq_len=32",
                             f"downlink={downlink}", "partition=iid", f"out={out}"])
    run(cfg, quiet=True)
    return {"downlink": downlink, "clients": k,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="5,100")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        downlink, k, out = args.child
        print(json.dumps(child(args.model, downlink, int(k), out)))
        return
    ks = [int(x) for x in args.clients.split(",")]
    rows = []
    for downlink in ("scalars", "sparse-weights"):
        for k in ks:
            peaks = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    res = subprocess.run(
                        [sys.executable, __file__, "--model", args.model, "--child", downlink,
                         str(k), os.path.join(tmp, "run")], capture_output=True, text=True,
                        check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"])
            rows.append({"downlink": downlink, "clients": k, "peak_rss_mib": peaks,
                         "median_mib": statistics.median(peaks)})
            print(f"{downlink:>14} K={k:<4} peak RSS {statistics.median(peaks):.0f} MiB {peaks}")
    ratios = {}
    for downlink in ("scalars", "sparse-weights"):
        med = {r["clients"]: r["median_mib"] for r in rows if r["downlink"] == downlink}
        ratios[downlink] = med[max(ks)] / med[min(ks)]
        print(f"{downlink}: K={max(ks)} / K={min(ks)} = {ratios[downlink]:.3f}")
    write_result("clients_memory", {
        "model": args.model, "setting": "1 round, 1 step of batch 1 per client, random mask 1e-3, "
        "50 test examples, iid", "rows": rows, "ratio_largest_over_smallest_k": ratios,
        "target": "K=100 within 5% of K=5", "holds": {d: r <= 1.05 for d, r in ratios.items()}})


if __name__ == "__main__":
    main()
