"""Versioned schema migrations, one module per version, registered in order on one upgrade table."""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(version_table_name="spacesync_version", database_name="spacesync")

_Migration = TypeVar("_Migration", bound=Callable[..., Awaitable[Any]])


def migration(description: str) -> Callable[[_Migration], _Migration]:
    """Register the next version on the upgrade table; mautrix's own decorator returns a union mypy cannot call."""

    def register(fn: _Migration) -> _Migration:
        upgrade_table.register(fn, description=description)
        return fn

    return register


from . import (  # noqa: E402,F401  (each registers itself)
    v01_initial,
    v02_released_levels,
    v03_member_history,
    v04_parked,
    v05_command_queue,
    v06_localrules,
    v07_spacewide,
    v08_appservice,
)
