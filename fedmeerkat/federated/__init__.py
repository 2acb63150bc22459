"""The federated algorithms as plain state machines: no transport, no threads."""

from fedmeerkat.federated.client import (
    ClientState,
    LocalModel,
    run_client,
    share_copies,
    sync_client,
)
from fedmeerkat.federated.messages import ClientReply, RoundPlan
from fedmeerkat.federated.server import FedSettings, MeerkatServer, RoundOutcome

__all__ = ["ClientReply", "ClientState", "FedSettings", "LocalModel", "MeerkatServer",
           "RoundOutcome", "RoundPlan", "run_client", "share_copies", "sync_client"]
