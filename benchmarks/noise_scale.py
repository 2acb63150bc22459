"""The gradient noise scale on the mask, and what it says about the ZO step's batch size.

    python benchmarks/noise_scale.py [--examples 128] [--seed 0] [--threads 2]

On the learning benchmark's setting (packaged SmolLM2-135M in float32, rotten_tomatoes prompts
at max_length 48, the calibration mask at density 1e-3 from 32 sequences of 128 tokens of the
packaged news text, the seed's split with its validation set carved out), one backward per
training example at the untrained model gives the per-example gradients g_i on the mask's
106,168 coordinates (a seeded sample of `--examples`). From them:

  B_simple = tr(C) / |G|^2   (McCandlish et al. 2018, "An empirical model of large-batch
  training"), with C the per-example covariance and G the mean gradient; |G|^2 is estimated
  without bias as |mean g|^2 - tr(C)/n.

Why it matters for sparse ZO: a two-point step on a batch of b examples estimates (z . g_B) z,
whose second moment is about tr(H) (|G|^2 + tr(C)/b) where the first-order step's is about
|G|^2 + tr(C)/b; the direction noise (tr(H), from 106,168 coordinates) multiplies the batch
term instead of adding to it. At each batch's best lr the expected progress per step then goes
as 1 / (1 + B_simple / b) and per example as 1 / (b + B_simple), and the best lr itself as
1 / (1 + B_simple / b) (the quadratic model of the loss, Hessian and batch noise held fixed).
The script writes those ratios against batch 16 (the learning benchmark's recipe): a model's
prediction, to be checked by runs (learning.py's rt-central-batch), not a measurement of them.

The same model asks whether a fixed diagonal scaling of z would save forwards (z ~ N(0, S),
S = diag(s^p) with s the calibration's mean squared gradient at the masked coordinates, which
every party can hold: a "static" HiZOO-style preconditioner that keeps the update linear in
the scalars). At the best lr a step's progress is (G'SG)^2 / (tr(HS) (G'SG + tr(SC)/b)); with
H taken as the diagonal empirical Fisher of the task (mean g_i^2, a Gauss-Newton stand-in) the
script writes that progress for several p against p = 0 (plain z), at b = 16.

And whether directions drawn in a fixed subspace every party can build from the calibration
would (z = B u, u ~ N(0, I_k), B orthonormal [nnz, k]; the first step's progress at the best
lr, G'PG for |G|^2, tr(B'HB) for tr(H)): the top tenth of the mask's coordinates by
calibration score (about what density 1e-4 trains, which the learning benchmark ran), the span
of the calibration's per-sequence gradients (k = 32), and their mean alone (k = 1). A subspace
is used up as the run moves along it, so this says which to try, not how far each goes.

The same subspaces are also judged for the centered loss below (z_in_a_fixed_subspace_centered_loss):
would directions from the calibration help a run whose scalars carry no calibration shift?

And how much of the task's mean gradient on the mask is the calibration shift: the same
examples' gradients of the cross-entropy on label logits minus the sample's mean label logits
(`centered_loss`), whose |G|^2 against the plain loss's says how much of a step's signal
moves a threshold-free metric at all (loss=centered-ce and mask_kind=task-gradient take the
shift out).

Output: benchmarks/results/noise_scale.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedmeerkat.config import load_config  # noqa: E402
from fedmeerkat.federated.methods.backprop import masked_gradient  # noqa: E402
from fedmeerkat.models.scoring import lm_loss, sample_centered_loss  # noqa: E402
from fedmeerkat.runners.masks import calibration_sequences  # noqa: E402
from fedmeerkat.runners.prepare import get_mask, prepare, split_clients  # noqa: E402
from fedmeerkat.tasks.corpora import load_calibration_texts  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32)
RECIPE_BATCH = 16
POWERS = (-1.0, -0.5, 0.25, 0.5, 1.0)  # S = diag(s^p); p = 0 is plain z


def setting(seed: int, out: str, dtype: str = "float32", max_test: int = 16) -> list[str]:
    """The learning benchmark's setting as run-config overrides (subspace_probe.py shares it)."""
    return ["model=smollm2-135m", f"dtype={dtype}", "task=rotten_tomatoes", "max_length=48",
            "val_fraction=0.1", "max_val=500", f"max_test={max_test}", "calib_sequences=32",
            "calib_seq_len=128", "density=1e-3", f"seed={seed}", f"out={out}"]


def grad_on_mask_only(prep, mask) -> None:
    params = dict(prep.model.named_parameters())
    for p in prep.model.parameters():
        p.requires_grad_(False)
    for name in mask.names:
        params[name].requires_grad_(True)


def per_example_gradients(prep, mask, ids: np.ndarray, centered: bool = False) -> torch.Tensor:
    """[len(ids), nnz] float64: each example's gradient of the label-scoring loss on the mask.
    `centered`: of the cross-entropy on label logits minus the sample's mean label logits
    (held fixed), the loss whose mean gradient has the calibration shift taken out (the
    task-gradient mask kind's, runners/masks.py)."""
    params = dict(prep.model.named_parameters())
    batches = [prep.scorer.collate([prep.train_ids[i]], prep.train_labels[[i]]) for i in ids]
    loss = sample_centered_loss(prep.scorer, batches) if centered else prep.scorer.loss_tensor
    rows = [masked_gradient(params, mask, loss(b)).double() for b in batches]
    return torch.stack(rows)


def calibration_gradients(prep, mask, cfg) -> torch.Tensor:
    """[sequences, nnz] float64: each calibration sequence's LM-loss gradient on the mask; the
    mean of their squares is what chose the mask."""
    params = dict(prep.model.named_parameters())
    seqs = calibration_sequences(prep.tokenizer, load_calibration_texts(cfg.calib_corpus),
                                 cfg.calib_sequences, cfg.calib_seq_len)
    return torch.stack([masked_gradient(params, mask, lm_loss(prep.model, seq)).double()
                        for seq in seqs])


def subspace_progress(grads: torch.Tensor, basis: torch.Tensor, batch: int) -> float:
    """Best-lr progress of a two-point step with z = B u, u ~ N(0, I_k), B [nnz, k] with
    orthonormal columns (the same quadratic model as scaled_progress: G'PG for |G|^2, tr(PC)
    for tr(C), tr(B'HB) for tr(H), P = BB')."""
    n = grads.shape[0]
    fisher = (grads * grads).mean(0)
    if basis.dtype == torch.int64:  # coordinates: the identity basis on them
        proj, tr_h = grads[:, basis], float(fisher[basis].sum())
    else:
        proj, tr_h = grads @ basis, float((fisher[:, None] * basis * basis).sum())
    mean = proj.mean(0)  # proj [n, k]: each example's gradient in the subspace's coordinates
    tr_pc = float(proj.var(0).sum())
    signal = float(mean @ mean) - tr_pc / n
    return max(signal, 0.0) ** 2 / (tr_h * (max(signal, 0.0) + tr_pc / batch))


def scaled_progress(grads: torch.Tensor, scale: torch.Tensor, batch: int) -> float:
    """Best-lr progress of a two-point step with z ~ N(0, diag(scale)) on `batch` examples,
    by the quadratic model with H = diag(mean g_i^2) (docstring); any overall factor cancels
    in the ratios the script reports."""
    n = grads.shape[0]
    mean = grads.mean(0)
    var = grads.var(0)
    fisher = (grads * grads).mean(0)
    signal = float((scale * mean * mean).sum() - (scale * var).sum() / n)  # unbiased G'SG
    return signal ** 2 / (float((scale * fisher).sum())
                          * (signal + float((scale * var).sum()) / batch))


def noise_scale(grads: torch.Tensor) -> dict[str, float]:
    n = grads.shape[0]
    mean = grads.mean(0)
    tr_c = float(grads.var(0).sum())  # unbiased per coordinate
    g2 = float(mean @ mean) - tr_c / n  # unbiased |G|^2
    return {"examples": n, "trace_C": tr_c, "mean_gradient_sq_norm": g2,
            "B_simple": tr_c / g2 if g2 > 0 else float("inf")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    if ns.examples < 2:
        ap.error("--examples must be at least 2 (a covariance needs two)")
    torch.set_num_threads(ns.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, setting(ns.seed, f"{tmp}/run"))
        prep = prepare(cfg)
        mask, _ = get_mask(cfg, prep, split_clients(cfg, prep), quiet=True)
        grad_on_mask_only(prep, mask)
        print(f"{cfg.calib_sequences} calibration backward passes...", file=sys.stderr)
        calib_grads = calibration_gradients(prep, mask, cfg)
        calib = (calib_grads * calib_grads).mean(0)
    rng = np.random.default_rng(ns.seed)
    ids = rng.choice(len(prep.train_labels), ns.examples, replace=False)
    print(f"{ns.examples} backward passes on the mask ({mask.nnz:,} values)...", file=sys.stderr)
    grads = per_example_gradients(prep, mask, ids)
    stats = noise_scale(grads)
    # the same examples' gradients with the calibration shift taken out: how much of the
    # mean gradient is the shift toward the rarely predicted label (moves no ranking)
    print(f"{ns.examples} backward passes of the centered loss...", file=sys.stderr)
    centered_grads = per_example_gradients(prep, mask, ids, centered=True)
    centered = noise_scale(centered_grads)
    floor = calib[calib > 0].min()  # a coordinate the corpus never moved keeps the smallest
    plain = scaled_progress(grads, torch.ones_like(calib), RECIPE_BATCH)
    scaled = [{"p": p, "progress_per_step_vs_plain_z":
               scaled_progress(grads, calib.clamp_min(floor) ** p, RECIPE_BATCH) / plain}
              for p in POWERS]
    # directions in a fixed subspace every party can build from the calibration (a static
    # prior-guided ZO): the top 10% of the mask's coordinates by calibration score (what
    # density 1e-4 trains; checked against the learning benchmark's density screen), the span
    # of the calibration's per-sequence gradients, and their mean alone
    span, _ = torch.linalg.qr(calib_grads.T)
    mean_dir = calib_grads.mean(0)
    subspaces = {
        "top_tenth_of_the_mask_by_calibration": calib.argsort(descending=True)[: mask.nnz // 10],
        "span_of_the_calibration_gradients": span,
        "mean_calibration_gradient": (mean_dir / mean_dir.norm())[:, None]}
    sub_rows, sub_rows_centered = [], []
    # the same subspaces for the centered loss (its gradient has the calibration shift taken
    # out, the part a threshold-free metric moves with): against plain z on that loss
    plain_centered = scaled_progress(centered_grads, torch.ones_like(calib), RECIPE_BATCH)
    for rows_out, per_example, ref in ((sub_rows, grads, plain),
                                       (sub_rows_centered, centered_grads, plain_centered)):
        for name, basis in subspaces.items():
            prog = subspace_progress(per_example, basis, RECIPE_BATCH) / ref
            g = per_example.mean(0)
            proj = per_example[:, basis] if basis.dtype == torch.int64 else per_example @ basis
            inside = proj.mean(0)
            # the sample mean's share holds its noise too (tr(C)/n of |mean|^2: 5% for the
            # plain loss at 128 examples, ~73% for the centered one), so both are kept
            n = per_example.shape[0]
            unbiased = ((float(inside @ inside) - float(proj.var(0).sum()) / n)
                        / (float(g @ g) - float(per_example.var(0).sum()) / n))
            rows_out.append({"subspace": name, "dimension": len(basis) if basis.dim() == 1
                             else basis.shape[1],
                             "share_of_mean_gradient_sq_norm": float(inside @ inside / (g @ g)),
                             "share_of_mean_gradient_sq_norm_unbiased": unbiased,
                             "progress_per_step_vs_plain_z": prog})
    b_simple = stats["B_simple"]

    def step(b: int) -> float:  # progress per step at the batch's best lr (model)
        return 1.0 / (1.0 + b_simple / b)

    # in this model the best lr is 1 / (tr(H) (|G|^2 + tr(C)/b)) and a step's progress at it
    # is proportional to it, so best_lr_vs_16 equals progress_per_step_vs_16 by construction;
    # both names stay in the result file (the printout below reads best_lr_vs_16)
    rows = [{"batch": b,
             "progress_per_step_vs_16": step(b) / step(RECIPE_BATCH),
             "progress_per_example_vs_16": (step(b) / b) / (step(RECIPE_BATCH) / RECIPE_BATCH),
             "best_lr_vs_16": step(b) / step(RECIPE_BATCH)} for b in BATCHES]
    import transformers
    write_result("noise_scale", {
        "setting": {"model": "smollm2-135m", "dtype": "float32", "task": "rotten_tomatoes",
                    "max_length": 48, "mask": "calibration, density 1e-3, 32 x 128 tokens",
                    "mask_nnz": mask.nnz, "seed": ns.seed, "point": "the untrained model"},
        "versions": {"transformers": transformers.__version__,
                     "python": platform.python_version()},
        **stats,
        "model_of_the_zo_step": "second moment of a two-point step on b examples ~ tr(H) "
                                "(|G|^2 + tr(C)/b); at each batch's best lr, progress per "
                                "step ~ 1/(1 + B_simple/b), per example ~ 1/(b + B_simple)",
        "by_batch": rows,
        "centered_loss": {
            "loss": "cross-entropy on label logits minus the sample's mean label logits",
            **centered,
            "mean_gradient_sq_norm_vs_plain": centered["mean_gradient_sq_norm"]
            / stats["mean_gradient_sq_norm"]},
        "z_scaled_by_calibration_second_moment": {
            "batch": RECIPE_BATCH, "hessian_stand_in": "diagonal empirical Fisher of the task",
            "rows": scaled},
        "z_in_a_fixed_subspace": {
            "batch": RECIPE_BATCH, "hessian_stand_in": "diagonal empirical Fisher of the task",
            "note": "progress of the first step at the untrained model; a subspace of k "
                    "dimensions is used up as the run moves along it",
            "rows": sub_rows},
        "z_in_a_fixed_subspace_centered_loss": {
            "batch": RECIPE_BATCH, "hessian_stand_in": "diagonal empirical Fisher of the "
                                                       "centered loss",
            "note": "the same subspaces judged on the centered loss's per-example gradients, "
                    "against plain z on that loss (shares of its mean gradient: the shift "
                    "taken out); share_of_mean_gradient_sq_norm is the sample mean's (its "
                    "noise included), the _unbiased share and the progress take the noise "
                    "out",
            "rows": sub_rows_centered},
        "wall_seconds": round(time.time() - started, 1)})
    print(f"B_simple = {b_simple:.2f}: batch 4 at {rows[2]['best_lr_vs_16']:.2f}x the batch-16 "
          f"lr would need {1 / rows[2]['progress_per_example_vs_16']:.2f}x its examples "
          "(model)")
    print(f"centered loss: |G|^2 = {centered['mean_gradient_sq_norm']:.3g}, "
          f"{centered['mean_gradient_sq_norm'] / stats['mean_gradient_sq_norm']:.2%} of the "
          "plain loss's on the mask")
    best = max(scaled, key=lambda r: r["progress_per_step_vs_plain_z"])
    print(f"z scaled by the calibration's s^p: best p = {best['p']:g}, "
          f"{best['progress_per_step_vs_plain_z']:.2f}x plain z's progress per step (model)")
    for loss, rows_out in (("", sub_rows), (" (centered loss)", sub_rows_centered)):
        for r in rows_out:
            print(f"z in {r['subspace']}{loss} ({r['dimension']} dimensions, "
                  f"{r['share_of_mean_gradient_sq_norm_unbiased']:.2%} of |G|^2): "
                  f"{r['progress_per_step_vs_plain_z']:.2f}x plain z's progress per step "
                  "(model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
