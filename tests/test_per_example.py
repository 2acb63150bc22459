"""The per-example estimator (zo_estimator=per-example, zo.per_example): the hooks score each
example at its own direction as written weights would, the step replays bit for bit from
seeds and scalars, each direction's scalar comes from its own examples, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeerkat.config import ConfigError, build_config
from fedmeerkat.zo import SparseMask, SparseView, forwards_per_direction, replay, round_seeds
from fedmeerkat.zo import per_example as pe
from fedmeerkat.zo.per_example import ExampleOffsets, PerExampleError
from fedmeerkat.zo.step import zo_multi_step
from tests.test_zo_core import TinyNet, data, tiny_mask


def _example_losses(net, x, y):
    return ((net(x) - y) ** 2).double().numpy()


# the gather form (whole, and in chunks of 7 values), and the batched-matmul form
@pytest.mark.parametrize("density,dense_share,chunk", [(0.1, 1.1, 1 << 22), (0.1, 1.1, 7),
                                                       (0.5, 0.1, 1 << 22)])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_each_example_sees_its_own_direction_as_written_weights_would(density, dense_share, chunk,
                                                                      p, monkeypatch):
    monkeypatch.setattr(pe, "DENSE_SHARE", dense_share)
    monkeypatch.setattr(pe, "CHUNK_VALUES", chunk)
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net, density))
    x, y = data()
    x, y = x[:4], y[:4]
    theta = view.gather()
    offsets = 0.1 * torch.randn(p, view.nnz, generator=torch.Generator().manual_seed(3))
    hooks = ExampleOffsets(net, view.mask)
    with hooks.applied(offsets):
        got = _example_losses(net, x, y)
    for i in range(4):
        view.write(theta + offsets[i % p])
        want = _example_losses(net, x, y)[i]
        assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-6)
    view.write(theta)
    # outside `applied` the hooks change nothing
    plain = _example_losses(net, x, y)
    hooks.remove()
    assert np.array_equal(plain, _example_losses(net, x, y))


def test_step_replays_bit_for_bit_in_two_forwards_a_step():
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net))
    hooks = ExampleOffsets(net, view.mask)
    x, y = data()
    theta0 = view.gather()
    theta = theta0.clone()
    p, steps = 4, 3
    seeds = round_seeds(0, 1, steps * p)
    lrs = [0.05 / p] * len(seeds)
    calls, scalars = [], []

    def losses(xb, yb):
        calls.append(1)
        return _example_losses(net, xb, yb)

    for t in range(steps):
        xb, yb = x[8 * t:8 * t + 8], y[8 * t:8 * t + 8]  # two examples per direction
        res = zo_multi_step(view, theta, seeds[t * p:(t + 1) * p], eps=1e-2,
                            lrs=lrs[t * p:(t + 1) * p], estimator="per-example",
                            loss_fn=lambda xb=xb, yb=yb: losses(xb, yb), offsets=hooks)
        scalars += [r.g for r in res]
    assert len(calls) == steps * p * forwards_per_direction("per-example", p) == 2 * steps
    rebuilt = replay(theta0, seeds, scalars, lrs)  # the server's replay, unchanged
    assert torch.equal(rebuilt, theta) and not torch.equal(theta, theta0)
    assert torch.equal(view.gather(), theta)


def test_each_scalar_is_its_directions_examples_mean_difference():
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net))
    hooks = ExampleOffsets(net, view.mask)
    x, y = data()
    x, y = x[:6], y[:6]
    theta = view.gather()
    seeds, eps = round_seeds(0, 2, 3), 1e-2
    from fedmeerkat.zo import draw_z
    want = []
    for j, seed in enumerate(seeds):  # direction j has examples j and j + 3
        z = draw_z(seed, view.nnz)
        view.write(theta + eps * z)
        up = _example_losses(net, x, y)
        view.write(theta - eps * z)
        down = _example_losses(net, x, y)
        want.append(float(((up - down) / (2 * eps))[[j, j + 3]].mean()))
    view.write(theta)
    res = zo_multi_step(view, theta.clone(), seeds, eps=eps, lrs=[0.0] * 3,
                        estimator="per-example", loss_fn=lambda: _example_losses(net, x, y),
                        offsets=hooks)
    assert [r.g for r in res] == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_refusals():
    net = TinyNet()
    view = SparseView(dict(net.named_parameters()), tiny_mask(net))
    with pytest.raises(ValueError, match="ExampleOffsets"):
        zo_multi_step(view, view.gather(), [1, 2], eps=1e-2, lrs=[0.1, 0.1],
                      estimator="per-example", loss_fn=lambda: np.zeros(4))
    hooks = ExampleOffsets(net, view.mask)
    with pytest.raises(ValueError, match="multiple of perturbations"):
        zo_multi_step(view, view.gather(), [1, 2], eps=1e-2, lrs=[0.1, 0.1],
                      estimator="per-example", loss_fn=lambda: np.zeros(3), offsets=hooks)
    # a mask on the embedding (not a linear layer's weight) is refused, naming the tensor
    emb = SparseMask(["embed.weight"], [torch.tensor([0, 5])], [(10, 16)])
    with pytest.raises(PerExampleError, match="embed.weight"):
        ExampleOffsets(net, emb)
    assert build_config({"zo_estimator": "per-example", "perturbations": 16,
                         "batch_size": 16}).perturbations == 16
    for bad in ({"perturbations": 1}, {"perturbations": 3, "batch_size": 16},
                {"perturbations": 4, "batch_size": 16, "loss": "centered-ce"},
                {"perturbations": 4, "batch_size": 16, "method": "meerkat-vp"}):
        with pytest.raises(ConfigError):
            build_config({"zo_estimator": "per-example", **bad})
