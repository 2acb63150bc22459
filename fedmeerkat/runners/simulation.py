"""In-process simulation of a federated run: one model, K clients, messages moved in memory.

The runner owns the single model instance and lends it to each client in turn; a client is
only its example ids and data pointer. Every plan and reply is serialized and parsed back, so
the byte counts are those of the real wire format and the simulation exercises it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from tqdm import tqdm

from fedmeerkat.config import RunConfig
from fedmeerkat.data.partition import format_histogram, label_histogram, partition
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings, RoundPlan
from fedmeerkat.federated.messages import MAX_VECTOR
from fedmeerkat.federated.methods import get_method, make_server
from fedmeerkat.models.loading import load_model
from fedmeerkat.models.scoring import (
    EvalResult,
    LabelScorer,
    encode_prompts,
    evaluate,
    format_metrics,
)
from fedmeerkat.options import InputError
from fedmeerkat.runners.client_host import ClientHost
from fedmeerkat.runners.driver import RoundDriver, RoundFailed
from fedmeerkat.runners.inprocess import InProcessTransport
from fedmeerkat.runners.masks import obtain_mask
from fedmeerkat.runners.run_folder import (
    FINAL_STATE,
    MetricsLog,
    drop_trajectories_after,
    load_checkpoint,
    open_run_folder,
    save_checkpoint,
    save_state,
    save_trajectories,
    space_digest,
    write_json_atomic,
)
from fedmeerkat.runners.spaces import build_space
from fedmeerkat.runners.tune import primary_metric, search_cost, search_lr
from fedmeerkat.tasks import load_task
from fedmeerkat.tasks.base import TaskData
from fedmeerkat.tasks.common import with_validation
from fedmeerkat.zo import SparseMask, SparseView, StepResult
from fedmeerkat.zo.dense import z_cache
from fedmeerkat.zo.seeds import mix
from fedmeerkat.zo.step import eps_resolution_warning


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything a run or an evaluation needs, loaded once."""

    model: Any
    tokenizer: Any
    task: TaskData
    scorer: LabelScorer
    train_ids: list[list[int]]
    train_labels: np.ndarray
    test_ids: list[list[int]]
    test_labels: np.ndarray
    # carved from the training pool (val_fraction); empty when val_fraction=0
    val_ids: list[list[int]] = field(default_factory=list)
    val_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class SharedModel:
    """The one model, as each client sees it (implements federated.client.LocalModel)."""

    def __init__(self, prep: Prepared, view: SparseView):
        self.prep = prep
        self.view = view
        self.parameters = dict(prep.model.named_parameters())  # first-order baselines

    def loss(self, example_ids: np.ndarray) -> float:
        p = self.prep
        batch = p.scorer.collate([p.train_ids[i] for i in example_ids], p.train_labels[example_ids])
        return p.scorer.loss(batch)

    def loss_tensor(self, example_ids: np.ndarray) -> torch.Tensor:
        """The same loss with its autograd graph (fedavg-backprop)."""
        p = self.prep
        batch = p.scorer.collate([p.train_ids[i] for i in example_ids], p.train_labels[example_ids])
        return p.scorer.loss_tensor(batch)


def load_task_for(cfg: RunConfig) -> TaskData:
    """The run's task; data that cannot be used (missing or mistyped columns, labels outside
    the label words, an empty split, unreadable files) is an InputError naming the task."""
    try:
        return _load_task(cfg)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, InputError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"task {cfg.task}: {first}") from None


def _load_task(cfg: RunConfig) -> TaskData:
    task = load_task(
        cfg.task,
        data_files=cfg.data_files or None,
        template=cfg.template or None,
        label_words=list(cfg.label_words) or None,
        label_field=cfg.label_field,
        split_seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        max_train=cfg.max_train or None,
        max_test=cfg.max_test or None,
    )
    return with_validation(task, cfg.val_fraction, cfg.max_val or None, cfg.seed)


def prepare(cfg: RunConfig) -> Prepared:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = load_task_for(cfg)  # data first: a bad task fails before the slow model load
    log(f"task {task.spec.name}: {len(task.train)} train / {len(task.val)} validation / "
        f"{len(task.test)} test ({task.source})")
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    scorer = LabelScorer(model, tokenizer, task.spec.label_words)

    def enc(examples):
        ids = encode_prompts(tokenizer, [task.spec.render(e) for e in examples], cfg.max_length)
        return ids, np.array([e.label for e in examples], dtype=np.int64)

    train_ids, train_labels = enc(task.train)
    test_ids, test_labels = enc(task.test)
    val_ids, val_labels = enc(task.val)
    return Prepared(model, tokenizer, task, scorer, train_ids, train_labels, test_ids, test_labels,
                    val_ids, val_labels)


def get_mask(cfg: RunConfig, prep: Prepared, parts: list[np.ndarray],
             quiet: bool = False) -> tuple[SparseMask, str]:
    """The run's mask. `parts` (client example ids) is there for per-client mask kinds:
    mask_kind 'task' uses the training texts (prompt + gold label word), 'union' the same
    split by client."""
    texts = None
    if cfg.mask_kind in ("task", "union") and not cfg.mask:
        spec = prep.task.spec
        texts = [spec.render(e) + spec.label_words[e.label] for e in prep.task.train]
    return obtain_mask(prep.model, prep.tokenizer, model_name=cfg.model, density=cfg.density,
                       rule=cfg.eligible, corpus=cfg.calib_corpus,
                       num_sequences=cfg.calib_sequences, seq_len=cfg.calib_seq_len, path=cfg.mask,
                       quiet=quiet, kind=cfg.mask_kind, seed=cfg.seed, task_texts=texts,
                       client_texts=None if texts is None else [[texts[i] for i in p] for p in parts])


def split_clients(cfg: RunConfig, prep: Prepared) -> list[np.ndarray]:
    """The clients' example ids; a client left with no data is an InputError with the fix."""
    try:
        parts = partition(prep.train_labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                          seed=cfg.seed, num_classes=prep.task.spec.num_classes,
                          min_size=cfg.min_partition_size)
    except ValueError as e:
        raise InputError(f"partition {cfg.partition}: {e} (lower clients= or "
                         "min_partition_size=, or give more training data)") from None
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise InputError(f"partition {cfg.partition}: clients {empty} get no training data "
                         f"({len(prep.train_labels)} examples for {cfg.clients} clients); lower "
                         "clients=, raise max_train= or choose another partition=")
    return parts


def settings_of(cfg: RunConfig) -> FedSettings:
    return FedSettings(local_steps=cfg.local_steps, lr=cfg.lr, eps=cfg.eps,
                       batch_size=cfg.batch_size, seed=cfg.seed, weighting=cfg.weighting,
                       rounds=cfg.rounds, lr_schedule=cfg.lr_schedule,
                       weight_decay=cfg.weight_decay, downlink=cfg.downlink,
                       clients_per_round=cfg.clients_per_round,
                       device=cfg.server_device or cfg.device, reply_bound=cfg.reply_bound,
                       reply_bound_abs=cfg.reply_bound_abs,
                       reply_bound_action=cfg.reply_bound_action,
                       perturbations=cfg.perturbations, estimator=cfg.zo_estimator)


def evaluate_splits(prep: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """The model as it is now on validation (if carved) and test: a metrics.jsonl record."""
    test = evaluate(prep.scorer, prep.test_ids, prep.test_labels, cfg.eval_batch_size)
    val = (evaluate(prep.scorer, prep.val_ids, prep.val_labels, cfg.eval_batch_size)
           if prep.val_ids else None)
    return eval_record(test, val)


def pick_lr(cfg: RunConfig, prep: Prepared, view: Any, theta0: torch.Tensor,
            out: Path) -> RunConfig:
    """lr=auto (runners/tune.py): search lr on the validation split, save the search as
    out/lr_search.json and the pick in out/config.toml (lr = the pick, lr_auto = false), so a
    resumed run trains with the same lr and never searches again. In simulation the search
    trains on the pooled training examples of all clients, a centralized pilot."""
    grid = [float(v) for v in cfg.lr_auto_grid]
    log(f"lr=auto: searching {', '.join(f'{v:g}' for v in sorted(grid))} on the validation "
        f"split: {search_cost(grid, cfg.lr_auto_steps, cfg.batch_size, len(prep.val_ids))}")
    start = time.time()
    model = SharedModel(prep, view)

    def evaluate_val() -> dict[str, Any]:
        val = evaluate(prep.scorer, prep.val_ids, prep.val_labels, cfg.eval_batch_size)
        return {k: v for k, v in eval_record(val, val).items() if k.startswith("val_")}

    found = search_lr(view=view, theta0=theta0, train_loss=model.loss,
                      num_train=len(prep.train_ids), evaluate_val=evaluate_val, grid=grid,
                      steps=cfg.lr_auto_steps, batch_size=cfg.batch_size, eps=cfg.eps,
                      seed=cfg.seed, log=log)
    found["wall_seconds"] = round(time.time() - start, 1)
    write_json_atomic(out / "lr_search.json", found)
    cfg = dataclasses.replace(cfg, lr=found["lr"], lr_auto=False)
    tmp = out / "config.toml.tmp"
    tmp.write_text(tomli_w.dumps(cfg.to_dict()))
    os.replace(tmp, out / "config.toml")
    note = "" if found["improves_on_untrained"] else (
        " (no candidate beat the untrained model on validation: the smallest harm is kept)")
    log(f"lr=auto: lr {found['lr']:g} ({found['forwards']} forwards, "
        f"{found['wall_seconds']:.0f} s){note}; saved in {out}/lr_search.json")
    return cfg


def run(cfg: RunConfig, *, quiet: bool = False, resume: bool = False,
        initial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run federated training as configured; returns the summary (also in out/summary.json).

    With `resume`, `cfg.out` is an existing run folder: training continues after the last
    checkpointed round and ends bit-identical to a run that was never interrupted.
    `initial`: the round-0 evaluation record (metrics.jsonl's first line) of this same model
    on these same validation and test sets, taken by an earlier run (experiments/claims.py and
    benchmarks/learning.py share it between runs that differ only in method, lr or mask; the
    untrained model is the same for all of them), so it is not computed again.
    """
    start = time.time()
    cfg, out = open_run_folder(cfg, resume)
    try:
        prep = prepare(cfg)
        parts = split_clients(cfg, prep)
    except InputError:
        if not resume and [p.name for p in out.iterdir()] == ["config.toml"]:
            shutil.rmtree(out)  # nothing ran: the same command works again once input is fixed
        raise
    hist = label_histogram(parts, prep.train_labels, prep.task.spec.num_classes)
    names = list(prep.task.spec.class_names) or [w.strip() for w in prep.task.spec.label_words]
    log(f"partition {cfg.partition}" + (f" (alpha={cfg.alpha})" if "dirichlet" in cfg.partition else ""))
    log(format_histogram(hist, names))
    if not resume:
        write_json_atomic(out / "partition.json",
                          {"scheme": cfg.partition, "alpha": cfg.alpha, "class_names": names,
                           "histogram": hist.tolist(), "sizes": [len(p) for p in parts]})
    # the one place that decides what a method trains: Meerkat mask, LoRA adapter or dense
    space = build_space(cfg, prep.model, out, resume=resume,
                        make_mask=lambda: get_mask(cfg, prep, parts, quiet))
    mask, mask_source, view = space.mask, space.source, space.view
    if mask.nnz > MAX_VECTOR:
        raise InputError(f"the trainable space has {mask.nnz:,} values, more than the "
                         f"{MAX_VECTOR:,} a plan or reply can carry (federated/messages.py)")
    digest = space_digest(mask)
    log(f"trainable ({space.kind}): {mask.nnz:,} of {mask.eligible_numel:,} eligible values "
        f"(density {mask.density:.2e}), {mask_source}")
    theta0 = view.gather()
    if cfg.lr_auto and not resume:
        cfg = pick_lr(cfg, prep, view, theta0, out)
    dtypes = {p.dtype for p in prep.model.parameters()}
    warn = eps_resolution_warning(theta0, cfg.eps, min(dtypes, key=lambda d: torch.finfo(d).bits))
    if warn:
        log(f"warning: {warn}")
    keep_copy = cfg.downlink == "scalars"  # clients hold their own vector only in this mode
    shared0 = theta0.clone() if keep_copy else None  # one copy for all: see share_copies
    states = [ClientState(k, np.asarray(p, dtype=np.int64),
                          ClientDataPointer(len(p), seed=mix(cfg.seed, 2, k)),
                          shared0 if keep_copy else None)
              for k, p in enumerate(parts)]
    settings = settings_of(cfg)
    server = make_server(cfg.method, settings, theta0, [s.num_samples for s in states],
                         method_settings=cfg.method_settings, calib_grad=mask.calib_grad,
                         **space.server_options)
    del theta0  # the server holds its own copy: no spare model-size vector for full-fedzo
    metrics = MetricsLog(out / "metrics.jsonl")

    if resume:
        load_checkpoint(out, server, states, digest, log=log)
        drop_trajectories_after(out, server.round)
        # drop lines written after the checkpoint and a half-written last line, if any
        records = [r for r in metrics.read() if r["round"] <= server.round]
        if not records:
            raise InputError(f"{out}/metrics.jsonl lacks round 0; the run cannot be resumed")
        metrics.rewrite(records)
        initial = evaluated_part(records[0])
        last = evaluated_part([r for r in records if r.get("test_accuracy") is not None][-1])
        view.write(server.theta)
        log(f"resuming {out} after round {server.round} of {cfg.rounds}")
    else:
        sizes = {"test_examples": len(prep.test_ids), "val_examples": len(prep.val_ids)}
        if initial is not None and any(initial.get(k) != v for k, v in sizes.items()):
            raise ValueError(f"the given initial evaluation has {initial.get('test_examples')} "
                             f"test / {initial.get('val_examples')} validation examples, this "
                             f"run {sizes['test_examples']} / {sizes['val_examples']}")
        initial = last = evaluated_part(initial) if initial else evaluate_splits(prep, cfg)
        log(f"round 0: {format_evaluation(initial)}")
        metrics.append({"round": 0, "train_loss": None, **initial,
                        "bytes_up": 0, "bytes_down": 0})
        save_checkpoint(out, server, states, digest)

    per_round = sum(server.steps_for(1, k) for k in server.participants(1))
    bar = tqdm(total=per_round * (cfg.rounds - server.round), desc="training", unit="step",
               disable=quiet, file=sys.stderr, dynamic_ncols=True)
    step_losses: list[float] = []

    def on_step(res: StepResult) -> None:
        bar.update(1)
        step_losses.append(res.loss)
        bar.set_postfix(loss=f"{np.mean(step_losses[-10:]):.4f}", acc=f"{last['test_accuracy']:.3f}")

    def on_plans(plans: list[RoundPlan]) -> None:
        # the bar assumed round 1's step count for every round; VP's early stops change it
        bar.total += sum(p.num_steps for p in plans) - per_round

    def evaluate(r: int) -> dict[str, Any] | None:
        nonlocal last
        if not (r == cfg.rounds or (cfg.eval_every and r % cfg.eval_every == 0)):
            return None
        view.write(server.theta)
        last = evaluate_splits(prep, cfg)
        return last  # the driver logs it

    host = ClientHost(get_method(cfg.method), cfg.method_settings, settings,
                      SharedModel(prep, view), {s.client_id: s for s in states}, on_step)
    driver = RoundDriver(server, InProcessTransport(host),
                         append_metrics=metrics.append,
                         save_arrays=lambda r, arrays: save_trajectories(out, r, arrays),
                         checkpoint=lambda: save_checkpoint(out, server, states, digest),
                         evaluate=evaluate, log=lambda m: bar.write(m, file=sys.stderr),
                         round_timeout=cfg.round_timeout, min_clients=cfg.min_clients,
                         round_retries=cfg.round_retries, on_plans=on_plans)
    try:
        with z_cache(cfg.z_cache_mb << 20):  # full-fedzo only: see zo.dense.z_cache
            driver.run(cfg.rounds)
    except RoundFailed as e:
        raise RoundFailed(f"{e}; {out} holds round {server.round}: continue with "
                          f"`fedmeerkat run --resume {out}`") from None
    finally:
        bar.close()
    save_state(out / FINAL_STATE, server.theta,
               {"round": str(server.round), "nnz": str(mask.nnz), "method": cfg.method})
    records = metrics.read()
    client_rounds = sum(len(r.get("bytes", {})) for r in records[1:])
    up_total = sum(r["bytes_up"] for r in records)
    down_total = sum(r["bytes_down"] for r in records)
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method,
        "initial_accuracy": initial["test_accuracy"], "final_accuracy": last["test_accuracy"],
        "initial_predicted_share": initial["predicted_share"],
        "final_predicted_share": last["predicted_share"],
        **summary_metrics(initial, last),
        **best_round(records),
        "gain": gain_verdict(initial, last),
        "rounds": server.round, "clients": cfg.clients, "local_steps": cfg.local_steps,
        "perturbations": cfg.perturbations, "zo_estimator": cfg.zo_estimator,
        "clients_per_round": cfg.clients_per_round or cfg.clients, "downlink": cfg.downlink,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "eps": cfg.eps, "lr_schedule": cfg.lr_schedule,
        "density": mask.density, "mask_nnz": mask.nnz, "mask_source": mask_source,
        "mask_kind": mask.meta.get("mask_kind", cfg.mask_kind), "trainable_space": space.kind,
        "partition": cfg.partition, "alpha": cfg.alpha,
        "train_examples": len(prep.train_ids), "test_examples": len(prep.test_ids),
        "val_examples": len(prep.val_ids), "val_fraction": cfg.val_fraction,
        "upload_bytes_per_client": up_total / max(1, client_rounds),
        "download_bytes_per_client": down_total / max(1, client_rounds),
        "upload_bytes_total": up_total, "download_bytes_total": down_total,
        "bytes_note": "per participating client per round, mean; from the serialized messages",
        "dense_model_bytes": sum(p.numel() * p.element_size() for p in prep.model.parameters()),
        "wall_seconds": round(time.time() - start, 1),
        "out": str(out),
        **server.summary_extra(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _fmt(share: list[float]) -> str:
    return "/".join(f"{s:.2f}" for s in share)


# ---- evaluation records (metrics.jsonl, summary.json); the deployed server uses them too -----
THRESHOLD_FREE = ("auc", "macro_f1", "best_shift_accuracy")  # models.scoring.label_metrics
SPLITS = ("test", "val")


def eval_record(res: EvalResult, val: EvalResult | None = None) -> dict[str, Any]:
    """An evaluation's entries of a metrics.jsonl line: test_* always, val_* when the run has a
    validation set (None otherwise, so every line has the same keys)."""
    out: dict[str, Any] = {"test_accuracy": res.accuracy, "test_loss": res.loss,
                           "predicted_share": res.predicted_share, **res.metrics("test_"),
                           "test_examples": res.num_examples}
    out.update({"val_accuracy": None if val is None else val.accuracy,
                "val_loss": None if val is None else val.loss,
                **({f"val_{k}": None for k in THRESHOLD_FREE} if val is None
                   else val.metrics("val_")),
                "val_examples": 0 if val is None else val.num_examples})
    return out


EVAL_KEYS = ("test_accuracy", "test_loss", "predicted_share", "test_examples", "val_accuracy",
             "val_loss", "val_examples", *(f"{s}_{k}" for s in SPLITS for k in THRESHOLD_FREE))


def evaluated_part(rec: dict[str, Any]) -> dict[str, Any]:
    """The evaluation entries of a metrics line (older run folders lack some: None)."""
    return {k: rec.get(k) for k in EVAL_KEYS}


def eval_from_record(rec: dict[str, Any], n: int) -> EvalResult:
    """The test EvalResult a metrics line holds (run folders older than a metric give None)."""
    return EvalResult(rec["test_accuracy"], rec.get("test_loss", math.nan),
                      rec.get("predicted_share", []), n,
                      **{k: rec.get(f"test_{k}") for k in THRESHOLD_FREE})


def format_evaluation(rec: dict[str, Any]) -> str:
    """'test accuracy 0.586 (predicted share 0.02/0.98; AUC ...); validation AUC ...'"""
    text = (f"test accuracy {rec['test_accuracy']:.4f} (predicted share "
            f"{_fmt(rec['predicted_share'] or [])}; {format_metrics(rec)})")
    if rec.get("val_accuracy") is not None:
        text += (f"; validation accuracy {rec['val_accuracy']:.4f}, "
                 f"{format_metrics(rec, 'val_')}")
    return text


def best_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluated round with the best validation metric (primary_metric; the earliest on a
    tie) and its test metrics: selection never reads test. Empty without a validation set."""
    scored = [(primary_metric(r), -r["round"], r) for r in records
              if r.get("test_accuracy") is not None and primary_metric(r) is not None]
    if not scored:
        return {}
    _, _, r = max(scored, key=lambda x: (x[0], x[1]))
    return {"best_val_round": r["round"], "best_val_metric": primary_metric(r),
            **{f"best_val_round_test_{k}": r.get(f"test_{k}") for k in ("accuracy", *THRESHOLD_FREE)}}


def summary_metrics(initial: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """initial_* and final_* threshold-free test metrics (and initial_val_* / final_val_*
    with their validation accuracy) for summary.json."""
    out = {f"{when}_{k}": rec.get(f"test_{k}") for when, rec in (("initial", initial),
                                                                ("final", final))
           for k in THRESHOLD_FREE}
    out.update({f"{when}_val_{k}": rec.get(f"val_{k}") for when, rec in (("initial", initial),
                                                                        ("final", final))
                for k in ("accuracy", *THRESHOLD_FREE)})
    return out


# A change this small in the threshold-free metric is not called learning: on 1,000 test
# examples the spread of ROC-AUC between seeds of one setting is about this size.
GAIN_MARGIN = 0.01


def gain_verdict(initial: dict[str, Any], final: dict[str, Any]) -> str:
    """One line: is the change from the untrained model learning or recalibration? Learning
    raises the threshold-free test metric (ROC-AUC / macro-F1, primary_metric); recalibration
    raises accuracy alone (a shift of the label bias), which they do not see."""
    a, b = primary_metric(initial, "test"), primary_metric(final, "test")
    d_acc = final["test_accuracy"] - initial["test_accuracy"]
    if a is None or b is None:
        return "no threshold-free metric: learning cannot be told from recalibration"
    name = "ROC-AUC" if initial.get("test_auc") is not None else "macro-F1"
    if b - a >= GAIN_MARGIN:
        return f"learning: test {name} {a:.3f} -> {b:.3f} (+{b - a:.3f})"
    if d_acc >= GAIN_MARGIN:
        return (f"recalibration, not learning: test accuracy +{d_acc:.3f} but {name} "
                f"{a:.3f} -> {b:.3f}")
    return f"no gain: test {name} {a:.3f} -> {b:.3f}, accuracy {d_acc:+.3f}"
