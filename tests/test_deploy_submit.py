"""`fedmeerkat deploy` end to end as a user runs it (real FLARE, mutual TLS, private
namespaces as in test_deploy.py; ~1 min): `deploy server` and `deploy site` say when they are
ready, and `deploy submit` of a Meerkat run whose site-2 is killed mid-run (its FLARE client,
job process and trainer) ends once the rounds have, with the partial-success exit code and
the missing client named, though FLARE still holds the job."""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare", reason="nvflare not installed (pip install nvflare==2.9.0)")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from fedmeerkat.deploy import admin, selftest  # noqa: E402  (after the skip: it needs nvflare)

pytestmark = [pytest.mark.deploy, pytest.mark.faults]
ROUNDS, ROUND_TIMEOUT, KILL_AFTER = 3, 5, 1
# after the kill: the rounds left each close at round_timeout without site-2, then the final
# evaluation, summary.json and submit's wait for FLARE to end the job (END_GRACE_S)
BOUND_S = (ROUNDS - KILL_AFTER) * ROUND_TIMEOUT + admin.END_GRACE_S + 20


def test_submit_returns_after_the_rounds_when_a_site_dies(tmp_path, tiny_model_dir):
    why = selftest.netns_available()
    if why:
        pytest.skip(f"no private namespaces for the deployment test ({why})")
    from deploy_config import base_overrides

    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run

    run_dir = prepare_run(load_config(None, [
        *base_overrides(tmp_path, tiny_model_dir, rounds=ROUNDS), "downlink=scalars",
        f"round_timeout={ROUND_TIMEOUT}", f"out={tmp_path / 'run'}"]), quiet=True)
    work = tmp_path / "deploy"
    work.mkdir()
    cmd = [sys.executable, str(Path(__file__).with_name("deploy_cli_session.py")), str(work),
           str(run_dir), "site-2", str(KILL_AFTER), str(BOUND_S + 30)]
    r = subprocess.run([*selftest.NETNS, "bash", "-c", 'ip link set lo up && exec "$@"', "cli",
                        *cmd], stdin=subprocess.DEVNULL, capture_output=True, timeout=240)
    assert (work / "result.json").exists(), r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:]
    res = json.loads((work / "result.json").read_text())
    ready = res["ready"]
    assert ready["server"].startswith("server ready: 127.0.0.1, fl port "), ready
    for site in ("site-1", "site-2"):
        assert ready[site].startswith(f"site {site} ready: registered with the server"), ready
    out = res.get("submit_output", "")
    assert res.get("submit_rc") == admin.EXIT_PARTIAL, (res.get("submit_rc"), out)
    assert res["submit_s_after_kill"] < BOUND_S, res["submit_s_after_kill"]
    last = out.strip().splitlines()[-1]
    assert "run finished (rounds 0..3" in last and "missing client 2 (round" in last, out
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in records] == list(range(ROUNDS + 1))
    assert 2 in records[-1]["missing"] and (run_dir / "final_state.safetensors").exists()
    # each round submit printed is this job's, once
    printed = [x for x in out.splitlines() if x.startswith("round ")]
    assert [int(x.split()[1].rstrip(":")) for x in printed] == list(range(ROUNDS + 1)), out
