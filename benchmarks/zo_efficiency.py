"""Forwards to the same model: ZO variants against plain sparse ZO-SGD, side by side.

    python benchmarks/zo_efficiency.py [--plan session|full|cuda] [--only GROUP ...]
    python benchmarks/zo_efficiency.py --timing-only [--device cpu|cuda]
                                       [--timing-mask magnitude|calibration]

Plain sparse ZO-SGD is the learning benchmark's pick with the forward in bf16
(benchmarks/learning.py, its rt-central-bf16 runs are read back, not re-run: the same
settings, folders and validation split; bf16 is 3.4x faster a forward on this CPU and its runs
match their fp32 twins, see learning.json). Each variant runs in bf16 on the same mask, split,
data order and seeds at the same budget of
600 forwards of 16 examples, evaluated every 200 forwards (the resolution of forwards-to-target
below), under the learning benchmark's resumable runner (runs/zo_efficiency/<group>/<name>).

Variants (config keys `perturbations` P and `zo_estimator`, zo.step.zo_multi_step):
  one-sided-p4   P = 4 one-sided directions a step sharing f(theta): 5 forwards a step
                 (FZOO's batched one-sided estimate without its step normalisation);
  two-point-p4   P = 4 two-point directions a step: 8 forwards a step (MeZO n-SPSA, DeComFL P);
                 full plan only;
  one-sided-p4-lr2x
                 one-sided-p4 at 2 x the plain pick's lr, the one point outside the lr rule,
                 added after the rule's runs (see VARIANTS);
  per-example-p16, per-example-p16-lr2x
                 one direction per example of the batch (P = 16) in the same two forwards a
                 step (zo_estimator=per-example, GRZO's idea), at the plain pick's lr and 2 x it
                 (added a session later; see VARIANTS for why its lr is not P x).
lr rule, stated before any run (no search): the variant's lr is P x the plain pick's, so each
direction moves with the plain step's lr and the step is the mean of P estimates.

Forwards-to-target: per seed, the first evaluated point whose VALIDATION primary metric reaches
the plain run's final validation metric (the target of the fewer-forwards issue), in forwards;
None if not reached within the budget. Test ROC-AUC at the same budget is reported beside it.
Wall time per step is measured apart (`step_timing`: steps of each variant on one batch of 16
on the packaged SmolLM2), so evaluations and start-up do not blur it. Its mask is SmolLM2's
largest weights at density 1e-3 (`magnitude`, made in a second on any checkout); the
per-example hooks' cost grows with the rows and columns a mask touches, so `--timing-mask
calibration` times the same steps on the runs' own calibration mask (the learning benchmark's
grid mask, computed if missing) and writes `step_timing_calibration_mask`.

Groups: `central` (one IID client) and, in the full plan, `k10` (K = 10 Dirichlet clients,
one per round: the plain runs are dp_utility.py's non-private K = 10 runs; one-sided-p4,
per-example-p16 and per-example-p16-lr2x). The cuda plan, for
a lent GPU: `central-cuda`, plain and one-sided-p4 at seeds 0-2 with `device=cuda`, plain run
there too (not read from the CPU's learning benchmark); `--timing-only --device cuda` writes
`step_timing_cuda` beside the CPU's `step_timing`. Not run yet: no GPU has been lent. runs/ is not
committed: on a checkout without a run's folder its record in the result file is read back
when it agrees with the planned config, and a group not asked for is kept as the result file
holds it when this invocation writes (under a lock: two invocations with different --only, one
a core, keep each other's runs).

Output: benchmarks/results/zo_efficiency.json (command, versions, machine, every run's curve,
the per-seed comparison, what of the plan has not run) and docs/zo_efficiency.md from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, write_result
from _common import timeit as timeit_any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # noqa: E402

RUNS = learning.ROOT / "runs" / "zo_efficiency"
BUDGET = 600  # forwards of 16 examples
# rounds x local steps per variant at the budget, evaluated every 200 forwards
VARIANTS: dict[str, dict[str, Any]] = {
    "one-sided-p4": {"perturbations": 4, "zo_estimator": "one-sided",
                     "rounds": 3, "local_steps": 40, "eval_every": 1},   # 40 x 5 = 200 forwards
    "two-point-p4": {"perturbations": 4, "zo_estimator": "two-point",
                     "rounds": 3, "local_steps": 25, "eval_every": 1},   # 25 x 8 = 200 forwards
}
# the one lr point outside the rule, added after the rule's runs: one-sided P = 4 at 2 x the
# plain lr (each direction at half of it), since at 4 x it missed plain's final validation
# ROC-AUC at two seeds of three; judged by the same forwards-to-target as every variant
VARIANTS["one-sided-p4-lr2x"] = {**VARIANTS["one-sided-p4"], "lr_factor": 2}
# One direction per example (zo_estimator=per-example, P = 16 = the batch), added a session
# later after subspace_probe.py's runs: two forwards a step as plain's, 100 steps = 200
# forwards a round. Each direction's scalar comes from one example, so the step's expected
# value is lr / P * sum_j grad f_j = lr times the batch gradient: the lr that gives plain's
# expected step is plain's own (lr_factor 1), not P x it as for the averaged estimators
# above. lr2x: twice that, the lr the probe ran next (its lower noise is what could let a
# larger lr through).
VARIANTS["per-example-p16"] = {"perturbations": 16, "zo_estimator": "per-example",
                               "rounds": 3, "local_steps": 100, "eval_every": 1,
                               "lr_factor": 1}
VARIANTS["per-example-p16-lr2x"] = {**VARIANTS["per-example-p16"], "lr_factor": 2}
# the variants whose step is timed (an lr2x variant's step is its estimator's)
TIMED = [n for n, v in VARIANTS.items() if v.get("lr_factor", 1) == 1]
# K = 10 Dirichlet clients, one per round (the learning benchmark's federated setting): the
# plain runs are the privacy benchmark's non-private K = 10 runs (dp_utility.py, k10-epsinf:
# 30 rounds of 10 steps, evaluated every 10 rounds = 200 forwards); the variant at the same 30
# rounds, evaluated at the same points: 4 steps of 5 forwards a round
K10_VARIANTS: dict[str, dict[str, Any]] = {
    "one-sided-p4": {**VARIANTS["one-sided-p4"], "rounds": 30, "local_steps": 4,
                     "eval_every": 10},
    # two forwards a step as plain's: plain's 10 steps a round, 16 seeds each
    "per-example-p16": {**VARIANTS["per-example-p16"], "rounds": 30, "local_steps": 10,
                        "eval_every": 10},
}
# the centralized group's closest variant to the target, added a session later at the same
# rounds (the only lr2x variant run with K = 10; one-sided-p4-lr2x and two-point-p4 gained
# less than plain centralized and were not carried over)
K10_VARIANTS["per-example-p16-lr2x"] = {**K10_VARIANTS["per-example-p16"], "lr_factor": 2}
# the session plan once took a subset of the variants; a group is written with the variants its
# plan names, so it now names them all (the finished ones are read back, not run)
PLANS = {"session": {"central": (list(VARIANTS), learning.SEEDS)},
         "full": {"central": (list(VARIANTS), learning.SEEDS),
                  "k10": (list(K10_VARIANTS), learning.SEEDS)},
         # a lent GPU (fewer-forwards issue, point 7): plain and the CPU groups' best variant,
         # one-sided-p4 (the only one under plain's forwards at any seed: 0.67 of them at
         # seed 1), centralized, on CUDA. Plain runs there too, not read from the learning
         # benchmark: another device's forward rounds otherwise, so the CPU runs are no twins
         "cuda": {"central-cuda": (["one-sided-p4"], learning.SEEDS)}}
# groups that run on a device other than the CPU: every run of theirs, plain included
DEVICE_GROUPS = {"central-cuda": "cuda"}


def plain_pick() -> dict[str, Any]:
    grid = json.loads((RESULTS / "learning.json").read_text())["groups"].get("rt-central-grid")
    if not grid or "pick_settings" not in grid:
        raise SystemExit("the learning benchmark has not picked yet (python learning.py)")
    return grid["pick_settings"]


def variant_runs(pick: dict[str, Any], names: list[str], seeds,
                 group: str = "central") -> list[tuple[str, dict]]:
    base = {k: v for k, v in pick["settings"].items() if k not in ("rounds", "local_steps",
                                                                    "eval_every", "seed")}
    if group == "k10":
        from dp_utility import K10

        base = {**base, **{k: v for k, v in K10.items()
                           if k not in ("rounds", "local_steps", "eval_every")}}
    out = []
    for name in names:
        v = (K10_VARIANTS if group == "k10" else VARIANTS)[name]
        for s in seeds:
            keys = {k: x for k, x in v.items() if k != "lr_factor"}
            out.append((f"{name}-seed{s}", {**base, **keys, **learning.BF16, "seed": s,
                                            "lr": base["lr"] * v.get("lr_factor",
                                                                     v["perturbations"]),
                                            **device_of(group)}))
    return out


def device_of(group: str) -> dict[str, str]:
    """The config key that puts a device group's runs on its device (none for CPU groups)."""
    return {"device": DEVICE_GROUPS[group]} if group in DEVICE_GROUPS else {}


def plain_settings(pick: dict[str, Any], group: str, seed: int) -> dict[str, Any]:
    """Plain sparse ZO-SGD run in a device group: the pick's settings, in bf16, on the device."""
    return {**pick["settings"], **learning.BF16, "seed": seed, **device_of(group)}


def compare(plain: list[dict], variants: dict[str, list[dict]]) -> dict[str, Any]:
    """Each variant's forwards to the plain run's final validation metric
    (learning.forwards_to_final_val), with both runs' test ROC-AUC at the budget beside it."""
    plain_end = {r["seed"]: r["curve"][-1] for r in plain}
    out: dict[str, Any] = {}
    for name, recs in variants.items():
        c = learning.forwards_to_final_val(plain, recs)
        end = {r["seed"]: r["curve"][-1] for r in recs}
        for row in c["per_seed"]:
            row["variant_test_auc_at_budget"] = end[row["seed"]].get("test_auc")
            row["plain_test_auc_at_budget"] = plain_end[row["seed"]].get("test_auc")
        out[name] = c
    return out


def step_timing(repeat: int = 3, device: str = "cpu", mask: str = "magnitude") -> dict[str, Any]:
    """Seconds per step (and per direction) of plain ZO-SGD and each variant, one batch of 16,
    the model in bf16 as in the runs, on `device` (each timed call ends synchronized), on the
    weight-magnitude mask or the runs' calibration mask (`mask`)."""
    from step_cost import magnitude_mask

    from fedmeerkat.models.loading import load_model
    from fedmeerkat.models.scoring import LabelScorer, encode_prompts
    from fedmeerkat.tasks import load_task
    from fedmeerkat.zo import SparseMask, SparseView, round_seeds, zo_multi_step, zo_step
    from fedmeerkat.zo.per_example import ExampleOffsets

    model, tok = load_model("smollm2-135m", dtype="bfloat16", device=device)  # as the runs
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timeit(fn, repeat: int) -> dict[str, Any]:
        return timeit_any(lambda: (fn(), sync()), repeat=repeat)

    task = load_task("rotten_tomatoes", max_train=64)
    scorer = LabelScorer(model, tok, task.spec.label_words)
    ex = task.train[:16]
    batch = scorer.collate(encode_prompts(tok, [task.spec.render(e) for e in ex], 48),
                           [e.label for e in ex])
    if mask == "calibration":
        learning.ensure_grid_mask()
        chosen = SparseMask.load(learning.GRID_MASK)
    else:
        chosen = magnitude_mask(model, 1e-3)
    view = SparseView(dict(model.named_parameters()), chosen)
    theta = view.gather()
    seeds = iter(round_seeds(0, 1, 10_000))
    out: dict[str, Any] = {"mask": mask, "nnz": view.nnz,
                           "forward": timeit(lambda: scorer.loss(batch), repeat=repeat)}
    out["plain"] = timeit(lambda: zo_step(view, theta, next(seeds), eps=1e-3, lr=1e-9,
                                          loss_fn=lambda: scorer.loss(batch)), repeat=repeat)
    for name in TIMED:
        v = VARIANTS[name]
        p, per_example = v["perturbations"], v["zo_estimator"] == "per-example"
        # the hooks only while their variant is timed (inactive ones are still called)
        offsets = ExampleOffsets(model, view.mask) if per_example else None
        losses = (lambda: scorer.example_losses(batch)) if per_example else (
            lambda: scorer.loss(batch))
        out[name] = timeit(lambda p=p, v=v, losses=losses, offsets=offsets: zo_multi_step(
            view, theta, [next(seeds) for _ in range(p)], eps=1e-3, lrs=[1e-9] * p,
            estimator=v["zo_estimator"], loss_fn=losses, offsets=offsets), repeat=repeat)
        if offsets is not None:
            offsets.remove()
    for name in ("plain", *TIMED):
        p = VARIANTS[name]["perturbations"] if name in VARIANTS else 1
        out[name]["per_direction_s"] = out[name]["median_s"] / p
        out[name]["x_forward"] = out[name]["median_s"] / out["forward"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="session", choices=list(PLANS))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--device", default="cpu",
                    help="--timing-only: where the steps are timed (cuda: step_timing_cuda)")
    ap.add_argument("--timing-mask", default="magnitude", choices=("magnitude", "calibration"),
                    help="--timing-only: the mask the steps perturb (calibration: "
                         "step_timing_calibration_mask)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run")
    args = ap.parse_args()
    started = time.time()
    previous = (json.loads((RESULTS / "zo_efficiency.json").read_text())
                if (RESULTS / "zo_efficiency.json").exists() else {})
    if args.timing_only:
        key = ("step_timing" + ("" if args.device == "cpu" else f"_{args.device}")
               + ("" if args.timing_mask == "magnitude" else "_calibration_mask"))
        data = {**{k: v for k, v in previous.items() if k not in ("command", "machine")},
                key: {**step_timing(device=args.device, mask=args.timing_mask),
                      "device": device_name(args.device)}}
        write_result("zo_efficiency", data)
        if "groups" in data:
            (learning.ROOT / "docs" / "zo_efficiency.md").write_text(markdown(data))
        return
    pick = plain_pick()
    bench = learning.Bench(threads=args.threads, runs=RUNS)
    groups: dict[str, Any] = {}
    old_runs = {r["run"]: r for g in previous.get("groups", {}).values()
                for rs in g.get("variants", {}).values() for r in rs}
    for group, (names, seeds) in PLANS[args.plan].items():
        if args.only is not None and group not in args.only:
            if group in previous.get("groups", {}):  # kept as the last invocation wrote it
                groups[group] = previous["groups"][group]
            continue
        plain = [plain_run(bench, group, pick, s) for s in seeds]
        planned = variant_runs(pick, names, seeds, group)
        recs: dict[str, dict[str, Any]] = {}
        for name, settings in planned:
            out = RUNS / group / name
            old = old_runs.get(str(out.relative_to(learning.ROOT)))
            if old is not None and learning.record_matches(
                    old, learning.planned_config(settings, out)):
                recs[name] = old  # stands in the file until the run is read again
        for name, settings in planned:
            out = RUNS / group / name
            # runs/ is not committed: a finished run without its folder is read from the
            # last result file when its record agrees with the planned config
            if name not in recs or (out / "summary.json").exists():
                recs[name] = bench.read(bench.ensure(group, name, settings))
            variants: dict[str, list[dict]] = {}
            for n, _ in planned:
                if n in recs:
                    variants.setdefault(n.rsplit("-seed", 1)[0], []).append(recs[n])
            groups[group] = {"plain": plain, "variants": variants,
                             "comparison": compare(plain, variants)}
            save(args, pick, groups, previous, started)
    save(args, pick, groups, previous, started)


def plain_run(bench: learning.Bench, group: str, pick: dict[str, Any], seed: int
              ) -> dict[str, Any]:
    """Plain sparse ZO-SGD at `seed`: the learning benchmark's bf16 run of the pick
    (centralized) or the privacy benchmark's non-private K = 10 run; from its folder, or from
    the record its benchmark wrote on a checkout without the folder. A device group runs its
    own (runs/zo_efficiency/<group>/plain-seed<S>)."""
    if group in DEVICE_GROUPS:
        return bench.read(bench.ensure(group, f"plain-seed{seed}",
                                       plain_settings(pick, group, seed)))
    if group == "k10":
        import dp_utility

        out, file = dp_utility.RUNS / "k10" / f"k10-epsinf-seed{seed}", "dp_utility.json"
    else:
        out, file = (learning.RUNS / "rt-central-bf16"
                     / f"{pick['name'].removesuffix('-seed0')}-bf16-seed{seed}", "learning.json")
    groups = json.loads((RESULTS / file).read_text())["groups"] if (RESULTS / file).exists() else {}
    recs = groups.get("k10", []) if group == "k10" else groups.get("rt-central-bf16", {}).get(
        "runs", [])
    return learning.run_or_record(bench, out, recs, "run its benchmark first ("
                                  + ("dp_utility.py --only k10" if group == "k10" else "learning.py")
                                  + ")")


def device_name(device: str) -> str:
    """What the timings ran on, in words (a CUDA device's name; the CPU's capability)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(data: dict[str, Any]) -> str:
    """docs/zo_efficiency.md, from the result file alone."""
    lines = ["# Fewer forwards to the same model (benchmarks/zo_efficiency.py)", "",
             "Written by `python benchmarks/zo_efficiency.py` from "
             "`benchmarks/results/zo_efficiency.json`; do not edit by hand. Plain sparse ZO-SGD "
             f"is the learning benchmark's pick `{data['plain']['name']}` with the forward in "
             f"bf16; every variant runs in bf16 on the same mask, split, data order and seeds "
             f"for {data['budget_forwards']} forwards of 16, evaluated every 200 forwards. "
             f"lr rule: {data['lr_rule']}.", ""]
    for group, g in data["groups"].items():
        for name, c in g["comparison"].items():
            lines += [f"## {group}: `{name}`", "",
                      "| seed | target (plain's final validation ROC-AUC) | plain forwards | "
                      "variant forwards to target | share | test ROC-AUC at the budget, plain "
                      "/ variant |", "|---|---|---|---|---|---|"]
            for r in c["per_seed"]:
                lines.append(f"| {r['seed']} | {_f(r['target_val_metric'])} | "
                             f"{r['plain_forwards']} | {_f(r['variant_forwards'], 'd')} | "
                             f"{_f(r['share_of_plain'], '.2f')} | "
                             f"{_f(r['plain_test_auc_at_budget'])} / "
                             f"{_f(r['variant_test_auc_at_budget'])} |")
            lines += ["", f"Median share of plain's forwards: "
                          f"{_f(c['median_share_of_plain'], '.2f')}; at most a third at every "
                          f"seed: {'yes' if c['at_most_a_third_every_seed'] else 'no'}.", ""]
    for key in [k for k in data if k.startswith("step_timing")]:
        t = data[key]
        if not t:
            continue
        where = t.get("device", "cpu")
        # records before the key existed were timed on the magnitude mask
        mask = {"magnitude": "weight-magnitude mask", "calibration": "the runs' calibration "
                "mask"}[t.get("mask", "magnitude")]
        lines += ["## Wall time per step (one batch of 16, SmolLM2 in bf16, fp32 master vector"
                  f"; {where}; {mask}, density 1e-3)", "",
                  "| | seconds a step | seconds a direction | x one forward |", "|---|---|---|---|"]
        for k in ("forward", "plain", *VARIANTS):
            if k in t:
                lines.append(f"| {k} | {t[k]['median_s']:.3f} | "
                             f"{_f(t[k].get('per_direction_s'))} | {_f(t[k].get('x_forward'), '.2f')} |")
        lines.append("")
    if data.get("not_run"):
        lines += ["## Not run yet (`--plan full`)", "", *[f"- `{n}`" for n in data["not_run"]], ""]
    return "\n".join(lines)


def save(args, pick, groups, previous, started) -> None:
    import transformers

    import fedmeerkat

    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / ".save.lock", "w") as lock:  # runs/ is not committed
        fcntl.flock(lock, fcntl.LOCK_EX)
        groups = merged_groups(args, groups)
        done = {r["run"] for g in groups.values() for rs in g["variants"].values() for r in rs}
        planned = {g: [n for n, _ in variant_runs(pick, names, seeds, g)]
                   for g, (names, seeds) in PLANS["full"].items()}
        data = {
            "plan": args.plan, "budget_forwards": BUDGET, "plain": pick,
            "lr_rule": "variant lr = perturbations x the plain pick's lr (no search); "
                       "one-sided-p4-lr2x, added after those runs: 2 x the plain pick's lr; "
                       "per-example-p16 (added a session later): the plain pick's lr, which "
                       "gives plain's expected step (each direction sees one example), and "
                       "per-example-p16-lr2x 2 x it",
            "versions": {"fedmeerkat": fedmeerkat.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "platform": platform.platform()},
            "groups": groups,
            "not_run": [f"{g}/{n}" for g, names in planned.items() for n in names
                        if f"{RUNS.relative_to(learning.ROOT)}/{g}/{n}" not in done],
            **{k: v for k, v in previous.items() if k.startswith("step_timing")},
            "wall_seconds_this_invocation": round(time.time() - started, 1),
        }
        write_result("zo_efficiency", data)
        (learning.ROOT / "docs" / "zo_efficiency.md").write_text(markdown(data))


def merged_groups(args, groups: dict[str, Any]) -> dict[str, Any]:
    """This invocation's groups, and every other group as the result file holds it now, not
    as it was when this invocation started: two invocations with different --only (one a
    core) keep each other's runs. Called under save's lock."""
    path = RESULTS / "zo_efficiency.json"
    on_disk = json.loads(path.read_text()).get("groups", {}) if path.exists() else {}
    mine = {g for g in PLANS[args.plan] if args.only is None or g in args.only}
    out = {}
    for g in dict.fromkeys([*PLANS["full"], *groups, *on_disk]):
        src = on_disk if g not in mine and g in on_disk else groups
        if g in src:
            out[g] = src[g]
    return out


if __name__ == "__main__":
    main()
