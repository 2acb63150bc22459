"""A frozen copy of the eager z draw as it was before the compiled path and the four-op
`_mulhilo` (fedmeerkat/zo/rng.py at a0bf808): 16-bit split products, frexp bit length, the sign
by `torch.where`. tests/test_rng.py checks today's paths against it bit for bit. Not a test
module itself; do not "improve" it."""

from __future__ import annotations

import torch

from fedmeerkat.zo.rng import (
    _M32,
    _PHILOX_M0,
    _PHILOX_M1,
    _PHILOX_W0,
    _PHILOX_W1,
    CHUNK,
    STREAM,
    _key,
    _table,
)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * (m & 0xFFFF)
    q = a * (m >> 16)
    t = q.bitwise_and(0xFFFF).bitwise_left_shift_(16).add_(p)
    lo = t.bitwise_and(_M32)
    hi = q.bitwise_right_shift_(16).add_(t.bitwise_right_shift_(32))
    return hi, lo


def _philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> list[torch.Tensor]:
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c2 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), hi0.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo1, lo0
    return [c0, c1, c2, c3]


def _normal(words: torch.Tensor, table) -> torch.Tensor:
    _, value, slope = table
    r = words & 0x7FFFFFFF
    s = torch.frexp((r >> 9).to(torch.float32)).exponent.to(torch.int64)
    top = r >> s
    j = (s << 8) + top
    frac = (r - (top << s)).to(torch.float32)
    z = slope[j].mul_(frac)
    z.add_(value[j])
    return torch.where(words >= 0x80000000, -z, z)


@torch.no_grad()
def reference_draw_z(seed: int, n: int, offset: int = 0) -> torch.Tensor:
    """z_i for i in [offset, offset + n) on the CPU, as the eager draw computed it."""
    out = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return out
    table = _table(torch.device("cpu"))
    k0, k1 = _key(seed)
    first, last = offset >> 2, (offset + n - 1) >> 2
    at = 0
    for b0 in range(first, last + 1, CHUNK):
        b1 = min(b0 + CHUNK, last + 1)
        blocks = torch.arange(b0, b1, dtype=torch.int64)
        zero = torch.zeros_like(blocks)
        words = _philox4x32(blocks & _M32, blocks >> 32, zero, zero + STREAM, k0, k1)
        z = _normal(torch.stack(words, dim=1).view(-1), table)
        lo = offset - 4 * b0 if b0 == first else 0
        take = min(z.numel() - lo, n - at)
        out[at:at + take].copy_(z[lo:lo + take])
        at += take
    return out
