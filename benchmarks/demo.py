"""The demo's figures, written by code: runs `configs/demo.toml` (what `make demo` runs) into a
fresh run folder and stores its summary and per-round metrics in benchmarks/results/demo.json,
with the command, versions and machine.

    python benchmarks/demo.py [--out RUN_DIR] [key=value ...]   # overrides as for `fedmeerkat run`

The mask cache (~/.cache/fedmeerkat or $FEDMEERKAT_CACHE) is used as in `make demo`; the
result records whether the mask was computed in the run or taken from the cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import run_rounds, write_result

from fedmeerkat.config import load_config
from fedmeerkat.runners.simulation import run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="", help="run folder (default: a new temporary one)")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="a new empty cache, so the wall time includes converting the model and "
                         "computing the mask, as on a fresh machine")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    if args.fresh_cache:
        os.environ["FEDMEERKAT_CACHE"] = tempfile.mkdtemp(prefix="demo-cache-")
    out = args.out or str(Path(tempfile.mkdtemp(prefix="demo-")) / "run")
    cfg = load_config(str(ROOT / "configs" / "demo.toml"), [*args.overrides, f"out={out}"])
    start = time.time()
    summary = run(cfg, quiet=True)
    wall = time.time() - start
    rounds = run_rounds(out)
    if not args.out:  # a temporary folder of this machine: not part of the result
        summary["out"] = "<temporary folder>"
    write_result("demo", {"config": "configs/demo.toml", "overrides": args.overrides,
                          "wall_seconds": round(wall, 1), "fresh_cache": args.fresh_cache,
                          "summary": summary, "rounds": rounds})
    for r in rounds:
        if r["test_accuracy"] is not None:
            print(f"round {r['round']}: test accuracy {r['test_accuracy']:.3f}, AUC "
                  f"{r['test_auc']}, best-shift accuracy {r['test_best_shift_accuracy']}")
    print(f"verdict: {summary['gain']}")
    print(f"wall {wall:.0f} s, mask: {summary['mask_source']}")


if __name__ == "__main__":
    main()
