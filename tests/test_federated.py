"""Server/client state machines and wire messages, on a tiny pure-torch model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import (
    ClientReply,
    ClientState,
    FedSettings,
    MeerkatServer,
    RoundPlan,
    run_client,
)
from fedmeerkat.federated.aggregate import Aggregate
from fedmeerkat.zo import SparseView, replay
from fedmeerkat.zo.per_example import ExampleOffsets
from tests.test_zo_core import TinyNet, data, tiny_mask


class NetModel:
    """LocalModel over TinyNet with a regression loss on fixed data."""

    def __init__(self, density: float = 0.1):
        self.net = TinyNet()
        self.view = SparseView(dict(self.net.named_parameters()), tiny_mask(self.net, density))
        self.x, self.y = data()

    def loss(self, ids: np.ndarray) -> float:
        return float(((self.net(self.x[ids]) - self.y[ids]) ** 2).mean())

    def example_losses(self, ids: np.ndarray) -> np.ndarray:
        return ((self.net(self.x[ids]) - self.y[ids]) ** 2).double().numpy()

    def example_offsets(self):
        if not hasattr(self, "_offsets"):
            self._offsets = ExampleOffsets(self.net, self.view.mask)
        return self._offsets


def apply_round(server, r, replies):
    """Screen the round's replies, then apply the verdict (what the round driver does)."""
    return server.apply(r, server.screen(r, replies))


def test_messages_round_trip_and_byte_counts():
    plan = RoundPlan(3, 1, [2**62 + 5, 7], 2, torch.randn(100))
    blob = plan.to_bytes()
    back = RoundPlan.from_bytes(blob)
    assert back.seeds == plan.seeds and back.num_steps == 2 and torch.equal(back.theta, plan.theta)
    assert len(blob) == 5 + 12 + 2 * 8 + 1 + 4 + 100 * 4 + 2  # header, seeds, vector
    assert len(RoundPlan(3, 1, [1, 2], 2).to_bytes()) == 5 + 12 + 16 + 1 + 2
    agg = Aggregate(2, [5, 6], [0.5, 0.25], 0.9)
    for p in (plan, RoundPlan(3, 1, [1, 2], 2), RoundPlan(3, 1, [1, 2], 2, None, [agg, agg])):
        assert p.nbytes() == len(p.to_bytes())
    assert RoundPlan.from_bytes(RoundPlan(3, 1, [1], 1, None, [agg]).to_bytes()).catchup == [
        Aggregate(2, [5, 6], [0.5, 0.25], pytest.approx(0.9))]
    reply = ClientReply(3, 1, [0.5, -1.25], 40, 0.7)
    rb = ClientReply.from_bytes(reply.to_bytes())
    assert rb.scalars == [0.5, -1.25] and rb.num_samples == 40
    assert rb.train_loss == pytest.approx(0.7)  # float32 on the wire
    assert len(reply.to_bytes()) == 5 + 22 + 2 * 4
    with pytest.raises(ValueError, match="expected a v1 .R. message"):
        ClientReply.from_bytes(blob)


def _setup(weighting="samples"):
    model = NetModel()
    parts = [np.arange(0, 20), np.arange(20, 26), np.arange(26, 32)]
    states = [ClientState(k, p, ClientDataPointer(len(p), seed=k)) for k, p in enumerate(parts)]
    settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=5,
                           weighting=weighting)
    server = MeerkatServer(settings, model.view.gather(), [s.num_samples for s in states])
    return model, states, settings, server


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_round_is_fedavg_of_replayed_client_paths(weighting):
    model, states, settings, server = _setup(weighting)
    theta0 = server.theta.clone()
    plans = server.plan_round(1)
    assert len({tuple(p.seeds) for p in plans}) == 1  # one seed list shared by every client
    replies, finals = [], []
    for plan in plans:
        reply = run_client(states[plan.client_id], plan, model, eps=settings.eps,
                           lr=settings.lrs(1), batch_size=settings.batch_size)
        finals.append(model.view.gather())  # what the client ended with
        replies.append(reply)
    # the server's virtual path reproduces each client's final vector exactly
    for reply, final in zip(replies, finals, strict=True):
        assert torch.equal(replay(theta0, plans[0].seeds, reply.scalars, settings.lr), final)
    apply_round(server, 1, list(reversed(replies)))
    w = np.array([20, 6, 6]) / 32 if weighting == "samples" else np.ones(3) / 3
    want = sum(torch.tensor(wk, dtype=torch.float32) * f for wk, f in zip(w, finals, strict=True))
    assert torch.allclose(server.theta, want, atol=1e-7) and server.round == 1
    assert not torch.equal(server.theta, theta0)


def test_server_refuses_a_wrong_round_plan_and_leaves_out_bad_replies():
    model, states, settings, server = _setup()
    with pytest.raises(ValueError, match="planned after"):
        server.plan_round(2)
    server.plan_round(1)
    ok = ClientReply(1, 0, [0.1, 0.2, 0.3], 20, 0.5)
    # a client's bad input never raises: it is left out with its reason (tests/test_validation.py)
    verdict = server.screen(1, [ok, ClientReply(1, 1, [0.1], 6, 0.5),
                                ClientReply(2, 2, [0.1] * 3, 6, 0.5)])
    assert [r.client_id for r in verdict.accepted] == [0]
    assert verdict.rejected == {1: "sent 1 scalars, expected 3",
                                2: "reply is for round 2, not 1"}
    outcome = apply_round(server, 1, [ok, ClientReply(1, 1, [float("nan"), 0.0, 0.0], 6, 0.5)])
    assert outcome.rejected == {1: "non-finite scalar or loss"} and outcome.client_steps == {0: 3}
    assert torch.equal(server.theta, replay(model.view.gather(), server.seeds(1), ok.scalars, 0.05))


def test_screen_and_apply_read_the_kept_plan_of_the_round_in_progress(monkeypatch):
    model, states, settings, server = _setup()
    replies = [ClientReply(1, k, [0.1, 0.2, 0.3], 10, 0.5) for k in range(3)]
    with pytest.raises(ValueError, match="not in progress"):  # nothing planned yet
        server.screen(1, replies)
    server.plan_round(1)
    assert server.plan.steps == {0: 3, 1: 3, 2: 3} and server.plan.lrs == settings.lrs(1)
    # what the state would plan now does not change the round that was sent
    monkeypatch.setattr(server, "steps_for", lambda r, k: 1)
    monkeypatch.setattr(server, "participants", lambda r: [0])
    verdict = server.screen(1, replies)
    assert not verdict.rejected and len(verdict.accepted) == 3
    with pytest.raises(ValueError, match="not in progress"):
        server.screen(2, replies)
    with pytest.raises(ValueError, match="not one of round 1"):  # another round's verdict
        server.apply(1, dataclasses.replace(verdict, accepted=[ClientReply(2, 0, [0.1], 10, 0.5)]))
    server.apply(1, verdict)
    with pytest.raises(ValueError, match="not in progress"):  # applied: no longer in progress
        server.apply(1, verdict)


def test_client_uses_its_data_pointer_across_rounds():
    model, states, settings, server = _setup()
    seen: list[tuple[int, ...]] = []
    loss = model.loss
    model.loss = lambda ids: (seen.append(tuple(ids)), loss(ids))[1]
    for r in (1, 2):
        replies = []
        for plan in server.plan_round(r):
            seen.clear() if plan.client_id == 1 and r == 1 else None
            before = len(seen)
            replies.append(run_client(states[plan.client_id], plan, model, eps=1e-2,
                                      lr=settings.lrs(r), batch_size=4))
            if plan.client_id != 1:
                del seen[before:]
        apply_round(server, r, replies)
    assert seen[0::2] == seen[1::2]  # f+ and f- of a step see the same batch
    ids = [i for batch in seen[0::2] for i in batch]
    # client 1 holds examples 20..25; 2 rounds x 3 steps x 4 = 24 draws = 4 full epochs
    assert sorted(ids) == sorted(list(range(20, 26)) * 4)
