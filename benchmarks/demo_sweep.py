"""Can the demo show learning within its 15 minutes? `configs/demo.toml` under a few budgets and
learning rates, each judged by the threshold-free metrics (ROC-AUC of the label-word margin,
accuracy at the best single bias shift), which recalibration alone cannot raise.

    python benchmarks/demo_sweep.py [--only NAME ...]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/demo_sweep.py --only demo --tag avx2

The second form re-runs a variant on other CPU kernels of the same machine (stored as
"demo@avx2", with the kernels torch reports): z is the same bits there, the forwards are not,
so the two runs show how far the figures move between machines.

Every variant keeps the demo's model, task, mask, batch (16) and 500 test examples and trains
within the demo's 15-minute budget on a 2-core CPU; the untrained model is evaluated once and
shared. Result: benchmarks/results/demo_sweep.json (rewritten after each variant, so an
interrupted sweep keeps what finished; finished variants are not run again unless --fresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, write_result

from fedmeerkat.config import load_config
from fedmeerkat.runners.evaluation import evaluated_part
from fedmeerkat.runners.simulation import run

ROOT = Path(__file__).resolve().parent.parent
# name -> (why, overrides of configs/demo.toml). Global ZO steps = rounds x local_steps; with
# every client in every round the K clients' steps average into one.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "demo": ("the demo as shipped: 5 clients x 2 steps x 10 rounds, lr 1e-3 (20 global steps)", []),
    "paper-lr": ("the same budget at the top of the paper's lr range (Table 4)", ["lr=2e-4"]),
    "one-client": ("the demo's 100 client-steps as 100 global steps: one client per round",
                   ["clients_per_round=1", "local_steps=5", "rounds=20"]),
    "one-client-lr3e-3": ("the same at 3x the lr", ["clients_per_round=1", "local_steps=5",
                                                     "rounds=20", "lr=3e-3"]),
    "long": ("the most the 15 minutes allow: 300 global steps, one client per round",
             ["clients_per_round=1", "local_steps=10", "rounds=30"]),
}
KEYS = ("accuracy", "auc", "macro_f1", "best_shift_accuracy")
# The demo config as it was when this sweep ran (configs/demo.toml has since moved to a budget
# that learns: benchmarks/demo.py, results/demo.json); the sweep keeps its own base so that
# it reproduces its result file.
OLD_DEMO = ["dtype=float32", "clients_per_round=0", "rounds=10", "local_steps=2", "lr=1e-3", "max_length=64",
            "max_test=500", "val_fraction=0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tag", default="", help="suffix of the stored names (e.g. the kernels)")
    ap.add_argument("--fresh", action="store_true", help="start a new result file")
    args = ap.parse_args()
    path = RESULTS / "demo_sweep.json"
    done = {} if args.fresh or not path.exists() else {
        v["name"]: v for v in json.loads(path.read_text())["variants"]}
    initial = None
    for variant in args.only:
        name = f"{variant}@{args.tag}" if args.tag else variant
        if name in done:
            continue
        why, overrides = VARIANTS[variant]
        out = Path(tempfile.mkdtemp(prefix=f"demo-sweep-{name}-")) / "run"
        cfg = load_config(str(ROOT / "configs" / "demo.toml"),
                          [*OLD_DEMO, *overrides, "eval_every=0", f"out={out}"])
        start = time.time()
        summary = run(cfg, quiet=True, initial=initial)
        wall = time.time() - start
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        initial = evaluated_part(first)
        steps = cfg.rounds * cfg.local_steps
        done[name] = {
            "name": name, "why": why,
            "command": " ".join(filter(None, [
                f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
                if "ATEN_CPU_CAPABILITY" in os.environ else "",
                "python", *map(shlex.quote, sys.argv)])),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY", ""), "overrides": overrides, "lr": cfg.lr,
            "global_steps": steps, "client_steps": steps * (cfg.clients_per_round or cfg.clients),
            "wall_seconds": round(wall, 1),
            **{f"{w}_{k}": summary[f"{w}_{k}"] for w in ("initial", "final") for k in KEYS},
            "final_predicted_share": summary["final_predicted_share"],
        }
        print(f"{name}: accuracy {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f}, "
              f"AUC {summary['initial_auc']:.3f} -> {summary['final_auc']:.3f}, best-shift "
              f"{summary['initial_best_shift_accuracy']:.3f} -> {summary['final_best_shift_accuracy']:.3f}"
              f" ({wall:.0f} s)", flush=True)
        write_result("demo_sweep", {"config": "configs/demo.toml",
                                    "variants": list(done.values())})


if __name__ == "__main__":
    main()
