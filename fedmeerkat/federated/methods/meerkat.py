"""Meerkat: sparse ZO on a static mask, FedAvg of the replayed virtual paths (paper Algorithm 2;
Algorithm 3 with local_steps=1 and downlink=scalars). The server and client live in
federated/server.py and federated/client.py because every other method builds on them."""

from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import MeerkatServer

METHOD = register(Method(
    "meerkat", server=MeerkatServer, order=0,
    summary="sparse ZO on a static mask (default 1e-3 of the decoder's 2-D weights), FedAvg of "
            "the replayed virtual paths",
    reference="paper Algorithm 2; Algorithm 3 with `local_steps=1 downlink=scalars`"))
