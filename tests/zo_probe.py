"""A separate process for the portability tests (tests/test_rng.py): run under a chosen
ATEN_CPU_CAPABILITY and thread count, it draws z, runs a client, or replays one, and prints
JSON. Not a test module itself.

    python tests/zo_probe.py hash THREADS
    python tests/zo_probe.py client NET.safetensors OUT.safetensors
    python tests/zo_probe.py replay NET.safetensors CLIENT.safetensors OUT.safetensors
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from fedmeerkat.zo import SparseMask, SparseView, draw_z, replay, rng, round_seeds, zo_step

# (seed, n, offset): small, a million, the top seed, and a far offset (counter words 1 and 2)
GOLDEN_CASES = [(0, 1000, 0), (12345, 1_000_000, 0), (2**63 - 1, 4099, 3),
                (0xDEADBEEFCAFE, 100_003, 2**33 + 1)]
STEPS, LR, EPS = 12, 0.05, 1e-2


def z_hash(seed: int, n: int, offset: int = 0, device: str = "cpu") -> str:
    z = draw_z(seed, n, offset=offset, device=device).cpu()
    return hashlib.sha256(z.numpy().tobytes()).hexdigest()[:32]


def _net(path: str) -> tuple[dict[str, torch.Tensor], SparseMask, torch.Tensor, torch.Tensor]:
    t = load_file(path)
    params = {"layers.0.w": t["w0"], "layers.1.w": t["w1"]}
    mask = SparseMask(list(params), [t["idx0"], t["idx1"]], [tuple(p.shape) for p in params.values()])
    return params, mask, t["x"], t["y"]


def _client(net: str, out: str) -> dict:
    params, mask, x, y = _net(net)
    view = SparseView(params, mask)
    theta = view.gather()

    def loss() -> float:
        h = torch.tanh(x @ params["layers.0.w"].T)
        return float(((h @ params["layers.1.w"].T - y) ** 2).mean())

    scalars = [zo_step(view, theta, s, eps=EPS, lr=LR, loss_fn=loss).g
               for s in round_seeds(7, 1, STEPS)]
    save_file({"theta": theta, "scalars": torch.tensor(scalars, dtype=torch.float64)}, out)
    return {"scalars": scalars}


def _replay(net: str, client: str, out: str) -> dict:
    params, mask, _, _ = _net(net)
    theta0 = SparseView(params, mask).gather()
    scalars = load_file(client)["scalars"].tolist()
    theta = replay(theta0, round_seeds(7, 1, STEPS), scalars, LR)
    save_file({"theta": theta}, out)
    return {}


def main() -> None:
    mode = sys.argv[1]
    info = {"capability": torch.backends.cpu.get_cpu_capability()}
    if mode == "hash":
        torch.set_num_threads(int(sys.argv[2]))
        info["threads"] = torch.get_num_threads()
        info["hashes"] = [z_hash(*case) for case in GOLDEN_CASES]
        info["z_compiled"] = rng.compiled_kernel() is not None  # FEDMEERKAT_Z_COMPILE decides
    elif mode == "client":
        info.update(_client(sys.argv[2], sys.argv[3]))
    elif mode == "replay":
        info.update(_replay(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
