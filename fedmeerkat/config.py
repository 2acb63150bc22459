"""Run configuration: every key, its default and its check, in one place.

A run is described by a TOML file plus `key=value` overrides. `load_config` validates all of it
before any model or data is touched; a bad key or value raises ConfigError with one line that
names it. Values are plain scalars or lists, so the resolved config round-trips through TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Each constant has one home in the layer that uses it; the config reads them from there.
from fedmeerkat.federated.gradip import GRADIP_UNITS
from fedmeerkat.federated.schedule import SCHEDULES
from fedmeerkat.federated.server import DOWNLINKS
from fedmeerkat.models.loading import DTYPES as _MODEL_DTYPES
from fedmeerkat.zo.mask import DEFAULT_ELIGIBLE

METHODS = (
    "meerkat",                # sparse ZO, paper Algorithm 2 (and 3 with T=1, downlink=scalars)
    "meerkat-vp",             # + virtual-path client selection (paper Algorithm 1)
    "meerkat-random-select",  # baseline: early-stop as many clients as VP, chosen at random
    "full-fedzo",             # ZO on every weight, MeZO style
    "lora-fedzo",             # ZO on LoRA adapters
    "fedavg-backprop",        # first-order local training of the same trainable set
    "meerkat-feddyn",         # FedDyn adapted to Meerkat
)
PARTITIONS = ("iid", "dirichlet", "dirichlet-client", "single-label", "mixed-single-label")
DTYPES = tuple(_MODEL_DTYPES)
WEIGHTINGS = ("samples", "uniform")
MASK_KINDS = ("calibration", "weight-magnitude", "random", "task", "union")
TRAINABLES = ("mask", "lora")
# Methods whose global update is not along seeded directions: they need the vector downlink.
VECTOR_DOWNLINK_ONLY = ("fedavg-backprop", "meerkat-feddyn")


class ConfigError(ValueError):
    """A config key or value is wrong; the message is one line naming it."""


def _f(default: Any, help: str, **check: Any) -> Any:
    meta = {"help": help, **check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    max_train: int = _f(0, "cap on training examples, seeded subsample (0 = all)", min=0)
    max_test: int = _f(0, "cap on test examples, seeded subsample (0 = all)", min=0)
    test_fraction: float = _f(0.2, "test share when the data has no test split", gt=0, lt=1)
    max_length: int = _f(128, "prompt tokens kept (the start is cut, the answer end kept)", min=8)
    # method
    method: str = _f("meerkat", "federated method", choices=METHODS)
    clients: int = _f(10, "number of clients K", min=1)
    rounds: int = _f(20, "communication rounds R", min=1)
    local_steps: int = _f(10, "local ZO steps per round T", min=1)
    batch_size: int = _f(16, "examples per ZO step", min=1)
    lr: float = _f(1e-4, "learning rate", gt=0)
    eps: float = _f(1e-3, "perturbation scale of the two-point estimate", gt=0)
    weighting: str = _f("samples", "FedAvg weights: by client sample count or uniform", choices=WEIGHTINGS)
    clients_per_round: int = _f(0, "clients sampled per round (0 = all)", min=0)
    downlink: str = _f("sparse-weights", "server -> client: the averaged sparse vector (paper) or T+1 aggregated scalars", choices=DOWNLINKS)
    lr_schedule: str = _f("constant", "lr over all rounds x steps", choices=SCHEDULES)
    weight_decay: float = _f(0.0, "decoupled weight decay on the masked weights", min=0)
    # Meerkat-VP (paper Algorithm 1; defaults from Tables 3 and 5)
    vp_calibration_steps: int = _f(100, "local steps each client runs in the VP calibration phase", min=1)
    vp_init_steps: int = _f(20, "earliest calibration steps averaged for the initial GradIP", min=1)
    vp_later_steps: int = _f(20, "latest calibration steps averaged for the later GradIP", min=1)
    vp_threshold: float = _f(1.0, "GradIP below this counts as quiescent (convergence threshold sigma)", min=0)
    vp_quiescent_ratio: float = _f(0.5, "flag a client whose share of quiescent later steps exceeds this", min=0, max=1)
    vp_later_ratio: float = _f(5.0, "flag a client whose initial/later mean GradIP ratio exceeds this", gt=0)
    vp_gradip_units: str = _f("calib-unit", "units of |GradIP| for vp_threshold: calib-unit (GradIP / ||calibration gradient||) or raw", choices=GRADIP_UNITS)
    # baselines
    lora_rank: int = _f(16, "LoRA rank (lora-fedzo, fedavg-backprop on LoRA)", min=1)
    lora_alpha: float = _f(16.0, "LoRA alpha", gt=0)
    feddyn_alpha: float = _f(0.01, "FedDyn regularisation strength (meerkat-feddyn)", gt=0)
    trainable: str = _f("mask", "what fedavg-backprop trains: the Meerkat mask's weights or the LoRA adapter", choices=TRAINABLES)
    # data split over clients
    partition: str = _f("dirichlet", "iid | dirichlet (per class over clients, Flower) | dirichlet-client (per client over classes) | single-label | mixed-single-label (client 0 single-label, the rest IID)", choices=PARTITIONS)
    alpha: float = _f(0.5, "Dirichlet concentration", gt=0)
    min_partition_size: int = _f(1, "resample Dirichlet until each client has this many examples", min=1)
    # mask
    density: float = _f(1e-3, "share of eligible weights in the mask", gt=0, max=1)
    mask: str = _f("", "mask file to use; empty = compute (or reuse the cached one)")
    mask_kind: str = _f("calibration", "how a computed mask picks weights: calibration (general-text squared gradient) | weight-magnitude | random (run seed) | task (training texts) | union (of per-client task masks)", choices=MASK_KINDS)
    eligible: str = _f(DEFAULT_ELIGIBLE, "regex of 2-D weights the mask may pick")
    calib_corpus: str = _f("news", "general text for the mask: 'news' (packaged), 'c4' (hub) or a path")
    calib_sequences: int = _f(128, "calibration sequences", min=1)
    calib_seq_len: int = _f(512, "tokens per calibration sequence (longer texts are cut)", min=8)
    # run
    seed: int = _f(0, "run seed: partition, data order, z seeds", min=0)
    eval_every: int = _f(5, "evaluate every N rounds (0 = only at the start and the end)", min=0)
    eval_batch_size: int = _f(32, "batch size for evaluation", min=1)
    out: str = _f("", "run folder; empty = runs/<task>-<method>-<time>")
    threads: int = _f(0, "torch CPU threads (0 = torch default)", min=0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Turn a TOML value or an override string into the key's type, or say why not."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if kind is list:
                parsed = tomllib.loads(f"v = {text}")["v"] if text.startswith("[") else [
                    s for s in text.split(",") if s]
                return list(parsed)
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except (ValueError, tomllib.TOMLDecodeError):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


_BOUNDS = {
    "min": (">=", lambda v, b: v >= b),
    "max": ("<=", lambda v, b: v <= b),
    "gt": (">", lambda v, b: v > b),
    "lt": ("<", lambda v, b: v < b),
}


def _check(key: str, value: Any) -> None:
    meta = FIELDS[key].metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    for op, (sign, ok) in _BOUNDS.items():
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(f"{key}: must be {sign} {meta[op]}, got {value!r}")


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
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> RunConfig:
    values = {}
    defaults = RunConfig()
    for key, value in raw.items():
        if key not in FIELDS:
            raise _unknown(key)
        v = _coerce(key, value, getattr(defaults, key))
        _check(key, v)
        values[key] = v
    cfg = RunConfig(**values)
    validate_combination(cfg)
    return cfg


def validate_combination(cfg: RunConfig) -> None:
    """Checks that involve several keys."""
    if cfg.task == "local" and not cfg.data_files:
        raise ConfigError("data_files: required when task = 'local'")
    if cfg.task == "local" and (not cfg.template or not cfg.label_words):
        raise ConfigError("template/label_words: required when task = 'local'")
    if cfg.clients_per_round > cfg.clients:
        raise ConfigError(f"clients_per_round: {cfg.clients_per_round} exceeds clients={cfg.clients}")
    if cfg.mask and not Path(cfg.mask).is_file():
        raise ConfigError(f"mask: file not found: {cfg.mask}")
    if cfg.mask and cfg.mask_kind != "calibration":
        raise ConfigError(f"mask_kind: {cfg.mask_kind!r} picks a computed mask; it cannot apply to mask={cfg.mask}")
    if (cfg.method in ("meerkat-vp", "meerkat-random-select")
            and cfg.vp_init_steps + cfg.vp_later_steps > cfg.vp_calibration_steps):
        raise ConfigError(f"vp_init_steps + vp_later_steps: {cfg.vp_init_steps} + "
                          f"{cfg.vp_later_steps} exceed vp_calibration_steps={cfg.vp_calibration_steps}")
    if cfg.template and "{" not in cfg.template:
        raise ConfigError(f"template: {cfg.template!r} names no field, e.g. '{{sentence}} It was'")
    if cfg.trainable != "mask" and cfg.method != "fedavg-backprop":
        raise ConfigError(f"trainable: {cfg.trainable!r} applies to method=fedavg-backprop only "
                          "(use method=lora-fedzo for ZO on LoRA)")
    if cfg.method in VECTOR_DOWNLINK_ONLY and cfg.downlink != "sparse-weights":
        raise ConfigError(f"downlink: method {cfg.method} needs downlink=sparse-weights (its update "
                          "is not along seeded directions, so scalars cannot carry it)")


def describe() -> str:
    """All keys with defaults and help (for `fedmeerkat run --help-config`)."""
    lines = []
    defaults = RunConfig()
    for name, f in FIELDS.items():
        default = getattr(defaults, name)
        lines.append(f"{name:<20} = {default!r:<28} {f.metadata['help']}")
    return "\n".join(lines)
