"""experiments/: the claims suite end to end on a tiny model (every stage, the lr pick, the
shared zero-shot evaluation, resuming without re-running), and the verdict rules of
results_md on results where each claim holds and where it does not."""

from __future__ import annotations

import copy
import json

import pytest

from experiments import claims, results_md


def _suite(tmp_path, tiny_model_dir, sentiment_csv, calib_txt):
    text = f"""
[base]
model = "{tiny_model_dir}"
clients = 3
partition = "dirichlet-client"
alpha = 0.5
weighting = "uniform"
rounds = 2
local_steps = 2
batch_size = 4
eps = 1e-3
density = 0.01
calib_corpus = "{calib_txt}"
calib_sequences = 4
calib_seq_len = 32
eval_every = 0
lora_rank = 2
z_cache_mb = 64
vp_calibration = "round"
vp_calibration_steps = 2
vp_init_steps = 1
vp_later_steps = 1
vp_gradip_units = "raw"

[tasks.local]
data_files = "{sentiment_csv}"
template = "{{sentence}} so it was"
label_words = [" bad", " good"]

[suite]
seeds = [0, 1]
select_task = "local"
gradip_steps = 3
gradip_label = 0

[grids]
meerkat = [1e-3, 1e-2]
random-mask = [1e-2]
magnitude-mask = [1e-2]
lora-fedzo = [1e-2]
full-fedzo = [1e-4]
"""
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_suite_runs_every_claim_and_resumes_without_rerunning(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    spec = _suite(tmp_path, tiny_model_dir, sentiment_csv, calib_txt)
    runs, out = tmp_path / "runs", tmp_path / "claims.json"
    argv = ["--config", str(spec), "--runs", str(runs), "--out", str(out)]
    assert claims.main(argv) == 0
    data = json.loads(out.read_text())
    recs = data["runs"]
    # the pick is the grid run with the lowest last-round training loss
    grid = {r["lr"]: r["final_train_loss"] for r in recs
            if r["stage"] == "grid" and r["arm"] == "meerkat"}
    assert data["picks"]["meerkat"]["lr"] == min(grid, key=grid.get) and len(grid) == 2
    claim1 = [r for r in recs if r["stage"] == "claim1"]
    assert {(r["arm"], r["seed"]) for r in claim1} == {(a, s) for a in claims.ARMS for s in (0, 1)}
    assert len({r["forwards"] for r in claim1}) == 1  # the same forward budget for every arm
    assert claim1[0]["forwards"] == 2 * 3 * 2 * 2
    kinds = {r["arm"]: (r["method"], r["mask_kind"]) for r in claim1}
    assert kinds["random-mask"] == ("meerkat", "random")
    assert kinds["magnitude-mask"] == ("meerkat", "weight-magnitude")
    # every run of a seed starts from the one shared zero-shot evaluation
    for s in (0, 1):
        assert len({r["initial_auc"] for r in recs if r["seed"] == s}) == 1
    claim3 = [r for r in recs if r["stage"] == "claim3"]
    assert {r["method"] for r in claim3} == {"meerkat-vp", "meerkat-random-select"}
    assert all(r["lr"] == data["picks"]["meerkat"]["lr"] for r in claim3)
    assert len(data["gradip"]) == 2 and all(len(c["gradip"]) == 3
                                            for g in data["gradip"] for c in g["clients"])
    assert data["versions"]["torch"] and data["machine"]["cpu_count"]
    # the budget printed before the start is what ran (VP runs fewer steps after calibrating)
    n_runs, forwards = claims.Suite(json.loads(json.dumps(data["suite"])), runs, {}).planned(
        list(claims.STAGES))
    assert n_runs == len({r["run"] for r in recs})
    assert forwards >= sum({r["run"]: r["forwards"] for r in recs}.values())

    assert not list(runs.rglob("checkpoint*.safetensors"))  # finished runs keep no resume state
    summaries = sorted(runs.rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert claims.main(argv) == 0  # everything done: read back, nothing run again
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert json.loads(out.read_text())["runs"] == recs
    assert data["complete"] and data["runs_read_from_the_previous_result"] == []

    # a checkout without the run folders (runs/ is not committed) reads the result file's
    # records instead of running again; another suite's file is not read
    import shutil

    shutil.rmtree(runs)
    real_run, real_gradip = claims.run, claims.run_gradip
    claims.run = claims.run_gradip = lambda *a, **k: pytest.fail("ran again")
    try:
        assert claims.main(argv) == 0
        again = json.loads(out.read_text())
        assert again["runs"] == recs and again["gradip"] == data["gradip"]
        assert len(again["runs_read_from_the_previous_result"]) == len(
            {r["run"] for r in recs}) + len(data["gradip"])
        with pytest.raises(pytest.fail.Exception, match="ran again"):
            claims.main([*argv, "--set", "rounds=3"])
    finally:
        claims.run, claims.run_gradip = real_run, real_gradip

    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    assert results_md.main(["--claims", str(out), "--out", str(page)]) == 0
    text = page.read_text()
    assert "## Which claims held" in text and "Claim 2" in text
    assert (page.parent / "results_claims13.png").stat().st_size > 0
    assert (page.parent / "results_claim2.png").stat().st_size > 0


def test_restricted_invocations_add_up_to_the_suite(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    """--seeds and --arms run part of the claim stages; each invocation keeps what the
    earlier ones recorded, and the result is complete only once it holds the whole suite."""
    spec = _suite(tmp_path, tiny_model_dir, sentiment_csv, calib_txt)
    runs, out = tmp_path / "runs", tmp_path / "claims.json"
    argv = ["--config", str(spec), "--runs", str(runs), "--out", str(out)]
    suite = claims.Suite(claims.tomllib.loads(spec.read_text()), runs, {})
    suite.seeds, suite.arms = [1], ["meerkat"]
    # the grid of meerkat alone (2 lrs), then one claim1 run; 24 forwards a run
    assert suite.planned(["grid", "claim1"]) == (2 + 1, 3 * 2 * 3 * 2 * 2)
    assert claims.main([*argv, "--stages", "grid", "claim3", "--seeds", "0"]) == 0
    first = json.loads(out.read_text())
    assert {(r["stage"], r["seed"]) for r in first["runs"]} == {("grid", 0), ("claim3", 0)}
    assert not first["complete"] and first["seeds"] == [0]
    assert claims.main([*argv, "--stages", "claim1", "--seeds", "1", "--arms", "meerkat"]) == 0
    second = json.loads(out.read_text())
    have = {(r["stage"], r["arm"], r["seed"]) for r in second["runs"]}
    assert ("claim1", "meerkat", 1) in have and ("claim3", "meerkat-vp", 0) in have
    assert ("claim1", "random-mask", 1) not in have and not second["complete"]
    assert [r for r in second["runs"] if r["stage"] == "claim3"] == [
        r for r in first["runs"] if r["stage"] == "claim3"]
    assert claims.main(argv) == 0  # the rest: now the whole suite
    whole = json.loads(out.read_text())
    assert whole["complete"] and len(whole["commands"]) == 3  # each invocation named
    assert "--arms meerkat" in whole["commands"][1] and whole["command"] == whole["commands"][-1]
    with pytest.raises(SystemExit, match="suite's seeds"):
        claims.main([*argv, "--seeds", "7"])
    with pytest.raises(SystemExit, match="name meerkat too"):
        claims.main([*argv, "--arms", "lora-fedzo", "--stages", "claim3"])


def test_invocations_at_the_same_time_merge_their_records(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    """Two invocations on disjoint runs of one suite share the result file: while the first
    is inside a run, the second runs and writes; the first's later writes keep its records."""
    spec = _suite(tmp_path, tiny_model_dir, sentiment_csv, calib_txt)
    runs, out = tmp_path / "runs", tmp_path / "claims.json"
    argv = ["--config", str(spec), "--runs", str(runs), "--out", str(out)]
    real, meanwhile = claims.run, []

    def run_while_another_invocation_writes(cfg, **kw):
        real(cfg, **kw)
        if not meanwhile:
            meanwhile.append(1)
            assert claims.main([*argv, "--stages", "grid", "--arms", "lora-fedzo"]) == 0

    claims.run = run_while_another_invocation_writes
    try:
        assert claims.main([*argv, "--stages", "claim1", "--seeds", "1", "--arms", "meerkat"]) == 0
    finally:
        claims.run = real
    data = json.loads(out.read_text())
    have = {(r["stage"], r["arm"], r["seed"]) for r in data["runs"]}
    assert {("grid", "lora-fedzo", 0), ("grid", "meerkat", 0), ("claim1", "meerkat", 1)} <= have
    assert set(data["picks"]) == {"meerkat", "lora-fedzo"} and not data["complete"]


def _run(arm, stage, seed, initial, final):
    return {"arm": arm, "stage": stage, "seed": seed, "task": "t", "lr": 1e-3, "forwards": 8,
            "wall_seconds": 1.0, "vp_early_stopped": [],
            **{f"{w}_{m}": v for w, v in (("initial", initial), ("final", final))
               for m in ("accuracy", "auc", "best_shift_accuracy", "macro_f1")}}


def _data(meerkat_gain, vp_gain, single_drops):
    runs = []
    for s in (0, 1, 2):
        for arm in results_md.CLAIM1:
            runs.append(_run(arm, "claim1", s, 0.7, 0.7 + (meerkat_gain if arm == "meerkat" else 0.0)))
        runs.append(_run("meerkat-vp", "claim3", s, 0.7, 0.7 + vp_gain))
        runs.append(_run("random-select", "claim3", s, 0.7, 0.7))
    decaying = [8.0, 8.0, 4.0, 4.0, 1.0, 1.0]
    flat = [3.0, 2.0, 3.0, 2.0, 3.0, 2.0]
    gradip = [{"task": "t", "seed": s, "wall_seconds": 1.0,
               "clients": [{"name": "iid", "gradip": flat},
                           {"name": "single-label", "gradip": decaying if single_drops else flat}]}
              for s in (0, 1, 2)]
    spec = {"base": {"clients": 3, "rounds": 1, "local_steps": 1, "partition": "iid", "alpha": 1,
                     "weighting": "uniform", "batch_size": 1, "eps": 1e-3, "density": 1e-3,
                     "max_test": 10},
            "tasks": {"t": {}}, "suite": {"seeds": [0, 1, 2], "select_task": "t",
                                           "gradip_steps": 6, "gradip_label": 0}}
    return {"runs": runs, "gradip": gradip, "suite": spec, "suite_file": "x.toml", "command": "c",
            "versions": {"python": "3", "torch": "t", "transformers": "x"},
            "machine": {"processor": "p", "cpu_count": 2, "torch_threads": 2}, "picks": {}}


@pytest.mark.parametrize("holds", [True, False])
def test_verdicts_follow_the_stated_rules(holds, tmp_path):
    data = _data(0.05 if holds else -0.01, 0.08 if holds else 0.0, holds)
    text = results_md.render(copy.deepcopy(data), tmp_path, ".")
    summary = text.split("## Which claims held")[1]
    word = "t: held" if holds else "t: not held"
    assert summary.count(word) == 3, summary
    if holds:  # one seed against is enough to fail: "beats" and "learns" need every seed
        mk = next(r for r in data["runs"] if r["arm"] == "meerkat" and r["seed"] == 1)
        mk["final_auc"] = 0.69
        lines = results_md.render(data, tmp_path, ".").split("## Which claims held")[1]
        claim1 = next(x for x in lines.splitlines() if x.startswith("- Claim 1"))
        assert claim1.endswith("t: not held.")


def test_a_suite_cut_to_fewer_seeds_says_at_which_seeds_it_judged(tmp_path):
    data = _data(0.05, 0.08, True)
    data["runs"] = [r for r in data["runs"] if r["arm"] == "meerkat" or r["seed"] == 0]
    text = results_md.render(data, tmp_path, ".")
    assert "**Seeds run** (cut to fit this CPU" in text
    assert "| t | yes | yes (seed 0) |" in text  # Meerkat learns at all 3, beats at seed 0
    summary = text.split("## Which claims held")[1]
    assert "- Claim 1 (" in summary and "t: held (judged at seed 0)." in summary
    assert "t: held." in summary  # Claim 2 ran at every seed


def test_gradip_drop_is_first_third_over_last_third():
    assert results_md.gradip_drop([6, 6, 3, 3, 1, -1]) == 6.0
    assert results_md.gradip_drop([1, 1, 1]) == 1.0


def test_pick_reads_validation_when_the_suite_has_it(tmp_path):
    spec = {"base": {}, "tasks": {}, "suite": {"select_task": "t", "seeds": [0]},
            "grids": {arm: [1e-4] for arm in claims.ARMS}}
    suite = claims.Suite(spec, tmp_path, {})
    rec = {"stage": "grid", "arm": "meerkat"}
    suite.records = [{**rec, "lr": 1e-4, "final_train_loss": 0.70, "final_val_metric": 0.80},
                     {**rec, "lr": 1e-3, "final_train_loss": 0.50, "final_val_metric": 0.60}]
    assert suite.pick("meerkat")["lr"] == 1e-4  # training loss would take 1e-3
    for r in suite.records:
        r["final_val_metric"] = None  # no validation set: the training-loss rule
    assert suite.pick("meerkat")["lr"] == 1e-3


@pytest.mark.parametrize("name", ["cpu.toml", "gpu.toml", "cpu_learning.toml"])
def test_shipped_suites_resolve_and_state_their_budget(name, tmp_path):
    """Every run a shipped suite file plans builds a valid config (no model loaded), and the
    planned budget is the runs it will make: gpu.toml at the paper's scale of steps."""
    import tomllib
    from pathlib import Path

    spec = tomllib.loads((Path(claims.ROOT) / "experiments" / name).read_text())
    suite = claims.Suite(spec, tmp_path, {})
    for task in suite.tasks:
        for arm, extra in {**claims.ARMS, **claims.VP_ARMS}.items():
            lrs = suite.grids.get(arm, suite.grids["meerkat"])
            cfg = suite.config(task, suite.suite["seeds"][0], {**extra, "lr": lrs[0]}, tmp_path)
            assert cfg.lr == lrs[0]
    n_runs, forwards = suite.planned(list(claims.STAGES))
    if name == "gpu.toml":
        b = spec["base"]
        assert b["clients"] == 10 and b["rounds"] * b["local_steps"] >= 500
        assert b["batch_size"] == 16 and b["val_fraction"] > 0
        assert (n_runs, forwards) == (8, 8 * 10 * 500 * 2)
    elif name == "cpu_learning.toml":  # the learning benchmark's federated budget
        assert spec["base"]["val_fraction"] > 0 and (n_runs, forwards) == (26, 26 * 600)
    else:
        assert n_runs == 57  # the committed claims.json's run count


def test_vp_detection_is_read_off_claim2s_trajectories_at_both_calibrations():
    """A single-label trajectory that decays over 100 steps (and not over the suite's first
    10) is flagged at the paper's calibration only; the IID one at neither."""
    decay = [20.0] * 20 + [10.0] * 60 + [2.0] * 20
    data = {"gradip": [{"task": "t", "seed": 0, "calib_grad_norm": 1.0, "clients": [
        {"name": "iid", "gradip": [3.0, -3.0] * 50},
        {"name": "single-label", "gradip": decay}]}]}
    base = {"vp_calibration_steps": 10, "vp_init_steps": 5, "vp_later_steps": 5,
            "vp_threshold": 1.0, "vp_gradip_units": "raw", "clients": 10, "rounds": 30,
            "local_steps": 10, "clients_per_round": 1}
    rows = [r for r in results_md.vp_on_claim2(data, base) if r.startswith("| this") or
            r.startswith("| the paper")]
    flagged = {(r.split(" | ")[0], r.split(" | ")[4]): r.endswith("yes |") for r in rows}
    assert flagged == {("| this suite (seed 0)", "iid"): False,
                       ("| this suite (seed 0)", "single-label"): False,
                       ("| the paper (seed 0)", "iid"): False,
                       ("| the paper (seed 0)", "single-label"): True}
    assert "2,000 forwards before training" in results_md.vp_on_claim2(data, base)[-1]


def test_vp_detection_paragraph_says_at_which_seeds_the_paper_calibration_flags():
    """Over every seed: flagged at each seed reads as the budget Claim 3 needs; flagged at some
    only says the paper's calibration is not enough (seeds 1 and 2 of the committed run)."""
    decay = [20.0] * 20 + [10.0] * 60 + [2.0] * 20

    def data(single_label_at_seed1: list[float]) -> dict:
        return {"gradip": [{"task": "t", "seed": s, "calib_grad_norm": 1.0, "clients": [
            {"name": "iid", "gradip": [3.0, -3.0] * 50},
            {"name": "single-label", "gradip": g}]}
            for s, g in ((1, single_label_at_seed1), (0, decay))]}  # stored out of order

    base = {"vp_calibration_steps": 10, "vp_init_steps": 5, "vp_later_steps": 5,
            "vp_threshold": 1.0, "vp_gradip_units": "raw", "clients": 10, "rounds": 30,
            "local_steps": 10, "clients_per_round": 1}
    both = results_md.vp_on_claim2(data(decay), base)[-1]
    assert "flagged at seeds 0, 1 of 0, 1" in both and "the budget Claim 3 needs" in both
    one = results_md.vp_on_claim2(data([3.0, -3.0] * 50), base)[-1]
    assert "flagged at seed 0 of 0, 1" in one and "needs more than the paper's calibration" in one
    assert "at seeds 0 / 1" in one  # the rows and ratios in seed order


def test_a_run_diverges_by_its_last_tenth_of_rounds_not_one_noisy_round():
    # one client a round: a single round's loss swings with the client (0.09 against 0.66)
    noisy = [0.66, 0.6, 0.62, 0.58, 0.6, 0.57, 0.55, 0.56, 0.54, 0.09] * 2 + [0.5] * 9 + [0.9]
    assert not results_md.diverged(noisy)
    rising = [0.6] * 27 + [0.8, 0.9, 0.85]
    assert results_md.diverged(rising)
    assert not results_md.diverged([]) and not results_md.diverged(None)
    assert results_md.diverged([0.5, None, 0.7]) and not results_md.diverged([None])
    assert results_md.diverged([0.5, 0.7]) and not results_md.diverged([0.5, 0.55])
