"""Server cost of a round: replay + aggregation + GradIP, against drawing the round's z vectors.

    .venv/bin/python benchmarks/server_cost.py [--nnz 1500000] [--steps 100]
                                               [--clients 1 10 50] [--repeats 5]

No model: the server state machine (`MeerkatServer.screen`, then `apply`) on K fake replies of
T finite scalars each, with a calibration gradient so GradIP is recorded, for both downlinks, at
a mask of `--nnz` coordinates (1.5M is about Qwen2-1.5B at density 1e-3, the paper's Table 23 row).
The reference is the time of drawing the same T z vectors alone (`draw_z`), which any replay
must do. Measured interleaved (draw, then each K and downlink, per repeat) so drift hits all
rows alike; medians over `--repeats`. Target (issue: benchmarks complete): within 1.2x of
drawing z, whatever K.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import write_result

from fedmeerkat.federated import ClientReply
from fedmeerkat.federated.server import FedSettings, MeerkatServer
from fedmeerkat.zo import draw_z, round_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nnz", type=int, default=1_500_000)
    ap.add_argument("--steps", type=int, default=100, help="T, local steps per round")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="server_cost")
    args = ap.parse_args()
    n, t = args.nnz, args.steps
    theta0 = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02
    calib = torch.randn(n, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)

    def server_round(k: int, downlink: str) -> float:
        settings = FedSettings(local_steps=t, lr=1e-6, eps=1e-3, batch_size=1, seed=0,
                               downlink=downlink, weighting="uniform")
        server = MeerkatServer(settings, theta0, [10] * k)
        server.calib_grad = calib
        server.plan_round(1)
        replies = [ClientReply(1, c, rng.standard_normal(t).astype(np.float32).tolist(), 10, 1.0)
                   for c in range(k)]
        t0 = time.perf_counter()
        server.apply(1, server.screen(1, replies))
        return time.perf_counter() - t0

    def draw_only() -> float:
        seeds = round_seeds(0, 1, t)
        t0 = time.perf_counter()
        for s in seeds:
            draw_z(s, n)
        return time.perf_counter() - t0

    rows = {(k, d): [] for k in args.clients for d in ("sparse-weights", "scalars")}
    draws: list[float] = []
    server_round(1, "scalars")  # warm up allocator and tables
    for rep in range(args.repeats):
        draws.append(draw_only())
        for (k, d), times in rows.items():
            times.append(server_round(k, d))
        print(f"repeat {rep + 1}/{args.repeats}: draw {draws[-1]:.2f} s, "
              + ", ".join(f"K={k} {d} {v[-1]:.2f} s" for (k, d), v in rows.items()), flush=True)
    draw_med = statistics.median(draws)
    table = []
    for (k, d), times in rows.items():
        med = statistics.median(times)
        table.append({"clients": k, "downlink": d, "seconds": times, "median_s": med,
                      "x_draw_z": med / draw_med})
    worst = max(r["x_draw_z"] for r in table)
    res = {"nnz": n, "steps": t, "repeats": args.repeats, "gradip": True,
           "draw_z_seconds": draws, "draw_z_median_s": draw_med, "rows": table,
           "target_x_draw_z": 1.2, "worst_x_draw_z": worst, "meets_target": worst <= 1.2}
    for r in table:
        print(f"K={r['clients']:>3} {r['downlink']:<15} {r['median_s']:.3f} s = "
              f"{r['x_draw_z']:.2f} x drawing z ({draw_med:.3f} s)")
    write_result(args.out, res)


if __name__ == "__main__":
    main()
