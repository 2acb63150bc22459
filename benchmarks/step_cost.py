"""Cost of the hot path on the packaged SmolLM2 (CPU): forwards, a sparse ZO step, the server.

Measures, on a real batch of 16 Rotten Tomatoes prompts:
  - a forward with full logits vs. the label-word scoring forward (hidden state x 2 LM-head rows);
  - a sparse ZO step at density 1e-3 (two scoring forwards + z + index writes), as a multiple of
    two scoring forwards;
and, with no model, the server side for K=10 clients x T steps at SmolLM2's mask size:
  - replaying every client's virtual path (z drawn once per step, shared);
  - aggregating the scalars first (the `scalars` downlink), one z pass.

    python benchmarks/step_cost.py [--steps T]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import timeit, write_result

from fedmeerkat.federated.aggregate import aggregate_scalars, apply_aggregate
from fedmeerkat.models.loading import load_model
from fedmeerkat.models.scoring import LabelScorer, encode_prompts
from fedmeerkat.tasks import load_task
from fedmeerkat.zo import (
    SparseMask,
    SparseView,
    eligible_parameters,
    replay_many,
    round_seeds,
    topk_global,
    zo_step,
)


def magnitude_mask(model, density: float) -> SparseMask:
    """A mask of the right size without a calibration pass (only the size matters here)."""
    params = eligible_parameters(model.named_parameters())
    k = round(density * sum(p.numel() for _, p in params))
    chosen = topk_global({n: p.detach().abs().cpu() for n, p in params}, k)  # any device
    return SparseMask([n for n, _ in params], [chosen[n] for n, _ in params],
                      [tuple(p.shape) for _, p in params])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="T for the server-side measurement")
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    task = load_task("rotten_tomatoes", max_train=64)
    scorer = LabelScorer(model, tok, task.spec.label_words)
    ex = task.train[:16]
    ids = encode_prompts(tok, [task.spec.render(e) for e in ex], 64)
    batch = scorer.collate(ids, [e.label for e in ex])
    tokens = float(batch.attention_mask.sum())

    def full_forward():
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    res: dict = {"batch": {"size": 16, "mean_tokens": tokens / 16, "padded_width": batch.input_ids.shape[1]}}
    res["forward_full_logits"] = timeit(full_forward)
    res["forward_label_scoring"] = timeit(lambda: scorer.loss(batch))

    mask = magnitude_mask(model, 1e-3)
    view = SparseView(dict(model.named_parameters()), mask)
    theta0 = view.gather()
    theta = theta0.clone()
    seeds = iter(round_seeds(0, 1, 1000))
    res["sparse_zo_step"] = timeit(lambda: zo_step(view, theta, next(seeds), eps=1e-3, lr=1e-6,
                                                   loss_fn=lambda: scorer.loss(batch)))
    view.write(theta0)
    res["sparse_zo_step"]["x_two_scoring_forwards"] = (
        res["sparse_zo_step"]["median_s"] / (2 * res["forward_label_scoring"]["median_s"]))
    res["mask_nnz"] = mask.nnz

    # server side, no model: K clients x T steps at this mask size
    k, t = args.clients, args.steps
    rng = np.random.default_rng(0)
    scal = rng.standard_normal((k, t)).tolist()
    seeds_r = round_seeds(0, 1, t)
    res["server"] = {"clients": k, "steps": t, "nnz": mask.nnz}
    res["server"]["replay_all_clients"] = timeit(
        lambda: replay_many(theta0, seeds_r, scal, 1e-6), repeat=1)
    res["server"]["aggregate_scalars_then_apply"] = timeit(
        lambda: apply_aggregate(theta0.clone(), aggregate_scalars(1, seeds_r, scal, [1 / k] * k,
                                                                   [1e-6] * t)), repeat=1)
    for key in ("forward_full_logits", "forward_label_scoring", "sparse_zo_step"):
        print(f"{key:<26} {res[key]['median_s']:.3f} s")
    print(f"sparse step = {res['sparse_zo_step']['x_two_scoring_forwards']:.2f} x two scoring forwards")
    print(f"server, K={k} T={t}: replay {res['server']['replay_all_clients']['median_s']:.2f} s, "
          f"aggregate {res['server']['aggregate_scalars_then_apply']['median_s']:.2f} s")
    write_result("step_cost", res)


if __name__ == "__main__":
    main()
