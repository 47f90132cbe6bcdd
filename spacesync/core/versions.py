"""Room-version features, decided by a table rather than by comparing version strings."""

from __future__ import annotations

import attrs


@attrs.frozen
class VersionFeatures:
    restricted: bool
    knock: bool
    knock_restricted: bool
    integer_levels: bool
    creators_privileged: bool
    """Room version 12 (MSC4289): creators have unlimited power and never appear in `users`."""


_TABLE: dict[str, VersionFeatures] = {
    **{v: VersionFeatures(False, False, False, False, False) for v in ("1", "2", "3", "4", "5", "6")},
    "7": VersionFeatures(False, True, False, False, False),
    "8": VersionFeatures(True, True, False, False, False),
    "9": VersionFeatures(True, True, False, False, False),
    "10": VersionFeatures(True, True, True, True, False),
    "11": VersionFeatures(True, True, True, True, False),
    "12": VersionFeatures(True, True, True, True, True),
}

RECOMMENDED_VERSION = "10"
"""What upgrade advice names: the oldest version with every join rule spacesync uses."""


def features(room_version: str | None) -> VersionFeatures | None:
    """The features of a known room version, or None for a version spacesync does not know."""
    if room_version is None:
        return _TABLE["1"]
    return _TABLE.get(room_version)
