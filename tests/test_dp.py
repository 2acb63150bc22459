"""Differential privacy of the uploaded scalars (federated/dp.py): the accountant against
dp-accounting's own reference values, the clip's bound on one example's influence, the secret
generator, the budget stop and a private run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmeerkat.cli.main import main
from fedmeerkat.config import ConfigError, build_config
from fedmeerkat.federated.dp import (
    RNG_KEY,
    BudgetExhausted,
    DPSettings,
    PrivacyLedger,
    PrivateSteps,
    epsilon_spent,
    solve_noise_multiplier,
)


def test_epsilon_matches_the_libraries_reference_values():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    # dp-accounting's rdp_privacy_accountant_test: RDP of 50 Poisson-subsampled Gaussian steps
    # (q = 0.01, sigma = 2.5) at these orders, computed there by numerical integration
    orders = [1.5, 2.5, 5, 50, 100]
    reference_rdp = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02,
                     1.67416308e02]
    want = compute_epsilon(orders, reference_rdp, 1e-5)[0]
    assert epsilon_spent(0.01, 2.5, 50, 1e-5, orders=orders) == pytest.approx(want, rel=1e-4)
    # and their Gaussian whose noise multiplier gives exactly (1, 1e-6)-DP in one step
    fine = [0.001 * i for i in range(1000, 100000)]
    assert epsilon_spent(1.0, 4.530877117, 1, 1e-6, orders=fine) == pytest.approx(1.0, abs=1e-6)
    assert epsilon_spent(0.01, 2.5, 0, 1e-5) == 0.0


def test_solved_noise_multiplier_meets_the_budget_tightly():
    sigma = solve_noise_multiplier(0.05, 200, 3.0, 1e-3)
    assert epsilon_spent(0.05, sigma, 200, 1e-3) <= 3.0
    assert epsilon_spent(0.05, sigma * 0.97, 200, 1e-3) > 3.0  # a smaller sigma would not do


def _twins(extra_state: dict, settings: DPSettings, batch: int):
    """Two PrivateSteps whose generators are in the same state (the same noise to come)."""
    a = PrivateSteps(settings, batch, dict(extra_state))
    b = PrivateSteps(settings, batch, {})
    b.gen.set_state(a.gen.get_state())
    return a, b


def test_the_clip_bounds_every_examples_influence_on_the_scalar():
    dp = DPSettings(clip=0.5, noise_multiplier=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.normal(0, 3, size=16)
        other = d.copy()
        other[rng.integers(16)] = rng.normal(0, 1e6)  # one example changed arbitrarily
        a, b = _twins({}, dp, 16)  # replacing one example: at most 2C / B (C to -C)
        assert abs(a.scalar(d) - b.scalar(other)) <= 2 * dp.clip / 16 + 1e-12
        a, b = _twins({}, dp, 16)  # removing one (the accountant's neighbours): at most C / B
        assert abs(a.scalar(d) - b.scalar(np.delete(d, 3))) <= dp.clip / 16 + 1e-12


def test_each_client_adds_the_noise_of_its_own_sigma():
    dp = DPSettings(clip=1.0, noise_multiplier=0.0, noise_multipliers=(0.5, 4.0))
    zeros = np.zeros(4)
    spread = [np.std([PrivateSteps(dp, 4, {}, k).scalar(zeros) for _ in range(2000)])
              for k in (0, 1)]
    assert spread == pytest.approx([0.5 / 4, 4.0 / 4], rel=0.1)
    with pytest.raises(ValueError, match="client 2 has no"):
        dp.sigma(2)
    with pytest.raises(ValueError, match="positive"):
        DPSettings(clip=1.0, noise_multiplier=1.0, noise_multipliers=(1.0, 0.0))


def test_noise_is_os_seeded_and_continues_from_the_saved_state():
    dp = DPSettings(clip=1.0, noise_multiplier=1.0)
    zeros = np.zeros(4)
    a, b = PrivateSteps(dp, 4, {}), PrivateSteps(dp, 4, {})
    assert a.scalar(zeros) != b.scalar(zeros)  # fresh generators: not from the run seed
    extra: dict[str, torch.Tensor] = {}
    first = PrivateSteps(dp, 4, extra)
    first.scalar(zeros)
    first.save()
    nxt = first.scalar(zeros)
    assert PrivateSteps(dp, 4, {RNG_KEY: extra[RNG_KEY]}).scalar(zeros) == nxt


def test_poisson_batches_have_the_expected_size():
    p = PrivateSteps(DPSettings(clip=1.0, noise_multiplier=1.0), 16, {})
    sizes = [len(p.batch(400)) for _ in range(400)]
    assert abs(np.mean(sizes) - 16) < 0.6 and min(sizes) < 16 < max(sizes)
    b = p.batch(400)
    assert len(np.unique(b)) == len(b) and b.min() >= 0 and b.max() < 400


def test_the_ledger_refuses_a_round_that_would_pass_the_budget():
    ledger = PrivacyLedger(DPSettings(clip=1.0, noise_multiplier=0.8, epsilon=2.0), 4,
                           [40, 80, 60])
    ledger.charge({0: 5, 1: 5})
    spent = ledger.spent()
    assert 0 < spent["1"] < spent["0"] <= 2.0  # the smaller client samples at a higher rate
    assert spent["2"] == 0.0  # a client not drawn yet is listed, having spent nothing
    with pytest.raises(BudgetExhausted, match="clients \\[0"):
        for _ in range(100):
            ledger.charge({0: 5, 1: 5})
    assert all(e <= 2.0 for e in ledger.spent().values())  # the refused round was not counted


def test_bad_dp_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="dp_clip: method=meerkat-vp"):
        build_config({"method": "meerkat-vp", "dp_clip": 1.0, "dp_epsilon": 8})
    with pytest.raises(ConfigError, match="set dp_clip > 0"):
        build_config({"dp_epsilon": 8})
    with pytest.raises(ConfigError, match="needs dp_noise_multiplier"):
        build_config({"dp_clip": 1.0})
    with pytest.raises(ConfigError, match="perturbations=1"):
        build_config({"dp_clip": 1.0, "dp_epsilon": 3, "perturbations": 2})
    with pytest.raises(ConfigError, match="dp_clip: needs loss=ce"):
        build_config({"dp_clip": 1.0, "dp_epsilon": 3, "loss": "centered-ce"})
    with pytest.raises(ConfigError, match="dp_delta"):
        build_config({"dp_clip": 1.0, "dp_epsilon": 3, "dp_delta": 1.5})
    with pytest.raises(ConfigError, match="dp_noise_multipliers: expected 2 positive"):
        build_config({"dp_clip": 1.0, "clients": 2, "dp_noise_multipliers": [1.0, -1.0]})
    with pytest.raises(ConfigError, match="not both"):
        build_config({"dp_clip": 1.0, "clients": 2, "dp_noise_multipliers": [1.0, 1.0],
                      "dp_noise_multiplier": 1.0})
    assert build_config({"dp_clip": 1.0, "clients": 2, "dp_noise_multipliers": [1, 2.5]})


def _args(tiny_model_dir, sentiment_csv, calib_txt, out, *extra):
    return ["run", f"model={tiny_model_dir}", "task=local", f"data_files={sentiment_csv}",
            "template={sentence} so it was", "label_words=[' bad',' good']",
            f"calib_corpus={calib_txt}", "calib_sequences=4", "calib_seq_len=32",
            "density=0.01", "clients=2", "local_steps=3", "batch_size=4", "lr=1e-3",
            "partition=iid", "val_fraction=0", "eval_every=0", f"out={out}", "--quiet", *extra]


def test_a_private_run_reports_each_clients_epsilon_within_its_budget(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    out = tmp_path / "dp"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "rounds=3", "dp_clip=1.0",
                      "dp_epsilon=8")) == 0
    summary = json.loads((out / "summary.json").read_text())
    dp = summary["dp"]
    assert dp["noise_multiplier"] > 0 and 0 < dp["epsilon_spent_max"] <= 8
    assert set(dp["epsilon_spent"]) == {"0", "1"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"]["0"] for r in lines[1:]]
    # the batch loss would be an unnoised statistic: private clients report none
    assert [r["train_loss"] for r in lines[1:]] == [None] * 3
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp["epsilon_spent"]["0"])
    assert "dp_noise_multipliers = [" in (out / "config.toml").read_text()  # solved, then kept
    from fedmeerkat.report.table import run_report

    assert "epsilon spent per client: 0: " in run_report(out)


def test_sigma_is_solved_per_client_for_the_steps_its_seeded_participation_plans(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    """One client a round: each client's sigma is solved for the rounds it is drawn for, not
    for every round, so each spends its whole budget by the end and no more."""
    from fedmeerkat.config import load_config

    out = tmp_path / "sampled"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "rounds=5",
                      "clients_per_round=1", "dp_clip=1.0", "dp_epsilon=4")) == 0
    cfg = load_config(out / "config.toml")
    ran = {k: 0 for k in range(2)}
    for r in [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]:
        for k, n in r["client_steps"].items():
            ran[int(k)] += n
    assert 0 < ran[0] != ran[1] > 0  # the draw gives the two clients different step counts
    sigmas = cfg.dp_noise_multipliers
    assert len(sigmas) == 2 and (sigmas[0] < sigmas[1]) == (ran[0] < ran[1])
    spent = json.loads((out / "summary.json").read_text())["dp"]["epsilon_spent"]
    assert all(3.99 < spent[str(k)] <= 4.0 for k in range(2))  # tight: the whole budget


def test_the_budget_stops_the_run_with_exit_3_and_a_larger_one_resumes_it(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "budget"
    args = _args(tiny_model_dir, sentiment_csv, calib_txt, out, "rounds=6", "dp_clip=1.0",
                 "dp_noise_multiplier=0.7", "dp_epsilon=2.5")
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dp_epsilon" in err and "--resume" in err
    stopped = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= stopped[-1]["round"] < 6 and max(stopped[-1]["dp_epsilon"].values()) <= 2.5
    assert main(["run", "--resume", str(out), "dp_epsilon=1000", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6


def test_a_resumed_private_run_is_bit_identical(tiny_model_dir, sentiment_csv, calib_txt,
                                                 isolated_cache, tmp_path, monkeypatch):
    """The secret generator's state travels in the checkpoint: with the OS seed fixed for the
    test, a run stopped after round 2 and resumed ends where the uninterrupted run does."""
    import secrets

    from safetensors.torch import load_file

    import fedmeerkat.runners.run_folder as rf

    monkeypatch.setattr(secrets, "randbits", lambda k: 12345)
    extra = ("rounds=4", "dp_clip=1.0", "dp_noise_multiplier=1.0", "downlink=scalars")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, full, *extra)) == 0
    real = rf.save_checkpoint

    def crash_after_round_2(out, server, states, *rest):
        real(out, server, states, *rest)
        if server.round == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rf, "save_checkpoint", crash_after_round_2)
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, cut, *extra)) == 130
    monkeypatch.setattr(rf, "save_checkpoint", real)
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    a = load_file(str(full / "final_state.safetensors"))["theta"]
    b = load_file(str(cut / "final_state.safetensors"))["theta"]
    assert torch.equal(a, b)


def test_the_utility_benchmark_picks_the_clip_on_validation_only():
    from bench_module import load_benchmark

    mod = load_benchmark("dp_utility")

    def rec(val_end, test_end):
        return {"curve": [{"forwards": 0, "steps": 0, "val_auc": 0.70, "test_auc": 0.70},
                          {"forwards": 600, "steps": 300, "val_auc": val_end,
                           "test_auc": test_end}]}

    # the best test gain (C = 100) loses to the best validation gain (C = 10)
    assert mod.picked_clip([rec(0.71, 0.70), rec(0.75, 0.72), rec(0.73, 0.90)]) == 10.0
    assert mod.picked_clip([rec(0.71, 0.70)]) is None  # not all clips have run
    runs = mod.plan(10.0)
    assert [len(runs[g]) for g in ("clip", "central", "k10")] == [3, 9, 12]
    assert all(c["dp_clip"] == 10.0 and c["dp_epsilon"] in (8.0, 3.0, 1.0)
               for _, c in runs["central"])
    assert sum("dp_clip" not in c for _, c in runs["k10"]) == 3  # the non-private K = 10 runs
    # before C is picked only what does not depend on it is planned
    assert {g: len(r) for g, r in mod.plan(None).items()} == {"clip": 3, "k10": 3}
