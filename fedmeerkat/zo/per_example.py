"""Per-example directions: one forward scores example i of a batch at theta + offsets[i % P].

The masked weights stay at theta in the model; forward hooks on the masked linear layers add
each example's own sparse perturbation to the layer's output, output_i += x_i S_i^T, with S_i
the sparse matrix holding offsets[i % P]'s values of that layer at its masked coordinates. So
the two forwards of a step estimate P directions at once, each from its own examples' loss
differences (the idea of GRZO, Tan et al. 2026: one perturbation per example in the same
forward), instead of one direction from the batch mean.

Each layer takes one of two forms: a gather of the masked input columns, a scale and a scatter
into the masked rows, reading and writing only the rows and columns the mask touches (cost ~
B * L * entries), or, where at least DENSE_SHARE of the layer's weight is masked and the B
per-example delta matrices fit in 4 x CHUNK_VALUES floats, those matrices and one batched
matmul.
Both run in float32 on the model's device; the offset's contribution is added to the layer's
output in float32 and the sum rounded to the model's dtype (in bf16 the layer's own output has
been rounded once already: the perturbation is not in the weights, so the two rounding paths
differ from a forward with written weights by bf16 rounding; in float32 the tests hold them to
a relative 1e-5, the order of summation). Their cost grows with the rows and columns the mask
touches: on this project's CPU a per-example step of SmolLM2 took twice a plain step's time
on the step timing's magnitude mask (benchmarks/results/zo_efficiency.json, `step_timing`).

Memory: the P x nnz offsets plus one layer's temporaries at a time: at most CHUNK_VALUES
floats (16 MiB) in the gather form, 4 x that in the matmul form (SmolLM2's densest masked
layer takes 21 MB at batch 16; a large model's layers are too big for it), besides the
layer's input and output in float32. The masked tensors must be
`.weight`s of `torch.nn.Linear` modules (LoRA adapters included); anything else is refused
when the hooks are built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedmeerkat.options import InputError
from fedmeerkat.zo.mask import SparseMask

CHUNK_VALUES = 1 << 22  # float32 values per temporary of the gather form (16 MiB)
DENSE_SHARE = 0.1  # masked share of a layer's weight above which the dense form is used


class PerExampleError(InputError):
    """The mask touches a tensor that per-example directions cannot perturb."""


class ExampleOffsets:
    """Forward hooks that add per-example offsets of the masked weights; inactive until
    `applied`. Build once per model and mask; `remove` takes the hooks off."""

    def __init__(self, model: torch.nn.Module, mask: SparseMask):
        self._offsets: torch.Tensor | None = None  # [P, nnz] float32 while applied
        self.handles = []
        for name, idx, sl in mask.slices():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if leaf != "weight" or not isinstance(module, torch.nn.Linear):
                raise PerExampleError(
                    f"zo_estimator=per-example perturbs linear layers' weights only; the mask "
                    f"takes {name} ({type(module).__name__}.{leaf})")
            idx = idx.to(module.weight.device)
            dense = idx.numel() >= DENSE_SHARE * module.weight.numel()
            self.handles.append(module.register_forward_hook(
                self._hook(idx, dense, module.weight.shape, sl)))

    @contextmanager
    def applied(self, offsets: torch.Tensor) -> Iterator[None]:
        """Within the block, example i of every forward sees theta + offsets[i % P]."""
        if offsets.dim() != 2:
            raise ValueError(f"offsets: expected [P, nnz], got shape {tuple(offsets.shape)}")
        self._offsets = offsets.float()
        try:
            yield
        finally:
            self._offsets = None

    def _per_example(self, sl: slice, batch: int) -> torch.Tensor:
        """[batch, entries of this layer]: row i is offsets[i % P]'s part."""
        assert self._offsets is not None
        part = self._offsets[:, sl]
        p = part.shape[0]
        if batch == p:
            return part
        return part.index_select(0, torch.arange(batch, device=part.device) % p)

    def _hook(self, idx: torch.Tensor, dense: bool, shape: torch.Size, sl: slice):
        numel = int(shape[0]) * int(shape[1])
        # the rows and columns the layer's entries touch, and each entry's place among them
        rows_u, row_at = torch.unique(idx // shape[1], return_inverse=True)
        cols_u, col_at = torch.unique(idx % shape[1], return_inverse=True)

        def hook(module, inputs, out):
            if self._offsets is None:
                return None
            x = inputs[0]
            b = x.shape[0]
            flat = x.reshape(b, -1, x.shape[-1])
            z = self._per_example(sl, b)  # [B, entries]
            if dense and b * numel <= 4 * CHUNK_VALUES:
                delta_w = torch.zeros(b, numel, dtype=torch.float32, device=out.device)
                delta_w.index_copy_(1, idx, z)
                delta = torch.bmm(flat.float(), delta_w.view(b, *shape).transpose(1, 2))
                return (out.float() + delta.reshape(out.shape)).to(out.dtype)
            # gather the masked columns, scale, scatter into the masked rows; only the rows
            # and columns the mask touches are read or written
            n = flat.shape[1]
            zt = z.t()
            xt = flat.index_select(2, cols_u).permute(2, 0, 1).contiguous()  # [C, B, L]
            acc = torch.zeros(rows_u.numel(), b, n, dtype=torch.float32, device=out.device)
            step = max(1, CHUNK_VALUES // max(1, b * n))
            for at in range(0, col_at.numel(), step):
                part = xt.index_select(0, col_at[at:at + step]).float()
                part.mul_(zt[at:at + step].unsqueeze(2))
                acc.index_add_(0, row_at[at:at + step], part)
            shaped = out.reshape(b, n, -1)
            touched = shaped.index_select(2, rows_u).float() + acc.permute(1, 2, 0)
            return shaped.index_copy(2, rows_u, touched.to(out.dtype)).reshape(out.shape)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
