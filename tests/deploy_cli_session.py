"""The deploy commands as a user runs them, for tests/test_deploy_submit.py; run inside private
namespaces (fedmeerkat.deploy.selftest.NETNS, loopback up):

    python tests/deploy_cli_session.py WORKDIR RUN_DIR KILL_SITE AFTER_ROUND WAIT_S

`deploy provision`, then `deploy server` and `deploy site` for site-1 and site-2 (each in its
own process group, until its ready line), then `deploy submit` of RUN_DIR (site-1: clients 0,
1; site-2: client 2). Once metrics.jsonl records AFTER_ROUND, KILL_SITE's process tree gets
SIGKILL: its `deploy site`, its FLARE client, the job process and the trainer. Writes
WORKDIR/result.json: the ready lines, submit's exit code (None if it still ran WAIT_S after
the kill) and output, and its seconds after the kill. Every process is stopped by its group at the end (and dies with the namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmeerkat.deploy import processes

SITES = {"site-1": "0,1", "site-2": "2"}


def start(argv: list[str], out: Path) -> subprocess.Popen:
    with open(out, "wb") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def ready_line(out: Path, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        lines = [x for x in out.read_text(errors="replace").splitlines() if " ready: " in x]
        if lines:
            return lines[0]
        time.sleep(0.1)
    raise RuntimeError(f"no ready line in {out} (exit {proc.poll()}): "
                       f"{out.read_text(errors='replace')[-2000:]}")


def tree(pid: int) -> list[int]:
    """pid and its descendants (FLARE starts a site's job process in a session of its own, so
    its process group is not the site's)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def main(work: Path, run_dir: Path, kill_site: str, after_round: int, wait_s: float) -> dict:
    fed = [sys.executable, "-m", "fedmeerkat.cli.main", "deploy"]
    ws = work / "ws"
    fl_port, admin_port = processes.free_ports(2)
    subprocess.run([*fed, "provision", str(ws), "--sites", ",".join(SITES), "--fl-port",
                    str(fl_port), "--admin-port", str(admin_port)], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    result: dict = {"ready": {}}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = start([*fed, "server", str(ws)], work / "server.out")
        result["ready"]["server"] = ready_line(work / "server.out", procs["server"], 60)
        for site in SITES:
            procs[site] = start([*fed, "site", str(ws), site], work / f"{site}.out")
        for site in SITES:
            result["ready"][site] = ready_line(work / f"{site}.out", procs[site], 60)
        argv = [*fed, "submit", str(ws), str(run_dir)]
        for site, ids in SITES.items():
            argv += ["--site", f"{site}={ids}"]
        submit = procs["submit"] = start(argv, work / "submit.out")
        metrics = run_dir / "metrics.jsonl"
        while submit.poll() is None:  # the run folder is new: every line is this job's
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(x)["round"] == after_round for x in lines):
                break
            time.sleep(0.05)
        site_tree = tree(procs[kill_site].pid)
        for pid in site_tree:  # the site's machine going down: all at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        result["killed"] = site_tree
        try:
            result["submit_rc"] = submit.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            result["submit_rc"] = None  # still following after wait_s: stopped below
        result["submit_s_after_kill"] = time.monotonic() - killed
        result["submit_output"] = (work / "submit.out").read_text(errors="replace")
    finally:
        processes.stop([p for p in procs.values()], grace_s=5)
        (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
