"""Fingerprint of what every method computes, to show that a refactor changes no behaviour.

    python tools/behaviour_fingerprint.py --out FILE            # at one commit
    python tools/behaviour_fingerprint.py --out FILE --compare OTHER.json

Runs every registered method (and the variants whose code paths differ: both downlinks,
partial participation, P directions a step, one-sided, Meerkat-VP's calibration phase, a run
stopped and resumed, lr=auto) on the tiny random Llama and a 60-example two-class CSV, in
process, and records for each run the SHA-256 of final_state.safetensors' tensors and of
metrics.jsonl with its timing fields removed (every other byte must match). `--compare` exits
1 naming each run whose fingerprint differs. Run it at the commit before a change and after,
on the same machine (float results depend on the CPU's kernels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from fedmeerkat.config import build_config
from fedmeerkat.models.tiny import save_tiny_llama
from fedmeerkat.runners.simulation import run

WORDS = ("the movie was great terrible good bad fun dull boring lovely awful plot actors "
         "film it is a an and but so very not review").split()
TIMING = ("wall_seconds", "exchange_s", "site_compute_s", "site_forward_s")

CASES: dict[str, dict] = {
    "meerkat": {},
    "meerkat-scalars": {"downlink": "scalars"},
    "meerkat-partial": {"clients_per_round": 2, "downlink": "scalars"},
    "meerkat-one-sided-p3": {"perturbations": 3, "zo_estimator": "one-sided"},
    "meerkat-p2-scalars": {"perturbations": 2, "downlink": "scalars"},
    "meerkat-cosine-wd": {"lr_schedule": "cosine", "weight_decay": 0.01},
    "meerkat-vp": {"method": "meerkat-vp", "partition": "dirichlet", "alpha": 0.3},
    "meerkat-vp-phase": {"method": "meerkat-vp", "method_settings": {"vp_calibration": "phase"}},
    "meerkat-vp-scalars": {"method": "meerkat-vp", "downlink": "scalars"},
    "meerkat-random-select": {"method": "meerkat-random-select"},
    "full-fedzo": {"method": "full-fedzo", "lr": 1e-3},
    "lora-fedzo": {"method": "lora-fedzo"},
    "fedavg-backprop-mask": {"method": "fedavg-backprop", "lr": 0.1},
    "fedavg-backprop-lora": {"method": "fedavg-backprop", "lr": 0.1,
                             "method_settings": {"trainable": "lora"}},
    "meerkat-feddyn": {"method": "meerkat-feddyn"},
    "lr-auto": {"lr": "auto", "lr_auto_steps": 3},
}


def base(root: Path, model: str) -> dict:
    rng = random.Random(0)
    pos, neg = ["great", "good", "fun", "lovely"], ["terrible", "bad", "dull", "awful"]
    rows = ["sentence,label"] + [
        f"the film was {rng.choice(pos if i % 2 else neg)} and "
        f"{rng.choice(pos if i % 2 else neg)},{i % 2}" for i in range(80)]
    (root / "r.csv").write_text("\n".join(rows) + "\n")
    (root / "c.txt").write_text(
        (" ".join(["the film was a very good film and the actors were lovely"] * 3) + "\n") * 8)
    return {"model": model, "task": "local", "data_files": str(root / "r.csv"),
            "template": "{sentence} It was", "label_words": [" good", " bad"],
            "calib_corpus": str(root / "c.txt"), "calib_sequences": 4, "calib_seq_len": 16,
            "clients": 3, "rounds": 4, "local_steps": 2, "batch_size": 4, "lr": 0.05,
            "eps": 0.01, "density": 0.05, "eval_every": 2, "partition": "iid",
            "val_fraction": 0.2, "threads": 1}


def flatten(settings: dict) -> dict:
    """method_settings keys sit at the top level of a config."""
    out = {k: v for k, v in settings.items() if k != "method_settings"}
    out.update(settings.get("method_settings", {}))
    return out


def fingerprint(folder: Path) -> dict:
    state = load_file(str(folder / "final_state.safetensors"))
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    lines = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines.append(json.dumps({k: v for k, v in rec.items() if k not in TIMING},
                                sort_keys=True))
    return {"final_state_sha256": h.hexdigest(),
            "metrics_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "rounds": len(lines) - 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    import os

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FEDMEERKAT_CACHE"] = str(root / "cache")
        model = str(save_tiny_llama(root / "model", vocab_words=WORDS))
        common = base(root, model)
        for name, extra in CASES.items():
            if args.only and name not in args.only:
                continue
            run(build_config({**common, **flatten(extra), "out": str(root / name)}), quiet=True)
            results[name] = fingerprint(root / name)
            print(f"{name}: {results[name]['final_state_sha256'][:12]} "
                  f"{results[name]['metrics_sha256'][:12]}", file=sys.stderr, flush=True)
        # stopped after round 2 and resumed to 4: the same bytes as the uninterrupted run
        cfg = build_config({**common, "rounds": 2, "downlink": "scalars",
                            "out": str(root / "resumed")})
        run(cfg, quiet=True)
        from fedmeerkat.runners.run_folder import load_run_config

        run(load_run_config(root / "resumed", ["rounds=4"]), quiet=True, resume=True)
        results["meerkat-scalars-resumed"] = fingerprint(root / "resumed")
    import platform

    import torch

    data = {"command": "python tools/behaviour_fingerprint.py " + " ".join(sys.argv[1:]),
            "commit": commit, "code_dirty": bool(subprocess.run(
                ["git", "status", "--porcelain", "--", "fedmeerkat", "tools"], capture_output=True,
                text=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(), "runs": results}
    bad: list[str] = []
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        bad = [n for n, f in results.items() if other["runs"].get(n) != f]
        for n in bad:
            print(f"differs: {n}: {other['runs'].get(n)} -> {results[n]}", file=sys.stderr)
        data["compared_with"] = {"commit": other["commit"], "runs": len(results),
                                 "identical": len(results) - len(bad), "differ": bad}
        print(f"{len(results) - len(bad)} of {len(results)} runs identical to commit "
              f"{other['commit'][:10]}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
