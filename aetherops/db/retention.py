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


async def _delete_with_alerts(
    conn: asyncpg.Connection, table: str, key: str, rows: list[asyncpg.Record], max_alerts: int | None = None
) -> Purged:
    """Deletes `rows` of `table` (locked, read with their `ctid` and `key`), and the alerts that name them
    in that column. With `max_alerts`, at most that many alerts: if that many went, some may be left,
    and the rows stay for a later chunk (which says so with 0 rows deleted).

    Every row is reached by its address or through an index, one key at a time, whatever the planner
    knows: with `key = ANY($1)` over a chunk of a few hundred ids, the planner of a table without
    statistics (a fresh or never-analysed one) read the whole table, three times per chunk."""
    if not rows:
        return 0, 0
    ids = [r[key] for r in rows]
    # One statement per partial index over the column (see `aetherops.db.correlation.merge_clusters`):
    # the planner uses a partial index only when the statement carries its condition. OFFSET 0 keeps it
    # from flattening the lateral subquery back into a join of the array.
    conditions = ("duplicate_of IS NULL", "duplicate_of IS NOT NULL") if key == "cluster_id" else ("true",)
    alerts = 0
    for condition in conditions:
        status = await conn.execute(
            f"""DELETE FROM alerts WHERE ctid = ANY(ARRAY(
                    SELECT a.ctid FROM unnest($1::text[]) AS k(id)
                    CROSS JOIN LATERAL (
                        SELECT ctid FROM alerts WHERE alerts.{key} = k.id AND {condition} OFFSET 0
                    ) AS a
                    LIMIT $2
                ))""",
            ids,
            max_alerts,  # NULL: no limit
        )
        alerts += int(status.split()[-1])
    if max_alerts is not None and alerts >= max_alerts:
        return 0, alerts
    # By address (the rows are locked, so nobody moved them), through a TID scan: given as the array
    # itself, a thousand addresses made the planner of a table without statistics read all of it.
    status = await conn.execute(
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT unnest($1::tid[])))", [r["ctid"] for r in rows]
    )
    return int(status.split()[-1]), alerts


async def purge_closed_incidents(conn: asyncpg.Connection, closed_before: datetime, max_alerts: int) -> Purged:
    """Deletes the incidents closed before `closed_before`, oldest first, with their alerts: as many
    incidents as hold `max_alerts` alerts together, and always at least one (so one incident larger than
    that still goes, in one transaction). Call in a transaction: an incident and its alerts go together."""
    rows = await conn.fetch(
        """SELECT ctid, cluster_id, alert_count + duplicate_count AS size FROM clusters
           WHERE status = 'CLOSED' AND closed_time < $1
           ORDER BY closed_time, cluster_id LIMIT 1000 FOR UPDATE SKIP LOCKED""",
        closed_before,
    )
    chunk: list[asyncpg.Record] = []
    total = 0
    for row in rows:
        if chunk and total + row["size"] > max_alerts:
            break
        chunk.append(row)
        total += row["size"]
    return await _delete_with_alerts(conn, "clusters", "cluster_id", chunk)


async def purge_ended_silences(conn: asyncpg.Connection, ended_before: datetime, limit: int, max_alerts: int) -> Purged:
    """Deletes up to `limit` silences that ended before `ended_before`, with the alerts they kept out of
    incidents, at most `max_alerts` of those: a silence over an alert storm keeps out any number. When
    that many went, the silences stay for the next chunk, which goes on with their alerts; they go once
    none is left. Unlike an incident's, a silence's alerts need not go at once: it ended longer ago than
    a late alert is covered (`aetherops.config.MIN_INCIDENT_RETENTION_S`), so no alert joins it any more."""
    rows = await conn.fetch(
        """SELECT ctid, silence_id FROM silences WHERE end_time < $1 ORDER BY end_time LIMIT $2
           FOR UPDATE SKIP LOCKED""",
        ended_before,
        limit,
    )
    return await _delete_with_alerts(conn, "silences", "silence_id", rows, max_alerts)


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
