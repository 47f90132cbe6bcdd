"""Versioned schema migrations, one module per version, registered in order on one upgrade table."""

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(version_table_name="spacesync_version", database_name="spacesync")

from . import v01_initial, v02_released_levels, v05_command_queue  # noqa: E402,F401  (each registers itself)
