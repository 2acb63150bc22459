"""The paper's three claims at CPU scale, in one command: `python experiments/claims.py`.

Claim 1 (Sec. 3.1, Table 1): sparse ZO on a calibration mask (Meerkat) against Full-FedZO,
    the same density with a random or a weight-magnitude mask, and LoRA-FedZO.
Claim 2 (Sec. 3.2, Fig. 3): GradIP of a single-label client against an IID client.
Claim 3 (Sec. 3.3, Table 13): Meerkat-VP against Meerkat and random client selection.

Every run is an ordinary in-process simulation (runners.simulation.run) with the sizes of the
suite file (default experiments/cpu.toml: its comments say why each value). Stages, in order:
  1. grid:   every Claim-1 arm at every lr of its grid, on `select_task` at seeds[0];
  2. select: per arm, the lr with the best last-round validation metric (ROC-AUC / macro-F1)
             when the suite file carves validation (val_fraction > 0), else the lowest
             last-round training loss (the committed cpu.toml run); never test data;
  3. claim1: every arm at its lr on every task and seed (grid runs are reused);
  4. claim2: the GradIP experiment (runners.gradip_experiment) per task and seed, at Meerkat's lr;
  5. claim3: meerkat-vp and meerkat-random-select at Meerkat's lr on every task and seed.
Each run's folder is RUNS/<name>; a run with a summary.json is not run again, so an interrupted
suite continues where it stopped (an unfinished run restarts: each takes a minute or two). A
finished run keeps its metrics, summary and final state; its checkpoints are deleted. The
result file is rewritten after every run ("complete": false until the end), and a run whose
folder is missing (runs/ is not committed) but whose record is in the result file of the same
suite (same suite file contents and --set) is read from there, so a suite can span sessions;
the file lists those runs.
The untrained model's test evaluation is taken once per (task, seed) and shared.

Output: experiments/results/claims.json (every run's metrics, the picks, command, versions,
machine, wall time); then `python experiments/results_md.py` writes docs/results.md and its
plots from that file alone.

Flags:
  --config FILE     suite file (default experiments/cpu_learning.toml: the learning budget;
                    experiments/cpu.toml is the 4-step run of docs/results_4steps.md)
  --runs DIR        run folders (default runs/experiments/<suite file stem>)
  --out FILE        result file (default experiments/results/claims_learning.json)
  --set K=V ...     override [base] keys for every run, e.g. --set rounds=20 local_steps=10
  --stages S ...    only these stages (grid claim1 claim2 claim3; select always runs)
  --threads N       torch threads (default: torch's)
  --seeds S ...     claim1/claim2/claim3 at these of the suite's seeds only (the grid always
                    runs at seeds[0]); for a suite that spans sessions, or fewer seeds on CPU
  --arms A ...      the grid, the picks and claim1 with these arms only (claim2 and claim3
                    use Meerkat's pick, so they need meerkat among them)
An invocation keeps the records of earlier invocations of the same suite that it did not
touch, so restricted invocations add up to the whole suite; "complete" is true only when the
result holds every run and GradIP experiment the suite plans. Each write re-reads the result
file under a lock and merges, so invocations on disjoint runs can share the cores (and the
file) at the same time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedmeerkat.config import build_config, check_inputs  # noqa: E402
from fedmeerkat.runners.evaluation import evaluated_part, primary_metric  # noqa: E402
from fedmeerkat.runners.gradip_experiment import run_gradip  # noqa: E402
from fedmeerkat.runners.simulation import run  # noqa: E402

# Claim-1 arms: name -> what makes it that arm (on top of [base])
ARMS: dict[str, dict[str, Any]] = {
    "meerkat": {"method": "meerkat"},
    "full-fedzo": {"method": "full-fedzo"},
    "random-mask": {"method": "meerkat", "mask_kind": "random"},
    "magnitude-mask": {"method": "meerkat", "mask_kind": "weight-magnitude"},
    "lora-fedzo": {"method": "lora-fedzo"},
}
# Claim-3 arms (beside Claim 1's meerkat), at Meerkat's lr
VP_ARMS: dict[str, dict[str, Any]] = {
    "meerkat-vp": {"method": "meerkat-vp"},
    "random-select": {"method": "meerkat-random-select"},
}
STAGES = ("grid", "claim1", "claim2", "claim3")
METRICS = ("accuracy", "auc", "macro_f1", "best_shift_accuracy")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import transformers

    import fedmeerkat

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fedmeerkat": getattr(fedmeerkat, "__version__", "")}


def machine() -> dict[str, Any]:
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "system": platform.system()}


def lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


class Suite:
    def __init__(self, spec: dict[str, Any], runs: Path, base_overrides: dict[str, Any]):
        self.spec = spec
        self.runs = runs
        self.base = {**spec["base"], **base_overrides}
        self.tasks: dict[str, dict[str, Any]] = spec["tasks"]
        self.suite = spec["suite"]
        self.grids: dict[str, list[float]] = spec["grids"]
        missing = set(ARMS) - set(self.grids)
        if missing:
            raise SystemExit(f"suite file: [grids] lacks {sorted(missing)}")
        self.initial: dict[tuple[str, int], Any] = {}
        self.records: list[dict[str, Any]] = []
        # the last result file's records of this same suite (`reuse_previous`): a run whose
        # folder is missing is read from there; runs/ is not committed, so a suite that spans
        # sessions keeps what earlier sessions ran
        self.previous: dict[str, dict[str, Any]] = {}
        self.previous_records: list[dict[str, Any]] = []
        self.previous_gradip: dict[tuple[str, int, float], dict[str, Any]] = {}
        self.reused: list[str] = []
        self.on_record: Any = lambda: None  # called after each run (main writes the result)
        self.seeds: list[int] = list(self.suite["seeds"])  # claim stages' seeds (--seeds)
        self.arms: list[str] = list(ARMS)  # the grid's, the picks' and claim1's arms (--arms)

    def reuse_previous(self, data: dict[str, Any], overrides: dict[str, Any]) -> bool:
        """Take the runs of an earlier result file of the same suite file contents and
        overrides; False (nothing taken) for another suite."""
        if data.get("suite") != self.spec or data.get("overrides", {}) != overrides:
            return False
        self.previous = {r["run"]: r for r in data.get("runs", [])}
        self.previous_records = data.get("runs", [])
        self.previous_gradip = {(g["task"], g["seed"], g["lr"]): g
                                for g in data.get("gradip", [])}
        return True

    def all_records(self) -> list[dict[str, Any]]:
        """This invocation's records, then the earlier invocations' that it did not touch."""
        mine = {(r["run"], r["stage"]) for r in self.records}
        return self.records + [r for r in self.previous_records
                               if (r["run"], r["stage"]) not in mine]

    def all_gradip(self, gradip: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mine = {(g["task"], g["seed"], g["lr"]) for g in gradip}
        return gradip + [g for k, g in self.previous_gradip.items() if k not in mine]

    def is_complete(self, records: list[dict[str, Any]], gradip: list[dict[str, Any]],
                    meerkat_lr: float) -> bool:
        """Every run and GradIP experiment the whole suite plans is in the result."""
        have = {(r["stage"], r["arm"], r["task"], r["seed"]) for r in records}
        seeds = self.suite["seeds"]
        want = {("claim1", a, t, s) for t in self.tasks for s in seeds for a in ARMS}
        want |= {("claim3", a, t, s) for t in self.tasks for s in seeds for a in VP_ARMS}
        got_gradip = {(g["task"], g["seed"]) for g in gradip if g["lr"] == meerkat_lr}
        return want <= have and got_gradip >= {(t, s) for t in self.tasks for s in seeds}

    def config(self, task: str, seed: int, extra: dict[str, Any], out: Path):
        raw = {k: v for k, v in self.base.items()}
        method_keys = {k: raw.pop(k) for k in list(raw) if k.startswith(("vp_", "lora_"))}
        raw.update(self.tasks[task])
        raw.update(extra)
        raw.update(task=task, seed=seed, out=str(out), method_keys=method_keys)
        cfg = build_config(raw)
        check_inputs(cfg)
        return cfg

    def run(self, stage: str, arm: str, extra: dict[str, Any], task: str, seed: int,
            lr: float) -> dict[str, Any]:
        name = f"{task}/{arm}/lr{lr_name(lr)}-seed{seed}"
        out = self.runs / name
        done = out / "summary.json"
        if not done.exists() and name in self.previous:
            rec = {**self.previous[name], "stage": stage}
            if name not in self.reused:
                self.reused.append(name)
            self.records = [r for r in self.records if r["run"] != name or r["stage"] != stage]
            self.records.append(rec)
            return rec
        if not done.exists():
            if out.exists():
                log(f"{name}: unfinished, restarting it")
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            cfg = self.config(task, seed, {**extra, "lr": lr}, out)
            t = time.time()
            log(f"{stage} {name} ...")
            run(cfg, quiet=True, initial=self.initial.get((task, seed)))
            for ckpt in out.glob("checkpoint*.safetensors"):  # resume state of a finished run:
                ckpt.unlink()  # 2 x 538 MB per full-fedzo run; final_state.safetensors stays
            log(f"{stage} {name} done in {time.time() - t:.0f} s")
        summary = json.loads(done.read_text())
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (task, seed) not in self.initial:
            self.initial[(task, seed)] = evaluated_part(metrics[0])
        steps = sum(sum(r.get("client_steps", {}).values()) for r in metrics[1:])
        rec = {"stage": stage, "arm": arm, "task": task, "seed": seed, "lr": lr, "run": name,
               "method": summary["method"], "mask_kind": summary["mask_kind"],
               "trainable": summary["mask_nnz"], "forwards": 2 * steps,
               "final_train_loss": metrics[-1]["train_loss"],
               # validation ROC-AUC / macro-F1 of the last round (None without validation)
               "final_val_metric": primary_metric(metrics[-1], "val"),
               "train_loss": [r["train_loss"] for r in metrics[1:]],
               "wall_seconds": summary["wall_seconds"],
               "upload_bytes_per_client": summary["upload_bytes_per_client"],
               **{f"{w}_{m}": summary[f"{w}_{m}"] for w in ("initial", "final") for m in METRICS},
               "vp_detected": summary.get("vp_detected"),
               "vp_early_stopped": summary.get("vp_early_stopped")}
        self.records = [r for r in self.records if r["run"] != name or r["stage"] != stage]
        self.records.append(rec)
        self.on_record()
        return rec

    def pick(self, arm: str) -> dict[str, Any]:
        """The lr of `arm` on the selection task: the highest last-round validation metric
        (ROC-AUC / macro-F1) when the suite carves a validation set, else (val_fraction = 0,
        as in the committed cpu.toml run) the lowest last-round training loss."""
        task, seed = self.suite["select_task"], self.suite["seeds"][0]
        tried = [r for r in self.records if r["stage"] == "grid" and r["arm"] == arm]
        if tried and all(r.get("final_val_metric") is not None for r in tried):
            best = max(tried, key=lambda r: (r["final_val_metric"], -r["lr"]))
            return {"arm": arm, "lr": best["lr"], "task": task, "seed": seed,
                    "rule": "highest last-round validation metric",
                    "val_metrics": {lr_name(r["lr"]): r["final_val_metric"] for r in tried},
                    "losses": {lr_name(r["lr"]): r["final_train_loss"] for r in tried}}
        finite = [r for r in tried if r["final_train_loss"] is not None
                  and r["final_train_loss"] == r["final_train_loss"]
                  and abs(r["final_train_loss"]) != float("inf")]
        if not finite:
            raise SystemExit(f"{arm}: no grid run on {task} seed {seed} finished with a finite loss")
        best = min(finite, key=lambda r: r["final_train_loss"])
        return {"arm": arm, "lr": best["lr"], "task": task, "seed": seed,
                "rule": "lowest last-round training loss",
                "losses": {lr_name(r["lr"]): r["final_train_loss"] for r in tried}}

    def planned(self, stages: list[str]) -> tuple[int, int]:
        """(runs, forwards) the suite plans, an upper bound: every sampled client runs T steps
        of 2 forwards each round (Meerkat-VP runs fewer after its calibration)."""
        per_run = {}
        for task in self.tasks:
            cfg = {**self.base, **self.tasks[task]}
            per_round = int(cfg.get("clients_per_round") or cfg.get("clients", 1))
            per_run[task] = per_round * int(cfg["rounds"]) * int(cfg["local_steps"]) * 2
        select, n_seeds = self.suite["select_task"], len(self.seeds)
        first_seed = self.suite["seeds"][0] in self.seeds
        runs = [(select, sum(len(self.grids[a]) for a in self.arms))]
        if "claim1" in stages:  # the select task's seeds[0] runs are the grid's own
            runs += [(t, len(self.arms) * (n_seeds - (t == select and first_seed)))
                     for t in self.tasks]
        if "claim3" in stages:
            runs += [(t, len(VP_ARMS) * n_seeds) for t in self.tasks]
        return sum(n for _, n in runs), sum(per_run[t] * n for t, n in runs)

    def grid(self) -> None:
        task, seed = self.suite["select_task"], self.suite["seeds"][0]
        for arm in self.arms:
            for lr in self.grids[arm]:
                self.run("grid", arm, ARMS[arm], task, seed, lr)

    def claim1(self, picks: dict[str, dict[str, Any]]) -> None:
        for task in self.tasks:
            for seed in self.seeds:
                for arm in self.arms:
                    self.run("claim1", arm, ARMS[arm], task, seed, picks[arm]["lr"])

    def claim2(self, lr: float) -> list[dict[str, Any]]:
        results = []
        for task in self.tasks:
            for seed in self.seeds:
                out = self.runs / task / "gradip" / f"lr{lr_name(lr)}-seed{seed}"
                path = out / "gradip.json"
                if not path.exists() and (task, seed, lr) in self.previous_gradip:
                    results.append(self.previous_gradip[(task, seed, lr)])
                    self.reused.append(f"{task}/gradip/lr{lr_name(lr)}-seed{seed}")
                    continue
                if not path.exists():
                    cfg = self.config(task, seed, {"method": "meerkat-vp", "lr": lr}, out)
                    t = time.time()
                    log(f"claim2 {task} seed {seed} ...")
                    run_gradip(cfg, steps=int(self.suite["gradip_steps"]),
                               label=int(self.suite["gradip_label"]), quiet=True)
                    log(f"claim2 {task} seed {seed} done in {time.time() - t:.0f} s")
                g = json.loads(path.read_text())
                results.append({"task": task, "seed": seed, "lr": lr, "steps": g["steps"],
                                "label": g["label"], "class_names": g["class_names"],
                                "calib_grad_norm": g["calib_grad_norm"],
                                "clients": [{k: c[k] for k in ("name", "gradip", "loss",
                                                                "label_histogram")}
                                            for c in g["clients"]],
                                "wall_seconds": g["wall_seconds"]})
        return results

    def claim3(self, lr: float) -> None:
        for task in self.tasks:
            for seed in self.seeds:
                for arm, extra in VP_ARMS.items():
                    self.run("claim3", arm, extra, task, seed, lr)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "experiments" / "cpu_learning.toml"))
    ap.add_argument("--runs", default="")
    ap.add_argument("--out",
                    default=str(ROOT / "experiments" / "results" / "claims_learning.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--arms", nargs="*", default=None, choices=list(ARMS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_path = Path(args.config)
    spec = tomllib.loads(spec_path.read_text())
    runs = Path(args.runs) if args.runs else ROOT / "runs" / "experiments" / spec_path.stem
    suite = Suite(spec, runs, parse_sets(args.set))
    if args.seeds is not None:
        if not args.seeds or not set(args.seeds) <= set(suite.suite["seeds"]):
            raise SystemExit(f"--seeds {args.seeds}: pick from the suite's seeds "
                             f"{suite.suite['seeds']}")
        suite.seeds = [s for s in suite.suite["seeds"] if s in args.seeds]
    if args.arms is not None:
        if not args.arms:
            raise SystemExit(f"--arms: name at least one of {list(ARMS)}")
        suite.arms = [a for a in ARMS if a in args.arms]
        if "meerkat" not in suite.arms and {"claim2", "claim3"} & set(args.stages):
            raise SystemExit("--arms: claim2 and claim3 use Meerkat's pick; name meerkat too")
    out = Path(args.out)
    if out.exists() and suite.reuse_previous(json.loads(out.read_text()), parse_sets(args.set)):
        log(f"{out}: runs of this suite whose folders are missing are read from it")
    start = time.time()
    log(f"suite {spec_path.name}: run folders under {runs}")
    n_runs, forwards = suite.planned(args.stages)
    log(f"plan: {n_runs} runs, at most {forwards:,} forwards of batch_size "
        f"{suite.base.get('batch_size')} (finished runs are read, not re-run)")
    picks: dict[str, dict[str, Any]] = {}
    gradip: list[dict[str, Any]] = []

    def write(finished: bool) -> None:
        """The result file: after every run and at the end; complete once it holds the whole
        suite (restricted invocations add up to it)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            # what other invocations of this suite wrote since this one started
            now = json.loads(out.read_text()) if out.exists() else {}
            if not suite.reuse_previous(now, parse_sets(args.set)):
                now = {}  # another suite's file: replaced
            write_locked(finished, {**now.get("picks", {}), **picks},
                         now.get("commands", [now["command"]] if "command" in now else []))

    def write_locked(finished: bool, all_picks: dict[str, Any], commands: list[str]) -> None:
        command = shlex.join(["python", "experiments/claims.py",
                              *(sys.argv[1:] if argv is None else argv)])
        records, all_gradip = suite.all_records(), suite.all_gradip(gradip)
        complete = finished and "meerkat" in all_picks and suite.is_complete(
            records, all_gradip, all_picks["meerkat"]["lr"])
        result = {
            "command": command,
            # every invocation whose records the file holds, oldest first
            "commands": [c for c in commands if c != command] + [command],
            "suite_file": spec_path.name, "suite": spec, "overrides": parse_sets(args.set),
            "stages": args.stages, "seeds": suite.seeds, "arms": suite.arms,
            "complete": complete, "versions": versions(),
            "machine": machine(), "picks": all_picks, "runs": records, "gradip": all_gradip,
            "runs_read_from_the_previous_result": suite.reused,
            "wall_seconds": round(time.time() - start, 1),
            "note": "wall_seconds is this invocation's; runs finished by an earlier invocation "
                    "were read, not re-run (each run's own wall_seconds is in its record)",
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)

    # a partial result keeps every run that finished; it replaces an older file of another
    # suite only once this suite has a run of its own to keep
    suite.on_record = lambda: write(False)
    suite.grid()  # always: the picks need it (finished runs are read, not re-run)
    picks.update({arm: suite.pick(arm) for arm in suite.arms})
    for arm, p in picks.items():
        log(f"pick {arm}: lr {p['lr']:g} ({p['rule']}; by lr: "
            f"{p.get('val_metrics', p['losses'])})")
    if "claim1" in args.stages:
        suite.claim1(picks)
    if "claim2" in args.stages:
        gradip.extend(suite.claim2(picks["meerkat"]["lr"]))
    if "claim3" in args.stages:
        suite.claim3(picks["meerkat"]["lr"])
    write(True)
    log(f"wrote {out} ({len(suite.records)} runs, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
