"""What commands may use of the running service: a narrow interface instead of the whole App, so that
commands depend on the parts they need and the engine can change behind it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..engine.events import RateLimited
    from ..engine.executor import Executor
    from ..engine.observer import Observer
    from ..engine.reconciler import Reconciler
    from ..matrix import MatrixAdapter, StateCache
    from ..matrix.crypto import Crypto
    from ..model import RoomID, UserID
    from ..store import Store


class Services(Protocol):
    """The store, the Matrix adapter, the engine's planner and executor, and the few questions and requests
    commands put to the service. The running App provides it."""

    config: Config
    store: Store
    matrix: MatrixAdapter
    crypto: Crypto
    cache: StateCache
    observer: Observer
    reconciler: Reconciler
    executor: Executor
    admin_room: RoomID | None

    def request_reconcile(self, *, full: bool) -> None: ...

    async def is_admin(self, user_id: UserID) -> bool: ...

    async def rate_limit(self) -> RateLimited | None: ...
