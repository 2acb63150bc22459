"""The package's layers only look down, and no module imports itself through others.

Layers (README "Design"), low to high. A module may import its own layer and lower ones:
  0 options                      typed settings helper, no package imports
  1 zo                           mask, z, two-point step, replay: pure torch
  2 models, tasks, data          HF models and surgery, task loaders, partitions
  3 federated                    server/client state machines, messages, method registry
  4 config                       the run config (reads the registry's methods and keys)
  5 runners, deploy              round driver, transports, run folder, export
  6 report, cli                  reports and plots of run folders, the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedmeerkat

LAYER = {"options": 0, "zo": 1, "models": 2, "tasks": 2, "data": 2, "federated": 3,
         "config": 4, "runners": 5, "deploy": 5, "report": 6, "cli": 6}
ROOT = Path(fedmeerkat.__file__).parent


def _imports() -> dict[str, set[str]]:
    """module -> fedmeerkat modules it imports (anywhere in the file, lazy imports included)."""
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[mod] = {n for n in names if n.split(".")[0] == "fedmeerkat" and n != "fedmeerkat"}
    return out


def _layer(mod: str) -> int:
    top = mod.split(".")[1]
    assert top in LAYER, f"{mod}: package {top!r} has no layer; add it to README and this test"
    return LAYER[top]


def test_layers_only_look_down():
    bad = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
           for a, bs in _imports().items() if a != "fedmeerkat" for b in sorted(bs)
           if _layer(b) > _layer(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _imports()
    # a package's __init__ importing its own submodules is not a cycle of meaning
    edges = {a: {b for b in bs if b in graph and not a.startswith(b + ".") and not b.startswith(a + ".")}
             for a, bs in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_lower_layers_take_settings_not_the_run_config():
    """federated/ and below never see RunConfig: they take plain settings objects."""
    readers = [a for a, bs in _imports().items() if a != "fedmeerkat" and _layer(a) <= 3
               and "fedmeerkat.config" in bs]
    assert not readers
    for path in (ROOT / "federated").rglob("*.py"):
        assert "RunConfig" not in path.read_text() and "cfg." not in path.read_text(), path
