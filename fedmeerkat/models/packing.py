"""Load a checkpoint's weights straight into one flat buffer per dtype (no copy, no mmap).

`SparseView` needs the masked parameter tensors to be views of one flat buffer (one index op
reads or writes every masked coordinate). Re-homing a loaded model into such a buffer costs a
second copy of the model: transformers leaves the weights as views of a mmap of the
safetensors file, every page a forward or the copy reads stays resident (and counted in the
process's RSS) until the last view is gone, and the unmasked tensors (embeddings, norms) keep
the mapping alive for good; with the measured 1.44x of inference RSS as the result (issue 19).

Here the buffer comes first: the safetensors headers give every tensor's dtype, shape and byte
range, the bytes are read (`readinto`, not mmap) into consecutive slices of one buffer per
target dtype, converted through a small scratch chunk where the checkpoint's dtype is not the
model's, and transformers gets a state dict of those slices, which it assigns as parameters
without copying. The process holds the weights once, as the buffer, whatever has run since.

The vocabulary-sized matrices (input embeddings, LM head) are the exception: no default mask
touches them and a label-scoring forward reads only a few of their rows, so they stay lazy
mmap views (`lazy`), as in a plain load; packing them would add most of their size to the RSS
of every process, inference included (+106 MiB for SmolLM2's tied 49152 x 576 fp32 matrix).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["move_packed", "packed_state_dict", "safetensors_files", "storage_groups"]

# safetensors dtype names -> torch (the ones causal LM checkpoints hold)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CHUNK_BYTES = 16 << 20  # scratch for dtype conversion: bounds the transient extra memory


def safetensors_files(path: str, **kwargs: Any) -> list[str] | None:
    """The local safetensors files of a model folder or hub id (one, or the index's shards);
    None when there are none (the caller then lets transformers load, and fail, as usual)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    opts = {"_raise_exceptions_for_missing_entries": False,
            "_raise_exceptions_for_connection_errors": False, **kwargs}
    single = cached_file(path, SAFE_WEIGHTS_NAME, **opts)
    if single:
        return [single]
    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, **opts)
    if not index:
        return None
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    files = [cached_file(path, s, **opts) for s in shards]
    return [f for f in files if f] if all(files) else None


def _header(file: str) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, {name: {dtype, shape, data_offsets}})."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return 8 + n, head


def _read_into(f, offset: int, dst: torch.Tensor) -> None:
    """Fill `dst` (contiguous, CPU) with the file's bytes from `offset`."""
    mv = dst.view(-1).view(torch.uint8).numpy().data  # a writable byte view of `dst`
    done = 0
    while done < len(mv):
        f.seek(offset + done)
        got = f.readinto(mv[done:])
        if not got:
            raise OSError(f"{f.name}: truncated at byte {offset + done}")
        done += got


def packed_state_dict(files: Iterable[str], dtype: torch.dtype,
                      lazy: Callable[[tuple[int, ...]], bool] | None = None,
                      ) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors as views of one flat CPU buffer per dtype, floating ones in
    `dtype` (integer ones keep theirs); None if a tensor has a dtype this does not read.

    Tensors whose shape `lazy` accepts and that are stored in their target dtype stay views of
    a mmap of the file instead, as transformers leaves them: only the pages a forward reads
    become resident (an embedding matrix is read a few rows at a time). Values are what
    `tensor.to(dtype)` of the stored tensor gives (the same conversion transformers applies),
    so a model built from this is bit-identical to a plain load."""
    if sys.byteorder != "little":  # safetensors is little-endian; readinto does not swap
        return None
    entries = []  # (file, name, stored dtype, target dtype, shape, byte offset, numel)
    for file in files:
        start, head = _header(file)
        for name, h in head.items():
            src = _ST_DTYPES.get(h["dtype"])
            if src is None:
                return None
            shape = tuple(int(s) for s in h["shape"])
            numel = 1
            for s in shape:
                numel *= s
            entries.append((file, name, src, dtype if src.is_floating_point else src, shape,
                            start + int(h["data_offsets"][0]), numel))
    entries.sort(key=lambda e: (e[0], e[5]))  # file order: sequential reads
    out: dict[str, torch.Tensor] = {}
    if lazy is not None:
        from safetensors import safe_open

        keep = []
        for e in entries:
            if e[2] == e[3] and lazy(e[4]):
                with safe_open(e[0], framework="pt") as f:  # the view keeps the mapping alive
                    out[e[1]] = f.get_slice(e[1])[...]
            else:
                keep.append(e)
        entries = keep
    sizes: dict[torch.dtype, int] = {}
    for e in entries:
        sizes[e[3]] = sizes.get(e[3], 0) + e[6]
    bufs = {dt: torch.empty(n, dtype=dt) for dt, n in sizes.items()}
    at = dict.fromkeys(bufs, 0)
    scratch: dict[torch.dtype, torch.Tensor] = {}
    handle = None
    try:
        for file, name, src, dst_dtype, shape, offset, numel in entries:
            if handle is None or handle.name != file:
                if handle is not None:
                    handle.close()
                handle = open(file, "rb", buffering=0)  # noqa: SIM115 (closed below)
            dst = bufs[dst_dtype][at[dst_dtype]:at[dst_dtype] + numel]
            at[dst_dtype] += numel
            if src == dst_dtype:
                _read_into(handle, offset, dst)
            else:  # convert chunk by chunk: no full-size temporary of the stored dtype
                item = torch.empty(0, dtype=src).element_size()
                step = max(1, _CHUNK_BYTES // item)
                if src not in scratch:
                    scratch[src] = torch.empty(step, dtype=src)
                for i in range(0, numel, step):
                    k = min(step, numel - i)
                    part = scratch[src][:k]
                    _read_into(handle, offset + i * item, part)
                    dst[i:i + k].copy_(part)
            out[name] = dst.view(shape)
    finally:
        if handle is not None:
            handle.close()
    return out


def storage_groups(model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """The model's parameters (tied ones once) grouped by the storage they are views of."""
    groups: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
    return groups


def move_packed(model: torch.nn.Module, device: torch.device) -> None:
    """Move each shared buffer to `device` as one tensor and re-point its parameters into it
    (`model.to()` would allocate every parameter apart and undo the sharing)."""
    for group in storage_groups(model).values():
        p0 = group[0][1]
        if len(group) == 1 or p0.device == device:
            continue
        storage = p0.untyped_storage()
        size = p0.element_size()
        host = p0.new_empty(0).set_(storage, 0, (storage.nbytes() // size,), (1,))
        dev = host.to(device)
        for _, p in group:
            at = (p.data_ptr() - storage.data_ptr()) // size
            p.data = dev[at:at + p.numel()].view(p.shape)
