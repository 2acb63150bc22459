"""A FLARE job that moves opaque bytes: a server driver talks to one resident handler per site.

Server: `BytesController` imports `driver` ("module:function") and calls
`function(transport, **driver_args)` once; the driver runs every round through
`transport.exchange(round_idx, {site: bytes}) -> {site: bytes}` (fedmeerkat.deploy.transport).
Each exchange sends ONE targeted task per site (a broadcast cannot carry per-site content) and
waits for the callbacks up to a deadline.
Sites: `python -m fedmeerkat.deploy.site_trainer`, launched once per job per site, calls
`handler` ("module:factory") as `factory(site, site_arg)` and answers every task with the returned
`bytes -> bytes` function.

The fedmeerkat package must be installed on the server and the sites: no code travels with the
job (no custom/ folder, so sites need not allow custom code). That is also why the site executor
is built directly rather than through ScriptRunner, which would copy a trainer script into
custom/ under its package path and then launch it by its bare name; ScriptRunner with
launch_external_process=True, launch_once=True, FrameworkType.RAW and ExchangeFormat.RAW builds
exactly this ClientAPIExecutor otherwise.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.client.config import ExchangeFormat
from nvflare.job_config.api import FedJob

from fedmeerkat.deploy.site_trainer import load

TASK = "fedmeerkat_exchange"


class FlareTransport:
    """`Transport` over a running BytesController."""

    def __init__(self, controller: BytesController, sites: list[str], out_dir: Path,
                 round_timeout_s: float):
        self.controller, self.sites, self.out_dir = controller, sites, out_dir
        self.round_timeout_s = round_timeout_s

    def exchange(self, round_idx: int, payloads: dict[str, bytes],
                 timeout_s: float | None = None) -> dict[str, bytes]:
        wait_s = timeout_s or self.round_timeout_s
        # FLARE's task timeout is whole seconds: round up, so FLARE never drops a task we still
        # wait for. A reply after our deadline lands in this call's own dict, never in a later
        # round's; FLARE ignores one after its own.
        timeout = max(1, math.ceil(wait_s))
        # None: a reply without a blob; serve() checks every payload's type (not bytes: rejected)
        replies: dict[str, Any] = {}
        arrived = threading.Condition()

        def on_reply(site: str):
            def callback(model: FLModel) -> None:
                if model.meta.get("client_name") != site:
                    raise RuntimeError(f"reply for {site} came from {model.meta.get('client_name')}")
                # a reply without a blob is kept as None: serve() counts the site's clients as
                # rejected with the reason, where a KeyError here would only reach FLARE's log
                params = model.params if isinstance(model.params, dict) else {}
                with arrived:
                    replies[site] = params.get("blob")
                    arrived.notify_all()
            return callback

        for site, blob in payloads.items():
            self.controller.send_model(task_name=TASK, targets=[site], timeout=timeout,
                                       data=FLModel(params={"blob": blob}, current_round=round_idx),
                                       callback=on_reply(site))
        deadline = time.monotonic() + wait_s
        with arrived:
            while len(replies) < len(payloads):
                if self.controller.abort_signal.triggered:
                    raise RuntimeError("FLARE aborted the job")
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                arrived.wait(min(left, 0.5))  # wakes on each reply; 0.5 s to notice an abort
            return dict(replies)


class BytesController(ModelController):
    """Hands the job to a driver: no model, no persistor, no aggregation."""

    def __init__(self, driver: str, sites: list[str], driver_args: dict | None = None,
                 round_timeout: int = 600, task_check_period: float = 0.02):
        # A site's failed task (e.g. its trainer died: FLARE then fails each of its tasks) is
        # ignored rather than aborting the job: its reply is missing, as a late one, and the
        # driver goes on without it (FLARE's default panics once min_responses is out of reach).
        super().__init__(persistor_id="", ignore_result_error=True,
                         task_check_period=task_check_period)
        self.driver, self.sites, self.driver_args = driver, sites, driver_args
        self.round_timeout = round_timeout

    def run(self) -> None:
        out_dir = Path(self.get_run_dir()) / "fedmeerkat"
        out_dir.mkdir(parents=True, exist_ok=True)
        transport = FlareTransport(self, list(self.sites), out_dir, self.round_timeout)
        load(self.driver)(transport, **(self.driver_args or {}))


class _Params:
    """Top-level keys for an app's config_fed_*.json (FedJob's way to add system settings)."""

    def __init__(self, params: dict):
        self.params = params

    def add_to_fed_job(self, job: FedJob, ctx, **kwargs) -> None:
        job.add_params(self.params, ctx)


def make_job(name: str, sites: dict[str, str], driver: str, handler: str,
             driver_args: dict | None = None, round_timeout: int = 600, python: str = "python3",
             task_request_interval: float = 0.02, task_fetch_interval: float = 0.02,
             task_check_period: float = 0.02) -> FedJob:
    """FedJob for `sites` ({site name: site argument string, e.g. its client ids or data files}).

    The three polling periods are the whole idle cost of a round (FLARE's defaults are 2 s,
    0.5 s and 0.5 s): the server tells sites to ask again after task_request_interval, sites ask
    every task_fetch_interval before the first answer, the controller checks its tasks every
    task_check_period. `python` is how a site's job process launches the trainer.
    """
    job = FedJob(name=name, min_clients=len(sites))
    job.set_app_packages(["fedmeerkat"])
    job.to_server(BytesController(driver, list(sites), driver_args, round_timeout,
                                  task_check_period), id="controller")
    job.to_server(_Params({"server": {"task_request_interval": task_request_interval}}))
    for site, arg in sites.items():
        trainer = ClientAPIExecutor(
            execution_mode=ExecutionMode.EXTERNAL_PROCESS, launch_once=True,
            command=[python, "-u", "-m", "fedmeerkat.deploy.site_trainer", "--handler", handler,
                     "--site-arg", arg],
            params_exchange_format=ExchangeFormat.RAW, server_expected_format=ExchangeFormat.RAW,
            train_task_name=TASK)
        job.to(trainer, site, tasks=[TASK])
        job.to(_Params({"default_task_fetch_interval": task_fetch_interval}), site)
    return job
