"""The transactional outbox: events are rows written with the state change they describe.

Writers call `append` on the connection of their transaction; the relay in
`aetherops.bus` reads unpublished rows in id order and marks them published.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

__all__ = ["OutboxEvent", "OutboxRow", "append", "backlog", "fetch_unpublished", "mark_published", "new_event_id"]


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
    id: int
    event_id: str
    subject: str
    aggregate_id: str
    payload: bytes
    tracking_id: str


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


async def fetch_unpublished(conn: asyncpg.Connection, limit: int) -> list[OutboxRow]:
    """The oldest unpublished rows, locked so that another relay replica skips them."""
    rows = await conn.fetch(
        """SELECT id, event_id, subject, aggregate_id, payload, tracking_id FROM outbox
           WHERE published_time IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return [
        OutboxRow(
            r["id"],
            str(r["event_id"]),
            r["subject"],
            r["aggregate_id"],
            bytes(r["payload"]),
            r["tracking_id"],
        )
        for r in rows
    ]


async def mark_published(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    if ids:
        await conn.execute("UPDATE outbox SET published_time = now() WHERE id = ANY($1::bigint[])", list(ids))


async def backlog(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """Unpublished count and the creation time of the oldest (metrics)."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, min(created_time) AS oldest FROM outbox WHERE published_time IS NULL"
    )
    assert row is not None
    return int(row["n"]), row["oldest"]
