"""The admin-room command layer: `!spacesync <command>` (or `!ss`) from admins, answered with notices.

`CommandHandler(app).handle(room_id, event)` takes every message event of the admin room. It obeys only
admins (decided on the event's `sender`, never a display name), ignores edits, notices and the bot's own
messages, and handles each event id once, even across restarts. Each command gets at most one reply: the
reply's transaction id comes from the command's event id, so a reply sent again after a crash is one the
homeserver already has.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from ..matrix.crypto import DECRYPTED_KEY
from ..matrix.errors import StateUnknown
from ..model import RoomID, UserID
from ..refs import RefError
from ..store import unreachable
from . import batches, lists, lockdown, people, settings, status, trust  # noqa: F401  (registers the commands)
from .format import Reply, code, esc, one_line
from .parser import ParseError, command_text, is_edit, parse_command
from .registry import PREFIX, REGISTRY, CommandError, Context, Registry, UsageError

if TYPE_CHECKING:
    from .services import Services as App

__all__ = [
    "REFUSAL",
    "REGISTRY",
    "UNVERIFIED_REFUSAL",
    "CommandHandler",
    "Registry",
    "Reply",
    "identity_changed",
]

log = structlog.get_logger("spacesync.commands")

REFUSAL = "Sorry, only spacesync admins can use commands here."
ADMIN_UNKNOWN = (
    "⚠ The command was not run: the admin room's power levels could not be read, so whether you are an admin is "
    "unknown. Send it again in a moment."
)
UNVERIFIED_REFUSAL = (
    "Sorry, this command came from a device you have not verified, and admin.require_verified_device is set: "
    "verify this device (cross-sign it from one of your verified sessions) and send the command again."
)


def identity_changed(user: str) -> str:
    return (
        f"Sorry, {user}'s cross-signing identity (master key) changed since I first saw it, and "
        "admin.require_verified_device is set: another admin who checked with them can trust the new identity "
        f"with '{PREFIX} trust {user}'."
    )


INTERRUPTED = (
    "⚠ This command was cut short (spacesync stopped, or another instance took over) and is not run "
    f"again: check with '{PREFIX} status' and send it again if it is still needed."
)


def reply_txn_id(event_id: str) -> str:
    """The same for every reply to one command: the homeserver keeps one event per transaction id."""
    return "spacesync-reply-" + hashlib.sha256(event_id.encode()).hexdigest()[:32]


class CommandHandler:
    """Reads commands from the admin room and answers each with one notice, as a reply."""

    def __init__(self, app: App, registry: Registry = REGISTRY) -> None:
        self.app = app
        self.registry = registry

    async def restore(self) -> None:
        """Settings kept across restarts (pause)."""
        await settings.restore_paused(self.app)

    async def handle(self, room_id: RoomID, event: Mapping[str, Any]) -> None:
        """Handle one event. A failing command is logged and answered with one line; only a database out of
        reach before the command started is raised, so that the caller retries it later."""
        try:
            await self._handle(room_id, event)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if unreachable(e):
                raise
            log.warning("command handling failed", error=f"{type(e).__name__}: {e}", exc_info=True)

    async def _handle(self, room_id: RoomID, event: Mapping[str, Any]) -> None:
        app = self.app
        if not isinstance(event, Mapping) or event.get("type") != "m.room.message":
            return
        if app.admin_room is None or room_id != app.admin_room:
            return
        sender, event_id, content = event.get("sender"), event.get("event_id"), event.get("content")
        if not isinstance(sender, str) or not isinstance(event_id, str) or not isinstance(content, Mapping):
            return
        if sender == app.matrix.user_id or content.get("msgtype") == "m.notice" or is_edit(content):
            return
        if "redacted_because" in (event.get("unsigned") or {}):
            return
        text = command_text(content)
        if text is None:
            return
        if not await app.store.mark_handled(event_id):
            if await app.store.command_waiting(event_id):
                # Started before a crash or a takeover, its reply maybe not sent: answer it, never rerun it.
                log.warning("command cut short: not run again", event_id=event_id, sender=sender)
                await self._reply(room_id, event_id, Reply.plain(INTERRUPTED))
                return
            log.info("command already handled", event_id=event_id)
            return
        user = UserID(sender)
        try:
            admin = await app.is_admin(user)
        except StateUnknown as e:
            log.warning("command not run: cannot tell whether the sender is an admin", sender=sender, error=str(e))
            await self._reply(room_id, event_id, Reply.plain(ADMIN_UNKNOWN))
            return
        if not admin:
            log.warning("command refused: not an admin", sender=sender, event_id=event_id)
            await self._reply(room_id, event_id, Reply.plain(REFUSAL))
            return
        if app.config.admin.require_verified_device and not self._verified(event):
            changed = self._identity_changed(event)
            log.warning(
                "command refused: " + ("the sender's master key changed" if changed else "unverified device"),
                sender=sender,
                event_id=event_id,
            )
            await self._reply(room_id, event_id, Reply.plain(identity_changed(user) if changed else UNVERIFIED_REFUSAL))
            return
        reply = await self.run(room_id, event_id, user, text)
        await self._reply(room_id, event_id, reply)

    @staticmethod
    def _verified(event: Mapping[str, Any]) -> bool:
        """Sent encrypted from a device its owner cross-signed under the master key the bot pinned (a plaintext
        message has no device to trust)."""
        info = event.get(DECRYPTED_KEY)
        return isinstance(info, Mapping) and info.get("verified") is True

    @staticmethod
    def _identity_changed(event: Mapping[str, Any]) -> bool:
        """Sent from a device cross-signed under another master key than the one the bot pinned."""
        info = event.get(DECRYPTED_KEY)
        return isinstance(info, Mapping) and info.get("identity_changed") is True

    async def run(self, room_id: RoomID, event_id: str, sender: UserID, text: str) -> Reply:
        """Parse and execute one admin's command text; every outcome is a reply."""
        name = ""
        try:
            parsed = parse_command(text)
            if parsed is None:
                return Reply.plain(f"Not a command. Send '{PREFIX} help' for the list.")
            name = parsed.name
            if not name:
                return self.registry.help()
            cmd = self.registry.get(name)
            if cmd is None:
                return Reply.plain(self.registry.unknown(name))
            log.info("command", sender=sender, command=name, args=list(parsed.args), event_id=event_id)
            ctx = Context(self.app, room_id, event_id, sender, cmd)
            try:
                return Reply.of(await cmd.handler(ctx, list(parsed.args)))
            except UsageError as e:
                detail = f"{e.detail} " if e.detail else ""
                return Reply(f"{detail}Usage: {cmd.usage_line}", f"{esc(detail)}Usage: {code(cmd.usage_line)}")
        except (CommandError, ParseError, RefError) as e:
            return Reply.plain(one_line(e, 500))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning(
                "command failed",
                command=name,
                sender=sender,
                event_id=event_id,
                error=f"{type(e).__name__}: {e}",
                exc_info=True,
            )
            what = f"'{name}' " if name else ""
            return Reply.plain(one_line(f"⚠ The command {what}failed: {type(e).__name__}: {e}", 300))

    async def _reply(self, room_id: RoomID, event_id: str, reply: Reply) -> None:
        reply = reply.clipped()
        try:
            await self.app.matrix.send_notice(
                room_id, reply.text, reply.html, reply_to=event_id, txn=reply_txn_id(event_id)
            )
        except Exception as e:  # a failed answer must never stop the bot
            log.warning("could not answer a command", event_id=event_id, error=f"{type(e).__name__}: {e}")
