"""Mask selection from the average squared gradient on general text (paper Sec. 2.1).

One backward pass per calibration sequence. A tensor hook adds each sequence's gradient squared
into one float32 buffer per eligible tensor; the parameters' own `.grad` accumulates the plain
sum, from which the masked mean gradient (the GradIP reference) is read at the end. So the
memory beyond ordinary backprop is one float32 buffer per eligible tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fedmeerkat.zo.mask import DEFAULT_ELIGIBLE, SparseMask, eligible_parameters

SCORES = ("squared", "signal")  # compute_mask's ways to score a coordinate


def _square_into(buf: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        g = grad.float()
        buf.addcmul_(g, g)  # returning None lets autograd accumulate grad into .grad as usual

    return hook


def topk_global(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exact global top-k over several tensors without concatenating them all.

    The global top k are among each tensor's own top min(k, numel); only those candidates are
    merged. Works on any device (scores may even sit on different ones); returns sorted flat int64 CPU
    indices per tensor (possibly empty).
    """
    names = list(scores)
    cand_vals, cand_tensor, cand_idx = [], [], []
    for i, name in enumerate(names):
        flat = scores[name].reshape(-1)
        kk = min(k, flat.numel())
        v, idx = torch.topk(flat, kk, sorted=False)
        cand_vals.append(v)
        cand_idx.append(idx)
        cand_tensor.append(torch.full((kk,), i, dtype=torch.long, device=v.device))
    device = cand_vals[0].device if cand_vals else torch.device("cpu")
    vals = torch.cat([v.to(device) for v in cand_vals])
    if k > vals.numel():
        raise ValueError(f"k={k} exceeds the number of eligible weights {vals.numel()}")
    top = torch.topk(vals, k, sorted=False).indices
    which = torch.cat([t.to(device) for t in cand_tensor])[top]
    local = torch.cat([t.to(device) for t in cand_idx])[top]
    # indices go back as CPU int64 (the mask file's layout), whatever device scored them
    return {name: torch.sort(local[which == i]).values.cpu() for i, name in enumerate(names)}


def compute_mask(
    model: torch.nn.Module,
    sequences: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    *,
    density: float = 1e-3,
    rule: str = DEFAULT_ELIGIBLE,
    meta: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    score: str = "squared",
) -> SparseMask:
    """Score eligible weights over `sequences` and keep the top `density`.

    `loss_fn(model, seq)` returns the scalar loss of one sequence (or example). `score`:
      - "squared": the mean squared gradient, mean(g_i^2) (the paper's calibration);
      - "signal": the squared mean gradient, mean(g_i)^2, estimated without bias as
        (n mean(g_i)^2 - mean(g_i^2)) / (n - 1) (needs n >= 2): the coordinates along which
        the examples' gradients agree, not those where they are merely large. It needs a loss
        with a mean gradient worth finding, i.e. the task's own labelled loss (the
        "task-gradient" mask kind); on general text it would find little.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    params = eligible_parameters(model.named_parameters(), rule)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, p in params:
        p.requires_grad_(True)
        p.grad = None
        buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        sq[name] = buf
        hooks.append(p.register_hook(_square_into(buf)))
    n = 0
    try:
        was_training = model.training
        model.eval()
        for seq in sequences:
            loss = loss_fn(model, seq)
            loss.backward()
            n += 1
            if progress is not None:
                progress(n)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("no calibration sequences were given")
    if score == "signal":
        if n < 2:
            raise ValueError("score 'signal' needs at least 2 sequences (a spread to remove)")
        for name, p in params:  # in place; the .grad sum stays for the mean gradient below
            assert p.grad is not None
            mean = p.grad.float() / n
            sq[name] = (mean * mean * n - sq[name].div_(n)).div_(n - 1)
    total = sum(p.numel() for _, p in params)
    k = max(1, round(density * total))
    chosen = topk_global(sq, k)
    del sq
    names, indices, shapes, grads = [], [], [], []
    for name, p in params:
        idx = chosen[name].cpu()
        names.append(name)
        indices.append(idx)
        shapes.append(tuple(p.shape))
        assert p.grad is not None
        grads.append(p.grad.reshape(-1)[idx.to(p.device)].float().cpu() / n)
        p.grad = None
    for name_, p in model.named_parameters():
        p.requires_grad_(saved_flags[name_])
    info = {"density": repr(density), "rule": rule, "num_sequences": str(n)}
    if score != "squared":  # calibration masks' files stay as they were
        info["score"] = score
    info.update(meta or {})
    return SparseMask(names, indices, shapes, meta=info, calib_grad=torch.cat(grads))


def masked_mean_gradient(
    model: torch.nn.Module,
    sequences: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    mask: SparseMask,
) -> torch.Tensor:
    """Mean gradient over `sequences` at the mask's coordinates: float32 [mask.nnz].

    The GradIP reference for a mask chosen by some other rule (weight magnitude, random, task
    data, union): one backward per sequence, `.grad` read at the masked indices. Only the
    mask's tensors require grad meanwhile; every requires_grad flag is restored afterwards.
    """
    params = dict(model.named_parameters())
    missing = [n for n in mask.names if n not in params]
    if missing:
        raise ValueError(f"mask tensors not in the model: {missing[:3]}")
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in mask.names:
        params[name].requires_grad_(True)
        params[name].grad = None
    n = 0
    try:
        was_training = model.training
        model.eval()
        for seq in sequences:
            loss_fn(model, seq).backward()
            n += 1
        model.train(was_training)
        if n == 0:
            raise ValueError("no calibration sequences were given")
        out = torch.empty(mask.nnz, dtype=torch.float32)
        for name, idx, sl in mask.slices():
            p = params[name]
            assert p.grad is not None
            out[sl] = p.grad.reshape(-1)[idx.to(p.device)].float().cpu() / n
    finally:
        for name in mask.names:
            params[name].grad = None
        for name_, p in params.items():
            p.requires_grad_(saved_flags[name_])
    return out
