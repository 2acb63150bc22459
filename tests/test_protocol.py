"""Issue 3 protocol: downlink modes, catch-up, partial participation, bytes, schedules, resume."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmeerkat.cli.main import main
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import (
    ClientState,
    FedSettings,
    MeerkatServer,
    RoundPlan,
    run_client,
    sync_client,
)
from fedmeerkat.federated.aggregate import aggregate_scalars, apply_aggregate
from fedmeerkat.federated.schedule import lr_at
from fedmeerkat.zo import replay_many, round_seeds
from tests.test_cli import _args
from tests.test_federated import NetModel, apply_round


def _simulate(downlink, *, rounds=4, k=4, per_round=0, wd=0.0, schedule="constant", steps=3):
    """Run the state machines in memory; returns server, client states, plans seen."""
    model = NetModel(density=0.9)  # 460 values: the vector costs more than an aggregate
    parts = np.array_split(np.arange(32), k)
    theta0 = model.view.gather()
    keep = downlink == "scalars"
    states = [ClientState(i, p, ClientDataPointer(len(p), seed=i), theta0.clone() if keep else None)
              for i, p in enumerate(parts)]
    settings = FedSettings(local_steps=steps, lr=0.05, eps=1e-2, batch_size=4, seed=1,
                           rounds=rounds, downlink=downlink, clients_per_round=per_round,
                           weight_decay=wd, lr_schedule=schedule)
    server = MeerkatServer(settings, theta0, [len(p) for p in parts])
    log = []
    for r in range(1, rounds + 1):
        replies = []
        for plan in server.plan_round(r):
            plan = RoundPlan.from_bytes(plan.to_bytes())
            reply = run_client(states[plan.client_id], plan, model, eps=settings.eps,
                               lr=settings.lrs(r), batch_size=4, weight_decay=wd)
            if keep:  # the client's copy of the global model equals the server's, bit for bit
                assert torch.equal(states[plan.client_id].theta, server.theta)
            log.append((r, plan.client_id, plan))
            replies.append(reply)
        apply_round(server, r, replies)
    return server, states, log


@pytest.mark.parametrize("wd,schedule", [(0.0, "constant"), (0.1, "cosine")])
def test_both_downlinks_give_the_same_model(wd, schedule):
    # The server averages the clients' paths in closed form (one pass over the aggregated
    # scalars) in both modes, so the models are bit-identical, round after round; only the
    # bytes differ. (The closed form equals the mean of the replayed paths in exact math:
    # test_aggregate_matches_mean_of_replays_with_weight_decay.)
    theta0 = NetModel(density=0.9).view.gather()
    vec, _, _ = _simulate("sparse-weights", wd=wd, schedule=schedule)
    sca, _, log = _simulate("scalars", wd=wd, schedule=schedule)
    assert (vec.theta - theta0).abs().max() > 1e-3
    assert torch.equal(vec.theta, sca.theta)
    # with everybody every round, the scalar downlink is one aggregate: T seeds + T+1 floats
    assert all(p.theta is None and len(p.catchup) == (r > 1) for r, _, p in log)


def test_high_frequency_sync_sends_only_scalars():
    server, _, log = _simulate("scalars", steps=1, rounds=3)
    for r, _, plan in log:
        assert plan.theta is None and len(plan.seeds) == 1
        # header + 1 seed (+ last round's aggregate: round, decay, 1 seed, 1 coefficient)
        assert len(plan.to_bytes()) == 5 + 12 + 8 + 1 + 2 + (r > 1) * (10 + 8 + 4)
        if r > 1:
            assert len(plan.catchup) == 1 and len(plan.catchup[0].coefs) == 1


def test_partial_participation_is_seeded_and_weighted_over_participants():
    server, _, log = _simulate("sparse-weights", k=8, per_round=2, rounds=5)
    by_round = {}
    for r, k, _ in log:
        by_round.setdefault(r, []).append(k)
    assert all(len(v) == 2 for v in by_round.values())
    assert len({tuple(v) for v in by_round.values()}) > 1  # the sample changes over rounds
    assert by_round == {r: server.participants(r) for r in by_round}  # reproducible from seed


def test_uniform_client_draws_are_the_earlier_runs_and_size_draws_follow_the_sizes():
    """client_sampling=uniform keeps the draws every earlier run made (known answers taken
    before the size option existed); size draws in proportion to the clients' examples, so a
    one-example client is all but never a round's only client, and the plan DP solves for
    (planned_steps) is the participation the server then runs."""
    from fedmeerkat.federated.server import sampled_clients

    s = FedSettings(local_steps=1, lr=1e-4, eps=1e-3, batch_size=16, seed=0,
                    clients_per_round=1, rounds=300)
    assert [sampled_clients(s, r, [803] * 10)[0] for r in range(1, 13)] == [
        3, 6, 3, 0, 9, 4, 3, 3, 4, 0, 7, 8]
    s4 = dataclasses.replace(s, clients_per_round=4)
    assert [sampled_clients(s4, r, [803] * 10) for r in (1, 2)] == [[2, 3, 4, 7], [1, 4, 8, 9]]
    sizes = [2510, 186, 810, 1797, 1, 978, 807, 59, 526, 356]  # a Dirichlet(0.5) split's
    size = dataclasses.replace(s, client_sampling="size")
    counts = np.bincount([sampled_clients(size, r, sizes)[0] for r in range(1, 2001)],
                         minlength=10)
    uniform = np.bincount([sampled_clients(s, r, sizes)[0] for r in range(1, 2001)],
                          minlength=10)
    assert counts[4] == 0 and uniform[4] > 150  # the one-example client
    share = np.asarray(sizes) / sum(sizes)
    assert np.abs(counts / 2000 - share).max() < 0.03
    two = [sampled_clients(dataclasses.replace(size, clients_per_round=2), r, sizes)
           for r in range(1, 50)]
    assert all(len(set(p)) == 2 for p in two)  # without replacement
    server = MeerkatServer(dataclasses.replace(size, rounds=40), torch.zeros(3), sizes)
    planned = MeerkatServer.planned_steps(server.settings, sizes)
    ran = np.bincount([k for r in range(1, 41) for k in server.participants(r)], minlength=10)
    assert planned == {k: int(ran[k]) for k in range(10)}


def test_catch_up_from_missed_aggregates_or_the_vector():
    # _simulate asserts for every plan that the client's rebuilt copy equals the server's
    server, _, log = _simulate("scalars", k=8, per_round=2, rounds=8)
    late = [p for _, _, p in log if len(p.catchup) > 1]
    assert late, "some client missed rounds and caught up from several aggregates"
    assert all(p.theta is None for _, _, p in log)  # 460 floats cost more than a few aggregates

    # the choice is by serialized size: 8 missed aggregates of 3 steps vs. the vector
    def choice(nnz: int) -> str:
        s = MeerkatServer(FedSettings(local_steps=3, lr=0.1, eps=1e-3, batch_size=1, seed=0,
                                      rounds=9, downlink="scalars"), torch.zeros(nnz), [1])
        s.history = {r: server.history[r] for r in range(1, 9)}
        s.round = 8
        plan = s.plan_round(9)[0]
        assert (plan.theta is None) == (s.catchup_choices[0] != "vector")
        return s.catchup_choices[0]

    agg_bytes = RoundPlan(9, 0, [0] * 3, 3, None, list(server.history.values())[:8]).nbytes()
    assert choice(nnz=10) == "vector"  # 40 bytes of vector < 8 aggregates
    assert choice(nnz=agg_bytes) == "scalars:8"  # a vector of 4x that many bytes is larger


def test_aggregate_matches_mean_of_replays_with_weight_decay():
    theta = torch.randn(500)
    seeds = round_seeds(0, 1, 4)
    scal = [[0.3, -0.1, 0.2, 0.5], [1.0], [-0.4, 0.2, 0.0, 0.1]]
    w = [0.5, 0.2, 0.3]
    lrs = [0.1, 0.08, 0.06, 0.04]
    finals = replay_many(theta, seeds, scal, lrs, weight_decay=0.5)
    want = sum(wk * f for wk, f in zip(w, finals, strict=True))
    got = apply_aggregate(theta.clone(), aggregate_scalars(1, seeds, scal, w, lrs, 0.5))
    assert torch.allclose(got, want, atol=1e-6)


def test_lr_schedules():
    assert lr_at(1.0, "constant", 7, 10) == 1.0
    assert lr_at(1.0, "linear", 0, 10) == 1.0 and lr_at(1.0, "linear", 5, 10) == 0.5
    assert lr_at(1.0, "cosine", 5, 10) == pytest.approx(0.5)
    s = FedSettings(local_steps=2, lr=1.0, eps=1e-3, batch_size=1, seed=0, rounds=2,
                    lr_schedule="linear")
    assert s.lrs(1) + s.lrs(2) == [1.0, 0.75, 0.5, 0.25]


def test_metrics_bytes_are_the_serialized_payloads(tiny_model_dir, sentiment_csv, calib_txt,
                                                   isolated_cache, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "downlink=scalars",
                      "clients_per_round=2")) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    for rec in records[1:]:
        assert len(rec["bytes"]) == 2 and set(rec["sync"]) == set(rec["bytes"])
        assert rec["bytes_up"] == sum(up for up, _ in rec["bytes"].values())
        assert rec["bytes_down"] == sum(down for _, down in rec["bytes"].values())
        # a reply is 27 header bytes + 2 float32 scalars, whoever sends it
        assert all(up == 27 + 2 * 4 for up, _ in rec["bytes"].values())
    # a first-round plan is header + 2 seeds and nothing else: recompute its size independently
    (k, (_, down)), = list(records[1]["bytes"].items())[:1]
    assert down == len(RoundPlan(1, int(k), round_seeds(0, 1, 2), 2).to_bytes())
    assert summary["download_bytes_per_client"] < 4 * summary["mask_nnz"]  # far below the vector
    assert main(["report", str(out)]) == 0


def test_interrupted_run_resumes_bit_identical(tiny_model_dir, sentiment_csv, calib_txt,
                                               isolated_cache, tmp_path, monkeypatch, capsys):
    import fedmeerkat.runners.run_folder as sim  # checkpoints are written there

    extra = ("rounds=5", "downlink=scalars", "clients_per_round=3", "lr_schedule=cosine",
             "weight_decay=0.01")
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, full, *extra)) == 0

    cut = tmp_path / "cut"
    real = sim.save_checkpoint
    calls = []

    def crash_after_round_2(out, server, states, *rest):
        if server.round == 1:
            time.sleep(0.5)  # so the cut process's wall time is one a lost total would miss
        real(out, server, states, *rest)
        calls.append(server.round)
        if server.round == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sim, "save_checkpoint", crash_after_round_2)
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, cut, *extra)) == 130
    monkeypatch.setattr(sim, "save_checkpoint", real)
    assert not (cut / "final_state.safetensors").exists()
    # 4 clients, 3 per round: their copies are stored once per round they hold, not per client
    with safe_open(str(cut / "checkpoint.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        state = json.loads(f.metadata()["state"])
        synced = {c["synced"] for c in state["clients"]}
    before = state["wall_seconds"]  # the cut process's wall time up to its last checkpoint
    assert before >= 0.5
    copies = [k for k in keys if k.startswith("clients.theta.round")]
    assert sorted(copies) == sorted(f"clients.theta.round{r}" for r in synced) and len(copies) < 4
    assert not any(k.startswith("client.") and k.endswith(".theta") for k in keys)
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0

    a = load_file(str(full / "final_state.safetensors"))["theta"]
    b = load_file(str(cut / "final_state.safetensors"))["theta"]
    assert torch.equal(a, b)
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rb] == [0, 1, 2, 3, 4, 5]
    assert ra == rb
    # the resumed run's total wall time counts the cut process's up to its checkpoint
    summary = json.loads((cut / "summary.json").read_text())
    assert abs(summary["wall_seconds_total"] - (before + summary["wall_seconds"])) <= 0.2
    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "lr=1"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err


def test_clients_at_the_same_round_share_one_copy():
    """Simulation memory flat in K: copies are shared per round, never changed in place."""
    from fedmeerkat.federated import share_copies

    server, states, _ = _simulate("scalars", k=8, per_round=3, rounds=4)
    before = {s.client_id: s.theta.clone() for s in states}
    pool = share_copies(states)
    assert len({id(s.theta) for s in states}) == len(pool) == len({s.synced for s in states})
    assert all(torch.equal(s.theta, before[s.client_id]) for s in states)
    # catching up gives the client a new tensor: its peers at the old round keep theirs
    old = {id(s.theta): s.theta.clone() for s in states}
    for plan in server.plan_round(5):
        st = states[plan.client_id]
        shared = st.theta
        sync_client(st, RoundPlan.from_bytes(plan.to_bytes()))
        assert st.theta is not shared and torch.equal(shared, old[id(shared)])
        assert torch.equal(st.theta, server.theta)
    broken = states[0]
    broken.theta = broken.theta + 1
    peers = [s for s in states if s.synced == broken.synced and s is not broken]
    if peers:
        with pytest.raises(RuntimeError, match="another vector"):
            share_copies([peers[0], broken])


def test_history_stays_bounded_over_10000_rounds(tmp_path):
    """Issue 21: the server keeps only the aggregates some client can still be sent. A client
    that never replies (3) is past the point where the vector is cheaper and gets the vector;
    the others catch up from scalars. The checkpoint stays the same size whatever the round."""
    from fedmeerkat.federated import ClientReply
    from fedmeerkat.runners.run_folder import CHECKPOINT, save_checkpoint

    nnz = 64  # 260 vector bytes: a catch-up of 8 aggregates of 2 seeds (34 bytes each) is dearer
    settings = FedSettings(local_steps=2, lr=1e-3, eps=1e-3, batch_size=1, seed=0,
                           rounds=10_000, downlink="scalars", clients_per_round=2)
    server = MeerkatServer(settings, torch.zeros(nnz), [5, 5, 5, 5])
    choices: dict[int, set[str]] = {k: set() for k in range(4)}
    sizes = []
    for r in range(1, 10_001):
        plans = server.plan_round(r)
        for k, c in server.catchup_choices.items():
            choices[k].add(c)
        replies = [ClientReply(r, p.client_id, [0.01 * (r % 7 - 3)] * p.num_steps, 5, 1.0)
                   for p in plans if p.client_id != 3]
        server.apply(r, server.screen(r, replies))
        assert len(server.history) <= 8, r
        if r in (100, 10_000):
            save_checkpoint(tmp_path, server, [])
            sizes.append((tmp_path / CHECKPOINT).stat().st_size)
    assert "vector" in choices[3]  # away longer than the vector is worth
    assert any(c.startswith("scalars:") and c != "scalars:1" for c in choices[0])
    assert sizes[1] <= sizes[0] + 64 < 4096, sizes  # bounded in the number of rounds
