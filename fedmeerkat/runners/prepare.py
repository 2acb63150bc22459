"""Loading and preparing a run: the task and its validation split, the model and its
label-word scorer, the clients' data, the mask, and the settings both sides of the protocol
derive their plans from. Every transport starts here: the in-process simulation, the deployed
server (server-side evaluation) and every deployed site.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmeerkat.config import RunConfig
from fedmeerkat.data.partition import label_histogram, partition
from fedmeerkat.data.pointer import ClientDataPointer
from fedmeerkat.federated import ClientState, FedSettings
from fedmeerkat.federated.dp import (
    DPSettings,
    PrivacyLedger,
    sampling_rate,
    solve_noise_multiplier,
)
from fedmeerkat.federated.methods import get_method
from fedmeerkat.models.loading import load_model
from fedmeerkat.models.scoring import LabelScorer, encode_prompts
from fedmeerkat.options import InputError
from fedmeerkat.runners.masks import obtain_mask
from fedmeerkat.tasks import load_task
from fedmeerkat.tasks.base import TaskData
from fedmeerkat.tasks.common import with_validation
from fedmeerkat.zo import SparseMask, SparseView
from fedmeerkat.zo.per_example import ExampleOffsets
from fedmeerkat.zo.seeds import DATA_ORDER, SITE_SPLIT, mix


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
        self._offsets: ExampleOffsets | None = None

    def loss(self, example_ids: np.ndarray) -> float:
        p = self.prep
        batch = p.scorer.collate([p.train_ids[i] for i in example_ids], p.train_labels[example_ids])
        return p.scorer.loss(batch)

    def example_losses(self, example_ids: np.ndarray) -> np.ndarray:
        p = self.prep
        batch = p.scorer.collate([p.train_ids[i] for i in example_ids], p.train_labels[example_ids])
        return p.scorer.example_losses(batch)

    def example_offsets(self) -> ExampleOffsets:
        """The model's per-example perturbation hooks, built on first use (one set per model:
        they are inactive outside a per-example step)."""
        if self._offsets is None:
            self._offsets = ExampleOffsets(self.prep.model, self.view.mask)
        return self._offsets

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
    scorer = LabelScorer(model, tokenizer, task.spec.label_words, loss=cfg.loss)

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
    split by client, 'task-gradient' the encoded training prompts with their labels."""
    texts = None
    if cfg.mask_kind in ("task", "union") and not cfg.mask:
        spec = prep.task.spec
        texts = [spec.render(e) + spec.label_words[e.label] for e in prep.task.train]
    examples = None
    if cfg.mask_kind == "task-gradient" and not cfg.mask:
        examples = list(zip(prep.train_ids, prep.train_labels.tolist(), strict=True))
    return obtain_mask(prep.model, prep.tokenizer, model_name=cfg.model, density=cfg.density,
                       rule=cfg.eligible, corpus=cfg.calib_corpus,
                       num_sequences=cfg.calib_sequences, seq_len=cfg.calib_seq_len, path=cfg.mask,
                       quiet=quiet, kind=cfg.mask_kind, seed=cfg.seed, task_texts=texts,
                       client_texts=None if texts is None else [[texts[i] for i in p] for p in parts],
                       examples=examples, label_words=list(prep.task.spec.label_words),
                       num_examples=cfg.mask_examples)


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
                       client_sampling=cfg.client_sampling,
                       device=cfg.server_device or cfg.device, reply_bound=cfg.reply_bound,
                       reply_bound_abs=cfg.reply_bound_abs,
                       reply_bound_action=cfg.reply_bound_action,
                       perturbations=cfg.perturbations, estimator=cfg.zo_estimator)


def site_split(cfg: RunConfig, prep: Prepared, hosted: list[int]) -> dict[int, np.ndarray]:
    """A deployed site's own data file (a `data_files` override), split among the clients it
    hosts with a seed of its own (SITE_SPLIT), so two sites' splits are independent."""
    parts = partition(prep.train_labels, len(hosted), cfg.partition, alpha=cfg.alpha,
                      seed=mix(cfg.seed, SITE_SPLIT, hosted[0]),
                      num_classes=prep.task.spec.num_classes, min_size=cfg.min_partition_size)
    return dict(zip(hosted, parts, strict=True))


def partition_record(cfg: RunConfig, prep: Prepared, parts: list[np.ndarray]) -> dict[str, Any]:
    """partition.json: the clients' label histogram, with the class names it counts."""
    hist = label_histogram(parts, prep.train_labels, prep.task.spec.num_classes)
    return {"scheme": cfg.partition, "alpha": cfg.alpha, "class_names": class_names(prep),
            "histogram": hist.tolist(), "sizes": [len(p) for p in parts]}


def class_names(prep: Prepared) -> list[str]:
    return list(prep.task.spec.class_names) or [w.strip() for w in prep.task.spec.label_words]


def client_state(cfg: RunConfig, client_id: int, example_ids: np.ndarray,
                 theta: torch.Tensor | None) -> ClientState:
    """A client at the start of the run: its examples, its data pointer at the start of its
    seeded order (DATA_ORDER) and, with the scalar downlink, the vector it holds (`theta`,
    shared by all clients of a round until one writes: federated.share_copies)."""
    return ClientState(client_id, np.asarray(example_ids, dtype=np.int64),
                       ClientDataPointer(len(example_ids), seed=mix(cfg.seed, DATA_ORDER,
                                                                    client_id)),
                       theta if cfg.downlink == "scalars" else None)


def dp_of(cfg: RunConfig) -> DPSettings | None:
    """The run's differential privacy (federated/dp.py), None when dp_clip = 0."""
    if cfg.dp_clip <= 0:
        return None
    return DPSettings(cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_delta, cfg.dp_epsilon,
                      tuple(float(s) for s in cfg.dp_noise_multipliers))


def with_solved_noise(cfg: RunConfig, client_sizes: list[int]) -> RunConfig:
    """dp_epsilon without a sigma: each client's smallest sigma that keeps it within the
    budget over the steps it is planned to run (BaseServer.planned_steps: its seeded
    participation, known before the run; with clients_per_round < clients, far fewer than
    rounds * local_steps), at its own sampling rate and (dp_delta = 0) delta 1/n, solved by
    dp-accounting. Per client, not the largest for all: one small client (q near 1, little
    amplification) would otherwise set the noise of every client. The caller writes them to
    config.toml (dp_noise_multipliers), so a resumed run, or one resumed with a larger budget,
    keeps them. A client planned no step gets the sigma of one round. The ledger still counts
    the plans actually sent (a retried round costs again) and stops the run before any client
    would exceed the budget."""
    if cfg.dp_clip <= 0 or cfg.dp_noise_multiplier > 0 or cfg.dp_noise_multipliers:
        return cfg
    method = get_method(cfg.method)
    settings = settings_of(cfg)
    planned = method.server.planned_steps(settings, client_sizes,
                                          **method.server_options(cfg.method_settings))
    solved: dict[tuple[int, int], float] = {}
    sigmas = []
    for k, n in enumerate(client_sizes):
        key = (n, planned[k] or settings.seeds_per_round)
        if key not in solved:
            solved[key] = solve_noise_multiplier(sampling_rate(cfg.batch_size, n), key[1],
                                                 cfg.dp_epsilon, cfg.dp_delta or 1.0 / n)
        sigmas.append(round(solved[key], 6) + 1e-6)  # rounded up: never above the budget
    log(f"dp: noise multipliers {min(sigmas):.4f}-{max(sigmas):.4f} keep each client's epsilon "
        f"<= {cfg.dp_epsilon:g} over the steps it is planned to run (at most "
        f"{max(planned.values())} of {cfg.rounds * cfg.local_steps * cfg.perturbations})")
    return dataclasses.replace(cfg, dp_noise_multipliers=sigmas)


def ledger_of(cfg: RunConfig, client_sizes: list[int]) -> PrivacyLedger | None:
    """The server's count of each client's private steps (None without DP)."""
    dp = dp_of(cfg)
    return None if dp is None else PrivacyLedger(dp, cfg.batch_size, list(client_sizes))
