"""GradIP from the server's replay (federated/gradip.py) and the `fedmeerkat gradip` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmeerkat.cli.main import main
from fedmeerkat.federated import run_client
from fedmeerkat.federated.gradip import GradIPRecorder, moving_average
from fedmeerkat.zo import draw_z
from tests.test_federated import _setup, apply_round


@pytest.mark.parametrize("downlink", ["sparse-weights", "scalars"])
def test_server_gradip_equals_brute_force_inner_product(downlink, monkeypatch):
    import dataclasses

    model, states, settings, server = _setup()
    server.settings = dataclasses.replace(settings, downlink=downlink)
    if downlink == "scalars":
        for s in states:
            s.theta = server.theta.clone()
    monkeypatch.setattr(server, "steps_for", lambda r, k: 1 if k == 1 else settings.local_steps)
    n = server.theta.numel()
    c = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.7
    server.calib_grad = c
    seen = []  # an observer set by someone else still gets every z
    server.step_observer = lambda t, z: seen.append(t)
    replies = [run_client(states[p.client_id], p, model, eps=settings.eps, lr=settings.lrs(1),
                          batch_size=settings.batch_size) for p in server.plan_round(1)]
    out = apply_round(server, 1, replies)
    assert seen == [0, 1, 2]
    arr = out.arrays
    assert arr["clients"].tolist() == [0, 1, 2] and arr["clients"].dtype == torch.int64
    assert arr["gradip"].shape == (3, settings.local_steps) and arr["gradip"].dtype == torch.float32
    c64 = c.to(torch.float64)
    for i, reply in enumerate(replies):
        for t in range(settings.local_steps):
            if t >= len(reply.scalars):
                assert torch.isnan(arr["gradip"][i, t]) and torch.isnan(arr["cosine"][i, t])
                continue
            est = reply.scalars[t] * draw_z(server.seeds(1)[t], n).to(torch.float64)  # g * z
            want = float(c64 @ est)
            assert float(arr["gradip"][i, t]) == pytest.approx(want, rel=1e-5, abs=1e-9)
            assert float(arr["norm"][i, t]) == pytest.approx(float(est.norm()), rel=1e-5)
            cos = want / (float(c64.norm()) * float(est.norm()))
            assert float(arr["cosine"][i, t]) == pytest.approx(cos, rel=1e-4, abs=1e-7)
    assert float(arr["calib_norm"][0]) == pytest.approx(float(c64.norm()), rel=1e-6)
    means = out.extra["gradip_abs_mean"]
    assert set(means) == {"0", "1", "2"}
    assert means["1"] == pytest.approx(abs(float(arr["gradip"][1, 0])), rel=1e-6)


def test_no_gradip_without_a_matching_calibration_gradient():
    model, states, settings, server = _setup()
    replies = [run_client(states[p.client_id], p, model, eps=settings.eps, lr=settings.lrs(1),
                          batch_size=settings.batch_size) for p in server.plan_round(1)]
    assert apply_round(server, 1, replies).arrays == {}  # no calib_grad: nothing computed
    model, states, settings, server = _setup()
    server.calib_grad = torch.ones(3)  # another space (e.g. a dense method): left alone
    replies = [run_client(states[p.client_id], p, model, eps=settings.eps, lr=settings.lrs(1),
                          batch_size=settings.batch_size) for p in server.plan_round(1)]
    out = apply_round(server, 1, replies)
    assert out.arrays == {} and "gradip_abs_mean" not in out.extra


def test_recorder_and_moving_average():
    rec = GradIPRecorder(torch.tensor([3.0, 4.0]))
    rec(0, torch.tensor([1.0, 0.0]))
    rec(1, torch.tensor([0.0, 2.0]))
    arr = rec.trajectories([7], [[2.0, -0.5]], 3)
    assert arr["gradip"][0, :2].tolist() == [6.0, -4.0] and torch.isnan(arr["gradip"][0, 2])
    assert arr["norm"][0, :2].tolist() == [2.0, 1.0]
    assert arr["cosine"][0, :2].tolist() == pytest.approx([0.6, -0.8])
    with pytest.raises(ValueError, match="no z observed"):
        rec.trajectories([0], [[1.0, 1.0, 1.0]], 3)
    ma = moving_average([1, 2, 3, 4], 2)
    assert np.isnan(ma[0]) and ma[1:].tolist() == [1.5, 2.5, 3.5]


def test_gradip_command_writes_png_and_json(tiny_model_dir, sentiment_csv, calib_txt,
                                            isolated_cache, tmp_path, capsys):
    out = tmp_path / "gradip"
    args = ["gradip", f"model={tiny_model_dir}", "task=local", f"data_files={sentiment_csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib_txt}", "calib_sequences=4", "calib_seq_len=32",
            "density=0.01", "batch_size=4", "lr=0.05", f"out={out}", "vp_init_steps=4",
            "vp_later_steps=4", "--steps", "12", "--window", "3", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"gradip plot: {out / 'gradip.png'}" in printed and "single-label" in printed
    assert (out / "gradip.png").stat().st_size > 10_000
    res = json.loads((out / "gradip.json").read_text())
    assert [c["name"] for c in res["clients"]] == ["iid", "single-label"]
    iid, single = res["clients"]
    assert single["label_histogram"][1] == 0 and single["label_histogram"][0] > 0
    assert min(iid["label_histogram"]) > 0
    for c in res["clients"]:
        assert len(c["gradip"]) == len(c["norm"]) == len(c["cosine"]) == len(c["loss"]) == 12
        assert all(np.isfinite(c["gradip"])) and {"rho_later", "rho_quie", "flagged"} <= set(c["vp"])
    assert main(args[:-5] + ["--steps", "0"]) == 2  # bad flag: one clear line
