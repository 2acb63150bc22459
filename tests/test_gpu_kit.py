"""tools/gpu_kit.sh, the lent-GPU checks packed in two device calls (docs/gpu.md): its
refusals. Building the kit downloads wheels and the selftest converts the real model, so those
run by hand (docs/gpu.md), not here."""

from __future__ import annotations

import subprocess
from pathlib import Path

KIT = Path(__file__).resolve().parent.parent / "tools" / "gpu_kit.sh"


def _kit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(KIT), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_the_script_parses_and_names_its_verbs():
    assert subprocess.run(["bash", "-n", str(KIT)], timeout=60).returncode == 0
    bad = _kit("nonsense")
    assert bad.returncode == 2 and "build|stage|run|selftest" in bad.stderr


def test_the_second_call_refuses_when_the_first_did_not_stage(tmp_path):
    import os

    res = _kit("run", env={**os.environ, "GPU_KIT_DIR": str(tmp_path / "kit")})
    assert res.returncode == 3 and "call 1 did not run on this machine" in res.stderr


def test_a_part_damaged_in_transfer_is_refused_before_anything_runs(tmp_path):
    """The model's two parts are checked against the sha256 of the whole (a fake kit: the
    script works from its own folder's parent)."""
    import hashlib
    import os
    import shutil

    (tmp_path / "tools").mkdir()
    shutil.copy(KIT, tmp_path / "tools" / "gpu_kit.sh")
    model = os.urandom(4096)
    kit, part2 = tmp_path / "kit", tmp_path / ".gpu" / "part2"
    (kit / "part1" / "assets").mkdir(parents=True)
    (part2 / "whl").mkdir(parents=True)
    (kit / "part1" / "model.part1").write_bytes(model[:1000])
    (part2 / "model.part2").write_bytes(model[1000:])
    digest = hashlib.sha256(model).hexdigest()
    (part2 / "model.sha256").write_text(f"{digest}  SmolLM2-135M-Instruct.Q4_1.gguf\n")
    damaged = bytearray(model[:1000])
    damaged[10] ^= 1
    (kit / "part1" / "model.part1").write_bytes(bytes(damaged))
    res = subprocess.run(["bash", str(tmp_path / "tools" / "gpu_kit.sh"), "run"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPU_KIT_DIR": str(kit), "GPU_KIT_DRY": "1",
                              "OUT": str(tmp_path / "out")})
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr
    assert not (tmp_path / "out" / "log.txt").exists()  # nothing ran
