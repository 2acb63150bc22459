"""The accuracy plot of a run folder (accuracy.png), drawn from its metrics.jsonl and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeerkat.runners.run_folder import METRICS, PLOT, SUMMARY, MetricsLog


def plot_run(run_dir: Path) -> Path:
    """Draw run_dir/accuracy.png from the run's metrics and summary; returns its path."""
    import json

    s = json.loads((run_dir / SUMMARY).read_text())
    title = (f"{s['method']} on {s['task']}: K={s['clients']}, T={s['local_steps']}, "
             f"{s['partition']}, density {s['density']:.0e}")
    path = run_dir / PLOT
    plot_accuracy(MetricsLog(run_dir / METRICS).read(), path, title)
    return path


def plot_accuracy(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(r["round"], r["test_accuracy"]) for r in records if r.get("test_accuracy") is not None]
    loss = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    if acc:
        ax[0].plot(*zip(*acc, strict=True), marker="o")
    ax[0].set(xlabel="round", ylabel="test accuracy", title="test accuracy")
    if loss:
        ax[1].plot(*zip(*loss, strict=True), marker=".")
    ax[1].set(xlabel="round", ylabel="mean client loss", title="train loss (ZO, f+ / f- mean)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
