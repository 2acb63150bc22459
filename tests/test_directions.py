"""Several directions a step (perturbations) and the one-sided estimator (zo.step.zo_multi_step):
forward counts, replay bit for bit from seeds and scalars, both downlinks bit-identical, the
config's refusals, and a whole simulated run on the tiny model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from fedmeerkat.config import ConfigError, build_config
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings, MeerkatServer, RoundPlan, run_client
from fedmeerkat.zo import SparseView, forwards_per_direction, replay, round_seeds, zo_multi_step
from tests.test_federated import NetModel, apply_round
from tests.test_zo_core import TinyNet, data, tiny_mask


@pytest.mark.parametrize("estimator,p", [("two-point", 3), ("one-sided", 4), ("one-sided", 1)])
def test_multi_step_counts_forwards_and_replays_bit_for_bit(estimator, p):
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net))
    x, y = data()
    theta0 = view.gather()
    theta = theta0.clone()
    seeds, steps = round_seeds(0, 1, 4 * p), 4
    lrs = [0.05 / p] * len(seeds)
    calls = []

    def loss(xb, yb):
        calls.append(1)
        return float(((net(xb) - yb) ** 2).mean())

    scalars = []
    for t in range(steps):
        xb, yb = x[4 * t:4 * t + 4], y[4 * t:4 * t + 4]
        res = zo_multi_step(view, theta, seeds[t * p:(t + 1) * p], eps=1e-2,
                            lrs=lrs[t * p:(t + 1) * p], estimator=estimator,
                            loss_fn=lambda xb=xb, yb=yb: loss(xb, yb))
        assert len(res) == p
        scalars += [r.g for r in res]
    assert len(calls) == steps * p * forwards_per_direction(estimator, p)
    # the server's replay: P consecutive seeds of lr / P each, in order
    rebuilt = replay(theta0, seeds, scalars, lrs)
    assert torch.equal(rebuilt, theta) and not torch.equal(theta, theta0)
    assert torch.equal(view.gather(), theta)  # the model holds the updated weights


def test_directions_are_estimated_at_the_same_weights():
    # every direction of a step sees theta, not theta after the step's earlier directions
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net))
    x, y = data()
    theta = view.gather()
    seen = []

    def loss():
        seen.append(view.gather().clone())
        return float(((net(x[:4]) - y[:4]) ** 2).mean())

    start = theta.clone()
    zo_multi_step(view, theta, round_seeds(0, 1, 3), eps=1e-2, lrs=[0.1] * 3,
                  estimator="one-sided", loss_fn=loss)
    assert torch.equal(seen[0], start)  # the shared baseline
    for v in seen[1:]:  # theta + eps z_i: within eps * |z| of the start, never the update
        assert (v - start).abs().max() < 1e-2 * 6


def _simulate(downlink, estimator, p, rounds=3, k=3, steps=2):
    model = NetModel(density=0.9)
    parts = np.array_split(np.arange(24), k)
    theta0 = model.view.gather()
    keep = downlink == "scalars"
    states = [ClientState(i, q, ClientDataPointer(len(q), seed=i), theta0.clone() if keep else None)
              for i, q in enumerate(parts)]
    settings = FedSettings(local_steps=steps, lr=0.05, eps=1e-2, batch_size=4, seed=1,
                           rounds=rounds, downlink=downlink, perturbations=p, estimator=estimator)
    server = MeerkatServer(settings, theta0, [len(q) for q in parts])
    for r in range(1, rounds + 1):
        replies = []
        for plan in server.plan_round(r):
            plan = RoundPlan.from_bytes(plan.to_bytes())
            assert plan.num_steps == len(plan.seeds) == steps * p
            reply = run_client(states[plan.client_id], plan, model, eps=settings.eps,
                               lr=settings.lrs(r), batch_size=4, perturbations=p,
                               estimator=estimator)
            assert len(reply.scalars) == steps * p
            replies.append(reply)
        out = apply_round(server, r, replies)
        assert not out.rejected and out.client_steps == {c: steps * p for c in range(k)}
    return server, theta0


@pytest.mark.parametrize("estimator,p", [("two-point", 2), ("one-sided", 3), ("per-example", 2),
                                         ("per-example", 4)])
def test_both_downlinks_give_the_same_model(estimator, p):
    vec, theta0 = _simulate("sparse-weights", estimator, p)
    sca, _ = _simulate("scalars", estimator, p)
    assert torch.equal(vec.theta, sca.theta) and not torch.equal(vec.theta, theta0)


def test_lr_is_split_over_the_directions_of_a_step():
    s = FedSettings(local_steps=3, lr=0.3, eps=1e-3, batch_size=1, seed=0, rounds=2,
                    lr_schedule="linear", perturbations=2)
    one = FedSettings(local_steps=3, lr=0.3, eps=1e-3, batch_size=1, seed=0, rounds=2,
                      lr_schedule="linear")
    assert s.lrs(2) == [v / 2 for v in one.lrs(2) for _ in range(2)]


def test_config_refuses_methods_of_one_direction():
    assert build_config({"perturbations": 4, "zo_estimator": "one-sided"}).perturbations == 4
    for method in ("meerkat-vp", "meerkat-feddyn", "full-fedzo", "fedavg-backprop"):
        with pytest.raises(ConfigError, match="one two-point direction"):
            build_config({"method": method, "perturbations": 2})
    with pytest.raises(ConfigError, match="wire format"):
        build_config({"local_steps": 20000, "perturbations": 4})
    with pytest.raises(ConfigError):
        build_config({"zo_estimator": "three-point"})
    settings = FedSettings(local_steps=1, lr=0.1, eps=1e-3, batch_size=1, seed=0,
                           perturbations=2)
    from fedmeerkat.federated.methods.vp import VPServer, VPSettings
    with pytest.raises(ValueError, match="one two-point direction"):
        VPServer(settings, torch.zeros(3), [1, 1], vp=VPSettings())


@pytest.mark.parametrize("estimator,p,method", [("one-sided", 3, "meerkat"),
                                                ("per-example", 2, "meerkat"),
                                                ("per-example", 4, "lora-fedzo")])
def test_a_run_with_directions_learns_and_counts_seeds(estimator, p, method, tiny_model_dir,
                                                      sentiment_csv, calib_txt, isolated_cache,
                                                      tmp_path):
    from fedmeerkat.runners.simulation import run

    cfg = build_config({
        "model": tiny_model_dir, "task": "local", "data_files": sentiment_csv,
        "template": "{sentence} so it was", "label_words": [" bad", " good"],
        "calib_corpus": calib_txt, "calib_sequences": 4, "calib_seq_len": 32, "density": 0.01,
        "clients": 2, "rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 1e-3,
        "perturbations": p, "zo_estimator": estimator, "downlink": "scalars", "method": method,
        "val_fraction": 0.0, "eval_every": 0, "out": str(tmp_path / "run")})
    run(cfg, quiet=True)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(v == 2 * p for r in records[1:] for v in r["client_steps"].values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["perturbations"] == p and summary["zo_estimator"] == estimator
    # 2 x P scalars of 4 bytes plus the header, per client per round
    assert summary["upload_bytes_per_client"] > 8 * p



def test_efficiency_benchmark_counts_forwards_to_the_plain_runs_final_validation():
    from bench_module import load_benchmark

    mod = load_benchmark("zo_efficiency")

    def rec(seed, pts):
        return {"seed": seed, "curve": [{"forwards": f, "val_auc": v, "test_auc": v - 0.01}
                                        for f, v in pts]}

    plain = [rec(0, [(0, 0.70), (200, 0.74), (400, 0.76), (600, 0.78)]),
             rec(1, [(0, 0.70), (600, 0.75)])]
    fast = [rec(0, [(0, 0.70), (200, 0.79), (400, 0.80), (600, 0.81)]),
            rec(1, [(0, 0.70), (200, 0.74), (400, 0.76), (600, 0.77)])]
    out = mod.compare(plain, {"v": fast})["v"]
    assert [r["variant_forwards"] for r in out["per_seed"]] == [200, 400]
    assert out["median_share_of_plain"] == 400 / 600 and not out["at_most_a_third_every_seed"]
    slow = [rec(0, [(0, 0.70), (600, 0.72)])]
    assert mod.compare(plain, {"s": slow})["s"]["per_seed"][0]["variant_forwards"] is None
    runs = mod.variant_runs({"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}},
        ["one-sided-p4"], (0, 1))
    assert [n for n, _ in runs] == ["one-sided-p4-seed0", "one-sided-p4-seed1"]
    c = runs[0][1]  # the budget: 3 x 40 steps x 5 forwards = 600; lr = P x the plain lr
    assert c["rounds"] * c["local_steps"] * 5 == mod.BUDGET and abs(c["lr"] - 4e-4) < 1e-12
    # the one variant outside the rule: its own lr factor, which is not a run-config key
    c2 = mod.variant_runs({"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}},
        ["one-sided-p4-lr2x"], (0,))[0][1]
    assert abs(c2["lr"] - 2e-4) < 1e-12 and "lr_factor" not in c2
    assert {k: v for k, v in c2.items() if k != "lr"} == {k: v for k, v in c.items() if k != "lr"}
    # per-example: the plain lr (the same expected step), two forwards a step, the same budget
    pe = mod.variant_runs({"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}},
        ["per-example-p16", "per-example-p16-lr2x"], (0,))
    assert [abs(c["lr"] - f * 1e-4) < 1e-12 for (_, c), f in zip(pe, (1, 2), strict=True)] == [True, True]
    assert all(c["rounds"] * c["local_steps"] * forwards_per_direction(
        c["zo_estimator"], c["perturbations"]) * c["perturbations"] == mod.BUDGET for _, c in pe)
    assert "per-example-p16" in mod.TIMED and "per-example-p16-lr2x" not in mod.TIMED
    # K = 10: one client a round, at the plain K = 10 runs' 30 rounds and evaluation points
    k10 = mod.variant_runs({"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}},
        ["one-sided-p4"], (0,), "k10")[0][1]
    assert (k10["clients"], k10["clients_per_round"], k10["partition"]) == (10, 1, "dirichlet")
    assert k10["rounds"] * k10["local_steps"] * 5 == mod.BUDGET and k10["rounds"] == 30
    assert k10["eval_every"] * k10["local_steps"] * 5 == 200
    k10pe = mod.variant_runs({"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}},
        ["per-example-p16"], (0,), "k10")[0][1]
    assert k10pe["rounds"] * k10pe["local_steps"] * 2 == mod.BUDGET and k10pe["lr"] == 1e-4
    assert k10pe["eval_every"] * k10pe["local_steps"] * 2 == 200


def test_efficiency_benchmark_keeps_unreached_records_while_it_runs(tmp_path, monkeypatch):
    """runs/ is not committed: a record that matches its planned run is read back, not run
    again, and stays in the result file while the invocation runs other runs (a crash between
    two saves loses none of them)."""
    from bench_module import load_benchmark

    mod = load_benchmark("zo_efficiency")
    lb = mod.learning
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs" / "zo_efficiency")
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    monkeypatch.setattr(mod, "PLANS", {"full": {"central": (["one-sided-p4"], (0, 1))}})
    # the config checks that the mask file exists; runs/ (which holds the grid's) is not committed
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"")
    monkeypatch.setattr(lb, "BF16", {**lb.BF16, "mask": str(mask)})
    pick = {"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}}
    monkeypatch.setattr(mod, "plain_pick", lambda: pick)
    monkeypatch.setattr(mod, "plain_run", lambda bench, group, pick, s: {
        "seed": s, "curve": [{"forwards": 0, "val_auc": 0.7}, {"forwards": 600, "val_auc": 0.75}]})
    planned = dict(mod.variant_runs(pick, ["one-sided-p4"], (0, 1)))

    def record(name, val):
        out = mod.RUNS / "central" / name
        cfg = lb.planned_config(planned[name], out)
        return {"run": str(out.relative_to(tmp_path)), **{k: getattr(cfg, k) for k in
                                                          lb.RECORD_KEYS},
                "curve": [{"forwards": 0, "steps": 0, "val_auc": 0.7},
                          {"forwards": 600, "steps": 480, "val_auc": val}]}

    (tmp_path / "zo_efficiency.json").write_text(json.dumps({"groups": {"central": {
        "variants": {"one-sided-p4": [record("one-sided-p4-seed1", 0.76)]}}}}))
    ran: list[str] = []

    class FakeBench:
        def __init__(self, threads, runs):
            pass

        def ensure(self, group, name, settings):
            ran.append(name)
            return name

        def read(self, name):
            return record(name, 0.74)

    saves: list[dict] = []
    monkeypatch.setattr(lb, "Bench", FakeBench)
    monkeypatch.setattr(mod, "save", lambda args, pick, groups, previous, started:
                        saves.append(json.loads(json.dumps(groups))))
    monkeypatch.setattr("sys.argv", ["zo_efficiency.py", "--plan", "full", "--only", "central"])
    mod.main()
    assert ran == ["one-sided-p4-seed0"]  # seed 1 is read from its record
    first = saves[0]["central"]["variants"]["one-sided-p4"]
    assert [r["curve"][-1]["val_auc"] for r in first] == [0.74, 0.76]
    assert saves[0]["central"]["comparison"]["one-sided-p4"]["per_seed"][1]["variant_forwards"] == 600


def test_efficiency_benchmark_keeps_a_group_another_invocation_wrote_meanwhile(
        tmp_path, monkeypatch):
    """Two invocations with different --only share the result file: each writes its own
    groups and takes every other group as the file holds it at the time of writing (the old
    code wrote them as they were when it started, dropping the other invocation's runs)."""
    from bench_module import load_benchmark

    mod = load_benchmark("zo_efficiency")
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    (tmp_path / "zo_efficiency.json").write_text(json.dumps({"groups": {
        "central": {"variants": {}, "from": "disk"}, "k10": {"variants": {}, "from": "disk"}}}))
    args = argparse.Namespace(plan="full", only=["central"])
    mine = {"central": {"variants": {}, "from": "me"}, "k10": {"variants": {}, "from": "start"}}
    assert {g: v["from"] for g, v in mod.merged_groups(args, mine).items()} == {
        "central": "me", "k10": "disk"}
    args.only = None  # every group of the plan is this invocation's
    assert {g: v["from"] for g, v in mod.merged_groups(args, mine).items()} == {
        "central": "me", "k10": "start"}


def test_efficiency_benchmark_device_group_runs_plain_and_variants_on_its_device(
        tmp_path, monkeypatch):
    """A device group (--plan cuda) runs its own plain runs and puts every run of the group on
    its device; the CPU groups keep reading plain from the learning benchmark and set no device.
    Its step timings are kept beside the CPU's and both are rendered."""
    from bench_module import load_benchmark

    mod = load_benchmark("zo_efficiency")
    lb = mod.learning
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs" / "zo_efficiency")
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    monkeypatch.setattr(mod, "PLANS", {**mod.PLANS, "dev": {"central-meta": (["one-sided-p4"],
                                                                             (0, 1))}})
    monkeypatch.setattr(mod, "DEVICE_GROUPS", {"central-meta": "meta"})
    pick = {"name": "zo-lr1e-4-seed0", "settings": {
        "lr": 1e-4, "rounds": 6, "local_steps": 50, "eval_every": 2, "seed": 0}}
    monkeypatch.setattr(mod, "plain_pick", lambda: pick)
    assert all("device" not in s for _, s in mod.variant_runs(pick, ["one-sided-p4"], (0,)))
    ensured: dict[str, dict] = {}

    class FakeBench:
        def __init__(self, threads, runs):
            pass

        def ensure(self, group, name, settings):
            ensured[f"{group}/{name}"] = settings
            return name

        def read(self, name):
            return {"run": name, "seed": int(name[-1]),
                    "curve": [{"forwards": 0, "steps": 0, "val_auc": 0.7},
                              {"forwards": 600, "steps": 300, "val_auc": 0.75}]}

    monkeypatch.setattr(lb, "Bench", FakeBench)
    saved: list[dict] = []
    monkeypatch.setattr(mod, "save", lambda args, pick, groups, previous, started:
                        saved.append(groups))
    monkeypatch.setattr("sys.argv", ["zo_efficiency.py", "--plan", "dev"])
    mod.main()
    assert sorted(ensured) == ["central-meta/one-sided-p4-seed0", "central-meta/one-sided-p4-seed1",
                               "central-meta/plain-seed0", "central-meta/plain-seed1"]
    assert {s["device"] for s in ensured.values()} == {"meta"}
    plain = ensured["central-meta/plain-seed1"]
    assert (plain["lr"], plain["seed"], plain["dtype"]) == (1e-4, 1, "bfloat16")
    assert ensured["central-meta/one-sided-p4-seed1"]["lr"] == 4e-4
    assert saved[-1]["central-meta"]["comparison"]["one-sided-p4"]["per_seed"][0][
        "share_of_plain"] == 1.0
    row = {"median_s": 0.01, "per_direction_s": 0.01, "x_forward": 2.0}
    md = mod.markdown({"plain": pick, "budget_forwards": 600, "lr_rule": "r", "groups": {},
                       "step_timing": {"forward": {"median_s": 0.5}, "plain": row},
                       "step_timing_cuda": {"forward": {"median_s": 0.005}, "plain": row,
                                            "device": "NVIDIA H100"}})
    assert "; cpu; weight-magnitude mask" in md and "; NVIDIA H100; weight-magnitude mask" in md
    assert "| forward | 0.005 |" in md


@pytest.mark.parametrize("argv,key,mask", [
    ([], "step_timing", "magnitude"),
    (["--timing-mask", "calibration"], "step_timing_calibration_mask", "calibration"),
    (["--device", "cuda"], "step_timing_cuda", "magnitude"),
    (["--device", "cuda", "--timing-mask", "calibration"], "step_timing_cuda_calibration_mask",
     "calibration")])
def test_efficiency_timing_writes_its_own_key_and_keeps_the_others(tmp_path, monkeypatch, argv,
                                                                   key, mask):
    """--timing-only writes one step timing under a key named by its device and mask, keeps
    every other key of the result file, and renders the mask it timed on."""
    from bench_module import load_benchmark

    mod = load_benchmark("zo_efficiency")
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    written: list[dict] = []
    monkeypatch.setattr(mod, "write_result", lambda name, data: written.append(data))
    row = {"median_s": 0.01, "per_direction_s": 0.01, "x_forward": 2.0}
    old = {"step_timing": {"forward": {"median_s": 0.5}, "plain": row}, "groups": {"g": 1}}
    (tmp_path / "zo_efficiency.json").write_text(json.dumps(old))
    monkeypatch.setattr(mod, "step_timing", lambda device, mask: {
        "mask": mask, "forward": {"median_s": 0.4}, "plain": row})
    monkeypatch.setattr(mod, "device_name", lambda device: device)
    monkeypatch.setattr("sys.argv", ["zo_efficiency.py", "--timing-only", *argv])
    monkeypatch.setattr(mod, "markdown", lambda data: "")
    monkeypatch.setattr(mod.learning, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    mod.main()
    data = written[-1]
    assert data[key]["mask"] == mask and data["groups"] == {"g": 1}
    if key != "step_timing":
        assert data["step_timing"] == old["step_timing"]
