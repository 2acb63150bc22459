"""Admin side of a running provisioned system, through FLARE's Session API (flare_api).

`follow_job` is what `fedmeerkat deploy submit` waits on: the run's rounds, read from its run
folder, decide when the job is over, not FLARE's job status (a job whose site died stays
RUNNING in FLARE after its last round).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvflare.fuel.flare_api.flare_api import Session, new_secure_session

from fedmeerkat.deploy.provision import Kits
from fedmeerkat.runners.run_folder import METRICS, SUMMARY

# `submit`'s exit codes (docs/deploy.md): 2 is bad input, refused before anything is submitted
EXIT_OK = 0  # every round of the job, every planned client's reply in
EXIT_FAILED = 1  # the job ended without finishing the run (the reason from its log)
EXIT_ROUND_FAILED = 3  # a round got fewer than min_clients usable replies: resumable
EXIT_PARTIAL = 4  # the run finished, but clients were missing or rejected in some rounds
END_GRACE_S = 10.0  # how long FLARE may take to end a job after the run wrote summary.json
ADMIN_RETRY_S = 60.0  # how long the admin API may fail in a row before submit gives up


@contextmanager
def session(kits: Kits, timeout_s: float = 30.0) -> Iterator[Session]:
    """A logged-in admin session from the admin startup kit; closed on exit."""
    try:
        with redirect_stdout(io.StringIO()):  # FLARE prints "Connecting to FLARE ..."
            s = new_secure_session(kits.admin_user, str(kits.admin), timeout=timeout_s)
    except Exception as e:  # FLARE's NoConnection, InternalError, ...: one line for the CLI
        raise ConnectionError(f"no admin session with the FLARE server at {kits.host}:"
                              f"{kits.admin_port} ({type(e).__name__}: {e})") from None
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


def abort(s: Session, job_id: str) -> str:
    """Abort a job (FLARE's abort_job: nothing if it has ended); FLARE's message."""
    return str(s.abort_job(job_id))


class RunWatch:
    """What a job adds to its run folder: made before the submit, it tells the job's own
    metrics lines from those already there, and whether the job wrote summary.json."""

    def __init__(self, run_dir: Path):
        self.metrics, self.summary = run_dir / METRICS, run_dir / SUMMARY
        self.before = self._lines()
        self.summary_before = self._stamp()
        self.shown = 0

    def _lines(self) -> list[str]:
        text = self.metrics.read_text() if self.metrics.exists() else ""
        return text.split("\n")[:-1]  # a line still being appended has no newline yet

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.summary)  # written by temp file and rename: a new inode
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def records(self) -> list[dict[str, Any]]:
        """The job's lines: those after the part the file still shares with what it held at
        submit (a resume first cuts it back to its checkpoint's round, then appends)."""
        lines, same = self._lines(), 0
        while same < min(len(lines), len(self.before)) and lines[same] == self.before[same]:
            same += 1
        out = []
        for line in lines[same:]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a damaged line: `report` names it
        return out

    def new_records(self) -> list[dict[str, Any]]:
        """The job's lines not returned before."""
        records = self.records()
        fresh, self.shown = records[self.shown:], len(records)
        return fresh

    def finished(self) -> bool:
        """The job wrote summary.json: its last round and the final state are on disk."""
        stamp = self._stamp()
        return stamp is not None and stamp != self.summary_before


@dataclass(frozen=True)
class Outcome:
    code: int  # EXIT_*
    line: str  # what happened, in one line


def _ended(status: str) -> bool:
    return status.startswith("FINISHED")


def _status(s: Session, job_id: str) -> str:
    return str(s.get_job_meta(job_id).get("status", ""))


def follow_job(s: Session, job_id: str, watch: RunWatch, run_dir: Path, timeout_s: float,
               on_record: Callable[[dict[str, Any]], None] = lambda r: None,
               poll_s: float = 1.0, grace_s: float = END_GRACE_S,
               retry_s: float = ADMIN_RETRY_S) -> Outcome:
    """Wait until the job's run has ended (it wrote summary.json) or FLARE ended the job,
    calling on_record with each metrics line the job writes; then, if FLARE still holds the
    job grace_s later (a site gone), abort it. Aborts it too after timeout_s."""
    t0 = time.monotonic()
    status, failing_since = "", None
    while True:
        try:
            status = _status(s, job_id)
            failing_since = None
        except Exception as e:  # the server restarting, the network: retried for retry_s
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > retry_s:
                return Outcome(EXIT_FAILED, f"job {job_id}: no answer from the FLARE server "
                                            f"for {retry_s:.0f} s ({type(e).__name__}: {e})")
        for r in watch.new_records():
            on_record(r)
        if watch.finished() or _ended(status):
            break
        if time.monotonic() - t0 > timeout_s:
            _abort_quietly(s, job_id)
            return Outcome(EXIT_FAILED, f"job {job_id}: the run did not end within "
                                        f"{timeout_s:.0f} s (--timeout); aborted the job")
        time.sleep(poll_s)
    note = ""
    if not _ended(status):  # the run ended first: FLARE ends the job once every site left it
        deadline = time.monotonic() + grace_s
        while not _ended(status) and time.monotonic() < deadline:
            time.sleep(poll_s)
            try:
                status = _status(s, job_id)
            except Exception:
                continue
        if not _ended(status):
            _abort_quietly(s, job_id)
            note = (f"; FLARE still held the job {grace_s:.0f} s after the run ended "
                    "(a site gone?): aborted it")
    for r in watch.new_records():
        on_record(r)
    records = watch.records()
    took = f"{time.monotonic() - t0:.0f} s"
    if watch.finished():
        return finished_outcome(job_id, records, took, run_dir, note)
    failed = [r for r in records if r.get("failed")]
    reason = job_reason(s, job_id, run_dir / "flare_result") or f"FLARE status {status}"
    if failed:
        return Outcome(EXIT_ROUND_FAILED, f"job {job_id}: round {failed[-1]['round']} got too "
                                          f"few usable replies ({reason}); continue with "
                                          "`fedmeerkat deploy submit ... --resume`")
    return Outcome(EXIT_FAILED, f"job {job_id}: {status or 'ended'} after {took} without "
                                f"finishing the run: {reason}{note}")


def finished_outcome(job_id: str, records: list[dict[str, Any]], took: str, run_dir: Path,
                     note: str = "") -> Outcome:
    """Success, or partial success naming each client missing or rejected and its rounds."""
    absent: dict[str, dict[int, list[int]]] = {"missing": {}, "rejected": {}}
    for r in records:
        for k in r.get("missing", []):
            absent["missing"].setdefault(int(k), []).append(r["round"])
        for k in r.get("rejected", {}):
            absent["rejected"].setdefault(int(k), []).append(r["round"])
    rounds = [r["round"] for r in records]
    span = f"rounds {min(rounds)}..{max(rounds)}" if rounds else "no new rounds"
    where = f"run folder {run_dir} (fedmeerkat report / eval / export work on it)"
    parts = [f"{what} client{'s' if len(ks) > 1 else ''} "
             + "; ".join(f"{k} (round{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                         for k, rs in sorted(ks.items()))
             for what, ks in absent.items() if ks]
    if parts:
        return Outcome(EXIT_PARTIAL, f"job {job_id}: run finished ({span}, {took}) with "
                                     f"{', '.join(parts)}{note}; {where}")
    return Outcome(EXIT_OK, f"job {job_id}: run finished ({span}, {took}){note}; {where}")


# FLARE's line for an exception in our controller (base_model_controller.control_flow)
CONTROLLER_ERROR = "Exception in model controller run: "


def job_reason(s: Session, job_id: str, download_to: Path) -> str | None:
    """Why the job ended: the server's exception from the job's log, downloaded (with the
    job's server workspace) into download_to; None if it holds none."""
    try:
        out = Path(s.download_job_result(job_id, str(download_to)))
    except Exception:  # a job that never ran has no workspace to download
        return None
    return reason_from_logs(out)


def reason_from_logs(folder: Path) -> str | None:
    errors: list[str] = []
    for log in sorted(folder.rglob("log*.txt")):
        for line in log.read_text(errors="replace").splitlines():
            if CONTROLLER_ERROR in line:
                return line.split(CONTROLLER_ERROR, 1)[1].strip()[:300]
            if " - ERROR - " in line:
                errors.append(line.split(" - ERROR - ", 1)[1].strip()[:300])
    return errors[-1] if errors else None


def _abort_quietly(s: Session, job_id: str) -> None:
    try:
        s.abort_job(job_id)
    except Exception:
        pass  # already ended, or the server is gone: nothing left to abort
