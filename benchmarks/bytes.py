"""Bytes per client per round for each protocol mode, from the real wire format.

Serializes actual RoundPlan / ClientReply messages (no formulas) for the packaged SmolLM2's
mask size and for the paper's models at density 1e-3 (Table 23 reports 2.50 MB download and
0.078 KB upload per client per round for Qwen2-1.5B), for T in {1, 10, 100}.

A second table (`methods`) gives every registered method and downlink at T=10 beside the
paper's Table 23 (Qwen2-1.5B, 10 clients). Vectors of a billion floats are not serialized: their
size is `RoundPlan.nbytes()` (asserted equal to len(to_bytes()) on small vectors here and in
the tests) or, for vector replies, the serialized header plus 4 bytes per float. Parameter
counts come from the models' published configs (`ARCH`); the packaged SmolLM2's is checked
against the loaded model. Our wire sends float32; Table 23's figures are fp16 values in binary
units (its 2.50 MB = 1.31M masked values x 2 bytes / 2^20), so ours are about twice theirs.

    python benchmarks/bytes.py
"""

from __future__ import annotations

import torch
from _common import write_result

from fedmeerkat.federated.aggregate import Aggregate
from fedmeerkat.federated.messages import ClientReply, RoundPlan, VectorReply
from fedmeerkat.federated.methods import ordered
from fedmeerkat.federated.methods.backprop import BackpropServer
from fedmeerkat.zo import round_seeds


def decoder_matrices(hidden: int, layers: int, kv_dim: int, intermediate: int) -> int:
    """Weights in the 2-D matrices of the decoder blocks (q, k, v, o, gate, up, down)."""
    return layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate)


# eligible = the 2-D weights inside the decoder layers (our default rule), from the models'
# published configs (hidden, layers, kv heads x head dim, MLP width)
MODELS = {
    "SmolLM2-135M (packaged)": decoder_matrices(576, 30, 3 * 64, 1536),
    "Llama-3.2-1B": decoder_matrices(2048, 16, 8 * 64, 8192),
    "Qwen2-1.5B": decoder_matrices(1536, 28, 2 * 128, 8960),
}


def sizes(eligible: int, steps: int, density: float = 1e-3) -> dict:
    nnz = max(1, round(density * eligible))
    seeds = round_seeds(0, 2, steps)
    theta = torch.zeros(nnz)
    agg = Aggregate(1, round_seeds(0, 1, steps), [0.0] * steps, 1.0)
    return {
        "nnz": nnz,
        "upload": len(ClientReply(2, 0, [0.0] * steps, 1000, 0.5).to_bytes()),
        "download_sparse_weights": len(RoundPlan(2, 0, seeds, steps, theta).to_bytes()),
        "download_scalars": len(RoundPlan(2, 0, seeds, steps, None, [agg]).to_bytes()),
        "download_scalars_after_missing_9_rounds": len(
            RoundPlan(11, 0, seeds, steps, None, [agg] * 10).to_bytes()),
    }


# hidden, layers, q width, kv width, MLP width, vocab (tied embeddings), qkv bias, norms/layer
ARCH = {
    "SmolLM2-135M (packaged)": (576, 30, 576, 3 * 64, 1536, 49152, False, 2),
    "Llama-3.2-1B": (2048, 16, 2048, 8 * 64, 8192, 128256, False, 2),
    "Qwen2-1.5B": (1536, 28, 1536, 2 * 128, 8960, 151936, True, 2),
    "Gemma-2-2B": (2304, 26, 8 * 256, 4 * 256, 9216, 256000, False, 4),
}


def arch_counts(hidden, layers, q, kv, mlp, vocab, qkv_bias, norms) -> dict[str, int]:
    """Parameters: all (tied embeddings), the decoder's 2-D matrices (Meerkat's eligible set),
    and a rank-16 LoRA adapter on the seven projections (our lora-fedzo, the paper's r=16)."""
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden),
              (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    matrices = layers * sum(a * b for a, b in shapes)
    lora = layers * sum(16 * (a + b) for a, b in shapes)
    total = (vocab * hidden + hidden + matrices
             + layers * (norms * hidden + (q + 2 * kv if qkv_bias else 0)))
    return {"all": total, "matrices": matrices, "lora_r16": lora}


def _vector_reply_bytes(n: int) -> int:
    header = len(VectorReply(2, 0, torch.zeros(0), 1000, 10, 0.5).to_bytes())
    assert len(VectorReply(2, 0, torch.zeros(7), 1000, 10, 0.5).to_bytes()) == header + 28
    return header + 4 * n


def _plan_bytes(n: int | None, steps: int, catchup: int = 0, applied: int | None = None) -> int:
    seeds = round_seeds(0, 2, steps)
    agg = Aggregate(1, round_seeds(0, 1, steps), [0.0] * steps, 1.0)
    theta = None if n is None else torch.zeros(1).expand(n)  # no memory for a billion floats
    plan = RoundPlan(2, 0, seeds, steps, theta, [agg] * catchup, applied=applied)
    if n is None or n < 10_000:
        assert plan.nbytes() == len(plan.to_bytes())
    return plan.nbytes()


def method_rows(steps: int = 10) -> dict:
    """Bytes per client per round for every method and downlink, per model (T = steps)."""
    up_scalars = len(ClientReply(2, 0, [0.0] * steps, 1000, 0.5).to_bytes())
    rows: dict = {}
    for model, arch in ARCH.items():
        c = arch_counts(*arch)
        nnz = max(1, round(1e-3 * c["matrices"]))
        vec = {"mask": nnz, "lora": c["lora_r16"], "dense": c["all"]}
        out = {}
        for m in ordered():
            n = vec[m.space(m.settings())]
            for d in m.downlinks:
                zo = not issubclass(m.server, BackpropServer)  # first-order: vector replies
                applied = 0 if m.name == "meerkat-feddyn" else None
                down = (_plan_bytes(n, steps, applied=applied) if d == "sparse-weights"
                        else _plan_bytes(None, steps, catchup=1))
                out[f"{m.name}, {d}"] = {"trainable": n, "upload": up_scalars if zo else
                                         _vector_reply_bytes(n), "download": down}
        rows[model] = {"params": c, "mask_nnz": nnz, "methods": out}
    return rows


PAPER_TABLE_23 = {  # Qwen2-1.5B, fp16, 10 clients: upload / download per client per round
    "Full-FedZO": ("0.078 KB", "2.875 GB"), "LoRA-FedZO": ("0.078 KB", "35.22 MB"),
    "MEERKAT (0.1% mask)": ("0.078 KB", "2.50 MB"),
}


def main() -> None:
    import os

    from fedmeerkat.models.loading import load_model

    if os.environ.get("BYTES_SKIP_MODEL") != "1":  # check the formula on the packaged model
        model, _ = load_model("smollm2-135m")
        have = sum(p.numel() for p in model.parameters())
        want = arch_counts(*ARCH["SmolLM2-135M (packaged)"])["all"]
        assert have == want, (have, want)
    rows = {}
    for model, eligible in MODELS.items():
        for steps in (1, 10, 100):
            rows[f"{model}, T={steps}"] = sizes(eligible, steps)
    for k, v in rows.items():
        print(f"{k:<36} nnz {v['nnz']:>9,}  up {v['upload']:>5} B  down: vector "
              f"{v['download_sparse_weights']:>10,} B, scalars {v['download_scalars']:>5} B")
    methods = method_rows(10)
    for model, r in methods.items():
        for name, v in r["methods"].items():
            print(f"{model:<24} {name:<40} up {v['upload']:>13,} B  down {v['download']:>14,} B")
    write_result("bytes", {"density": 1e-3, "rows": rows, "methods_T10": methods,
                           "paper_table_23": PAPER_TABLE_23})


if __name__ == "__main__":
    main()
