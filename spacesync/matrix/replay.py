"""Replaying the /sync deltas that arrived during a /state read over its answer, never backwards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _state_key(event: Mapping[str, Any]) -> tuple[str, str] | None:
    key, event_type = event.get("state_key"), event.get("type")
    return (event_type, key) if isinstance(key, str) and isinstance(event_type, str) else None


def _id(event: Mapping[str, Any] | None) -> str | None:
    event_id = event.get("event_id") if event is not None else None
    return event_id if isinstance(event_id, str) and event_id else None


def _replaces(event: Mapping[str, Any]) -> Any:
    unsigned = event.get("unsigned")
    return unsigned.get("replaces_state") if isinstance(unsigned, Mapping) else None


def newer_than_answer(
    answer: Sequence[Mapping[str, Any]], during: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], bool]:
    """The deltas that arrived during a /state read which may be newer than its answer, in order, and whether
    one of them could not be ordered against the answer (the room then needs another read).

    A delta is dropped when the answer holds its event, or holds an event that came after it for the same
    state key: one that arrived later during the read, or whose `unsigned.replaces_state` names the delta. It is
    replayed when the answer holds nothing for its key, when it names the answer's event as the one it replaced,
    or when either has no event id (the bot's own changes, mirrored as it makes them). Otherwise nobody can tell
    which is newer: it is replayed (a newer event than it would reach /sync after it) and the doubt reported."""
    held = {key: e for e in answer if (key := _state_key(e)) is not None}
    ids = {event_id for e in answer if (event_id := _id(e)) is not None}
    replay: list[Mapping[str, Any]] = []
    doubt = False
    for i, delta in enumerate(during):
        event_id, key = _id(delta), _state_key(delta)
        if event_id in ids:
            continue  # the answer holds it already
        current = held.get(key) if key is not None else None
        current_id = _id(current)
        if current is not None and event_id is not None and current_id is not None:
            later = {_id(d) for d in during[i + 1 :] if _state_key(d) == key}
            if current_id in later or _replaces(current) == event_id:
                continue  # the answer holds an event that came after this delta: replaying it would go backwards
            if _replaces(delta) != current_id:
                doubt = True
        replay.append(delta)
        if key is not None:
            held[key] = delta  # what the next delta for the key is ordered against
    return replay, doubt
