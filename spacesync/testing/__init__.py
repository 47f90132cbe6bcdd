"""The test bed: throwaway Synapse homeservers, a raw Matrix client, waiting, and fault-injecting proxies.

Shipped in the package because `spacesync demo` runs on it; tests and benchmarks use it too."""

from .client import JSON, TestbedRequestError, TestClient, TestUser
from .faults import (
    DelayResponse,
    Drop,
    Fault,
    FaultProxy,
    Hang,
    LoggedRequest,
    Respond,
    Rewrite,
    Rule,
    TcpProxy,
)
from .federation import FederatedPair, join_when_allowed, wait_until_federating
from .homeserver import Synapse, free_port
from .process import spawn_bot
from .waiting import wait_for

__all__ = [
    "JSON",
    "DelayResponse",
    "Drop",
    "Fault",
    "FaultProxy",
    "FederatedPair",
    "Hang",
    "LoggedRequest",
    "Respond",
    "Rewrite",
    "Rule",
    "Synapse",
    "TcpProxy",
    "TestClient",
    "TestUser",
    "TestbedRequestError",
    "free_port",
    "join_when_allowed",
    "spawn_bot",
    "wait_for",
    "wait_until_federating",
]
