"""The small Meerkat run the deployment tests share (tiny model, local two-class CSV)."""

from __future__ import annotations

import random
from pathlib import Path


def base_overrides(root: Path, tiny_model_dir: str, rounds: int = 3) -> list[str]:
    rng = random.Random(0)
    pos, neg = ["great", "good", "fun", "lovely"], ["terrible", "bad", "dull", "awful"]
    rows = ["sentence,label"] + [
        f"the film was {rng.choice(pos if i % 2 else neg)} and {rng.choice(pos if i % 2 else neg)},{i % 2}"
        for i in range(60)]
    (root / "r.csv").write_text("\n".join(rows) + "\n")
    (root / "c.txt").write_text((" ".join(["the film was a very good film and the actors were lovely"] * 3) + "\n") * 8)
    return [f"model={tiny_model_dir}", "task=local", f"data_files={root / 'r.csv'}",
            "template={sentence} It was", "label_words=[' good',' bad']",
            f"calib_corpus={root / 'c.txt'}", "calib_sequences=4", "calib_seq_len=16",
            "clients=3", f"rounds={rounds}", "local_steps=2", "batch_size=4", "lr=0.05",
            "eps=0.01", "density=0.05", "eval_every=1", "partition=iid"]
