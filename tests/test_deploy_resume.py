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
    # the sites' evaluation reports test metrics only: no validation, so no best state
    assert not (run_dir / "best_state.safetensors").exists()


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
    # the server's evaluation scores validation too, so it keeps the in-process run's best
    # round's state, bit for bit
    best = [load_file(str(d / "best_state.safetensors"))["theta"] for d in (run_dir, local)]
    assert torch.equal(best[0], best[1])
    picked = [json.loads((d / "summary.json").read_text())["best_val_round"]
              for d in (run_dir, local)]
    assert picked[0] == picked[1] > 0, picked  # a trained round, not the untrained values


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
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')  # as a job that ran there
    assert main(["deploy", "submit", ws, str(run_dir), "--site", "a=0,1,2"]) == 2
    assert "has run a job already" in capsys.readouterr().err


def test_resume_refuses_a_site_that_lost_its_state_folder(runs, tmp_path):
    prepared, _ = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    with pytest.raises(Crash):
        serve(FakeFlare(handlers(run_dir), crash_after=2), str(run_dir), SITES)
    shutil.rmtree(run_dir / "site_state" / "site-2")
    with pytest.raises(RuntimeError, match="site site-2 holds no client state"):
        serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES, resume=True)


# ---- issue 21: sites behind the server, damaged snapshots, the run folder's lock -----------

def _served_then_restarted(runs, tmp_path, downlink, crash_after=None, rounds=ROUNDS):
    """A deployed run (crashed after `crash_after`'s replies, or finished) and site handlers
    restarted with `rounds` (they load their latest snapshot at hello)."""
    prepared, local = runs[downlink]
    run_dir = fresh(prepared, tmp_path / "run")
    if crash_after is None:
        serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES)
    else:
        with pytest.raises(Crash):
            serve(FakeFlare(handlers(run_dir), crash_after=crash_after), str(run_dir), SITES)
    return run_dir, local


@pytest.mark.parametrize("downlink", ["scalars", "sparse-weights"])
def test_resume_refuses_a_site_whose_state_is_older_than_its_rounds(runs, tmp_path, downlink):
    run_dir, _ = _served_then_restarted(runs, tmp_path, downlink)
    store = SiteStateStore(run_dir / "site_state" / "site-1")
    assert store.rounds() == [2, 3, 4]
    store.path(4).unlink()  # the folder rolled back one snapshot: its clients took part in 4
    with pytest.raises(RuntimeError) as e:
        serve(FakeFlare(handlers(run_dir, overrides=["rounds=5"])), str(run_dir), SITES,
              resume=True, overrides=["rounds=5"])
    msg = str(e.value)
    assert "\n" not in msg and "site site-1" in msg and "round 3" in msg and "round 4" in msg
    assert [r["round"] for r in read(run_dir)] == list(range(ROUNDS + 1))  # nothing trained


def test_a_site_whose_clients_sat_out_may_resume_from_older_state():
    """Partial participation: only rounds a site's clients' replies were applied in count."""
    from types import SimpleNamespace

    from fedmeerkat.deploy.serve import check_sites_resumed

    server = SimpleNamespace(round=5, applied=[3, 0, 5])
    hello = {"a": {"clients": {"0": 9, "1": 9}, "served": 3, "state_dir": "A"},
             "b": {"clients": {"2": 9}, "served": 5, "state_dir": "B"}}
    check_sites_resumed(server, hello)  # a sat out rounds 4 and 5: its state at 3 is current
    hello["a"]["served"] = 2
    with pytest.raises(RuntimeError, match="site a holds client state of round 2 .*client 0 "
                                           "took part in round 3"):
        check_sites_resumed(server, hello)
    hello["a"]["served"] = 0
    with pytest.raises(RuntimeError, match="site a holds no client state"):
        check_sites_resumed(server, hello)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: it reads, the checksum does not match
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte])
def test_a_damaged_site_snapshot_falls_back_to_the_one_before(runs, tmp_path, capsys, damage):
    # the server checkpointed round 2, the sites served 3: losing the site's round 3 is fine
    run_dir, local = _served_then_restarted(runs, tmp_path, "scalars", crash_after=3)
    store = SiteStateStore(run_dir / "site_state" / "site-1")
    damage(store.path(3))
    capsys.readouterr()
    hs = handlers(run_dir, overrides=["rounds=4"])
    serve(FakeFlare(hs), str(run_dir), SITES, resume=True, overrides=["rounds=4"])
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "round_000003" in ln]
    assert len(warned) == 1 and "warning" in warned[0] and "round 2" in warned[0], warned
    assert_same_run(run_dir, local)


def test_a_fallback_behind_the_rounds_a_site_took_part_in_is_refused(runs, tmp_path):
    run_dir, _ = _served_then_restarted(runs, tmp_path, "scalars", crash_after=3)
    store = SiteStateStore(run_dir / "site_state" / "site-1")
    _flip_last_byte(store.path(3))
    _flip_last_byte(store.path(2))  # sound: round 1 only, its clients took part in round 2
    with pytest.raises(RuntimeError, match="site site-1 holds client state of round 1 .*round 2"):
        serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES, resume=True)


def test_no_sound_site_snapshot_is_one_line(runs, tmp_path):
    from fedmeerkat.options import InputError

    run_dir, _ = _served_then_restarted(runs, tmp_path, "scalars", crash_after=3)
    store = SiteStateStore(run_dir / "site_state" / "site-2")
    for r in store.rounds():
        _truncate(store.path(r))
    with pytest.raises(InputError) as e:
        serve(FakeFlare(handlers(run_dir)), str(run_dir), SITES, resume=True)
    assert "no sound snapshot" in str(e.value) and "\n" not in str(e.value)


def test_the_deployed_server_refuses_another_runs_checkpoint(runs, tmp_path):
    """Same size, another trainable space (other indices): the space digest tells them apart."""
    from fedmeerkat.runners.run_folder import CheckpointMismatchError
    from fedmeerkat.zo import SparseMask

    prepared, _ = runs["scalars"]
    done, _ = _served_then_restarted(runs, tmp_path, "scalars")
    other = fresh(prepared, tmp_path / "other")
    mask = SparseMask.load(other / "mask.safetensors")
    i = max(range(len(mask.names)), key=lambda j: mask.indices[j].numel())
    numel = int(torch.Size(mask.shapes[i]).numel())
    free = torch.tensor(sorted(set(range(numel)) - set(mask.indices[i].tolist())))
    mask.indices[i] = torch.sort(torch.cat([mask.indices[i][1:], free[:1]])).values
    mask.save(other / "mask.safetensors")
    for name in ("checkpoint.safetensors", "checkpoint.prev.safetensors", "metrics.jsonl"):
        shutil.copy(done / name, other / name)
    with pytest.raises(CheckpointMismatchError, match="another trainable space"):
        serve(FakeFlare(handlers(other)), str(other), SITES, resume=True)


def test_the_deployed_server_refuses_a_run_folder_in_use(runs, tmp_path):
    from fedmeerkat.runners.run_folder import RunFolder, RunFolderBusy

    prepared, _ = runs["scalars"]
    run_dir = fresh(prepared, tmp_path / "run")
    flare = FakeFlare(handlers(run_dir))
    with RunFolder(run_dir).locked(), pytest.raises(RunFolderBusy, match="in use"):
        serve(flare, str(run_dir), SITES)
    assert flare.tags == [] and not (run_dir / "metrics.jsonl").exists()


def test_an_unreadable_snapshot_is_one_line_where_only_its_metadata_is_read(tmp_path):
    from fedmeerkat.deploy.site_state import SnapshotError

    store = SiteStateStore(tmp_path / "site")
    store.save(3, {})
    _truncate(store.path(3))
    with pytest.raises(SnapshotError) as e:  # restore_before reads the oldest one's metadata
        store.restore_before(2, {}, reset=lambda: None)
    assert "unreadable" in str(e.value) and "\n" not in str(e.value)


def test_a_flare_reply_without_a_blob_is_kept_as_none_not_raised(tmp_path):
    """serve() then counts that site's clients as rejected (reply is not bytes)."""
    from types import SimpleNamespace

    from nvflare.app_common.abstract.fl_model import FLModel

    from fedmeerkat.deploy.job import FlareTransport

    class Controller:
        abort_signal = SimpleNamespace(triggered=False)

        def send_model(self, *, task_name, targets, timeout, data, callback):
            params = {"blob": b"ok"} if targets == ["good"] else {"other": 1}
            callback(FLModel(params=params, meta={"client_name": targets[0]}))

    got = FlareTransport(Controller(), ["good", "bad"], tmp_path, 5.0).exchange(
        1, {"good": b"T", "bad": b"T"})
    assert got == {"good": b"ok", "bad": None}
