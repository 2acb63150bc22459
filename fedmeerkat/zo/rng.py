"""Portable seeded Gaussian z: `z_i = Z(seed, i)`, the same bits on every CPU, GPU and build.

Two parts, both free of transcendental functions at run time:

1. **Bits: Philox4x32-10** (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
   the counter-based generator of cuRAND, JAX and Random123. Key = the 64-bit seed as two
   32-bit words; counter = (i >> 2 as two 32-bit words, 0, STREAM); coordinate i takes word
   i & 3 of the output. Everything is integer arithmetic on int64 tensors holding 32-bit
   values; each 32x32 -> 64-bit product is taken as a * (m - 2^32), in (-2^62, 0], so no int64
   operation ever overflows (signed overflow would be undefined behaviour in the kernels).
   Checked against Random123's known-answer vectors (tests/test_rng.py).
2. **Normal: a stored quantile table** (`normal_table.safetensors`, written once by
   `make_normal_table`). Bit 31 of the word is the sign; the other 31 bits r pick |z| =
   Phi^-1(1 - q/2) at tail probability q = r / 2^31, by linear interpolation in a table whose
   cells are geometric in q (256 cells per octave, one exact entry per value below r = 512),
   so the tails are as accurate as the centre: the largest |z| is 6.3 (q = 2.3e-10), the
   interpolation error below 2e-6 everywhere (tests/test_rng.py). At run time: the cell index
   from r's bit length (exact integer work), two table look-ups, an exact int -> float32
   conversion (< 2^22), then a multiply and an add as two separately rounded IEEE float32 ops
   (two kernels: nothing can fuse them into an FMA).

So the result depends on nothing but (seed, i): not on the instruction set (ATEN_CPU_CAPABILITY),
the thread count, the torch build or the device.

What runs: on the CPU, once a process has drawn COMPILE_AFTER coordinates (or at once with
FEDMEERKAT_Z_COMPILE=1), the integer part (Philox, cell index, look-ups, offset in the cell) is
one torch.compile (inductor C++) kernel per CHUNK Philox blocks, and only the float multiply and
add stay eager: about 10x faster than the eager draw (benchmarks/z_draw.py). The kernel is
scalar C++ on purpose (inductor's vectorised integer code was wrong on AVX2 and on the default
ISA in torch 2.13), and checked against the eager draw on a whole chunk before first use.
Everywhere else (other devices, short processes, no C++ compiler, a failed compile or check)
the same ops run eagerly, in chunks of Philox counters (CHUNK on the CPU, DEVICE_CHUNK
elsewhere; 4 coordinates each), which bounds the int64 scratch memory.

Why not torch.randn: its CPU kernel takes a vectorised log/cos path on AVX2/AVX-512 and a scalar
one elsewhere (different last bits on ARM), and CUDA uses another generator altogether.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # multipliers (Random123)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key bumps (golden ratio, sqrt(3)-1)
PHILOX_ROUNDS = 10
STREAM = 0x7A  # counter word 3: keeps z apart from any other use of the same key ("z")
# Philox counters per chunk (4x as many coordinates). CPU: 512 KiB per int64 array, so a draw
# stays in cache (2^18 drew faster on a 2-core VM, but would change the op counts measured in
# docs/benchmarks.md). Accelerators: 8 MiB per array (about 0.1 GB of scratch), so a 1.5B model's
# mask (1.3M coordinates) is one chunk of about 250 kernel launches. The bits do not depend on it.
CHUNK = 1 << 16
DEVICE_CHUNK = 1 << 20

TABLE_FILE = Path(__file__).with_name("normal_table.safetensors")
_TAIL_BITS = 31  # r in [0, 2^31)
_EXACT = 512  # r below this: one table entry per value (the far tail)
_CELLS_PER_OCTAVE = 256


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for 32-bit a (int64 tensor) and constant m in
    (2^31, 2^32), without overflow: p = a * (m - 2^32) lies in (-2^62, 0], a * m = p + a * 2^32,
    so lo = p mod 2^32 and hi = (p >> 32) + a (arithmetic shift: floor). Four ops where 16-bit
    halves took nine."""
    p = a * (m - (1 << 32))
    lo = p.bitwise_and(_M32)
    hi = p.bitwise_right_shift_(32).add_(a)
    return hi, lo


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0: int | torch.Tensor, k1: int | torch.Tensor, rounds: int = PHILOX_ROUNDS
               ) -> list[torch.Tensor]:
    """Philox4x32-`rounds` of counters (c0..c3, int64 tensors of 32-bit values) under key
    (k0, k1; ints, or 0-d int64 tensors when compiled): four int64 tensors of 32-bit output
    words."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c2 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), hi0.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo1, lo0
    return [c0, c1, c2, c3]


def make_normal_table() -> dict[str, torch.Tensor]:
    """The quantile table, computed in float64 with the standard library (Wichura's AS241 in
    `statistics.NormalDist`) and rounded to float32. Run once to write TABLE_FILE; the stored
    file, not this function, defines z (libm may differ in a last float64 bit across
    platforms). tests/test_rng.py checks that the file matches this function."""
    from statistics import NormalDist

    nd = NormalDist()
    scale = float(1 << _TAIL_BITS)

    def x(q: float) -> float:  # |z| with P(|Z| > |z|) = q
        return 0.0 if q >= 1.0 else -nd.inv_cdf(q / 2.0)

    starts: list[int] = []
    values: list[float] = []
    nexts: list[tuple[int, int] | None] = []
    for r in range(_EXACT):  # far tail: the quantile at the middle of each value's interval
        starts.append(r)
        values.append(x((r + 0.5) / scale))
        nexts.append(None)
    shift = 1
    while (_CELLS_PER_OCTAVE << shift) < (1 << _TAIL_BITS):  # octaves [2^(8+s), 2^(9+s))
        for top in range(_CELLS_PER_OCTAVE, 2 * _CELLS_PER_OCTAVE):
            starts.append(top << shift)
            values.append(x((top << shift) / scale))
            nexts.append(((top + 1) << shift, shift))
        shift += 1
    start = torch.tensor(starts, dtype=torch.int64)
    value = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    slope = torch.zeros(len(starts), dtype=torch.float32)
    for j, nxt in enumerate(nexts):
        if nxt is not None:  # per unit of r: (x(end) - x(start)) / 2^shift, in float32
            end, s = nxt
            end_value = float(torch.tensor(x(end / scale), dtype=torch.float32))
            slope[j] = (end_value - float(value[j])) / float(1 << s)
    return {"start": start, "value": value, "slope": slope}


@cache
def _table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(TABLE_FILE))
    return (t["start"].to(device), t["value"].to(device), t["slope"].to(device))


def _normal(words: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
            ) -> torch.Tensor:
    """Standard normal float32 from 32-bit words (int64 tensor), by the stored table.

    Cell of r: below 512 the value itself; above, 256 cells per octave. With s = bit length of
    r >> 9 (0 below 512), the cell is j = 256 s + (r >> s) and r's offset in it the low s bits.
    The bit length comes from frexp of an integer below 2^22, exact in float32.
    """
    _, value, slope = table
    r = words & 0x7FFFFFFF
    s = torch.frexp((r >> 9).to(torch.float32)).exponent.to(torch.int64)
    top = r >> s
    j = (s << 8) + top
    frac = (r - (top << s)).to(torch.float32)  # < 2^22: exact
    z = slope[j].mul_(frac)  # two separately rounded float32 ops, never an FMA
    z.add_(value[j])
    return torch.where(words >= 0x80000000, -z, z)


def _key(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed & _M32, seed >> 32


def _counters(blocks: torch.Tensor, k0: int | torch.Tensor, k1: int | torch.Tensor
              ) -> list[torch.Tensor]:
    zero = torch.zeros_like(blocks)
    return philox4x32(blocks & _M32, blocks >> 32, zero, zero + STREAM, k0, k1)


# ---- the compiled CPU path: integers in one inductor kernel, the float ops eager ------------------
# A compile costs a process seconds (importing inductor, tracing; more with a cold cache), the
# eager draw about 25 ns a coordinate: compile once the process has drawn COMPILE_AFTER
# coordinates eagerly (about 1.7 s of drawing), so short runs and most tests never pay it.
COMPILE_AFTER = 1 << 26
COMPILE_ENV = "FEDMEERKAT_Z_COMPILE"  # "0": never; "1": from the first CPU draw; unset: as above
_eager_cpu_drawn = 0  # coordinates this process drew eagerly on the CPU


def _cells(b0: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, slope2: torch.Tensor,
           value2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the CHUNK blocks from b0: per coordinate (4b + w) the signed slope and value of its
    cell and its offset in the cell (exact float32), so z = slope * frac + value. Integer work,
    table loads and exact int -> float conversions only: no float arithmetic to contract.

    The sign is folded into the index (slope2, value2 = the table, then its negation): RNE is
    symmetric, so (-a) * f + (-v) = -(a * f + v) exactly, and z is never 0 (a test bounds every
    cell), so not even the sign of a zero differs. The bit length of x < 2^22 is read from the
    exponent bits of float32(x) (exact below 2^24): inductor does not lower frexp."""
    half = slope2.shape[0] // 2
    blocks = torch.arange(CHUNK, dtype=torch.int64, device=b0.device) + b0
    js, fracs = [], []
    for w in _counters(blocks, k0, k1):
        r = w & 0x7FFFFFFF
        exponent = ((r >> 9).to(torch.float32).view(torch.int32) >> 23).to(torch.int64)
        s = (exponent - 126).clamp_min(0)
        top = r >> s
        js.append((s << 8) + top + (w >> 31) * half)
        fracs.append((r - (top << s)).to(torch.float32))
    j = torch.stack(js, dim=1).view(-1)  # coordinate 4b + w
    return slope2[j], value2[j], torch.stack(fracs, dim=1).view(-1)


@cache
def _signed_table() -> tuple[torch.Tensor, torch.Tensor]:
    _, value, slope = _table(torch.device("cpu"))
    return torch.cat([slope, -slope]), torch.cat([value, -value])


def _cells_to_z(cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lo: int, take: int,
                dst: torch.Tensor) -> None:
    slope, value, frac = (t[lo:lo + take] for t in cells)
    torch.mul(slope, frac, out=dst)  # two separately rounded float32 ops (two kernels), as in
    dst.add_(value)  # _normal: never an FMA, whatever the compiler


@cache
def compiled_kernel() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The compiled `_cells`, or None where it cannot be had: FEDMEERKAT_Z_COMPILE=0, no C++
    compiler, any compile error, or a result that differs from the eager draw on a whole chunk
    (checked once, bit for bit). None means the eager path, with the same bits, slower."""
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return None
    try:
        # scalar C++ (simdlen 1): inductor's vectorised code for these integer kernels was wrong
        # in torch 2.13 (AVX2: garbage indices; default ISA: no build; AVX-512 with int32
        # temporaries: heap corruption). Scalar, it matched the eager bits under all three.
        kernel = torch.compile(_cells, fullgraph=True, dynamic=False,
                               options={"cpp.simdlen": 1})
        k0, k1 = _key(0x243F6A8885A308D3)  # any key; one chunk visits every cell many times
        want = torch.empty(4 * CHUNK)
        _draw_eager(k0, k1, 0, want.numel(), want)
        got = torch.empty_like(want)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal, at first compile
            cells = kernel(torch.tensor(0), torch.tensor(k0), torch.tensor(k1), *_signed_table())
        _cells_to_z(cells, 0, got.numel(), got)
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            log.warning("compiled z differs from the eager draw on this machine; drawing eagerly")
            return None
    except Exception as e:  # no compiler, an unsupported platform: the eager path, same bits
        log.debug("z stays eager: %s: %s", type(e).__name__, e)
        return None
    return kernel


def _draw_compiled(kernel: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   k0: int, k1: int, offset: int, n: int, flat: torch.Tensor) -> None:
    slope2, value2 = _signed_table()
    keys = torch.tensor(k0), torch.tensor(k1)
    first, last = offset >> 2, (offset + n - 1) >> 2
    at = 0
    for b0 in range(first, last + 1, CHUNK):  # the last chunk is whole too: one static shape
        lo = offset - 4 * b0 if b0 == first else 0
        take = min(4 * CHUNK - lo, n - at)
        _cells_to_z(kernel(torch.tensor(b0), *keys, slope2, value2), lo, take, flat[at:at + take])
        at += take


# ---- the eager path: every device, and the CPU where compiling is not worth it or not possible ----
def _draw_eager(k0: int, k1: int, offset: int, n: int, flat: torch.Tensor) -> None:
    dev = flat.device
    table = _table(dev)
    first, last = offset >> 2, (offset + n - 1) >> 2  # Philox blocks touched
    at = 0  # values written so far
    chunk = CHUNK if dev.type == "cpu" else DEVICE_CHUNK
    for b0 in range(first, last + 1, chunk):
        b1 = min(b0 + chunk, last + 1)
        words = _counters(torch.arange(b0, b1, dtype=torch.int64, device=dev), k0, k1)
        z = _normal(torch.stack(words, dim=1).view(-1), table)  # coordinate 4b + w
        lo = offset - 4 * b0 if b0 == first else 0
        take = min(z.numel() - lo, n - at)
        flat[at:at + take].copy_(z[lo:lo + take])
        at += take


def _kernel_for(n: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    global _eager_cpu_drawn
    mode = os.environ.get(COMPILE_ENV)
    if mode == "0" or torch.compiler.is_compiling():
        return None
    if mode != "1" and _eager_cpu_drawn + n < COMPILE_AFTER:
        _eager_cpu_drawn += n
        return None
    return compiled_kernel()


@torch.no_grad()
def draw_z(seed: int, n: int, *, device: torch.device | str = "cpu", offset: int = 0,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """z_i = Z(seed, i) for i in [offset, offset + n): float32 on `device` (or into `out`).

    A pure function of (seed, i): any split of a range into chunks gives the same values, and
    the compiled and eager paths give the same bits.
    """
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    elif out.numel() != n or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 with {n} values")
    if n == 0:
        return out
    k0, k1 = _key(seed)
    flat = out.view(-1)
    kernel = _kernel_for(n) if out.device.type == "cpu" else None
    if kernel is not None:
        _draw_compiled(kernel, k0, k1, offset, n, flat)
    else:
        _draw_eager(k0, k1, offset, n, flat)
    return out
