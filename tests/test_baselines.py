"""Baselines (full-fedzo, lora-fedzo, fedavg-backprop, meerkat-feddyn): end to end on a tiny
Llama, trainable-space sizes, byte counts recomputed from the wire format, exactness."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmeerkat.cli.main import main
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings, RoundPlan
from fedmeerkat.federated.messages import ClientReply, VectorReply
from fedmeerkat.federated.methods.feddyn import (
    H_KEY,
    PENDING_KEY,
    FedDynServer,
    replay_feddyn,
    run_client_feddyn,
    settle_pending,
)
from fedmeerkat.federated.methods.full_fedzo import FullFedZOServer, run_client_dense
from fedmeerkat.zo import draw_z, eligible_parameters, round_seeds
from fedmeerkat.zo.dense import DenseSpace, DenseView, tensor_z
from fedmeerkat.zo.seeds import mix
from tests.test_cli import _args
from tests.test_federated import NetModel, apply_round
from tests.test_zo_core import TinyNet, data

T = 2  # local_steps in _args


def _run(tmp_path, name, tiny_model_dir, sentiment_csv, calib_txt, *extra):
    out = tmp_path / name
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, *extra)) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records, json.loads((out / "summary.json").read_text())


def _tiny_params(tiny_model_dir):
    from fedmeerkat.models.loading import load_model

    model, _ = load_model(tiny_model_dir)
    return dict(model.named_parameters()), model.config


def _lora_count(config, rank):
    """r * (in + out) per adapted projection, from the model config alone."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return config.num_hidden_layers * sum(rank * (a + b) for a, b in shapes)


def _plan_bytes(n_seeds, theta_numel=None):
    """A plan: header 5, round/client/steps/n 12, seeds 8 each, has_theta 1, [n 4 + 4 each],
    n_catchup 2."""
    size = 5 + 12 + 8 * n_seeds + 1 + 2
    return size + (4 + 4 * theta_numel if theta_numel is not None else 0)


@pytest.mark.parametrize("method,extra", [
    ("full-fedzo", ()),
    ("lora-fedzo", ()),
    ("fedavg-backprop", ()),
    ("meerkat-feddyn", ()),
])
def test_method_runs_end_to_end_with_honest_bytes(method, extra, tiny_model_dir, sentiment_csv,
                                                  calib_txt, isolated_cache, tmp_path, capsys):
    out, records, summary = _run(tmp_path, method, tiny_model_dir, sentiment_csv, calib_txt,
                                 f"method={method}", *extra)
    params, config = _tiny_params(tiny_model_dir)
    nnz = summary["mask_nnz"]
    if method == "full-fedzo":  # every parameter (tied embeddings counted once)
        assert nnz == sum(p.numel() for p in params.values()) and summary["density"] == 1.0
        assert summary["trainable_space"] == "dense"
    elif method == "lora-fedzo":
        assert nnz == _lora_count(config, 16) and summary["trainable_space"] == "lora"
    else:  # the Meerkat mask: exact count k = round(density * eligible) over decoder matrices
        eligible = sum(p.numel() for _, p in eligible_parameters(params.items()))
        assert nnz == max(1, round(0.01 * eligible)) and summary["trainable_space"] == "mask"
        assert summary["density"] == pytest.approx(nnz / eligible)
    theta = load_file(str(out / "final_state.safetensors"))["theta"]
    assert theta.numel() == nnz and torch.isfinite(theta).all()
    for rec in records[1:]:
        assert rec["client_steps"] == {str(k): T for k in range(4)}
        for up, down in rec["bytes"].values():
            # downlink sparse-weights: seeds + the whole trainable vector in float32; FedDyn's
            # plans add the acknowledgement of the client's last applied round (u32, wire v2)
            assert down == _plan_bytes(T, nnz) + (4 if method == "meerkat-feddyn" else 0)
            if method == "fedavg-backprop":  # header 5, IIQfHI 26, the vector
                assert up == 5 + 26 + 4 * nnz
            else:  # header 5, IIQfH 22, T scalars
                assert up == 5 + 22 + 4 * T
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # the run folder rebuilds the same space
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["final_accuracy"]


def test_fedavg_backprop_on_lora_and_full_fedzo_on_scalars(tiny_model_dir, sentiment_csv,
                                                           calib_txt, isolated_cache, tmp_path):
    _, _, s = _run(tmp_path, "bp-lora", tiny_model_dir, sentiment_csv, calib_txt,
                   "method=fedavg-backprop", "trainable=lora", "lora_rank=4", "rounds=2")
    _, config = _tiny_params(tiny_model_dir)
    assert s["mask_nnz"] == _lora_count(config, 4)
    assert s["upload_bytes_per_client"] == 31 + 4 * s["mask_nnz"]
    _, records, s = _run(tmp_path, "dense-scalars", tiny_model_dir, sentiment_csv, calib_txt,
                         "method=full-fedzo", "downlink=scalars", "clients_per_round=2",
                         "rounds=2")
    assert all(up == 27 + 4 * T for rec in records[1:] for up, _ in rec["bytes"].values())
    # round 1: no aggregate to send yet, round 2: the previous round's T+1 floats (no model)
    assert all(down == _plan_bytes(T) for _, down in records[1]["bytes"].values())
    assert all(down < 200 for _, down in records[2]["bytes"].values())


def test_vector_reply_wire_format():
    reply = VectorReply(3, 1, torch.randn(10), 40, 5, 0.25)
    blob = reply.to_bytes()
    assert len(blob) == 5 + struct.calcsize("<IIQfHI") + 40
    back = VectorReply.from_bytes(blob)
    assert torch.equal(back.vector, reply.vector) and back.num_steps == 5
    with pytest.raises(ValueError, match="expected a v1"):
        ClientReply.from_bytes(blob)


@pytest.mark.parametrize("bad", [["method=fedavg-backprop", "downlink=scalars"],
                                 ["method=meerkat-feddyn", "downlink=scalars"],
                                 ["trainable=lora"]])
def test_config_refuses_impossible_combinations(bad, capsys):
    assert main(["run", "--dry-run", *bad]) == 2
    assert "config error" in capsys.readouterr().err


class DenseNetModel:
    """LocalModel over all of TinyNet's parameters (the full-fedzo space)."""

    def __init__(self):
        self.net = TinyNet()
        params = dict(self.net.named_parameters())
        self.view = DenseView(params, DenseSpace.of_model(self.net))
        self.x, self.y = data()

    def loss(self, ids):
        return float(((self.net(self.x[ids]) - self.y[ids]) ** 2).mean())


def _states(theta0, k, keep):
    parts = np.array_split(np.arange(32), k)
    return [ClientState(i, p, ClientDataPointer(len(p), seed=i), theta0.clone() if keep else None)
            for i, p in enumerate(parts)]


def test_dense_z_is_per_tensor_and_seeded():
    model = DenseNetModel()
    space = model.view.mask
    assert space.nnz == sum(p.numel() for p in model.net.parameters())
    z = tensor_z(123, 2, 16)
    assert torch.equal(z, draw_z(mix(123, 2), 16)) and not torch.equal(z, tensor_z(123, 3, 16))


def test_full_fedzo_scalars_copies_are_bit_identical_and_match_the_vector_mode():
    finals = {}
    for downlink in ("scalars", "sparse-weights"):
        model = DenseNetModel()
        theta0 = model.view.gather()
        keep = downlink == "scalars"
        states = _states(theta0, 4, keep)
        settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=1, rounds=4,
                               downlink=downlink, clients_per_round=2, weight_decay=0.1)
        server = FullFedZOServer(settings, theta0, [s.num_samples for s in states],
                                 space=model.view.mask)
        for r in range(1, 5):
            replies = []
            for plan in server.plan_round(r):
                plan = RoundPlan.from_bytes(plan.to_bytes())
                if not keep:
                    assert plan.theta is not None and plan.theta.numel() == theta0.numel()
                replies.append(run_client_dense(states[plan.client_id], plan, model,
                                                eps=settings.eps, lr=settings.lrs(r),
                                                batch_size=4, weight_decay=0.1))
                if keep:  # the client's copy equals the server's, bit for bit (catch-up too)
                    assert plan.theta is None
                    assert torch.equal(states[plan.client_id].theta, server.theta)
            apply_round(server, r, replies)
            model.view.write(server.theta)
        finals[downlink] = server.theta
    assert not torch.equal(finals["scalars"], theta0)
    assert torch.equal(finals["scalars"], finals["sparse-weights"])  # same ops in both modes


def test_full_fedzo_aggregate_equals_mean_of_exact_dense_paths():
    model = DenseNetModel()
    theta0 = model.view.gather()
    states = _states(theta0, 2, False)
    settings = FedSettings(local_steps=2, lr=0.05, eps=1e-2, batch_size=4, seed=3)
    server = FullFedZOServer(settings, theta0, [s.num_samples for s in states],
                             space=model.view.mask)
    replies = [run_client_dense(states[p.client_id], p, model, eps=1e-2, lr=settings.lrs(1),
                                batch_size=4) for p in server.plan_round(1)]
    apply_round(server, 1, replies)
    space, seeds = model.view.mask, round_seeds(3, 1, 2)
    want = torch.zeros_like(theta0, dtype=torch.float64)
    for reply, w in zip(replies, [0.5, 0.5], strict=True):
        theta = theta0.double().clone()
        for t, g in enumerate(reply.scalars):
            z = torch.cat([tensor_z(seeds[t], i, space.offsets[i + 1] - space.offsets[i])
                           for i in range(len(space.names))]).double()
            theta -= 0.05 * g * z
        want += w * theta
    assert torch.allclose(server.theta.double(), want, atol=1e-6)


def test_feddyn_server_replay_equals_client_result():
    model = NetModel(density=0.5)
    theta0 = model.view.gather()
    states = _states(theta0, 3, False)
    settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=2, rounds=3,
                           clients_per_round=2, weight_decay=0.01)
    server = FedDynServer(settings, theta0, [s.num_samples for s in states], alpha=0.1)
    for r in range(1, 4):
        replies, finals = [], {}
        theta_g = server.theta.clone()
        h_before = {k: h.clone() for k, h in enumerate(server.h_clients)}
        for plan in server.plan_round(r):
            plan = RoundPlan.from_bytes(plan.to_bytes())
            replies.append(run_client_feddyn(states[plan.client_id], plan, model,
                                             eps=settings.eps, lr=settings.lrs(r), batch_size=4,
                                             alpha=0.1, weight_decay=0.01))
            finals[plan.client_id] = model.view.gather()
        for reply in replies:  # the virtual path from seeds, scalars and the mirrored h_k
            h = h_before[reply.client_id].clone()
            got = replay_feddyn(theta_g, plan.seeds, reply.scalars, settings.lrs(r), h, 0.1, 0.01)
            assert torch.equal(got, finals[reply.client_id])
            # the client's h_k update waits for the server's acknowledgement (pending)
            pending = states[reply.client_id].extra[PENDING_KEY]
            assert torch.equal(h, h_before[reply.client_id] - pending)
        apply_round(server, r, replies)
        for s in states:  # what each client's next plan acknowledges: every reply applied
            settle_pending(s, server.applied[s.client_id])
        for s in states:  # the server's mirror of every h_k equals the client's own, bit for bit
            assert torch.equal(server.h_clients[s.client_id],
                               s.extra.get(H_KEY, torch.zeros_like(theta0)))
        # theta_g <- mean(theta_k) - h/alpha
        w = np.array([states[r_.client_id].num_samples for r_ in replies], dtype=float)
        mean = sum(torch.tensor(x / w.sum(), dtype=torch.float32) * finals[r_.client_id]
                   for x, r_ in zip(w, replies, strict=True))
        assert torch.allclose(server.theta, mean - server.h / 0.1, atol=1e-6)
    assert server.h.abs().sum() > 0


@pytest.mark.parametrize("method", ["meerkat-feddyn", "lora-fedzo"])
def test_baseline_resumes_bit_identical(method, tiny_model_dir, sentiment_csv, calib_txt,
                                        isolated_cache, tmp_path, monkeypatch):
    import fedmeerkat.runners.run_folder as sim  # checkpoints are written there

    extra = (f"method={method}", "rounds=3", "clients_per_round=3")
    full, _, _ = _run(tmp_path, "full", tiny_model_dir, sentiment_csv, calib_txt, *extra)
    real = sim.save_checkpoint

    def crash_after_round_1(out, server, states, *rest):
        real(out, server, states, *rest)
        if server.round == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sim, "save_checkpoint", crash_after_round_1)
    cut = tmp_path / "cut"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, cut, *extra)) == 130
    monkeypatch.setattr(sim, "save_checkpoint", real)
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    assert torch.equal(load_file(str(full / "final_state.safetensors"))["theta"],
                       load_file(str(cut / "final_state.safetensors"))["theta"])


def test_decomfl_config_is_the_decomfl_setting():
    from pathlib import Path

    from fedmeerkat.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "decomfl.toml")
    assert (cfg.clients, cfg.clients_per_round, cfg.local_steps, cfg.alpha, cfg.downlink) == (
        8, 2, 1, 1.0, "scalars")


def test_z_cache_changes_no_bit_of_a_full_fedzo_run(tiny_model_dir, sentiment_csv, calib_txt,
                                                     isolated_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fedmeerkat.zo import dense

    draws = []
    real = dense.draw_z
    monkeypatch.setattr(dense, "draw_z", lambda *a, **k: draws.append(1) or real(*a, **k))
    finals = {}
    for mb in (0, 64):
        draws.clear()
        out, _, s = _run(tmp_path, f"cache{mb}", tiny_model_dir, sentiment_csv, calib_txt,
                         "method=full-fedzo", f"z_cache_mb={mb}")
        theta = load_file(out / "final_state.safetensors")["theta"]
        finals[mb] = (theta, s["final_accuracy"], len(draws))
    assert torch.equal(finals[64][0], finals[0][0]) and finals[64][1] == finals[0][1]
    # without the cache every client draws each z 3x a step and the server once more
    assert finals[64][2] * 3 < finals[0][2]
