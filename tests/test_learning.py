"""Model selection never reads test: the validation split (disjoint from train and test, seeded,
stratified, before partitioning), validation in every evaluation, the best round and lr=auto
chosen on it, and benchmarks/learning.py's pick and resume. Mechanics only, not figures."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from bench_module import load_benchmark

from fedmeerkat.cli.main import main
from fedmeerkat.config import ConfigError, load_config
from fedmeerkat.runners.evaluation import best_round, gain_verdict
from fedmeerkat.runners.tune import search_lr
from fedmeerkat.tasks import load_task
from fedmeerkat.tasks.common import with_validation
from fedmeerkat.tasks.splits import validation_split
from tests.test_cli import _args

ROOT = Path(__file__).resolve().parent.parent


def test_validation_split_is_seeded_stratified_capped_and_keeps_the_rest_for_training():
    labels = np.array([0] * 700 + [1] * 300)
    tr, va = validation_split(labels, 0.1, None, split_seed=4)
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)
    assert sorted(np.r_[tr, va]) == list(range(1000))  # nothing dropped
    assert (labels[va] == 1).sum() == 30  # stratified
    again, va2 = validation_split(labels, 0.1, None, split_seed=4)
    assert np.array_equal(va, va2) and np.array_equal(tr, again)
    assert not np.array_equal(va, validation_split(labels, 0.1, None, split_seed=5)[1])
    tr, va = validation_split(labels, 0.1, 40, split_seed=4)  # the cap returns the rest
    assert len(va) == 40 and len(tr) == 960
    tr, va = validation_split(labels, 0.0, None, split_seed=4)
    assert len(va) == 0 and len(tr) == 1000


def test_task_validation_is_disjoint_from_train_and_test():
    task = with_validation(load_task("bbc_news", split_seed=1), 0.1, 50, split_seed=1)
    text = lambda e: e.fields["text"]  # noqa: E731
    train, val, test = ({text(e) for e in s} for s in (task.train, task.val, task.test))
    assert len(task.val) == 50 and not train & val and not val & test
    assert len({e.label for e in task.val}) == 5  # every class kept


def test_validation_keys_are_checked():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["val_fraction=1"])
    with pytest.raises(ConfigError, match="lr_auto: needs a validation split"):
        load_config(None, ["lr=auto", "val_fraction=0"])
    with pytest.raises(ConfigError, match="lr_auto: searches plain ZO-SGD"):
        load_config(None, ["lr=auto", "method=fedavg-backprop"])
    with pytest.raises(ConfigError, match="lr_auto_grid"):
        load_config(None, ["lr=auto", "lr_auto_grid=[]"])
    cfg = load_config(None, ["lr=auto"])
    assert cfg.lr_auto and cfg.lr == 1e-4


def test_run_evaluates_validation_and_picks_the_best_round_on_it(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "val_fraction=0.25",
                      "eval_every=1")) == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "validation (16 examples)" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_examples"] == 16 and r["val_accuracy"] is not None for r in records)
    summary = json.loads((out / "summary.json").read_text())
    partition = json.loads((out / "partition.json").read_text())
    assert summary["val_examples"] == 16 and sum(partition["sizes"]) == 64 - 16
    assert summary["train_examples"] == 48
    assert summary["best_val_round"] == best_round(records)["best_val_round"]


def test_best_round_reads_validation_only():
    recs = [{"round": r, "test_accuracy": 0.5, "val_auc": v, "test_auc": t}
            for r, v, t in ((0, 0.6, 0.9), (1, 0.8, 0.1), (2, 0.8, 0.2), (3, 0.7, 0.95))]
    best = best_round(recs)
    assert best["best_val_round"] == 1 and best["best_val_round_test_auc"] == 0.1  # earliest tie
    assert best_round([{"round": 0, "test_accuracy": 0.5, "val_auc": None}]) == {}


def test_gain_verdict_tells_learning_from_recalibration():
    before = {"test_accuracy": 0.58, "test_auc": 0.73}
    assert gain_verdict(before, {"test_accuracy": 0.60, "test_auc": 0.78}).startswith("learning")
    assert gain_verdict(before, {"test_accuracy": 0.66, "test_auc": 0.72}).startswith("recalib")
    assert gain_verdict(before, {"test_accuracy": 0.58, "test_auc": 0.735}).startswith("no gain")


class _Scalar:
    """A one-coordinate 'model': loss (theta - 1)^2, validation metric -|theta - 1|."""

    def __init__(self):
        self.theta = torch.zeros(1)
        self.device = torch.device("cpu")

    def write(self, theta):
        self.theta = theta.clone()


def test_search_lr_picks_by_validation_and_leaves_the_model_untrained():
    view = _Scalar()
    theta0 = torch.zeros(1)
    seen_train = []

    def loss(ids):
        seen_train.append(ids)
        return float((view.theta - 1) ** 2)

    def val():
        return {"val_auc": -float(abs(view.theta - 1)), "val_accuracy": 0.5}

    found = search_lr(view=view, theta0=theta0, train_loss=loss, num_train=10,
                      evaluate_val=val, grid=[1e-6, 1e-2, 1e-4], steps=20, batch_size=2,
                      eps=1e-3, seed=0, log=lambda m: None)
    assert found["lr"] == 1e-2 and found["improves_on_untrained"]
    assert [c["lr"] for c in found["candidates"]] == [1e-6, 1e-4, 1e-2]
    assert float(view.theta) == 0.0  # the run starts from the untrained model
    # every candidate saw the same batches
    per = len(seen_train) // 3
    assert all(np.array_equal(a, b) for a, b in zip(seen_train[:per], seen_train[per:2 * per],
                                                     strict=True))


def test_lr_auto_run_saves_its_pick_resumably_and_never_reads_test(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    searches = []
    for max_test in (4, 12):  # another test set, same train and validation
        out = tmp_path / f"run{max_test}"
        assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "lr=auto",
                          "lr_auto_grid=[1e-3, 1e-1]", "lr_auto_steps=2", "rounds=1",
                          "val_fraction=0.25", f"max_test={max_test}")) == 0
        found = json.loads((out / "lr_search.json").read_text())
        cfg = load_config(out / "config.toml")
        assert not cfg.lr_auto and cfg.lr == found["lr"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["lr"] == found["lr"] and summary["test_examples"] == max_test
        searches.append([(c["lr"], c["val_metric"]) for c in found["candidates"]])
    assert searches[0] == searches[1]
    assert "lr=auto: searching" in capsys.readouterr().err


def _learning_module():
    return load_benchmark("learning")


def _rec(run, lr, vals):
    return {"run": run, "lr": lr, "seed": 0, "method": "meerkat",
            "curve": [{"steps": 50 * i, "forwards": 100 * i, "val_auc": v,
                       "test_auc": 1 - v} for i, v in enumerate(vals)]}


def test_learning_benchmark_picks_on_validation_and_hides_grid_test():
    lb = _learning_module()
    runs = [("a", {"lr": 1e-4}), ("b", {"lr": 3e-4})]
    g = lb.summarize("grid", "grid", runs, [_rec("a", 1e-4, [0.7, 0.78]),
                                           _rec("b", 3e-4, [0.7, 0.74])])
    assert g["pick"] == "a" and g["pick_settings"]["name"] == "a"
    assert all("test_auc" not in p for r in g["runs"] for p in r["curve"])
    partial = lb.summarize("grid", "grid", runs, [_rec("a", 1e-4, [0.7, 0.78])])
    assert "pick" not in partial  # no pick before the whole grid ran


def test_learning_benchmark_picks_the_best_worst_seed():
    """A setting that wins at seed 0 but fails at another seed loses to one that learns at
    every seed; settings run at fewer seeds are screening only."""
    lb = _learning_module()

    def rec(name, lr, seed, vals):
        return {**_rec(f"runs/{name}", lr, vals), "seed": seed}

    runs = [(f"zo-lr{lr}-seed{s}", {"lr": lr, "seed": s}) for lr in (1e-4, 3e-4) for s in (0, 1)]
    runs.append(("zo-lr1e-3-seed0", {"lr": 1e-3, "seed": 0}))
    vals = {(1e-4, 0): [0.70, 0.76], (1e-4, 1): [0.72, 0.77],
            (3e-4, 0): [0.70, 0.80], (3e-4, 1): [0.72, 0.71], (1e-3, 0): [0.70, 0.90]}
    recs = [rec(n, c["lr"], c["seed"], vals[(c["lr"], c["seed"])]) for n, c in runs]
    g = lb.summarize("grid", "grid", runs, recs)
    assert g["pick_settings"]["name"] == "zo-lr0.0001-seed0"
    assert abs(g["pick_worst_seed_val_gain"] - 0.05) < 1e-9
    by = {sc["setting"]: sc for sc in g["scores"]}
    assert by["zo-lr1e-3"]["seeds"] == 1 and abs(by["zo-lr0.0003"]["worst"] + 0.01) < 1e-9


def test_learning_benchmark_resumes_and_does_not_rerun(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, monkeypatch):
    lb = _learning_module()
    monkeypatch.setattr(lb, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(lb, "BASE", {
        "model": tiny_model_dir, "task": "local", "data_files": sentiment_csv,
        "template": "{sentence} so it was", "label_words": [" bad", " good"],
        "calib_corpus": calib_txt, "calib_sequences": 4, "calib_seq_len": 32, "density": 0.01,
        "batch_size": 4, "val_fraction": 0.25, "max_val": 0, "clients": 1, "partition": "iid",
        "rounds": 2, "local_steps": 2, "eval_every": 1, "lr": 1e-3, "seed": 0})
    bench = lb.Bench(threads=0)
    calls = []
    real_run = lb.run

    def interrupted(cfg, **kw):  # dies after its first round's checkpoint
        calls.append(kw.get("resume", False))
        if kw.get("resume"):
            return real_run(cfg, **kw)
        real_run(dataclasses.replace(cfg, rounds=1), **kw)
        (Path(cfg.out) / "summary.json").unlink()  # as if killed after round 1 of 2
        (Path(cfg.out) / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
        raise KeyboardInterrupt

    monkeypatch.setattr(lb, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.ensure("g", "r", {})
    out = bench.ensure("g", "r", {})  # resumed from round 1's checkpoint
    assert calls == [False, True]
    rec = bench.read(out)
    assert [p["steps"] for p in rec["curve"]] == [0, 2, 4] and rec["curve"][-1]["forwards"] == 8
    monkeypatch.setattr(lb, "run", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert bench.ensure("g", "r", {}) == out
    with pytest.raises(SystemExit, match="another config"):
        bench.ensure("g", "r", {"lr": 1e-2})


def test_a_run_without_its_folder_is_read_from_its_record_only_if_it_matches(
        tmp_path, monkeypatch):
    """runs/ is not committed: on a fresh checkout a finished run is read back from
    learning.json when the record agrees with the planned config, and run again otherwise."""
    lb = _learning_module()
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(lb, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lb, "RESULTS", tmp_path / "results")
    settings = {**lb.CENTRAL, **lb.ZO_300, "lr": 1e-4, "seed": 0}
    cfg = lb.planned_config(settings, lb.RUNS / "g" / "r")
    rec = {"run": "runs/g/r", **{k: getattr(cfg, k) for k in lb.RECORD_KEYS},
           "curve": [{"steps": 0}, {"steps": 300}]}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "learning.json").write_text(json.dumps(
        {"groups": {"g": {"kind": "grid", "runs": [rec]}}}))
    prev = lb.Previous()
    assert prev.record(lb.RUNS / "g" / "r", settings) == rec and prev.reused == ["runs/g/r"]
    # --rerun (a group's `reproduce` command) reads no record: the run is made again
    rerun = lb.Previous(rerun=True)
    assert rerun.record(lb.RUNS / "g" / "r", settings) is None and rerun.reused == []
    # a grid record holds validation only: a group reporting test runs it again
    assert prev.record(lb.RUNS / "g" / "r", settings, need_test=True) is None
    assert prev.record(lb.RUNS / "g" / "r", {**settings, "lr": 3e-4}) is None
    assert prev.record(lb.RUNS / "g" / "r", {**settings, "rounds": 7}) is None
    assert prev.record(lb.RUNS / "g" / "other", settings) is None
    (lb.RUNS / "g" / "r").mkdir(parents=True)
    (lb.RUNS / "g" / "r" / "summary.json").write_text("{}")  # its folder is here: read that
    assert prev.record(lb.RUNS / "g" / "r", settings) is None
    assert lb.Previous().groups == {"g": {"kind": "grid", "runs": [rec]}}
    # P directions a step: the record counts seeds (Bench.read), P per local step
    multi = {**settings, "perturbations": 4, "zo_estimator": "one-sided", "local_steps": 40,
             "rounds": 3}
    cfg4 = lb.planned_config(multi, lb.RUNS / "g" / "p")
    rec4 = {"run": "runs/g/p", **{k: getattr(cfg4, k) for k in lb.RECORD_KEYS},
            "curve": [{"steps": 0}, {"steps": 480}]}
    assert lb.record_matches(rec4, cfg4)
    assert not lb.record_matches({**rec4, "curve": [{"steps": 0}, {"steps": 120}]}, cfg4)
    # a record older than a key matches at the key's recorded default only
    older = {k: v for k, v in rec4.items() if k != "max_length"}
    assert cfg4.max_length == 48 and lb.record_matches(older, cfg4)
    cfg128 = lb.planned_config({**multi, "max_length": 128}, lb.RUNS / "g" / "p")
    assert not lb.record_matches(older, cfg128)
    # the mask kind and the loss are part of what a record ran (a task-mask or centered-loss
    # run is not the calibration-mask run of the same lr); records from before they were kept
    # ran both values and are not checked on them (their run names carry the setting)
    for key, other in (("mask_kind", "task"), ("loss", "centered-ce")):
        cfg_other = lb.planned_config({**settings, key: other}, lb.RUNS / "g" / "r")
        assert rec[key] != other and not lb.record_matches(rec, cfg_other)
        assert lb.record_matches({**rec, key: other}, cfg_other)
        no_key = {k: v for k, v in rec.items() if k != key}
        assert lb.record_matches(no_key, cfg) and lb.record_matches(no_key, cfg_other)


def test_lr_auto_is_refused_for_deployment(tmp_path):
    from fedmeerkat.deploy.meerkat import prepare_run

    with pytest.raises(ConfigError, match="simulation only"):
        prepare_run(load_config(None, ["lr=auto", f"out={tmp_path / 'r'}"]))
    assert not (tmp_path / "r").exists()


def test_long_reviews_are_long_and_share_no_snippet():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from long_reviews import corpus_rows, long_reviews

    rows = [r for r in corpus_rows() if r["movie_name"] < "b"]  # a slice: quick
    reviews = long_reviews(rows, 100)
    assert reviews and all(len(t.split()) >= 100 for t, _ in reviews)
    assert {label for _, label in reviews} == {0, 1}
    snippets = [" ".join(r["text"].split()) for r in rows if r["category"] != "plot"]
    for s in snippets[:200]:
        assert sum(s in t for t, _ in reviews) <= 1


def test_not_run_lists_only_grid_points_with_neither_folder_nor_record(tmp_path, monkeypatch):
    lb = _learning_module()
    monkeypatch.setattr(lb, "RUNS", tmp_path / "runs")
    groups = {"rt-central-grid": {"runs": [{"run": "runs/learning/rt-central-grid/zo-lr1e-4-seed0"}]}}
    missing = lb.not_run_points(groups)
    assert "zo-lr1e-4-seed0" not in missing and "zo-lr3e-4-seed0" in missing
    (tmp_path / "runs" / "rt-central-grid" / "zo-lr3e-4-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "rt-central-grid" / "zo-lr3e-4-seed0" / "summary.json").write_text("{}")
    assert "zo-lr3e-4-seed0" not in lb.not_run_points(groups)


def test_a_result_written_mid_plan_keeps_the_groups_not_reached_yet():
    lb = _learning_module()
    last = {"rt-central-grid": {"v": 1}, "rt-central-lora-fedzo": {"v": 2}, "custom": {"v": 3}}
    now = {"rt-central-grid": {"v": 9}, "rt-central-eps": {"v": 4}}
    merged = lb.with_unreached(now, last)
    assert merged == {"rt-central-grid": {"v": 9}, "rt-central-eps": {"v": 4},
                      "rt-central-lora-fedzo": {"v": 2}, "custom": {"v": 3}}
    order = list(lb.PLANS["full"])
    assert list(merged)[:3] == sorted(list(merged)[:3], key=order.index)


def test_every_group_names_the_command_that_makes_it_again():
    lb = _learning_module()
    out = lb.with_reproduce({"rt-central-eps": {"kind": "grid"}, "custom": {"kind": "grid"}})
    cmd = out["rt-central-eps"]["reproduce"].split()
    assert cmd[:2] == ["python", "benchmarks/learning.py"] and "reproduce" not in out["custom"]
    args = lb.arg_parser().parse_args(cmd[2:])  # the flags the benchmark takes
    assert args.plan == "full" and args.only == ["rt-central-eps"] and args.rerun


def test_run_or_record_reads_the_folder_then_the_record_then_says_how_to_make_it(
        tmp_path, monkeypatch):
    lb = _learning_module()
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    out = tmp_path / "runs" / "g" / "r"
    rec = {"run": "runs/g/r", "curve": []}
    assert lb.run_or_record(None, out, [rec], "hint") is rec
    with pytest.raises(SystemExit, match="runs/g/r: neither .*; run it"):
        lb.run_or_record(None, out, [], "run it")
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")

    class Bench:
        def read(self, path):
            return {"read": path}

    assert lb.run_or_record(Bench(), out, [rec], "hint") == {"read": out}


def test_a_run_another_invocation_holds_is_left_for_later(tmp_path, monkeypatch):
    """Two invocations share a plan: a run locked by another process answers None to a
    non-waiting ensure (and is not touched), and runs once that process lets go."""
    import subprocess

    lb = _learning_module()
    bench = lb.Bench(threads=0, runs=tmp_path)
    ran = []
    monkeypatch.setattr(bench, "_ensure", lambda g, n, s: ran.append(n) or tmp_path / g / n)
    (tmp_path / "g").mkdir()
    holder = subprocess.Popen(  # another invocation, holding the run's lock until stdin closes
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(tmp_path / "g" / ".r.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert bench.ensure("g", "r", {}, wait=False) is None
        assert ran == []
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(timeout=10)
    assert bench.ensure("g", "r", {}, wait=False) == tmp_path / "g" / "r" and ran == ["r"]


def test_a_budget_in_examples_sets_the_steps_from_the_picks_batch():
    lb = _learning_module()
    b4 = lb.with_examples({"rounds": 15, "examples": 48000, "batch_size": 4})
    b16 = lb.with_examples({"rounds": 15, "examples": 48000, "batch_size": 16})
    assert (b4["local_steps"], b16["local_steps"]) == (400, 100) and "examples" not in b4
    with pytest.raises(ValueError, match="whole rounds"):
        lb.with_examples({"rounds": 7, "examples": 48000, "batch_size": 16})
    assert lb.with_examples({"rounds": 2}) == {"rounds": 2}


def test_the_targets_count_examples_so_smaller_batches_meet_the_same_budget():
    """600 forwards of 16 are 9,600 examples: a batch-4 run is judged at its 2,400th
    forward, not its 600th."""
    lb = _learning_module()

    def rec(batch, pts):
        return {"run": f"r{batch}", "seed": 0, "curve": [
            {"forwards": f, "examples": f * batch, "test_auc": a, "test_best_shift_accuracy": a}
            for f, a in pts]}

    out = lb.judge([rec(4, [(0, 0.70), (600, 0.72), (2400, 0.76), (3200, 0.80)])], [])
    assert out["per_seed_within_600_forwards"][0]["examples"] == 9600
    assert abs(out["per_seed_within_600_forwards"][0]["test_auc_gain"] - 0.06) < 1e-9
    assert lb.judge([], [], [rec(4, [(0, 0.7), (3000, 0.8)])])["within_3000_forwards"] == []


def test_federated_runs_are_judged_by_each_conventions_median_over_seeds():
    lb = _learning_module()

    def rec(name, gain):
        return {"run": f"runs/{name}", "curve": [
            {"forwards": 0, "examples": 0, "test_auc": 0.7},
            {"forwards": 600, "examples": 9600, "test_auc": 0.7 + gain}]}

    central = [rec(f"c{s}", g) for s, g in enumerate((0.06, 0.04, 0.02))]  # median 0.04
    fed = [rec(f"k10-dirichlet-1perround-seed{s}", g) for s, g in enumerate((0.05, 0.01, 0.04))]
    fed += [rec(f"k10-dirichlet-client-1perround-seed{s}", g)
            for s, g in enumerate((0.03, 0.02, 0.035))]
    out = lb.judge_federated(fed, central)
    assert abs(out["by_partition"]["dirichlet"]["share_of_centralized"] - 1.0) < 1e-9
    assert abs(out["by_partition"]["dirichlet-client"]["share_of_centralized"] - 0.75) < 1e-9
    # dirichlet's weak seed 1 (25%) does not sink it; dirichlet-client's median (75%) does
    assert out["at_least_80_percent"] is False


def test_federated_t_is_picked_on_the_worse_conventions_validation_never_on_test():
    lb = _learning_module()

    def rec(part, seed, val_gain, test_gain):
        return {"run": f"runs/k10-{part}-seed{seed}", "partition": part, "seed": seed, "curve": [
            {"forwards": 0, "val_auc": 0.7, "test_auc": 0.7},
            {"forwards": 600, "val_auc": 0.7 + val_gain, "test_auc": 0.7 + test_gain}]}

    def runs(gains):  # gains: {partition: [validation gain per seed]}; test says the opposite
        return [rec(p, s, g, -g) for p, gs in gains.items() for s, g in enumerate(gs)]

    t10 = runs({"dirichlet": [0.04, 0.00, 0.03], "dirichlet-client": [0.04, 0.04, 0.03]})
    t1 = runs({"dirichlet": [0.03, 0.03, 0.03], "dirichlet-client": [0.02, 0.035, 0.03]})
    out = lb.pick_federated_t({"rt-federated": {"runs": t10}, "rt-federated-t1": {"runs": t1}})
    # T = 10's worse convention (dirichlet, median 0.03) against T = 1's (0.03): a tie -> T = 10
    assert out["pick"] == "T=10" and out["group"] == "rt-federated"
    t1[0]["curve"][1]["val_auc"] += 0.01  # dirichlet at T = 1: median still 0.03
    t1[3]["curve"][1]["val_auc"] += 0.02  # dirichlet-client at T = 1: median 0.03 -> 0.035
    out = lb.pick_federated_t({"rt-federated": {"runs": t10}, "rt-federated-t1": {"runs": t1}})
    assert out["pick"] == "T=10"  # its worse convention is still 0.03
    for r in t1:
        r["curve"][1]["val_auc"] += 0.005
    out = lb.pick_federated_t({"rt-federated": {"runs": t10}, "rt-federated-t1": {"runs": t1}})
    assert out["pick"] == "T=1" and out["group"] == "rt-federated-t1"
    # different seeds: no pick
    assert lb.pick_federated_t({"rt-federated": {"runs": t10},
                                "rt-federated-t1": {"runs": t1[:2]}}) is None
    # a third shape (four clients of batch 4 a round) competes by the same rule, never on test
    k4 = runs({"dirichlet": [0.05, 0.04, 0.01], "dirichlet-client": [0.05, 0.04, 0.06]})
    both = {"rt-federated": {"runs": t10}, "rt-federated-t1": {"runs": t1}}
    out = lb.pick_federated_t({**both, "rt-federated-k4": {"runs": k4}})
    assert out["pick"] == "T=1, 4 clients a round, batch 4" and out["group"] == "rt-federated-k4"
    assert abs(out["scores"][out["pick"]]["worse_convention"] - 0.04) < 1e-9
    k4[1]["curve"][1]["val_auc"] -= 0.01  # dirichlet median 0.04 -> 0.03: below T = 1's 0.035
    assert lb.pick_federated_t({**both, "rt-federated-k4": {"runs": k4}})["pick"] == "T=1"
    # one shape alone is no pick
    assert lb.pick_federated_t({"rt-federated-k4": {"runs": k4}}) is None


def test_batch_at_equal_forwards_reads_validation_at_the_first_evaluation_past_the_budget():
    lb = _learning_module()

    def rec(batch, lr, seed, gains):  # gains: validation gain at each evaluation; test opposite
        every = 200 if batch == 16 else 800
        return {"run": f"b{batch}-lr{lr}-s{seed}", "batch_size": batch, "lr": lr, "seed": seed,
                "curve": [{"forwards": i * every, "val_auc": 0.7 + g, "test_auc": 0.7 - g}
                          for i, g in enumerate((0.0, *gains))]}

    b16 = [rec(16, 1e-4, s, g) for s, g in enumerate(((0.01, 0.02, 0.03, 0.09),
                                                     (0.01, 0.02, 0.04, 0.09)))]
    # batch 4 is first evaluated at 800 forwards (past the 600 of the budget): that point
    # counts, its later ones do not
    b4 = [rec(4, 5e-5, s, g) for s, g in enumerate(((0.03, 0.2), (0.05, 0.2)))]
    out = lb.pick_batch_at_equal_forwards({"rt-central-batch": {"runs": b16 + b4}})
    scores = out["scores"]
    assert abs(scores["batch 16, lr 0.0001"]["worst_seed_val_gain"] - 0.03) < 1e-9
    assert scores["batch 16, lr 0.0001"]["at_forwards"] == 600
    assert abs(scores["batch 4, lr 5e-05"]["worst_seed_val_gain"] - 0.03) < 1e-9
    assert scores["batch 4, lr 5e-05"]["at_forwards"] == 800
    assert out["pick"] == "batch 16, lr 0.0001"  # a tie goes to the larger batch
    b4[0]["curve"][1]["val_auc"] += 0.001
    out = lb.pick_batch_at_equal_forwards({"rt-central-batch": {"runs": b16 + b4}})
    assert out["pick"] == "batch 4, lr 5e-05"
    # settings at different seeds, or a run that never reaches the budget: no pick
    assert lb.pick_batch_at_equal_forwards({"rt-central-batch": {"runs": b16 + b4[:1]}}) is None
    short = {**b4[0], "curve": b4[0]["curve"][:1]}
    assert lb.pick_batch_at_equal_forwards(
        {"rt-central-batch": {"runs": b16 + [short, b4[1]]}}) is None


def test_the_3000_forward_target_needs_three_seeds_to_hold():
    lb = _learning_module()

    def rec(seed, gain):
        return {"run": f"r{seed}", "seed": seed, "curve": [
            {"forwards": f, "examples": 16 * f, "test_auc": a, "test_best_shift_accuracy": a}
            for f, a in ((0, 0.7), (3000, 0.7 + gain))]}

    key = "auc_gain_at_least_0.10_within_3000"
    assert lb.judge([], [], [rec(0, 0.11), rec(1, 0.12)])[key] is None  # 2 of 3 seeds
    assert lb.judge([], [], [rec(0, 0.11), rec(1, 0.09)])[key] is False
    assert lb.judge([], [], [rec(s, 0.11) for s in range(3)])[key] is True


def test_a_budgets_own_group_is_judged_at_that_budget_only():
    """A group run at one budget gets that budget's verdict, never the other budget's judged
    on the same runs (a 600-forward run is not a 3,000-forward one, nor the reverse)."""
    lb = _learning_module()

    def rec(seed, last, gain):
        return {"run": f"r{seed}", "seed": seed, "curve": [
            {"forwards": f, "examples": 16 * f, "test_auc": a, "test_best_shift_accuracy": a}
            for f, a in ((0, 0.7), (last, 0.7 + gain))]}

    fo = [rec(0, 50, 0.16)]
    short = {"g": {"runs": [rec(s, 600, 0.06) for s in range(3)]}}
    out = lb.judge_budget(short, "g", fo, 600)
    assert out["auc_gain_at_least_0.05_every_seed_within_600"] is True
    assert not set(lb.LONG_ONLY_KEYS) & set(out)
    assert out["first_order_bound_test_auc_gain"] == pytest.approx(0.16)
    long = {"g": {"runs": [rec(s, 3000, 0.11) for s in range(3)]}}
    out = lb.judge_budget(long, "g", fo, 3000)
    assert out["auc_gain_at_least_0.10_within_3000"] is True
    assert set(out) == {*lb.LONG_ONLY_KEYS, "first_order_bound_test_auc_gain"}
    assert lb.judge_budget({}, "g", fo, 600) is None  # not run yet


def test_the_budget_for_a_target_collects_every_seeds_group_and_its_first_reach():
    lb = _learning_module()

    def rec(seed, aucs):
        return {"run": f"runs/long-seed{seed}", "seed": seed, "curve": [
            {"forwards": 1000 * i, "examples": 16000 * i, "test_auc": a}
            for i, a in enumerate(aucs)]}

    out = lb.targets_full_plan({
        "rt-central-long-budget": {"runs": [rec(0, [0.70, 0.78, 0.81, 0.80])]},
        "rt-central-long-budget-seed2": {"runs": [rec(2, [0.74, 0.80, 0.83])]}})
    rows = out["budget_for_0.10"]
    assert [r["seed"] for r in rows] == [0, 2]
    # seed 0 first reaches +0.10 at 2,000 forwards (later falling back does not undo it);
    # seed 2 never reaches it (+0.09 at its end)
    assert [r["first_forwards_at_least_0.1"] for r in rows] == [2000, None]
    assert "budget_for_0.10" not in lb.targets_full_plan({})


def test_forwards_to_the_plain_runs_final_validation_read_validation_only():
    lb = _learning_module()

    def rec(seed, est, vals):
        # test falls wherever validation rises: a reach read on test would differ
        return {"run": f"r{est}{seed}", "seed": seed, "zo_estimator": est, "curve": [
            {"forwards": 1000 * i, "val_auc": v, "test_auc": 1.0 - v}
            for i, v in enumerate(vals)]}

    plain = [rec(s, "two-point", [0.70, 0.75, 0.78, 0.80]) for s in range(3)]
    fast = [rec(0, "per-example", [0.70, 0.81, 0.82, 0.83]),
            rec(1, "per-example", [0.70, 0.79, 0.80, 0.81]),
            rec(2, "per-example", [0.70, 0.72, 0.74, 0.79])]
    out = lb.targets_full_plan({"rt-central-long-per-example": {"runs": plain + fast}})
    got = out["long_per_example_forwards_to_plain_final_val"]
    assert [r["variant_forwards"] for r in got["per_seed"]] == [1000, 2000, None]
    assert got["median_share_of_plain"] is None and not got["at_most_a_third_every_seed"]
    # the cosine group's runs land under their own key, not the constant-lr group's
    out = lb.targets_full_plan({"rt-central-long-per-example-cosine": {"runs": plain + fast}})
    assert out["long_per_example_cosine_forwards_to_plain_final_val"] == got
    assert "long_per_example_forwards_to_plain_final_val" not in out
    fast[1]["curve"][1]["val_auc"] = fast[2]["curve"][1]["val_auc"] = 0.80
    got = lb.forwards_to_final_val(plain, fast)
    assert got["at_most_a_third_every_seed"] and got["median_share_of_plain"] == 1 / 3
    # two seeds are not enough for the target
    assert not lb.forwards_to_final_val(plain, fast[:2])["at_most_a_third_every_seed"]


def test_a_fresh_checkout_recomputes_the_grids_mask_once_with_the_grids_settings(
        tmp_path, monkeypatch):
    import fedmeerkat.cli.main as cli

    lb = _learning_module()
    grid_mask = tmp_path / "rt-central-grid" / "zo-lr1e-4-seed0" / "mask.safetensors"
    monkeypatch.setattr(lb, "GRID_MASK", grid_mask)
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    calls = []

    def fake_cli(argv):
        calls.append(argv)
        Path(argv[argv.index("--out") + 1]).write_bytes(b"mask")
        return 0

    monkeypatch.setattr(cli, "main", fake_cli)
    lb.ensure_grid_mask()
    lb.ensure_grid_mask()  # there now: not computed again
    assert len(calls) == 1 and grid_mask.read_bytes() == b"mask"
    argv = calls[0]
    assert argv[0] == "mask" and "density=0.001" in argv and "calib_sequences=32" in argv
    assert "calib_seq_len=128" in argv and f"model={lb.BASE['model']}" in argv
    assert not list(grid_mask.parent.glob("*.tmp.safetensors"))  # written, then moved


def test_learning_plot_draws_a_shorter_twin_once():
    """A run whose curve is the start of a longer run's (the 3,000-forward runs and their
    5,000-forward twins) is not drawn under it; a run that differs anywhere is."""
    lb = _learning_module()

    def run(name, aucs):
        return {"run": name, "curve": [{"forwards": 1000 * i, "test_auc": a}
                                       for i, a in enumerate(aucs)]}

    short, long_ = run("a", [0.73, 0.80]), run("b", [0.73, 0.80, 0.82])
    other = run("c", [0.73, 0.79])
    assert lb.is_prefix(short, long_, "test")
    assert not lb.is_prefix(long_, short, "test")
    assert not lb.is_prefix(short, short, "test")
    assert not lb.is_prefix(other, long_, "test")


def test_a_group_another_invocation_finishes_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two invocations with different --only, one a core: a group this one was not asked for,
    unfinished when it started, is read from its folders before the last save if the other
    invocation finished it meanwhile (before, the last save dropped it from the result file)."""
    lb = _learning_module()
    monkeypatch.setattr(lb, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(lb, "ensure_grid_mask", lambda: None)
    monkeypatch.setattr(lb, "PLANS", {"full": {"a": ("grid", [("ra", {"lr": 1e-4})]),
                                               "b": ("grid", [("rb", {"lr": 3e-4})])}})

    class FakeBench:
        def __init__(self, threads, runs=None):
            pass

        def ensure(self, group, name, settings, wait=False):
            other = lb.RUNS / "a" / "ra"  # the other invocation finishes group a meanwhile
            other.mkdir(parents=True)
            (other / "summary.json").write_text("{}")
            return lb.RUNS / group / name

        def read(self, out):
            return _rec(str(out), 1e-4, [0.7, 0.75])

    saves: list[dict] = []
    monkeypatch.setattr(lb, "Bench", FakeBench)
    monkeypatch.setattr(lb, "save", lambda args, plan, groups, started, previous=None:
                        saves.append(dict(groups)))
    monkeypatch.setattr("sys.argv", ["learning.py", "--plan", "full", "--only", "b"])
    lb.main()
    assert "a" not in saves[0] and set(saves[-1]) == {"a", "b"}
    assert saves[-1]["a"]["runs"][0]["run"] == str(lb.RUNS / "a" / "ra")


def test_the_grid_mask_digest_reads_its_coordinates_not_its_gradient(tmp_path, monkeypatch):
    """A recomputed mask on another machine may store other last bits of the calibration
    gradient; the digest the result records names the trained coordinates only."""
    from safetensors.torch import save_file

    lb = _learning_module()
    path = tmp_path / "mask.safetensors"
    monkeypatch.setattr(lb, "GRID_MASK", path)
    assert lb.grid_mask_digest() is None  # not there yet

    def write(idx, grad):
        save_file({"idx::a": torch.tensor(idx), "grad::a": torch.tensor(grad)}, str(path))
        return lb.grid_mask_digest()

    first = write([1, 5, 9], [0.5, 0.25])
    assert write([1, 5, 9], [0.5, 0.250001]) == first  # another gradient, same coordinates
    assert write([1, 5, 8], [0.5, 0.25]) != first


def test_the_per_example_pick_with_k10_keeps_p_dividing_each_clients_batch():
    """The per-example pick's K = 10 groups run the pick's lr and schedule; P divides the
    client's batch (one of 16 a round with P = 16, four of 4 with P = 4), at every seed in
    both conventions, 9,600 examples in all; the -size group draws each round's client by size."""
    lb = _learning_module()
    pick = {"name": "zo-lr4e-4-x-seed0",
            "settings": {**lb.CENTRAL, **lb.ZO_300, "lr": 4e-4, "seed": 0, **lb.BF16,
                         "zo_estimator": "per-example", "perturbations": 16,
                         "lr_schedule": "cosine"}}
    for group in ("rt-federated-per-example-cosine", "rt-federated-per-example-cosine-k4",
                  "rt-federated-per-example-cosine-size"):
        kind, grid, runs = lb.PLANS["full"][group][:3]
        assert kind == "from-pick" and grid == "rt-central-per-example-cosine"
        assert len(runs) == 6 and {o["seed"] for _, o in runs} == set(lb.SEEDS)
        for _, o in runs:
            assert o["mask"] == str(lb.GRID_MASK)  # the grid's mask, as every bf16 run
            # the mask file is checked when the config is built; a fresh checkout has none
            settings = {k: v for k, v in {**pick["settings"], **o}.items() if k != "mask"}
            cfg = lb.planned_config(lb.with_examples(settings), Path("x"))
            assert cfg.batch_size % cfg.perturbations == 0 and cfg.clients == 10
            assert (cfg.lr, cfg.lr_schedule, cfg.zo_estimator) == (4e-4, "cosine", "per-example")
            assert cfg.client_sampling == ("size" if group.endswith("-size") else "uniform")
            per_step = 2 * cfg.batch_size * max(1, cfg.clients_per_round)
            assert cfg.rounds * cfg.local_steps * per_step == 9600


def test_the_robustness_and_size_draw_groups_change_one_thing_of_the_runs_they_check():
    """rt-federated-k4-seeds-3-5 and rt-central-bf16-seeds-3-5 are the federated recipe's and
    the centralized pick's runs at seeds 3-5 and nothing else; rt-federated-t1-size is
    rt-federated-t1 with each round's client drawn by size and nothing else."""
    lb = _learning_module()
    plan = lb.PLANS["full"]

    def by_key(group, drop=()):
        kind, grid, runs = plan[group][:3]
        assert kind == "from-pick" and grid == "rt-central-grid"
        return {(o["seed"], o.get("partition")): {k: v for k, v in o.items() if k not in drop}
                for _, o in runs}

    base, extra = by_key("rt-federated-k4", ("seed",)), by_key("rt-federated-k4-seeds-3-5",
                                                               ("seed",))
    assert {s for s, _ in extra} == set(lb.EXTRA_SEEDS) and not set(lb.EXTRA_SEEDS) & set(lb.SEEDS)
    assert all(extra[(s + 3, p)] == base[(s, p)] for s, p in base)
    central = by_key("rt-central-bf16-seeds-3-5")
    assert central == {(s, None): {**lb.BF16, "seed": s} for s in lb.EXTRA_SEEDS}
    k8 = by_key("rt-federated-k8-seeds-3-5", ("seed",))
    assert k8 == {k: {**o, "clients_per_round": 8, "batch_size": 2} for k, o in extra.items()}
    uniform, size = by_key("rt-federated-t1"), by_key("rt-federated-t1-size")
    assert size == {k: {**o, "client_sampling": "size"} for k, o in uniform.items()}
