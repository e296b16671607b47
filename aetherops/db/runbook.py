"""PostgreSQL repository for runbooks and the execution event store.

`execution_events` is the source of truth; `executions` is an index written in the same transaction
(status, version, who started it, for which incident or request, under which tracking id). Appending
events whose seq already exists raises ConflictError: another writer advanced the stream first
(optimistic concurrency). Each event row keeps the tracking id of the request that caused it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from aetherops.errors import AlreadyExistsError, ConflictError
from aetherops.runbook import ExecutionEvent, event_from_dict, event_to_dict

__all__ = [
    "ExecutionRow",
    "RunbookRow",
    "append_events",
    "definition_of",
    "execution_version",
    "get_execution",
    "get_runbook",
    "insert_execution",
    "insert_runbook",
    "latest_versions",
    "list_executions",
    "list_latest_runbooks",
    "load_events",
    "load_runbooks",
    "unfinished_executions",
    "update_execution",
]


@dataclass(frozen=True)
class RunbookRow:
    runbook_id: str
    version: int
    definition: dict[str, Any]
    created_time: datetime


@dataclass(frozen=True)
class ExecutionRow:
    """The `executions` index entry of one stream."""

    execution_id: str
    runbook_id: str
    runbook_version: int
    triggered_by: str
    status: str
    version: int
    current_step_index: int
    incident_id: str
    start_request_id: str | None
    started_time: datetime
    finished_time: datetime | None
    updated_time: datetime
    tracking_id: str = ""


def _runbook(row: asyncpg.Record) -> RunbookRow:
    return RunbookRow(row["runbook_id"], row["version"], dict(row["definition"]), row["created_time"])


async def insert_runbook(conn: asyncpg.Connection, row: RunbookRow) -> None:
    """AlreadyExistsError when that version was stored meanwhile (a concurrent registration)."""
    try:
        await conn.execute(
            "INSERT INTO runbooks (runbook_id, version, definition, created_time) VALUES ($1, $2, $3, $4)",
            row.runbook_id,
            row.version,
            row.definition,
            row.created_time,
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExistsError(f"runbook {row.runbook_id!r} v{row.version} was registered concurrently") from exc


async def get_runbook(conn: asyncpg.Connection, runbook_id: str, version: int = 0) -> RunbookRow | None:
    """The given version, or the latest with version 0."""
    if version:
        row = await conn.fetchrow("SELECT * FROM runbooks WHERE runbook_id = $1 AND version = $2", runbook_id, version)
    else:
        row = await conn.fetchrow(
            "SELECT * FROM runbooks WHERE runbook_id = $1 ORDER BY version DESC LIMIT 1", runbook_id
        )
    return _runbook(row) if row is not None else None


async def load_runbooks(conn: asyncpg.Connection, runbook_id: str = "", after_version: int = 0) -> list[RunbookRow]:
    """Every stored version (of one runbook, newer than `after_version`, when given), oldest first."""
    if runbook_id:
        rows = await conn.fetch(
            "SELECT * FROM runbooks WHERE runbook_id = $1 AND version > $2 ORDER BY version",
            runbook_id,
            after_version,
        )
    else:
        rows = await conn.fetch("SELECT * FROM runbooks ORDER BY runbook_id, version")
    return [_runbook(r) for r in rows]


async def latest_versions(conn: asyncpg.Connection) -> dict[str, int]:
    """runbook_id -> latest version number."""
    rows = await conn.fetch("SELECT runbook_id, max(version) AS v FROM runbooks GROUP BY runbook_id")
    return {r["runbook_id"]: r["v"] for r in rows}


async def list_latest_runbooks(conn: asyncpg.Connection, *, after_id: str, limit: int) -> list[RunbookRow]:
    """One page of the latest version of every runbook, by id (keyset pagination)."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (runbook_id) * FROM runbooks WHERE runbook_id > $1
           ORDER BY runbook_id, version DESC LIMIT $2""",
        after_id,
        limit,
    )
    return [_runbook(r) for r in rows]


def _event_args(event: ExecutionEvent) -> tuple[Any, ...]:
    d = event_to_dict(event)
    return (
        d["execution_id"],
        d["seq"],
        d["type"],
        event.occurred_time,
        d["actor"],
        d["data"],
        d["schema_version"],
        d["tracking_id"],
    )


async def append_events(conn: asyncpg.Connection, events: Sequence[ExecutionEvent]) -> None:
    """ConflictError when one of the seqs is taken: someone else advanced the stream."""
    if not events:
        return
    try:
        await conn.executemany(
            """INSERT INTO execution_events
                   (execution_id, seq, type, occurred_time, actor, data, schema_version, tracking_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            [_event_args(e) for e in events],
        )
    except asyncpg.UniqueViolationError as exc:
        first = events[0]
        raise ConflictError(
            f"execution {first.execution_id!r} was advanced concurrently (seq {first.seq} exists); retry"
        ) from exc


def _raw_event(row: asyncpg.Record) -> dict[str, Any]:
    """The stored row as the dict of its schema version, for the core's upcaster."""
    if row["schema_version"] == 1:
        # v1 rows keep v1 vocabulary in the columns: type holds the lower-case kind, actor the `by`.
        return {
            "schema_version": 1,
            "execution_id": row["execution_id"],
            "seq": row["seq"],
            "kind": row["type"],
            "by": row["actor"],
            "ts": row["occurred_time"].timestamp(),
            "data": dict(row["data"]),
            "tracking_id": row["tracking_id"],
        }
    return {
        "schema_version": row["schema_version"],
        "execution_id": row["execution_id"],
        "seq": row["seq"],
        "type": row["type"],
        "occurred_time": row["occurred_time"].isoformat(),
        "actor": row["actor"],
        "data": dict(row["data"]),
        "tracking_id": row["tracking_id"],
    }


async def load_events(conn: asyncpg.Connection, execution_id: str) -> list[ExecutionEvent]:
    """The whole stream in seq order, upcast to the current schema."""
    rows = await conn.fetch("SELECT * FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id)
    return [event_from_dict(_raw_event(r)) for r in rows]


_EXECUTION_COLUMNS = """execution_id, runbook_id, runbook_version, triggered_by, status, version, current_step_index,
    incident_id, start_request_id, started_time, finished_time, updated_time, tracking_id"""


def _execution(row: asyncpg.Record) -> ExecutionRow:
    return ExecutionRow(**{k: row[k] for k in ExecutionRow.__dataclass_fields__})


async def insert_execution(conn: asyncpg.Connection, row: ExecutionRow) -> None:
    """AlreadyExistsError when the id (or the start request id) is taken."""
    try:
        await conn.execute(
            f"""INSERT INTO executions ({_EXECUTION_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
            row.execution_id,
            row.runbook_id,
            row.runbook_version,
            row.triggered_by,
            row.status,
            row.version,
            row.current_step_index,
            row.incident_id,
            row.start_request_id,
            row.started_time,
            row.finished_time,
            row.updated_time,
            row.tracking_id,
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExistsError(f"execution {row.execution_id!r} exists already") from exc


async def update_execution(
    conn: asyncpg.Connection,
    execution_id: str,
    *,
    status: str,
    version: int,
    current_step_index: int,
    finished_time: datetime | None,
    updated_time: datetime,
) -> None:
    await conn.execute(
        """UPDATE executions SET status = $2, version = $3, current_step_index = $4, finished_time = $5,
               updated_time = $6
           WHERE execution_id = $1""",
        execution_id,
        status,
        version,
        current_step_index,
        finished_time,
        updated_time,
    )


async def get_execution(
    conn: asyncpg.Connection, execution_id: str = "", *, start_request_id: str = ""
) -> ExecutionRow | None:
    if start_request_id:
        row = await conn.fetchrow(
            f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE start_request_id = $1", start_request_id
        )
    else:
        row = await conn.fetchrow(f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE execution_id = $1", execution_id)
    return _execution(row) if row is not None else None


async def execution_version(conn: asyncpg.Connection, execution_id: str) -> int | None:
    """The committed length of the stream (None: no such execution)."""
    value = await conn.fetchval("SELECT max(seq) FROM execution_events WHERE execution_id = $1", execution_id)
    return int(value) if value is not None else None


async def list_executions(
    conn: asyncpg.Connection,
    *,
    tracking_id: str = "",
    incident_id: str = "",
    runbook_id: str = "",
    status: str = "",
    after: tuple[datetime, str] | None = None,
    limit: int,
) -> list[ExecutionRow]:
    """One page of executions, newest start first (keyset pagination on (started_time, execution_id)).

    `tracking_id` matches executions started under it and those with a transition a request under it
    caused (an ApproveStep's tracking id leads to the execution it approved)."""
    clauses: list[str] = []
    args: list[Any] = []
    if tracking_id:
        args.append(tracking_id)
        n = len(args)
        clauses.append(
            f"""execution_id IN (SELECT execution_id FROM executions WHERE tracking_id = ${n}
                UNION SELECT execution_id FROM execution_events WHERE tracking_id = ${n})"""
        )
    for column, value in (("incident_id", incident_id), ("runbook_id", runbook_id), ("status", status)):
        if value:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    if after is not None:
        args.extend(after)
        clauses.append(f"(started_time, execution_id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(
        f"""SELECT {_EXECUTION_COLUMNS} FROM executions {where}
            ORDER BY started_time DESC, execution_id DESC LIMIT ${len(args)}""",
        *args,
    )
    return [_execution(r) for r in rows]


async def unfinished_executions(conn: asyncpg.Connection, *, idle_before: datetime | None = None) -> list[ExecutionRow]:
    """Executions with anything left to do (running, or a rollback under way: finished_time is NULL),
    only those last changed before `idle_before` when given."""
    if idle_before is None:
        rows = await conn.fetch(f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE finished_time IS NULL")
    else:
        rows = await conn.fetch(
            f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE finished_time IS NULL AND updated_time < $1",
            idle_before,
        )
    return [_execution(r) for r in rows]


def definition_of(runbook_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a stored definition holds: the runbook dict without the columns kept apart."""
    return {k: v for k, v in runbook_dict.items() if k not in ("version", "create_time")}
