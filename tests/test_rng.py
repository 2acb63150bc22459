"""The portable z (fedmeerkat/zo/rng.py): the generator's definition, golden values that hold in
other processes under every CPU instruction set this machine has, its quality as a standard
normal, and client/server agreement across instruction sets (client in one process, replay in
another)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmeerkat.zo import draw_z, rng

sys.path.insert(0, str(Path(__file__).parent))
from z_reference import reference_draw_z  # noqa: E402
from zo_probe import GOLDEN_CASES, z_hash  # noqa: E402

PROBE = str(Path(__file__).with_name("zo_probe.py"))
# sha256[:32] of the float32 bytes of draw_z(*GOLDEN_CASES[i]). These define z: a change
# here changes every trained model, every replay and every published figure.
GOLDEN = ["c4236a5706a6d1477850d21bf93dfdc8", "744f6ecb50a7fa3c1d0c8efa74c96a78",
          "5064893fad0e87a174390ec7f781e4e9", "2f276e7d521348047a89d64416358ca1"]
TABLE_SHA256 = "603ce9c81315b5507e09a485450758e58719b1bd8a25359e28b2de9e7d2e2f37"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values torch can honour on this CPU."""
    flags, caps = _cpu_flags(), ["default"]
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


def _probe(capability: str, *args: str, compile_z: str | None = None) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    if compile_z is not None:
        env[rng.COMPILE_ENV] = compile_z
    out = subprocess.run([sys.executable, PROBE, *args], env=env, capture_output=True,
                         text=True, timeout=180, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the definition ---------------------------------------------------------------------------
@pytest.mark.parametrize("counter,key,want", [
    # Random123's known-answer vectors for Philox4x32-10 (kat_vectors)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_reference_vectors(counter, key, want):
    c = [torch.tensor([x], dtype=torch.int64) for x in counter]
    assert tuple(int(w) for w in rng.philox4x32(*c, *key)) == want


def test_stored_table_is_the_documented_one():
    import hashlib

    assert hashlib.sha256(rng.TABLE_FILE.read_bytes()).hexdigest() == TABLE_SHA256
    stored, fresh = load_file(str(rng.TABLE_FILE)), rng.make_normal_table()
    assert torch.equal(stored["start"], fresh["start"])
    # regenerating may differ by a last float64 bit of libm on another platform; never more
    # than one float32 step
    for key in ("value", "slope"):
        assert torch.allclose(stored[key], fresh[key], rtol=2 ** -23, atol=1e-30), key


def test_interpolation_error_is_below_float32_noise_in_centre_and_tails():
    """z against the exact quantile of its own 31 bits, for words across every octave."""
    g = np.random.default_rng(0)
    r = np.concatenate([np.arange(0, 2048), g.integers(0, 2**31, 20000),
                        (2 ** np.arange(9, 31)).astype(np.int64)])
    words = torch.from_numpy(r.astype(np.int64))
    z = rng._normal(words, rng._table(torch.device("cpu"))).double().numpy()
    nd = NormalDist()
    # far tail: the quantile at the middle of the value's interval; above: at r itself
    u = r + np.where(r < 512, 0.5, 0.0)
    exact = np.array([-nd.inv_cdf(x / 2**32) for x in u.tolist()])
    err = np.abs(z - exact)
    assert err.max() < 2e-6 * max(1.0, float(np.abs(exact).max())), err.max()
    assert np.all(z >= 0) and z.max() == pytest.approx(6.338, abs=1e-3)  # sign bit clear


def test_chunks_and_offsets_give_the_same_values():
    n = 3 * 4 * rng.CHUNK + 5  # several chunks, not a whole number of blocks
    whole = draw_z(99, n)
    parts = torch.cat([draw_z(99, 3), draw_z(99, 4 * rng.CHUNK, offset=3),
                       draw_z(99, n - 3 - 4 * rng.CHUNK, offset=3 + 4 * rng.CHUNK)])
    assert torch.equal(whole, parts)
    out = torch.empty(n)
    assert draw_z(99, n, out=out) is out and torch.equal(out, whole)
    assert draw_z(99, 0).numel() == 0
    with pytest.raises(ValueError):
        draw_z(-1, 10)


# ---- the compiled CPU path and the four-op _mulhilo give the old eager bits ---------------------
SEEDS = [0, 2**64 - 1, 12345, 0xDEADBEEFCAFE]
C4 = 4 * rng.CHUNK  # coordinates per chunk
SPANS = [(1, 0), (1, 3), (5, 1), (7, 2**33 + 1), (C4, 0), (C4 - 2, 3), (C4 + 1, 3),
         (3 * C4 + 5, 7), (1_500_000, 0), (1_500_000, 2**33 + 2)]  # (n, offset)


def _bits(z: torch.Tensor) -> torch.Tensor:  # torch.equal would take -0.0 for 0.0
    return z.view(torch.int32)


@pytest.mark.parametrize("seed", SEEDS)
def test_eager_and_compiled_paths_give_the_reference_bits(seed):
    kernel = rng.compiled_kernel()  # None where this machine cannot compile: eager only
    k0, k1 = rng._key(seed)
    for n, offset in SPANS:
        if seed not in (0, 2**64 - 1) and n > C4 + 1:
            continue  # the long spans for two seeds keep this test short
        want = _bits(reference_draw_z(seed, n, offset))
        eager = torch.empty(n)
        rng._draw_eager(k0, k1, offset, n, eager)
        assert torch.equal(_bits(eager), want), ("eager", seed, n, offset)
        if kernel is not None:  # every span, even those draw_z keeps eager
            compiled = torch.empty(n)
            rng._draw_compiled(kernel, k0, k1, offset, n, compiled)
            assert torch.equal(_bits(compiled), want), ("compiled", seed, n, offset)
        assert torch.equal(_bits(draw_z(seed, n, offset=offset)), want), (seed, n, offset)
    assert draw_z(seed, 0).numel() == 0


def test_z_is_never_zero_so_the_sign_can_sit_in_the_table():
    """The compiled path draws (+-slope) * frac + (+-value) instead of negating a * f + v; the
    same bits unless a * f + v rounds to exactly 0 (+0.0 against -0.0). Rounding is monotone,
    so inside a cell z is bounded by its values at the cell's two ends: all of them positive."""
    start = rng._table(torch.device("cpu"))[0]
    ends = torch.cat([start[1:] - 1, torch.tensor([2**31 - 1])])
    z = rng._normal(torch.cat([start, ends]), rng._table(torch.device("cpu")))
    assert bool((z > 0).all()), z.min()


def test_a_process_compiles_once_it_has_drawn_enough(monkeypatch):
    asked = []
    monkeypatch.setattr(rng, "compiled_kernel", lambda: asked.append(1))  # None: eager
    monkeypatch.delenv(rng.COMPILE_ENV, raising=False)
    monkeypatch.setattr(rng, "_eager_cpu_drawn", 0)
    draw_z(5, 1000)
    assert not asked and rng._eager_cpu_drawn == 1000
    monkeypatch.setattr(rng, "_eager_cpu_drawn", rng.COMPILE_AFTER - 10)
    draw_z(5, 9)
    assert not asked
    draw_z(5, 1)  # reaches COMPILE_AFTER
    assert asked == [1]
    monkeypatch.setenv(rng.COMPILE_ENV, "0")
    draw_z(5, 10)
    assert asked == [1]
    monkeypatch.setenv(rng.COMPILE_ENV, "1")
    monkeypatch.setattr(rng, "_eager_cpu_drawn", 0)
    draw_z(5, 10)
    assert asked == [1, 1]


def test_no_compiler_or_a_wrong_kernel_falls_back_to_eager(monkeypatch):
    compiled = rng.compiled_kernel.__wrapped__  # uncached: decides afresh
    monkeypatch.setenv(rng.COMPILE_ENV, "0")
    assert compiled() is None
    monkeypatch.delenv(rng.COMPILE_ENV)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no cc")))
    assert compiled() is None

    def off_by_one_bit(fn, **_):
        def kernel(*args):
            slope, value, frac = fn(*args)
            value = value.clone()
            value.view(torch.int32)[12345] ^= 1
            return slope, value, frac
        return kernel

    monkeypatch.setattr(torch, "compile", off_by_one_bit)
    assert compiled() is None
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # eager `_cells`: right bits
    assert compiled() is not None


# ---- golden values, in other processes, under every instruction set -----------------------
def test_golden_hashes_in_this_process():
    assert [z_hash(*case) for case in GOLDEN_CASES] == GOLDEN


@pytest.mark.parametrize("capability", supported_capabilities())
def test_golden_hashes_hold_under_every_cpu_capability_and_thread_count(capability):
    """One thread: the compiled path (inductor honours ATEN_CPU_CAPABILITY too), for every case;
    two: the eager one. A compile costs each process seconds, hence not both everywhere."""
    can_compile = rng.compiled_kernel() is not None
    for threads, compile_z in (("1", "1"), ("2", "0")):
        info = _probe(capability, "hash", threads, compile_z=compile_z)
        assert info["capability"].lower() == capability, info  # the setting took effect
        assert info["z_compiled"] == (compile_z == "1" and can_compile), info
        assert info["hashes"] == GOLDEN, (capability, threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA draw is "
                    "checked against the golden values only where one is present")
def test_golden_hashes_on_cuda():
    assert [z_hash(*case, device="cuda") for case in GOLDEN_CASES] == GOLDEN


def test_client_and_server_replay_agree_across_cpu_capabilities(tmp_path):
    """A client runs ZO steps in one process; the server replays its scalars in another, under
    another instruction set; the two vectors are bit-identical. The forwards differ between
    instruction sets (so the scalars do), the replay of those scalars must not."""
    caps = supported_capabilities()
    if len(caps) < 2:
        pytest.skip("this CPU offers a single ATEN_CPU_CAPABILITY")
    # the net's weights and data come from draw_z, so every process starts from the same bits
    net = tmp_path / "net.safetensors"
    save_file({"w0": draw_z(1, 24 * 16).view(24, 16) * 0.3,
               "w1": draw_z(2, 3 * 24).view(3, 24) * 0.3,
               "x": draw_z(3, 40 * 16).view(40, 16), "y": draw_z(4, 40 * 3).view(40, 3),
               "idx0": torch.arange(0, 24 * 16, 3), "idx1": torch.arange(0, 3 * 24, 2)},
              str(net))
    pairs = [(caps[0], caps[-1]), (caps[-1], caps[0])] + ([(caps[1], caps[0])] if len(caps) > 2 else [])
    scalars = {}
    for client_cap, server_cap in pairs:
        client, server = tmp_path / f"c-{client_cap}.st", tmp_path / f"s-{client_cap}-{server_cap}.st"
        scalars[client_cap] = _probe(client_cap, "client", str(net), str(client))["scalars"]
        _probe(server_cap, "replay", str(net), str(client), str(server))
        theta_c, theta_s = load_file(str(client))["theta"], load_file(str(server))["theta"]
        assert torch.equal(theta_c, theta_s), (client_cap, server_cap)
        assert not torch.equal(theta_c, load_file(str(net))["w0"].flatten()[::3])  # it moved
    assert all(math.isfinite(g) and g != 0 for s in scalars.values() for g in s)


# ---- quality as a standard normal -------------------------------------------------------------
def test_a_million_draws_look_standard_normal():
    z = draw_z(2024, 1_000_000).double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)  # 5 sigma
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / n)  # kurtosis of a normal
    assert abs(np.mean(z**3)) < 5 * math.sqrt(15 / n)  # skewness
    nd = NormalDist()
    for t in (1.0, 2.0, 3.0, 4.0):  # two-sided tail shares against 2(1 - Phi(t))
        p = 2 * (1 - nd.cdf(t))
        assert abs(np.mean(np.abs(z) > t) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6, t
    assert 4.5 < np.abs(z).max() < 6.4  # a million normals reach about 5
    # Kolmogorov-Smirnov distance; the 1% critical value at n = 1e6 is 1.63e-3
    s = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63e-3, ks


def test_draws_are_uncorrelated_across_seeds_and_neighbours():
    n = 1_000_000
    a, b = draw_z(10, n).double(), draw_z(11, n).double()
    bound = 5 / math.sqrt(n)
    assert abs(float((a * b).mean())) < bound  # other seed
    for lag in (1, 2, 3, 4, 5, 8):  # neighbours, including inside one Philox block
        assert abs(float((a[:-lag] * a[lag:]).mean())) < bound, lag
    assert abs(float((a.abs() * b.abs()).mean()) - 2 / math.pi) < 5 * bound  # not just signs
