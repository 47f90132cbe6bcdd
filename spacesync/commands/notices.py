"""Notices the bot posts on its own: a finished batch, a held mass action, grouped and named."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from ..engine.events import RateLimited
from ..model import EVICTIONS, Action, ActionKind, Cause, LeftBehind, RoomID, UserID
from ..store.journal import Entry, Status
from .format import Line, Reply, code, duration, esc, line, listing, one_line, plural

RoomName = Callable[[RoomID], str]

_DONE = {
    ActionKind.KICK: "kicked",
    ActionKind.BAN: "banned",
    ActionKind.UNBAN: "unbanned",
    ActionKind.INVITE: "invited",
    ActionKind.SET_POWER_LEVELS: "updated power levels",
    ActionKind.SET_JOIN_RULES: "restricted the join rule",
    ActionKind.SET_SPACE_CHILD: "re-pointed the Space's child",
    ActionKind.SET_SERVER_ACL: "updated the server ACL",
    ActionKind.SET_POLICY_SERVER: "updated the policy server",
    ActionKind.REDACT: "redacted the messages of",
}
_TRIGGERS = {"sync": "after a change in a Space", "reconcile": "scheduled check", "command": "!spacesync sync"}
NAMES_SHOWN = 5


def _rooms(rooms: Sequence[RoomID], name: RoomName) -> str:
    names = sorted(name(r) for r in rooms)
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def _verb(action: Action) -> str:
    if action.kind is ActionKind.SET_JOIN_RULES and action.cause == Cause.LOCKDOWN:
        return f"locked down (join rule {(action.content or {}).get('join_rule')})"
    if action.kind is ActionKind.SET_JOIN_RULES and action.cause == Cause.UNLOCK:
        return "restored the join rules from before the lockdown"
    return _DONE.get(action.kind, action.kind.value)


def _grouped(actions: Sequence[Action], name: RoomName) -> list[Line]:
    """One line per (what, whom): 'kicked @alice in 4 rooms: general, random, …'."""
    groups: dict[tuple[ActionKind, UserID | None, str], list[RoomID]] = defaultdict(list)
    for action in actions:
        groups[(action.kind, action.user_id, _verb(action))].append(action.room_id)
    lines = []
    for (_kind, user, verb), rooms in sorted(groups.items(), key=lambda g: (g[0][0].value, g[0][1] or "", g[0][2])):
        where = f"in {plural(len(rooms), 'room')}: {_rooms(rooms, name)}"
        if user:
            lines.append(line(f"{verb} {user} {where}", f"{esc(verb)} {code(user)} {esc(where)}"))
        else:
            lines.append(line(f"{verb} {where}"))
    return lines


def batch_summary(
    batch: str,
    trigger: str,
    entries: Sequence[Entry],
    name: RoomName,
    left_behind: Sequence[LeftBehind] = (),
    redacted: Mapping[RoomID, int] | None = None,
) -> Reply:
    """What one batch did, grouped by action and user, with its failures, the rooms where its users had to be
    left in place (and why), the messages it redacted, and how to undo it."""
    done = [e.action for e in entries if e.status is Status.DONE]
    failed = [e for e in entries if e.status is Status.FAILED]
    parked = [e for e in entries if e.status is Status.PARKED]
    superseded = [e for e in entries if e.status is Status.SUPERSEDED]
    why = _TRIGGERS.get(trigger, trigger)
    title = f"Batch {batch} finished ({why}): {plural(len(done), 'action')} done"
    if failed:
        title += f", {len(failed)} failed"
    if superseded:
        title += f", {len(superseded)} superseded"
    if left_behind:
        title += f", {len(left_behind)} left in place"
    if parked:
        title += f", {len(parked)} parked (!spacesync retry {batch})"
    lines = _grouped(done, name)
    if any(e.action.kind is ActionKind.REDACT for e in entries):
        counts = redacted or {}
        busiest = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:NAMES_SHOWN]
        where = ", ".join(f"{name(r)}: {n}" for r, n in busiest if n)
        total = sum(counts.values())
        lines.append(
            line(f"{plural(total, 'message')} redacted" + (f" ({where})" if where else "") + "; redactions are final")
        )
    for entry in failed[:NAMES_SHOWN]:
        what = f"{entry.action.kind.value} {entry.action.user_id or ''}".strip()
        lines.append(line(f"failed: {what} in {name(entry.action.room_id)}: {one_line(entry.error, 160)}"))
    if len(failed) > NAMES_SHOWN:
        lines.append(line(f"… {len(failed) - NAMES_SHOWN} more failures (!spacesync audit)"))
    lines.extend(_superseded(superseded, name))
    for item in left_behind[:NAMES_SHOWN]:
        verb = f"not {_DONE.get(item.kind, item.kind.value)}"
        room = name(item.room_id)
        lines.append(
            line(
                f"{verb}: {item.user_id} in {room}: {item.why}",
                f"{esc(verb)}: {code(item.user_id)} in {esc(room)}: {esc(item.why)}",
            )
        )
    if len(left_behind) > NAMES_SHOWN:
        lines.append(line(f"… {len(left_behind) - NAMES_SHOWN} more left in place (!spacesync whois <user>)"))
    reply = listing(title, lines, hint=f"!spacesync batch {batch} lists them all")
    if any(a.kind in EVICTIONS or a.kind is ActionKind.SET_POWER_LEVELS or a.cause == Cause.LOCKDOWN for a in done):
        hint = f"Undo: !spacesync undo {batch}"
        reply = Reply(f"{reply.text}\n{hint}", f"{reply.html}<p>Undo: {code(f'!spacesync undo {batch}')}</p>")
    return reply


def _superseded(entries: Sequence[Entry], name: RoomName) -> list[Line]:
    """One line per reason the world no longer called for entries: '2 superseded: @u rejoined the Space (kick in
    general, random)'. Not sent, so nothing of them is to undo."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry.error or "no longer planned"].append(entry)
    lines = []
    for why, group in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))[:NAMES_SHOWN]:
        kinds = ", ".join(sorted({e.action.kind.value for e in group}))
        where = _rooms([e.action.room_id for e in group], name)
        text = f"{len(group)} superseded: {one_line(why, 160)} ({kinds} in {where}), not sent"
        lines.append(line(text))
    if len(groups) > NAMES_SHOWN:
        lines.append(line(f"… {len(groups) - NAMES_SHOWN} more reasons for superseded actions (!spacesync audit)"))
    return lines


def _window(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return plural(int(seconds // 3600), "hour")
    if seconds >= 60 and seconds % 60 == 0:
        return plural(int(seconds // 60), "minute")
    return f"{seconds:g} s"


def held_notice(
    batch: str,
    space: str,
    held: Sequence[Action],
    limit: int,
    name: RoomName,
    *,
    window_s: float | None = None,
    recent: int = 0,
) -> Reply:
    """A mass action waiting for a moderator: who, where, and the two commands that decide it."""
    users = sorted({a.user_id for a in held if a.user_id})
    shown = ", ".join(users[:NAMES_SHOWN]) + (
        f" and {len(users) - NAMES_SHOWN} more" if len(users) > NAMES_SHOWN else ""
    )
    rooms = sorted({a.room_id for a in held})
    over = f"over the limit of {limit}"
    if window_s is not None:
        over += f" users within {_window(window_s)}"
        if recent:
            over += f" ({recent} already evicted)"
    text = (
        f"⚠ Held batch {batch}: {len(held)} evictions of {plural(len(users), 'user')} ({shown}) "
        f"from {plural(len(rooms), 'room')} of Space {space}, {over}.\n"
        f"Review with !spacesync plan, then !spacesync confirm {batch} or !spacesync cancel {batch}."
    )
    html = (
        f"<p>⚠ Held batch {code(batch)}: {len(held)} evictions of {plural(len(users), 'user')} "
        f"({esc(shown)}) from {plural(len(rooms), 'room')} of Space {esc(space)}, {esc(over)}.</p>"
        f"<p>Review with {code('!spacesync plan')}, then {code(f'!spacesync confirm {batch}')} or "
        f"{code(f'!spacesync cancel {batch}')}.</p>"
    )
    return Reply(text, html)


def parked_notice(entry: Entry, error: str, name: RoomName) -> Reply:
    """An action refused too often: parked until its room's state changes or a moderator retries it."""
    action = entry.action
    what = f"{action.kind.value} {action.user_id or action.state_key or ''}".strip()
    where = name(action.room_id)
    refused = "was refused" if error[:1] == "4" and not error.startswith("429") else "failed"
    text = (
        f"⚠ Parked: {what} in {where} {refused} {plural(entry.failures + 1, 'time')} "
        f"({one_line(error, 160)}). It is not tried again until the room's state changes; fix the cause "
        f"(the bot's power, the room's rules), then !spacesync retry {entry.batch}."
    )
    html = (
        f"<p>⚠ Parked: <b>{esc(action.kind.value)}</b> {code(action.user_id or action.state_key or '')} in "
        f"{esc(where)} {refused} {plural(entry.failures + 1, 'time')} ({esc(one_line(error, 160))}). "
        f"It is not tried again until the room's state changes; fix the cause (the bot's power, the room's "
        f"rules), then {code(f'!spacesync retry {entry.batch}')}.</p>"
    )
    return Reply(text, html)


def rate_limited_text(event: RateLimited) -> str:
    """One sentence: the homeserver holds the bot's writes back, when the queue ends, and what lifts it."""
    since = time.strftime("%H:%M UTC", time.gmtime(event.since))
    rate = f"{event.granted_rate:.1f}" if event.granted_rate >= 1 else f"{event.granted_rate:.2g}"
    finish = (
        f"the {plural(event.queued, 'queued action')} are expected to finish in ~{duration(event.seconds)}"
        if event.seconds is not None
        else "nothing is queued"
    )
    return (
        f"The homeserver is rate-limiting the bot's writes (since {since}, {plural(event.refusals, 'refusal')}): "
        f"it grants about {rate} writes/s, so {finish}. To lift it: {event.lift}"
    )


def rate_limited_notice(event: RateLimited) -> Reply:
    text = rate_limited_text(event)
    head, lift = text.split(" To lift it: ", 1)
    return Reply(text, f"<p>{esc(head)}</p><p>To lift it: {code(lift)}</p>")
