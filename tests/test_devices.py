"""Device-resident hot path and the whole pipeline on every device this machine has.

Each test runs on the CPU here and on CUDA where a GPU is present (the CUDA cases skip without
one and say so). CI has no GPU: these bodies are exercised on the CPU there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmeerkat.cli.main import main
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings, MeerkatServer, RoundPlan, run_client
from fedmeerkat.zo import SparseView, topk_global, zo_step
from fedmeerkat.zo.dense import DenseSpace, DenseView, dense_zo_step, tensor_z
from fedmeerkat.zo.step import eps_resolution_warning
from tests.test_cli import _args
from tests.test_federated import apply_round
from tests.test_zo_core import TinyNet, data, tiny_mask

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: CUDA half of the device tests skipped"))
DEVICES = ["cpu", CUDA]


class DeviceNet:
    """LocalModel over TinyNet on `device`."""

    def __init__(self, device: str, density: float = 0.5, dtype=torch.float32):
        self.net = TinyNet().to(device=device, dtype=dtype)
        self.view = SparseView(dict(self.net.named_parameters()), tiny_mask(self.net, density))
        x, y = data()
        self.x, self.y = x.to(device), y.to(device, dtype)  # x: token ids

    def loss(self, ids: np.ndarray) -> float:
        return float(((self.net(self.x[ids]) - self.y[ids]) ** 2).float().mean())


@pytest.mark.parametrize("device", DEVICES)
def test_view_is_one_buffer_and_one_index(device):
    model = DeviceNet(device)
    view = model.view
    assert len(view._groups) == 1  # both masked matrices live in one buffer
    buf, index, _ = view._groups[0]
    assert buf.device.type == device and index.device.type == device
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    theta = view.gather()
    assert theta.device.type == device and theta.dtype == torch.float32
    view.write(theta + 1)
    for name, idx, _ in view.mask.slices():
        p = dict(model.net.named_parameters())[name].detach().reshape(-1)
        assert torch.equal(p[idx.to(device)], before[name].reshape(-1)[idx.to(device)] + 1)
    # a second view of the same model shares the buffer instead of re-homing again
    again = SparseView(dict(model.net.named_parameters()), view.mask)
    assert again._groups[0][0].data_ptr() == buf.data_ptr()
    again.write(theta)
    assert torch.equal(view.gather(), theta)
    # a model whose tensors were re-allocated is refused, not silently missed
    model.net.to(torch.float64)
    with pytest.raises(RuntimeError, match="re-allocated"):
        view.write(theta)


@pytest.mark.parametrize("device", DEVICES)
def test_loaded_model_is_one_buffer_on_the_device(device, tiny_model_dir):
    """load_model moves the packed buffer as one tensor: the parameters stay views of one
    storage on the device (model.to() would allocate each apart) and hold a plain load's values."""
    from transformers import AutoModelForCausalLM

    from fedmeerkat.models import load_model
    from fedmeerkat.models.packing import storage_groups

    model, _ = load_model(tiny_model_dir, device=device)
    params = list(model.parameters())
    assert all(p.device.type == device for p in params)
    # all but the tied embedding, which stays a lazily mapped view of the file
    assert sorted(len(g) for g in storage_groups(model).values()) == [1, len(params) - 1]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device)
    got = model.state_dict()
    for name, want in plain.state_dict().items():
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("device", DEVICES)
def test_step_stays_on_the_device(device):
    model = DeviceNet(device)
    theta = model.view.gather()
    ids = np.arange(8)
    res = zo_step(model.view, theta, 123, eps=1e-2, lr=0.05, loss_fn=lambda: model.loss(ids))
    assert theta.device.type == device and np.isfinite(res.g)
    assert torch.equal(model.view.gather(), theta)  # the model holds the master copy's values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("server_device", ["cpu", CUDA])
def test_clients_on_one_device_server_on_another_agree_bit_for_bit(device, server_device):
    """downlink=scalars: each client's copy (on the model's device) equals the server's (on its
    own device) after every round, and the sparse-weights run gives the same model."""
    model = DeviceNet(device)
    parts = np.array_split(np.arange(32), 4)
    theta0 = model.view.gather()
    states = [ClientState(i, p, ClientDataPointer(len(p), seed=i), theta0.clone())
              for i, p in enumerate(parts)]
    settings = FedSettings(local_steps=3, lr=0.05, eps=1e-2, batch_size=4, seed=1, rounds=3,
                           downlink="scalars", device=server_device)
    server = MeerkatServer(settings, theta0, [len(p) for p in parts])
    assert server.theta.device.type == server_device
    for r in range(1, 4):
        replies = []
        for plan in server.plan_round(r):
            plan = RoundPlan.from_bytes(plan.to_bytes())
            replies.append(run_client(states[plan.client_id], plan, model, eps=1e-2,
                                      lr=settings.lrs(r), batch_size=4))
            assert torch.equal(states[plan.client_id].theta.cpu(), server.theta.cpu())
        apply_round(server, r, replies)
    assert not torch.equal(server.theta.cpu(), theta0.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_topk_and_masks_on_the_device(device):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(50, generator=g).to(device), "b": torch.rand(7, 3, generator=g).to(device)}
    got = topk_global(scores, 12)
    flat = torch.cat([scores["a"].cpu(), scores["b"].cpu().reshape(-1)])
    want = set(torch.topk(flat, 12).indices.tolist())
    assert {int(i) for i in got["a"]} | {50 + int(i) for i in got["b"]} == want
    assert all(v.device.type == "cpu" and v.dtype == torch.int64 for v in got.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_step_on_the_device_keeps_fp32_masters_in_half_precision(device, dtype):
    net = TinyNet().to(device=device, dtype=dtype)
    params = dict(net.named_parameters())
    space = DenseSpace.of_model(net)
    view = DenseView(params, space)
    theta0 = view.gather()
    assert theta0.device.type == device and theta0.dtype == torch.float32
    x, y = data()
    x, y = x.to(device), y.to(device, dtype)

    def loss() -> float:
        return float(((net(x) - y) ** 2).float().mean())

    res = dense_zo_step(view, 77, eps=1e-2, lr=0.05, loss_fn=loss)
    theta1 = view.gather()
    if dtype == torch.bfloat16:
        # the fp32 master took exactly the update lr*g*z; the model holds it rounded once
        z = torch.cat([tensor_z(77, i, p.numel(), device) for i, p in enumerate(params.values())])
        want = theta0 - z * torch.tensor(0.05 * res.g, dtype=torch.float32)
        assert torch.equal(theta1, want)
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params.values()]),
                           theta1.to(dtype))
    else:
        assert torch.isfinite(theta1).all() and not torch.equal(theta1, theta0)


def test_eps_below_the_dtype_resolution_is_warned_about():
    theta = torch.full((1000,), 0.05)  # bf16 spacing there: 2^-5 * 2^-7 = 2.4e-4
    assert eps_resolution_warning(theta, 1e-3, torch.float32) is None
    assert eps_resolution_warning(theta, 1e-3, torch.bfloat16) is None
    msg = eps_resolution_warning(theta, 1e-4, torch.bfloat16)
    assert msg is not None and "eps=0.0001" in msg and "float32" in msg
    assert eps_resolution_warning(theta, 1e-4, torch.float16) is None  # fp16 spacing 3e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [
    ("downlink=scalars",),
    ("method=full-fedzo", "downlink=scalars"),
    ("method=lora-fedzo",),
    ("method=meerkat-feddyn",),
    ("method=fedavg-backprop",),
    ("method=meerkat-vp", "vp_calibration_steps=4", "vp_init_steps=1", "vp_later_steps=1"),
    ("mask_kind=weight-magnitude",),
    ("mask_kind=random",),
    ("mask_kind=task",),
    ("mask_kind=union",),
    ("mask_kind=task-gradient", "mask_examples=8"),
], ids=lambda e: "-".join(x.split("=")[1] for x in e))
def test_whole_tiny_pipeline_on_the_device(device, extra, tiny_model_dir, sentiment_csv,
                                           calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, f"device={device}",
                      "rounds=2", *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    theta = load_file(str(out / "final_state.safetensors"))["theta"]
    assert torch.isfinite(theta).all() and theta.numel() == summary["mask_nnz"]
    capsys.readouterr()
    assert main(["eval", str(out), f"device={device}"] if device != "cpu" else ["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == summary["final_accuracy"]
