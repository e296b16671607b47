"""Retention: deleting what has been kept long enough, in bounded chunks.

Three things grow for as long as the system runs: closed incidents with their alerts (duplicates
included), ended silences with the alerts they kept out of incidents, and the stored answers of
mutating requests (idempotency records). Each function here deletes one chunk of one of them, older
than a cutoff, in the caller's transaction, and says how many rows went; `aetherops.services.retention`
runs them in rounds. A chunk is found through an index (migration 0016), so a round that finds nothing
old enough reads a few index pages, however large the tables are.

Rows locked by another transaction are skipped (`SKIP LOCKED`): two replicas purging at once take
different chunks instead of waiting for each other.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

__all__ = ["Purged", "purge_closed_incidents", "purge_ended_silences", "purge_idempotency"]

Purged = tuple[int, int]
"""(parent rows deleted: incidents or silences, alert rows deleted with them)."""


async def _delete_with_alerts(conn: asyncpg.Connection, table: str, key: str, ids: list[str]) -> Purged:
    """Deletes the rows of `table` whose `key` is in `ids`, and the alerts that name them in that column."""
    if not ids:
        return 0, 0
    # One statement per partial index over the column (see `aetherops.db.correlation.merge_clusters`):
    # the planner uses a partial index only when the statement carries its condition.
    conditions = ("duplicate_of IS NULL", "duplicate_of IS NOT NULL") if key == "cluster_id" else ("true",)
    alerts = 0
    for condition in conditions:
        status = await conn.execute(f"DELETE FROM alerts WHERE {key} = ANY($1::text[]) AND {condition}", ids)
        alerts += int(status.split()[-1])
    status = await conn.execute(f"DELETE FROM {table} WHERE {key} = ANY($1::text[])", ids)
    return int(status.split()[-1]), alerts


async def purge_closed_incidents(conn: asyncpg.Connection, closed_before: datetime, max_alerts: int) -> Purged:
    """Deletes the incidents closed before `closed_before`, oldest first, with their alerts: as many
    incidents as hold `max_alerts` alerts together, and always at least one (so one incident larger than
    that still goes, in one transaction). Call in a transaction: an incident and its alerts go together."""
    rows = await conn.fetch(
        """SELECT cluster_id, alert_count + duplicate_count AS size FROM clusters
           WHERE status = 'CLOSED' AND closed_time < $1
           ORDER BY closed_time, cluster_id LIMIT 1000 FOR UPDATE SKIP LOCKED""",
        closed_before,
    )
    ids: list[str] = []
    total = 0
    for row in rows:
        if ids and total + row["size"] > max_alerts:
            break
        ids.append(row["cluster_id"])
        total += row["size"]
    return await _delete_with_alerts(conn, "clusters", "cluster_id", ids)


async def purge_ended_silences(conn: asyncpg.Connection, ended_before: datetime, limit: int) -> Purged:
    """Deletes up to `limit` silences that ended before `ended_before`, with the alerts they kept out of
    incidents. Call in a transaction."""
    ids = [
        r["silence_id"]
        for r in await conn.fetch(
            "SELECT silence_id FROM silences WHERE end_time < $1 ORDER BY end_time LIMIT $2 FOR UPDATE SKIP LOCKED",
            ended_before,
            limit,
        )
    ]
    return await _delete_with_alerts(conn, "silences", "silence_id", ids)


async def purge_idempotency(conn: asyncpg.Connection, created_before: datetime, limit: int) -> int:
    """Deletes up to `limit` idempotency records stored before `created_before`."""
    status = await conn.execute(
        # By the rows' addresses (a TID scan): joined back on the key instead, the planner of a table
        # without statistics read the whole table to find the chunk's rows.
        """DELETE FROM idempotency WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM idempotency WHERE created_time < $1
               ORDER BY created_time LIMIT $2 FOR UPDATE SKIP LOCKED
           ))""",
        created_before,
        limit,
    )
    return int(status.split()[-1])
