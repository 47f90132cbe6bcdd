"""`spacesync demo --appservice`: the same story, with spacesync registered on the throwaway Synapse as an
application service (the registration written as `spacesync appservice registration` writes it, listed in the
homeserver's app_service_config_files). The homeserver keeps its stock rate limits and pushes events to the bot."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .config import AppserviceConfig
from .demo import ROOM_VERSION, SERVER_NAME, Demo
from .model import UserID
from .registration import make_registration, read_registration, write_registration
from .testing import Synapse, TestClient, TestUser
from .testing.homeserver import free_port

BOT_LOCALPART = "spacesync"


async def appservice_user(synapse: Synapse, as_token: str, localpart: str) -> TestUser:
    """Register a user of the appservice's namespace (with its as_token) and log a device in for it: a test
    client acting as that user."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {as_token}"}) as session:
        body = {"type": "m.login.application_service", "username": localpart}
        async with session.post(f"{synapse.url}/_matrix/client/v3/register", json=body) as answer:
            if answer.status != 200:
                raise OSError(f"appservice registration of {localpart} refused: {await answer.text()}")
            data = await answer.json()
    user_id, token = str(data["user_id"]), str(data["access_token"])
    return TestUser(user_id, token, "", str(data.get("device_id") or ""), TestClient(synapse.url, token, user_id))


class AppserviceDemo(Demo):
    """The demo with the bot as an appservice: no access token, no rate-limit exemption, transactions pushed."""

    exemption = "an application service registered with rate_limited: false, on stock rate limits"

    def __init__(self, workdir: Path, out: TextIO) -> None:
        super().__init__(workdir, out)
        self.listen = free_port()
        self.registration = workdir.resolve() / "registration.yaml"
        self.synapse = self.space_server = Synapse(
            workdir.resolve() / "synapse",
            server_name=SERVER_NAME,
            default_room_version=ROOM_VERSION,
            app_service_config_files=[self.registration],
        )

    async def start_homeserver(self) -> None:
        bot = UserID(f"@{BOT_LOCALPART}:{SERVER_NAME}")
        write_registration(
            self.registration, make_registration(bot, AppserviceConfig("127.0.0.1", self.listen, "", ""))
        )
        self.say(
            f"\nWrote {self.registration} (as `spacesync appservice registration` does): the homeserver lists it "
            "in app_service_config_files and pushes events to "
            f"http://127.0.0.1:{self.listen}; the bot is its one user, never rate limited."
        )
        await super().start_homeserver()

    async def bot_account(self) -> TestUser:
        as_token = read_registration(str(self.registration))["as_token"]
        return await appservice_user(self.synapse, as_token, BOT_LOCALPART)

    async def exempt_bot(self) -> None:
        """Nothing to do for the bot: the registration's rate_limited: false is its exemption. The demo's people
        are exempted so that the story is not slowed by the stock limits of their own clicks."""
        for name, user in self.users.items():
            if name != "bot":
                await self.synapse.exempt(user.user_id)

    def bot_config(self) -> dict[str, Any]:
        return {
            "bot": {"user_id": self.users["bot"].user_id, "pickle_key": secrets.token_hex(32)},
            "appservice": {"listen": f"127.0.0.1:{self.listen}", "registration": str(self.registration)},
        }
