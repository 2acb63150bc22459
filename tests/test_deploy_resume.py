"""The deployed run's server driver and site handlers in one process, with a fake FLARE that
calls the handlers directly: resume after a server crash (with the sites restarted or not),
server-side evaluation, per-round site PIDs. The real processes are in test_deploy.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from deploy_config import base_overrides
from safetensors.torch import load_file

from fedmeerkat.deploy.meerkat import site_args
from fedmeerkat.deploy.serve import serve
from fedmeerkat.deploy.site import site
from fedmeerkat.deploy.site_state import SiteStateStore

SITES = {"site-1": [0, 1], "site-2": [2]}
ROUNDS = 4
KEYS = ("round", "train_loss", "test_accuracy", "test_loss", "predicted_share", "bytes_up",
        "bytes_down", "bytes", "client_steps", "sync")


class Crash(Exception):
    pass


class FakeFlare:
    """`exchange` as the FLARE transport has it, calling the site handlers in process. With
    `crash_after`, raises once the sites have answered that round's plans (before the server
    can apply or checkpoint it)."""

    def __init__(self, handlers, crash_after: int | None = None):
        self.handlers, self.crash_after, self.tags = handlers, crash_after, []

    def exchange(self, round_idx, payloads, timeout_s=None):
        got = {s: self.handlers[s](b) for s, b in payloads.items()}
        self.tags += [b[:1] for b in payloads.values()]
        if round_idx == self.crash_after and any(b[:1] == b"T" for b in payloads.values()):
            raise Crash(f"server died after round {round_idx}'s replies")
        return got


def handlers(run_dir: Path, evaluation: str = "sites", overrides=None) -> dict:
    args = site_args(run_dir, SITES, overrides=overrides, evaluation=evaluation)
    return {s: site(s, a) for s, a in args.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A prepared run folder per downlink (rounds=ROUNDS), and the in-process run of each."""
    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run
    from fedmeerkat.runners.simulation import run

    root = tmp_path_factory.mktemp("resume")
    base = base_overrides(root, tiny_model_dir, rounds=ROUNDS)
    out = {}
    for d in ("scalars", "sparse-weights"):
        prepared = prepare_run(load_config(None, [*base, f"downlink={d}", f"out={root / d}"]),
                               quiet=True)
        local = run(load_config(None, [*base, f"downlink={d}", f"mask={prepared / 'mask.safetensors'}",
                                       f"out={root / ('local-' + d)}"]), quiet=True)["out"]
        out[d] = (prepared, Path(local))
    return out


def fresh(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def read(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(deployed: Path, local: Path) -> None:
    theta = load_file(str(deployed / "final_state.safetensors"))["theta"]
    assert torch.equal(theta, load_file(str(local / "final_state.safetensors"))["theta"])
    assert not torch.equal(theta, load_file(str(deployed / "initial_state.safetensors"))["theta"])
    a, b = read(deployed), read(local)
    assert [r["round"] for r in a] == list(range(ROUNDS + 1))  # no round twice
    assert [{k: r.get(k) for k in KEYS} for r in a] == [{k: r.get(k) for k in KEYS} for r in b]


@pytest.mark.parametrize("downlink", ["scalars", "sparse-weights"])
@pytest.mark.parametrize("sites_restart", [True, False], ids=["sites-restart", "sites-live"])
def test_resume_after_a_server_crash_is_bit_identical(runs, tmp_path, downlink, sites_restart):
    prepared, local = runs[downlink]
    run_dir = fresh(prepared, tmp_path / "run")
    hs = handlers(run_dir, overrides=None)
    with pytest.raises(Crash):  # the sites served round 3; the server never checkpointed it
        serve(FakeFlare(hs, crash_after=3), str(run_dir), SITES)
    assert [r["round"] for r in read(run_dir)] == [0, 1, 2]
    store = SiteStateStore(run_dir / "site_state" / "site-1")
    assert store.rounds() == [1, 2, 3]  # snapshots after each served round, pruned to 3
    if sites_restart:  # new site processes: they load their latest snapshot (round 3)
        hs = handlers(run_dir, overrides=["rounds=4"])
    serve(FakeFlare(hs), str(run_dir), SITES, resume=True, overrides=["rounds=4"])
    assert_same_run(run_dir, local)
    assert store.rounds() == [2, 3, 4]


def test_resume_needs_a_snapshot_before_the_plans_round(runs, tmp_path):
    prepared, _ = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES)
    store = SiteStateStore(run_dir / "site_state" / "site-1")
    assert store.rounds() == [2, 3, 4]
    # a server two rounds behind (it checkpoints every round, so this needs a lost checkpoint)
    # finds no snapshot of round 1 and says so instead of training from a wrong state
    with pytest.raises(RuntimeError, match="no snapshot before round 2"):
        store.restore_before(2, {}, reset=lambda: None)
    # while a site that first served round 3 starts its clients afresh for round 2
    other, resets = SiteStateStore(tmp_path / "other"), []
    other.save(3, {})
    assert other.restore_before(2, {}, reset=lambda: resets.append(1)) == 0 and resets


def test_server_side_evaluation_matches_the_sites_and_the_in_process_run(runs, tmp_path):
    prepared, local = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    flare = FakeFlare(handlers(run_dir, evaluation="server"))
    serve(flare, str(run_dir), SITES, evaluation="server")
    assert b"E" not in flare.tags  # no site was asked to evaluate
    assert set(flare.tags) == {b"H", b"T"}
    assert_same_run(run_dir, local)
    assert json.loads((run_dir / "summary.json").read_text())["evaluation"] == "server"


def test_metrics_record_each_sites_trainer_pid_and_times(runs, tmp_path):
    prepared, _ = runs["sparse-weights"]
    run_dir = fresh(prepared, tmp_path / "run")
    serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES)
    for r in read(run_dir)[1:]:
        assert r["site_pids"] == {"site-1": os.getpid(), "site-2": os.getpid()}
        assert set(r["site_compute_s"]) == set(SITES)
        assert all(0 < r["site_forward_s"][s] <= r["site_compute_s"][s] for s in SITES)
        assert r["exchange_s"] >= max(r["site_compute_s"].values())


def test_submit_refuses_set_without_resume_and_keys_a_resume_cannot_change(runs, tmp_path, capsys):
    from fedmeerkat.cli.main import main

    prepared, _ = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    ws = str(tmp_path / "ws")  # never reached: the options are checked first
    assert main(["deploy", "submit", ws, str(run_dir), "--site", "a=0,1,2", "--set", "rounds=5"]) == 2
    assert "--set changes a resumed run only" in capsys.readouterr().err
    assert main(["deploy", "submit", ws, str(run_dir), "--site", "a=0,1,2", "--resume",
                 "--set", "lr=0.1"]) == 2
    assert "lr: cannot change on --resume" in capsys.readouterr().err
    assert main(["deploy", "submit", ws, str(run_dir), "--site", "a=0,1,2", "--resume",
                 "--set", "rounds=5"]) == 2  # a prepared run never started has no checkpoint
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_a_site_that_lost_its_state_folder(runs, tmp_path):
    prepared, _ = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    with pytest.raises(Crash):
        serve(FakeFlare(handlers(run_dir), crash_after=2), str(run_dir), SITES)
    shutil.rmtree(run_dir / "site_state" / "site-2")
    with pytest.raises(RuntimeError, match="site site-2 holds no client state"):
        serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES, resume=True)
