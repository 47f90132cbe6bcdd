"""The unstable MSC4293 on: Synapse itself redacts a banned user's events when the ban carries the flag. The
only tests that run with `experimental_features.msc4293_enabled` (a listed deviation from a stock Synapse)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from spacesync.matrix.state import REDACT_EVENTS_UNSTABLE
from spacesync.testing import Synapse, wait_for

from ..conftest import _start_synapse
from .test_eviction import wait_membership
from .test_spacewide import redacted


@pytest.fixture(scope="module")
async def synapse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Synapse]:
    """This module's homeserver: stock but for MSC4293 (`testing.stock.MSC4293_DEVIATION`)."""
    hs = Synapse(tmp_path_factory.mktemp("synapse-msc4293"), msc4293=True)
    await _start_synapse(hs)
    yield hs
    await hs.stop()


async def test_a_flagged_space_ban_carried_down_makes_synapse_redact_the_users_events(world, start_bot, make_user):
    space = await world.space("Demo Community")
    room = await world.room(space, "General")
    flagged = await make_user("flagged")
    for r in (space, room):
        await flagged.client.join(r)
    sent = [await flagged.client.send_text(room, f"spam {i}") for i in range(3)]
    await start_bot([{"room": space}])

    content = {"membership": "ban", "reason": "raid", REDACT_EVENTS_UNSTABLE: True}
    await world.owner.client.send_state(space, "m.room.member", content, state_key=flagged.user_id)
    await wait_membership(world, [room], flagged.user_id, "ban")
    ban = await world.owner.client.get_state_event(room, "m.room.member", flagged.user_id)
    assert ban is not None and ban.get(REDACT_EVENTS_UNSTABLE) is True
    for event_id in sent:
        await wait_for(lambda e=event_id: redacted(world, room, e), timeout=20, message=f"{event_id} not redacted")
