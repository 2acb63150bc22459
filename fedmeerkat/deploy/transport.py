"""What a server-side driver sees of the deployment: sites, an output folder, and exchange().

No nvflare import here, so that a round driver can type against `Transport` without FLARE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Transport(Protocol):
    sites: list[str]  # the job's sites, in a fixed order
    out_dir: Path  # server-side folder that comes back with the job's result

    def exchange(self, round_idx: int, payloads: dict[str, bytes],
                 timeout_s: float | None = None) -> dict[str, bytes]:
        """Send payloads[site] to each named site, return the replies that arrived in time.

        A site missing from the result did not answer within timeout_s (the job's round timeout
        by default); its late reply is dropped.
        """
        ...
