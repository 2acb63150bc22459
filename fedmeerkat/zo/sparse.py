"""Binding a mask to a live model: read and write the masked coordinates in one tensor op.

The masked parameter tensors are re-homed into one flat buffer per (device, dtype) (each
parameter's `.data` becomes a view into it), so one int64 index addresses every masked
coordinate of the model, whichever and however many weight matrices the mask touches: a write
is one `index_copy_`, a gather one `index_select`, on the model's device. A second view of the
same model finds the parameters already sharing one buffer and reuses it.

The fp32 master copy of the masked values (theta) is kept by the caller on the same device; the
model only ever receives values written from it (`write`), never increments. Writing
`theta ± eps*z` and then `theta` back leaves a bf16/fp16 model bit-identical to before, where
`+=`/`-=` would drift.

A model from `load_model` needs no re-homing: its weights were read straight into one flat
buffer per dtype (`fedmeerkat.models.packing`), so the masked parameters already share a
storage and the view indexes that storage in place, at no memory cost. Any other model (built
in memory, LoRA adapters added after loading, a mask that also takes the lazily mapped
embedding matrices) is re-homed here, which copies the masked tensors into a new buffer: the
peak is the model plus the buffer (the old tensors are freed, but the allocator or a file
mapping may keep them resident), once per model. Either way, move the model to its device
first: `model.to()` to another device allocates new tensors and undoes the sharing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmeerkat.zo.mask import SparseMask


def _flat_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of `t` as a 1-D tensor of its dtype."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.new_empty(0).set_(t.untyped_storage(), 0, (n,), (1,))


def _share_buffer(params: list[torch.Tensor]) -> torch.Tensor:
    """Make `params` (same device and dtype) views of one flat buffer; return the buffer."""
    storages = {p.untyped_storage().data_ptr() for p in params}
    if len(storages) == 1:  # packed by load_model, or re-homed by an earlier view
        return _flat_storage(params[0])
    total = sum(p.numel() for p in params)
    buf = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    at = 0
    for p in params:
        n = p.numel()
        buf[at:at + n].copy_(p.data.reshape(-1))
        p.data = buf[at:at + n].view(p.shape)
        at += n
    return buf


class SparseView:
    def __init__(self, params: Mapping[str, torch.Tensor], mask: SparseMask):
        self.mask = mask
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name in mask.names:
            p = params[name]
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; cannot index a flat view")
            groups.setdefault((p.device, p.dtype), []).append(name)
        # (buffer, flat indices into it, positions of those values in theta or None = all)
        self._groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        slices = {name: (idx, sl) for name, idx, sl in mask.slices()}
        for (device, _), names in groups.items():
            buf = _share_buffer([params[n] for n in names])
            flat, pos = [], []
            for n in names:
                idx, sl = slices[n]
                flat.append(idx.to(device) + int(params[n].storage_offset()))
                pos.append(torch.arange(int(sl.start), int(sl.stop), device=device))
            index = torch.cat(flat)
            whole = len(groups) == 1
            self._groups.append((buf, index, None if whole else torch.cat(pos)))
        # one parameter per buffer to detect a model whose tensors were re-allocated since
        self._witness = [(params[names[0]], buf) for names in groups.values()]
        self.device = next(iter(groups))[0] if groups else torch.device("cpu")

    @property
    def nnz(self) -> int:
        return self.mask.nnz

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """Current masked values as a float32 vector in mask order, on the model's device."""
        if len(self._groups) == 1:
            buf, index, _ = self._groups[0]
            return buf.index_select(0, index).float()
        out = torch.empty(self.nnz, dtype=torch.float32, device=self.device)
        for buf, index, pos in self._groups:
            assert pos is not None
            out.index_copy_(0, pos.to(self.device), buf.index_select(0, index).float().to(self.device))
        return out

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        """Overwrite the masked coordinates with `values` (float32, mask order)."""
        if values.numel() != self.nnz:
            raise ValueError(f"expected {self.nnz} values, got {values.numel()}")
        for p, buf in self._witness:
            if p.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
                raise RuntimeError("the model's parameters were re-allocated after this view was "
                                   "made (model.to() or a second view over other tensors); "
                                   "make a new SparseView")
        for buf, index, pos in self._groups:
            part = values if pos is None else values.index_select(0, pos.to(values.device))
            buf.index_copy_(0, index, part.to(device=buf.device, dtype=buf.dtype))
