"""The command registry: name, usage line, help text and handler; `help` and did-you-mean come from it."""

from __future__ import annotations

import difflib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..model import RoomID, UserID
from .format import Reply, code, esc, line, listing

if TYPE_CHECKING:
    from .services import Services as App

__all__ = [
    "PREFIX",
    "REGISTRY",
    "Command",
    "CommandError",
    "Context",
    "Registry",
    "UsageError",
    "command",
    "subcommand",
]

PREFIX = "!spacesync"
FAMILY_ORDER = ("general", "status", "settings", "moderation", "batches")

Handler = Callable[["Context", list[str]], Awaitable["Reply | str"]]


class CommandError(Exception):
    """A clear one-line answer to the issuer: bad input, an unknown batch, a refused change."""


class UsageError(CommandError):
    """The arguments do not fit the command: the reply shows its usage line."""

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or "")
        self.detail = detail


@attrs.define
class Command:
    name: str
    usage: str
    """Arguments after the prefix, e.g. `exempt add|remove|list [@user]`."""
    summary: str
    help: str
    handler: Handler
    family: str = ""

    @property
    def usage_line(self) -> str:
        return f"{PREFIX} {self.usage}"


@attrs.define
class Context:
    """One command being run: who asked, where, and the app to act through."""

    app: App
    room_id: RoomID
    event_id: str
    sender: UserID
    command: Command


class Registry:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def command(
        self, name: str, *, usage: str | None = None, summary: str, help: str = "", family: str = ""
    ) -> Callable[[Handler], Handler]:
        """Register the decorated coroutine `handler(ctx, args)` as command `name`."""

        def register(handler: Handler) -> Handler:
            if name in self._commands:
                raise ValueError(f"command {name!r} registered twice")
            self._commands[name] = Command(name, usage or name, summary, help.strip(), handler, family)
            return handler

        return register

    def get(self, name: str) -> Command | None:
        return self._commands.get(name.lower())

    def names(self) -> list[str]:
        return sorted(self._commands)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)

    def suggest(self, name: str) -> str | None:
        """The closest command name, if one is close enough to be a typo."""
        return closest(name, self.names())

    def unknown(self, name: str) -> str:
        guess = self.suggest(name)
        shown = name if len(name) <= 40 else name[:39] + "…"
        if guess:
            return f"Unknown command '{shown}'. Did you mean '{guess}'?"
        return f"Unknown command '{shown}'. Send '{PREFIX} help' for the list."

    def help(self, name: str | None = None) -> Reply:
        """The list of commands, or one command's usage and help."""
        if name:
            cmd = self.get(name)
            if cmd is None:
                raise CommandError(self.unknown(name))
            text = f"Usage: {cmd.usage_line}\n{cmd.summary}" + (f"\n\n{cmd.help}" if cmd.help else "")
            html = f"<p>Usage: {code(cmd.usage_line)}<br>{esc(cmd.summary)}</p>"
            if cmd.help:
                html += "".join(f"<p>{esc(p).replace(chr(10), '<br>')}</p>" for p in cmd.help.split("\n\n"))
            return Reply(text, html)
        families: dict[str, list[Command]] = {f: [] for f in FAMILY_ORDER}
        for cmd in self:
            families.setdefault(cmd.family or "other", []).append(cmd)
        lines = [
            line(f"{cmd.usage} — {cmd.summary}", f"{code(cmd.usage)} — {esc(cmd.summary)}")
            for family in families.values()
            for cmd in family
        ]
        return listing(
            line(
                f"spacesync commands (prefix {PREFIX} or !ss; '{PREFIX} help <command>' for details):",
                f"spacesync commands (prefix {code(PREFIX)} or {code('!ss')}; "
                f"{code(PREFIX + ' help <command>')} for details):",
            ),
            lines,
            limit=None,
        )


def closest(word: str, choices: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def subcommand(args: list[str], choices: Sequence[str]) -> tuple[str, list[str]]:
    """Split `add @x` into ('add', ['@x']); UsageError (with a guess) for a missing or unknown one."""
    if not args:
        raise UsageError(f"Choose one of {', '.join(choices)}.")
    sub = args[0].lower()
    if sub not in choices:
        guess = closest(sub, choices)
        hint = f" Did you mean '{guess}'?" if guess else ""
        raise UsageError(f"Unknown subcommand '{args[0][:40]}'.{hint}")
    return sub, args[1:]


def expect(args: Sequence[Any], low: int, high: int | None = None) -> None:
    """UsageError unless `low <= len(args) <= high`."""
    high = low if high is None else high
    if len(args) < low:
        raise UsageError("Missing argument.")
    if len(args) > high:
        extra = " ".join(str(a) for a in args[high:])
        raise UsageError(f"Unexpected argument '{extra[:60]}'.")


REGISTRY = Registry()
command = REGISTRY.command


@command(
    "help",
    usage="help [command]",
    family="general",
    summary="list the commands, or show one command's usage and help",
    help="Without an argument, lists every command with its usage line. "
    "With a command name, shows that command's usage and what it does.",
)
async def _help(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0, 1)
    return REGISTRY.help(args[0] if args else None)
