"""`fedmeerkat deploy ...`: a run on NVIDIA FLARE across machines (docs/deploy.md).

    provision WS --sites a,b [--host H]     startup kits with mutual TLS into WS (kits.json)
    prepare CONFIG [key=value ...]          the run folder (mask, initial values) from a model
    server WS                               the FLARE server, in the foreground (one line
                                            when ready)
    site WS NAME                            one site, in the foreground (one line when
                                            registered)
    submit WS RUN_DIR --site a=0,1 ...      submit the run, follow it until its rounds end;
                                            exit 0 done, 4 done with clients missing, 3 a
                                            round with too few replies, 1 failed, 2 refused
           [--resume [--set rounds=N]]      continue it from its checkpoint and the sites' state
           [--evaluate server|sites]        who evaluates (server: it loads the model)
    abort WS JOB_ID                         abort a job (FLARE's abort_job)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmeerkat.config import ConfigError


def _clients(specs: list[str]) -> dict[str, list[int]]:
    """--site NAME=ID,ID,... (repeated) -> {site: [ids]}; which ids is deploy_job's check."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        site, _, ids = spec.partition("=")
        try:
            clients = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            clients = []
        if not site or not clients:
            raise ConfigError(f"--site {spec!r}: expected NAME=ID,ID,...")
        if site in out:
            raise ConfigError(f"--site {site}: given twice (list all its clients in one --site)")
        out[site] = clients
    return out


def _site_settings(specs: list[str]) -> dict[str, list[str]]:
    """--site-set NAME:KEY=VALUE (repeated) -> {site: ["KEY=VALUE", ...]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        site, _, kv = spec.partition(":")
        if not site or "=" not in kv or not kv.partition("=")[0]:
            raise ConfigError(f"--site-set {spec!r}: expected NAME:KEY=VALUE")
        out.setdefault(site, []).append(kv)
    return out


def cmd_provision(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy.provision import provision

    kits = provision(ns.workspace, ns.project, ns.sites.split(","), host=ns.host,
                     fl_port=ns.fl_port, admin_port=ns.admin_port)
    print(f"server kit: {kits.server}  (copy to {kits.host})")
    for site, kit in kits.sites.items():
        print(f"site kit:   {kit}  (copy to the machine of {site})")
    print(f"admin kit:  {kits.admin}")
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run

    args = list(ns.args)  # [CONFIG.toml] key=value ...
    path = args.pop(0) if args and "=" not in args[0] else None
    out = prepare_run(load_config(path, args), quiet=ns.quiet)
    print(f"run folder: {out}  (copy config.toml and mask.safetensors to every site)")
    return 0


def cmd_server(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy.processes import foreground, ports_open, server_argv
    from fedmeerkat.deploy.provision import load_kits

    kits = load_kits(ns.workspace)
    ports = (kits.fl_port, kits.admin_port)
    # FLARE listens on loopback for a loopback host, else on every interface: either way
    # the ports answer on 127.0.0.1
    return foreground(server_argv(kits.server), kits.server,
                      lambda proc: ports_open("127.0.0.1", ports),
                      lambda pid: f"server ready: {kits.host}, fl port {kits.fl_port}, admin "
                                  f"port {kits.admin_port} (FLARE server pid {pid})")


def cmd_site(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy.processes import client_argv, foreground
    from fedmeerkat.deploy.provision import REGISTERED_FILE, load_kits

    kits = load_kits(ns.workspace)
    if ns.name not in kits.sites:
        raise ConfigError(f"site {ns.name!r} is not in this project ({', '.join(kits.sites)})")
    kit = kits.sites[ns.name]
    registered = kit / REGISTERED_FILE
    registered.unlink(missing_ok=True)  # a previous start's
    return foreground(client_argv(kit, ns.name), kit, lambda proc: registered.exists(),
                      lambda pid: f"site {ns.name} ready: registered with the server at "
                                  f"{kits.host}:{kits.fl_port} (FLARE client pid {pid})")


def cmd_submit(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy import admin
    from fedmeerkat.deploy.meerkat import deploy_job
    from fedmeerkat.deploy.provision import load_kits
    from fedmeerkat.runners.run_folder import CHECKPOINT, FLARE_JOB, METRICS, RunFolder

    run_dir = Path(ns.run_dir).resolve()
    site_clients = _clients(ns.site)
    if ns.set and not ns.resume:
        raise ConfigError("--set changes a resumed run only (prepare fixes the rest)")
    if ns.resume:
        RunFolder(run_dir).check_resume(ns.set)
        if not RunFolder(run_dir).has_checkpoint():
            raise ConfigError(f"{run_dir} holds no {CHECKPOINT}: nothing to resume")
    elif (run_dir / METRICS).exists():
        # a second fresh job would start again from round 0 and append its rounds to the first
        # job's records
        raise ConfigError(f"{run_dir} has run a job already ({METRICS}): continue it with "
                          "--resume, or prepare a new run folder for a fresh run")
    # every check of the sites against the run folder, before anything is submitted
    job = deploy_job(run_dir, site_clients, _site_settings(ns.site_set), interval=ns.interval,
                     resume=ns.resume, overrides=ns.set, evaluation=ns.evaluate)
    kits = load_kits(ns.workspace)
    unknown = sorted(set(site_clients) - set(kits.sites))
    if unknown:
        raise ConfigError(f"--site {unknown[0]}: not a site of this project "
                          f"({', '.join(kits.sites)})")
    jobs = run_dir / FLARE_JOB
    job.export_job(str(jobs))

    def show(r: dict) -> None:
        acc = r.get("test_accuracy")
        print(f"round {r['round']}: train loss {r.get('train_loss')}"
              + (f", test accuracy {acc:.4f}" if acc is not None else "")
              + (f", missing {r['missing']}" if r.get("missing") else "")
              + (f", rejected {sorted(map(int, r['rejected']))}" if r.get("rejected") else ""),
              flush=True)

    with admin.session(kits) as s:
        try:
            admin.wait_for_sites(s, list(site_clients), timeout_s=ns.wait_sites)
        except TimeoutError as e:
            print(f"fedmeerkat: error: {e} (--wait-sites)", file=sys.stderr)
            return admin.EXIT_FAILED
        watch = admin.RunWatch(run_dir)  # before the submit: what is there is not this job's
        job_id = s.submit_job(str(jobs / job.name))
        print(f"job {job_id} submitted (stop it with `fedmeerkat deploy abort {ns.workspace} "
              f"{job_id}`)", flush=True)
        outcome = admin.follow_job(s, job_id, watch, run_dir, ns.timeout, on_record=show)
    if outcome.code in (admin.EXIT_OK, admin.EXIT_PARTIAL):
        print(outcome.line, flush=True)
    else:
        print(f"fedmeerkat: error: {outcome.line}", file=sys.stderr, flush=True)
    return outcome.code


def cmd_abort(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy import admin
    from fedmeerkat.deploy.provision import load_kits

    with admin.session(load_kits(ns.workspace)) as s:
        try:
            info = admin.abort(s, ns.job_id)
        except Exception as e:  # FLARE's errors for an unknown or malformed id: one line
            print(f"fedmeerkat: error: job {ns.job_id}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 1
    print(f"job {ns.job_id}: {info}")
    return 0


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default but the empty ones (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    fmt = {"formatter_class": _Defaults}
    d = sub.add_parser("deploy", help="run on NVIDIA FLARE across machines (docs/deploy.md)",
                       **fmt)
    ds = d.add_subparsers(dest="deploy_cmd", required=True)
    p = ds.add_parser("provision", help="startup kits with mutual TLS", **fmt)
    p.add_argument("workspace", help="folder for the kits (created owner-only)")
    p.add_argument("--sites", required=True, help="site names, comma-separated (letters, "
                   "digits, '-', '_')")
    p.add_argument("--host", default="127.0.0.1", help="the server's address as sites reach it")
    p.add_argument("--project", default="fedmeerkat", help="FLARE project name")
    p.add_argument("--fl-port", type=int, default=8002, help="the server's port for sites")
    p.add_argument("--admin-port", type=int, default=8003, help="the server's port for submit")
    p.set_defaults(fn=cmd_provision)
    q = ds.add_parser("prepare", help="a deployable run folder (needs the model once)", **fmt)
    q.add_argument("args", nargs="*", help="[CONFIG.toml] [key=value ...] (out= names it)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(fn=cmd_prepare)
    s = ds.add_parser("server", help="start the FLARE server from its kit (foreground; one "
                      "line when ready)", **fmt)
    s.add_argument("workspace")
    s.set_defaults(fn=cmd_server)
    c = ds.add_parser("site", help="start one site from its kit (foreground; one line when "
                      "registered)", **fmt)
    c.add_argument("workspace")
    c.add_argument("name")
    c.set_defaults(fn=cmd_site)
    j = ds.add_parser("submit", help="submit a prepared run and follow it until its rounds end "
                      "(exit 0 done, 4 done with clients missing, 3 a round too few replies, "
                      "1 failed, 2 refused)", **fmt)
    j.add_argument("workspace")
    j.add_argument("run_dir")
    j.add_argument("--site", action="append", required=True, metavar="NAME=IDS",
                   help="clients a site hosts, e.g. site-1=0,1 (repeat per site; every client "
                   "id of the run on exactly one site)")
    j.add_argument("--site-set", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a setting of one site, e.g. site-2:data_files=/data/mine.csv or "
                   "site-1:device=cuda:1 (keys: data_files, device, threads, eval_batch_size: "
                   "deploy.meerkat.SITE_KEYS)")
    j.add_argument("--resume", action="store_true", help="continue the run from its checkpoint "
                   "(server) and each site's state folder (RUN_DIR/site_state/SITE)")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --resume: change rounds, eval_every, ... (as `fedmeerkat run "
                   "--resume`), at the server and every site")
    j.add_argument("--evaluate", choices=("sites", "server"), default="sites",
                   help="sites: each evaluates on its test data, averaged by size; server: the "
                   "server loads the run's model and task and evaluates")
    j.add_argument("--interval", type=float, default=0.02, help="FLARE polling periods (s)")
    j.add_argument("--wait-sites", type=float, default=120.0, help="seconds to wait for sites")
    j.add_argument("--timeout", type=float, default=86400.0, help="seconds the job may run "
                   "(then it is aborted)")
    j.set_defaults(fn=cmd_submit)
    a = ds.add_parser("abort", help="abort a job (its id: submit's first line)", **fmt)
    a.add_argument("workspace")
    a.add_argument("job_id")
    a.set_defaults(fn=cmd_abort)
