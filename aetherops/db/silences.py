"""PostgreSQL repository for silences (see `aetherops.silences`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from aetherops.silences import Silence

__all__ = ["expire", "get", "insert", "list_page", "within_reach"]

_COLUMNS = """silence_id, satellite_ids, subsystems, labels, start_time, end_time, comment, created_by,
    create_time, expired_by, expire_time"""


def _silence(row: asyncpg.Record) -> Silence:
    return Silence(
        silence_id=row["silence_id"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        comment=row["comment"],
        satellite_ids=frozenset(row["satellite_ids"]),
        subsystems=frozenset(row["subsystems"]),
        labels=dict(row["labels"]),
        created_by=row["created_by"],
        create_time=row["create_time"],
        expired_by=row["expired_by"],
        expire_time=row["expire_time"],
    )


async def insert(conn: asyncpg.Connection, s: Silence) -> None:
    await conn.execute(
        f"INSERT INTO silences ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        s.silence_id,
        sorted(s.satellite_ids),
        sorted(s.subsystems),
        dict(s.labels),
        s.start_time,
        s.end_time,
        s.comment,
        s.created_by,
        s.create_time,
        s.expired_by,
        s.expire_time,
    )


async def get(conn: asyncpg.Connection, silence_id: str, *, for_update: bool = False) -> Silence | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM silences WHERE silence_id = $1{lock}", silence_id)
    return None if row is None else _silence(row)


async def expire(conn: asyncpg.Connection, s: Silence) -> None:
    """Stores an expired silence's new window (its start moves too if it had not started) and who ended it."""
    await conn.execute(
        "UPDATE silences SET start_time = $2, end_time = $3, expired_by = $4, expire_time = $5 WHERE silence_id = $1",
        s.silence_id,
        s.start_time,
        s.end_time,
        s.expired_by,
        s.expire_time,
    )


async def within_reach(conn: asyncpg.Connection, ended_after: datetime) -> list[Silence]:
    """The silences that end after `ended_after`: those that can still cover an alert."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM silences WHERE end_time > $1", ended_after)
    return [_silence(r) for r in rows]


async def list_page(
    conn: asyncpg.Connection,
    *,
    ended_after: datetime | None,
    satellite_id: str,
    after: str | None,
    limit: int,
) -> list[Silence]:
    """One page of silences, most recently created first (keyset pagination by id). `satellite_id`:
    those that apply to its alerts, naming it or naming no satellite (those apply to every one)."""
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("end_time > ${}", ended_after),
        ("(cardinality(satellite_ids) = 0 OR ${} = ANY(satellite_ids))", satellite_id or None),
        ("silence_id < ${}", after),
    ):
        if value is not None:
            args.append(value)
            clauses.append(clause.format(len(args)))
    args.append(limit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM silences {where} ORDER BY silence_id DESC LIMIT ${len(args)}", *args
    )
    return [_silence(r) for r in rows]
