"""Does `fedmeerkat run` with its defaults make the model better? Runs the defaults (no config
file: `fedmeerkat config` lists them) with the overrides given, and stores the summary and
per-round metrics in benchmarks/results/run_defaults.json with the command, versions and
machine (one entry per set of overrides, merged into the file).

    python benchmarks/run_defaults.py [--out RUN_DIR] [--threads N] [key=value ...]

The learning issue asks that `fedmeerkat run`'s defaults learn, not only the demo's file. The
defaults are the paper's shape (K = 10 Dirichlet clients, every client every round, 20 rounds
of T = 10 steps of batch 16: 4,000 forwards, max_length 128, a mask from 128 calibration
sequences of 512 tokens) at the learning benchmark's lr 1e-4. On this 2-core CPU the committed
run overrides only `dtype=bfloat16` (the defaults keep float32, which is 3.4x slower a forward
here, cpu_forward.json; the learning benchmark's bf16 runs track their fp32 twins): about an
hour. Resumable: a run folder with a checkpoint and no summary is resumed with the same
command (default folder runs/run_defaults/<overrides>).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, run_rounds, write_result

from fedmeerkat.config import load_config
from fedmeerkat.runners.simulation import run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="run folder (default runs/run_defaults/<overrides>)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(args.overrides)) or "defaults"
    out = Path(args.out) if args.out else ROOT / "runs" / "run_defaults" / name
    cfg = load_config(None, [*args.overrides, f"out={out}"])
    start = time.time()
    if (out / "summary.json").exists():  # finished: read back
        summary = json.loads((out / "summary.json").read_text())
    else:
        resume = (out / "checkpoint.safetensors").exists()
        summary = run(cfg, quiet=False, resume=resume)
    rounds = run_rounds(out)
    summary["out"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else "<elsewhere>"
    import transformers

    import fedmeerkat

    path = RESULTS / "run_defaults.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[name] = {  # one entry per set of overrides; each its own command
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": {"fedmeerkat": fedmeerkat.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "overrides": args.overrides,
        "forwards": cfg.rounds * (cfg.clients_per_round or cfg.clients) * cfg.local_steps * 2,
        "wall_seconds_this_invocation": round(time.time() - start, 1),
        "run_wall_seconds": summary.get("wall_seconds"), "summary": summary, "rounds": rounds}
    write_result("run_defaults", {"config": "fedmeerkat run defaults (no config file)",
                                  "runs": runs})
    for r in rounds:
        if r["test_accuracy"] is not None:
            print(f"round {r['round']}: test accuracy {r['test_accuracy']:.3f}, ROC-AUC "
                  f"{r['test_auc']}, best-shift accuracy {r['test_best_shift_accuracy']}")
    print(f"verdict: {summary['gain']}")


if __name__ == "__main__":
    main()
