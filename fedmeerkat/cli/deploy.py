"""`fedmeerkat deploy ...`: a run on NVIDIA FLARE across machines (docs/deploy.md).

    provision WS --sites a,b [--host H]     startup kits with mutual TLS into WS (kits.json)
    prepare CONFIG [key=value ...]          the run folder (mask, initial values) from a model
    server WS                               the FLARE server, in the foreground
    site WS NAME                            one site, in the foreground
    submit WS RUN_DIR --site a=0,1 ...      submit the run, follow it, wait until it ends
           [--resume [--set rounds=N]]      continue it from its checkpoint and the sites' state
           [--evaluate server|sites]        who evaluates (server: it loads the model)
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def _clients(specs: list[str]) -> dict[str, list[int]]:
    out = {}
    for spec in specs:
        site, _, ids = spec.partition("=")
        try:
            out[site] = [int(x) for x in ids.split(",") if x]
        except ValueError:
            raise SystemExit(f"--site {spec!r}: expected NAME=ID,ID,...") from None
        if not site or not out[site]:
            raise SystemExit(f"--site {spec!r}: expected NAME=ID,ID,...")
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


def _exec(argv: list[str], kit: Path) -> int:
    from fedmeerkat.deploy.processes import child_env

    (kit / "transfer").mkdir(exist_ok=True)
    os.chdir(kit)
    os.execvpe(argv[0], argv, child_env())  # the FLARE process replaces this one


def cmd_server(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy.processes import server_argv
    from fedmeerkat.deploy.provision import load_kits

    kit = load_kits(ns.workspace).server
    return _exec(server_argv(kit), kit)


def cmd_site(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy.processes import client_argv
    from fedmeerkat.deploy.provision import load_kits

    kits = load_kits(ns.workspace)
    if ns.name not in kits.sites:
        raise SystemExit(f"site {ns.name!r} is not in this project ({', '.join(kits.sites)})")
    return _exec(client_argv(kits.sites[ns.name], ns.name), kits.sites[ns.name])


def cmd_submit(ns: argparse.Namespace) -> int:
    from fedmeerkat.deploy import admin
    from fedmeerkat.deploy.meerkat import deploy_job
    from fedmeerkat.deploy.provision import load_kits
    from fedmeerkat.runners.run_folder import CHECKPOINT, FLARE_JOB, METRICS, RunFolder

    run_dir = Path(ns.run_dir).resolve()
    site_clients = _clients(ns.site)
    overrides: dict[str, list[str]] = {}
    for spec in ns.site_set:  # SITE:key=value
        site, _, kv = spec.partition(":")
        overrides.setdefault(site, []).append(kv)
    from fedmeerkat.config import ConfigError

    if ns.set and not ns.resume:
        raise ConfigError("--set changes a resumed run only (prepare fixes the rest)")
    if ns.resume:
        RunFolder(run_dir).check_resume(ns.set)
        if not RunFolder(run_dir).has_checkpoint():
            raise ConfigError(f"{run_dir} holds no {CHECKPOINT}: nothing to resume")
    job = deploy_job(run_dir, site_clients, overrides, interval=ns.interval, resume=ns.resume,
                     overrides=ns.set, evaluation=ns.evaluate)
    jobs = run_dir / FLARE_JOB
    job.export_job(str(jobs))
    kits = load_kits(ns.workspace)
    done = threading.Event()

    def follow() -> None:  # metrics.jsonl grows one line per round on the server
        seen = 0
        while not done.wait(1.0):
            path = run_dir / METRICS
            lines = path.read_text().splitlines() if path.exists() else []
            for line in lines[seen:]:
                r = json.loads(line)
                acc = r.get("test_accuracy")
                print(f"round {r['round']}: train loss {r.get('train_loss')}"
                      + (f", test accuracy {acc:.4f}" if acc is not None else ""), flush=True)
            seen = len(lines)

    threading.Thread(target=follow, daemon=True).start()
    t = time.monotonic()
    with admin.session(kits) as s:
        admin.wait_for_sites(s, list(site_clients), timeout_s=ns.wait_sites)
        job_id, meta, _ = admin.run_job(s, jobs / job.name, run_dir / "flare_result",
                                        timeout_s=ns.timeout)
    done.set()
    print(f"job {job_id}: {meta.get('status')} in {time.monotonic() - t:.0f} s; run folder "
          f"{run_dir} (fedmeerkat report / eval / export work on it)")
    return 0 if meta.get("status") == "FINISHED:COMPLETED" else 1


def add_parser(sub) -> None:
    d = sub.add_parser("deploy", help="run on NVIDIA FLARE across machines (docs/deploy.md)")
    ds = d.add_subparsers(dest="deploy_cmd", required=True)
    p = ds.add_parser("provision", help="startup kits with mutual TLS")
    p.add_argument("workspace")
    p.add_argument("--sites", required=True, help="site names, comma-separated")
    p.add_argument("--host", default="127.0.0.1", help="the server's address as sites reach it")
    p.add_argument("--project", default="fedmeerkat")
    p.add_argument("--fl-port", type=int, default=8002)
    p.add_argument("--admin-port", type=int, default=8003)
    p.set_defaults(fn=cmd_provision)
    q = ds.add_parser("prepare", help="a deployable run folder (needs the model once)")
    q.add_argument("args", nargs="*", help="[CONFIG.toml] [key=value ...] (out= names it)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_prepare)
    s = ds.add_parser("server", help="start the FLARE server from its kit (foreground)")
    s.add_argument("workspace")
    s.set_defaults(fn=cmd_server)
    c = ds.add_parser("site", help="start one site from its kit (foreground)")
    c.add_argument("workspace")
    c.add_argument("name")
    c.set_defaults(fn=cmd_site)
    j = ds.add_parser("submit", help="submit a prepared run and follow it to the end")
    j.add_argument("workspace")
    j.add_argument("run_dir")
    j.add_argument("--site", action="append", required=True, metavar="NAME=IDS",
                   help="clients a site hosts, e.g. site-1=0,1 (repeat per site)")
    j.add_argument("--site-set", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="config override at one site, e.g. site-2:data_files=/data/mine.csv "
                   "or site-1:device=cuda:1")
    j.add_argument("--resume", action="store_true", help="continue the run from its checkpoint "
                   "(server) and each site's state folder (RUN_DIR/site_state/SITE)")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --resume: change rounds, eval_every, ... (as `fedmeerkat run "
                   "--resume`), at the server and every site")
    j.add_argument("--evaluate", choices=("sites", "server"), default="sites",
                   help="sites: each evaluates on its test data, averaged by size; server: the "
                   "server loads the run's model and task and evaluates (default sites)")
    j.add_argument("--interval", type=float, default=0.02, help="FLARE polling periods (s)")
    j.add_argument("--wait-sites", type=float, default=120.0, help="seconds to wait for sites")
    j.add_argument("--timeout", type=float, default=86400.0, help="seconds the job may run")
    j.set_defaults(fn=cmd_submit)


