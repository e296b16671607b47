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

__all__ = ["OutboxEvent", "OutboxRow", "append", "backlog", "fetch_unpublished", "mark_published"]


@dataclass(frozen=True)
class OutboxEvent:
    """An event to publish: `payload` is the encoded events.v1.Event envelope."""

    subject: str
    aggregate_id: str
    payload: bytes
    tracking_id: str = ""
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


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
    await conn.executemany(
        "INSERT INTO outbox (event_id, subject, aggregate_id, payload, tracking_id) VALUES ($1, $2, $3, $4, $5)",
        [(uuid.UUID(e.event_id), e.subject, e.aggregate_id, e.payload, e.tracking_id) for e in events],
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
