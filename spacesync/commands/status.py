"""Read-only commands: status, tree, plan, sync, audit, whois, joinrules, powerlevels."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..core.entitlement import entitlers, protection
from ..core.planner import plan as make_plan
from ..engine.executor import Estimate
from ..model import Action, ActionKind, Finding, FindingCode, Membership, Plan, RoomID
from ..refs import RefError
from ..store import AuditRecord, Status
from ..store.journal import BatchStatus
from .format import (
    MAX_LINES,
    Line,
    Reply,
    ago,
    code,
    compose,
    duration,
    esc,
    line,
    listing,
    one_line,
    plural,
    timestamp,
)
from .notices import rate_limited_text
from .parser import count_arg, room_arg, user_arg
from .people import redactions_open
from .powerlevels import RELEASE_HELP, release
from .registry import CommandError, Context, command, expect
from .world import View, filter_plan, label, scope, space_filter, view

if TYPE_CHECKING:
    from .services import Services as App

FAMILY = "status"

JOIN_RULE_KINDS = frozenset({ActionKind.SET_JOIN_RULES, ActionKind.SET_SPACE_CHILD, ActionKind.INVITE})


def finding_family(finding: Finding) -> str:
    """'joinrules', 'powerlevels' or 'membership': which view a finding belongs to (the planner part it came from)."""
    return finding.area.value


def _level(value: object) -> str:
    return "-" if value is None else str(value)


def action_line(
    app: App, action: Action, view_: View | None = None, queued: bool = False, parked: bool = False
) -> Line:
    room_t, room_h = label(app, action.room_id, view_.snapshot if view_ else None)
    tail = " (already queued)" if queued else " (parked: refused repeatedly)" if parked else ""
    if action.kind is ActionKind.SET_POWER_LEVELS:
        changes = ", ".join(f"{u} {_level(b)}→{_level(a)}" for u, (b, a) in sorted(action.changes.items()))
        return line(
            f"power levels in {room_t}: {changes}{tail}", f"power levels in {room_h}: {esc(changes)}{esc(tail)}"
        )
    if action.kind in (ActionKind.SET_JOIN_RULES, ActionKind.SET_SPACE_CHILD):
        what = "join rule" if action.kind is ActionKind.SET_JOIN_RULES else "m.space.child"
        return line(
            f"{what} in {room_t}: {action.reason}{tail}", f"{what} in {room_h}: {esc(action.reason)}{esc(tail)}"
        )
    target = action.user_id or action.state_key or ""
    return line(
        f"{action.kind.value} {target} in {room_t}: {action.reason}{tail}",
        f"<b>{esc(action.kind.value)}</b> {code(target)} in {room_h}: {esc(action.reason)}{esc(tail)}",
    )


def finding_line(app: App, finding: Finding, view_: View | None = None) -> Line:
    room_t, room_h = label(app, finding.room_id, view_.snapshot if view_ else None)
    return line(f"{room_t}: {finding.message}", f"{room_h}: {esc(finding.message)}")


def _for(app: App, space: RoomID | None, view_: View) -> tuple[str, str]:
    if space is None:
        return "", ""
    room_t, room_h = label(app, space, view_.snapshot)
    return f" for {room_t}", f" for {room_h}"


def _check_space_syntax(args: list[str]) -> None:
    expect(args, 0, 1)
    if args:
        try:
            room_arg(args[0])
        except RefError as e:
            raise CommandError(str(e)) from None


async def _held_batches(app: App) -> list[str]:
    return [b.id for b in await app.store.journal.batches(status=BatchStatus.HELD, limit=50) if b.counts.get("held")]


# region status


def queue_text(estimate: Estimate | None) -> str | None:
    """'Queue: 40 actions, expected to finish in ~3 min (at 0.2/s)'; None when nothing is queued."""
    if estimate is None:
        return None
    head = f"Queue: {plural(estimate.queued, 'action')}"
    paused = f"; rate-limited for another {duration(estimate.paused_s)}" if estimate.paused_s >= 0.5 else ""
    if estimate.seconds is None or estimate.rate is None:
        return f"{head}, finish time not known yet (none completed in the last minute){paused}"
    rate = f"{estimate.rate:.1f}" if estimate.rate >= 1 else f"{estimate.rate:.2g}"
    return f"{head}, expected to finish in ~{duration(estimate.seconds)} (at {rate}/s){paused}"


@command(
    "status",
    family=FAMILY,
    summary="what the bot manages and what it is doing",
    help="Shows the managed Spaces; how many rooms are managed, listed but not opted in, or unreachable "
    "(as of the last reconcile); pending, held and parked actions with their batch ids; how long the queued "
    "actions are expected to take at the recent rate; when the last "
    "reconcile ran and how long it took; the time spent waiting on homeserver rate limits; and "
    "whether the bot is paused or in dry-run mode.",
)
async def status(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0)
    app = ctx.app
    rec = app.reconciler
    policy = await rec.policy()
    plan = rec.last_plan
    depth = await app.store.journal.depth()
    held = await _held_batches(app)
    lines = []
    if rec.paused:
        lines.append(
            line(
                "State: PAUSED — nothing new is queued ('!spacesync resume' to continue)",
                f"State: <b>PAUSED</b> — nothing new is queued ({code('!spacesync resume')} to continue)",
            )
        )
    elif app.config.dry_run:
        lines.append(line("State: dry run — actions are logged, never taken"))
    else:
        lines.append(line("State: running"))
    names = [label(app, s.room_id) for s in policy.spaces]
    spaces_t = ", ".join(t for t, _ in names[:5]) + (f", … {len(names) - 5} more" if len(names) > 5 else "")
    spaces_h = ", ".join(h for _, h in names[:5]) + (f", … {len(names) - 5} more" if len(names) > 5 else "")
    lines.append(
        line(
            f"Spaces: {len(names)} managed" + (f" ({spaces_t})" if names else ""),
            f"Spaces: {len(names)} managed" + (f" ({spaces_h})" if names else ""),
        )
    )
    if plan is None:
        lines.append(line("Rooms: no reconcile has run yet"))
    else:
        not_opted = sum(1 for f in plan.findings if f.code == FindingCode.NOT_OPTED_IN)
        unreachable = sum(1 for f in plan.findings if f.code == FindingCode.UNREACHABLE)
        lines.append(
            line(
                f"Rooms: {len(plan.managed)} managed, {not_opted} not opted in, {unreachable} unreachable; "
                f"{plural(len(plan.findings), 'warning')}"
            )
        )
    lines.append(
        line(
            f"Actions: {depth.get('pending', 0)} pending, {depth.get('running', 0)} running, "
            f"{depth.get('held', 0)} held, {depth.get('parked', 0)} parked"
        )
    )
    queue = queue_text(app.executor.estimate(depth.get("pending", 0) + depth.get("running", 0)))
    if queue is not None:
        lines.append(line(queue))
        redacting = await redactions_open(app)
        if redacting is not None:
            lines.append(redacting)
    if depth.get("parked"):
        parked = await app.store.journal.parked(limit=200)
        by_batch = sorted({e.batch for e in parked})
        shown = ", ".join(by_batch[:5]) + (f", … {len(by_batch) - 5} more" if len(by_batch) > 5 else "")
        lines.append(
            line(
                f"Parked (refused repeatedly) in batches: {shown} — '!spacesync batch <batch>' shows why, "
                "'!spacesync retry <batch>|all' runs them again",
                f"Parked (refused repeatedly) in batches: {', '.join(code(b) for b in by_batch[:5])}"
                + (f", … {len(by_batch) - 5} more" if len(by_batch) > 5 else "")
                + f" — {code('!spacesync batch <batch>')} shows why, "
                f"{code('!spacesync retry <batch>|all')} runs them again",
            )
        )
    if held:
        shown = ", ".join(held[:5]) + (f", … {len(held) - 5} more" if len(held) > 5 else "")
        lines.append(
            line(
                f"Held batches: {shown} — '!spacesync confirm <batch>' or '!spacesync cancel <batch>'",
                f"Held batches: {', '.join(code(b) for b in held[:5])}"
                + (f", … {len(held) - 5} more" if len(held) > 5 else "")
                + f" — {code('!spacesync confirm <batch>')} or {code('!spacesync cancel <batch>')}",
            )
        )
    if rec.last_reconcile_at is None:
        lines.append(line("Last reconcile: never"))
    else:
        lines.append(line(f"Last reconcile: {ago(rec.last_reconcile_at)}, took {rec.last_reconcile_s or 0:.2f} s"))
    limited = await app.rate_limit()
    if limited is not None:
        lines.append(line(rate_limited_text(limited)))
    lines.append(line(f"Waiting on rate limits: {app.executor.ratelimit_wait_s:.1f} s in total since start"))
    return listing("spacesync status", lines, limit=None)


# endregion


# region tree


def _tree_status(v: View, room_id: RoomID) -> str:
    room = v.snapshot.rooms.get(room_id)
    if room is None:
        reason = v.snapshot.unreachable.get(room_id, "the bot is not joined")
        return f"unreachable ({reason})"
    kind = "Space, " if room.is_space else ""
    state = "managed" if room_id in v.graph.managed else "not opted in"
    return f"{kind}{state}, {len(room.joined())} joined"


@command(
    "tree",
    usage="tree [space]",
    family=FAMILY,
    summary="the managed Spaces as a nested list",
    help="Shows every room below the managed Spaces (or below one Space), nested as the Spaces list "
    "them, each marked managed, not opted in or unreachable, with its joined member count. "
    "Read from the bot's state cache: it sends no requests for rooms it already knows. "
    "A room listed by several Spaces is expanded once.",
)
async def tree(ctx: Context, args: list[str]) -> Reply:
    _check_space_syntax(args)
    app = ctx.app
    v = await view(app)
    space = await space_filter(app, args, v.graph, v.snapshot)
    roots = [space] if space else list(v.graph.roots)
    if not roots:
        return Reply.plain("No managed Spaces. Add one with '!spacesync spaces add <space>'.")
    lines: list[Line] = []
    expanded: set[RoomID] = set()

    def key(room_id: RoomID) -> tuple[str, str]:
        room = v.snapshot.rooms.get(room_id)
        return ((room.name or "").lower() if room else "~", room_id)

    def walk(room_id: RoomID, depth: int) -> None:
        room_t, room_h = label(app, room_id, v.snapshot)
        again = room_id in expanded
        note = " (listed above)" if again else ""
        state = _tree_status(v, room_id)
        lines.append(line(f"{room_t} — {state}{note}", f"{room_h} — {esc(state)}{esc(note)}", depth))
        if again:
            return
        expanded.add(room_id)
        for child in sorted(v.graph.children.get(room_id, ()), key=key):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    managed = sum(1 for r in expanded if r in v.graph.managed)
    title = f"{plural(len(expanded), 'room')}, {managed} managed" + (
        f" below {label(app, space, v.snapshot)[0]}" if space else ""
    )
    return listing(title, lines, hint="name a Space to see one branch: '!spacesync tree <space>'")


# endregion


# region plan and sync


@command(
    "plan",
    usage="plan [space]",
    family=FAMILY,
    summary="what the bot would do now, without doing it",
    help="Re-reads the state of every room below the managed Spaces and shows the actions the bot "
    "would take and the warnings it has, optionally only at and below one Space. Actions already "
    "in the journal are marked. Nothing is changed.",
)
async def plan_cmd(ctx: Context, args: list[str]) -> Reply:
    _check_space_syntax(args)
    app = ctx.app
    plan = await app.reconciler.plan()
    v = await view(app)
    space = await space_filter(app, args, v.graph, v.snapshot)
    p = filter_plan(plan, scope(v.graph, space), space)
    open_keys = await app.store.journal.open_keys()
    parked = await app.store.journal.parked_fingerprints()
    held = await app.store.journal.by_status(Status.HELD)
    for_t, for_h = _for(app, space, v)
    head = (
        f"{plural(len(p.managed), 'managed room')}, {plural(len(p.actions), 'action')}, "
        f"{plural(len(p.findings), 'warning')}"
    )
    parts: list[Reply | str] = [Reply(f"Plan{for_t}: {head}", f"<p>Plan{for_h}: {esc(head)}</p>")]
    if p.actions:
        parts.append(
            listing(
                "Actions:",
                [action_line(app, a, v, a.key in open_keys, a.key in parked) for a in p.actions],
                hint="narrow with '!spacesync plan <space>'",
            )
        )
    if p.findings:
        parts.append(listing("Warnings:", [finding_line(app, f, v) for f in p.findings]))
    notes = []
    if held:
        notes.append(f"{plural(len(held), 'action')} held for confirmation (see '!spacesync status').")
    if app.reconciler.paused:
        notes.append("The bot is paused: nothing new is queued.")
    if app.config.dry_run:
        notes.append("Dry run: actions are logged, never taken.")
    if notes:
        parts.append(Reply.plain(" ".join(notes)))
    return compose(parts)


@command(
    "sync",
    usage="sync [space]",
    family=FAMILY,
    summary="reconcile now and report what was queued",
    help="Runs a full reconcile at once (re-reading every room's state) instead of waiting for the "
    "timer, then reports how many actions were planned and queued, and any batch held for "
    "confirmation. With a Space, the counts are those at and below it (the reconcile itself always "
    "covers everything).",
)
async def sync(ctx: Context, args: list[str]) -> Reply:
    _check_space_syntax(args)
    app = ctx.app
    result = await app.reconciler.reconcile("command")
    plan, batches = result.plan, result.batches
    v = await view(app)
    space = await space_filter(app, args, v.graph, v.snapshot)
    p = filter_plan(plan, scope(v.graph, space), space)
    for_t, _ = _for(app, space, v)
    took = app.reconciler.last_reconcile_s or 0.0
    lines = [
        line(
            f"Reconciled in {took:.2f} s{for_t}: {plural(len(p.managed), 'managed room')}, "
            f"{plural(len(p.actions), 'action')} planned, {plural(len(p.findings), 'warning')}."
        )
    ]
    for batch in batches:
        info = await app.store.journal.batch(batch)
        if info is None:
            continue
        if info.status == BatchStatus.HELD:
            n = info.counts.get("held", 0)
            lines.append(
                line(
                    f"Held batch {batch}: {plural(n, 'eviction')} wait for '!spacesync confirm {batch}' "
                    f"or '!spacesync cancel {batch}'.",
                    f"Held batch {code(batch)}: {plural(n, 'eviction')} wait for "
                    f"{code(f'!spacesync confirm {batch}')} or {code(f'!spacesync cancel {batch}')}.",
                )
            )
        else:
            n = sum(info.counts.values())
            lines.append(
                line(
                    f"Queued batch {batch}: {plural(n, 'action')}.",
                    f"Queued batch {code(batch)}: {plural(n, 'action')}.",
                )
            )
    if not batches:
        if app.reconciler.paused:
            lines.append(line("Paused: nothing was queued."))
        elif app.config.dry_run:
            lines.append(line("Dry run: nothing was queued."))
        elif plan.actions:
            lines.append(line("Nothing new to queue: the planned actions are already in the journal."))
        else:
            lines.append(line("Nothing to do."))
    return Reply("\n".join(item.text for item in lines), "<br>".join(item.html for item in lines))


# endregion


# region audit and whois


@command(
    "audit",
    usage="audit [N | @user]",
    family=FAMILY,
    summary="the latest actions the bot took",
    help="Lists the last N actions from the audit log (default 20, at most 200), newest first, with "
    "their outcome, reason and batch. With a user, lists the actions that targeted them.",
)
async def audit(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0, 1)
    limit, target = 20, None
    if args:
        if args[0].strip().isdigit():
            try:
                limit = count_arg(args[0], low=1, high=200)
            except ValueError as e:
                raise CommandError(str(e)) from None
        else:
            try:
                target = user_arg(args[0])
            except RefError as e:
                raise CommandError(f"{e} (or give a number of entries)") from None
    app = ctx.app
    records = await app.store.audit_log(limit, target=target)
    lines = []
    for r in records:
        room_t, room_h = label(app, RoomID(r.room_id))
        batch = f" [batch {r.batch}]" if r.batch else ""
        reason = f" — {r.reason}" if r.reason else ""
        lines.append(
            line(
                f"{timestamp(r.ts)} {r.kind} {r.target} in {room_t}: {r.outcome}{reason}{batch}",
                f"{esc(timestamp(r.ts))} <b>{esc(r.kind)}</b> {code(r.target)} in {room_h}: "
                f"{esc(r.outcome)}{esc(reason)}{esc(batch)}",
            )
        )
    title = f"Audit log{' for ' + target if target else ''}: {plural(len(records), 'entry', 'entries')}, newest first"
    return listing(title, lines, limit=max(MAX_LINES, min(limit, 50)), empty="Nothing recorded yet.")


def _labels(app: App, rooms: Iterable[RoomID], v: View) -> tuple[str, str]:
    pairs = [label(app, r, v.snapshot) for r in sorted(rooms)]
    return ", ".join(t for t, _ in pairs), ", ".join(h for _, h in pairs)


def _audit_error(record: AuditRecord) -> str:
    try:
        detail = json.loads(record.detail) if record.detail else {}
    except ValueError:
        detail = {}
    error = detail.get("error") if isinstance(detail, dict) else None
    return one_line(error or record.outcome, 160)


def put_out_by(membership: Membership, sender: str | None, bot: str, placed: bool) -> tuple[str, str]:
    """'leave by @mod:example.org': who put a user out of a room, in plain text and escaped HTML (the sender
    comes from room state: any homeserver may send any text there)."""
    who = "spacesync" if sender == bot else (sender or "unknown")
    text = f"{membership.value} by {who}" + (" (its own ban: lifted with the Space ban)" if placed else "")
    return text, esc(text)


@command(
    "whois",
    usage="whois <@user>",
    family=FAMILY,
    summary="the managed rooms a user is in and what entitles them",
    help="For each managed room where the user has a membership, shows it and the rooms that entitle "
    "them to stay (its allow list and managed parent Spaces they are joined to), or why not, and "
    "whether the bot must leave them alone (admin, exempt, creator, at or above the bot's level), and why "
    "a user who is not entitled is still there (the bot lacks the power, or the eviction failed).",
)
async def whois(ctx: Context, args: list[str]) -> Reply:
    expect(args, 1)
    try:
        user = user_arg(args[0])
    except RefError as e:
        raise CommandError(str(e)) from None
    app = ctx.app
    v = await view(app)
    graph, snapshot, policy = v.graph, v.snapshot, v.policy
    # Where a plan must leave them in place, and evictions that failed (the newest outcome per room).
    left = {item.room_id: item for item in make_plan(snapshot, policy).left_behind if item.user_id == user}
    failed: dict[RoomID, str] = {}
    for record in await app.store.audit_log(200, target=user):
        if record.kind in ("kick", "ban"):
            failed.setdefault(RoomID(record.room_id), _audit_error(record) if record.outcome == "failed" else "")
    lines = []
    general = []
    if user in policy.admins:
        general.append("a spacesync admin (never acted on)")
    if user in policy.exempt:
        general.append("exempt everywhere (added in the admin room)")
    if user == policy.bot:
        general.append("the bot itself")
    for room_id in sorted(graph.managed, key=lambda r: (graph.depth.get(r, 0), r)):
        room = snapshot.rooms.get(room_id)
        if room is None or user not in room.members:
            continue
        membership = room.members[user].membership
        room_t, room_h = label(app, room_id, snapshot)
        if room_id in graph.roots:
            why_t = why_h = "a managed root Space"
        else:
            ents = entitlers(room, graph)
            joined = [e for e in ents if e in snapshot.rooms and snapshot.rooms[e].membership(user) is Membership.JOIN]
            if joined:
                t, h = _labels(app, joined, v)
                why_t, why_h = f"entitled by {t}", f"entitled by {h}"
            elif ents:
                t, h = _labels(app, ents, v)
                why_t, why_h = f"not entitled: not joined to {t}", f"not entitled: not joined to {h}"
            else:
                why_t = why_h = "no entitling Space"
            if membership is Membership.JOIN:
                guard = protection(room, user, policy, graph)
                item = left.get(room_id)
                note = ""
                if guard:
                    note = f"; protected: {guard}"
                elif item is not None:
                    note = f"; not {'banned' if item.kind is ActionKind.BAN else 'kicked'}: {item.why}"
                elif failed.get(room_id) and not joined:
                    note = f"; eviction failed: {failed[room_id]}"
                why_t += note
                why_h += esc(note)
            else:  # not in the room: entitlement is moot; say who put them out
                placed = any(b.room_id == room_id and b.user_id == user for b in snapshot.placed_bans)
                why_t, why_h = put_out_by(membership, room.members[user].sender, policy.bot, placed)
        lines.append(
            line(f"{room_t}: {membership.value} — {why_t}", f"{room_h}: <b>{esc(membership.value)}</b> — {why_h}")
        )
    from .lists import rule_notes  # lists registers after these commands (it imports this module)

    general.extend(rule_notes(v, user))
    exempt_spaces = [s.room_id for s in policy.spaces if user in s.exempt]
    if exempt_spaces:
        general.append("exempt in the config for " + _labels(app, exempt_spaces, v)[0])
    joined_count = sum(
        1
        for r in graph.managed
        if (room := snapshot.rooms.get(r)) is not None and room.membership(user) is Membership.JOIN
    )
    head = (
        f"{user}: joined to {plural(joined_count, 'managed room')}, "
        f"with a membership in {plural(len(lines), 'managed room')}"
        if lines
        else f"{user}: not in any managed room"
    )
    if general:
        notes = "; ".join(general)
        head += ". " + notes[:1].upper() + notes[1:]
    return listing(head, lines)


# endregion


# region joinrules and powerlevels


async def _family_report(ctx: Context, args: list[str], family: str, kinds: frozenset[ActionKind], what: str) -> Reply:
    _check_space_syntax(args)
    app = ctx.app
    plan: Plan = await app.reconciler.plan()
    v = await view(app)
    space = await space_filter(app, args, v.graph, v.snapshot)
    p = filter_plan(plan, scope(v.graph, space), space)
    findings = [f for f in p.findings if finding_family(f) == family]
    actions = [
        a for a in p.actions if a.kind in kinds and (a.kind is not ActionKind.INVITE or a.cause == "invite_members")
    ]
    open_keys = await app.store.journal.open_keys()
    for_t, for_h = _for(app, space, v)
    counts = f"{plural(len(findings), 'finding')}, {plural(len(actions), 'pending action')}"
    parts: list[Reply | str] = [Reply(f"{what}{for_t}: {counts}", f"<p>{esc(what)}{for_h}: {counts}</p>")]
    if findings:
        parts.append(listing("Findings:", [finding_line(app, f, v) for f in findings]))
    if actions:
        parts.append(
            listing("Actions the bot would take:", [action_line(app, a, v, a.key in open_keys) for a in actions])
        )
    if not findings and not actions:
        parts.append(Reply.plain("Nothing to report."))
    return compose(parts)


@command(
    "joinrules",
    usage="joinrules [space]",
    family=FAMILY,
    summary="join-rule findings and pending join-rule actions",
    help="From a fresh plan: managed rooms whose join rule is not restricted to their Space, allow lists "
    "missing their Space, room versions that cannot be restricted, upgraded rooms to re-point, "
    "invite-only rooms kept as they are (restrict_invite_rooms not set), and the join-rule, m.space.child "
    "and invite actions the bot would take (join_rules: enforce).",
)
async def joinrules(ctx: Context, args: list[str]) -> Reply:
    return await _family_report(ctx, args, "joinrules", JOIN_RULE_KINDS, "Join rules")


@command(
    "powerlevels",
    usage="powerlevels [space] | powerlevels release <room|all> [@user]",
    family=FAMILY,
    summary="power-level findings and pending power-level changes; hand levels changed by hand back",
    help="From a fresh plan: power levels changed by hand (left alone), users muted or demoted in the room "
    "itself (not raised), users at or above the bot's "
    "level, rooms where the bot lacks the power to write levels, and the level changes it would make "
    "(user: before → after).\n\n" + RELEASE_HELP,
)
async def powerlevels(ctx: Context, args: list[str]) -> Reply:
    if args and args[0].lower() == "release":
        return await release(ctx, args[1:])
    return await _family_report(ctx, args, "powerlevels", frozenset({ActionKind.SET_POWER_LEVELS}), "Power levels")


# endregion


__all__ = ["action_line", "finding_family", "finding_line", "put_out_by", "queue_text"]
