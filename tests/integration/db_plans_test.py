"""Per-batch queries stay on their indexes whatever the planner's statistics say.

Without statistics (a fresh table, or a server with autovacuum off) the planner takes each id of an
`= ANY(array)` condition to match 0.5% of the rows, so a batch of a few hundred ids looks like the
whole table and it plans a sequential scan: every ingest batch then reads every stored alert, and
throughput falls as the table grows. `pg_stat_get_xact_numscans` counts this transaction's
sequential scans of a table, so the checks need no timing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from aetherops.correlation import Alert
from aetherops.db import Database, outbox, retention
from aetherops.db import correlation as repo
from aetherops.services.correlation import INGEST_BATCH

ROWS = 20_000
BATCH = INGEST_BATCH


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
    assert known["a7"][:2] == ("c1", None)


async def test_claiming_outbox_rows_reads_the_oldest_few_not_the_whole_backlog(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO outbox (event_id, subject, aggregate_id, payload)
               SELECT gen_random_uuid(), 's', 'x', '\\x00' FROM generate_series(1, $1)""",
            ROWS,
        )
    # On a connection like the relay's (its session settings make the plan).
    async with db.dedicated(outbox.RELAY_SETTINGS) as conn, conn.transaction():
        returned = "SELECT pg_stat_get_xact_tuples_returned('outbox_unpublished'::regclass)"
        before = int(await conn.fetchval(returned))
        rows = await outbox.fetch_unpublished(conn, 100)
        read = int(await conn.fetchval(returned)) - before
    assert [r.id for r in rows] == sorted(r.id for r in rows) and len(rows) == 100
    assert read <= 200, f"read {read} index entries to claim 100 of {ROWS} unpublished rows"


async def test_an_event_costs_the_outbox_two_index_entries_at_most(db: Database) -> None:
    # The primary key, and the partial index of unpublished rows (left as soon as it is published).
    # A UNIQUE index on the random event UUID cost more with every retained event (migration 0007).
    names = await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'outbox' AND schemaname = $1", db.schema)
    assert {r["indexname"] for r in names} == {"outbox_pkey", "outbox_unpublished"}


async def test_pruning_reads_the_head_of_the_outbox_not_every_retained_event(db: Database) -> None:
    # A week of published events, none old enough yet: the once-a-minute prune must not read them all.
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO outbox (event_id, subject, aggregate_id, payload, published_time)
               SELECT gen_random_uuid(), 's', 'x', '\\x00', now() FROM generate_series(1, $1)""",
            ROWS,
        )
    async with db.transaction() as conn:
        fetched = "SELECT pg_stat_get_xact_tuples_fetched('outbox'::regclass)"
        before_scans, before_fetched = await _seq_scans(conn, "outbox"), int(await conn.fetchval(fetched))
        assert await outbox.prune_published(conn, 3600, limit=100) == 0
        assert await _seq_scans(conn, "outbox") == before_scans
        read = int(await conn.fetchval(fetched)) - before_fetched
    assert read <= 200, f"read {read} rows of {ROWS} to find nothing to prune"


@pytest.mark.parametrize("within_bytes", [None, 1 << 20], ids=["all", "what a response shows"])
async def test_alerts_of_a_page_of_clusters_come_from_the_cluster_index(db: Database, within_bytes: int | None) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, root_cause_confidence, satellites, subsystems,
                   max_severity, first_alert_time, last_alert_time, opened_time, alert_count)
               SELECT 'c' || g, 'OPEN', 0, '{}', '{}', 1, now(), now(), now(), 10
               FROM generate_series(1, $1) AS g""",
            ROWS // 10,
        )
        await conn.execute(
            """INSERT INTO alerts (alert_id, cluster_id, satellite_id, subsystem, severity, alert_time, duplicate_of)
               SELECT 'a' || g, 'c' || (g % $2 + 1), 'SAT', 'power', 1, now() - g * interval '1 ms',
                      CASE WHEN g <= $2 THEN 'a1' END
               FROM generate_series(1, $1) AS g""",
            ROWS,
            ROWS // 10,
        )
    page = [f"c{n}" for n in range(1, 502)]  # ListActiveClusters' largest page, plus its look-ahead row
    async with db.transaction() as conn:
        before = await _seq_scans(conn, "alerts")
        alerts = await repo.get_alerts(conn, page, within_bytes=within_bytes)
        assert await _seq_scans(conn, "alerts") == before
    assert set(alerts) == set(page)
    for cid, listed in alerts.items():
        assert len(listed) == 9, cid  # ten alerts each, one of them a duplicate
        assert [a.timestamp for a in listed] == sorted(a.timestamp for a in listed)


async def test_the_incident_history_pages_down_the_primary_key(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, root_cause_confidence, satellites, subsystems,
                   max_severity, first_alert_time, last_alert_time, opened_time, alert_count)
               SELECT lpad(g::text, 8, '0'), CASE WHEN g % 2 = 0 THEN 'OPEN' ELSE 'CLOSED' END, 0, '{}', '{}',
                      1, now(), now(), now(), 0
               FROM generate_series(1, $1) AS g""",
            ROWS,
        )
    # An operator's query, not a per-batch one: unlike those above, it counts on the statistics
    # autovacuum keeps (without them the planner takes `status = 'CLOSED'` to match a few rows, and
    # sorts what it finds in the table rather than walk the key).
    await db.execute("ANALYZE clusters")
    pages: list[list[str]] = []
    async with db.transaction() as conn:
        before = await _seq_scans(conn, "clusters")
        for status, after in (("OPEN", None), ("CLOSED", None), ("OPEN", "00019000"), (None, "00019000")):
            page = await repo.list_clusters(
                conn, status=status, satellite_id="", min_severity=0, start=None, end=None, limit=51, after=after
            )
            pages.append([c.cluster_id for c in page])
        assert await _seq_scans(conn, "clusters") == before
    assert pages[0] == [f"{n:08d}" for n in range(ROWS, ROWS - 102, -2)]
    assert pages[1] == [f"{n:08d}" for n in range(ROWS - 1, ROWS - 103, -2)]
    assert pages[2] == [f"{n:08d}" for n in range(18998, 18998 - 102, -2)]
    assert pages[3] == [f"{n:08d}" for n in range(18999, 18999 - 51, -1)]


async def test_every_stored_alert_names_a_stored_cluster_checked_without_reading_the_table(db: Database) -> None:
    # The check that replaced the foreign key (0006) probes each distinct cluster of a statement,
    # however many clusters are stored and whatever the planner knows about them.
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, first_alert_time, last_alert_time, opened_time)
               SELECT 'c' || g, 'OPEN', now(), now(), now() FROM generate_series(1, $1) AS g""",
            ROWS,
        )
    columns = ["alert_id", "cluster_id", "satellite_id", "subsystem", "severity", "alert_time"]
    columns += ["message", "labels", "duplicate_of", "tracking_id"]
    rest = ("SAT", "power", 1, datetime.now(UTC), "", {}, None, "")  # the columns after the two ids
    async with db.transaction() as conn:
        before = await _seq_scans(conn, "clusters")
        rows = [(f"a{n}", f"c{n % 500 + 1}", *rest) for n in range(BATCH)]
        await conn.copy_records_to_table("alerts", records=rows, columns=columns)
        assert await _seq_scans(conn, "clusters") == before
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="cluster nowhere"):
        async with db.transaction() as conn:
            await conn.copy_records_to_table(
                "alerts", records=[("b1", "c1", *rest), ("b2", "nowhere", *rest)], columns=columns
            )
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id LIKE 'b%'") == 0


async def test_an_ingest_batch_updates_its_clusters_through_the_primary_key(db: Database) -> None:
    # `write_batch` updates each changed cluster by its key. Joined to an array parameter instead, on
    # an unanalysed table the planner hashed every stored cluster for 500 of them: this guards that.
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, first_alert_time, last_alert_time, opened_time)
               SELECT 'c' || g, 'OPEN', now(), now(), now() FROM generate_series(1, $1) AS g""",
            ROWS,
        )
    now = datetime.now(UTC)
    changed = [
        repo.ClusterRecord(f"c{n}", "OPEN", None, 0.5, ["SAT"], ["power"], 3, now, now, now, 2, 0)
        for n in range(1, 501)
    ]
    rows = [repo.AlertRow(Alert(f"a{n}", "SAT", "power", 3, now), f"c{n % 500 + 1}", None, "") for n in range(BATCH)]
    async with db.transaction() as conn:
        before = await _seq_scans(conn, "clusters")
        await repo.write_batch(conn, changed, set(), {"c1"}, rows, [])
        assert await _seq_scans(conn, "clusters") == before
    assert await db.fetchval("SELECT count(*) FROM clusters WHERE alert_count = 2") == 500
    assert await db.fetchval("SELECT satellites FROM clusters WHERE cluster_id = 'c1'") == ["SAT"]
    assert await db.fetchval("SELECT satellites FROM clusters WHERE cluster_id = 'c2'") == []  # not grown


async def test_a_retention_round_finds_what_to_delete_without_reading_what_is_kept(db: Database) -> None:
    old = 1_000  # a full chunk of silences and of idempotency records
    # A table's worth of recent rows, kept, and a full chunk of old ones of each kind: each purge reaches
    # the old ones through an index (migration 0016), and their alerts through theirs, not by reading
    # every kept row, however large the tables. (With one old row, a delete of the alerts of `= ANY` of
    # the chunk's ids used the index; with a chunk of 300, the planner of a table without statistics
    # read all of it, twice per chunk.)
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO clusters (cluster_id, status, first_alert_time, last_alert_time, opened_time, closed_time,
                   alert_count)
               SELECT 'c' || g, 'CLOSED', now(), now(), now(), now() - CASE WHEN g <= $2 THEN interval '200 days'
                   ELSE interval '1 day' END, 1
               FROM generate_series(1, $1) AS g""",
            ROWS,
            old,
        )
        await conn.execute(
            """INSERT INTO alerts (alert_id, cluster_id, satellite_id, subsystem, severity, alert_time)
               SELECT 'a' || g, 'c' || g, 'SAT', 'power', 1, now() FROM generate_series(1, $1) AS g""",
            ROWS,
        )
        await conn.execute(
            """INSERT INTO silences (silence_id, start_time, end_time, comment, create_time)
               SELECT 's' || g, now() - interval '201 days', now() - CASE WHEN g <= $2 THEN interval '200 days'
                   ELSE interval '0 days' END, 'burn', now() - interval '300 days'
               FROM generate_series(1, $1) AS g""",
            ROWS,
            old,
        )
        await conn.execute(
            """INSERT INTO alerts (alert_id, silence_id, satellite_id, subsystem, severity, alert_time)
               SELECT 'b' || g, 's' || g, 'SAT', 'power', 1, now() FROM generate_series(1, $1) AS g""",
            ROWS,
        )
        await conn.execute(
            """INSERT INTO idempotency (scope, request_id, response, created_time)
               SELECT 't', 'r' || g, '{}', now() - CASE WHEN g <= $2 THEN interval '30 days' ELSE interval '0 days' END
               FROM generate_series(1, $1) AS g""",
            ROWS,
            old,
        )
    cutoff = datetime.now(UTC) - timedelta(days=90)
    tables = ("clusters", "alerts", "silences", "idempotency")
    async with db.transaction() as conn:
        before = [await _seq_scans(conn, t) for t in tables]
        purged = (
            await retention.purge_closed_incidents(conn, cutoff, 20_000),
            await retention.purge_ended_silences(conn, cutoff, 1_000, 20_000),
            await retention.purge_idempotency(conn, datetime.now(UTC) - timedelta(days=7), 1_000),
        )
        assert [await _seq_scans(conn, t) for t in tables] == before
    assert purged == ((old, old), (old, old), old)
