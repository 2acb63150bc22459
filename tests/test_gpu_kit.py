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
