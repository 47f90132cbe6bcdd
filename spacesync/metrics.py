"""Prometheus metrics, every name prefixed spacesync_, in one registry the web endpoint serves."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from . import __version__

disable_created_metrics()  # no *_created series: they double the exposition and nobody alerts on them
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

BUILD = Info("spacesync_build", "The running spacesync version.", registry=REGISTRY)
BUILD.info({"version": __version__})

ACTIONS = Counter(
    "spacesync_actions_total",
    "Actions finished, by kind and outcome (done, already_done, failed).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
SUPERSEDED = Counter(
    "spacesync_actions_superseded_total",
    "Actions re-checked just before sending that the world no longer called for, by kind: never sent.",
    ["kind"],
    registry=REGISTRY,
)
REDACTIONS = Counter(
    "spacesync_redactions_total",
    "Messages of banned users redacted along with a ban (redact_on_ban), by outcome (done, failed).",
    ["outcome"],
    registry=REGISTRY,
)
JOURNAL_DEPTH = Gauge(
    "spacesync_journal_depth",
    "Actions in the journal not yet finished, by status (pending, running, held).",
    ["status"],
    registry=REGISTRY,
)
HELD_ACTIONS = Gauge(
    "spacesync_held_actions",
    "Actions held by the mass-action guard, waiting for a moderator.",
    registry=REGISTRY,
)
SYNC_LAG = Gauge(
    "spacesync_sync_lag_seconds",
    "Seconds since the last successful /sync answer.",
    registry=REGISTRY,
)
LAST_SYNC = Gauge(
    "spacesync_last_sync_timestamp_seconds",
    "Unix time of the last successful /sync answer.",
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "spacesync_reconcile_duration_seconds",
    "Time taken by one full reconcile (walk, plan, enqueue).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
LAST_RECONCILE = Gauge(
    "spacesync_last_reconcile_timestamp_seconds",
    "Unix time of the last finished reconcile.",
    registry=REGISTRY,
)
RATELIMIT_WAIT = Counter(
    "spacesync_ratelimit_wait_seconds_total",
    "Seconds spent waiting on the homeserver's rate limits (429).",
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "spacesync_homeserver_request_seconds",
    "Latency of homeserver requests, by method and outcome class.",
    ["method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 35),
    registry=REGISTRY,
)
BYTES_READ = Counter(
    "spacesync_bytes_read_total",
    "Bytes of homeserver answers read, by request kind (sync, state, joined_rooms, hierarchy, other).",
    ["kind"],
    registry=REGISTRY,
)
RECONCILE_BYTES = Gauge(
    "spacesync_reconcile_bytes_read",
    "Bytes of homeserver answers the last full reconcile read (state, joined rooms, hierarchy).",
    registry=REGISTRY,
)
RECONCILE_REQUESTS = Gauge(
    "spacesync_reconcile_requests",
    "Homeserver requests the last full reconcile made to read the world.",
    registry=REGISTRY,
)
MANAGED_SPACES = Gauge("spacesync_managed_spaces", "Root Spaces under management.", registry=REGISTRY)
MANAGED_ROOMS = Gauge("spacesync_managed_rooms", "Rooms under management (opted in).", registry=REGISTRY)
MANAGED_USERS = Gauge(
    "spacesync_managed_users",
    "Distinct users joined to managed rooms at the last reconcile.",
    registry=REGISTRY,
)
IS_LEADER = Gauge(
    "spacesync_leader",
    "1 when this instance is the acting one, 0 while it stands by.",
    registry=REGISTRY,
)
DATABASE_UP = Gauge(
    "spacesync_database_up",
    "0 while the database is out of reach (calls are retried with backoff), else 1.",
    registry=REGISTRY,
)
DATABASE_UP.set(1)
STATE_ROOMS = Gauge("spacesync_state_rooms", "Rooms whose state the state cache holds.", registry=REGISTRY)
STATE_MEMBER_ENTRIES = Gauge(
    "spacesync_state_member_entries",
    "Memberships (one per room and user) the state cache holds.",
    registry=REGISTRY,
)
APPSERVICE_TRANSACTIONS = Counter(
    "spacesync_appservice_transactions_total",
    "Appservice transactions from the homeserver, by outcome (applied; duplicate: applied before, answered "
    "without applying again; refused: standing by or starting, the homeserver sends it again; failed).",
    ["outcome"],
    registry=REGISTRY,
)
