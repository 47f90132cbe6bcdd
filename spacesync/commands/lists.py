"""The policy lists the Spaces follow, from the admin room: their rules and what they caused (`lists`), and the
rule behind a user's ban (for `whois`)."""

from __future__ import annotations

from ..core.policylists import ListRules, banned_users, read_list, seen_users
from ..model import Cause, Membership, PolicyRule, RoomID, SpacePolicy, UserID
from .format import Reply, line, listing, plural
from .registry import Context, command, expect
from .status import FAMILY  # listed with the other status commands, after them
from .world import View, label, view


def _banned_by(v: View, space: SpacePolicy) -> dict[UserID, tuple[RoomID, PolicyRule]]:
    """The users the Space's lists ban there now, with the list and the rule; lists not read now say nothing."""
    lists = [read_list(v.snapshot.rooms[r]) for r in space.policy_lists if v.snapshot.known(r)]
    seen = seen_users(v.snapshot, v.graph.governed_by(space.room_id) | {space.room_id})
    found: dict[UserID, tuple[RoomID, PolicyRule]] = {}
    for rules in lists:
        for user, rule in banned_users([rules], seen).items():
            found.setdefault(user, (rules.list_id, rule))
    return found


def rule_notes(v: View, user: UserID) -> list[str]:
    """'banned in Community by policy list Ban list: rule @spam*:example.org (spam wave)', per Space."""
    notes = []
    for space in v.policy.spaces:
        hit = _banned_by(v, space).get(user)
        if hit is None:
            continue
        list_id, rule = hit
        room = v.snapshot.rooms.get(space.room_id)
        state = room.members.get(user) if room is not None else None
        verb = "banned" if state is not None and state.membership is Membership.BAN else "to be banned"
        list_name = v.snapshot.rooms[list_id].name or list_id
        space_name = (room.name if room is not None else None) or space.room_id
        why = f" ({rule.reason})" if rule.reason else ""
        notes.append(f"{verb} in {space_name} by policy list {list_name}: rule {rule.entity}{why}")
    return notes


def _counts(rules: ListRules) -> str:
    reasons = rules.ignored()
    ignored = sum(n for n, _ in reasons)
    detail = [f"{n} {why}" for n, why in reasons]
    text = f"{plural(len(rules.users), 'user ban rule')}, {plural(len(rules.servers), 'server ban rule')}"
    return text + (f", {ignored} ignored ({', '.join(detail)})" if ignored else "")


@command(
    "lists",
    family=FAMILY,
    summary="the policy lists each Space follows, their rules and what they caused",
    help="For each Space with policy_lists: each list room, whether the bot can read it, its user and server ban "
    "rules (and the rules it ignores: room rules, recommendations other than m.ban, rules from senders without "
    "the power to send them in the list), the users its rules ban in the Space now and those still to be banned, "
    "and whether its server rules reach the rooms' server ACLs (server_acl: sync). '!spacesync whois <@user>' "
    "names the rule behind one user's ban.",
)
async def lists(ctx: Context, args: list[str]) -> Reply:
    expect(args, 0)
    app = ctx.app
    v = await view(app)
    following = [s for s in v.policy.spaces if s.policy_lists]
    if not following:
        return Reply.rich("No Space follows a policy list: set `policy_lists: [<room>, …]` on a Space in the config.")
    lines = []
    for space in following:
        space_t = label(app, space.room_id, v.snapshot)[0]
        banned = _banned_by(v, space)
        placed = {
            b.user_id for b in v.snapshot.placed_bans if b.room_id == space.room_id and b.cause == Cause.POLICY_LIST
        }
        lines.append(line(f"{space_t}: {plural(len(space.policy_lists), 'list')}"))
        for list_id in space.policy_lists:
            list_t = label(app, list_id, v.snapshot)[0]
            if not v.snapshot.known(list_id):
                why = v.snapshot.unreachable.get(list_id, "not read yet")
                lines.append(line(f"{list_t}: cannot be read now ({why}): its bans are kept as they are", depth=1))
                continue
            rules = read_list(v.snapshot.rooms[list_id])
            mine = {u for u, (lid, _) in banned.items() if lid == list_id}
            done, waiting = len(mine & placed), len(mine - placed)
            caused = f"{plural(done, 'user')} banned by spacesync in the Space"
            if waiting:
                caused += f", {waiting} to be banned (held, protected or not yet run: '!spacesync plan')"
            servers = (
                "server rules feed the rooms' ACLs" if space.server_acl else "server rules unused (server_acl off)"
            )
            lines.append(line(f"{list_t}: {_counts(rules)}; {caused}; {servers}", depth=1))
    return listing("Policy lists", lines, limit=None)
