"""Run configuration: every key, its default and its check, in one place.

A run is described by a TOML file plus `key=value` overrides. `load_config` validates all of it
before any model or data is touched; a bad key or value raises ConfigError with one line that
names it. Values are plain scalars or lists, so the resolved config round-trips through TOML.
The keys of one method only (VP's thresholds, the LoRA rank, ...) are declared by that method's
module (federated/methods/) and sit flat beside these in files; `RunConfig.method_settings`
holds them, typed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Each constant has one home in the layer that uses it; the config reads them from there.
from fedmeerkat.federated.messages import MAX_CLIENT_ID, MAX_ROUND, MAX_STEPS
from fedmeerkat.federated.methods import get_method, ordered
from fedmeerkat.federated.schedule import SCHEDULES
from fedmeerkat.federated.server import CLIENT_SAMPLINGS, DOWNLINKS
from fedmeerkat.federated.validate import REPLY_ACTIONS
from fedmeerkat.models.loading import DTYPES as _MODEL_DTYPES
from fedmeerkat.models.loading import model_spec_problem
from fedmeerkat.models.scoring import LOSSES
from fedmeerkat.options import (
    ConfigError,
    build,
    check,
    coerce,
    default_of,
    keys_of,
    to_keys,
)
from fedmeerkat.options import setting as _f
from fedmeerkat.tasks import TASKS
from fedmeerkat.zo.dense import is_dense_file
from fedmeerkat.zo.mask import DEFAULT_ELIGIBLE, SparseMask
from fedmeerkat.zo.step import ESTIMATORS

METHODS = tuple(m.name for m in ordered())  # the registry's, in its order
PARTITIONS = ("iid", "dirichlet", "dirichlet-client", "single-label", "mixed-single-label")
DTYPES = tuple(_MODEL_DTYPES)
WEIGHTINGS = ("samples", "uniform")
MASK_KINDS = ("calibration", "weight-magnitude", "random", "task", "union", "task-gradient")

# methods whose client step is plain two-point ZO-SGD on the run's space: what lr=auto's
# search (runners/tune.py) runs
LR_SEARCHABLE = ("meerkat", "meerkat-vp", "meerkat-random-select", "full-fedzo", "lora-fedzo")
# methods whose every client step is run_client's plain two-point step, which has a private
# version (federated/dp.py); VP's calibration phase, FedDyn's update hook, the dense and the
# first-order clients have none
DP_METHODS = ("meerkat", "lora-fedzo")

__all__ = ["ConfigError", "RunConfig", "build_config", "describe", "load_config"]


@dataclass
class RunConfig:
    # what to train
    model: str = _f("smollm2-135m", "HF hub id, local model folder, or 'smollm2-135m' (packaged)")
    dtype: str = _f("float32", "model dtype", choices=DTYPES)
    device: str = _f("cpu", "torch device of the model; each client's z, master copy and update live there too")
    server_device: str = _f("", "torch device of the server's vectors and replay ('' = same as device)")
    task: str = _f("rotten_tomatoes", "task name (see `fedmeerkat tasks`) or 'local'")
    data_files: str = _f("", "local data file(s) for task=local or to feed a hub task offline")
    template: str = _f("", "prompt template override, e.g. '{sentence} It was'")
    label_words: list = _f([], "label word per class override, e.g. [' terrible', ' great']")
    label_field: str = _f("label", "label column for local files")
    max_train: int = _f(0, "cap on the training pool (validation is carved from it), seeded subsample (0 = all)", min=0)
    max_test: int = _f(0, "cap on test examples, seeded subsample (0 = all)", min=0)
    test_fraction: float = _f(0.2, "test share when the data has no test split", gt=0, lt=1)
    val_fraction: float = _f(0.1, "validation share carved (seeded, stratified) from the training pool before partitioning; model selection (lr=auto, best round) reads it, never test (0 = none)", min=0, lt=1)
    max_val: int = _f(500, "cap on validation examples; the rest stays training data (0 = no cap)", min=0)
    max_length: int = _f(128, "prompt tokens kept (the start is cut, the answer end kept)", min=8)
    # method
    method: str = _f("meerkat", "federated method", choices=METHODS)
    clients: int = _f(10, "number of clients K", min=1)
    rounds: int = _f(20, "communication rounds R", min=1)
    local_steps: int = _f(10, "local ZO steps per round T", min=1)
    batch_size: int = _f(16, "examples per ZO step", min=1)
    lr: float = _f(1e-4, "learning rate; 'auto' = lr_auto=true (picked on the validation split before the run)", gt=0)
    lr_auto: bool = _f(False, "pick lr from lr_auto_grid on the validation split before the run (runners/tune.py; its cost is printed); `lr=auto` sets it")
    lr_auto_grid: list = _f([3e-5, 1e-4, 3e-4, 1e-3], "candidate lrs of lr=auto")
    lr_auto_steps: int = _f(40, "centralized ZO steps per lr=auto candidate (x 2 forwards)", min=1)
    loss: str = _f("ce", "training loss on the label words' logits: ce (cross-entropy) | centered-ce (each label word's logit minus its batch mean first: calibration shifts leave it unchanged, so a ZO scalar carries the ranking signal only; evaluation reports plain CE)", choices=LOSSES)
    eps: float = _f(1e-3, "perturbation scale of the two-point estimate", gt=0)
    perturbations: int = _f(1, "seeded directions per local step, estimated at the same weights on one batch and averaged (each uploads its scalar; plans carry T x P seeds)", min=1)
    zo_estimator: str = _f("two-point", "two-point: 2 forwards a direction (MeZO); one-sided: f(w+eps z) - f(w) with one shared f(w), P+1 forwards a step (FZOO); per-example: the batch's examples split among the P directions in the same 2 forwards (GRZO)", choices=ESTIMATORS)
    # differential privacy of the uploaded scalars (federated/dp.py, docs/privacy.md)
    dp_clip: float = _f(0.0, "DP: clip every example's two-point difference to [-C, C], add secret Gaussian noise of std dp_noise_multiplier x C to their sum, divide by batch_size; batches are Poisson samples (0 = off)", min=0)
    dp_noise_multiplier: float = _f(0.0, "DP: sigma of every client (0 with dp_epsilon: solved per client, see dp_noise_multipliers)", min=0)
    dp_noise_multipliers: list = _f([], "DP: one sigma per client, replacing dp_noise_multiplier; with dp_epsilon and no sigma, each client's is solved for its planned steps before the run starts and written here in config.toml")
    dp_epsilon: float = _f(0.0, "DP: each client's budget at dp_delta; the run stops (exit 3) before a round would exceed it, resumable with a larger one (0 = no budget, spent epsilon still reported)", min=0)
    dp_delta: float = _f(0.0, "DP: the delta of the reported epsilon (0 = 1/n per client, n its examples)", min=0, lt=1)
    weighting: str = _f("samples", "FedAvg weights: by client sample count or uniform", choices=WEIGHTINGS)
    # all clients every round is the default: the paper's shape, what a site joining a
    # deployment expects, and measured against one client a round at the same 4,000 forwards
    # (benchmarks/results/run_defaults.json, README "`fedmeerkat run` with its own defaults"):
    # one Dirichlet client a round swings with each client's label skew and ended below
    # zero-shot; all ten ended +0.037 test ROC-AUC (and +0.021 at a second seed)
    clients_per_round: int = _f(0, "clients sampled per round (0 = all)", min=0)
    # uniform is Flower's default and what every earlier run used (its draws are unchanged);
    # size, measured with one client a round (benchmarks/results/learning.json,
    # rt-federated-per-example-cosine-size and rt-federated-t1-size), helped one recipe and
    # hurt the other, so it is an option, not the default
    client_sampling: str = _f("uniform", "how clients_per_round clients are drawn: uniform, or size (in proportion to each client's examples, Li et al. 2020 Scheme I: one client a round then steps on the pooled data in expectation; with several a round it needs weighting=uniform)", choices=CLIENT_SAMPLINGS)
    downlink: str = _f("sparse-weights", "server -> client: the averaged sparse vector (paper) or T+1 aggregated scalars", choices=DOWNLINKS)
    lr_schedule: str = _f("constant", "lr over all rounds x steps", choices=SCHEDULES)
    weight_decay: float = _f(0.0, "decoupled weight decay on the masked weights", min=0)
    # data split over clients
    partition: str = _f("dirichlet", "iid | dirichlet (per class over clients, Flower) | dirichlet-client (per client over classes) | single-label | mixed-single-label (client 0 single-label, the rest IID)", choices=PARTITIONS)
    alpha: float = _f(0.5, "Dirichlet concentration", gt=0)
    min_partition_size: int = _f(1, "resample Dirichlet until each client has this many examples", min=1)
    # mask
    density: float = _f(1e-3, "share of eligible weights in the mask", gt=0, max=1)
    mask: str = _f("", "mask file to use; empty = compute (or reuse the cached one)")
    mask_kind: str = _f("calibration", "how a computed mask picks weights: calibration (general-text squared gradient) | weight-magnitude | random (run seed) | task (training texts) | union (of per-client task masks) | task-gradient (largest mean gradient of the label loss, logits centered, on mask_examples labelled training examples)", choices=MASK_KINDS)
    mask_examples: int = _f(256, "labelled training examples a mask_kind=task-gradient mask is scored on (one backward each)", min=2)
    eligible: str = _f(DEFAULT_ELIGIBLE, "regex of 2-D weights the mask may pick")
    calib_corpus: str = _f("news", "general text for the mask: 'news' (packaged), 'c4' / 'allenai/c4' (hub, streamed; the paper's) or a path (.txt, .jsonl, C4 .json.gz shards, folder)")
    calib_sequences: int = _f(128, "calibration sequences", min=1)
    calib_seq_len: int = _f(512, "tokens per calibration sequence (longer texts are cut)", min=8)
    # run
    seed: int = _f(0, "run seed: partition, data order, z seeds", min=0)
    eval_every: int = _f(5, "evaluate every N rounds (0 = only at the start and the end)", min=0)
    eval_batch_size: int = _f(32, "batch size for evaluation", min=1)
    keep_best: bool = _f(True, "keep the best validation round's trained values in best_state.safetensors (export/eval --best); a model-sized file for full-fedzo, so false there saves the disk")
    out: str = _f("", "run folder; empty = runs/<task>-<method>-<time>")
    threads: int = _f(0, "torch CPU threads (0 = torch default)", min=0)
    z_cache_mb: int = _f(0, "full-fedzo in simulation: keep up to this many MiB of drawn z so the clients of a round (shared seeds) and the server reuse it; same bits, T x model-size memory buys about 3K x fewer draws (0 = off: MeZO memory)", min=0)
    round_timeout: float = _f(0.0, "seconds a round waits for replies; later ones leave their client out of the round (0 = wait for all)", min=0)
    # replies and dropouts (federated/validate.py, runners/driver.py, docs/reliability.md)
    reply_bound: float = _f(100.0, "leave out (or clip) a reply whose max |g| exceeds this many times the round's median max |g| (applies with >= 3 valid replies; 0 = off)", min=0)
    reply_bound_abs: float = _f(0.0, "fixed cap on a reply's max |g| (vector replies: max |v - theta|); 0 = off", min=0)
    reply_bound_action: str = _f("reject", "a reply above the bound: reject (leave the client out of the round) or clip (every scalar to the bound; meerkat-feddyn always rejects)", choices=REPLY_ACTIONS)
    min_clients: int = _f(1, "usable replies a round needs; with fewer it is retried, then the run stops (resumable)", min=1)
    round_retries: int = _f(2, "times a round below min_clients is planned again before the run stops", min=0)

    # The typed settings of `method` (its own keys, declared by its module under
    # federated/methods/); not a key itself: in files its keys sit flat beside the others.
    method_settings: Any = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.method_settings is None:
            self.method_settings = get_method(self.method).settings()

    def to_dict(self) -> dict[str, Any]:
        """Flat {key: value}: the common keys, then the method's own (round-trips via TOML)."""
        out = {k: getattr(self, k) for k in COMMON}
        out.update(to_keys(self.method_settings))
        return out


COMMON = {f.name: f for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")}
# Method keys: every registered method's settings. A key read by several methods (lora_rank)
# must be one declaration (a shared settings class); this checks it.
METHOD_KEYS: dict[str, dataclasses.Field] = {}
READ_BY: dict[str, list[str]] = {}
for _m in ordered():
    for _key, _field in keys_of(_m.settings).items():
        if _key in COMMON or METHOD_KEYS.setdefault(_key, _field).metadata != _field.metadata:
            raise RuntimeError(f"config key {_key!r} is declared twice with different meanings")
        READ_BY.setdefault(_key, []).append(_m.name)
FIELDS = {**COMMON, **METHOD_KEYS}


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    raw.update(parse_overrides(overrides or []))
    cfg = build_config(raw)
    check_inputs(cfg)
    return cfg


METHOD_KEYS_TABLE = "method_keys"


def _apply_method_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A file's `[method_keys]` table holds keys of particular methods (VP's thresholds, ...)
    that apply only when the run's method reads them, so one file serves every method (the
    paper presets). Each is checked whatever the method; a key also given flat (a key=value
    override, or the file's top level) wins."""
    table = raw.get(METHOD_KEYS_TABLE)
    if table is None:
        return raw
    if not isinstance(table, dict):
        raise ConfigError(f"{METHOD_KEYS_TABLE}: expected a table of method keys")
    out = {k: v for k, v in raw.items() if k != METHOD_KEYS_TABLE}
    method = out.get("method", default_of(COMMON["method"]))
    mine = keys_of(get_method(method).settings) if method in METHODS else {}  # else: refused below
    for key, value in table.items():
        if key not in METHOD_KEYS:
            raise (_unknown(key) if key not in COMMON else
                   ConfigError(f"{METHOD_KEYS_TABLE}.{key}: a common key; set it at the top level"))
        f = METHOD_KEYS[key]
        check(key, coerce(key, value, default_of(f)), f.metadata)
        if key in mine:
            out.setdefault(key, value)
    return out


def build_config(raw: dict[str, Any]) -> RunConfig:
    raw = _apply_method_keys(raw)
    if isinstance(raw.get("lr"), str) and raw["lr"].strip().lower() == "auto":
        # lr=auto: the search starts from the default lr's place; its pick replaces lr
        raw = {**raw, "lr": default_of(COMMON["lr"]), "lr_auto": True}
    values, own = {}, {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise _unknown(key)
        if key in COMMON:
            v = coerce(key, value, default_of(COMMON[key]))
            check(key, v, COMMON[key].metadata)
            values[key] = v
        else:
            own[key] = value
    method = get_method(values.get("method", default_of(COMMON["method"])))
    mine = keys_of(method.settings)
    for key, value in own.items():
        f = METHOD_KEYS[key]
        # another method's key: harmless at its default (resolved configs written before the
        # registry list every key), an error otherwise, since this method would ignore it
        if key not in mine and coerce(key, value, default_of(f)) != default_of(f):
            raise ConfigError(f"{key}: read by method {' / '.join(READ_BY[key])} only, "
                              f"not by method={method.name}")
    settings = build(method.settings, {k: v for k, v in own.items() if k in mine})
    cfg = RunConfig(**values, method_settings=settings)
    validate_combination(cfg)
    return cfg


def validate_combination(cfg: RunConfig) -> None:
    """Checks that involve several keys (a method's own ones are its settings' __post_init__),
    and every check of a single value that needs more than its type and bounds: all of it
    before any model or data is loaded."""
    validate_values(cfg)
    if cfg.task == "local" and not cfg.data_files:
        raise ConfigError("data_files: required when task = 'local'")
    if cfg.task == "local" and (not cfg.template or not cfg.label_words):
        raise ConfigError("template/label_words: required when task = 'local'")
    if cfg.clients_per_round > cfg.clients:
        raise ConfigError(f"clients_per_round: {cfg.clients_per_round} exceeds clients={cfg.clients}")
    if cfg.client_sampling == "size" and cfg.clients_per_round in (0, cfg.clients):
        raise ConfigError("client_sampling: size draws clients_per_round of the clients; with "
                          "every client every round it changes nothing (set clients_per_round)")
    if cfg.client_sampling == "size" and cfg.clients_per_round > 1 and cfg.weighting != "uniform":
        raise ConfigError("client_sampling: size with several clients a round needs "
                          "weighting=uniform (drawn by size and weighted by size, a large "
                          "client would count twice; Li et al. 2020, Scheme I)")
    if cfg.mask and not Path(cfg.mask).is_file():
        raise ConfigError(f"mask: file not found: {cfg.mask}")
    if cfg.mask and cfg.mask_kind != "calibration":
        raise ConfigError(f"mask_kind: {cfg.mask_kind!r} picks a computed mask; it cannot apply to mask={cfg.mask}")
    if cfg.template and "{" not in cfg.template:
        raise ConfigError(f"template: {cfg.template!r} names no field, e.g. '{{sentence}} It was'")
    if 0 < cfg.reply_bound < 1:
        raise ConfigError(f"reply_bound: must be 0 (off) or >= 1, got {cfg.reply_bound!r} "
                          "(below 1 it would leave out half of every round)")
    if cfg.lr_auto:
        if cfg.method not in LR_SEARCHABLE:
            raise ConfigError(f"lr_auto: searches plain ZO-SGD steps; method={cfg.method} is "
                              f"not one (use {', '.join(LR_SEARCHABLE)}, or give lr=)")
        if not cfg.val_fraction:
            raise ConfigError("lr_auto: needs a validation split (val_fraction > 0); it never "
                              "reads test data")
        grid = cfg.lr_auto_grid
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and 0 < v < float("inf") for v in grid):
            raise ConfigError(f"lr_auto_grid: expected a non-empty list of positive numbers, "
                              f"got {grid!r}")
    per_round = cfg.clients_per_round or cfg.clients
    if cfg.min_clients > per_round:
        raise ConfigError(f"min_clients: {cfg.min_clients} exceeds the {per_round} clients "
                          "planned per round")
    # a method's checks against the common keys (its settings never see the run config)
    check_common = getattr(cfg.method_settings, "check_common", None)
    if check_common is not None:
        try:
            check_common({k: getattr(cfg, k) for k in COMMON})
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if (cfg.perturbations != 1 or cfg.zo_estimator != "two-point") and not get_method(
            cfg.method).server.directions_ok:
        raise ConfigError(f"perturbations/zo_estimator: method={cfg.method} runs one two-point "
                          "direction a step (use method=meerkat or lora-fedzo)")
    if cfg.zo_estimator == "per-example":
        if cfg.perturbations < 2 or cfg.batch_size % cfg.perturbations:
            raise ConfigError(f"zo_estimator=per-example: perturbations must be 2 or more and "
                              f"divide batch_size={cfg.batch_size} (each direction gets "
                              f"batch_size / perturbations examples; perturbations={cfg.batch_size}"
                              " gives each example its own)")
        if cfg.loss != "ce":
            raise ConfigError(f"zo_estimator=per-example: needs loss=ce (with {cfg.loss} an "
                              "example's loss depends on the other examples' directions)")
    if cfg.local_steps * cfg.perturbations > MAX_STEPS:
        raise ConfigError(f"perturbations: local_steps x perturbations = "
                          f"{cfg.local_steps * cfg.perturbations} seeds a round exceed "
                          f"{MAX_STEPS}, the most the wire format encodes")
    if cfg.loss == "centered-ce" and cfg.batch_size < 2:
        raise ConfigError("loss: centered-ce needs batch_size >= 2 (a batch of one centers "
                          "to a constant loss)")
    if cfg.dp_clip > 0:
        if cfg.loss != "ce":
            raise ConfigError(f"dp_clip: needs loss=ce (with {cfg.loss} one example changes "
                              "every example's loss, so the per-example clip bounds nothing)")
        if cfg.method not in DP_METHODS:
            raise ConfigError(f"dp_clip: method={cfg.method} has no private client step; "
                              f"use method={' or '.join(DP_METHODS)}")
        if cfg.perturbations != 1 or cfg.zo_estimator != "two-point":
            raise ConfigError("dp_clip: runs plain two-point steps (perturbations=1, "
                              "zo_estimator=two-point)")
        if not (cfg.dp_noise_multiplier > 0 or cfg.dp_noise_multipliers or cfg.dp_epsilon > 0):
            raise ConfigError("dp_clip: needs dp_noise_multiplier > 0 or a budget dp_epsilon > 0 "
                              "(sigma is then solved for the run)")
        sig = cfg.dp_noise_multipliers
        if sig:
            if cfg.dp_noise_multiplier > 0:
                raise ConfigError("dp_noise_multipliers: give it or dp_noise_multiplier, not both")
            if len(sig) != cfg.clients or not all(
                    isinstance(s, int | float) and not isinstance(s, bool) and 0 < s < math.inf
                    for s in sig):
                raise ConfigError(f"dp_noise_multipliers: expected {cfg.clients} positive "
                                  f"numbers (one per client), got {sig!r}")
    elif cfg.dp_noise_multiplier or cfg.dp_noise_multipliers or cfg.dp_epsilon or cfg.dp_delta:
        raise ConfigError("dp_noise_multiplier/dp_epsilon/dp_delta: set dp_clip > 0 to turn "
                          "differential privacy on")
    downlinks = get_method(cfg.method).downlinks
    if cfg.downlink not in downlinks:
        raise ConfigError(f"downlink: method {cfg.method} needs downlink={' or '.join(downlinks)} "
                          "(its update is not along seeded directions, so scalars cannot carry it)")


# The calibration corpora known by name (tasks/corpora.py); anything else is a path.
NAMED_CORPORA = ("news", "c4")


def validate_values(cfg: RunConfig) -> None:
    """Names, regexes, paths and the wire format's limits (federated/messages.py)."""
    if cfg.task not in TASKS:
        close = difflib.get_close_matches(cfg.task, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task: unknown task {cfg.task!r}{hint}; valid: {', '.join(TASKS)}")
    problem = model_spec_problem(cfg.model)
    if problem:
        raise ConfigError(f"model: {problem}")
    try:
        re.compile(cfg.eligible)
    except re.error as e:
        raise ConfigError(f"eligible: {cfg.eligible!r} is not a valid regex ({e})") from None
    # what one round's plan can carry: step counts and seeds are u16, rounds and client ids u32
    limits = [("local_steps", cfg.local_steps, MAX_STEPS), ("rounds", cfg.rounds, MAX_ROUND),
              ("clients", cfg.clients, MAX_CLIENT_ID + 1)]
    limits += [(k, v, MAX_STEPS) for k, v in to_keys(cfg.method_settings).items()
               if k.endswith("_steps") and isinstance(v, int)]
    for key, value, most in limits:
        if value > most:
            raise ConfigError(f"{key}: {value} exceeds {most}, the most the wire format "
                              "encodes (federated/messages.py)")


def check_inputs(cfg: RunConfig) -> None:
    """The files a new run reads besides its data: the mask file given (read and checked, so
    bad indices are refused before the model loads) or else the calibration corpus, named
    or an existing path. (Not for run folders: they hold their own mask.)"""
    if cfg.mask:
        try:
            dense = is_dense_file(Path(cfg.mask))
        except Exception:  # not readable: SparseMask.load says so in one line
            dense = False
        if not dense:
            SparseMask.load(cfg.mask)  # MaskFileError (an InputError) says what is wrong
        return
    if cfg.calib_corpus in NAMED_CORPORA:
        return
    corpus = Path(cfg.calib_corpus)
    if not corpus.exists():
        raise ConfigError(f"calib_corpus: {cfg.calib_corpus!r} is neither "
                          f"{' nor '.join(NAMED_CORPORA)} nor an existing file or folder")
    if corpus.is_file() and corpus.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"calib_corpus: {cfg.calib_corpus} must be a .txt or .jsonl file or "
                          "a folder of them")


def describe() -> str:
    """All keys with defaults and help (`fedmeerkat config`); method keys name their methods."""
    lines = [f"{name:<20} = {default_of(f)!r:<28} {f.metadata['help']}"
             for name, f in COMMON.items()]
    lines.append("# keys of one method (federated/methods/), read only by the methods named")
    lines += [f"{name:<20} = {default_of(f)!r:<28} [{', '.join(READ_BY[name])}] "
              f"{f.metadata['help']}" for name, f in METHOD_KEYS.items()]
    return "\n".join(lines)
