"""The write gate against a simulated homeserver bucket: one write per granted slot once 429s come, notices
first, and the episode is reported once."""

from __future__ import annotations

import asyncio
import time

import pytest
from mautrix.errors import MLimitExceeded

from spacesync.matrix.ratelimit import START_WINDOW, Episode, ServerKind, WriteGate, WritePriority, lift_hint

RATE = 20.0
"""Writes per second the simulated homeserver grants (Synapse's 0.2/s, sped up 100 times)."""
BURST = 4


class Bucket:
    """Synapse's leaky bucket: `BURST` at once, then one per 1/RATE s; a refused write does not count."""

    def __init__(self) -> None:
        self.count = 0.0
        self.at = time.monotonic()
        self.refused = 0
        self.done: list[str] = []

    async def send(self, name: str) -> str:
        await asyncio.sleep(0.002)  # on the way: what is sent together arrives together
        now = time.monotonic()
        self.count = max(0.0, self.count - (now - self.at) * RATE)
        self.at = now
        if self.count + 1 > BURST:
            self.refused += 1
            error = MLimitExceeded(429, "slow down")
            error.retry_after_ms = int(1000 * (self.count + 1 - BURST) / RATE)  # type: ignore[attr-defined]
            await asyncio.sleep(0.5 / 100)  # Synapse holds a 429 half a second (sped up alike)
            raise error
        self.count += 1
        self.done.append(name)
        return name


async def _write(gate: WriteGate, bucket: Bucket, name: str, priority: WritePriority) -> str:
    return await gate.write(
        lambda: bucket.send(name), priority, budget=60, may_send=None, on_refused=gate.refused, what=name
    )


async def test_a_crowd_meets_429_once_then_one_write_per_slot_and_a_notice_goes_next():
    reports: list[Episode] = []
    gate = WriteGate(on_report=reports.append)
    bucket = Bucket()
    actions = [asyncio.create_task(_write(gate, bucket, f"kick{i}", WritePriority.ACTION)) for i in range(24)]
    # all 24 at once, as the executor sends them before the homeserver's first 429
    await asyncio.sleep(0.3)  # the burst went through; the rest wait at the gate
    assert gate.limiting()
    asked = time.monotonic()
    reply = await _write(gate, bucket, "reply", WritePriority.NOTICE)
    answered = time.monotonic() - asked
    await asyncio.gather(*actions)

    assert answered < 2.5 / RATE, "the reply took the next slot, ahead of the queued actions"
    assert reply == "reply" and len(bucket.done) == 25
    slots = len(bucket.done) - BURST
    # Before the first 429 answers, at most the window is in flight (not all 24); then one write per slot.
    assert bucket.refused <= START_WINDOW + 0.2 * slots, f"{bucket.refused} refused in {slots} slots"
    assert len(reports) == 1 and reports[0].refusals >= 3
    assert reports[0].granted_rate == pytest.approx(RATE, rel=0.3)


def test_the_lift_hint_names_the_bot_and_the_admin_api():
    hint = lift_hint(ServerKind.SYNAPSE, "https://hs.example/", "@bot:example.org")
    assert "https://hs.example/_synapse/admin/v1/users/%40bot%3Aexample.org/override_ratelimit" in hint
    assert '"messages_per_second": 0' in hint and hint.startswith("curl -X POST")
    assert lift_hint(ServerKind.OTHER, "https://hs", "@bot:hs").startswith("exempt the bot's account from rate limits")


async def test_without_429s_the_window_opens_to_the_executors_concurrency_within_a_few_dozen_writes():
    gate = WriteGate()
    in_flight = peak = 0

    async def send() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1

    async def one() -> None:
        await gate.write(send, WritePriority.ACTION, budget=60, may_send=None, on_refused=gate.refused, what="w")

    await asyncio.gather(*(one() for _ in range(32)))
    assert peak < 32, "a small crowd first, not all 32 at once"
    await asyncio.gather(*(one() for _ in range(64)))
    assert gate.window >= 64 and peak >= 32
