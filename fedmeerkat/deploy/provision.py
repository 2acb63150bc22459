"""Provision a FLARE project: signed startup kits with mutual TLS for one server, sites, one admin.

The server participant is named after its host: its certificate's common name is what clients
check when they connect, so a kit provisioned for "127.0.0.1" connects to 127.0.0.1 only.
Each kit gets a `local/log_config.json` at `log_level` (WARNING by default): FLARE logs ~10 INFO
lines per client per round in every process, and the parent and job processes of a site all read
this one file. FL_LOG_LEVEL in the environment or `log_level="INFO"` brings them back.
Each kit also gets a `local/resources.json` whose class allow list (FLARE refuses any job
component not on it) adds the two classes our jobs name: the server's BytesController and the
sites' ClientAPIExecutor (the trainer launcher, not on FLARE's default list), and each site's
components the one that tells `fedmeerkat deploy site` it has registered.
Names and ports are checked against FLARE's patterns before anything is written; the workspace
and every file holding a private key end up the owner's only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.apis.utils.format_check import type_pattern_mapping as FLARE_PATTERNS

from fedmeerkat.options import InputError

ORG = "fedmeerkat"
SERVER_CLASSES = ["fedmeerkat.deploy.job.BytesController"]
SITE_CLASSES = ["nvflare.app_common.executors.client_api_executor.ClientAPIExecutor"]
# a site's parent writes this file into its kit once registered (deploy.processes.Registered)
REGISTERED = "fedmeerkat.deploy.processes.Registered"
REGISTERED_FILE = "registered.txt"


@dataclass(frozen=True)
class Kits:
    """Startup kit folders of one provisioned project (each has startup/ and local/)."""

    project: str
    host: str
    fl_port: int
    admin_port: int
    server: Path
    sites: dict[str, Path]
    admin: Path
    admin_user: str


# FLARE's patterns (nvflare.apis.utils.format_check), matched whole: FLARE's re.match lets a
# trailing newline through "$". Its client pattern "^[A-Za-z0-9-_]+$" reads "9-_" as a range
# that also passes ":;<=>?@[\]^"; a site name is also a folder name and the NAME of `--site
# NAME=IDS` and `--site-set NAME:KEY=VALUE`, so it must be what that pattern means.
SITE_NAME = r"[A-Za-z0-9_-]+"


def check_project(project: str, sites: list[str], host: str, admin_user: str, fl_port: int,
                  admin_port: int) -> None:
    """InputError naming the first name or port FLARE would not take (or would take only by
    accident of its patterns), before anything is written."""
    for what, value, pattern, rule in (
            ("project", project, FLARE_PATTERNS["job_name"],
             "letters, digits, '.', '_', '-', a letter or digit first"),
            ("host", host, FLARE_PATTERNS["host_name"], "a DNS name or IPv4 address"),
            *(("site", s, SITE_NAME, "letters, digits, '-', '_'") for s in sites),
            ("admin", admin_user, FLARE_PATTERNS["admin"], "an email address")):
        if not re.fullmatch(pattern, value):
            raise InputError(f"{what} name {value!r} is not valid for FLARE ({rule})")
    names = [host, *sites, admin_user]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"name {name!r} is given twice (every site and the server's host "
                             "must differ)")
    for port in (fl_port, admin_port):
        if not 0 < port < 65536:
            raise InputError(f"port {port}: expected 1..65535")


def project_yaml(project: str, sites: list[str], host: str = "127.0.0.1", fl_port: int = 8002,
                 admin_port: int = 8003, admin_user: str = "admin@fedmeerkat.local",
                 scheme: str = "grpc") -> str:
    """FLARE `project.yml` (api_version 3): mutual TLS, signed jobs, one project_admin.
    Serialized, never pasted: a name cannot add keys (`check_project` refuses odd ones first)."""
    return yaml.safe_dump({
        "api_version": 3,
        "name": project,
        "description": "fedmeerkat deployment",
        "participants": [
            {"name": host, "type": "server", "org": ORG, "fed_learn_port": fl_port,
             "admin_port": admin_port},
            *({"name": s, "type": "client", "org": ORG} for s in sites),
            {"name": admin_user, "type": "admin", "org": ORG, "role": "project_admin"},
        ],
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
             "args": {"template_file": "master_template.yml"}},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
             "args": {"config_folder": "config", "scheme": scheme}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }, sort_keys=False)


def set_log_level(kit: Path, level: str = "WARNING") -> None:
    """Write kit/local/log_config.json: FLARE's default config with the root logger at `level`."""
    local = Path(kit) / "local"
    config = json.loads((local / "log_config.json.default").read_text())
    config["loggers"]["root"]["level"] = level
    (local / "log_config.json").write_text(json.dumps(config, indent=2) + "\n")


def allow_classes(kit: Path, classes: list[str], components: list[dict] | None = None) -> None:
    """Write kit/local/resources.json: FLARE's default resources with `classes` allowed too
    and `components` added to the parent process's."""
    local = Path(kit) / "local"
    resources = json.loads((local / "resources.json.default").read_text())
    allowed = resources.setdefault("class_allow_list", [])
    allowed += [c for c in classes if c not in allowed]
    resources.setdefault("components", []).extend(components or [])
    # FLARE's default keeps every server's job store and snapshots in /tmp/nvflare, shared by
    # all deployments on a machine: a (re)started server would mark another deployment's
    # running jobs abandoned and could schedule its submitted ones. Keep them in the kit.
    if "snapshot_persistor" in resources:
        storage = resources["snapshot_persistor"]["args"]["storage"]["args"]
        storage["root_dir"] = str(Path(kit).resolve() / "snapshot-storage")
    for comp in resources.get("components", []):
        if comp.get("id") == "job_manager":
            comp["args"]["uri_root"] = str(Path(kit).resolve() / "jobs-storage")
    (local / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")


def provision(workspace: str | Path, project: str, sites: list[str], host: str = "127.0.0.1",
              fl_port: int = 8002, admin_port: int = 8003,
              admin_user: str = "admin@fedmeerkat.local", scheme: str = "grpc",
              log_level: str = "WARNING", timeout_s: float = 120.0) -> Kits:
    """Write workspace/project.yml and run `nvflare provision` into workspace/<project>/prod_NN.

    The workspace and every file holding a private key are the owner's only (`protect_keys`):
    FLARE writes <project>/state/cert.json, the root CA's key and every participant's, with
    the process umask."""
    check_project(project, sites, host, admin_user, fl_port, admin_port)
    ws = Path(workspace).resolve()
    ws.mkdir(mode=0o700, parents=True, exist_ok=True)
    ws.chmod(0o700)  # also when it existed: it will hold the CA key
    (ws / "project.yml").write_text(
        project_yaml(project, sites, host, fl_port, admin_port, admin_user, scheme))
    # The CLI, not the in-process API: provisioning prints, exits on errors and appends to
    # sys.path; a subprocess keeps all of that out of the caller. Under umask 077 no key is
    # readable by others even while it is being written.
    r = subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p", "project.yml",
                        "-w", str(ws), "--force"], cwd=ws, timeout=timeout_s, umask=0o077,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode:
        why = (r.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise InputError(f"nvflare provision failed (exit {r.returncode}): {why}")
    protect_keys(ws / project)  # a workspace provisioned before, under another umask
    prod = sorted((ws / project).glob("prod_*"))[-1]  # each provisioning adds prod_NN+1
    kits = Kits(project, host, fl_port, admin_port, prod / host, {s: prod / s for s in sites},
                prod / admin_user, admin_user)
    for kit in (kits.server, *kits.sites.values()):
        set_log_level(kit, log_level)
    allow_classes(kits.server, SERVER_CLASSES)
    for kit in kits.sites.values():
        allow_classes(kit, SITE_CLASSES, [{"id": "fedmeerkat_registered", "path": REGISTERED,
                                           "args": {}}])
    (ws / KITS_FILE).write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(kits).items()}
        | {"sites": {s: str(p) for s, p in kits.sites.items()}}, indent=1))
    return kits


def protect_keys(root: Path) -> None:
    """chmod 0600 every file under root holding a private key (PEM "PRIVATE KEY": the kits'
    *.key, state/cert.json) and 0700 every folder from root down to it."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and b"PRIVATE KEY" in path.read_bytes():
            path.chmod(0o600)
            for folder in path.relative_to(root).parents:
                (root / folder).chmod(0o700)


KITS_FILE = "kits.json"


def load_kits(workspace: str | Path) -> Kits:
    """The kits `provision` made in `workspace` (for the `fedmeerkat deploy` commands)."""
    path = Path(workspace) / KITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workspace} holds no {KITS_FILE}: run `fedmeerkat deploy "
                                "provision` first")
    d = json.loads(path.read_text())
    return Kits(d["project"], d["host"], d["fl_port"], d["admin_port"], Path(d["server"]),
                {s: Path(p) for s, p in d["sites"].items()}, Path(d["admin"]), d["admin_user"])
