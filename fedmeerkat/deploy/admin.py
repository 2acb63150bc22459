"""Admin side of a running provisioned system, through FLARE's Session API (flare_api)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import Session, new_secure_session

from fedmeerkat.deploy.provision import Kits


@contextmanager
def session(kits: Kits, timeout_s: float = 30.0) -> Iterator[Session]:
    """A logged-in admin session from the admin startup kit; closed on exit."""
    s = new_secure_session(kits.admin_user, str(kits.admin), timeout=timeout_s)
    try:
        yield s
    finally:
        s.close()


def connected_sites(s: Session) -> list[str]:
    return sorted(c.name for c in s.get_connected_client_list())


def wait_for_sites(s: Session, sites: list[str], timeout_s: float = 60.0) -> float:
    """Wait until all `sites` are registered with the server; seconds waited."""
    t0 = time.monotonic()
    while not set(sites) <= set(connected := connected_sites(s)):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"sites {sorted(set(sites) - set(connected))} not connected "
                               f"after {timeout_s:.0f} s (connected: {connected})")
        time.sleep(0.2)
    return time.monotonic() - t0


def run_job(s: Session, job_dir: str | Path, download_to: str | Path, timeout_s: float = 300.0,
            poll_s: float = 0.5) -> tuple[str, dict, Path]:
    """Submit an exported job folder, wait until it ends, download the server's job workspace.

    Returns (job id, final job meta, downloaded folder). Aborts the job if it outlives
    timeout_s and raises TimeoutError. A finished job's status is in meta["status"]
    ("FINISHED:COMPLETED" when it went well).
    """
    job_id = s.submit_job(str(job_dir))
    try:
        meta = s.wait_for_job(job_id, timeout=timeout_s, poll_interval=poll_s)
    except Exception as e:
        try:
            s.abort_job(job_id)
        except Exception:
            pass  # already ended, or the server is gone: nothing left to abort
        raise TimeoutError(f"job {job_id} did not end within {timeout_s:.0f} s") from e
    return job_id, meta, Path(s.download_job_result(job_id, str(download_to)))
