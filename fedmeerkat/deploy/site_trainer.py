"""The resident trainer of one site: a FLARE Client API script, one process for the whole job.

Launched by the site's job process (ClientAPIExecutor, external process, launch_once) as
`python3 -u -m fedmeerkat.deploy.site_trainer --handler MODULE:FACTORY --site-arg STRING`. It
calls `FACTORY(site_name, site_arg)` once, which returns `handle(payload: bytes) -> bytes`, then
answers every task of the job with it. Importing this module does not import nvflare.client.

Names come from a job's config, i.e. from whoever may submit jobs; FLARE vets its own component
classes against the site's allow list, and `load` likewise only imports modules under
ALLOWED_PREFIXES (extend with FEDMEERKAT_DEPLOY_ALLOW="pkg.,other." at a site).
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

ALLOWED_PREFIXES = ("fedmeerkat.",)


def load(name: str) -> Any:
    """The object named "package.module:attribute", from an allowed package only."""
    module, _, attr = name.partition(":")
    extra = tuple(p for p in os.environ.get("FEDMEERKAT_DEPLOY_ALLOW", "").split(",") if p)
    if not attr or not (module + ".").startswith(ALLOWED_PREFIXES + extra):
        raise ValueError(f"{name!r}: not MODULE:ATTRIBUTE under {ALLOWED_PREFIXES + extra}")
    return getattr(importlib.import_module(module), attr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--handler", required=True, help="MODULE:FACTORY")
    ap.add_argument("--site-arg", default="", help="what this site hosts, for the factory")
    args = ap.parse_args()
    import nvflare.client as flare  # ~0.4 s; only in the trainer process
    from nvflare.app_common.abstract.fl_model import FLModel

    flare.init()
    handle = load(args.handler)(flare.get_site_name(), args.site_arg)
    while flare.is_running():
        msg = flare.receive()
        if msg is None:  # the job ended
            break
        flare.send(FLModel(params={"blob": handle(msg.params["blob"])}))


if __name__ == "__main__":
    main()
