"""Meerkat-VP (federated/methods/vp.py): detector, early stopping, data pointer, resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmeerkat.cli.main import main
from fedmeerkat.config import ConfigError, load_config
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings, run_client
from fedmeerkat.federated.gradip import VPRatios, vp_ratios
from fedmeerkat.federated.methods import get_method, make_server
from fedmeerkat.federated.methods.random_select import RandomSelectServer
from fedmeerkat.federated.methods.vp import VPServer, VPSettings
from fedmeerkat.zo import SparseView
from tests.test_cli import _args
from tests.test_federated import apply_round
from tests.test_zo_core import tiny_mask

# ---- the detector on synthetic trajectories -------------------------------------------------
DEFAULTS = dict(init_steps=20, later_steps=20, threshold=1.0, later_ratio=5.0, quiescent_ratio=0.5)


def test_detector_on_synthetic_trajectories():
    rng = np.random.default_rng(0)
    t = np.arange(100)
    signs = rng.choice([-1.0, 1.0], 100)  # GradIP's sign is a coin flip step to step
    iid = signs * np.abs(rng.normal(3.0, 1.0, 100))  # keeps oscillating around |3|
    decaying = signs * 4.0 * np.exp(-t / 12) * np.abs(rng.normal(1.0, 0.3, 100))
    r_iid = vp_ratios(iid, **DEFAULTS)
    r_dec = vp_ratios(decaying, **DEFAULTS)
    assert not r_iid.flagged and r_iid.rho_later < 2 and r_iid.rho_quie < 0.2
    assert r_dec.flagged and r_dec.rho_later > 50 and r_dec.rho_quie == 1.0
    # magnitudes, not signs: a signed reading would call every negative step "quiescent"
    assert sum(iid[-20:] < 1.0) >= 5 and r_iid.rho_quie < 0.2
    # each criterion alone flags; `scale` puts sigma in other units
    slow = signs * np.where(t < 20, 12.0, 2.0)  # 6x drop, never below sigma
    assert vp_ratios(slow, **DEFAULTS).flagged and vp_ratios(slow, **DEFAULTS).rho_quie == 0
    small = np.full(100, 0.5)  # flat (ratio 1) but below sigma throughout
    assert vp_ratios(small, **DEFAULTS).rho_later == 1.0 and vp_ratios(small, **DEFAULTS).flagged
    assert not vp_ratios(small * 100, **DEFAULTS, scale=10.0).flagged  # 50/10 = 5 >= sigma
    dead = np.r_[np.ones(50), np.zeros(50)]
    r = vp_ratios(dead, **DEFAULTS)
    assert r.rho_later == math.inf and r.flagged
    assert VPRatios.from_dict({**r.to_dict(), "rho_later": None}) == r  # JSON's null for inf
    with pytest.raises(ValueError, match="exceed"):
        vp_ratios(np.ones(30), **DEFAULTS)


def test_vp_settings_and_config_checks():
    with pytest.raises(ValueError, match="exceed"):
        VPSettings(calibration_steps=30)
    with pytest.raises(ConfigError, match="vp_calibration_steps"):
        load_config(None, ["method=meerkat-vp", "vp_calibration_steps=30"])
    cfg = load_config(None, ["method=meerkat-random-select", "vp_gradip_units=raw"])
    with pytest.raises(ConfigError, match="vp_gradip_units"):
        load_config(None, ["vp_gradip_units=cm"])
    server = make_server(cfg.method, FedSettings(2, 0.1, 1e-3, 4, 0), torch.zeros(5), [3, 3],
                         method_settings=cfg.method_settings)
    assert isinstance(server, RandomSelectServer) and server.vp.units == "raw"


# ---- a small classification problem where a single-label client's gradient dies out --------
class ClsNet(torch.nn.Module):
    """Two-class classifier; all matrices named like decoder layers, so the mask may pick them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 16)
        self.layers = torch.nn.ModuleList([
            torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 16)}),
            torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 2)}),
        ])
        self.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.layers[0]["proj"](self.embed(x).mean(1)))
        return self.layers[1]["proj"](h)


class ClsModel:
    """Cross-entropy on a learnable rule (label = 'at least 3 of 6 tokens are < 5'). On one
    label the loss can go to zero (p - e_y -> 0, paper C.6) and the ZO scalars with it; on
    both labels the batch gradients keep their size."""

    def __init__(self):
        self.net = ClsNet()
        self.view = SparseView(dict(self.net.named_parameters()), tiny_mask(self.net, 0.5))
        g = torch.Generator().manual_seed(2)
        self.x = torch.randint(0, 10, (400, 6), generator=g)
        self.y = ((self.x < 5).sum(1) >= 3).long()

    def loss(self, ids):
        return float(torch.nn.functional.cross_entropy(self.net(self.x[ids]), self.y[ids]))


VP_TEST = VPSettings(calibration_steps=60, init_steps=20, later_steps=20, threshold=0.02,
                     quiescent_ratio=0.5, later_ratio=5.0)  # sigma in calib-units of this net


def _cls_setup(seed: int, *, with_single_label: bool, cls=VPServer, vp=VP_TEST):
    model = ClsModel()
    y = model.y.numpy()
    rng = np.random.default_rng(seed)
    zeros = rng.permutation(np.flatnonzero(y == 0))[:80]
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), zeros))
    iid = np.array_split(rest, 4)
    parts = [np.sort(p) for p in ([zeros, *iid[:3]] if with_single_label else iid)]
    states = [ClientState(k, p, ClientDataPointer(len(p), seed=k)) for k, p in enumerate(parts)]
    settings = FedSettings(local_steps=2, lr=0.5, eps=1e-3, batch_size=8, seed=seed, rounds=20)
    server = make_server(cls.method, settings, model.view.gather(), [len(p) for p in parts],
                         calib_grad=torch.randn(model.view.gather().numel(),
                                                generator=torch.Generator().manual_seed(9 + seed)),
                         method_settings=vp)
    return model, states, server


def _round(r, model, states, server, record=None):
    plans = server.plan_round(r)
    routine = get_method(server.method).client(server.vp)  # as a ClientHost runs it
    replies = []
    for p in plans:
        loss = model.loss
        if record is not None and p.client_id == record[0]:
            model.loss = lambda ids, loss=loss: (record[1].append(tuple(int(i) for i in ids)),
                                                 loss(ids))[1]
        replies.append(routine(states[p.client_id], p, model, eps=server.settings.eps,
                               lr=server.settings.lrs(r, len(p.seeds)),
                               batch_size=server.settings.batch_size))
        model.loss = loss
    return plans, replies, apply_round(server, r, replies)


def test_vp_flags_the_single_label_client_early_stops_it_and_its_pointer_covers_its_data():
    # the first two seeds, not picked: the single-label client is flagged, no IID client is
    for seed in (0, 1):
        model, states, server = _cls_setup(seed, with_single_label=True)
        plans, replies, out = _round(1, model, states, server)
        assert [p.num_steps for p in plans] == [60] * 4 and len(plans[0].seeds) == 60
        assert server.detected == [0] and server.stopped == [0], out.extra["log"]
        r0 = server.calibrated[0]
        assert r0.rho_later > 5 and all(server.calibrated[k].rho_later < 5 for k in (1, 2, 3))
        assert out.extra["vp"]["detected"] == [0] and "flags [0]" in out.extra["log"]
    # the VP state survives a checkpoint (JSON metadata)
    tensors, meta = server.state_dict()
    fresh = _cls_setup(1, with_single_label=True)[2]
    fresh.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert fresh.calibrated == server.calibrated and fresh.stopped == server.stopped == [0]
    fresh.plan_round(2)
    server.plan_round(2)  # planned again below: the same plan
    assert fresh.plan == server.plan and fresh.plan.steps == {0: 1, 1: 2, 2: 2, 3: 2}
    # later rounds: the flagged client runs ONE step and uploads ONE scalar; the others run T
    seen: list[tuple[int, ...]] = []
    for r in range(2, 12):
        plans, replies, out = _round(r, model, states, server, record=(0, seen))
        assert [p.num_steps for p in plans] == [1, 2, 2, 2] and len(plans[0].seeds) == 2
        assert len(replies[0].scalars) == 1 and len(replies[0].to_bytes()) == 27 + 4
        assert len(replies[1].to_bytes()) == 27 + 2 * 4
        assert out.client_steps == {0: 1, 1: 2, 2: 2, 3: 2} and "vp" not in out.extra
        assert out.arrays["gradip"].shape == (4, 2) and torch.isnan(out.arrays["gradip"][0, 1])
    # 60 calibration steps x 8 = 6 epochs of its 80 examples; 10 one-step rounds = 1 more epoch
    batches = seen[0::2]  # f+ and f- see the same batch
    assert len(batches) == 10
    assert sorted(i for b in batches for i in b) == sorted(states[0].example_ids.tolist())
    assert states[0].pointer.examples_seen == 70 * 8


def test_vp_flags_no_client_when_all_are_iid():
    model, states, server = _cls_setup(0, with_single_label=False)
    _round(1, model, states, server)
    assert server.detected == [] and len(server.calibrated) == 4
    assert [p.num_steps for p in server.plan_round(2)] == [2] * 4


def test_random_selection_stops_as_many_clients_as_vp_flags_at_random():
    seeds_picked = set()
    for seed in range(6):
        server = RandomSelectServer(FedSettings(2, 0.1, 1e-3, 4, seed), torch.zeros(5), [3] * 10)
        server.detected = [0, 4]
        server._select(1)
        assert len(server.stopped) == 2 and len(set(server.stopped)) == 2
        seeds_picked.add(tuple(server.stopped))
        again = RandomSelectServer(FedSettings(2, 0.1, 1e-3, 4, seed), torch.zeros(5), [3] * 10)
        again.detected = [0, 4]
        again._select(1)
        assert again.stopped == server.stopped  # seeded
        server.detected = [0, 4, 7]  # a later calibration adds one: one more drawn, none dropped
        before = list(server.stopped)
        server._select(3)
        assert len(server.stopped) == 3 and set(before) <= set(server.stopped)
    assert len(seeds_picked) > 1  # not a fixed choice


# ---- end to end through the CLI on the tiny Llama -------------------------------------------
# vp_later_ratio=2 splits this seeded tiny run's four clients (one has rho_later 2.9, the
# others 0.6-1.7): the test pins the mechanics (detect, early-stop, resume), not the detector.
# val_fraction=0: the whole pool trains, as when the ratios above were read off.
VP_ARGS = ("method=meerkat-vp", "partition=mixed-single-label", "vp_calibration_steps=16",
           "vp_init_steps=4", "vp_later_steps=4", "vp_threshold=0", "vp_later_ratio=2",
           "rounds=4", "downlink=scalars", "val_fraction=0")


def test_vp_run_end_to_end_and_resume_bit_identical(tiny_model_dir, sentiment_csv, calib_txt,
                                                    isolated_cache, tmp_path, monkeypatch, capsys):
    import fedmeerkat.runners.run_folder as sim  # checkpoints are written there

    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, full, *VP_ARGS)) == 0
    err = capsys.readouterr().err
    assert "round 1: meerkat-vp calibrated clients [0, 1, 2, 3]" in err
    summary = json.loads((full / "summary.json").read_text())
    stopped = summary["vp_early_stopped"]
    assert stopped == summary["vp_detected"] and 0 < len(stopped) < 4  # some, not all
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["client_steps"] == {str(k): 16 for k in range(4)}
    assert records[1]["vp"]["detected"] == stopped and set(records[1]["vp"]["calibrated"]) == {
        "0", "1", "2", "3"}
    for rec in records[2:]:
        assert rec["client_steps"] == {str(k): 1 if k in stopped else 2 for k in range(4)}
        assert all(up == 27 + 4 * rec["client_steps"][k] for k, (up, _) in rec["bytes"].items())
        assert "vp" not in rec and set(rec["gradip_abs_mean"]) == {"0", "1", "2", "3"}
    traj = load_file(str(full / "trajectories" / "round_00001.safetensors"))
    assert traj["gradip"].shape == (4, 16) and traj["clients"].tolist() == [0, 1, 2, 3]
    assert load_file(str(full / "trajectories" / "round_00003.safetensors"))["gradip"].shape == (4, 2)

    cut = tmp_path / "cut"
    real = sim.save_checkpoint

    def crash_after_round_2(out, server, states, *rest):
        real(out, server, states, *rest)
        if server.round == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sim, "save_checkpoint", crash_after_round_2)
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, cut, *VP_ARGS)) == 130
    monkeypatch.setattr(sim, "save_checkpoint", real)
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    a = load_file(str(full / "final_state.safetensors"))["theta"]
    b = load_file(str(cut / "final_state.safetensors"))["theta"]
    assert torch.equal(a, b)
    rb = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rb == records
    sb = json.loads((cut / "summary.json").read_text())
    assert sb["vp_ratios"] == summary["vp_ratios"] and sb["vp_early_stopped"] == stopped


def test_random_select_run_stops_as_many_as_detected(tiny_model_dir, sentiment_csv, calib_txt,
                                                     isolated_cache, tmp_path):
    out = tmp_path / "rand"
    args = [a if a != "method=meerkat-vp" else "method=meerkat-random-select" for a in VP_ARGS]
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, *args, "rounds=2")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["vp_selection"] == "random" and len(s["vp_early_stopped"]) == len(s["vp_detected"])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["client_steps"] == {str(k): 1 if k in s["vp_early_stopped"] else 2
                                    for k in range(4)}


# ---- vp_calibration = "phase": Algorithm 1's calibration phase as written -------------------
def test_calibration_phase_is_measured_not_aggregated_and_training_matches_meerkat():
    from fedmeerkat.federated import MeerkatServer
    from fedmeerkat.zo import round_seeds

    phase = VPSettings(**{**VP_TEST.__dict__, "calibration": "phase"})
    flagged = []
    for seed in (0, 1):
        model, states, server = _cls_setup(seed, with_single_label=True, vp=phase)
        # plain Meerkat on the same clients, data and seeds
        _, ref_states, _ = _cls_setup(seed, with_single_label=True)
        ref = MeerkatServer(server.settings, model.view.gather(), server.client_sizes)
        plans, replies, out = _round(1, model, states, server)
        # T training seeds (the round's, as Meerkat's) then T_cali calibration seeds
        assert [p.num_steps for p in plans] == [2 + 60] * 4
        assert plans[0].seeds == round_seeds(seed, 1, 62)
        assert server.plan.update_seeds == round_seeds(seed, 1, 2)
        assert all(len(r.scalars) == 62 for r in replies)
        assert out.client_steps == {k: 2 for k in range(4)}  # what was aggregated
        assert out.arrays["calibration_gradip"].shape == (4, 60)
        assert out.arrays["gradip"].shape == (4, 2)  # training steps only
        assert out.extra["vp"]["calibration"] == "phase"
        ref_replies = [run_client(ref_states[p.client_id], p, model, eps=ref.settings.eps,
                                  lr=ref.settings.lrs(1), batch_size=ref.settings.batch_size)
                       for p in ref.plan_round(1)]
        apply_round(ref, 1, ref_replies)
        # the calibration steps moved nothing: the global model and every data pointer are
        # bit for bit those of plain Meerkat, and the training scalars are Meerkat's
        assert torch.equal(server.theta, ref.theta)
        assert [s.pointer.state_dict() for s in states] == [s.pointer.state_dict() for s in ref_states]
        assert [r.scalars[:2] for r in replies] == [r.scalars for r in ref_replies]
        flagged.append(server.detected)
        plans, replies, out = _round(2, model, states, server)
        assert len(plans[0].seeds) == 2 and "vp" not in out.extra
        assert [p.num_steps for p in plans] == [1 if k in server.stopped else 2 for k in range(4)]
    assert flagged == [[0], [0]]  # the single-label client, from the calibration phase's GradIP


def test_calibration_phase_config_checks():
    cfg = load_config(None, ["method=meerkat-vp", "vp_calibration=phase", "local_steps=10"])
    assert cfg.method_settings.calibration == "phase"
    assert load_config(None, ["method=meerkat-vp"]).method_settings.calibration == "round"
    with pytest.raises(ConfigError, match="local_steps <= vp_calibration_steps"):
        load_config(None, ["method=meerkat-vp", "vp_calibration=phase", "local_steps=120"])
    with pytest.raises(ConfigError, match="vp_calibration"):
        load_config(None, ["method=meerkat-vp", "vp_calibration=aggregated"])


def test_calibration_phase_run_on_the_tiny_llama(tiny_model_dir, sentiment_csv, calib_txt,
                                                 isolated_cache, tmp_path):
    out = tmp_path / "phase"
    args = [a for a in VP_ARGS if not a.startswith("rounds=")]
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, *args, "rounds=2",
                      "vp_calibration=phase")) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # round 1: 2 training + 16 calibration scalars up per client, 2 steps aggregated
    assert all(up == 27 + 4 * 18 for up, _ in records[1]["bytes"].values())
    assert records[1]["client_steps"] == {str(k): 2 for k in range(4)}
    assert records[1]["vp"]["calibration"] == "phase"
    traj = load_file(str(out / "trajectories" / "round_00001.safetensors"))
    assert traj["calibration_gradip"].shape == (4, 16) and traj["gradip"].shape == (4, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vp_settings"]["calibration"] == "phase" and len(summary["vp_ratios"]) == 4


def test_planned_steps_bound_what_vp_plans_each_client_and_count_its_calibration_round():
    """Differential privacy solves sigma for BaseServer.planned_steps before a run: what a VP
    server then plans a client (its calibration round, T after, 1 once stopped) never
    exceeds it, and equals it for a client never stopped."""
    model, states, server = _cls_setup(0, with_single_label=True)
    server.settings = dataclasses.replace(server.settings, clients_per_round=2, rounds=8)
    planned = VPServer.planned_steps(server.settings, server.client_sizes, vp=VP_TEST)
    ran = dict.fromkeys(range(4), 0)
    for r in range(1, 9):
        for p in _round(r, model, states, server)[0]:
            ran[p.client_id] += p.num_steps
    assert all(ran[k] <= planned[k] for k in range(4))
    assert all(ran[k] == planned[k] for k in range(4) if k not in server.stopped)
    assert max(planned.values()) >= 60  # a calibration round (60 steps) is counted
    phase = dataclasses.replace(VP_TEST, calibration="phase")
    flat = VPServer.planned_steps(dataclasses.replace(server.settings, clients_per_round=0,
                                                      rounds=3), server.client_sizes,
                                  vp=phase)
    assert flat == dict.fromkeys(range(4), 2 + 60 + 2 * 2)  # T + T_cali first, then T
