"""Seeds that every party derives from the same integers, so nothing but the run seed is stored.

`step_seed(run_seed, round, step)` is a fixed integer hash (SplitMix64 finaliser over the packed
inputs). It does not depend on Python's hash randomisation, numpy or torch versions.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1

# Seed-stream domains: the second part of every `mix(run_seed, DOMAIN, ...)`, so that no two
# uses of the run seed draw the same stream. Changing a value changes every run that uses it.
Z_STEP = 1  # the z of local step t of round r, shared by all clients (step_seed)
DATA_ORDER = 2  # a client's data pointer: mix(seed, DATA_ORDER, client)
PARTICIPANTS = 3  # the clients sampled in round r: mix(seed, PARTICIPANTS, round)
RANDOM_SELECT = 5  # Meerkat-random-select's early-stopped clients: mix(seed, RANDOM_SELECT, r)
GRADIP_PICK = 6  # the GradIP experiment's client pick: mix(seed, GRADIP_PICK)
# 7 serves two streams of different lengths (mix hashes its arity in, so they differ):
LORA_INIT = 7  # LoRA adapter init: mix(seed, LORA_INIT)
SITE_SPLIT = 7  # a site's own file split among its clients: mix(seed, SITE_SPLIT, first client)
LR_SEARCH = 0x6C72  # lr=auto's batches and z: mix(seed, LR_SEARCH, 0 | 1, step) ("lr")
RANDOM_MASK = 0x6D61736B  # the random mask baseline's draw ("mask")
TASK_PICK = 0x7461736B  # the task texts a task-gradient mask uses ("task")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of non-negative ints to a 63-bit seed (torch generators take < 2**63)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        if p < 0:
            raise ValueError(f"seed parts must be non-negative, got {p}")
        h = _splitmix64(h ^ (p & _MASK64))
    return h >> 1


def step_seed(run_seed: int, round_idx: int, step: int) -> int:
    """Seed of the z used at local step `step` of round `round_idx` (shared by all clients)."""
    return mix(run_seed, Z_STEP, round_idx, step)


def round_seeds(run_seed: int, round_idx: int, num_steps: int) -> list[int]:
    return [step_seed(run_seed, round_idx, t) for t in range(num_steps)]
