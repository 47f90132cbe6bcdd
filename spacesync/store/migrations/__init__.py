"""Versioned schema migrations, one module per version, registered in order on one upgrade table."""

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(version_table_name="spacesync_version", database_name="spacesync")

from . import (  # noqa: E402,F401  (each registers itself)
    v01_initial,
    v02_released_levels,
    v03_member_history,
    v04_parked,
    v05_command_queue,
    v06_localrules,
)
