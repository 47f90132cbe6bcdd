"""A moderator on the crypto stack Element Web runs: matrix-js-sdk with its Rust crypto, its own device
cross-signed, excluding insecure devices (`tests/js/moderator.mjs`), driven over JSON lines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from spacesync.testing import Synapse, TestUser

from ..conftest import unavailable

JS_DIR = Path(__file__).resolve().parent.parent / "js"


def js_client_missing() -> str | None:
    """Why the js client cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (Node.js 20 or later runs the matrix-js-sdk test client)"
    if not (JS_DIR / "node_modules" / "matrix-js-sdk").is_dir():
        return f"matrix-js-sdk is not installed: run `npm ci` in {JS_DIR} (make test does)"
    return None


class JsModerator:
    """One user on one js-sdk device; every call is one request line and one answer line."""

    def __init__(self, process: asyncio.subprocess.Process, user: TestUser) -> None:
        self.process = process
        self.user = user
        self.master_key: str | None = None

    @classmethod
    async def start(cls, synapse: Synapse, user: TestUser) -> JsModerator:
        missing = js_client_missing()
        if missing:
            unavailable(missing)
        process = await asyncio.create_subprocess_exec(
            "node",
            str(JS_DIR / "moderator.mjs"),
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 20,
        )
        moderator = cls(process, user)
        answer = await moderator.call(
            "start",
            timeout=60,
            homeserver=synapse.url,
            user_id=user.user_id,
            access_token=user.access_token,
            device_id=user.device_id,
            password=user.password,
        )
        moderator.master_key = answer.get("master_key")
        return moderator

    async def call(self, cmd: str, *, timeout: float = 60, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"the js client exited during {cmd!r} (code {await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok"):
            raise AssertionError(f"js client, {cmd}: {answer['error']}")
        return answer

    async def ask(self, room_id: str, text: str, timeout: float = 30) -> dict[str, Any]:
        """Send `text` encrypted and wait for the bot's reply, decrypted: body, encrypted, shield."""
        return await self.call("ask", timeout=timeout + 10, room_id=room_id, text=text, timeout_ms=int(timeout * 1000))

    async def send(self, room_id: str, text: str) -> str:
        return str((await self.call("send", room_id=room_id, text=text))["event_id"])

    async def reply_to(self, event_id: str, timeout: float = 30) -> dict[str, Any]:
        """The bot's reply to `event_id` (anyone's), decrypted by this client."""
        return await self.call("reply", timeout=timeout + 10, event_id=event_id, timeout_ms=int(timeout * 1000))

    async def reset_identity(self) -> str:
        """New cross-signing keys for this user (as after a lost recovery key); the new master key."""
        return str((await self.call("reset_identity"))["master_key"])

    async def devices(self, user_id: str) -> dict[str, Any]:
        """`user_id`'s devices as this client sees them (signed_by_owner) and their master key."""
        return await self.call("devices", user_id=user_id)

    async def close(self) -> None:
        if self.process.returncode is None:
            try:
                await self.call("stop", timeout=5)
            except (AssertionError, TimeoutError, BrokenPipeError, ConnectionResetError):
                pass
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
