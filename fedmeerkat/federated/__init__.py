"""The federated algorithms as plain state machines: no transport, no threads."""

from fedmeerkat.federated.client import (
    ClientState,
    LocalModel,
    run_client,
    share_copies,
    sync_client,
)
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.server import BaseServer, FedSettings, MeerkatServer, RoundOutcome

__all__ = ["BaseServer", "ClientReply", "ClientState", "FedSettings", "LocalModel",
           "MeerkatServer", "RoundOutcome", "RoundPlan", "run_client", "share_copies",
           "sync_client"]
