"""Test-bed helpers beyond the real servers themselves: proxies that inject faults in front of them."""

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

__all__ = [
    "DelayResponse",
    "Drop",
    "Fault",
    "FaultProxy",
    "Hang",
    "LoggedRequest",
    "Respond",
    "Rewrite",
    "Rule",
    "TcpProxy",
]
