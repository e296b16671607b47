"""Retention against real PostgreSQL: what is past its retention goes (incidents with their alerts,
ended silences with the alerts they kept out, idempotency records) in bounded chunks, and nothing else
does; through a server, a round at start makes an old closed incident NOT_FOUND and its re-sent alert
new again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _poll import eventually
from google.protobuf import struct_pb2

from aetherops.clock import ManualClock
from aetherops.db import Database
from aetherops.db import retention as repo
from aetherops.services.retention import Retention
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.runbook.v1 import runbook_pb2 as rpb
from gen.aetherops.runbook.v1 import runbook_pb2_grpc
from servers.convert import to_ts

DAY = 86400.0
NOW = datetime(2026, 6, 1, tzinfo=UTC)


async def _cluster(db: Database, cluster_id: str, *, closed_days_ago: float | None, alerts: int, dups: int = 0) -> None:
    """A stored incident (closed that many days before NOW, or open) with its alerts and duplicates."""
    closed = None if closed_days_ago is None else NOW - timedelta(days=closed_days_ago)
    old = NOW - timedelta(days=200)
    await db.execute(
        """INSERT INTO clusters (cluster_id, status, first_alert_time, last_alert_time, opened_time, closed_time,
               alert_count, duplicate_count)
           VALUES ($1::text, $2, $3, $3, $3, $4, $5, $6)""",
        cluster_id,
        "OPEN" if closed is None else "CLOSED",
        old,
        closed,
        alerts,
        dups,
    )
    await db.execute(
        """INSERT INTO alerts (alert_id, cluster_id, satellite_id, subsystem, severity, alert_time, duplicate_of)
           SELECT $1 || '-a' || g, $1, 'SAT', 'power', 3, $2, CASE WHEN g > $3::int THEN $1 || '-a1' END
           FROM generate_series(1, $3::int + $4::int) AS g""",
        cluster_id,
        old,
        alerts,
        dups,
    )


async def _silence(db: Database, silence_id: str, *, ended_days_ago: float, alerts: int) -> None:
    end = NOW - timedelta(days=ended_days_ago)
    await db.execute(
        """INSERT INTO silences (silence_id, start_time, end_time, comment, create_time)
           VALUES ($1, $2, $3, 'burn', $2)""",
        silence_id,
        end - timedelta(hours=1),
        end,
    )
    await db.execute(
        """INSERT INTO alerts (alert_id, silence_id, satellite_id, subsystem, severity, alert_time)
           SELECT $1 || '-s' || g, $1, 'SAT', 'propulsion', 2, $2 FROM generate_series(1, $3::int) AS g""",
        silence_id,
        end,
        alerts,
    )


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def _rounds_delete(app: Any, db: Database, table: str, key: str, value: str) -> None:
    """Runs retention rounds of `app` until its row of `table` whose `key` is `value` is gone (again, while
    the round at start may still hold a chunk)."""
    retention: Retention | None = app.retention
    assert retention is not None

    async def gone() -> bool:
        await retention.run_once()
        return bool(await db.fetchval(f"SELECT count(*) FROM {table} WHERE {key} = $1", value) == 0)

    await eventually(gone, what=f"{table} {value} deleted past its retention")


async def _ids(db: Database, query: str) -> set[str]:
    return {r[0] for r in await db.fetch(query)}


async def test_a_round_deletes_what_is_past_its_retention_and_nothing_else(db: Database) -> None:
    await _cluster(db, "c-old", closed_days_ago=100, alerts=3, dups=2)
    await _cluster(db, "c-older", closed_days_ago=300, alerts=1)
    await _cluster(db, "c-recent", closed_days_ago=30, alerts=2)
    await _cluster(db, "c-open", closed_days_ago=None, alerts=2, dups=1)  # open: kept, however old
    await _silence(db, "s-old", ended_days_ago=95, alerts=4)
    await _silence(db, "s-recent", ended_days_ago=10, alerts=1)
    for request_id, days in (("r-old", 8), ("r-new", 6)):
        await db.execute(
            "INSERT INTO idempotency (scope, request_id, response, created_time) VALUES ('t', $1, '{}', $2)",
            request_id,
            NOW - timedelta(days=days),
        )

    retention = Retention(
        db, ManualClock(NOW), incident_retention_s=90 * DAY, idempotency_retention_s=7 * DAY, incidents=True
    )
    deleted = await retention.run_once()

    assert deleted == {"incidents": 2, "alerts": 10, "silences": 1, "idempotency": 1}
    assert retention.deleted_total == deleted
    assert await _ids(db, "SELECT cluster_id FROM clusters") == {"c-recent", "c-open"}
    assert await _ids(db, "SELECT DISTINCT coalesce(cluster_id, silence_id) FROM alerts") == {
        "c-recent",
        "c-open",
        "s-recent",
    }
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE cluster_id = 'c-open'") == 3
    assert await _ids(db, "SELECT silence_id FROM silences") == {"s-recent"}
    assert await _ids(db, "SELECT request_id FROM idempotency") == {"r-new"}
    # Nothing more is old enough: the next round deletes nothing, and the totals stay.
    assert set((await retention.run_once()).values()) == {0}
    assert retention.deleted_total == deleted


async def test_zero_keeps_for_ever_and_a_process_without_correlation_keeps_its_incidents(db: Database) -> None:
    await _cluster(db, "c-old", closed_days_ago=100, alerts=1)
    await db.execute(
        "INSERT INTO idempotency (scope, request_id, response, created_time) VALUES ('t', 'r', '{}', $1)",
        NOW - timedelta(days=400),
    )
    clock = ManualClock(NOW)
    kept = Retention(db, clock, incident_retention_s=0, idempotency_retention_s=0, incidents=True)
    assert not kept.enabled
    assert set((await kept.run_once()).values()) == {0}
    other = Retention(db, clock, incident_retention_s=90 * DAY, idempotency_retention_s=0, incidents=False)
    assert not other.enabled  # a capacity-only replica leaves incidents to the correlation replicas
    assert await db.fetchval("SELECT count(*) FROM clusters") == 1
    assert await db.fetchval("SELECT count(*) FROM idempotency") == 1


async def test_incidents_go_in_chunks_of_bounded_alerts_an_incident_with_all_its_alerts(db: Database) -> None:
    for n, size in enumerate((3, 3, 3, 10, 1)):  # closed in this order, oldest first
        await _cluster(db, f"c{n}", closed_days_ago=200 - n, alerts=size)
    cutoff = NOW - timedelta(days=90)
    chunks = []
    while True:
        async with db.transaction() as conn:
            purged = await repo.purge_closed_incidents(conn, cutoff, max_alerts=7)
        if purged == (0, 0):
            break
        chunks.append(purged)
    # Two of 3 fit in 7; the third alone; the one of 10 alone although over the bound; then the last.
    assert chunks == [(2, 6), (1, 3), (1, 10), (1, 1)]
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0


async def test_a_round_at_start_deletes_an_old_closed_incident_and_its_alert_is_new_again(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    clock = ManualClock(datetime.now(UTC))
    app = await app_factory(clock=clock)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    alert = pb.Alert(
        alert_id="a-ret-1", satellite_id="SAT-R1", subsystem="power", severity=4, timestamp=to_ts(clock.now())
    )
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
    await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=first.cluster_id, reason="fixed", request_id="close-1"))
    still_open = await stub.IngestAlert(
        pb.IngestAlertRequest(
            alert=pb.Alert(
                alert_id="a-ret-2", satellite_id="SAT-R2", subsystem="thermal", severity=2, timestamp=to_ts(clock.now())
            )
        )
    )
    await app.stop()

    clock.advance(91 * DAY)
    app_after = await app_factory(clock=clock)
    stub_after = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app_after.port))

    async def deleted() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM clusters WHERE cluster_id = $1", first.cluster_id) == 0)

    await eventually(deleted, what="the incident closed 91 days ago deleted by the round at start")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub_after.GetCluster(pb.GetClusterRequest(cluster_id=first.cluster_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id = 'a-ret-1'") == 0
    # The incident left open (closed by the system only now, as quiet) is kept.
    shown = (await stub_after.GetCluster(pb.GetClusterRequest(cluster_id=still_open.cluster_id))).cluster
    assert shown.cluster_id == still_open.cluster_id
    assert app_after.retention is not None and app_after.retention.deleted_total["incidents"] == 1
    # The deleted alert's id is not remembered any more: re-sent, it is a new alert in a new incident.
    alert.timestamp.CopyFrom(to_ts(clock.now()))
    again = await stub_after.IngestAlert(pb.IngestAlertRequest(alert=alert))
    assert (again.replay, again.duplicate, again.cluster_opened) == (False, False, True)
    assert again.cluster_id != first.cluster_id


async def test_retries_of_silence_requests_whose_silence_was_deleted_are_not_found_not_internal(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # A stored answer can outlive the silence it names. A burn that ended 6 days ago can still be
    # silenced (for its late alerts); with the shortest incident retention (8 days) it is deleted 2 days
    # later, while its request id is still remembered (for 7 days by default, 30 here). A silence
    # expired now goes after 8 days, its expiry's request id after 30.
    clock = ManualClock(datetime.now(UTC))
    app = await app_factory(clock=clock, incident_retention_s=8 * DAY, idempotency_retention_s=30 * DAY)
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    now = clock.now()
    burn = pb.Silence(
        satellite_ids=["SAT-RS"],
        subsystems=["propulsion"],
        start_time=to_ts(now - timedelta(days=6, hours=1)),
        end_time=to_ts(now - timedelta(days=6)),
        comment="burn 12, downlinked at the next pass",
    )
    created = (await operator.CreateSilence(pb.CreateSilenceRequest(silence=burn, request_id="burn-12"))).silence
    running = pb.Silence(
        satellite_ids=["SAT-RS"], subsystems=["thermal"], end_time=to_ts(now + timedelta(hours=1)), comment="tvac"
    )
    test = (await operator.CreateSilence(pb.CreateSilenceRequest(silence=running, request_id="tvac-1"))).silence
    await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=test.silence_id, request_id="tvac-stop"))
    clock.advance(2.5 * DAY)
    await _rounds_delete(app, db, "silences", "silence_id", created.silence_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.CreateSilence(pb.CreateSilenceRequest(silence=burn, request_id="burn-12"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert created.silence_id in (err.value.details() or "") and "retention" in (err.value.details() or "")

    clock.advance(7 * DAY)
    await _rounds_delete(app, db, "silences", "silence_id", test.silence_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=test.silence_id, request_id="tvac-stop"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_silences_go_in_chunks_of_bounded_alerts_a_silence_over_several(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A silence over a storm keeps out any number of alerts: a chunk deletes at most `max_alerts` of
    # them, and the silences once none is left (nothing covers alerts with them any more: they ended
    # longer ago than a late alert is covered).
    await _silence(db, "s-storm", ended_days_ago=100, alerts=5)
    await _silence(db, "s-quiet", ended_days_ago=99, alerts=0)
    cutoff = NOW - timedelta(days=90)
    chunks = []
    while True:
        async with db.transaction() as conn:
            purged = await repo.purge_ended_silences(conn, cutoff, 10, max_alerts=2)
        if purged == (0, 0):
            break
        chunks.append(purged)
    assert chunks == [(0, 2), (0, 2), (2, 1)]
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0

    # A round goes on until they are all gone.
    await _silence(db, "s-storm-2", ended_days_ago=100, alerts=5)
    monkeypatch.setattr(Retention, "CHUNK_ALERTS", 2)
    retention = Retention(
        db, ManualClock(NOW), incident_retention_s=90 * DAY, idempotency_retention_s=0, incidents=True
    )
    assert await retention.run_once() == {"incidents": 0, "alerts": 5, "silences": 1, "idempotency": 0}
    assert await db.fetchval("SELECT count(*) FROM silences") == 0


async def test_a_retried_start_by_hand_answers_its_execution_after_its_incident_was_deleted(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # Executions are kept for ever, and so is the request id of a start (stored with the execution): a
    # retry answers the execution it started, also once the incident it names has gone.
    clock = ManualClock(datetime.now(UTC))
    app = await app_factory(clock=clock)
    correlation = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    runbooks = runbook_pb2_grpc.RunbookServiceStub(channel_for("operator", app.port))
    admin = runbook_pb2_grpc.RunbookServiceStub(channel_for("admin", app.port))
    runbook = rpb.Runbook(
        runbook_id="rerun-note",
        name="Rerun note",
        steps=[rpb.RunbookStep(step_id="n", action="log", parameters=_struct({"message": "again"}))],
    )
    await admin.RegisterRunbook(rpb.RegisterRunbookRequest(runbook=runbook))
    alert = pb.Alert(
        alert_id="a-ret-rb", satellite_id="SAT-RB", subsystem="power", severity=3, timestamp=to_ts(clock.now())
    )
    cluster_id = (await correlation.IngestAlert(pb.IngestAlertRequest(alert=alert))).cluster_id
    start = rpb.StartExecutionRequest(runbook_id="rerun-note", incident_id=cluster_id, request_id="rerun-1")
    started = (await runbooks.StartExecution(start)).execution
    await correlation.CloseCluster(pb.CloseClusterRequest(cluster_id=cluster_id, reason="fixed"))

    clock.advance(91 * DAY)
    await _rounds_delete(app, db, "clusters", "cluster_id", cluster_id)
    again = (await runbooks.StartExecution(start)).execution
    assert (again.execution_id, again.incident_id) == (started.execution_id, cluster_id)
    # A new start for it is NOT_FOUND: it would link an execution to nothing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await runbooks.StartExecution(rpb.StartExecutionRequest(runbook_id="rerun-note", incident_id=cluster_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
