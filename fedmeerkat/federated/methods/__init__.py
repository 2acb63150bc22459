"""One module per federated method. Importing this package imports every module in it, and each
registers its `Method` (federated/registry.py): a new method is a new module here."""

from __future__ import annotations

import importlib
import pkgutil

import torch

from fedmeerkat.federated.registry import METHODS, Method, get_method, ordered
from fedmeerkat.federated.server import BaseServer, FedSettings

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Method", "get_method", "make_server", "markdown_table", "ordered"]


def make_server(method: str, settings: FedSettings, theta0: torch.Tensor, client_sizes: list[int],
                *, method_settings=None, calib_grad: torch.Tensor | None = None,
                **runtime_options) -> BaseServer:
    """The server of `method`, with its settings (default: the method's defaults).
    `calib_grad` is the mask's mean calibration gradient (GradIP); `runtime_options` are what
    the trainable space adds (full-fedzo's dense layout)."""
    m = get_method(method)
    opts = m.settings() if method_settings is None else method_settings
    server = m.server(settings, theta0, client_sizes, **m.server_options(opts), **runtime_options)
    server.calib_grad = calib_grad
    return server


def markdown_table() -> str:
    """The README's methods table."""
    rows = ["| `method=` | what | space | downlinks | keys | reference |",
            "|---|---|---|---|---|---|"]
    for m in ordered():
        keys = ", ".join(f"`{k}`" for k in m.keys()) or "-"
        rows.append(f"| `{m.name}` | {m.summary} | {'/'.join(m.spaces)} | "
                    f"{', '.join(m.downlinks)} | {keys} | {m.reference} |")
    return "\n".join(rows)
