"""Meerkat over NVIDIA FLARE: preparing a run and building its job.

    prepare_run(cfg)            the run folder a deployed run starts from (needs the model once)
    deploy_job(run_dir, {site: [client ids]}, ...)   the FLARE job: server and site entry points

The server runs `fedmeerkat.deploy.serve:serve`, the session of `fedmeerkat run` with the sites
as its transport; each site runs `fedmeerkat.deploy.site:site`, one resident handler over the
clients it hosts; fedmeerkat.deploy.framing is what they exchange. FLARE only moves bytes
(fedmeerkat.deploy.job): one targeted task per site per round, carrying the wire-format plans
of the clients that site hosts.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from fedmeerkat.config import ConfigError
from fedmeerkat.deploy.job import make_job
from fedmeerkat.federated.methods import get_method
from fedmeerkat.runners.prepare import (
    get_mask,
    partition_record,
    prepare,
    split_clients,
    with_solved_noise,
)
from fedmeerkat.runners.run_folder import (
    CONFIG,
    INITIAL_STATE,
    PARTITION,
    RunFolder,
    read_run_config,
    save_state,
)
from fedmeerkat.runners.spaces import build_space


def prepare_run(cfg, quiet: bool = False) -> Path:
    """Make the run folder a deployed run starts from, on a machine that has the model once:
    config.toml, mask.safetensors (computed or given), initial_state.safetensors (the model's
    values at the mask) and partition.json. The server then needs no model; copy the folder
    (config.toml and mask.safetensors) to each site."""
    if get_method(cfg.method).space(cfg.method_settings) != "mask":
        raise ConfigError(f"method: {cfg.method} trains no Meerkat mask; deployment runs the "
                          "methods that do (the server replays mask-sized vectors)")
    if cfg.lr_auto:  # the search trains a pilot on pooled examples: only a simulation has them
        raise ConfigError("lr_auto: simulation only (the search trains on the pooled training "
                          "data); run it with `fedmeerkat run` and deploy with its lr=")
    cfg, folder = RunFolder.open(cfg, resume=False)
    prep = prepare(cfg)
    parts = split_clients(cfg, prep)
    if (solved := with_solved_noise(cfg, [len(p) for p in parts])) is not cfg:
        cfg = solved  # the sigmas for the budget, in config.toml
        folder.write_config(cfg)
    space = build_space(cfg, prep.model, folder.path, resume=False,
                        make_mask=lambda: get_mask(cfg, prep, parts, quiet))
    save_state(folder.file(INITIAL_STATE), space.view.gather(), {"nnz": str(space.mask.nnz)})
    folder.write_json(PARTITION, partition_record(cfg, prep, parts))
    return folder.path


# The keys one site may set for itself (`site_overrides`, `deploy submit --site-set`): which
# data it holds and where its model runs, never what the run computes. data_files: the site's
# own examples (split among its clients; its own test split); device, threads: where and how
# its model runs; eval_batch_size: how its evaluation is batched. Every other key (seed,
# method, lr, downlink, local_steps, dtype, the task, ...) is the run's: a site that differs
# answers plans it was not sent, or another run's.
SITE_KEYS = ("data_files", "device", "threads", "eval_batch_size")


def check_sites(run_dir: str | Path, site_clients: dict[str, list[int]],
                site_overrides: dict[str, list[str]]) -> None:
    """ConfigError unless every client id 0..K-1 of the run (config.toml's `clients`) is on
    exactly one site and every site override sets a SITE_KEYS key of a site that hosts
    clients; checked before a job is built, so nothing is submitted."""
    if not (Path(run_dir) / CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG})")
    k = int(read_run_config(Path(run_dir))["clients"])
    site_of: dict[int, str] = {}
    for site, ids in site_clients.items():
        for c in ids:
            if c in site_of:
                raise ConfigError(f"sites: client {c} is on {site_of[c]} and on {site}; each of "
                                  f"the run's clients 0..{k - 1} goes to exactly one site")
            if not 0 <= c < k:
                raise ConfigError(f"sites: client {c} (on {site}) is not one of the run's "
                                  f"clients 0..{k - 1} (clients={k})")
            site_of[c] = site
    if len(site_of) < k:
        raise ConfigError(f"sites: clients {sorted(set(range(k)) - set(site_of))} are on no "
                          f"site; each of the run's clients 0..{k - 1} goes to exactly one")
    for site, kvs in site_overrides.items():
        if site not in site_clients:
            raise ConfigError(f"site settings for {site!r}, which hosts no clients")
        for kv in kvs:
            key = kv.partition("=")[0].strip()
            if key not in SITE_KEYS:
                raise ConfigError(f"{key}: a site cannot set it (a site sets only "
                                  f"{', '.join(SITE_KEYS)}; the rest is the run's)")


def site_args(run_dir: str | Path, site_clients: dict[str, list[int]],
              site_overrides: dict[str, list[str]] | None = None,
              site_run_dirs: dict[str, str] | None = None, overrides: list[str] | None = None,
              evaluation: str = "sites",
              site_state_dirs: dict[str, str] | None = None) -> dict[str, str]:
    """Each site's argument for `site()` (see deploy_job)."""
    site_overrides = site_overrides or {}
    shared = [s for s in site_clients
              if not any(o.startswith("data_files=") for o in site_overrides.get(s, []))]
    # base64: FLARE reads "{...}" in a job config string as a variable to substitute
    return {s: base64.urlsafe_b64encode(json.dumps({
        "run_dir": str((site_run_dirs or {}).get(s, run_dir)), "clients": ks,
        "overrides": [*(overrides or []), *site_overrides.get(s, [])],
        "evaluate": evaluation == "sites" and bool(shared) and s == shared[0],
        "state_dir": (site_state_dirs or {}).get(s),
    }).encode()).decode() for s, ks in site_clients.items()}


def deploy_job(run_dir: str | Path, site_clients: dict[str, list[int]],
               site_overrides: dict[str, list[str]] | None = None,
               site_run_dirs: dict[str, str] | None = None, python: str = sys.executable,
               round_timeout: int = 3600, interval: float = 0.02, resume: bool = False,
               overrides: list[str] | None = None, evaluation: str = "sites",
               site_state_dirs: dict[str, str] | None = None,
               handler: str = "fedmeerkat.deploy.site:site"):
    """The FLARE job of a prepared run: the server drives it from `run_dir`; each site hosts
    `site_clients[site]` and reads its copy of the run folder (`site_run_dirs`, default the same
    path). `interval` sets FLARE's three polling periods (their defaults cost 2 s a round).

    `resume` continues the run from its checkpoint (server) and the sites' state folders
    (`site_state_dirs`, default RUN_DIR/site_state/SITE in each site's copy); `overrides`
    (RESUMABLE_KEYS, e.g. rounds=20) go to the server and every site. `evaluation`: "sites" or
    "server" (the server loads the model). `handler`: the sites' "module:factory" (a test
    points it at a hostile site; a site imports only allowed modules, site_trainer.load)."""
    if evaluation not in ("sites", "server"):
        raise ValueError(f"evaluation: {evaluation!r}, expected 'sites' or 'server'")
    check_sites(run_dir, site_clients, site_overrides or {})
    overrides = list(overrides or [])
    if overrides and not resume:
        raise ValueError("overrides apply to a resumed run only (the run folder fixes the rest)")
    if resume:
        RunFolder(run_dir).check_resume(overrides)
    args = site_args(run_dir, site_clients, site_overrides, site_run_dirs, overrides,
                     evaluation, site_state_dirs)
    return make_job(Path(run_dir).name.replace(".", "_") or "fedmeerkat", args,
                    "fedmeerkat.deploy.serve:serve", handler,
                    {"run_dir": str(Path(run_dir).resolve()), "site_clients": site_clients,
                     "resume": resume, "overrides": overrides, "evaluation": evaluation},
                    round_timeout=round_timeout, python=python, task_request_interval=interval,
                    task_fetch_interval=interval, task_check_period=interval)
