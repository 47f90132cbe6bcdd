"""The one place that lists how the test homeserver differs from a stock Synapse (1.163's shipped defaults),
each with its reason. docs/testing.md shows the same table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["FEDERATION_DEVIATIONS", "MSC4293_DEVIATION", "STOCK_DEVIATIONS", "Deviation"]


@attrs.frozen
class Deviation:
    """One setting in which the test homeserver differs from a stock Synapse, and why."""

    value: Any
    reason: str


_UNLIMITED: Final[Mapping[str, float]] = {"per_second": 100_000, "burst_count": 1_000_000}

STOCK_DEVIATIONS: Final[Mapping[str, Deviation]] = {
    "signing_key": Deviation("(generated)", "inline, so Synapse writes no key file of its own"),
    "trusted_key_servers": Deviation([], "no notary server: the test bed never leaves loopback"),
    "suppress_key_server_warning": Deviation(True, "goes with trusted_key_servers: []"),
    "enable_media_repo": Deviation(False, "no test uploads media: faster start, no media store"),
    "bcrypt_rounds": Deviation(4, "registration in 13 ms instead of 255 ms; tests register hundreds of accounts"),
    "registration_shared_secret": Deviation(
        "(random)", "accounts are registered through the admin API; also makes the test bed's admin user"
    ),
    "rc_login": Deviation(
        {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
        "tests log accounts in from one address (127.0.0.1) far more often than 0.003/s with a burst of 5",
    ),
}
"""Every way the test homeserver differs from Synapse's shipped defaults (besides what a config must name:
server name, listeners, database, logging, and `report_stats`). Rate limits are otherwise stock: a test that
needs speed exempts the accounts it names through the admin API (`Synapse.exempt`), as an operator would.
Federating servers add `FEDERATION_DEVIATIONS`; `msc4293=True` adds MSC4293_DEVIATION."""

FEDERATION_DEVIATIONS: Final[Mapping[str, Deviation]] = {
    "tls_certificate_path": Deviation("(self-signed)", "a certificate for IP 127.0.0.1, made with openssl"),
    "tls_private_key_path": Deviation("(its key)", "goes with the certificate"),
    "federation_verify_certificates": Deviation(False, "the certificate is self-signed"),
    "ip_range_blacklist": Deviation([], "loopback is blocked by default"),
    "federation_ip_range_blacklist": Deviation([], "loopback is blocked by default"),
    "federation_domain_whitelist": Deviation("(the two servers)", "nothing else is reachable anyway"),
    "rc_federation": Deviation(
        {"window_size": 1000, "sleep_limit": 1_000_000, "sleep_delay": 0, "reject_limit": 1_000_000,
         "concurrent": 1_000_000},
        "a test floods its peer with a whole world's joins in seconds",
    ),
    "federation": Deviation(
        {"destination_min_retry_interval": "1s", "destination_max_retry_interval": "5s"},
        "a stopped peer is started again within a test: stock backs off for minutes",
    ),
}  # fmt: skip
"""Settings that let two servers on loopback federate. Unsafe in production: see ``testing.federation``."""

MSC4293_DEVIATION: Final = Deviation(
    {"msc4293_enabled": True}, "only tests about the unstable flag: a ban's redact_events makes Synapse redact"
)
