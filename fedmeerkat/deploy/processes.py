"""Start a provisioned server and sites as local processes, the way FLARE's own CI does, and stop
them for sure; and `foreground`, which runs one of them for `fedmeerkat deploy server|site` and
says in one line when it is ready.

Each parent (`server_train` / `client_train`) runs in its own session (setsid) and killpg
stops it; FLARE 2.9 starts each job process (and with it the trainer) in a session of its own
(nvflare/utils/process_utils.py), which that does not reach: in selftest's private PID
namespace they die with the namespace.
Output goes to `<kit>/console.txt`; FLARE's own logs stay in the kit (log.txt, per-job folders).
A site is ready once it has registered with the server: `Registered` (a component provisioning
puts into every site kit's local/resources.json) then writes `<kit>/REGISTERED_FILE`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey

from fedmeerkat.deploy.provision import ORG, REGISTERED_FILE, Kits

SERVER_MODULE = "nvflare.private.fed.app.server.server_train"
CLIENT_MODULE = "nvflare.private.fed.app.client.client_train"


def server_argv(kit: Path) -> list[str]:
    """Command line of startup/sub_start.sh for a server kit, with this interpreter."""
    return [sys.executable, "-u", "-m", SERVER_MODULE, "-m", str(kit), "-s", "fed_server.json",
            "--set", "secure_train=true", f"org={ORG}", "config_folder=config"]


def client_argv(kit: Path, site: str) -> list[str]:
    """Command line of startup/sub_start.sh for a site kit, with this interpreter."""
    return [sys.executable, "-u", "-m", CLIENT_MODULE, "-m", str(kit), "-s", "fed_client.json",
            "--set", "secure_train=true", f"uid={site}", f"org={ORG}", "config_folder=config"]


def child_env() -> dict[str, str]:
    # The trainer is launched by name ("python3 -u ...") from the site's job process: put this
    # interpreter's bin directory first so it is the same Python, with the same packages.
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("MALLOC_ARENA_MAX", "4")  # as sub_start.sh
    return env


class Registered(FLComponent):
    """Writes <kit>/REGISTERED_FILE (the PID of the site's FLARE parent) once that parent
    has registered with the server."""

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type == EventType.AFTER_CLIENT_REGISTER and fl_ctx.get_prop(
                FLContextKey.CLIENT_TOKEN):
            kit = Path(fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT).get_root_dir())
            (kit / REGISTERED_FILE).write_text(f"{os.getpid()}\n")


def foreground(argv: list[str], kit: Path, ready: Callable[[subprocess.Popen], bool],
               ready_line: Callable[[int], str], poll_s: float = 0.2) -> int:
    """Run one FLARE parent with this terminal, print ready_line(pid) once ready(proc) holds,
    and return its exit status (128 + signal if a signal ended it). SIGTERM and SIGHUP are
    passed on; Ctrl-C reaches it directly (same process group), so SIGINT only waits here."""
    (kit / "transfer").mkdir(exist_ok=True)
    proc = subprocess.Popen(argv, cwd=kit, env=child_env(), stdin=subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _: proc.send_signal(n))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while proc.poll() is None:
        if ready(proc):
            print(ready_line(proc.pid), flush=True)
            break
        time.sleep(poll_s)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def ports_open(host: str, ports: tuple[int, ...]) -> bool:
    for port in ports:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError:
            return False
    return True


def start(argv: list[str], kit: Path) -> subprocess.Popen:
    """Start one FLARE parent process in a new session, output to kit/console.txt."""
    (kit / "transfer").mkdir(exist_ok=True)
    with open(kit / "console.txt", "ab") as log:
        return subprocess.Popen(argv, cwd=kit, env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM each process group, wait up to grace_s for all of them, SIGKILL what is left.

    Groups, not just the parents: job processes and trainers may outlive their parent by a
    moment. Never raises.
    """
    def signal_all(sig: int) -> None:
        # Linux does not hand out a PID while a group of that ID has members, so signalling a
        # live group cannot hit a stranger; a gone group is skipped.
        for p in procs:
            if not group_alive(p.pid):
                continue
            try:
                os.killpg(p.pid, sig)  # pgid == pid: each leads its own session
            except (ProcessLookupError, PermissionError):
                pass

    def wait_all(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in procs:
                p.poll()  # reap the leaders, or their zombies keep the group "alive"
            if os.getpid() == 1:  # PID 1 of a namespace inherits the orphans: reap them too
                reap_orphans()
            if not any(group_alive(p.pid) for p in procs):
                return
            time.sleep(0.1)

    signal_all(signal.SIGTERM)
    wait_all(grace_s)
    signal_all(signal.SIGKILL)
    wait_all(5.0)


def reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until host:port accepts a TCP connection; fail early if proc exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before port {port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} not open after {timeout_s:.0f} s")
        time.sleep(0.1)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free right now (the OS picks them; racy, fine for tests)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def running(kits: Kits, sites: list[str] | None = None, extra_sites: dict[str, Path] | None = None,
            ready_timeout_s: float = 60.0, grace_s: float = 10.0) -> Iterator[dict[str, subprocess.Popen]]:
    """Run the server and sites (all of kits.sites by default) until the block exits.

    `extra_sites` maps site names to kits from elsewhere (e.g. another project's). Waits until the
    server's ports are open; that sites have registered is the admin's to check
    (fedmeerkat.deploy.admin.wait_for_sites). Every process is stopped by its group on exit,
    whatever happens. Yields {"server": proc, site: proc, ...}.
    """
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = start(server_argv(kits.server), kits.server)
        for port in (kits.fl_port, kits.admin_port):
            wait_port(kits.host, port, ready_timeout_s, procs["server"])
        chosen = {s: kits.sites[s] for s in (kits.sites if sites is None else sites)}
        for site, kit in {**chosen, **(extra_sites or {})}.items():
            procs[site] = start(client_argv(kit, site), kit)
        yield procs
    finally:
        stop(list(procs.values()), grace_s)
