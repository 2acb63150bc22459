"""What differential privacy of the scalars costs: test ROC-AUC at epsilon in {inf, 8, 3, 1}.

    python benchmarks/dp_utility.py [--only GROUP ...] [--threads N]

The recipe is the learning benchmark's pick with the forward in bf16 (benchmarks/learning.py:
lr 1e-4, 600 forwards of 16, its mask and validation split); its rt-central-bf16 runs are the
non-private centralized reference and are read back, not re-run. Every run is an ordinary
simulation under the learning benchmark's resumable runner (runs/dp_utility/<group>/<name>):
stop it at any time and run the same command again. delta = 1/n per client (dp_delta = 0);
each client's sigma is solved by dp-accounting for the run's budget over the steps its seeded
participation plans (config.toml keeps them: dp_noise_multipliers). On a checkout without the
run folders (runs/ is not committed), a group not asked for and a non-private run are read
from the last result file (listed there); a private run always runs.

Groups, in the order they run:
  clip      C in {1, 10, 100} at epsilon 8, centralized, seed 0: C is picked on validation
            (the best validation gain; ties to the smaller C), never on test;
  central   the picked C at epsilon 8, 3 and 1, seeds 0, 1, 2 (test reported);
  k10       K = 10 Dirichlet clients (alpha 0.5, Flower's convention), one per round, 30 rounds
            of 10 steps (the learning benchmark's federated setting), at epsilon inf, 8, 3, 1,
            seeds 0, 1, 2.
Target (the privacy issue): at epsilon 8 each setting keeps at least 70% of the non-private
test ROC-AUC gain (median over seeds).

Output: benchmarks/results/dp_utility.json (every run's curve and spent epsilon, the pick, the
targets, command, versions, machine) and docs/dp_utility.md from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import write_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # noqa: E402

RUNS = learning.ROOT / "runs" / "dp_utility"
PICK = {**learning.CENTRAL, **learning.ZO_300, **learning.BF16, "lr": 1e-4}  # learning.json
K10 = {"clients": 10, "partition": "dirichlet", "alpha": 0.5, "clients_per_round": 1,
       "rounds": 30, "local_steps": 10, "eval_every": 10}
EPSILONS = (8.0, 3.0, 1.0)
CLIPS = (1.0, 10.0, 100.0)


def dp(eps: float, clip: float) -> dict[str, Any]:
    return {"dp_clip": clip, "dp_epsilon": eps}


def plan(clip: float | None) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    out = {"clip": [(f"eps8-clip{c:g}-seed0", {**PICK, **dp(8.0, c), "seed": 0}) for c in CLIPS],
           # the non-private K = 10 runs do not depend on C: they may run before C is picked
           "k10": [(f"k10-epsinf-seed{s}", {**PICK, **K10, "seed": s}) for s in learning.SEEDS]}
    if clip is not None:
        out["central"] = [(f"eps{e:g}-clip{clip:g}-seed{s}", {**PICK, **dp(e, clip), "seed": s})
                          for e in EPSILONS for s in learning.SEEDS]
        out["k10"] += [(f"k10-eps{e:g}-clip{clip:g}-seed{s}", {**PICK, **K10, **dp(e, clip),
                                                               "seed": s})
                       for e in EPSILONS for s in learning.SEEDS]
    return out


def picked_clip(recs: list[dict[str, Any]]) -> float | None:
    if len(recs) < len(CLIPS):
        return None
    best = max(zip(CLIPS, recs, strict=True), key=lambda cr: (learning.val_gain(cr[1]), -cr[0]))
    return best[0]


def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def test_gain(rec: dict[str, Any], metric: str) -> float:
    """Test `metric` at the run's last evaluation minus round 0's (the run is not selected
    by a best round: every setting is compared at its full budget)."""
    c = rec["curve"]
    return c[-1][f"test_{metric}"] - c[0][f"test_{metric}"]


def row(runs: list[dict[str, Any]], base: float | None) -> dict[str, Any]:
    auc = [test_gain(r, "auc") for r in runs]
    gain = median(auc)
    spent = [r["dp"]["epsilon_spent_max"] for r in runs if r.get("dp")]
    return {"seeds": len(runs), "test_auc_gain_per_seed": auc, "median_test_auc_gain": gain,
            "median_test_best_shift_gain": median([test_gain(r, "best_shift_accuracy")
                                                   for r in runs]),
            "share_of_non_private": gain / base if gain is not None and base else None,
            "epsilon_spent_max": max(spent) if spent else None}


def at_epsilon(rec: dict[str, Any], eps: float) -> bool:
    name = rec["run"].rsplit("/", 1)[-1]  # eps8-clip100-seed0 or k10-eps8-clip100-seed0
    return name.removeprefix("k10-").startswith(f"eps{eps:g}-")


def judge(groups: dict[str, Any], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Median test ROC-AUC gain per epsilon and its share of the non-private gain."""
    out: dict[str, Any] = {}
    for name, inf in (("central", reference),
                      ("k10", [r for r in groups.get("k10", []) if "epsinf" in r["run"]])):
        base = row(inf, None)
        rows = {"inf": base} | {
            f"{e:g}": row([r for r in groups.get(name, []) if at_epsilon(r, e)],
                          base["median_test_auc_gain"])
            for e in EPSILONS}
        out[name] = {"non_private_median_gain": base["median_test_auc_gain"], "by_epsilon": rows,
                     "at_least_70_percent_at_8": (rows["8"]["share_of_non_private"] or 0) >= 0.7
                     if rows["8"]["seeds"] == 3 else None}
    return out


def table(targets: dict[str, Any]) -> list[str]:
    def f(x: float | None, fmt: str = "+.3f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = []
    for name, title in (("central", "Centralized (one client, IID)"),
                        ("k10", "K = 10 Dirichlet clients (alpha 0.5), one per round")):
        t = targets[name]
        lines += [f"### {title}", "",
                  "| epsilon | seeds | median test ROC-AUC gain | share of non-private | "
                  "median best-shift gain | max epsilon spent | per seed |",
                  "|---|---|---|---|---|---|---|"]
        for e, r in t["by_epsilon"].items():
            lines.append(f"| {e} | {r['seeds']} | {f(r['median_test_auc_gain'])} | "
                         f"{f(r['share_of_non_private'], '.0%')} | "
                         f"{f(r['median_test_best_shift_gain'])} | "
                         f"{f(r['epsilon_spent_max'], '.2f')} | "
                         f"{', '.join(f(g) for g in r['test_auc_gain_per_seed'])} |")
        lines += ["", f"At least 70% of the non-private gain at epsilon 8: "
                  f"{t['at_least_70_percent_at_8']}", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (two invocations with --only clip central and "
                         "--only k10 and --threads 1 share two cores)")
    args = ap.parse_args()
    started = time.time()
    bench = learning.Bench(threads=args.threads, runs=RUNS)
    previous = _previous()
    reference = [_reference(bench, s) for s in learning.SEEDS]
    groups: dict[str, list[dict[str, Any]]] = {}
    carried: list[str] = []
    clip = None
    for group in ("clip", "central", "k10"):
        runs = plan(clip).get(group, [])
        if args.only is not None and group not in args.only:
            here = [(n, c) for n, c in runs if (RUNS / group / n / "summary.json").exists()]
            old = previous.get("groups", {}).get(group, [])
            if len(here) < len(runs) and len(old) >= len(runs):
                # a checkout without this group's run folders (runs/ is not committed): its
                # records as the last invocation that ran them wrote them
                groups[group] = old
                carried.append(group)
                runs = []
            else:
                runs = here
        for name, settings in runs:
            old = _non_private_record(previous, group, name, settings)
            if old is not None:
                carried.append(old["run"])
                groups.setdefault(group, []).append(old)
                continue
            rec = bench.read(bench.ensure(group, name, settings))
            summary = json.loads((RUNS / group / name / "summary.json").read_text())
            groups.setdefault(group, []).append({**rec, "dp": summary.get("dp")})
            save(groups, reference, clip, started, carried)
        if group == "clip":
            clip = (previous.get("picked_clip") if "clip" in carried
                    else picked_clip(groups.get("clip", [])))
    save(groups, reference, clip, started, carried)


def _previous() -> dict[str, Any]:
    path = learning.RESULTS / "dp_utility.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _non_private_record(previous: dict[str, Any], group: str, name: str,
                        settings: dict[str, Any]) -> dict[str, Any] | None:
    """A non-private run without its folder, from the last result file when its record agrees
    with the planned config (as learning.py reads back its runs; a non-private run is
    reproducible from its seed). A private run is always run: its sigma comes from the
    solver, and its noise from an OS-seeded generator."""
    out = RUNS / group / name
    if "dp_clip" in settings or (out / "summary.json").exists():
        return None
    rel = str(out.relative_to(learning.ROOT))
    rec = next((r for r in previous.get("groups", {}).get(group, []) if r["run"] == rel), None)
    ok = rec is not None and learning.record_matches(rec, learning.planned_config(settings, out))
    return rec if ok else None


def _reference(bench: learning.Bench, seed: int) -> dict[str, Any]:
    """The non-private centralized run of `seed`: its folder, or (a checkout without it) its
    record in learning.json, which the learning benchmark wrote from that folder."""
    out = learning.RUNS / "rt-central-bf16" / f"zo-lr1e-4-bf16-seed{seed}"
    file = learning.RESULTS / "learning.json"
    recs = (json.loads(file.read_text())["groups"].get("rt-central-bf16", {}).get("runs", [])
            if file.exists() else [])
    return learning.run_or_record(bench, out, recs, "run `python benchmarks/learning.py "
                                                    "--only rt-central-bf16` first")


def save(groups, reference, clip, started, carried=()) -> None:
    # the grid's mask is a file under the checkout: relative in the result
    recipe = {**PICK, "mask": str(Path(PICK["mask"]).relative_to(learning.ROOT))}
    data = {"recipe": recipe, "k10": K10, "clips": CLIPS, "picked_clip": clip,
            # groups and non-private runs read from the last result file (their folders were
            # not on this checkout)
            "carried_from_the_previous_result": list(carried),
            "groups": {g: [r if g != "clip" else learning.without_test(r) for r in rs]
                       for g, rs in groups.items()},
            "reference_non_private_central": [r["run"] for r in reference],
            "targets": judge(groups, reference),
            "wall_seconds_this_invocation": round(time.time() - started, 1)}
    write_result("dp_utility", data)
    clip_rows = [f"| {r['run'].rsplit('/', 1)[-1]} | {learning.val_gain(r):+.3f} |"
                 for r in groups.get("clip", [])]
    lines = ["# Differential privacy: utility (benchmarks/dp_utility.py)", "",
             "Written from `benchmarks/results/dp_utility.json` by the benchmark; do not edit "
             "by hand. Recipe: rotten_tomatoes, batch 16, lr 1e-4, 300 steps (600 forwards "
             "of 16), bf16 forward, the calibration mask at density 1e-3, 1,000 test reviews, "
             "delta = 1/n per client; each client's sigma solved by dp-accounting (RDP) for "
             "its budget over the steps its seeded participation plans.",
             *([f"Read from the previous result file (their run folders were not on this "
                f"checkout): {', '.join(data['carried_from_the_previous_result'])}."]
               if data["carried_from_the_previous_result"] else []), "",
             "## The clip, picked on validation (epsilon 8, seed 0)", "",
             "| run | validation ROC-AUC gain (best round) |", "|---|---|", *clip_rows, "",
             f"Picked: C = {clip}", "", "## Test ROC-AUC at each epsilon", "",
             *table(data["targets"])]
    (learning.ROOT / "docs" / "dp_utility.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
