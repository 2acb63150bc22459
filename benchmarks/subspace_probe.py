"""A probe, outside the protocol: ZO-SGD on the mask with directions in the span of the
calibration's per-sequence gradients, in a cone around the run's momentum or scaled by a
running diagonal Hessian, against plain directions, in one loop.

    python benchmarks/subspace_probe.py [--arms ARM ...] [--seed 0] [--steps 300]
    (default arms: plain span-linear)

Why: benchmarks/noise_scale.py's quadratic model puts the first step's progress with
z = sqrt(nnz/k) B u (B an orthonormal basis of the k = 32 calibration gradients on the mask,
u ~ N(0, I_k)) at 10.3x plain z's: those 32 directions hold 9.2% of the task's mean gradient's
squared norm (a random 32-dimensional subspace would hold 0.03%). A subspace is used up as the
run moves along it, and its directions are more curved than the average coordinate, so the
model says what to try, not how far it goes; this loop measures it before any of it is built
into the seeds-and-scalars protocol (where B would travel with the mask and z = B u is linear
in u, so replay and the scalar downlink would stay exact).

Setting: the learning benchmark's (SmolLM2-135M in bf16 with the fp32 master vector, its
calibration mask at density 1e-3, rotten_tomatoes at max_length 48, the seed's split with 500
validation reviews, batch 16, eps 1e-3); its own loop with torch.randn directions and a
seeded data order (the same batches in every arm), so it is not the project's run path and its
figures are not the learning benchmark's. Validation ROC-AUC every `--eval-every` steps, test
ROC-AUC at the end only. Arms (lr chosen before the runs: 1e-5 in the span diverged in a first
try, 3e-6 learned):
  plain        z ~ N(0, I), lr 1e-4 (the learning benchmark's recipe);
  span         z in the span, lr 3e-6;
  span-linear  the same, lr decaying linearly to 0 over the steps;
  alternate    odd steps in the span at lr 3e-6, even steps plain at lr 1e-4 (both kinds of
               direction, each at its own lr, no extra forward);
  cone, cone-half-lr, cone-narrow
               ConMeZO's directions (Behric et al. 2025): z = sqrt(nnz) (cos a m/|m| +
               sin a u/|u|) around m, the running mean (beta 0.99) of the past steps' g z;
               plain z until m exists (CONES below holds each arm's lr and cos a);
  hizoo, hizoo-alpha1e-5
               HiZOO's running diagonal Hessian (HIZOO below): three forwards a step, so
               two thirds of the steps for the same forwards;
  avg, avg-2x-lr
               plain steps at lr 1e-4 and 2e-4 whose iterates are also averaged (AVERAGED
               below): each evaluation also scores the exponential and the second-half means;
  per-example, per-example-same-lr, per-example-2x-lr
               one direction per example of the batch in the same two forwards (GRZO's idea;
               PER_EXAMPLE below), at lr 2.8e-4, 1e-4 and 2e-4.
`--variance` measures instead how much less noise the per-example step carries than plain's at
the untrained model (`step_variance`, entry "per_example_variance").
Every arm gets the same forwards (2 x --steps) and is evaluated every 2 x --eval-every of them.

Each arm is written into benchmarks/results/subspace_probe.json as it finishes (merged under a
file lock, so two invocations with different --arms can share the two cores). The result file
holds plain and span-linear at seeds 0, 1, 2, the cone and hizoo arms at seed 0 and the
averaged arms at seeds 0 and 1 (`make results` runs them); span and alternate wandered and fell
in first tries at seed 0 and were not run again; neither a cone arm nor hizoo beat plain at
seed 0, so none ran at seeds 1 and 2; no average beat its own last iterate at seeds 0 and 1
(they ran side by side), so seed 2 was stopped before it began. `avg` at 3,000 forwards
(--steps 1500 --eval-every 250, entries "avg-3000fw-seed<S>") asks the same at the longer
budget, where the learning benchmark's runs wander between evaluations; rule, stated before
the runs: an average is worth building (server side, over the global iterates: no protocol
change) only if it beats its own last iterate on validation at the end at every seed. Seeds 0
and 1 ran side by side; seed 1's means trail, so seed 2 was stopped soon after it began.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noise_scale import calibration_gradients, grad_on_mask_only, setting  # noqa: E402

from fedmeerkat.config import load_config  # noqa: E402
from fedmeerkat.models.scoring import evaluate  # noqa: E402
from fedmeerkat.runners.prepare import get_mask, prepare, split_clients  # noqa: E402
from fedmeerkat.zo.sparse import SparseView  # noqa: E402

ARMS = {"plain": (1e-4, None), "span": (None, 3e-6), "span-linear": (None, 3e-6),
        "alternate": (1e-4, 3e-6)}  # arm -> (lr of plain steps, lr of span steps)
# arm -> (lr, cosine of the cone's half-angle, momentum decay beta). "cone" and "cone-half-lr"
# were fixed before their runs: a half-angle of 1.35 rad and beta 0.99 (the values we took for
# ConMeZO's, not checked against its code), at the plain arm's lr and at half of it.
# "cone-narrow" came after them: E[z z^T] holds nnz * cos^2 on the momentum's direction, so a
# step moves along it at lr * nnz * cos^2 times the gradient there: 0.51 at cos 0.22 (17x the
# lr at which first-order SGD learns on this mask, 3e-2), and 3e-2 at cos 0.053.
CONES = {"cone": (1e-4, 0.22, 0.99), "cone-half-lr": (5e-5, 0.22, 0.99),
         "cone-narrow": (1e-4, 0.053, 0.99)}
# arm -> (lr, smoothing alpha) of HiZOO's running diagonal Hessian estimate (Zhao et al., ICLR
# 2025), in the form its public trainers share: a third forward at theta gives the second
# difference c = |L+ + L- - 2 L0| / (2 eps^2) along z / sqrt(H), then H <- (1 - alpha) H +
# alpha c H z^2, and the step is lr g z / sqrt(H) along the z it perturbed with. H starts at 1,
# so the first step is plain's at the plain lr. Since E z^2 = 1, H grows by about alpha (c - 1)
# a step until c (which shrinks as 1 / H) falls to 1: a 4-step try at seed 0 measured c at about
# 2,700 (1,000 to 6,900), so alpha 1e-5 (the largest in HiZOO's scripts for full fine-tuning on
# SST-2) would grow H by ~e^5 over 200 steps and stop the run. alpha 1e-6, fixed before the run
# from that c alone, was expected to let H's mean grow ~1.7x; it grew 2.45x (c's median over the
# run was higher), spread 2.07-3.01 from the 5th to the 95th percentile (docs/benchmarks.md).
# "hizoo-alpha1e-5" came after, to measure what that paragraph predicts for HiZOO's own alpha.
HIZOO = {"hizoo": (1e-4, 1e-6), "hizoo-alpha1e-5": (1e-4, 1e-5)}
# arm -> lr of plain steps whose iterates are also averaged (Polyak-Ruppert): besides the last
# iterate, each evaluation scores the debiased exponential average of the iterates (decay
# AVG_BETA, a window of about 100 steps) and the uniform average of the second half of the run
# so far (SWA's tail). Why: a ZO step's component off the gradient is noise nnz times larger
# than its signal; in curved directions that noise settles around the path and an average
# removes it at no forward (flat directions keep their random walk either way). "avg" shares
# plain's z and batches, so its last iterate is plain's; "avg-2x-lr" asks whether the average
# lets a hotter lr through (lr 2e-4 alone learned less than 1e-4 in the learning benchmark).
AVERAGED = {"avg": 1e-4, "avg-2x-lr": 2e-4}
AVG_BETA = 0.99
# arm -> lr of steps whose directions differ per example (the idea of GRZO, Tan et al. 2026:
# one perturbation per example of the batch in the same forward): example j of the batch is
# scored at theta +- eps z_j (forward hooks add each example's own sparse perturbation to the
# masked linear layers' outputs), g_j = (l_j+ - l_j-) / (2 eps) from its own two losses, and
# the step is lr / B * sum_j g_j z_j: the same two forwards and the same expected step as
# plain's, with B directions instead of one. Its variance, by the quadratic model of
# noise_scale.py, is nnz |grad|^2 (1 + 7.27) / 16 against plain's nnz |grad|^2 (1 + 7.27 / 16),
# 2.8x lower, so the lr at which that model balances noise and signal is 2.8x plain's (the
# same formula that put batch 4's at 0.52x, which learned at every seed): "per-example" at
# 2.8e-4 was fixed from it before any run, "per-example-same-lr" at plain's 1e-4 beside it.
# Both ended near plain at seed 0. bf16 rounding adds to one example's loss difference what
# plain's batch mean averages away, so `--variance` measured the noise itself: 3.0x below
# plain's in bf16 (4.5x in float32), about what the model assumed. At plain's lr it then ran at seeds 1 and 2: the same median validation gain as plain's and a
# narrower spread (what 3x less noise in the same expected step should give), so
# "per-example-2x-lr" (added after those runs, before its own) asks whether 2e-4, between that
# and the 2.8e-4 that fell at seed 0, is safe at every seed (plain at 2e-4 fell at seed 2 in the
# learning benchmark).
PER_EXAMPLE = {"per-example": 2.8e-4, "per-example-same-lr": 1e-4, "per-example-2x-lr": 2e-4}
EPS, BATCH = 1e-3, 16


class PerExampleDirections:
    """Forward hooks that score example j of a batch at theta + Z[j] on the masked linear
    layers (theta itself stays written in the model): output_j += x_j S_j^T, with S_j the
    sparse matrix holding Z[j]'s values of that layer at its masked coordinates. The first
    form of what became fedmeerkat.zo.per_example.ExampleOffsets (which computes the same sums
    in another order of float ops, touching only the masked rows and columns), kept here as
    the code that made this probe's figures."""

    def __init__(self, model, mask):
        self.z: torch.Tensor | None = None  # [B, nnz] float32 offsets, or None: plain forwards
        self.handles = []
        for name, idx, sl in mask.slices():
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
                raise ValueError(f"per-example directions need linear weights; {name} is not")
            rows, cols = idx // module.in_features, idx % module.in_features
            self.handles.append(module.register_forward_hook(self._hook(rows, cols, sl)))

    def _hook(self, rows: torch.Tensor, cols: torch.Tensor, sl: slice):
        def hook(module, inputs, out):
            if self.z is None:
                return None
            x = inputs[0]
            b, n = x.shape[0], x.shape[1]
            # [in, B*L] so that the gather and the scatter run along contiguous rows
            xt = x.reshape(b * n, -1).t().contiguous()
            part = xt.index_select(0, cols).float().view(-1, b, n)
            part *= self.z[:, sl].t().unsqueeze(2)
            acc = torch.zeros(out.shape[-1], b, n).index_add_(0, rows, part)
            return (out.float() + acc.permute(1, 2, 0)).to(out.dtype)
        return hook

    def losses(self, scorer, batch, zs: torch.Tensor, eps: float):
        """Each example's loss at theta + eps zs[j] and at theta - eps zs[j] (example j)."""
        try:
            self.z = eps * zs
            up = scorer.example_losses(batch)
            self.z = -eps * zs
            return up, scorer.example_losses(batch)
        finally:
            self.z = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def span_basis(seed: int, tmp: str) -> torch.Tensor:
    """[nnz, 32] float32 orthonormal basis of the calibration gradients (float32 model)."""
    cfg = load_config(None, setting(seed, f"{tmp}/basis", "float32", 1000))
    prep = prepare(cfg)
    mask, _ = get_mask(cfg, prep, split_clients(cfg, prep), quiet=True)
    grad_on_mask_only(prep, mask)
    q, _ = torch.linalg.qr(calibration_gradients(prep, mask, cfg).T)
    return q.float().contiguous()


def run_arm(arm: str, prep, view: SparseView, theta0: torch.Tensor, basis: torch.Tensor | None,
            seed: int, steps: int, eval_every: int) -> dict:
    """One arm from the untrained values `theta0` (every arm of an invocation shares the
    model, so each starts by writing them back)."""
    lr_plain, lr_span = ARMS.get(arm, (None, None))
    lr_cone, cos, beta = CONES.get(arm, (None, 0.0, 0.0))
    lr_hizoo, alpha = HIZOO.get(arm, (None, 0.0))
    lr_per_example = PER_EXAMPLE.get(arm)
    hooks = PerExampleDirections(prep.model, view.mask) if lr_per_example is not None else None
    if arm in AVERAGED:
        lr_plain = AVERAGED[arm]
    averaged = arm in AVERAGED
    hess = torch.ones(len(theta0)) if lr_hizoo is not None else None
    per_step = 3 if lr_hizoo is not None else 2  # forwards a step
    seconds: list[float] = []  # HiZOO's second differences c, for the record
    theta = theta0.clone()
    d, k = len(theta0), (basis.shape[1] if basis is not None else 1)
    momentum = torch.zeros(d)
    scale = (d / k) ** 0.5  # E|z|^2 = nnz in both kinds of direction
    gen = torch.Generator().manual_seed(1000 + seed)
    order = np.random.default_rng(seed)  # the same batches in every arm
    n = len(prep.train_labels)

    def val(values: torch.Tensor | None = None) -> float | None:
        view.write(theta if values is None else values)
        return evaluate(prep.scorer, prep.val_ids, prep.val_labels, 32).auc

    ema = torch.zeros(d)  # debiased on read: ema / (1 - AVG_BETA^t)
    running = theta0.clone()  # sum of the iterates theta_0 .. theta_t
    sums = {0: running.clone()}  # the running sum at every step an evaluation's tail starts

    def tail(t: int) -> torch.Tensor:
        """The uniform average of theta_(t//2 + 1) .. theta_t."""
        return (running - sums[t // 2]) / (t - t // 2)

    view.write(theta)
    first_test = evaluate(prep.scorer, prep.test_ids, prep.test_labels, 32).auc
    curve = [{"steps": 0, "forwards": 0, "val_auc": val()}]
    steps = steps * 2 // per_step  # the same forwards in every arm
    window: list[float] = []  # the training loss (mean of the two forwards) since the last eval
    started = time.time()
    for t in range(1, steps + 1):
        ids = order.choice(n, BATCH, replace=False)
        batch = prep.scorer.collate([prep.train_ids[i] for i in ids], prep.train_labels[ids])
        in_span = lr_span is not None and (lr_plain is None or t % 2 == 1)
        if hooks is not None:
            zs = torch.randn(BATCH, d, generator=gen)
            plus, minus = hooks.losses(prep.scorer, batch, zs, EPS)
            gs = torch.from_numpy((plus - minus) / (2 * EPS)).float()
            window.append(0.5 * float(plus.mean() + minus.mean()))
            theta -= (lr_per_example / BATCH) * (gs @ zs)
            view.write(theta)
        elif lr_hizoo is not None:
            assert hess is not None
            z = torch.randn(d, generator=gen) / hess.sqrt()
            lr = lr_hizoo
            view.write(theta)
            zero = prep.scorer.loss(batch)
        elif lr_cone is not None:
            # ConMeZO: a unit direction at angle arccos(cos) from the momentum, scaled to
            # E|z|^2 = nnz; plain directions until the momentum exists
            u = torch.randn(d, generator=gen)
            norm = momentum.norm()
            z = u if norm == 0 else d ** 0.5 * (
                cos * momentum / norm + (1 - cos ** 2) ** 0.5 * u / u.norm())
            lr = lr_cone
        elif in_span:
            z = scale * (basis @ torch.randn(k, generator=gen))
            lr = lr_span * ((steps - t + 1) / steps if arm == "span-linear" else 1.0)
        else:
            z = torch.randn(d, generator=gen)
            lr = lr_plain
        if hooks is None:
            view.write(theta + EPS * z)
            plus = prep.scorer.loss(batch)
            view.write(theta - EPS * z)
            minus = prep.scorer.loss(batch)
            g = (plus - minus) / (2 * EPS)
            window.append(0.5 * (plus + minus))
            theta -= lr * g * z
        if hess is not None:
            c = abs(plus + minus - 2 * zero) / (2 * EPS ** 2)
            seconds.append(float(c))
            hess.mul_(1 - alpha).add_(hess * (z * hess.sqrt()) ** 2, alpha=alpha * c)
        if lr_cone is not None:
            momentum.mul_(beta).add_(z, alpha=(1 - beta) * g)
        if averaged:
            ema.mul_(AVG_BETA).add_(theta, alpha=1 - AVG_BETA)
            running += theta
            if t % max(1, eval_every // 2) == 0 or t == steps // 2:  # every tail's start
                sums[t] = running.clone()
        if (per_step * t) // (2 * eval_every) > (per_step * (t - 1)) // (2 * eval_every) or \
                t == steps:  # every 2 * eval_every forwards
            curve.append({"steps": t, "forwards": per_step * t, "val_auc": val(),
                          "train_loss": float(np.mean(window))})
            if averaged:
                curve[-1]["val_auc_ema"] = val(ema / (1 - AVG_BETA ** t))
                curve[-1]["val_auc_tail"] = val(tail(t))
            window = []
            print(f"{arm} step {t}: validation ROC-AUC {curve[-1]['val_auc']:.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    extra = {"lr_cone_steps": lr_cone, "cone_cos": cos, "momentum_beta": beta} if lr_cone else {}
    if hess is not None:
        extra = {"lr_hizoo_steps": lr_hizoo, "hessian_alpha": alpha,
                 "second_difference": {"first": seconds[0], "median": float(np.median(seconds)),
                                       "last": seconds[-1]},
                 # quantiles over every 97th coordinate (1,095 of them)
                 "hessian_end": {q: float(torch.quantile(hess[::97], v))
                                 for q, v in (("p05", 0.05), ("median", 0.5), ("p95", 0.95))}}
    if averaged:
        final = {"ema": ema / (1 - AVG_BETA ** steps), "tail": tail(steps)}
        extra = {"average_beta": AVG_BETA}
        for kind, values in final.items():
            view.write(values)
            extra[f"test_auc_end_{kind}"] = evaluate(prep.scorer, prep.test_ids,
                                                     prep.test_labels, 32).auc
        view.write(theta)
    if hooks is not None:
        hooks.remove()
        extra = {"lr_per_example_steps": lr_per_example}
    return {"lr_plain_steps": lr_plain, "lr_span_steps": lr_span, **extra, "steps": steps,
            "forwards": per_step * steps, "curve": curve, "test_auc_start": first_test,
            "test_auc_end": evaluate(prep.scorer, prep.test_ids, prep.test_labels, 32).auc,
            "wall_seconds": round(time.time() - started, 1)}


def step_variance(seed: int, draws: int = 4, batches: int = 8) -> dict:
    """E[g^2] of plain's scalar against E[mean_j g_j^2] / B of per-example directions, at the
    untrained model on `batches` batches x `draws` directions each: the update's squared norm
    is nnz times that in both (E|z|^2 = nnz), and its mean is the batch gradient in both, so
    the ratio is how much less noise the per-example step carries (the quadratic model's 2.8x
    assumes per-example gradients and no rounding). In bf16 at eps 1e-3 and 1e-2, in float32
    at eps 1e-3 (no rounding to speak of)."""
    out = {}
    for dtype, epss in (("bfloat16", (1e-3, 1e-2)), ("float32", (1e-3,))):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, setting(seed, f"{tmp}/run", dtype, 16))
            prep = prepare(cfg)
            mask, _ = get_mask(cfg, prep, split_clients(cfg, prep), quiet=True)
        view = SparseView(dict(prep.model.named_parameters()), mask)
        theta = view.gather().clone()
        d = len(theta)
        hooks = PerExampleDirections(prep.model, mask)
        for eps in epss:
            gen, order = torch.Generator().manual_seed(5), np.random.default_rng(5)
            plain, per = [], []
            for _ in range(batches):
                ids = order.choice(len(prep.train_labels), BATCH, replace=False)
                batch = prep.scorer.collate([prep.train_ids[i] for i in ids],
                                            prep.train_labels[ids])
                for _ in range(draws):
                    z = torch.randn(d, generator=gen)
                    view.write(theta + eps * z)
                    up = prep.scorer.loss(batch)
                    view.write(theta - eps * z)
                    plain.append(((up - prep.scorer.loss(batch)) / (2 * eps)) ** 2)
                    view.write(theta)
                    zs = torch.randn(BATCH, d, generator=gen)
                    ups, downs = hooks.losses(prep.scorer, batch, zs, eps)
                    per.append(float(np.mean(((ups - downs) / (2 * eps)) ** 2)) / BATCH)
            out[f"{dtype}-eps{eps:g}"] = {
                "E_g2_plain": float(np.mean(plain)), "E_mean_gj2_over_B": float(np.mean(per)),
                "variance_ratio": float(np.mean(plain) / np.mean(per)),
                "samples": len(plain)}
            print(f"{dtype} eps {eps:g}: {out[f'{dtype}-eps{eps:g}']}", flush=True)
        hooks.remove()
    return out


def save(**update) -> None:
    """Merge `update` into the result file under a lock (two invocations may share it)."""
    import transformers
    (ROOT / "runs").mkdir(exist_ok=True)  # the lock lives in runs/, which is not committed
    with open(ROOT / "runs" / ".subspace_probe.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = RESULTS / "subspace_probe.json"
        old = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        runs = {**old["runs"], **update.pop("runs", {})}
        kept = {k: v for k, v in old.items()
                if k not in ("runs", "command", "machine", "setting", "versions")}
        write_result("subspace_probe", {
            "setting": "learning benchmark's (bf16, calibration mask 1e-3, batch 16, eps "
                       "1e-3, 500 validation / 1,000 test reviews); own loop, torch.randn "
                       "directions, span of the 32 calibration gradients",
            "versions": {"transformers": transformers.__version__,
                         "python": platform.python_version()},
            "runs": runs, **kept, **update})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+",
                    choices=sorted({*ARMS, *CONES, *HIZOO, *AVERAGED, *PER_EXAMPLE}),
                    default=["plain", "span-linear"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variance", action="store_true",
                    help="measure the per-example step's variance against plain's (step_variance) "
                         "instead of running arms")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.variance:
        save(per_example_variance={**step_variance(ns.seed), "seed": ns.seed,
                                   "command": "python " + " ".join(sys.argv)})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        spans = any(ARMS.get(arm, (None, None))[1] for arm in ns.arms)
        basis = span_basis(ns.seed, tmp) if spans else None
        cfg = load_config(None, setting(ns.seed, f"{tmp}/run", "bfloat16", 1000))
        prep = prepare(cfg)
        mask, _ = get_mask(cfg, prep, split_clients(cfg, prep), quiet=True)
    view = SparseView(dict(prep.model.named_parameters()), mask)
    theta0 = view.gather().clone()
    for arm in ns.arms:
        res = run_arm(arm, prep, view, theta0, basis, ns.seed, ns.steps, ns.eval_every)
        # a run at another budget than the default 600 forwards is its own entry
        budget = "" if ns.steps == 300 else f"-{2 * ns.steps}fw"
        save(runs={f"{arm}{budget}-seed{ns.seed}": {
            **res, "command": "python " + " ".join(sys.argv)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
