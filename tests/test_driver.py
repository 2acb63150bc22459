"""The round driver over a transport: what arrives is applied, what is missing or unreadable
leaves its client out of the round, exactly as if it had not been planned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientReply, ClientState, FedSettings
from fedmeerkat.federated.messages import reply_from_bytes
from fedmeerkat.federated.methods import get_method, make_server
from fedmeerkat.runners.client_host import ClientHost
from fedmeerkat.runners.driver import RoundDriver
from fedmeerkat.runners.inprocess import InProcessTransport
from tests.test_federated import NetModel, apply_round

PARTS = [np.arange(0, 12), np.arange(12, 20), np.arange(20, 32)]


def _world(downlink: str):
    model = NetModel()
    states = {k: ClientState(k, p, ClientDataPointer(len(p), seed=k),
                             model.view.gather().clone() if downlink == "scalars" else None)
              for k, p in enumerate(PARTS)}
    settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=5, rounds=4,
                           downlink=downlink)
    server = make_server("meerkat", settings, model.view.gather(), [len(p) for p in PARTS])
    host = ClientHost(get_method("meerkat"), None, settings, model, states)
    return model, states, server, host


class Lossy:
    """In-process transport that loses or garbles chosen replies: {round: {client: fault}}."""

    def __init__(self, host, faults):
        self.inner, self.faults = InProcessTransport(host), faults

    def exchange(self, round_idx, plans, deadline):
        got = self.inner.exchange(round_idx, plans, deadline)
        for k, fault in self.faults.get(round_idx, {}).items():
            if fault == "lost":
                del got[k]
            elif fault == "truncated":
                got[k] = got[k][:-3]
            elif fault == "spoofed":  # client 0's reply delivered again as client 9's
                got[9] = got[0]
        return got


def _drive(downlink, faults):
    model, states, server, host = _world(downlink)
    records = []
    driver = RoundDriver(server, Lossy(host, faults), append_metrics=records.append,
                         save_arrays=lambda r, a: None, checkpoint=lambda: None, log=lambda m: None)
    driver.run(4)
    return server, records


@pytest.mark.parametrize("downlink", ["sparse-weights", "scalars"])
def test_lost_and_garbled_replies_leave_the_round_as_if_not_planned(downlink):
    server, records = _drive(downlink, {2: {1: "lost", 2: "truncated"}, 3: {0: "spoofed"}})
    assert records[1]["missing"] == [1] and list(records[1]["rejected"]) == ["2"]
    assert "truncated" in records[1]["rejected"]["2"]
    assert records[1]["client_steps"] == {0: 3}
    assert records[2]["rejected"] == {"9": "not planned this round"}
    # clients 1 and 2 ran round 2 but the server never counted them: in round 3 they are caught
    # up again from what they hold (scalars), and every later round applies cleanly
    assert [sorted(r["client_steps"]) for r in records] == [[0, 1, 2], [0], [0, 1, 2], [0, 1, 2]]

    # the same rounds with client 1 and 2 simply not taking part in round 2
    model, states, ref, _ = _world(downlink)
    for r in range(1, 5):
        plans = ref.plan_round(r)
        replies = []
        for p in plans:
            reply_blob = ClientHost(get_method("meerkat"), None, ref.settings, model,
                                    states).handle(p)
            if r != 2 or p.client_id == 0:
                replies.append(reply_from_bytes(reply_blob))
        apply_round(ref, r, replies)
    assert torch.equal(server.theta, ref.theta)


def test_reply_from_bytes_names_what_is_wrong():
    blob = ClientReply(1, 0, [0.5], 3).to_bytes()
    assert reply_from_bytes(blob).scalars == [0.5]
    for bad, why in [(b"", "too short"), (blob[:-2], "truncated|trailing|buffer"),
                     (b"XYZ" + blob[3:], "header"), (blob + b"\0", "trailing")]:
        with pytest.raises(ValueError, match=why):
            reply_from_bytes(bad)


# ---- dropouts, stragglers, retries (marker: faults) -----------------------------------------

class Clock:
    """A fake time.monotonic for the driver and the in-process transport: no sleeping."""

    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


class Scripted:
    """In-process transport whose exchanges (counted over the run) lose every reply in the
    attempts listed, or the replies of the clients listed: {attempt number: clients or None}."""

    def __init__(self, host, lose):
        self.inner, self.lose, self.calls = InProcessTransport(host), lose, 0

    def exchange(self, round_idx, plans, deadline):
        self.calls += 1
        got = self.inner.exchange(round_idx, plans, deadline)
        if self.calls in self.lose:
            for k in self.lose[self.calls] or list(got):
                got.pop(k, None)
        return got


def _driver(server, transport, records, checkpoints, **kw):
    return RoundDriver(server, transport, append_metrics=records.append,
                       save_arrays=lambda r, a: None,
                       checkpoint=lambda: checkpoints.append(server.round), log=lambda m: None, **kw)


@pytest.mark.faults
@pytest.mark.parametrize("downlink", ["sparse-weights", "scalars"])
def test_round_closes_at_the_deadline_and_stragglers_catch_up(downlink, monkeypatch):
    import fedmeerkat.runners.driver as driver_mod
    import fedmeerkat.runners.inprocess as inprocess_mod

    clock = Clock()
    monkeypatch.setattr(driver_mod, "time", clock)
    monkeypatch.setattr(inprocess_mod, "time", clock)
    model, states, server, host = _world(downlink)
    handle = host.handle

    def slow(plan):  # client 0 takes 30 s in round 2: the 10 s deadline passes meanwhile
        out = handle(plan)
        if plan.round == 2 and plan.client_id == 0:
            clock.now += 30
        return out

    host.handle = slow
    records, checkpoints = [], []
    _driver(server, InProcessTransport(host), records, checkpoints, round_timeout=10.0).run(4)
    assert records[1]["missing"] == [1, 2] and records[1]["client_steps"] == {0: 3}
    assert checkpoints == [1, 2, 3, 4]
    if downlink == "scalars":  # clients 1 and 2 get the two aggregates they missed
        assert records[2]["sync"] == {"0": "scalars:1", "1": "scalars:2", "2": "scalars:2"}

    # reference: clients 1 and 2 are not even started in round 2
    _, ref_states, ref, ref_host = _world(downlink)
    for r in range(1, 5):
        replies = [reply_from_bytes(ref_host.handle(p)) for p in ref.plan_round(r)
                   if r != 2 or p.client_id == 0]
        apply_round(ref, r, replies)
    assert torch.equal(server.theta, ref.theta) and server.synced == ref.synced
    assert [s.pointer.state_dict() for s in states.values()] == \
        [s.pointer.state_dict() for s in ref_states.values()]


@pytest.mark.faults
def test_round_below_min_clients_is_retried_with_the_same_plan():
    model, states, server, host = _world("scalars")
    records, checkpoints = [], []
    transport = Scripted(host, {2: None, 3: [0, 1]})  # round 2: all lost, then 2 of 3 lost
    _driver(server, transport, records, checkpoints, min_clients=2, round_retries=2).run(3)
    assert transport.calls == 5 and checkpoints == [1, 2, 3]
    retries = records[1]["retries"]
    assert [a["attempt"] for a in retries] == [1, 2]
    assert retries[0]["missing"] == [0, 1, 2] and retries[0]["usable"] == 0
    assert retries[1]["missing"] == [0, 1] and retries[1]["usable"] == 1
    assert retries[1]["bytes_up"] > 0 and records[1]["client_steps"] == {0: 3, 1: 3, 2: 3}

    # reference: round 2's plan run three times (same clients and seeds), the third applied
    ref = _replayed("scalars", unapplied={2: 2}, rounds=3)
    assert torch.equal(server.theta, ref.theta)
    # the aggregates every client may still need (older ones are pruned): the same
    assert sorted(server.history) == sorted(ref.history) and server.history
    assert all(server.history[r].coefs == ref.history[r].coefs for r in server.history)


def _replayed(downlink, unapplied, rounds=4):
    """A run by hand: round r's plan is run and thrown away unapplied[r] times first."""
    _, _, ref, host = _world(downlink)
    for r in range(1, rounds + 1):
        for _ in range(unapplied.get(r, 0)):
            plans = ref.plan_round(r)
            assert [p.seeds for p in plans] == [p.seeds for p in ref.plan_round(r)]
            for p in plans:
                host.handle(p)
        apply_round(ref, r, [reply_from_bytes(host.handle(p)) for p in ref.plan_round(r)])
    return ref


@pytest.mark.faults
def test_run_stops_cleanly_when_a_round_never_gets_enough_replies():
    from fedmeerkat.runners.driver import RoundFailed

    model, states, server, host = _world("sparse-weights")
    records, checkpoints = [], []
    transport = Scripted(host, {n: None for n in range(2, 10)})  # everything lost from round 2
    driver = _driver(server, transport, records, checkpoints, round_retries=1)
    with pytest.raises(RoundFailed, match=r"round 2: fewer than min_clients=1 usable replies "
                                          r"in 2 attempt\(s\); the run stops after round 1"):
        driver.run(4)
    assert transport.calls == 3 and checkpoints == [1] and server.round == 1
    assert records[-1]["round"] == 2 and records[-1]["failed"] is True
    assert [a["missing"] for a in records[-1]["attempts"]] == [[0, 1, 2], [0, 1, 2]]
    # nothing of round 2 was applied: the run continues from round 1 once replies come back
    transport.lose = {}
    driver.run(4)
    assert server.round == 4 and checkpoints == [1, 2, 3, 4]
    # = round 2's plan run twice unapplied (the clients' data pointers moved on), then applied
    assert torch.equal(server.theta, _replayed("sparse-weights", unapplied={2: 2}).theta)
