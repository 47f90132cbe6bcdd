"""The encrypted admin room with the crypto stack moderators use (matrix-js-sdk, Rust crypto, excluding
insecure devices as Element does): the bot's device must be cross-signed by the bot's own identity, or the
moderator's client withholds its room keys and never shows the bot's answers."""

from __future__ import annotations

from typing import Any

import pytest

from spacesync.testing import Synapse, TestUser

from .conftest import World
from .js_moderator import JsModerator
from .test_encryption import crypto_bot, encrypted_admin_room


@pytest.fixture
async def js_moderators(synapse: Synapse):
    """`await js_moderator(user)`: that user on a js-sdk device of its own, cross-signed; closed at the end."""
    made: list[JsModerator] = []

    async def make(user: TestUser) -> JsModerator:
        made.append(await JsModerator.start(synapse, user))
        return made[-1]

    yield make
    for moderator in made:
        await moderator.close()


async def assert_trusted_answer(moderator: JsModerator, room: str, text: str = "!spacesync status") -> dict[str, Any]:
    answer = await moderator.ask(room, text)
    assert "State: running" in answer["body"]
    assert answer["encrypted"]
    return answer


async def test_a_moderator_excluding_insecure_devices_gets_encrypted_answers(world: World, start_bot, js_moderators):
    admin_room = await encrypted_admin_room(world)
    space = await world.space("Community")
    await start_bot([{"room": space}], **crypto_bot(world, admin_room))
    owner = await js_moderators(world.owner)
    await assert_trusted_answer(owner, admin_room)
