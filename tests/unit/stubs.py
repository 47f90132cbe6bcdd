"""Stand-ins for the engine's collaborators in unit tests of the observer and the sync loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spacesync.engine.observer import Observer
from spacesync.engine.sync import SyncLoop


class EmptyStore:
    """A database with nothing recorded: no member history, placed bans, owned levels, lockdowns, ACL or policy."""

    async def member_history(self) -> dict:
        return {}

    async def save_member_history(self, rows: dict) -> None:
        pass

    async def placed_bans(self) -> frozenset:
        return frozenset()

    async def owned_levels(self) -> dict:
        return {}

    async def lockdowns(self) -> dict:
        return {}

    async def owned_acl(self) -> dict:
        return {}

    async def owned_policy(self) -> dict:
        return {}


def sync_loop(homeserver: Any, observer: Observer, requested: list[bool]) -> SyncLoop:
    """A sync loop over `observer` whose reconcile requests land in `requested` (True: a full one)."""
    request: Callable[..., None] = lambda full=False: requested.append(full)  # noqa: E731
    return SyncLoop(
        homeserver,
        observer.cache,
        None,  # type: ignore[arg-type]
        observer,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        admin_room=lambda: None,
        request_reconcile=request,
    )
