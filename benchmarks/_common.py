"""Shared helpers for benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "runs": repeat}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine(), **data}
    path = RESULTS / f"{name}.json"
    # whole or not at all: two invocations of a benchmark may write the same file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return path


# what demo.py and run_defaults.py keep of each metrics.jsonl record
ROUND_KEYS = ("round", "train_loss", "test_accuracy", "test_loss", "predicted_share", "test_auc",
              "test_macro_f1", "test_best_shift_accuracy", "val_accuracy", "val_auc",
              "val_best_shift_accuracy", "bytes_up", "bytes_down")


def run_rounds(run_dir: Path) -> list[dict]:
    """A run folder's per-round metrics (metrics.jsonl, read as the run reads it), ROUND_KEYS."""
    from fedmeerkat.runners.run_folder import MetricsLog

    return [{k: r.get(k) for k in ROUND_KEYS}
            for r in MetricsLog(Path(run_dir) / "metrics.jsonl").read()]
