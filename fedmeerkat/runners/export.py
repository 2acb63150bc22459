"""Take a trained model out of fedmeerkat: a Hugging Face folder, a small delta, a peft adapter.

`export_run(RUN_DIR, OUT)` writes
  OUT/model/             the base model with the run's final values (`--best`: those of the
                         round with the best validation metric) written in, and its
                         tokenizer: a normal HF folder (AutoModelForCausalLM.from_pretrained),
                         in the run's dtype, scoring what `fedmeerkat eval RUN_DIR` scores;
  OUT/delta.safetensors  mask runs: per trained tensor its int64 flat indices and float32
                         values, with the base model's fingerprint; 12 bytes a value plus a
                         header, to share a fine-tune as kilobytes (`apply_delta`);
  OUT/adapter/           LoRA runs: the peft adapter (PeftModel.from_pretrained(base, OUT/adapter));
                         OUT/model then holds the adapter merged into the weights, so it loads
                         without peft (its scores equal the run's up to float rounding of the
                         merge). LoRA runs get no delta: the adapter is their small file.
Dense (full-fedzo) runs get OUT/model only: every weight is trained, a delta would be the model.

The delta holds the trained values, not differences: applying it writes exactly the values
training ended on, with none of the rounding a difference added to the base would bring.
Everything is written into a hidden sibling folder and moved into place when complete, so a
failed export leaves no half-written OUT (that the next try would refuse).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmeerkat.config import ConfigError, RunConfig
from fedmeerkat.models.loading import DTYPES, load_model, model_fingerprint
from fedmeerkat.models.packing import storage_groups
from fedmeerkat.options import InputError
from fedmeerkat.runners.run_folder import STATES, load_run_config, load_run_state, state_meta
from fedmeerkat.runners.spaces import restore_run_weights, space_kind
from fedmeerkat.zo import SparseMask, SparseView

DELTA_FILE = "delta.safetensors"
DELTA_FORMAT = "fedmeerkat-delta"
DELTA_FORMAT_VERSION = "1"


class ExportError(InputError):
    """A file that is not what the command needs (not a delta, a delta for another model)."""


class DeltaMismatchError(ExportError):
    """A delta applied to a model other than its base model."""


@dataclass
class Exported:
    """What `export_run` wrote (paths inside OUT) and why something was left out."""

    out: Path
    kind: str  # the run's space: "mask" | "lora" | "dense"
    model: Path
    delta: Path | None = None
    adapter: Path | None = None
    nnz: int = 0
    tensors: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Delta:
    names: list[str]
    indices: list[torch.Tensor]  # int64 flat indices into each tensor
    values: list[torch.Tensor]  # float32 trained values at those indices
    meta: dict[str, str]

    @property
    def nnz(self) -> int:
        return sum(int(v.numel()) for v in self.values)


# ---- output folder ---------------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    """Refuse an existing non-empty OUT before any slow work: exports never overwrite."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new one")


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out`, moved to `out` when the block ends without error."""
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _own_storage(model: torch.nn.Module) -> None:
    """load_model and SparseView make parameters views of one shared buffer; savers
    (transformers, safetensors, peft) take tensors sharing storage for tied weights and may
    keep one or refuse, so each such parameter gets its own storage first (tied parameters
    are one Parameter object and stay tied)."""
    for group in storage_groups(model).values():
        if len(group) > 1:
            for _, p in group:
                p.data = p.data.clone()


def save_hf_folder(model, tokenizer, folder: Path) -> None:
    _own_storage(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# ---- export ----------------------------------------------------------------------------

def export_run(run_dir: Path, out: Path, which: str = "final") -> Exported:
    """Write RUN_DIR's final model (`which="best"`: the best validation round's) to OUT
    (layout in the module docstring)."""
    check_out_dir(out)
    cfg = load_run_config(run_dir)
    space, theta = load_run_state(run_dir, which)  # fails early on an unfinished run
    kind = space_kind(cfg)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    with _staged(out) as tmp:
        res = Exported(out, kind, out / "model", nnz=space.nnz, tensors=len(space.names))
        if kind == "lora":
            assert isinstance(space, SparseMask)
            _export_lora(cfg, space, theta, model, tokenizer, tmp)
            res.adapter = out / "adapter"
            res.notes.append("LoRA run: the adapter is the small file (no delta); "
                             "model/ holds it merged into the weights")
            return res
        base_fingerprint = model_fingerprint(model)  # before the trained values go in
        restore_run_weights(run_dir, cfg, model, which)  # what `fedmeerkat eval RUN_DIR` scores
        if kind == "dense":
            res.notes.append("dense (full-fedzo) run: every weight is trained, so no delta; "
                             "model/ is the whole change")
        else:
            assert isinstance(space, SparseMask)
            write_delta(tmp / DELTA_FILE, space, theta,
                        delta_meta(cfg, base_fingerprint,
                                   state_meta(run_dir / STATES[which]).get("round", "?")))
            res.delta = out / DELTA_FILE
        save_hf_folder(model, tokenizer, tmp / "model")
    return res


def _export_lora(cfg: RunConfig, space: SparseMask, theta: torch.Tensor, model, tokenizer,
                 tmp: Path) -> None:
    """The adapter as a peft folder, and the base with the adapter merged in as model/."""
    from peft import get_peft_model

    from fedmeerkat.models.lora import lora_config

    with torch.random.fork_rng(devices=[]):  # peft's init draws; theta overwrites all of it
        peft_model = get_peft_model(model, lora_config(rank=cfg.method_settings.lora_rank,
                                                         alpha=cfg.method_settings.lora_alpha))
    params = dict(peft_model.base_model.model.named_parameters())  # the names training used
    space.check_model(params, {})
    SparseView(params, space).write(theta)
    _own_storage(peft_model)
    peft_model.save_pretrained(tmp / "adapter")
    save_hf_folder(peft_model.merge_and_unload(), tokenizer, tmp / "model")


# ---- delta -----------------------------------------------------------------------------

def delta_meta(cfg: RunConfig, fingerprint: Mapping[str, Any], rounds: str) -> dict[str, str]:
    return {"base_model": cfg.model, "base_model_type": str(fingerprint["model_type"]),
            "base_num_parameters": str(fingerprint["num_parameters"]),
            "base_fingerprint_structure": str(fingerprint["structure"]),
            "base_fingerprint_weights": str(fingerprint["weights"]),
            "dtype": cfg.dtype, "method": cfg.method, "task": cfg.task, "rounds": rounds}


def write_delta(path: Path, mask: SparseMask, theta: torch.Tensor, meta: dict[str, str]) -> None:
    """`idx::<name>` int64 and `val::<name>` float32 per trained tensor, plus metadata."""
    tensors: dict[str, torch.Tensor] = {}
    theta = theta.detach().to("cpu", torch.float32)
    for name, idx, sl in mask.slices():
        tensors[f"idx::{name}"] = idx.to(torch.int64).contiguous()
        tensors[f"val::{name}"] = theta[sl].contiguous()
    save_file(tensors, str(path), metadata={
        **meta, "format": DELTA_FORMAT, "format_version": DELTA_FORMAT_VERSION,
        "names": json.dumps(mask.names), "nnz": str(mask.nnz)})


def read_delta(path: Path) -> Delta:
    if not path.is_file():
        raise FileNotFoundError(f"delta file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if (meta.get("format"), meta.get("format_version")) != (DELTA_FORMAT,
                                                                    DELTA_FORMAT_VERSION):
                raise ExportError(f"{path} is not a fedmeerkat delta (format "
                                  f"{meta.get('format')!r} {meta.get('format_version')!r})")
            names = json.loads(meta["names"])
            indices = [f.get_tensor(f"idx::{n}") for n in names]
            values = [f.get_tensor(f"val::{n}").float() for n in names]
    except Exception as e:  # safetensors' own errors for a file that is not safetensors
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{path} is not a fedmeerkat delta ({type(e).__name__})") from None
    for name, idx, vals in zip(names, indices, values, strict=True):
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ExportError(f"{path}: delta tensor {name!r}: indices must be a 1-D integer "
                              "array")
        if vals.shape != idx.shape:
            raise ExportError(f"{path}: delta tensor {name!r}: {vals.numel()} values for "
                              f"{idx.numel()} indices")
    return Delta(names, indices, values, meta)


def check_base(delta: Delta, model, fingerprint: Mapping[str, Any]) -> None:
    """Refuse a model other than the delta's base, naming why."""
    m = delta.meta
    base = f"{m.get('base_model', '?')} ({m.get('base_model_type', '?')}, " \
           f"{int(m.get('base_num_parameters', 0)):,} parameters)"
    if m.get("base_fingerprint_structure") != fingerprint["structure"]:
        raise DeltaMismatchError(
            f"delta was made for another architecture, {base}; this model is "
            f"{fingerprint['model_type']} with {fingerprint['num_parameters']:,} parameters")
    if m.get("base_fingerprint_weights") != fingerprint["weights"]:
        raise DeltaMismatchError(f"delta was made for other weights of the same architecture, "
                                 f"{base}; load that base model")
    params = dict(model.named_parameters())
    for name, idx in zip(delta.names, delta.indices, strict=True):
        p = params.get(name)
        if p is None:
            raise DeltaMismatchError(f"delta tensor {name!r} does not fit this model")
        # a negative index would write from the tensor's end, or make index_copy_ raise
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise DeltaMismatchError(f"delta tensor {name!r}: indices {int(idx.min())}.."
                                     f"{int(idx.max())} outside 0..{p.numel() - 1} of this "
                                     "model's tensor")


@torch.no_grad()
def write_values(model, delta: Delta) -> None:
    """Put the delta's values at its indices, cast to each tensor's dtype (as training's
    SparseView.write does)."""
    params = dict(model.named_parameters())
    for name, idx, vals in zip(delta.names, delta.indices, delta.values, strict=True):
        p = params[name]
        flat = p.data.view(-1)
        flat.index_copy_(0, idx.to(flat.device), vals.to(device=flat.device, dtype=flat.dtype))


def apply_delta(delta_path: Path, out: Path, base: str | None = None,
                dtype: str | None = None) -> tuple[Delta, str]:
    """Load the base model (default: the spec the delta records; in the delta's dtype), check
    its fingerprint, write the values, save OUT as a HF folder. Returns the delta and the base
    spec used."""
    check_out_dir(out)
    delta = read_delta(delta_path)
    base = base or delta.meta.get("base_model", "")
    if not base:
        raise ConfigError("--model: the delta records no base model; name one")
    dtype = dtype or delta.meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    model, tokenizer = load_model(base, dtype=dtype)
    check_base(delta, model, model_fingerprint(model))
    write_values(model, delta)
    with _staged(out) as tmp:
        save_hf_folder(model, tokenizer, tmp)
    return delta, base
