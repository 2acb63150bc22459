"""Hostile and broken replies (federated/validate.py through the round driver): each is left
out of its round with a reason, and the run is bit-identical to one where that client simply
did not reply."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientReply, ClientState, FedSettings, RoundPlan
from fedmeerkat.federated.messages import VectorReply, reply_from_bytes
from fedmeerkat.federated.methods import get_method, make_server
from fedmeerkat.federated.methods.feddyn import H_KEY, PENDING_KEY, settle_pending
from fedmeerkat.federated.validate import ReplyBound
from fedmeerkat.runners.client_host import ClientHost
from fedmeerkat.runners.driver import RoundDriver
from fedmeerkat.runners.inprocess import InProcessTransport
from tests.test_federated import NetModel, apply_round

pytestmark = pytest.mark.faults

PARTS = [np.arange(0, 12), np.arange(12, 20), np.arange(20, 32)]
ROUNDS = 4


def _world(method="meerkat", downlink="sparse-weights", **bound):
    model = NetModel(density=0.5 if method == "meerkat-feddyn" else 0.1)
    states = {k: ClientState(k, p, ClientDataPointer(len(p), seed=k),
                             model.view.gather().clone() if downlink == "scalars" else None)
              for k, p in enumerate(PARTS)}
    settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=5, rounds=ROUNDS,
                           downlink=downlink, **bound)
    m = get_method(method)
    server = make_server(method, settings, model.view.gather(), [len(p) for p in PARTS])
    host = ClientHost(m, m.settings(), settings, model, states)
    return states, server, host


def _corrupt(fault: str, blob: bytes, got: dict[int, bytes], k: int, nnz: int) -> None:
    """Replace client k's reply bytes in `got` by the fault."""
    r = reply_from_bytes(blob)
    assert isinstance(r, ClientReply)

    def with_scalars(scalars, **kw):
        return ClientReply(kw.get("round", r.round), kw.get("client", k), scalars, r.num_samples,
                           kw.get("loss", r.train_loss)).to_bytes()

    if fault == "lost":
        del got[k]
    elif fault == "nan":
        got[k] = with_scalars([r.scalars[0], math.nan, *r.scalars[2:]])
    elif fault == "inf":
        got[k] = with_scalars([-math.inf, *r.scalars[1:]])
    elif fault == "huge":  # finite in float32, 1e30: the garbage-model case
        got[k] = with_scalars([1e30, *r.scalars[1:]])
    elif fault == "nan-loss":
        got[k] = with_scalars(r.scalars, loss=math.nan)
    elif fault == "short":
        got[k] = with_scalars(r.scalars[:-1])
    elif fault == "long":
        got[k] = with_scalars([*r.scalars, 0.0])
    elif fault == "vector":  # a first-order reply where scalars are expected
        got[k] = VectorReply(r.round, k, torch.zeros(nnz), r.num_samples, 3, 0.5).to_bytes()
    elif fault == "truncated":
        got[k] = blob[:-3]
    elif fault == "garbage":
        got[k] = b"\xff" * len(blob)
    elif fault == "other-round":
        got[k] = with_scalars(r.scalars, round=r.round + 1)
    elif fault == "unknown-id":  # the reply claims an id nobody planned, and arrives as it
        del got[k]
        got[9] = with_scalars(r.scalars, client=9)
    elif fault == "spoofed":  # client 0's reply delivered again in client k's place
        got[k] = got[0]
    else:
        raise AssertionError(fault)


class Faulty:
    """In-process transport that corrupts client `k`'s reply in round `at`."""

    def __init__(self, host, nnz, fault, k=2, at=2):
        self.inner, self.nnz, self.fault, self.k, self.at = InProcessTransport(host), nnz, fault, k, at

    def exchange(self, round_idx, plans, deadline):
        got = self.inner.exchange(round_idx, plans, deadline)
        if round_idx == self.at and self.fault:
            _corrupt(self.fault, got[self.k], got, self.k, self.nnz)
        return got


def _drive(fault, method="meerkat", downlink="sparse-weights", **bound):
    states, server, host = _world(method, downlink, **bound)
    records: list[dict] = []
    driver = RoundDriver(server, Faulty(host, server.theta.numel(), fault),
                         append_metrics=records.append, save_arrays=lambda r, a: None,
                         checkpoint=lambda: None, log=lambda m: None)
    driver.run(ROUNDS)
    return server, states, records


def _same_server(a, b):
    assert torch.equal(a.theta, b.theta)
    assert a.synced == b.synced and a.applied == b.applied
    assert sorted(a.history) == sorted(b.history)
    for r in a.history:
        assert a.history[r].seeds == b.history[r].seeds
        assert a.history[r].coefs == b.history[r].coefs and a.history[r].decay == b.history[r].decay


REASONS = {
    "nan": "non-finite", "inf": "non-finite", "nan-loss": "non-finite",
    "huge": "exceeds", "short": "sent 2 scalars, expected 3", "long": "sent 4 scalars",
    "vector": "expected a ClientReply, got VectorReply", "truncated": "truncated",
    "garbage": "header", "other-round": "for round 3, not 2", "spoofed": "names client 0",
}


@pytest.mark.parametrize("downlink", ["sparse-weights", "scalars"])
@pytest.mark.parametrize("fault", sorted(REASONS) + ["unknown-id"])
def test_bad_reply_leaves_the_run_as_if_the_client_had_not_replied(fault, downlink):
    server, _, records = _drive(fault, downlink=downlink)
    ref, _, ref_records = _drive("lost", downlink=downlink)
    assert ref_records[1]["missing"] == [2] and "rejected" not in ref_records[1]
    round2 = records[1]
    if fault == "unknown-id":
        assert round2["missing"] == [2] and round2["rejected"] == {"9": "not planned this round"}
    else:
        assert list(round2["rejected"]) == ["2"] and REASONS[fault] in round2["rejected"]["2"]
        assert "missing" not in round2
    assert round2["client_steps"] == {0: 3, 1: 3} and math.isfinite(round2["train_loss"])
    assert round2["train_loss"] == ref_records[1]["train_loss"]
    # every later round applies every client again (client 2 is caught up as after a loss)
    assert [sorted(r["client_steps"]) for r in records] == [[0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2]]
    _same_server(server, ref)
    assert torch.isfinite(server.theta).all()
    if downlink == "scalars":
        assert records[2]["sync"] == {"0": "scalars:1", "1": "scalars:1", "2": "scalars:2"}


def test_the_fault_changes_the_run_when_it_is_not_screened():
    """Control: the same 1e30 with the bound off is applied and ruins the model, so the
    screened runs above are equal to the reference because of the screen."""
    server, _, records = _drive("huge", reply_bound=0.0)
    ref, _, _ = _drive("lost")
    assert "rejected" not in records[1] and records[1]["client_steps"] == {0: 3, 1: 3, 2: 3}
    assert not torch.equal(server.theta, ref.theta)
    assert float(server.theta.abs().max()) > 1e20


def _replies(*scalars, round_idx=1):
    return [ClientReply(round_idx, k, list(s), 10, 0.5) for k, s in enumerate(scalars)]


def _server(k=3, **bound):
    settings = FedSettings(local_steps=2, lr=0.05, eps=1e-2, batch_size=4, seed=5, **bound)
    server = make_server("meerkat", settings, torch.zeros(40), [10] * k)
    server.plan_round(1)
    return server


def test_relative_bound_uses_the_median_of_three_or_more_and_pairs_two():
    server = _server()
    v = server.screen(1, _replies([0.5, -1.0], [1.0, 0.2], [150.0, 0.3]))
    # median of max |g| = 1.0: 150 > 100 x 1.0
    assert [r.client_id for r in v.accepted] == [0, 1]
    assert "max |g| 150 exceeds 100 (100 x the round's median 1)" == v.rejected[2]
    assert not server.screen(1, _replies([0.5, -1.0], [1.0, 0.2], [99.0, 0.3])).rejected
    # two replies: a median cannot tell the outlier; each is judged against the other's
    assert list(server.screen(1, _replies([1.0, 1.0], [1e30, 0.0])).rejected) == [1]
    assert not server.screen(1, _replies([1.0, 1.0], [99.0, 0.0])).rejected
    # ... the fixed cap applies too
    capped = _server(reply_bound_abs=1e3)
    assert list(capped.screen(1, _replies([1.0, 1.0], [1e30, 0.0])).rejected) == [1]
    # all honest clients at zero: nothing to compare to, the relative rule is off
    assert not server.screen(1, _replies([0.0, 0.0], [0.0, 0.0], [5.0, 0.0])).rejected
    # invalid replies do not vote in the median
    v = server.screen(1, _replies([1.0, 1.0], [2.0, 2.0], [1e30, 1.0], [math.nan, 1e30]))
    assert sorted(v.rejected) == [2, 3]
    with pytest.raises(ValueError):
        ReplyBound(relative=0.5)
    with pytest.raises(ValueError):
        ReplyBound(action="ignore")


def test_clip_keeps_the_client_with_its_scalars_clipped():
    server = _server(reply_bound_action="clip")
    replies = _replies([0.5, -1.0], [1.0, 0.2], [1e30, -0.3])
    v = server.screen(1, replies)
    assert not v.rejected and "clipped" in v.clipped[2]
    assert v.accepted[2].scalars == [100.0, -0.3] and replies[2].scalars[0] == 1e30
    ref = _server()
    manual = _replies([0.5, -1.0], [1.0, 0.2], [100.0, -0.3])
    outcome = server.apply(1, v)
    apply_round(ref, 1, manual)
    assert torch.equal(server.theta, ref.theta) and outcome.clipped == v.clipped
    # negative side, and a limit that is no float32: clipped to a float32 not above it
    v = _server(reply_bound_action="clip", reply_bound_abs=0.1).screen(1, _replies([-5.0, 0.05]))
    g = v.accepted[0].scalars[0]
    assert -0.1 <= g < -0.0999 and float(np.float32(g)) == g


def test_duplicates_count_once_when_identical_and_never_when_they_conflict():
    replies = _replies([0.5, -1.0], [1.0, 0.2], [0.7, 0.3])
    alone, dup, conflict, without = _server(), _server(), _server(), _server()
    apply_round(alone, 1, replies)
    retransmitted = ClientReply(1, 2, [0.7, 0.3], 10, 0.5)
    out = apply_round(dup, 1, [*replies, retransmitted])
    assert not out.rejected and torch.equal(dup.theta, alone.theta)
    other = ClientReply(1, 2, [0.7, 0.4], 10, 0.5)
    out = apply_round(conflict, 1, [replies[2], *replies, other])
    assert out.rejected == {2: "3 conflicting replies"} and sorted(out.client_steps) == [0, 1]
    apply_round(without, 1, replies[:2])
    assert torch.equal(conflict.theta, without.theta)
    assert conflict.synced == without.synced and conflict.applied == without.applied


def test_unknown_and_unidentified_senders_never_raise():
    server = _server()
    stranger = ClientReply(1, 7, [0.1, 0.1], 10, 0.5)
    v = server.screen(1, [*_replies([0.1, 0.2]), stranger, "junk", None])
    assert v.rejected == {7: "not planned this round", -1: "unidentified reply (no client id)"}
    assert [r.client_id for r in v.accepted] == [0]


def test_vector_replies_are_screened_too():
    settings = FedSettings(local_steps=2, lr=0.05, eps=1e-2, batch_size=4, seed=5)
    theta0 = torch.zeros(20)

    def fresh():
        s = make_server("fedavg-backprop", settings, theta0, [10, 10, 10, 10])
        s.plan_round(1)
        return s

    good = [VectorReply(1, k, torch.full((20,), 0.01 * (k + 1)), 10, 2, 0.5) for k in range(3)]
    bad = VectorReply(1, 3, torch.full((20,), 1e30), 10, 2, 0.5)
    server = fresh()
    v = server.screen(1, [*good, bad, ClientReply(1, 3, [0.1, 0.1], 10, 0.5)])
    assert v.rejected[3].startswith("expected a VectorReply, got ClientReply")
    outcome = apply_round(server, 1, [*good, bad])
    assert "max |v - theta| 1e+30 exceeds" in outcome.rejected[3]
    ref = fresh()
    apply_round(ref, 1, good)
    assert torch.equal(server.theta, ref.theta)
    for wrong, why in [(VectorReply(1, 3, torch.zeros(19), 10, 2, 0.5), "sent 19 values"),
                       (VectorReply(1, 3, torch.zeros(20), 10, 5, 0.5), "reports 5 steps"),
                       (VectorReply(1, 3, torch.full((20,), math.inf), 10, 2, 0.5), "non-finite")]:
        assert why in fresh().screen(1, [*good, wrong]).rejected[3]


# ---- meerkat-feddyn: the client's h_k stays in step with the server's mirror ----------------

def _feddyn_run(fault):
    server, states, records = _drive(fault, method="meerkat-feddyn")
    return server, states, records


@pytest.mark.parametrize("fault", ["huge", "nan", "truncated"])
def test_feddyn_client_state_follows_the_server_when_a_reply_is_rejected(fault):
    server, states, records = _feddyn_run(fault)
    assert list(records[1]["rejected"]) == ["2"] and records[2]["client_steps"] == {0: 3, 1: 3, 2: 3}
    ref, ref_states, _ = _feddyn_run("lost")
    _same_server(server, ref)
    assert torch.equal(server.h, ref.h)
    for k, s in states.items():
        # the final round is pending on the client until a next plan acknowledges it
        assert int(s.extra["feddyn_pending_round"][0]) == ROUNDS
        assert settle_pending(s, server.applied[k])
        settle_pending(ref_states[k], ref.applied[k])
        assert torch.equal(s.extra[H_KEY], server.h_clients[k])  # client == server mirror
        assert torch.equal(s.extra[H_KEY], ref_states[k].extra[H_KEY])
        assert torch.equal(server.h_clients[k], ref.h_clients[k])
    # had client 2 committed its round-2 update, it would have left the mirror for good
    assert server.h_clients[2].abs().sum() > 0


def test_feddyn_plan_carries_the_acknowledgement_and_other_plans_do_not():
    _, server, _ = _world("meerkat-feddyn")
    plan = server.plan_round(1)[0]
    assert plan.applied == 0
    blob = plan.to_bytes()
    assert blob[3] == 2 and len(blob) == plan.nbytes()
    assert RoundPlan.from_bytes(blob).applied == 0
    v1 = RoundPlan(plan.round, plan.client_id, plan.seeds, plan.num_steps, plan.theta)
    assert len(v1.to_bytes()) + 4 == len(blob) and v1.to_bytes()[3] == 1
    assert RoundPlan.from_bytes(v1.to_bytes()).applied is None
    _, meerkat, _ = _world("meerkat")
    assert all(p.applied is None and p.to_bytes()[3] == 1 for p in meerkat.plan_round(1))
    # the client settles by the acknowledgement: committed only for the round it names
    state = ClientState(0, np.arange(3), ClientDataPointer(3, seed=0))
    state.extra[PENDING_KEY] = torch.ones(4)
    state.extra["feddyn_pending_round"] = torch.tensor([5])
    assert not settle_pending(state, 4) and H_KEY not in state.extra
    assert PENDING_KEY not in state.extra  # discarded
    state.extra[PENDING_KEY] = torch.ones(4)
    state.extra["feddyn_pending_round"] = torch.tensor([5])
    assert settle_pending(state, 5) and torch.equal(state.extra[H_KEY], -torch.ones(4))


def test_feddyn_never_clips():
    server, _, records = _drive("huge", method="meerkat-feddyn", reply_bound_action="clip")
    assert "clipped" not in records[1] and "exceeds" in records[1]["rejected"]["2"]


# ---- the relative bound's median is over sources (deployed: sites), not clients -------------

def test_relative_bound_takes_its_median_over_sources_not_clients():
    """The issue's attack: a site hosting half of a round's clients sends two replies of 1e30.
    Over clients the median is then (honest + 1e30) / 2 and both pass; over sites it is an
    honest site's, and both are rejected."""
    site_of = {0: "site-1", 1: "site-1", 2: "site-2", 3: "site-3"}
    replies = _replies([1e30, 0.1], [1e30, 0.2], [0.5, -1.0], [1.0, 0.2])
    assert not _server(4).screen(1, replies).rejected  # a median over clients: both accepted
    v = _server(4).screen(1, replies, sources=site_of)
    assert sorted(v.rejected) == [0, 1] and [r.client_id for r in v.accepted] == [2, 3]
    assert "exceeds 100 (100 x the round's median 1)" in v.rejected[0]
    # a site's own clients vote as one: its median, not each of them
    v = _server(5).screen(1, _replies([0.5, 0.1], [0.6, 0.1], [0.7, 0.1], [200.0, 0.1], [1.0, 0.1]),
                          sources={0: "a", 1: "a", 2: "a", 3: "b", 4: "c"})
    assert list(v.rejected) == [3]  # median of (0.6, 200, 1) = 1
    # two sources: a median of two cannot tell which one is off; each is judged against the
    # other's median, so the site sending 1e30 is rejected and the honest one kept
    v = _server(4).screen(1, replies, sources={0: "a", 1: "a", 2: "b", 3: "b"})
    assert sorted(v.rejected) == [0, 1] and [r.client_id for r in v.accepted] == [2, 3]
    assert "the other source's median" in v.rejected[0]
    # the same with two clients in process (each its own source)
    v = _server(2).screen(1, _replies([1e30, 0.1], [0.5, -1.0]))
    assert list(v.rejected) == [0] and [r.client_id for r in v.accepted] == [1]
    # one source: nothing to compare to
    assert not _server(2).screen(1, _replies([1e30, 0.1], [0.5, -1.0]),
                                 sources={0: "a", 1: "a"}).rejected
    # every client its own source is the in-process screen, verdict for verdict
    for rs in (replies, _replies([0.5, -1.0], [1.0, 0.2], [150.0, 0.3])):
        a, b = _server(len(rs)).screen(1, rs), _server(len(rs)).screen(1, rs, sources={
            k: k for k in range(len(rs))})
        assert a.rejected == b.rejected and [r.client_id for r in a.accepted] == [
            r.client_id for r in b.accepted]


@pytest.mark.parametrize("sizes,why", [
    ([10, math.nan, 5], "client 1: nan"), ([10, math.inf], "client 1: inf"),
    ([10, 2.5], "client 1: 2.5"), ([10, 0], "client 1: 0"), ([-3, 10], "client 0: -3"),
    ([10, True], "client 1: True"), ([10, "7"], "client 1: '7'"), ([], "no clients"),
])
def test_server_refuses_client_sizes_that_are_not_positive_integers(sizes, why):
    settings = FedSettings(local_steps=2, lr=0.05, eps=1e-2, batch_size=4, seed=5)
    with pytest.raises(ValueError, match="positive integer") as e:
        make_server("meerkat", settings, torch.zeros(4), sizes)
    assert why in str(e.value) and "\n" not in str(e.value)
    assert make_server("meerkat", settings, torch.zeros(4), [np.int64(3), 2**40]).client_sizes
