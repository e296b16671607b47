"""The ingest batch's replay lookup stays on the alerts primary key on a table PostgreSQL has never analysed.

Without statistics (a fresh table, or a server with autovacuum off) the planner takes each id of an
`= ANY(array)` condition to match 0.5% of the rows, so a batch of a few hundred ids looks like the
whole table and it plans a sequential scan: every ingest batch then reads every stored alert, and
throughput falls as the table grows. `pg_stat_get_xact_numscans` counts this transaction's
sequential scans of a table, so the checks need no timing.
"""

from __future__ import annotations

import uuid

import asyncpg

from aetherops.db import Database
from aetherops.db import correlation as repo

ROWS = 20_000
BATCH = 2_000


async def _seq_scans(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval("SELECT pg_stat_get_xact_numscans($1::regclass)", table))


async def test_known_alerts_probes_the_primary_key_on_an_unanalysed_table(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, root_cause_confidence, satellites, subsystems,
                   max_severity, first_alert_time, last_alert_time, opened_time, alert_count)
               VALUES ('c1', 'OPEN', 0, '{}', '{}', 1, now(), now(), now(), 0)"""
        )
        await conn.execute(
            """INSERT INTO alerts (alert_id, cluster_id, satellite_id, subsystem, severity, alert_time)
               SELECT 'a' || g, 'c1', 'SAT', 'power', 1, now() FROM generate_series(1, $1) AS g""",
            ROWS,
        )
    async with db.transaction() as conn:
        before = await _seq_scans(conn, "alerts")
        ids = [f"a{n}" for n in range(1, BATCH // 2 + 1)] + [uuid.uuid4().hex for _ in range(BATCH // 2)]
        known = await repo.known_alerts(conn, ids)
        assert await _seq_scans(conn, "alerts") == before
    assert set(known) == {f"a{n}" for n in range(1, BATCH // 2 + 1)}
    assert known["a7"] == ("c1", None)
