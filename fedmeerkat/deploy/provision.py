"""Provision a FLARE project: signed startup kits with mutual TLS for one server, sites, one admin.

The server participant is named after its host: its certificate's common name is what clients
check when they connect, so a kit provisioned for "127.0.0.1" connects to 127.0.0.1 only.
Each kit gets a `local/log_config.json` at `log_level` (WARNING by default): FLARE logs ~10 INFO
lines per client per round in every process, and the parent and job processes of a site all read
this one file. FL_LOG_LEVEL in the environment or `log_level="INFO"` brings them back.
Each kit also gets a `local/resources.json` whose class allow list (FLARE refuses any job
component not on it) adds the two classes our jobs name: the server's BytesController and the
sites' ClientAPIExecutor (the trainer launcher, not on FLARE's default list).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ORG = "fedmeerkat"
SERVER_CLASSES = ["fedmeerkat.deploy.job.BytesController"]
SITE_CLASSES = ["nvflare.app_common.executors.client_api_executor.ClientAPIExecutor"]


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


def project_yaml(project: str, sites: list[str], host: str = "127.0.0.1", fl_port: int = 8002,
                 admin_port: int = 8003, admin_user: str = "admin@fedmeerkat.local",
                 scheme: str = "grpc") -> str:
    """FLARE `project.yml` (api_version 3): mutual TLS, signed jobs, one project_admin."""
    lines = [
        "api_version: 3",
        f"name: {project}",
        "description: fedmeerkat deployment",
        "participants:",
        f"  - {{name: '{host}', type: server, org: {ORG}, fed_learn_port: {fl_port}, "
        f"admin_port: {admin_port}}}",
        *(f"  - {{name: '{s}', type: client, org: {ORG}}}" for s in sites),
        f"  - {{name: '{admin_user}', type: admin, org: {ORG}, role: project_admin}}",
        "builders:",
        "  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder",
        "    args: {template_file: master_template.yml}",
        "  - path: nvflare.lighter.impl.static_file.StaticFileBuilder",
        f"    args: {{config_folder: config, scheme: {scheme}}}",
        "  - path: nvflare.lighter.impl.cert.CertBuilder",
        "  - path: nvflare.lighter.impl.signature.SignatureBuilder",
    ]
    return "\n".join(lines) + "\n"


def set_log_level(kit: Path, level: str = "WARNING") -> None:
    """Write kit/local/log_config.json: FLARE's default config with the root logger at `level`."""
    local = Path(kit) / "local"
    config = json.loads((local / "log_config.json.default").read_text())
    config["loggers"]["root"]["level"] = level
    (local / "log_config.json").write_text(json.dumps(config, indent=2) + "\n")


def allow_classes(kit: Path, classes: list[str]) -> None:
    """Write kit/local/resources.json: FLARE's default resources with `classes` allowed too."""
    local = Path(kit) / "local"
    resources = json.loads((local / "resources.json.default").read_text())
    allowed = resources.setdefault("class_allow_list", [])
    allowed += [c for c in classes if c not in allowed]
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
    """Write workspace/project.yml and run `nvflare provision` into workspace/<project>/prod_NN."""
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "project.yml").write_text(
        project_yaml(project, sites, host, fl_port, admin_port, admin_user, scheme))
    # The CLI, not the in-process API: provisioning prints, exits on errors and appends to
    # sys.path; a subprocess keeps all of that out of the caller.
    subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p", "project.yml",
                    "-w", str(ws), "--force"], cwd=ws, check=True, timeout=timeout_s,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prod = sorted((ws / project).glob("prod_*"))[-1]  # each provisioning adds prod_NN+1
    kits = Kits(project, host, fl_port, admin_port, prod / host, {s: prod / s for s in sites},
                prod / admin_user, admin_user)
    for kit in (kits.server, *kits.sites.values()):
        set_log_level(kit, log_level)
        allow_classes(kit, SERVER_CLASSES if kit == kits.server else SITE_CLASSES)
    (ws / KITS_FILE).write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(kits).items()}
        | {"sites": {s: str(p) for s, p in kits.sites.items()}}, indent=1))
    return kits


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
