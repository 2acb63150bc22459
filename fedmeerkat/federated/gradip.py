"""GradIP (paper Definition 2.3) from the z the server draws, and the Meerkat-VP detector.

    GradIP_k^t = < c , g_k^t * z_t >            c = mean calibration ("pre-training") gradient
                                                    at the masked coordinates (mask.calib_grad)
With seeds shared by all clients, z_t is the same for every client at step t, so the server
computes the two client-independent numbers <c, z_t> and ||z_t|| once per step while it
applies the round's aggregate (server.step_observer), and every client's trajectory is then
just its scalars times them:

    GradIP_k^t = g_k^t * <c, z_t>
    norm_k^t   = |g_k^t| * ||z_t||               (norm of the reconstructed ZO gradient)
    cosine_k^t = GradIP_k^t / (||c|| * norm_k^t)

Dot products run in float64. Nothing here touches a model; the cost is one dot product and
one norm of the nnz-long z per step, next to drawing z itself.

Detector (Algorithm 1, step 2; see federated/methods/vp.py for the decisions it encodes):
`vp_ratios` turns one client's calibration trajectory into (rho_later_client,
rho_quie_client) and `is_extreme_non_iid` compares them with rho_later / rho_quie.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

GRADIP_UNITS = ("calib-unit", "raw")


class GradIPRecorder:
    """A step observer: records <c, z_t> and ||z_t|| for every z the server draws."""

    def __init__(self, calib_grad: torch.Tensor):
        self.c = calib_grad.detach().to(torch.float64).flatten().cpu()
        self.c_norm = float(self.c.norm())
        self.proj: dict[int, float] = {}
        self.znorm: dict[int, float] = {}

    def __call__(self, t: int, z: torch.Tensor) -> None:
        if t in self.proj:  # the same step drawn again (it is the same z): nothing new
            return
        if self.c.device != z.device:  # c follows the server's device (moved once)
            self.c = self.c.to(z.device)
        z64 = z.detach().to(torch.float64).flatten()
        self.proj[t] = float(torch.dot(self.c, z64))
        self.znorm[t] = float(z64.norm())

    def trajectories(self, client_ids: Sequence[int], scalars: Sequence[Sequence[float]],
                     num_steps: int) -> dict[str, torch.Tensor]:
        """[K, num_steps] float32 arrays (NaN where a client ran no such step) + client ids."""
        k = len(client_ids)
        gradip = np.full((k, num_steps), np.nan)
        norm = np.full((k, num_steps), np.nan)
        for i, g in enumerate(scalars):
            for t, gt in enumerate(g[:num_steps]):
                if t not in self.proj:
                    raise ValueError(f"no z observed for step {t}")
                gradip[i, t] = gt * self.proj[t]
                norm[i, t] = abs(gt) * self.znorm[t]
        denom = self.c_norm * norm
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where(denom > 0, gradip / np.where(denom > 0, denom, 1.0), 0.0)
        cosine[np.isnan(gradip)] = np.nan
        return {
            "clients": torch.tensor(list(client_ids), dtype=torch.int64),
            "gradip": torch.from_numpy(gradip.astype(np.float32)),
            "norm": torch.from_numpy(norm.astype(np.float32)),
            "cosine": torch.from_numpy(cosine.astype(np.float32)),
            "calib_norm": torch.tensor([self.c_norm], dtype=torch.float32),
        }


def chain(*observers: Callable[[int, torch.Tensor], None] | None
          ) -> Callable[[int, torch.Tensor], None] | None:
    """One observer calling each given one in turn (None when none is given)."""
    live = [o for o in observers if o is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def both(t: int, z: torch.Tensor) -> None:
        for o in live:
            o(t, z)

    return both


def round_summary(arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean |GradIP| per client over the steps it ran (for metrics.jsonl: K floats)."""
    out = {}
    for k, row in zip(arrays["clients"].tolist(), arrays["gradip"], strict=True):
        vals = row[~torch.isnan(row)].abs()
        out[str(k)] = float(vals.to(torch.float64).mean()) if len(vals) else math.nan
    return out


# ---- Meerkat-VP detector (Algorithm 1, step 2) ---------------------------------------------
@dataclass(frozen=True)
class VPRatios:
    init_mean: float  # mean |GradIP| of the first T_init calibration steps (in `units`)
    later_mean: float  # mean |GradIP| of the last T_later calibration steps
    rho_later: float  # init_mean / later_mean (inf when later_mean == 0)
    rho_quie: float  # share of the last T_later steps with |GradIP| < sigma
    flagged: bool

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VPRatios:
        rho = d["rho_later"]
        return cls(float(d["init_mean"]), float(d["later_mean"]),
                   math.inf if rho is None else float(rho), float(d["rho_quie"]),
                   bool(d["flagged"]))


def vp_ratios(gradip: Sequence[float] | np.ndarray, *, init_steps: int, later_steps: int,
              threshold: float, later_ratio: float, quiescent_ratio: float,
              scale: float = 1.0) -> VPRatios:
    """Algorithm 1 on one client's calibration GradIP trajectory (signed, raw units).

    Magnitudes are used (|GradIP|, see methods/vp.py); `scale` divides them first (||c|| for
    units "calib-unit", 1 for "raw"), so `threshold` (sigma) is in the same units.
    """
    g = np.abs(np.asarray(gradip, dtype=np.float64)) / scale
    if np.isnan(g).any():
        raise ValueError("calibration trajectory has missing steps")
    if init_steps + later_steps > len(g):
        raise ValueError(f"T_init={init_steps} + T_later={later_steps} exceed the "
                         f"{len(g)} calibration steps")
    init_mean = float(g[:init_steps].mean())
    later = g[len(g) - later_steps:]
    later_mean = float(later.mean())
    rho_later = init_mean / later_mean if later_mean > 0 else math.inf
    rho_quie = float((later < threshold).mean())
    flagged = is_extreme_non_iid(rho_later, rho_quie, later_ratio, quiescent_ratio)
    return VPRatios(init_mean, later_mean, rho_later, rho_quie, flagged)


def is_extreme_non_iid(rho_later: float, rho_quie: float, later_ratio: float,
                       quiescent_ratio: float) -> bool:
    """Algorithm 1 line 10: flag when either ratio exceeds its limit."""
    return rho_later > later_ratio or rho_quie > quiescent_ratio


def moving_average(x: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values; the first window-1 entries are NaN (as in Fig. 11)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(len(x), np.nan)
    if window < 1 or len(x) < window:
        return out
    c = np.cumsum(np.insert(x, 0, 0.0))
    out[window - 1:] = (c[window:] - c[:-window]) / window
    return out
