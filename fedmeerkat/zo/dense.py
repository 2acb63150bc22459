"""Dense zeroth-order optimization over ALL parameters, MeZO style (Malladi et al., 2023).

Reference: S. Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO),
NeurIPS 2023. The paper's Full-FedZO baseline (Meerkat Sec. 3, Tables 15 and 23) is this step
run by every client, with the federated protocol of Meerkat (shared seeds, scalar uploads).

- z is never materialised for the whole model: tensor i at step seed s gets
  `draw_z(mix(s, i), numel_i)` drawn on that tensor's device (zo/rng.py, the same bits on every
  device), regenerated each time it is needed (perturb, perturb back, update), so a client and
  the server agree bit for bit and the memory is one model plus the z of one tensor.
- float32 models: the local step perturbs the model in place (MeZO): the +eps/-2eps/+eps walk
  leaves a few-ulp drift, exactly as in MeZO. That drift stays inside the client: only the
  scalars g travel, and every copy of the global model (server's and clients') is updated by
  `apply_aggregate_dense`, identical float32 ops on every party.
- bfloat16/float16 models: a walk in the model's dtype would lose most of eps*z and drift by
  whole half-precision ulps, so the view keeps an fp32 master copy of every tensor on the
  model's device (2x the half-precision model) and only ever writes `master ± eps*z` and
  `master` into the model, rounded once.
- The layout (`DenseSpace`) is every parameter of the model in `named_parameters()` order (tied
  weights once), flattened: theta[offsets[i]:offsets[i+1]] is tensor i.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmeerkat.zo.mask import MaskFileError, MaskMismatchError, check_shape
from fedmeerkat.zo.perturb import draw_z, sgd_update, to_float32
from fedmeerkat.zo.seeds import mix
from fedmeerkat.zo.step import StepResult

DENSE_FORMAT = "dense-1"


class _ZCache:
    """Least recently used z tensors up to `max_bytes` (callers never write into a z)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        z = self.items.get(key)
        if z is not None:
            self.items.move_to_end(key)
            return z
        z = make()
        size = z.numel() * z.element_size()
        if size <= self.max_bytes:
            self.items[key] = z
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return z


_cache: _ZCache | None = None


@contextmanager
def z_cache(max_bytes: int) -> Iterator[_ZCache | None]:
    """Within the block, `tensor_z` keeps drawn z up to `max_bytes` (0: no cache). For the
    in-process simulation: every client of a round steps along the same seeds and the server
    applies its aggregate along them too, so with room for one round's T z (T x the model's
    float32 size) a round draws each z once instead of 3K + 1 times. z is a pure function of
    its integers, so the bits are those of a fresh draw; the price is memory, which is why it
    is off by default."""
    global _cache
    prev, _cache = _cache, (_ZCache(max_bytes) if max_bytes > 0 else None)
    try:
        yield _cache
    finally:
        _cache = prev


def tensor_z(seed: int, index: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """z of tensor `index` for step seed `seed`: float32 on `device`, a pure function of the
    integers (the same bits on every device). Read-only when a `z_cache` is active."""
    if _cache is None:
        return draw_z(mix(seed, index), n, device=device)
    return _cache.get((seed, index, n, str(device)),
                      lambda: draw_z(mix(seed, index), n, device=device))


@dataclass
class DenseSpace:
    """Every parameter of a model as one flat vector (duck-types the parts of SparseMask the
    runner reads: names, shapes, nnz, eligible_numel, density, meta, calib_grad, save)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    meta: dict[str, str] = field(default_factory=dict)
    calib_grad: None = None

    def __post_init__(self) -> None:
        self.offsets = [0]
        for s in self.shapes:
            self.offsets.append(self.offsets[-1] + int(torch.Size(s).numel()))

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> DenseSpace:
        named = list(model.named_parameters())
        return cls([n for n, _ in named], [tuple(p.shape) for _, p in named],
                   {"mask_kind": "dense"})

    @property
    def nnz(self) -> int:
        return self.offsets[-1]

    @property
    def eligible_numel(self) -> int:
        return self.nnz

    @property
    def density(self) -> float:
        return 1.0

    def save(self, path: str | Path) -> None:
        """Names and shapes only (no indices: every coordinate is in the space)."""
        meta = dict(self.meta)
        meta.update(format_version=DENSE_FORMAT, names=json.dumps(self.names),
                    shapes=json.dumps([list(s) for s in self.shapes]))
        save_file({"nnz": torch.tensor([self.nnz])}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> DenseSpace:
        """The space a file describes; MaskFileError (one line) for any file that is not."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # missing, truncated, not safetensors (SafetensorError)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MaskFileError(f"{path}: not a readable space file ({first})") from None
        if meta.pop("format_version", None) != DENSE_FORMAT:
            raise MaskFileError(f"{path}: not a dense space file")
        try:
            names, shapes = json.loads(meta.pop("names")), json.loads(meta.pop("shapes"))
        except (KeyError, json.JSONDecodeError):
            raise MaskFileError(f"{path}: no readable names and shapes in its metadata") from None
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or len(set(names)) != len(names)):
            raise MaskFileError(f"{path}: names must be a list of distinct tensor names")
        if not isinstance(shapes, list) or len(shapes) != len(names):
            raise MaskFileError(f"{path}: {len(names)} names, but shapes is not a list of "
                                f"{len(names)}")
        return cls(names, [check_shape(f"{path}: tensor {n!r}", s)
                           for n, s in zip(names, shapes, strict=True)], meta)

    def check_model(self, params: Mapping[str, torch.Tensor], fingerprint=None) -> None:
        for name, shape in zip(self.names, self.shapes, strict=True):
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(shape):
                raise MaskMismatchError(f"parameter {name!r} {shape} is not in this model")


def is_dense_file(path: str | Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format_version") == DENSE_FORMAT


class DenseView:
    """The model's parameters as the flat space (same interface as SparseView, plus per-tensor
    access for the in-place step). Half-precision tensors get an fp32 master copy."""

    def __init__(self, params: Mapping[str, torch.Tensor], space: DenseSpace):
        self.mask = space
        self.tensors: list[torch.Tensor] = [params[n].data for n in space.names]
        self.slices = [slice(space.offsets[i], space.offsets[i + 1]) for i in range(len(space.names))]
        self.master: list[torch.Tensor | None] = [
            None if p.dtype == torch.float32 else p.float() for p in self.tensors]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")

    @property
    def nnz(self) -> int:
        return self.mask.nnz

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """The whole model as one float32 vector on its device (fp32 masters where kept)."""
        return torch.cat([(p if m is None else m).reshape(-1).float()
                          for p, m in zip(self.tensors, self.master, strict=True)])

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        if values.numel() != self.nnz:
            raise ValueError(f"expected {self.nnz} values, got {values.numel()}")
        for i, (p, sl) in enumerate(zip(self.tensors, self.slices, strict=True)):
            part = values[sl].view(p.shape).to(p.device)
            m = self.master[i]
            if m is not None:
                m.copy_(part)
            p.copy_(part)

    @torch.no_grad()
    def _perturb(self, seed: int, delta: float, at: float) -> None:
        """float32 tensors: p += delta*z in place (MeZO's walk). Half-precision tensors: the
        model gets master + at*z, computed in float32 and rounded once (master unchanged)."""
        for i, p in enumerate(self.tensors):
            m = self.master[i]
            z = tensor_z(seed, i, p.numel(), p.device).view(p.shape)
            if m is None:
                p.add_(z, alpha=delta)
            else:
                p.copy_(m + z * at)

    @torch.no_grad()
    def _restore_and_update(self, seed: int, eps: float, lr: float, g: float,
                            weight_decay: float) -> None:
        """Undo the last -eps z and take w <- w*(1 - lr*wd) - lr*g*z, with one draw of each
        tensor's z for both (float32: in place, MeZO; half precision: on the fp32 master, then
        written into the model rounded once). The update is zo.perturb.sgd_update, separately
        rounded float32 ops."""
        for i, p in enumerate(self.tensors):
            z = tensor_z(seed, i, p.numel(), p.device).view(p.shape)
            m = self.master[i]
            if m is None:
                p.add_(z, alpha=eps)
                sgd_update(p, z, g, lr, weight_decay)
            else:
                sgd_update(m, z, g, lr, weight_decay)
                p.copy_(m)


@torch.no_grad()
def dense_zo_step(view: DenseView, seed: int, *, eps: float, lr: float,
                  loss_fn: Callable[[], float], weight_decay: float = 0.0) -> StepResult:
    """MeZO step in place on the model: +eps z, f+, -2eps z, f-, +eps z, w -= lr*(g z + wd w).
    Half-precision tensors take the same step on their fp32 masters (see DenseView)."""
    view._perturb(seed, eps, eps)
    loss_plus = float(loss_fn())
    view._perturb(seed, -2.0 * eps, -eps)
    loss_minus = float(loss_fn())
    g = to_float32((loss_plus - loss_minus) / (2.0 * eps))
    view._restore_and_update(seed, eps, lr, g, weight_decay)  # z of each tensor drawn 3x a step
    return StepResult(g=g, loss_plus=loss_plus, loss_minus=loss_minus)


@torch.no_grad()
def apply_aggregate_dense(theta: torch.Tensor, space: DenseSpace, agg) -> torch.Tensor:
    """`aggregate.apply_aggregate` with per-tensor z: theta <- decay*theta - sum_t coef_t z_t,
    in place, one tensor's z at a time, as separately rounded float32 ops (bit-identical on
    every party)."""
    if not agg.is_identity_decay():
        theta.mul_(torch.tensor(agg.decay, dtype=torch.float32))
    for seed, coef in zip(agg.seeds, agg.coefs, strict=True):
        if coef == 0.0:
            continue
        c = torch.tensor(coef, dtype=torch.float32)
        for i in range(len(space.names)):
            part = theta[space.offsets[i]:space.offsets[i + 1]]
            part.sub_(tensor_z(seed, i, part.numel(), theta.device) * c)
    return theta
