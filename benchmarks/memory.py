"""Peak memory of one client's local steps, per method (paper Table 23's "peak RAM" column).

    .venv/bin/python benchmarks/memory.py [--model smollm2-135m|PATH] [--batch 16] [--seq 128]
                                          [--steps 2] [--out benchmarks/results/memory.json]

Each method runs in its own fresh subprocess (ru_maxrss is a per-process high-water mark):
load the model, build the method's trainable space (Meerkat mask at density 1e-3 - a random
mask of the same size, since the mask's choice does not change memory -, LoRA r=16 adapter, or
dense), then run `--steps` local steps on a fixed random batch with the method's own step
function. Reported per method: peak RSS after setup, peak RSS over the steps, and the increase
(`step_extra_mib`), in MiB. The default model is a randomly initialised tiny Llama (hidden 256,
4 layers) so the script runs in seconds on a laptop; pass `--model` for a real one. Numbers
depend on the allocator and thread count: compare methods within one file, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("meerkat", "lora-fedzo", "full-fedzo", "fedavg-backprop", "fedavg-backprop-lora")


def _peak_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (1024 * 1024) if platform.system() == "Darwin" else kb / 1024


def child(method: str, model_spec: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    from fedmeerkat.federated.methods.backprop import masked_gradient
    from fedmeerkat.models.loading import load_model
    from fedmeerkat.models.lora import add_lora, lora_mask
    from fedmeerkat.zo import SparseView, sgd_update, zo_step
    from fedmeerkat.zo.dense import DenseSpace, DenseView, dense_zo_step
    from fedmeerkat.zo.mask_kinds import random_mask

    model, _ = load_model(model_spec)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), generator=gen)

    def loss_tensor():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def loss() -> float:
        with torch.no_grad():
            return float(loss_tensor())

    if method in ("lora-fedzo", "fedavg-backprop-lora"):
        add_lora(model, rank=16, alpha=16, seed=0)
    params = dict(model.named_parameters())
    if method == "full-fedzo":
        view = DenseView(params, DenseSpace.of_model(model))
        theta = None
    else:
        mask = lora_mask(model) if "lora" in method else random_mask(model, density=1e-3)
        view = SparseView(params, mask)
        theta = view.gather()
    if method.startswith("fedavg-backprop"):
        for n in view.mask.names:
            params[n].requires_grad_(True)
    setup = _peak_mib()
    for t in range(steps):
        if method == "full-fedzo":
            dense_zo_step(view, 1000 + t, eps=1e-3, lr=1e-6, loss_fn=loss)
        elif method.startswith("fedavg-backprop"):
            grad = masked_gradient(params, view.mask, loss_tensor())
            sgd_update(theta, grad, 1.0, 1e-6)
            view.write(theta)
        else:
            zo_step(view, theta, 1000 + t, eps=1e-3, lr=1e-6, loss_fn=loss)
    peak = _peak_mib()
    return {"method": method, "trainable": view.nnz, "setup_peak_mib": round(setup, 1),
            "step_peak_mib": round(peak, 1), "step_extra_mib": round(peak - setup, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(ns.child, ns.model, ns.batch, ns.seq, ns.steps)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = ns.model
        if not model:
            from fedmeerkat.models.tiny import save_tiny_llama

            model = str(save_tiny_llama(Path(tmp) / "tiny", num_layers=4, hidden_size=256))
        rows = []
        for method in ns.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--model", model, "--batch",
                   str(ns.batch), "--seq", str(ns.seq), "--steps", str(ns.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from _common import machine

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out.write_text(json.dumps({"command": command, "machine": machine(),
                               "model": ns.model or "tiny-llama(hidden=256, layers=4, random)",
                               "batch": ns.batch, "seq": ns.seq, "steps": ns.steps,
                               "unit": "MiB peak RSS (ru_maxrss)", "results": rows}, indent=2)
                   + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
