"""One retry policy: exponential backoff from half a second, capped so a long outage is polled still."""

from __future__ import annotations

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): base, 2 base, 4 base, ... up to cap."""
    return min(cap, base * 2 ** max(attempt, 0))
