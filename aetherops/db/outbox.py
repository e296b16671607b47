"""The transactional outbox: events are rows written with the state change they describe.

Writers call `append` on the connection of their transaction (or put `insert_from_arrays` with
`event_arrays` into a statement of their own); the relay in
`aetherops.bus` reads unpublished rows in id order and marks them published.
Only the relay that holds the leader lock reads and marks, so its rows need no
row locks and its statements no transaction: it runs them in autocommit on its
own connection, opened with `RELAY_SETTINGS`.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

__all__ = [
    "RELAY_SETTINGS",
    "OutboxEvent",
    "OutboxRow",
    "ScanFloor",
    "append",
    "backlog",
    "event_arrays",
    "fetch_unpublished",
    "insert_from_arrays",
    "last_id",
    "mark_published",
    "new_event_id",
    "prune_published",
]


RELAY_SETTINGS: Final = {"enable_sort": "off"}
"""Session settings of the relay's connection. `fetch_unpublished` must walk the partial index in id
order and stop at its limit. The planner cannot know how many rows are unpublished (the count
swings by thousands within a second, between analyses), guesses few, and with sorting allowed
reads and sorts the whole backlog on every claim: the relay falls further behind the more it is
behind."""


def new_event_id() -> str:
    """A fresh event id (a UUID4 string; it becomes the Nats-Msg-Id that JetStream deduplicates on)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class OutboxEvent:
    """An event to publish: `payload` is the encoded events.v1.Event envelope."""

    subject: str
    aggregate_id: str
    payload: bytes
    tracking_id: str = ""
    event_id: str = field(default_factory=new_event_id)


@dataclass(frozen=True)
class OutboxRow:
    """A fetched row. `location` is its physical address (ctid), what `mark_published` updates by:
    only the relay updates unpublished rows, so it does not move in between."""

    id: int
    event_id: str
    subject: str
    aggregate_id: str
    payload: bytes
    tracking_id: str
    location: tuple[int, int]


async def append(conn: asyncpg.Connection, events: Sequence[OutboxEvent]) -> None:
    """Writes events inside the caller's transaction."""
    if not events:
        return
    # COPY: one round trip and no per-row statement for a batch of any size.
    await conn.copy_records_to_table(
        "outbox",
        records=[(e.event_id, e.subject, e.aggregate_id, e.payload, e.tracking_id) for e in events],
        columns=["event_id", "subject", "aggregate_id", "payload", "tracking_id"],
    )


def insert_from_arrays(first: int) -> str:
    """SQL that inserts events given as the five parameter arrays `$first`.. (`event_arrays`' order),
    for a writer whose events go into the same statement as its own rows (one round trip)."""
    p = [f"${first + k}" for k in range(5)]
    return f"""INSERT INTO outbox (event_id, subject, aggregate_id, payload, tracking_id)
    SELECT * FROM unnest({p[0]}::uuid[], {p[1]}::text[], {p[2]}::text[], {p[3]}::bytea[], {p[4]}::text[])"""


def event_arrays(events: Sequence[OutboxEvent]) -> list[list[Any]]:
    """The parameters of `insert_from_arrays`: one array per column, one element per event."""
    return [
        [e.event_id for e in events],
        [e.subject for e in events],
        [e.aggregate_id for e in events],
        [e.payload for e in events],
        [e.tracking_id for e in events],
    ]


class ScanFloor:
    """Where the relay's search for unpublished rows starts: every row below it is published.

    Marking a row published leaves its entry in the partial index of unpublished rows until VACUUM
    removes it, and every search walks those entries from the lowest id up. With autovacuum off (as
    on some servers) nothing removes them: after 900,000 published events one claim of 200 rows took
    5.5 ms instead of 0.6 ms, and the relay claims about once per commit.

    The floor is never above an id that may still be unpublished. Ids are taken when a row is
    inserted, but the row is seen only when its transaction commits, and transactions commit out of
    id order; so the floor only passes ids taken more than `lag_s` ago (read off the id sequence
    once a second), and the lowest unpublished id a claim found. A transaction that commits later
    than that, with a lower id, is found by the search from the lowest id that runs every
    `full_scan_s` instead: late, but never lost.
    """

    def __init__(self, *, lag_s: float = 10.0, full_scan_s: float = 60.0) -> None:
        self.lag_s = lag_s
        self.full_scan_s = full_scan_s
        self.value = 0
        self._settled = 0  # the highest id taken more than `lag_s` ago (0: none known)
        self._marks: deque[tuple[float, int]] = deque()  # (time, the sequence's last id then)
        self._mark_due = -math.inf
        self._full_scan_due = -math.inf

    def mark_due(self, now: float) -> bool:
        """Whether to read the id sequence for `mark` now (about once a second)."""
        return now >= self._mark_due

    def mark(self, now: float, last: int) -> None:
        """Records the sequence's last id at `now`."""
        self._mark_due = now + 1.0
        self._marks.append((now, last))
        while self._marks and self._marks[0][0] <= now - self.lag_s:
            self._settled = self._marks.popleft()[1]

    def start(self, now: float) -> int:
        """The lowest id the next claim searches from: 0 once every `full_scan_s`."""
        if now >= self._full_scan_due:
            self._full_scan_due = now + self.full_scan_s
            return 0
        return self.value

    def claimed(self, lowest_unpublished: int | None) -> None:
        """After a claim that searched from `start()`: the lowest unpublished id it found, if any."""
        limit = self._settled + 1  # every id up to `_settled` is committed or abandoned by now
        self.value = limit if lowest_unpublished is None else min(lowest_unpublished, limit)


async def last_id(conn: asyncpg.Connection) -> int:
    """The last id the outbox's sequence handed out (0 if none)."""
    value = await conn.fetchval("SELECT pg_sequence_last_value(pg_get_serial_sequence('outbox', 'id')::regclass)")
    return int(value or 0)


async def fetch_unpublished(conn: asyncpg.Connection, limit: int, floor: int = 0) -> list[OutboxRow]:
    """The oldest unpublished rows with ids from `floor` (see `ScanFloor`), in id order. For the
    leader relay, on a connection opened with `RELAY_SETTINGS` (elsewhere the plan may read the
    whole backlog)."""
    rows = await conn.fetch(
        """SELECT ctid, id, event_id, subject, aggregate_id, payload, tracking_id FROM outbox
           WHERE published_time IS NULL AND id >= $2 ORDER BY id LIMIT $1""",
        limit,
        floor,
    )
    return [
        OutboxRow(
            r["id"],
            str(r["event_id"]),
            r["subject"],
            r["aggregate_id"],
            bytes(r["payload"]),
            r["tracking_id"],
            tuple(r["ctid"]),
        )
        for r in rows
    ]


async def mark_published(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    """Stamps rows returned by `fetch_unpublished` as published.

    By physical address: a TID scan whatever the planner knows. (`id = ANY($1)` with a few hundred
    ids makes a planner without statistics, as on a server with autovacuum off, read the whole table,
    and the table holds every event ever published.) The id check guards the address.
    """
    if rows:
        status = await conn.execute(
            "UPDATE outbox SET published_time = now() WHERE ctid = ANY($1::tid[]) AND id = ANY($2::bigint[])",
            [r.location for r in rows],
            [r.id for r in rows],
        )
        if int(status.split()[-1]) != len(rows):
            # Never expected (only the leader relay touches unpublished rows). In a transaction it
            # rolls back; either way the unmarked rows are published again (NATS deduplicates by
            # event id) rather than left behind.
            raise RuntimeError(f"outbox: marked {status.split()[-1]} of {len(rows)} fetched rows")


async def prune_published(conn: asyncpg.Connection, retention_s: float, limit: int = 10_000) -> int:
    """Deletes, among the `limit` oldest events (by id), those published more than `retention_s` ago
    (by the database's clock, which stamped them); returns how many.

    In bounded chunks so that pruning a long backlog never holds one long transaction; unpublished
    rows are never touched, however old. Only the head of the table is read: the relay publishes in
    id order, so the oldest rows are the first to pass the retention, and a chunk that deletes fewer
    than `limit` has reached rows still kept. Searching the whole table for old rows instead read
    every retained event (a week of them) each time nothing was old enough yet.
    """
    status = await conn.execute(
        """DELETE FROM outbox WHERE id IN (
               SELECT id FROM (SELECT id, published_time FROM outbox ORDER BY id LIMIT $2) AS head
               WHERE published_time < now() - make_interval(secs => $1)
           )""",
        float(retention_s),
        limit,
    )
    return int(status.split()[-1])


async def backlog(conn: asyncpg.Connection, floor: int = 0) -> tuple[int, datetime | None]:
    """Unpublished count and the creation time of the oldest, among ids from `floor` (metrics)."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, min(created_time) AS oldest FROM outbox WHERE published_time IS NULL AND id >= $1",
        floor,
    )
    assert row is not None
    return int(row["n"]), row["oldest"]
