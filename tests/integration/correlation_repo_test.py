"""The correlation repository against PostgreSQL: an ingest batch is written whole, whichever way
`write_batch` takes (one statement for small batches, COPY for large ones)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from aetherops.correlation import Alert
from aetherops.db import Database, outbox
from aetherops.db import correlation as repo


@pytest.mark.parametrize("alerts", [1, repo.STATEMENT_ROWS, repo.STATEMENT_ROWS + 1])
async def test_a_batch_writes_its_clusters_alerts_and_events(db: Database, alerts: int) -> None:
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)

    def record(cid: str, count: int, sats: list[str]) -> repo.ClusterRecord:
        return repo.ClusterRecord(
            cid, "OPEN", "a0", 0.5, sats, ["power"], 4, t0, t0 + timedelta(seconds=count), t0, count, 0
        )

    async with db.connection() as conn:  # an incident stored by an earlier batch
        await repo.write_batch(conn, [record("old", 1, ["SAT-0"])], {"old"}, {"old"}, [], [])
    first = [
        repo.AlertRow(Alert(f"a{n}", "SAT-1", "power", 4, t0 + timedelta(seconds=n)), "new", None, "t")
        for n in range(alerts)
    ]
    later = repo.AlertRow(Alert("b0", "SAT-2", "power", 4, t0), "old", None, "")
    events = [outbox.OutboxEvent("incidents.opened", "new", b"x"), outbox.OutboxEvent("incidents.updated", "old", b"y")]
    opened = dataclasses.replace(record("new", alerts, ["SAT-1"]), opened_by_alert_id="a0")
    clusters = [opened, record("old", 2, ["SAT-0", "SAT-2"])]
    async with db.connection() as conn:
        await repo.write_batch(conn, clusters, {"new"}, {"old"}, [*first, later], events)

    stored = {r["cluster_id"]: r for r in await db.fetch("SELECT * FROM clusters")}
    assert stored["new"]["alert_count"] == alerts and list(stored["new"]["satellites"]) == ["SAT-1"]
    assert stored["old"]["alert_count"] == 2 and list(stored["old"]["satellites"]) == ["SAT-0", "SAT-2"]
    assert stored["old"]["last_alert_time"] == t0 + timedelta(seconds=2)
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE cluster_id = 'new' AND tracking_id = 't'") == alerts
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE cluster_id = 'old'") == 1
    assert [r["aggregate_id"] for r in await db.fetch("SELECT aggregate_id FROM outbox ORDER BY id")] == ["new", "old"]
    # A resend is answered with whether the alert opened its cluster (the first answer may be lost).
    async with db.connection() as conn:
        known = await repo.known_alerts(conn, ["a0", f"a{alerts - 1}", "b0", "never"])
    assert known["a0"].opened and not known["b0"].opened and "never" not in known
    assert known[f"a{alerts - 1}"].opened == (alerts == 1)


async def test_a_batch_that_fails_writes_nothing(db: Database) -> None:
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
    old = repo.ClusterRecord("old", "OPEN", "a0", 0.5, ["SAT-0"], ["power"], 4, t0, t0, t0, 1, 0)
    async with db.connection() as conn:
        await repo.write_batch(conn, [old], {"old"}, set(), [], [])
    grown = dataclasses.replace(old, alert_count=99)
    for size in (1, repo.STATEMENT_ROWS + 1):
        rows = [repo.AlertRow(Alert(f"{size}-{n}", "SAT-1", "power", 4, t0), "nowhere", None, "") for n in range(size)]
        event = outbox.OutboxEvent("incidents.updated", "old", b"")
        # An alert of no stored incident: the batch is refused, the update of "old" with it.
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="cluster nowhere"):
            async with db.connection() as conn:
                await repo.write_batch(conn, [grown], set(), set(), rows, [event])
    assert await db.fetchval("SELECT alert_count FROM clusters WHERE cluster_id = 'old'") == 1
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_a_cluster_is_read_with_its_oldest_alerts_and_its_root_cause_found_beyond_them(db: Database) -> None:
    # A storm's incident holds more alerts than an answer shows: only those are read, yet the root
    # cause (here the last alert) is still found for the events and IdentifyRootCause.
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
    record = repo.ClusterRecord("big", "OPEN", "a4", 0.9, ["SAT-1"], ["power"], 4, t0, t0, t0, 5, 0)
    rows = [
        repo.AlertRow(Alert(f"a{n}", "SAT-1", "power", 4, t0 + timedelta(seconds=5 - n)), "big", None, "")
        for n in range(5)
    ]
    async with db.connection() as conn:
        await repo.write_batch(conn, [record], {"big"}, {"big"}, rows, [])
        every = await repo.get_cluster(conn, "big")
        # Each of these alerts costs a response at least this many bytes (see `repo.get_alerts`).
        each = len("a0") + len("SAT-1") + len("power") + repo.ALERT_BYTES_FLOOR
        oldest = await repo.get_cluster(conn, "big", alert_bytes=2 * each + each - 1)
        bare = await repo.get_cluster(conn, "big", alert_bytes=0)
        assert every is not None and oldest is not None and bare is not None
        assert [a.alert_id for a in every.alerts] == ["a4", "a3", "a2", "a1", "a0"]
        assert [a.alert_id for a in oldest.alerts] == ["a4", "a3"]
        assert bare.alerts == []
        page = await repo.list_active(
            conn, since=t0, satellite_id="", min_severity=0, limit=10, after=None, alert_bytes=each
        )
        assert [[a.alert_id for a in c.alerts] for c in page] == [["a4"]]
        for read in (every, bare):
            root = await repo.root_alert(conn, read)
            assert root is not None and root.alert_id == "a4"
        moved = dataclasses.replace(bare, root_cause_alert_id="a0")  # not among the alerts read
        root = await repo.root_alert(conn, moved)
        assert root is not None and root.alert_id == "a0"
