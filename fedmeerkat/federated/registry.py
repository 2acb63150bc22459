"""The methods, each declared once by its own module under federated/methods/.

A `Method` names everything the rest of the package needs to run it: its server (a transport-free
state machine), its client routine, the trainable space it moves (a Meerkat mask, a LoRA
adapter or every weight), the downlinks its update can travel by, and the typed settings it
reads from the run config. The config's list of methods and its method-specific keys and
checks, `fedmeerkat config`, `fedmeerkat methods` and the README's methods table all derive from
here. Adding a method is one module under federated/methods/ that calls `register` (see
random_select.py, the smallest), plus its tests. Import the registry's lookups from
`fedmeerkat.federated.methods`, which imports (and so registers) every method first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from fedmeerkat.federated.client import run_client
from fedmeerkat.federated.server import DOWNLINKS, BaseServer

SPACES = ("mask", "lora", "dense")  # kinds of trainable space (runners/spaces.py builds them)


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that reads no method-specific config key."""


@dataclass(frozen=True)
class Method:
    name: str  # the config's `method=`
    summary: str  # one line for tables and `fedmeerkat methods`
    reference: str  # where it comes from (paper algorithm, baseline table, article)
    server: type[BaseServer]
    settings: type = NoSettings  # dataclass of the config keys it reads (fedmeerkat.options)
    # settings -> the client routine, called as routine(state, plan, model, *, eps, lr,
    # batch_size, weight_decay, on_step) and returning the reply to send
    client: Callable[[Any], Callable[..., Any]] = lambda settings: run_client
    space: Callable[[Any], str] = lambda settings: "mask"  # settings -> one of `spaces`
    spaces: tuple[str, ...] = ("mask",)  # the kinds of SPACES it can train
    # settings -> keyword arguments of the server's constructor beyond (settings, theta0, sizes)
    server_options: Callable[[Any], dict[str, Any]] = lambda settings: {}
    order: int = 100  # position in lists and tables

    @property
    def downlinks(self) -> tuple[str, ...]:
        """Which downlinks can carry its update (declared by its server, which checks it)."""
        return self.server.downlinks

    def keys(self) -> list[str]:
        """The config keys this method reads."""
        return [f.metadata.get("key") or f.name for f in fields(self.settings)]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    bad = (set(method.downlinks) - set(DOWNLINKS)) | (set(method.spaces) - set(SPACES))
    if bad or not method.downlinks or not method.spaces:
        raise ValueError(f"method {method.name!r}: unknown downlinks or spaces {sorted(bad)}")
    METHODS[method.name] = method
    return method


def ordered() -> list[Method]:
    return sorted(METHODS.values(), key=lambda m: m.order)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise NotImplementedError(f"method {name!r} is not available; choose one of "
                                  f"{', '.join(m.name for m in ordered())}")
    return METHODS[name]
