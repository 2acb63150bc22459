"""Differential privacy of what leaves a client: DP-ZO on the uploaded scalars.

z is public (every party derives it from the shared seeds), so all a client reveals is its
scalars, one number a step. Each step of a DP client (DPZero, Zhang et al. 2024; DP-ZO, Tang
et al. 2024):
  1. a Poisson batch: each of the client's n examples joins with probability q = B / n
     (B = batch_size, the expected batch), drawn from the client's secret generator;
  2. the same two forwards, per example: d_i = (f_i(theta + eps z) - f_i(theta - eps z)) / 2eps;
  3. g = (sum_i clip(d_i, -C, C) + N(0, (sigma C)^2)) / B, the scalar that travels.
Adding or removing one example moves the clipped sum by at most C, so each step is the
Poisson-subsampled Gaussian mechanism with noise multiplier sigma; dividing by the constant B
is post-processing. The guarantee is example-level and local: the server only ever sees g.

Accounting is Google's dp-accounting (RDP, add-or-remove-one neighbours, which is what
Poisson sampling amplifies), never a formula of ours: a client that ran s steps at rate q has
spent `epsilon_spent(q, sigma, s, delta)`. The server keeps the count (`PrivacyLedger`: every
step of every plan sent, whether or not its reply was used, since the client ran it).

The noise is secret: an OS-seeded torch generator per client (`secret_generator`), its state
kept in the client's state (ClientState.extra, checkpointed with it, at the site when deployed)
and never sent, so the server cannot subtract it; a resumed run continues the same stream.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

# the client state's entry holding its secret generator (ClientState.extra)
RNG_KEY = "dp_rng"


@dataclass(frozen=True)
class DPSettings:
    clip: float  # C: every example's difference is clipped to [-C, C]
    noise_multiplier: float  # sigma of every client: noise std is sigma * C
    delta: float = 0.0  # the delta epsilon is reported at; 0 = 1 / n per client
    epsilon: float = 0.0  # each client's budget; 0 = none (spent epsilon is still reported)
    # one sigma per client, replacing noise_multiplier (solved per client for a budget:
    # runners/prepare.with_solved_noise)
    noise_multipliers: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"dp_clip must be a positive number, got {self.clip}")
        for s in self.noise_multipliers or (self.noise_multiplier,):
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(f"dp_noise_multiplier must be positive, got {s}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"dp_delta must be in [0, 1), got {self.delta}")

    def sigma(self, client_id: int) -> float:
        """The noise multiplier of client `client_id`."""
        if not self.noise_multipliers:
            return self.noise_multiplier
        if not 0 <= client_id < len(self.noise_multipliers):
            raise ValueError(f"client {client_id} has no dp_noise_multipliers entry "
                             f"({len(self.noise_multipliers)} given)")
        return self.noise_multipliers[client_id]

    def delta_for(self, num_examples: int) -> float:
        return self.delta or 1.0 / num_examples


def sampling_rate(batch_size: int, num_examples: int) -> float:
    """q: each example joins a step's batch with this probability (B / n, at most 1)."""
    return min(1.0, batch_size / num_examples)


# ---- accounting (dp-accounting) ------------------------------------------------------------
def _event(q: float, sigma: float, steps: int):
    import dp_accounting
    from absl import logging

    # at small sigma the RDP accountant drops the orders whose series does not converge, once
    # per call, with a warning; the epsilon it returns is still a bound (the minimum over the
    # orders that remain), so the warning is noise in a run's output
    logging.set_verbosity(logging.ERROR)

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def epsilon_spent(q: float, sigma: float, steps: int, delta: float,
                  orders: list[float] | None = None) -> float:
    """epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps (RDP accountant)."""
    if steps <= 0:
        return 0.0
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders) if orders is not None else RdpAccountant()
    acc.compose(_event(q, sigma, steps))
    return float(acc.get_epsilon(delta))


def solve_noise_multiplier(q: float, steps: int, epsilon: float, delta: float) -> float:
    """The smallest sigma whose `steps` steps at rate q spend at most `epsilon` at `delta`."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    return float(dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, lambda s: _event(q, s, steps), epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)))


# ---- the client's side -------------------------------------------------------------------
def secret_generator(extra: dict[str, torch.Tensor]) -> torch.Generator:
    """The client's secret generator: continued from its saved state, or seeded from the OS
    the first time (never from the run seed, which the server knows)."""
    gen = torch.Generator()
    if RNG_KEY in extra:
        gen.set_state(extra[RNG_KEY])
    else:
        gen.manual_seed(secrets.randbits(63))
    return gen


@dataclass
class PrivateSteps:
    """One client's DP for a round: Poisson batches and noised scalars from its generator."""

    settings: DPSettings
    batch_size: int
    extra: dict[str, torch.Tensor]  # the client's state (its generator's state lives here)
    client_id: int = 0  # whose sigma (DPSettings.sigma)
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = secret_generator(self.extra)

    def batch(self, num_examples: int) -> np.ndarray:
        """Positions (into the client's examples) of a Poisson batch: possibly empty."""
        q = sampling_rate(self.batch_size, num_examples)
        return torch.nonzero(torch.rand(num_examples, generator=self.gen, dtype=torch.float64)
                             < q).flatten().numpy()

    def scalar(self, differences: np.ndarray) -> float:
        """(sum of the clipped per-example differences + secret noise) / expected batch."""
        c, sigma = self.settings.clip, self.settings.sigma(self.client_id)
        noise = float(torch.randn((), generator=self.gen, dtype=torch.float64)) * sigma * c
        total = float(np.clip(np.asarray(differences, dtype=np.float64), -c, c).sum())
        return (total + noise) / self.batch_size

    def save(self) -> None:
        """Keep the generator's state in the client's state (checkpoint, site snapshot)."""
        self.extra[RNG_KEY] = self.gen.get_state()


# ---- the server's side -------------------------------------------------------------------
class BudgetExhausted(RuntimeError):
    """A round would take a client past its privacy budget; nothing of it was sent."""


@dataclass
class PrivacyLedger:
    """Steps each client has run (from the plans sent) and the epsilon they cost."""

    settings: DPSettings
    batch_size: int
    client_sizes: list[int]
    steps: dict[int, int] = field(default_factory=dict)

    def epsilon(self, k: int, steps: int | None = None) -> float:
        n = self.client_sizes[k]
        return epsilon_spent(sampling_rate(self.batch_size, n), self.settings.sigma(k),
                             self.steps.get(k, 0) if steps is None else steps,
                             self.settings.delta_for(n))

    def charge(self, planned: dict[int, int]) -> None:
        """Count a round's plans (client -> seeds it runs) before they are sent; a plan that
        would take its client past the budget raises BudgetExhausted and nothing is counted."""
        budget = self.settings.epsilon
        if budget > 0:
            over = {k: self.epsilon(k, self.steps.get(k, 0) + s) for k, s in planned.items()}
            over = {k: e for k, e in over.items() if e > budget}
            if over:
                raise BudgetExhausted(
                    f"clients {sorted(over)} would spend epsilon "
                    f"{max(over.values()):.3f} > dp_epsilon={budget:g} in the next round")
        for k, s in planned.items():
            self.steps[k] = self.steps.get(k, 0) + s

    def spent(self) -> dict[str, float]:
        """client -> epsilon spent so far (at each client's delta), for metrics and summary;
        every client is listed, 0.0 for one that has not run yet (absent would read as
        unknown)."""
        return {str(k): self.epsilon(k) for k in range(len(self.client_sizes))}
