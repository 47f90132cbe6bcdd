"""The admin-command queue: commands wait in the database, so a crash or a takeover loses none."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from ..model import RoomID
from ..store import Store
from .health import DatabaseHealth

CommandHandler = Callable[[RoomID, dict[str, Any]], Awaitable[None]]


class CommandQueue:
    """Admin-room commands, one at a time and in order, off the /sync loop (a long `sync` must not stall
    triggers). Those left by a crash or by the previous leader run first."""

    def __init__(self, store: Store, health: DatabaseHealth) -> None:
        self.store = store
        self.health = health
        self.handler: CommandHandler | None = None
        self.waiting = asyncio.Event()

    async def put(self, room_id: RoomID, event: dict[str, Any]) -> None:
        if await self.store.queue_command(room_id, event):
            self.waiting.set()

    async def run(self) -> None:
        while True:
            self.waiting.clear()
            pending = await self.health.call("read queued commands", self.store.pending_commands)
            for command in pending:
                if self.handler is not None:
                    await self.health.call("handle a command", partial(self.handler, command.room_id, command.event))
                await self.health.call("finish a command", partial(self.store.command_done, command.event_id))
            if not pending:
                await self.waiting.wait()
