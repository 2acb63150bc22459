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
from tests.test_federated import NetModel

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
        ref.apply(r, replies)
    assert torch.equal(server.theta, ref.theta)


def test_reply_from_bytes_names_what_is_wrong():
    blob = ClientReply(1, 0, [0.5], 3).to_bytes()
    assert reply_from_bytes(blob).scalars == [0.5]
    for bad, why in [(b"", "too short"), (blob[:-2], "truncated|trailing|buffer"),
                     (b"XYZ" + blob[3:], "header"), (blob + b"\0", "trailing")]:
        with pytest.raises(ValueError, match=why):
            reply_from_bytes(bad)
