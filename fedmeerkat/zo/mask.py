"""The static sparse mask: flat indices per eligible tensor, and the file it lives in.

A mask is an ordered list of (parameter name, sorted flat indices). Its concatenation in that
order defines the flat "sparse vector" layout used everywhere else (theta, z, replay, wire).
The mask file is safetensors: `idx::<name>` int64 indices and, when calibration produced it,
`grad::<name>` float32 mean calibration gradient at those indices (for GradIP), plus metadata.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmeerkat.options import InputError

MASK_FORMAT_VERSION = "1"
MAX_NUMEL = 2**63 - 1  # torch sizes and indices are int64

# Default eligibility: 2-D weight matrices inside the decoder blocks. Embeddings, norms and the
# LM head are excluded (several target models tie the LM head to the embeddings, and the paper's
# lineage masks decoder linear layers only).
DEFAULT_ELIGIBLE = r"(^|\.)layers\.\d+\..*\.weight$"


class MaskMismatchError(InputError):
    """A mask file was made for another model (or another version of it)."""


class MaskFileError(InputError):
    """A mask file that cannot be read or whose indices do not describe a mask."""


def check_shape(what: str, shape: object) -> tuple[int, ...]:
    """A tensor shape read from a file (`what` names the tensor in the error): sizes must be
    integers >= 0 with an int64 product; torch.Size overflows or silently wraps beyond it."""
    if (not isinstance(shape, list | tuple)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NUMEL
                       for d in shape)
            or math.prod(shape) > MAX_NUMEL):
        raise MaskFileError(f"{what}: {shape!r} is no tensor shape (sizes must be integers "
                            f">= 0, at most 2**63 - 1 elements in all)")
    return tuple(shape)


def check_indices(name: str, idx: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Indices of one tensor must be 1-D integers, strictly increasing (sorted, no repeats)
    and inside the tensor: anything else would silently misalign the flat sparse vector."""
    numel = int(torch.Size(shape).numel())
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise MaskFileError(f"mask tensor {name!r}: indices must be a 1-D integer array")
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        raise MaskFileError(f"mask tensor {name!r}: indices {lo}..{hi} outside 0..{numel - 1} "
                            f"of its shape {tuple(shape)}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        what = "repeated" if int(torch.unique(idx).numel()) < idx.numel() else "unsorted"
        raise MaskFileError(f"mask tensor {name!r}: {what} indices (they must be sorted and "
                            "distinct)")


def eligible_parameters(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], rule: str = DEFAULT_ELIGIBLE
) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters whose name matches `rule` (a regex) and that are 2-D matrices."""
    pattern = re.compile(rule)
    out = [(n, p) for n, p in named_params if pattern.search(n) and p.dim() == 2]
    if not out:
        raise ValueError(f"no 2-D parameter matches the eligibility rule {rule!r}")
    return out


@dataclass
class SparseMask:
    names: list[str]
    indices: list[torch.Tensor]  # int64, sorted, unique, one per name
    shapes: list[tuple[int, ...]]
    meta: dict[str, str] = field(default_factory=dict)
    calib_grad: torch.Tensor | None = None  # float32 [nnz], mean calibration gradient

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.indices) == len(self.shapes)):
            raise ValueError("names, indices and shapes must have the same length")
        self.offsets = [0]
        for idx in self.indices:
            self.offsets.append(self.offsets[-1] + int(idx.numel()))
        if self.calib_grad is not None and self.calib_grad.numel() != self.nnz:
            raise ValueError("calibration gradient length differs from the mask size")

    @property
    def nnz(self) -> int:
        return self.offsets[-1]

    @property
    def eligible_numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.eligible_numel)

    def slices(self) -> list[tuple[str, torch.Tensor, slice]]:
        """(name, indices, slice into the flat sparse vector) per tensor."""
        return [
            (n, idx, slice(self.offsets[i], self.offsets[i + 1]))
            for i, (n, idx) in enumerate(zip(self.names, self.indices, strict=True))
        ]

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, idx, sl in self.slices():
            tensors[f"idx::{name}"] = idx.contiguous()
            if self.calib_grad is not None:
                tensors[f"grad::{name}"] = self.calib_grad[sl].contiguous()
        meta = dict(self.meta)
        meta["format_version"] = MASK_FORMAT_VERSION
        meta["names"] = json.dumps(self.names)
        meta["shapes"] = json.dumps([list(s) for s in self.shapes])
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SparseMask:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format_version") != MASK_FORMAT_VERSION:
                    raise MaskFileError(f"{path}: not a fedmeerkat mask file (format "
                                        f"{meta.get('format_version')})")
                names = json.loads(meta.pop("names"))
                shapes = json.loads(meta.pop("shapes"))
                keys = set(f.keys())
                missing = [n for n in names if f"idx::{n}" not in keys]
                if (missing or not isinstance(shapes, list) or len(shapes) != len(names)
                        or len(set(names)) != len(names)):
                    raise MaskFileError(f"{path}: names, shapes and index tensors disagree")
                shapes = [check_shape(f"{path}: tensor {n!r}", s)
                          for n, s in zip(names, shapes, strict=True)]
                indices = [f.get_tensor(f"idx::{n}") for n in names]
                grads = [f.get_tensor(f"grad::{n}") for n in names if f"grad::{n}" in keys]
        except MaskFileError:
            raise
        except Exception as e:  # truncated or not safetensors (SafetensorError), bad JSON
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MaskFileError(f"{path}: not a readable mask file ({first})") from None
        for name, idx, shape in zip(names, indices, shapes, strict=True):
            check_indices(name, idx, shape)
        indices = [idx.long() for idx in indices]
        calib = torch.cat(grads).float() if len(grads) == len(names) and grads else None
        try:
            return cls(names, indices, shapes, meta=meta, calib_grad=calib)
        except ValueError as e:
            raise MaskFileError(f"{path}: {e}") from None

    # ---- checks ------------------------------------------------------------------------
    def check_model(self, params: Mapping[str, torch.Tensor], fingerprint: Mapping[str, object]) -> None:
        """Refuse a model other than the one the mask was computed on, with the reason."""
        want_s, want_w = self.meta.get("fingerprint_structure"), self.meta.get("fingerprint_weights")
        src = self.meta.get("model", "?")
        if want_s and want_s != fingerprint.get("structure"):
            raise MaskMismatchError(
                f"mask was computed for another model architecture ({src}); "
                "recompute it with `fedmeerkat mask` for this model"
            )
        if want_w and want_w != fingerprint.get("weights"):
            raise MaskMismatchError(
                f"mask was computed for other weights of the same architecture ({src}); "
                "recompute it with `fedmeerkat mask` for this model"
            )
        for name, idx, shape in zip(self.names, self.indices, self.shapes, strict=True):
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(shape):
                raise MaskMismatchError(f"mask tensor {name!r} {shape} is not in this model")
            if idx.numel() and int(idx.max()) >= p.numel():
                raise MaskMismatchError(f"mask indices out of range for {name!r}")
