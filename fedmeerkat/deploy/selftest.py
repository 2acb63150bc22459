"""End-to-end check of a provisioned deployment on this machine, as one command.

    python -m fedmeerkat.deploy.selftest WORKDIR [--rounds 3] [--payload-bytes 0] [--intruder]

Provisions a project (server on 127.0.0.1, site-1, site-2, an admin) on free ports, starts the
server and both sites as separate processes with mutual TLS, runs the echo job for --rounds
rounds through the admin API, downloads its result and writes WORKDIR/result.json: every round's
replies and time, startup and job times, and the connected sites. With --late, two more rounds:
one where site-2 answers after the deadline, then a normal one. With --runs (prepared Meerkat
run folders) it runs each as a job after the echo job; with --resume-to N it then stops every
process, starts the server and sites again and resumes each of --resume-runs to N rounds. With --intruder it also
provisions a second project (its own root CA) with two sites that point at the same server:
"intruder" holds that project's kit as is; "impostor" holds it with our project's rootCA.pem
(public in every kit), so it trusts our server and only its own certificate can betray it. The
result records whether either ever registered and the TLS handshake failures in their output.

`launch()` runs this command inside private user, network and PID namespaces
(`unshare -rnpf --kill-child --mount-proc`, then `ip link set lo up`): no traffic can leave the
machine, FLARE's local-address probe falls back to 127.0.0.1, and however the command ends (even
SIGKILL from a timeout), the kernel kills every process it started along with the namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SITES = {"site-1": "clients=0,1", "site-2": "clients=2"}
MEERKAT_SITES = {"site-1": [0, 1], "site-2": [2]}  # --runs: which clients each site hosts
LATE_SITE = "site-2"
INTRUDERS = ("intruder", "impostor")
NETNS = ["unshare", "-rnpf", "--kill-child", "--mount-proc"]


def netns_available() -> str | None:
    """None if launch() can use private namespaces here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip not installed"
    try:
        r = subprocess.run([*NETNS, "ip", "link", "set", "lo", "up"], capture_output=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return None if r.returncode == 0 else f"unshare failed: {r.stderr.decode().strip()}"


def launch(workdir: str | Path, args: list[str], timeout_s: float = 240.0,
           netns: bool = True) -> dict:
    """Run the selftest in a subprocess (in private namespaces if netns), return its result.json
    with "returncode" and "output" (the command's last lines) added."""
    workdir = Path(workdir)
    cmd = [sys.executable, "-m", "fedmeerkat.deploy.selftest", str(workdir), *args]
    if netns:
        cmd = [*NETNS, "bash", "-c", 'ip link set lo up && exec "$@"', "selftest", *cmd]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout_s)
    output = r.stdout.decode(errors="replace")[-4000:]
    path = workdir / "result.json"
    if not path.exists():
        raise RuntimeError(f"selftest wrote no result (rc {r.returncode}):\n{output}")
    return json.loads(path.read_text()) | {"returncode": r.returncode, "output": output}


def console_lines(kit: Path, needle: str) -> list[str]:
    lines = (kit / "console.txt").read_text(errors="replace").splitlines()
    return [line[-200:] for line in lines if needle in line][-3:]


def run(workdir: Path, rounds: int, payload_bytes: int, intruder: bool, late: bool,
        job_timeout_s: float, runs: list[str] | None = None, resume_to: int = 0,
        resume_runs_: list[str] | None = None, meerkat_job: dict | None = None,
        kill: dict | None = None) -> dict:
    from fedmeerkat.deploy import admin, processes
    from fedmeerkat.deploy.job import make_job
    from fedmeerkat.deploy.provision import provision

    t0 = time.monotonic()
    fl_port, admin_port = processes.free_ports(2)
    kits = provision(workdir / "kits", "fedmeerkat_selftest", list(SITES), fl_port=fl_port,
                     admin_port=admin_port)
    extra = {}
    if intruder:  # same server address, different project, hence a different root CA
        other = provision(workdir / "other_kits", "other_project", list(INTRUDERS),
                          fl_port=fl_port, admin_port=admin_port)
        extra = dict(other.sites)
        shutil.copy(kits.server / "startup" / "rootCA.pem",
                    extra["impostor"] / "startup" / "rootCA.pem")
    result: dict = {"sites": SITES, "rounds_asked": rounds, "provision_s": time.monotonic() - t0}
    with processes.running(kits, extra_sites=extra) as procs:
        result["pids"] = {name: p.pid for name, p in procs.items()}
        with admin.session(kits) as s:
            result["sites_ready_s"] = admin.wait_for_sites(s, list(SITES)) + time.monotonic() - t0
            job = make_job("echo", SITES, "fedmeerkat.deploy.echo:echo_driver",
                           "fedmeerkat.deploy.echo:echo_handler",
                           {"rounds": rounds, "payload_bytes": payload_bytes,
                            "late_site": LATE_SITE if late else None})
            job.export_job(str(workdir / "jobs"))
            t = time.monotonic()
            job_id, meta, out = admin.run_job(s, workdir / "jobs" / "echo", workdir / "results",
                                              timeout_s=job_timeout_s)
            result["job_s"] = time.monotonic() - t
            result["job_id"], result["job_status"] = job_id, meta.get("status")
            echo = out / "workspace" / "fedmeerkat" / "echo.json"
            result["echo"] = json.loads(echo.read_text()) if echo.exists() else None
            result["runs"] = {}
            for run_dir in runs or []:  # prepared Meerkat runs (fedmeerkat.deploy.meerkat)
                from fedmeerkat.deploy.meerkat import deploy_job

                name = Path(run_dir).name.replace(".", "_")
                job_args = {"site_clients": MEERKAT_SITES, **(meerkat_job or {})}
                deploy_job(run_dir, **job_args).export_job(str(workdir / "jobs"))
                t = time.monotonic()
                job_id, meta, _ = admin.run_job(s, workdir / "jobs" / name,
                                                workdir / "results" / name, timeout_s=job_timeout_s)
                result["runs"][run_dir] = {"job_id": job_id, "status": meta.get("status"),
                                           "seconds": time.monotonic() - t}
            if kill:  # a run whose site trainer is killed mid-job, then resumed
                result["killed"] = kill_and_rejoin(s, workdir, kill, job_timeout_s)
            # By now the intruder has been trying to register for the whole job.
            result["connected"] = admin.connected_sites(s)
            result["intruders"] = {
                name: {"running": procs[name].poll() is None,
                       "handshake_failures": console_lines(kit, "Handshake failed"),
                       "certificate_errors": console_lines(kit, "CERTIFICATE")}
                for name, kit in extra.items()}
    if resume_to and resume_runs_:  # everything stopped; new processes continue these runs
        result["resumed"] = resume_runs(workdir, kits, resume_runs_, resume_to, job_timeout_s)
    result["total_s"] = time.monotonic() - t0
    return result


def kill_and_rejoin(s, workdir: Path, kill: dict, job_timeout_s: float) -> dict:
    """Run kill["run"] as a job; once its metrics record round kill["after_round"], SIGKILL the
    trainer of kill["site"] (its PID from metrics.jsonl), let the job finish without it, then
    resume the run to kill["resume_to"] rounds on the same FLARE processes."""
    import signal
    import threading

    from fedmeerkat.deploy import admin
    from fedmeerkat.deploy.meerkat import deploy_job
    from fedmeerkat.runners.run_folder import METRICS

    run_dir, out = Path(kill["run"]), {}
    stop = threading.Event()

    def watch() -> None:
        metrics = run_dir / METRICS
        while not stop.wait(0.02):
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            for line in lines:
                r = json.loads(line)
                if r["round"] == kill["after_round"] and kill["site"] in r.get("site_pids", {}):
                    pid = r["site_pids"][kill["site"]]
                    os.kill(pid, signal.SIGKILL)  # the trainer this job launched at that site
                    out["killed_pid"], out["killed_after_round"] = pid, r["round"]
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    name = run_dir.name.replace(".", "_")
    for tag, job in (("killed", deploy_job(run_dir, MEERKAT_SITES)),
                     ("rejoined", deploy_job(run_dir, MEERKAT_SITES, resume=True,
                                             overrides=[f"rounds={kill['resume_to']}"]))):
        job.export_job(str(workdir / f"jobs_{tag}"))
        t = time.monotonic()
        job_id, meta, _ = admin.run_job(s, workdir / f"jobs_{tag}" / name,
                                        workdir / f"results_{tag}" / name, timeout_s=job_timeout_s)
        stop.set()
        watcher.join(timeout=5)
        out[tag] = {"job_id": job_id, "status": meta.get("status"), "seconds": time.monotonic() - t}
    return out


def resume_runs(workdir: Path, kits, runs: list[str], rounds: int, job_timeout_s: float) -> dict:
    """Start the server and sites again (new processes) and resume each run to `rounds`."""
    from fedmeerkat.deploy import admin, processes
    from fedmeerkat.deploy.meerkat import deploy_job

    out: dict = {}
    with processes.running(kits) as procs:
        out["pids"] = {name: p.pid for name, p in procs.items()}
        with admin.session(kits) as s:
            admin.wait_for_sites(s, list(SITES))
            for run_dir in runs:
                name = Path(run_dir).name.replace(".", "_")
                deploy_job(run_dir, MEERKAT_SITES, resume=True,
                           overrides=[f"rounds={rounds}"]).export_job(str(workdir / "jobs_resumed"))
                t = time.monotonic()
                job_id, meta, _ = admin.run_job(s, workdir / "jobs_resumed" / name,
                                                workdir / "results_resumed" / name,
                                                timeout_s=job_timeout_s)
                out[run_dir] = {"job_id": job_id, "status": meta.get("status"),
                                "seconds": time.monotonic() - t}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--payload-bytes", type=int, default=0)
    ap.add_argument("--intruder", action="store_true")
    ap.add_argument("--late", action="store_true",
                    help="then a round site-2 answers too late, then a normal round")
    ap.add_argument("--job-timeout", type=float, default=180.0)
    ap.add_argument("--runs", default="", help="comma-separated prepared run folders to run "
                    "as Meerkat jobs on the same deployment (sites: MEERKAT_SITES)")
    ap.add_argument("--resume-to", type=int, default=0, help="then stop everything, start the "
                    "server and sites again and resume each of --resume-runs to this many rounds")
    ap.add_argument("--resume-runs", default="", help="comma-separated run folders (of --runs)")
    ap.add_argument("--kill", default="", help='JSON {"run": RUN_DIR, "site": SITE, '
                    '"after_round": R, "resume_to": N}: run it, kill the site\'s trainer once '
                    'round R is recorded, then resume it to N rounds')
    ap.add_argument("--meerkat-job", default="{}", help="JSON: deploy_job arguments for --runs "
                    "(e.g. site_clients, site_overrides); default sites: MEERKAT_SITES")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"netns_pid": os.getpid()}  # 1 inside launch()'s PID namespace
    try:
        result |= run(args.workdir, args.rounds, args.payload_bytes, args.intruder, args.late,
                      args.job_timeout, [r for r in args.runs.split(",") if r], args.resume_to,
                      [r for r in args.resume_runs.split(",") if r], json.loads(args.meerkat_job),
                      json.loads(args.kill) if args.kill else None)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        (args.workdir / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
