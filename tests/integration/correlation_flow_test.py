"""Correlation through a real server, PostgreSQL and NATS: cascades become one incident, events
reach NATS, a restart keeps the incident, duplicates and bad input behave."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _poll import eventually
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aetherops.bus import HEADER_TRACKING_ID, Bus
from aetherops.db import Database
from aetherops.errors import UnavailableError
from aetherops.services.correlation import INGEST_BATCH
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.events.v1 import events_pb2
from servers.correlation import CorrelationComponent
from servers.incident_feed import IncidentFeed, Watcher, incident_of


def _ts(when: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def _alert(sat: str, subsystem: str, when: datetime, severity: int = 4, alert_id: str = "") -> pb.Alert:
    return pb.Alert(
        alert_id=alert_id or uuid.uuid4().hex,
        satellite_id=sat,
        subsystem=subsystem,
        severity=severity,
        timestamp=_ts(when),
        message=f"{subsystem} anomaly on {sat}",
    )


def _correlation(server: Any) -> CorrelationComponent:
    return next(c for c in server.components if isinstance(c, CorrelationComponent))


def _violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def _watching(
    app: Any, stub: correlation_pb2_grpc.CorrelationServiceStub, event_type: pb.ClusterEventType.ValueType
) -> tuple[Any, asyncio.Future[pb.WatchClustersResponse]]:
    """A watch of one event type, registered with the server's feed before this returns (so nothing
    committed afterwards is missed), and its first message to come."""
    call = stub.WatchClusters(pb.WatchClustersRequest(event_types=[event_type]))
    first = asyncio.ensure_future(call.read())
    feed = _correlation(app).feed
    assert feed is not None

    async def registered() -> bool:
        return len(feed._watchers) == 1

    await eventually(registered, what="the watch registered")
    return call, first


async def _events(bus: Bus, count: int = 0, until: str = "", timeout_s: float = 10.0) -> list[events_pb2.Event]:
    """Incident events from JetStream, from the first, until `count` arrived or one of kind `until` did."""
    sub = await bus.js.subscribe(bus.subjects.incidents(">"), ordered_consumer=True)
    out: list[events_pb2.Event] = []

    def done() -> bool:
        if until:
            return any(e.WhichOneof("payload") == until for e in out)
        return len(out) >= count

    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                msg = await sub.next_msg(timeout=timeout_s)
                event = events_pb2.Event()
                event.ParseFromString(msg.data)
                assert msg.headers["Nats-Msg-Id"] == event.event_id
                assert msg.headers.get(HEADER_TRACKING_ID, "") == event.tracking_id  # one cause, said twice
                out.append(event)
    finally:
        await sub.unsubscribe()
    return out


async def test_power_cascade_over_three_satellites_is_one_incident_across_restart(
    app_factory: Any,
    bus: Bus,
    db: Database,
    channel_for: Any,
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=120)
    app = await app_factory()
    async with channel_for("admin", app.port) as chan:
        stub = correlation_pb2_grpc.CorrelationServiceStub(chan)
        power = [_alert(f"SAT-{i}", "power", t0 + timedelta(seconds=5 * i), severity=5) for i in (1, 2, 3)]
        cascade = [
            _alert(f"SAT-{i}", sub, t0 + timedelta(seconds=20 + 10 * i + j), severity=3)
            for i in (1, 2, 3)
            for j, sub in enumerate(("thermal", "propulsion"))
        ]
        replies = [await stub.IngestAlert(pb.IngestAlertRequest(alert=a)) for a in power + cascade]
        cluster_ids = {r.cluster_id for r in replies}
        assert len(cluster_ids) == 1, "one incident for the whole cascade"
        assert replies[0].cluster_opened and not any(r.cluster_opened for r in replies[1:])
        (cluster_id,) = cluster_ids

        cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=cluster_id))).cluster
        assert cluster.multi_satellite and cluster.satellite_ids == ["SAT-1", "SAT-2", "SAT-3"]
        assert cluster.alert_count == 9 and cluster.max_severity == 5
        assert set(cluster.subsystems) == {"power", "thermal", "propulsion"}
        root = await stub.IdentifyRootCause(pb.IdentifyRootCauseRequest(cluster_id=cluster_id))
        assert root.alert_id == power[0].alert_id and 0 < root.confidence <= 1

    events = await _events(bus, 2)
    assert events[0].WhichOneof("payload") == "incident_opened"
    opened = events[0].incident_opened.incident
    assert opened.cluster_id == cluster_id and events[0].source_service == "correlation"
    assert events[1].WhichOneof("payload") == "incident_updated"

    # Restart: a new process on the same database rebuilds the cluster and the next alert joins it.
    await app.stop()
    app2 = await app_factory()
    async with channel_for("admin", app2.port) as chan:
        stub = correlation_pb2_grpc.CorrelationServiceStub(chan)
        late = await stub.IngestAlert(
            pb.IngestAlertRequest(alert=_alert("SAT-2", "thermal", t0 + timedelta(seconds=150), severity=2))
        )
        assert late.cluster_id == cluster_id and not late.duplicate

        closed = await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=cluster_id, reason="bus restored"))
        assert closed.cluster.status == pb.CLUSTER_STATUS_CLOSED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=cluster_id))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        after = await stub.IngestAlert(
            pb.IngestAlertRequest(alert=_alert("SAT-1", "power", t0 + timedelta(seconds=160), severity=5))
        )
        assert after.cluster_id != cluster_id and after.cluster_opened, "a closed incident never reopens"
    events = await _events(bus, until="incident_closed")
    closed_event = events[-1].incident_closed
    assert closed_event.incident.cluster_id == cluster_id and closed_event.reason == "bus restored"
    assert events[-1].event_id not in {e.event_id for e in events[:-1]}


async def test_unrelated_faults_stay_apart_and_duplicates_are_dropped(channel: grpc.aio.Channel, db: Database) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    a_id = uuid.uuid4().hex
    a = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-1", "payload", t0, alert_id=a_id)))
    assert a.cluster_opened
    b = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-7", "comms", t0 + timedelta(seconds=30))))
    assert a.cluster_id != b.cluster_id

    first = _alert("SAT-1", "payload", t0 + timedelta(seconds=10))
    dup = await stub.IngestAlert(pb.IngestAlertRequest(alert=first))
    assert dup.duplicate and dup.cluster_id == a.cluster_id and dup.duplicate_of_alert_id
    replay = await stub.IngestAlert(pb.IngestAlertRequest(alert=first))
    assert replay.replay and replay.cluster_id == a.cluster_id and not replay.cluster_opened
    # A retry answers as the first call did (its answer may have been lost): the opening alert's
    # retry says it opened the cluster, so a caller paging on new incidents still pages.
    opener = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-1", "payload", t0, alert_id=a_id)))
    assert (opener.replay, opener.cluster_opened, opener.cluster_id) == (True, True, a.cluster_id)
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id = $1", first.alert_id) == 1

    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=a.cluster_id))).cluster
    assert cluster.alert_count == 1 and cluster.duplicate_count == 1

    page1 = await stub.ListActiveClusters(pb.ListActiveClustersRequest(page_size=1))
    page2 = await stub.ListActiveClusters(pb.ListActiveClustersRequest(page_size=1, page_token=page1.next_page_token))
    assert page1.next_page_token and not page2.next_page_token
    assert {page1.clusters[0].cluster_id, page2.clusters[0].cluster_id} == {a.cluster_id, b.cluster_id}
    only_7 = await stub.ListActiveClusters(pb.ListActiveClustersRequest(satellite_id="SAT-7"))
    assert [c.cluster_id for c in only_7.clusters] == [b.cluster_id]

    score = await stub.ScoreAlerts(
        pb.ScoreAlertsRequest(first=_alert("SAT-1", "power", t0), second=_alert("SAT-1", "thermal", t0))
    )
    assert score.would_correlate and score.components.satellite == pytest.approx(0.3)
    assert score.components.dependency > 0


async def test_stored_satellites_and_subsystems_follow_the_incident_across_commits(
    channel: grpc.aio.Channel, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=120)

    async def ingest(sat: str, subsystem: str, after_s: float) -> str:
        reply = await stub.IngestAlert(
            pb.IngestAlertRequest(alert=_alert(sat, subsystem, t0 + timedelta(seconds=after_s)))
        )
        assert not reply.duplicate
        return str(reply.cluster_id)

    async def stored(cluster_id: str) -> tuple[list[str], list[str], int]:
        row = await db.fetchrow(
            "SELECT satellites, subsystems, alert_count FROM clusters WHERE cluster_id = $1", cluster_id
        )
        assert row is not None
        return list(row["satellites"]), list(row["subsystems"]), row["alert_count"]

    cid = await ingest("SAT-4", "power", 0)
    # Each call its own commit. The same satellite and subsystem again (past the dedupe window): the
    # lists are not rewritten, and must not be lost either.
    assert await ingest("SAT-4", "power", 70) == cid
    assert await stored(cid) == (["SAT-4"], ["power"], 2)
    assert await ingest("SAT-3", "thermal", 80) == cid
    assert await ingest("SAT-4", "thermal", 90) == cid  # both known to the incident already
    assert await stored(cid) == (["SAT-3", "SAT-4"], ["power", "thermal"], 4)
    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=cid))).cluster
    assert list(cluster.satellite_ids) == ["SAT-3", "SAT-4"] and list(cluster.subsystems) == ["power", "thermal"]


async def test_the_stored_incident_row_follows_every_commit(channel: grpc.aio.Channel, db: Database) -> None:
    """Times, severity, counts and root cause of an incident as PostgreSQL holds them (what a restart
    rebuilds from and what listings sort by), after an in-order alert, a duplicate and a late one."""
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = (datetime.now(UTC) - timedelta(seconds=200)).replace(microsecond=0)

    async def ingest(subsystem: str, after_s: float, severity: int) -> pb.IngestAlertResponse:
        alert = _alert("SAT-7", subsystem, t0 + timedelta(seconds=after_s), severity=severity)
        return await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))

    async def row(cluster_id: str) -> tuple[Any, ...]:
        r = await db.fetchrow(
            """SELECT first_alert_time, last_alert_time, max_severity, alert_count, duplicate_count,
                      root_cause_alert_id FROM clusters WHERE cluster_id = $1""",
            cluster_id,
        )
        assert r is not None
        return tuple(r)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    thermal = await ingest("thermal", 50, 2)
    cid = thermal.cluster_id
    thermal_id = await db.fetchval("SELECT alert_id FROM alerts WHERE cluster_id = $1", cid)
    assert await row(cid) == (at(50), at(50), 2, 1, 0, thermal_id)
    power = await ingest("power", 100, 4)
    assert power.cluster_id == cid
    power_id = await db.fetchval("SELECT alert_id FROM alerts WHERE cluster_id = $1 AND subsystem = 'power'", cid)
    assert await row(cid) == (at(50), at(100), 4, 2, 0, power_id)  # power is upstream of thermal
    repeat = await ingest("power", 110, 4)
    assert repeat.duplicate and repeat.cluster_id == cid
    assert await row(cid) == (at(50), at(100), 4, 2, 1, power_id)
    late = await ingest("power", 10, 5)  # earlier than all of them: the new first alert and root cause
    assert late.cluster_id == cid and not late.duplicate
    late_id = await db.fetchval("SELECT alert_id FROM alerts WHERE cluster_id = $1 AND alert_time = $2", cid, at(10))
    assert await row(cid) == (at(10), at(100), 5, 3, 1, late_id)


async def test_a_batch_that_fails_to_commit_leaves_no_trace_in_memory(channel: grpc.aio.Channel, db: Database) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    # The database refuses one alert: its batch's transaction fails after the engine took the alert.
    await db.execute(
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.alert_id = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"""
    )
    await db.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-P", "power", t0, alert_id="poison")))
    assert await db.fetchval("SELECT count(*) FROM clusters") == 0
    await db.execute("DROP TRIGGER refuse_poison ON alerts")
    # Had the engine kept the refused alert's incident, this would join it (and fail: it was never
    # stored). Rebuilt from what is committed, the engine opens a new one.
    thermal = await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-P", "thermal", t0 + timedelta(seconds=10)))
    )
    assert not thermal.duplicate
    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=thermal.cluster_id))).cluster
    assert cluster.alert_count == 1 and list(cluster.subsystems) == ["thermal"]
    # The refused alert may be sent again and is stored then.
    again = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-P", "power", t0, alert_id="poison")))
    assert again.cluster_id == thermal.cluster_id and not again.replay


@pytest.mark.parametrize(
    ("sqlstate", "code"),
    [
        ("40P01", grpc.StatusCode.UNAVAILABLE),  # deadlock_detected
        ("40001", grpc.StatusCode.UNAVAILABLE),  # serialization_failure
        ("53100", grpc.StatusCode.UNAVAILABLE),  # disk_full
        ("XX000", grpc.StatusCode.INTERNAL),  # internal_error: nothing a retry would fix
    ],
)
async def test_a_batch_the_database_cannot_commit_for_now_is_unavailable_and_a_retry_stores_it(
    channel: grpc.aio.Channel, db: Database, sqlstate: str, code: grpc.StatusCode
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    await db.execute(
        f"""CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$"""
    )
    await db.execute("CREATE TRIGGER refuse_once BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION refuse_once()")
    alert = _alert("SAT-R", "power", datetime.now(UTC) - timedelta(seconds=30))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
    assert err.value.code() == code
    await db.execute("DROP TRIGGER refuse_once ON alerts")
    again = await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
    assert not again.replay
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id = $1", alert.alert_id) == 1


async def test_a_close_racing_an_alert_into_the_same_incident_stays_closed(
    channel: grpc.aio.Channel, db: Database, server: Any
) -> None:
    # An alert arrives while the close of the incident it belongs to is being committed: ingestion
    # waits for the close, then opens a new incident. Before, the alert was correlated into the
    # incident while the close waited for the row, stored in it after the close, and its "updated"
    # event followed the "closed" one.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    component = _correlation(server)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-C", "power", t0)))
    cid = first.cluster_id

    async def waiting_on_locks(n: int) -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return bool(count >= n)

    async with db.transaction() as holder:
        # Another transaction holds the row, so the close stays in its transaction until released.
        await holder.execute("SELECT 1 FROM clusters WHERE cluster_id = $1 FOR UPDATE", cid)
        close = asyncio.ensure_future(stub.CloseCluster(pb.CloseClusterRequest(cluster_id=cid, reason="fixed")))
        await eventually(lambda: waiting_on_locks(1), what="the close waiting for the row")
        late = asyncio.ensure_future(
            stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-C", "thermal", t0 + timedelta(seconds=5))))
        )

        async def queued() -> bool:
            return bool(component.ingest_utilisation > 0)

        await eventually(queued, what="the alert queued behind the close")
    await close
    assert (await late).cluster_id != cid
    row = await db.fetchrow("SELECT status, alert_count FROM clusters WHERE cluster_id = $1", cid)
    assert (row["status"], row["alert_count"]) == ("CLOSED", 1)
    subjects = await db.fetch("SELECT subject FROM outbox WHERE aggregate_id = $1 ORDER BY id", cid)
    assert [r["subject"].rsplit(".", 1)[-1] for r in subjects] == ["opened", "closed"]
    after = await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-C", "propulsion", t0 + timedelta(seconds=10)))
    )
    assert after.cluster_id != cid  # memory agrees: nothing joins the closed incident

    # Two closes at once (a retry racing its original, same request id; another operator, another
    # id): the cluster is closed once, the retry gets the first answer, the other is refused.
    other = after.cluster_id
    async with db.transaction() as holder:
        await holder.execute("SELECT 1 FROM clusters WHERE cluster_id = $1 FOR UPDATE", other)
        calls = [
            asyncio.ensure_future(
                stub.CloseCluster(pb.CloseClusterRequest(cluster_id=other, reason="r", request_id=request_id))
            )
            for request_id in ("close-1", "close-1", "close-2")
        ]
        # One waits for the row; the others wait for it (one close at a time), in arrival order.
        await eventually(lambda: waiting_on_locks(1), what="a close waiting for the row")
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [r.cluster.status for r in results[:2]] == [pb.CLUSTER_STATUS_CLOSED] * 2  # type: ignore[union-attr]
    assert isinstance(results[2], grpc.aio.AioRpcError)
    assert results[2].code() == grpc.StatusCode.FAILED_PRECONDITION
    events = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE aggregate_id = $1 AND subject LIKE '%incidents.closed'", other
    )
    assert events == 1


async def test_bad_input_is_rejected_precisely_and_nothing_is_stored(channel: grpc.aio.Channel, db: Database) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    bad = pb.Alert(alert_id="bad-1", satellite_id="", subsystem="", severity=9, timestamp=_ts(datetime.now(UTC)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"alert.satellite_id", "alert.subsystem", "alert.severity"} <= set(_violations(err.value))

    no_time = pb.Alert(alert_id="bad-2", satellite_id="SAT-1", subsystem="power", severity=3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=no_time))
    assert "alert.timestamp" in _violations(err.value)
    # A missing timestamp is one problem among the others, not the only one reported.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=pb.Alert(severity=9)))
    assert {"alert.alert_id", "alert.satellite_id", "alert.subsystem", "alert.severity", "alert.timestamp"} == set(
        _violations(err.value)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreAlerts(pb.ScoreAlertsRequest(first=pb.Alert(severity=3)))
    assert {"first.timestamp", "second"} == set(_violations(err.value))
    # The optional request id is checked too: alone, and with the alert's own problems.
    good = _alert("SAT-1", "power", datetime.now(UTC))
    for alert, fields in ((good, {"request_id"}), (pb.Alert(severity=3), {"request_id", "alert.alert_id"})):
        for request_id in ("r" * 257, "nul\x00"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.IngestAlert(pb.IngestAlertRequest(alert=alert, request_id=request_id))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fields <= set(_violations(err.value))
    # A severity IngestAlert refuses is refused here too, not scored past the documented range.
    now = datetime.now(UTC)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreAlerts(
            pb.ScoreAlertsRequest(first=_alert("SAT-1", "power", now, 99), second=_alert("SAT-2", "comms", now, 0))
        )
    assert {"first.severity", "second.severity"} == set(_violations(err.value))

    # A zeroed clock's time, and ids with whitespace at an end (a satellite of their own otherwise).
    early = _alert("SAT-1", "power", datetime(1970, 1, 1, tzinfo=UTC))
    spaced = _alert("SAT-1 ", " power", datetime.now(UTC))
    spaced.alert_id = "\ta-1"
    for alert, expected in (
        (early, {"alert.timestamp": "must not be before 2000-01-01 (a clock that was never set?)"}),
        (
            spaced,
            dict.fromkeys(
                ("alert.alert_id", "alert.satellite_id", "alert.subsystem"), "must not start or end with whitespace"
            ),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _violations(err.value) == expected

    future = _alert("SAT-1", "power", datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=future))
    assert "alert.timestamp" in _violations(err.value)
    # Outside Timestamp's range (a datetime cannot hold it either), in a call and in a stream.
    for seconds, nanos in ((253_402_300_800, 0), (-62_135_596_801, 0), (0, -1), (0, 1_000_000_000)):
        out_of_range = _alert("SAT-1", "power", datetime.now(UTC))
        out_of_range.timestamp.seconds, out_of_range.timestamp.nanos = seconds, nanos
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestAlert(pb.IngestAlertRequest(alert=out_of_range))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "range" in _violations(err.value)["alert.timestamp"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ScoreAlerts(pb.ScoreAlertsRequest(first=out_of_range, second=future))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=[out_of_range])

    reply = await stub.IngestAlerts(requests())
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(0, "alert.timestamp")]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCluster(pb.GetClusterRequest(cluster_id="no-such-cluster"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CloseCluster(pb.CloseClusterRequest(cluster_id="no-such-cluster"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0
    assert await db.fetchval("SELECT count(*) FROM clusters") == 0


async def test_a_quiet_incident_is_closed_by_the_system_with_its_event(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    app = await app_factory(incident_resolve_after_s=600)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    now = datetime.now(UTC)
    quiet = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-Q1", "unit-q", now - timedelta(minutes=20))))
    recent = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-Q2", "unit-r", now - timedelta(minutes=5))))
    # As if it had come live, twenty minutes ago; the next one instead was downlinked just now, as late.
    await db.execute(
        "UPDATE clusters SET opened_time = opened_time - interval '20 minutes' WHERE cluster_id = $1", quiet.cluster_id
    )
    downlinked = await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-Q3", "unit-d", now - timedelta(minutes=20)))
    )
    # A batch whose pass began twenty minutes ago, and whose last alert has just come down.
    batch = [_alert("SAT-Q4", sub, now - timedelta(minutes=40, seconds=-i)) for i, sub in enumerate(("power", "adcs"))]
    still_coming = await stub.IngestAlert(pb.IngestAlertRequest(alert=batch[0]))
    await db.execute(
        "UPDATE clusters SET opened_time = opened_time - interval '20 minutes' WHERE cluster_id = $1",
        still_coming.cluster_id,
    )
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=batch[1]))).cluster_id == still_coming.cluster_id
    # Open for ever before: clusters past the window stayed OPEN in the database whatever happened.
    await app.stop()
    app_after = await app_factory(incident_resolve_after_s=600)  # a round runs at start, then every minute
    stub_after = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app_after.port))

    async def resolved() -> bool:
        status = await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", quiet.cluster_id)
        return bool(status == "CLOSED")

    await eventually(resolved, what="the quiet incident closed")
    # An operator sees who closed it and why, not just that it is closed.
    shown = (await stub_after.GetCluster(pb.GetClusterRequest(cluster_id=quiet.cluster_id))).cluster
    assert (shown.status, shown.closed_by, shown.close_reason) == (
        pb.CLUSTER_STATUS_CLOSED,
        "system",
        "no alert for 600 s",
    )
    assert await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", recent.cluster_id) == "OPEN"
    # Old by its alert, but open for a moment only: not closed as it arrives (the same round found none).
    assert await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", downlinked.cluster_id) == "OPEN"
    assert await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", still_coming.cluster_id) == "OPEN"
    closes = await db.fetch("SELECT aggregate_id FROM outbox WHERE subject LIKE '%incidents.closed'")
    assert [r["aggregate_id"] for r in closes] == [quiet.cluster_id]


async def test_an_incident_closed_by_a_person_names_that_person(server: Any, channel_for: Any, bus: Bus) -> None:
    # Not the role: two operators on shift must be told apart in the incident and its closed event.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator2", server.port))
    opened = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-C1", "power", datetime.now(UTC))))
    closed = await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=opened.cluster_id, reason="bus restored"))
    assert (closed.cluster.closed_by, closed.cluster.close_reason) == ("operator2", "bus restored")
    shown = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=opened.cluster_id))).cluster
    assert shown.closed_by == "operator2"
    events = await _events(bus, until="incident_closed")
    assert events[-1].incident_closed.closed_by == "operator2"


async def test_an_escalation_within_the_dedupe_window_raises_the_incident_severity(
    channel: grpc.aio.Channel, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    now = datetime.now(UTC)
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-E", "power", now, severity=4)))
    worse = await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-E", "EPS", now + timedelta(seconds=10), severity=5))
    )
    assert (worse.cluster_id, worse.duplicate) == (first.cluster_id, False)
    listed = await stub.ListActiveClusters(pb.ListActiveClustersRequest(min_severity=5))
    assert [c.cluster_id for c in listed.clusters] == [first.cluster_id]
    row = await db.fetchrow("SELECT max_severity, alert_count FROM clusters WHERE cluster_id = $1", first.cluster_id)
    assert (row["max_severity"], row["alert_count"]) == (5, 2)


async def test_an_alert_id_taken_by_another_alert_is_refused_not_answered_as_a_resend(
    server: Any, channel: grpc.aio.Channel, bus: Bus, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    now = datetime.now(UTC)
    original = _alert("SAT-I1", "power", now, severity=4, alert_id="idem-1")
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=original))
    resend = await stub.IngestAlert(pb.IngestAlertRequest(alert=original))
    assert (resend.cluster_id, resend.replay) == (first.cluster_id, True)
    # The same id on another alert (another sender's id scheme, say) used to be answered as a
    # resend, and the second alert was dropped without a word.
    other = _alert("SAT-I9", "comms", now, severity=1, alert_id="idem-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=other))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'SAT-I1'" in (err.value.details() or "")
    escalated = pb.Alert()
    escalated.CopyFrom(original)
    escalated.severity = 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=escalated))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # A resend stamped anew (time, text) is still the same alert.
    restamped = pb.Alert()
    restamped.CopyFrom(original)
    restamped.timestamp.CopyFrom(_ts(now + timedelta(seconds=3)))
    restamped.message = "resent"
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=restamped))).replay

    # In a stream: against the stored alert, and within one batch (the first of the two is stored).
    fresh = _alert("SAT-I2", "thermal", now, alert_id="idem-2")
    clash = _alert("SAT-I3", "thermal", now, alert_id="idem-2")

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=[other, original, fresh, clash, fresh])

    reply = await stub.IngestAlerts(requests())
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(0, "alert.alert_id"), (3, "alert.alert_id")]
    assert "already taken by another alert" in reply.rejections[0].reason
    assert (reply.rejected, reply.accepted, reply.duplicates, reply.replays) == (2, 1, 0, 2)

    # From NATS: refused once and acknowledged (a taken id never becomes free).
    await bus.js.publish(bus.subjects.alerts_ingest, clash.SerializeToString())
    stream = bus.subjects.stream_for(bus.subjects.alerts_ingest)

    async def settled() -> bool:
        info = await bus.js.consumer_info(stream, "correlation-alerts")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(settled, what="the clashing alert's message acknowledged")
    assert (await bus.js.consumer_info(stream, "correlation-alerts")).num_redelivered == 0
    (logged,) = [r.getMessage() for r in caplog.records if "already taken by another alert" in r.getMessage()]
    # Which alert, and where in the stream: enough to find the message again.
    info = await bus.js.get_last_msg(stream, bus.subjects.alerts_ingest)
    assert "'idem-2'" in logged and f"stream sequence {info.seq}" in logged, logged
    rows = await db.fetch("SELECT alert_id, satellite_id FROM alerts WHERE alert_id LIKE 'idem-%' ORDER BY alert_id")
    assert [(r["alert_id"], r["satellite_id"]) for r in rows] == [("idem-1", "SAT-I1"), ("idem-2", "SAT-I2")]


async def test_ids_reasons_and_watch_filters_are_checked_before_anything_happens(
    channel: grpc.aio.Channel, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    # An id longer than any stored one is refused, not echoed back in a NOT_FOUND message: a 9,000
    # character id made a status message past the Python client's 16 KiB metadata limit.
    long_id = "x" * 9000
    for call in (
        stub.GetCluster(pb.GetClusterRequest(cluster_id=long_id)),
        stub.IdentifyRootCause(pb.IdentifyRootCauseRequest(cluster_id=long_id)),
        stub.CloseCluster(pb.CloseClusterRequest(cluster_id=long_id, request_id="r-long")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 256 characters" in _violations(err.value)["cluster_id"]
        assert len(err.value.details() or "") < 1000

    # A reason too long for the "closed" event to reach NATS is refused, and the cluster stays open.
    opened = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-R", "power", datetime.now(UTC))))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=opened.cluster_id, reason="r" * 1_500_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4096 characters" in _violations(err.value)["reason"]
    assert await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", opened.cluster_id) == "OPEN"
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE subject LIKE '%incidents.closed'") == 0

    # Filters no cluster can match would leave a watcher waiting for ever without a word.
    watch = stub.WatchClusters(
        pb.WatchClustersRequest(
            satellite_ids=["SAT-1", ""], min_severity=9, event_types=[pb.CLUSTER_EVENT_TYPE_OPENED, 7]
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"satellite_ids[1]", "min_severity", "event_types[1]"} == set(_violations(err.value))


async def test_a_request_id_reused_for_another_cluster_closes_that_cluster(
    channel: grpc.aio.Channel, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    now = datetime.now(UTC)
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-U1", "unit-a", now)))
    second = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-U2", "unit-b", now)))
    assert first.cluster_id != second.cluster_id
    closed = await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=first.cluster_id, request_id="cl-1"))
    assert closed.cluster.cluster_id == first.cluster_id
    # Another cluster with the same request id is another request: it used to answer with the first
    # cluster (and an unknown cluster with INTERNAL) while the engine closed the one asked for.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CloseCluster(pb.CloseClusterRequest(cluster_id="no-such-cluster", request_id="cl-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    reply = await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=second.cluster_id, request_id="cl-1"))
    assert (reply.cluster.cluster_id, reply.cluster.status) == (second.cluster_id, pb.CLUSTER_STATUS_CLOSED)
    assert await db.fetchval("SELECT status FROM clusters WHERE cluster_id = $1", second.cluster_id) == "CLOSED"
    # A retry of either close still answers as the first call did.
    again = await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=first.cluster_id, request_id="cl-1"))
    assert (again.cluster.cluster_id, again.cluster.status) == (first.cluster_id, pb.CLUSTER_STATUS_CLOSED)


async def test_text_postgresql_cannot_store_is_refused_by_field_and_spoils_no_batch(
    channel: grpc.aio.Channel, db: Database
) -> None:
    # PostgreSQL refuses NUL in text. Found only there, it failed the whole group commit: every
    # caller sharing the batch got INTERNAL (and a NATS redelivery repeated it).
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    poisoned = _alert("SAT-N", "power", t0)
    poisoned.message = "bus \x00 undervoltage"
    good = _alert("SAT-N", "thermal", t0)

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=[good, poisoned])  # one message: one batch

    reply = await stub.IngestAlerts(requests())
    assert (reply.accepted, reply.rejected) == (1, 1)
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(1, "alert.message")]
    assert "NUL" in reply.rejections[0].problems[0].description

    for field in ("alert_id", "satellite_id", "subsystem"):
        bad = _alert("SAT-N", "adcs", t0)
        setattr(bad, field, getattr(bad, field) + "\x00")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestAlert(pb.IngestAlertRequest(alert=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NUL" in _violations(err.value)[f"alert.{field}"]
    labelled = _alert("SAT-N", "adcs", t0)
    labelled.labels["bus"] = "A\x00"
    too_long = _alert("SAT-N", "adcs", t0, alert_id="a" * 257)
    for bad in (labelled, too_long):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestAlert(pb.IngestAlertRequest(alert=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCluster(pb.GetClusterRequest(cluster_id="c\x00"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in _violations(err.value)["cluster_id"]
    # A listing's filter is named too.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListAlerts(pb.ListAlertsRequest(cluster_id="c\x00"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in _violations(err.value)["cluster_id"]
    assert await db.fetchval("SELECT array_agg(alert_id) FROM alerts") == [good.alert_id]


async def test_bulk_stream_reports_bad_alerts_and_ingests_the_rest(channel: grpc.aio.Channel, db: Database) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=1500)
    alerts = [_alert(f"SAT-{i % 5}", "power", t0 + timedelta(seconds=i * 70)) for i in range(20)]
    alerts[7] = pb.Alert(alert_id="broken", satellite_id="SAT-1", subsystem="power", severity=0, timestamp=_ts(t0))

    async def requests() -> Any:
        for alert in alerts:
            yield pb.IngestAlertsRequest(alert=alert)

    reply = await stub.IngestAlerts(requests())
    assert reply.rejected == 1 and reply.rejections[0].index == 7
    assert reply.rejections[0].problems[0].field == "alert.severity"
    assert reply.accepted + reply.duplicates == 19
    assert await db.fetchval("SELECT count(*) FROM alerts") == 19


async def test_a_batch_downlinked_after_a_pass_is_one_incident(channel: grpc.aio.Channel) -> None:
    # Logged on board out of contact, two hours ago, and downlinked together at the next pass.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(hours=2)
    batch = [
        _alert("SAT-DL", "thermal", t0),
        _alert("SAT-DL", "power", t0 + timedelta(seconds=5), severity=5),
        _alert("SAT-DL", "propulsion", t0 + timedelta(seconds=20)),
    ]

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=batch[:2])
        yield pb.IngestAlertsRequest(alerts=batch[2:])

    reply = await stub.IngestAlerts(requests())
    assert (reply.accepted, reply.rejected) == (3, 0)
    listed = await stub.ListAlerts(pb.ListAlertsRequest(cluster_id=(await _cluster_of(stub, batch[0])), page_size=10))
    assert {a.alert.alert_id for a in listed.alerts} == {a.alert_id for a in batch}
    root = await stub.IdentifyRootCause(pb.IdentifyRootCauseRequest(cluster_id=listed.alerts[0].cluster_id))
    assert root.alert_id == batch[1].alert_id


async def test_an_acknowledged_incident_says_who_is_on_it_in_every_view_and_event_across_restart(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    acks, first_ack = await _watching(app, stub, pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED)
    opened = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-K1", "power", t0, severity=5)))
    cid = opened.cluster_id
    request = pb.AcknowledgeClusterRequest(cluster_id=cid, note="switching to the backup bus", request_id="ack-1")
    acked = (await stub.AcknowledgeCluster(request)).cluster
    assert (acked.acknowledged_by, acked.acknowledge_note) == ("operator", "switching to the backup bus")
    assert acked.HasField("acknowledge_time") and acked.status == pb.CLUSTER_STATUS_OPEN
    assert (await stub.AcknowledgeCluster(request)).cluster == acked  # a retry answers as the first call
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, request_id="ack-2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "acknowledged by 'operator'" in (err.value.details() or "")
    shown = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=cid))).cluster
    assert (shown.acknowledge_time, shown.acknowledged_by) == (acked.acknowledge_time, "operator")
    listed = (await stub.ListActiveClusters(pb.ListActiveClustersRequest())).clusters
    assert [(c.cluster_id, c.acknowledged_by) for c in listed] == [(cid, "operator")]
    watched = await asyncio.wait_for(first_ack, 10)
    assert watched.event_type == pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED
    assert (watched.cluster.cluster_id, watched.cluster.acknowledged_by) == (cid, "operator")
    assert watched.cluster.acknowledge_note == "switching to the backup bus"
    acks.cancel()

    # The incident keeps correlating, across a restart, and its later events still say who is on it.
    await app.stop()
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    joined = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-K1", "thermal", t0 + timedelta(seconds=9))))
    assert joined.cluster_id == cid
    await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=cid, reason="bus restored"))
    events = await _events(bus, until="incident_closed")
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["incident_opened", "incident_acknowledged", "incident_updated", "incident_closed"]
    assert [incident_of(e).acknowledged_by for e in events] == ["", "operator", "operator", "operator"]
    assert events[1].tracking_id and events[1].aggregate_id == cid
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, request_id="ack-3"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id="no-such-cluster"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, note="x" * 5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "note" in _violations(err.value)


async def test_an_acknowledged_incident_that_escalates_says_so_in_its_event_and_watch(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    updates, first_update = await _watching(app, stub, pb.CLUSTER_EVENT_TYPE_UPDATED)
    opened = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-E1", "thermal", t0, severity=2)))
    cid = opened.cluster_id
    await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, note="watching a slow drift"))
    # One batch raising it twice (2 -> 3 -> 5): the event says where the batch found it.
    batch = [
        _alert("SAT-E1", "power", t0 + timedelta(seconds=5), severity=3),
        _alert("SAT-E1", "propulsion", t0 + timedelta(seconds=6), severity=5),
    ]
    reply = await stub.IngestAlerts(iter([pb.IngestAlertsRequest(alerts=batch)]))
    assert reply.accepted == 2
    watched = await asyncio.wait_for(first_update, 10)
    assert (watched.cluster.cluster_id, watched.escalated_from_severity) == (cid, 2)
    assert (watched.cluster.max_severity, watched.cluster.acknowledged_by) == (5, "operator")
    # A later alert below the max escalates nothing.
    await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-E1", "adcs", t0 + timedelta(seconds=7), severity=4)))
    calm = await asyncio.wait_for(updates.read(), 10)
    assert calm.escalated_from_severity == 0
    updates.cancel()
    events = await _events(bus, count=4)
    assert [e.WhichOneof("payload") for e in events] == [
        "incident_opened",
        "incident_acknowledged",
        "incident_updated",
        "incident_updated",
    ]
    escalated = events[2].incident_updated
    assert escalated.escalated_from_severity == 2 and escalated.incident.max_severity == 5
    assert escalated.incident.acknowledged_by == "operator"
    assert events[3].incident_updated.escalated_from_severity == 0


async def test_merged_incidents_become_one_that_keeps_correlating_across_restart(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    power = _alert("SAT-M1", "power", t0, severity=5)
    source = (await stub.IngestAlert(pb.IngestAlertRequest(alert=power))).cluster_id
    # An unknown unit on another satellite: time alone never correlates, so it opens its own incident.
    unit = _alert("SAT-M2", "star-tracker", t0 + timedelta(seconds=20))
    target = (await stub.IngestAlert(pb.IngestAlertRequest(alert=unit))).cluster_id
    repeat = _alert("SAT-M2", "star-tracker", t0 + timedelta(seconds=30))
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=repeat))).duplicate
    assert source != target
    before = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=target))).cluster
    closes, first_close = await _watching(app, stub, pb.CLUSTER_EVENT_TYPE_CLOSED)

    request = pb.MergeClustersRequest(
        cluster_id=target, source_cluster_ids=[source], note="one bus fault", request_id="merge-1"
    )
    merged = (await stub.MergeClusters(request)).cluster
    assert [a.alert_id for a in merged.alerts] == [power.alert_id, unit.alert_id]
    assert (merged.alert_count, merged.duplicate_count) == (2, 1)
    assert list(merged.satellite_ids) == ["SAT-M1", "SAT-M2"] and merged.multi_satellite
    assert merged.root_cause_alert_id == power.alert_id != before.root_cause_alert_id
    assert merged.tracking_id == before.tracking_id and merged.status == pb.CLUSTER_STATUS_OPEN
    assert (await stub.MergeClusters(request)).cluster == merged  # a retry answers as the first call
    watched = await asyncio.wait_for(first_close, 10)
    assert (watched.cluster.cluster_id, watched.cluster.merged_into_cluster_id) == (source, target)
    assert watched.cluster.close_reason == f"merged into {target}: one bus fault"
    closes.cancel()
    gone = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=source))).cluster
    assert gone.status == pb.CLUSTER_STATUS_CLOSED and gone.merged_into_cluster_id == target
    assert (gone.close_reason, gone.closed_by) == (f"merged into {target}: one bus fault", "operator")
    listed = (await stub.ListAlerts(pb.ListAlertsRequest(cluster_id=target))).alerts
    assert sorted(a.alert.alert_id for a in listed) == sorted([power.alert_id, unit.alert_id, repeat.alert_id])
    assert not (await stub.ListAlerts(pb.ListAlertsRequest(cluster_id=source))).alerts
    resent = await stub.IngestAlert(pb.IngestAlertRequest(alert=power))
    assert (resent.cluster_id, resent.replay) == (target, True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.MergeClusters(pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[source]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"was merged into {target!r}" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=source))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"was merged into {target!r}" in (err.value.details() or "")
    # A cascade on the source's satellite joins the merged incident, now and after a restart.
    propulsion = _alert("SAT-M1", "propulsion", t0 + timedelta(seconds=35))
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=propulsion))).cluster_id == target

    await app.stop()
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    thermal = _alert("SAT-M1", "thermal", t0 + timedelta(seconds=40))
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=thermal))).cluster_id == target
    events = await _events(bus, count=6)
    assert [(e.WhichOneof("payload"), e.aggregate_id) for e in events] == [
        ("incident_opened", source),
        ("incident_opened", target),
        ("incident_updated", target),
        ("incident_closed", source),
        ("incident_updated", target),
        ("incident_updated", target),
    ]
    update, closed = events[2].incident_updated, events[3].incident_closed
    assert list(update.merged_cluster_ids) == [source] and list(update.added_alert_ids) == [power.alert_id]
    assert update.root_cause_changed and update.incident.root_cause_alert_id == power.alert_id
    assert (update.escalated_from_severity, update.incident.max_severity) == (4, 5)
    assert closed.incident.merged_into_cluster_id == target and closed.closed_by == "operator"
    assert [list(e.incident_updated.added_alert_ids) for e in events[4:]] == [[propulsion.alert_id], [thermal.alert_id]]


async def test_a_shift_hands_an_acknowledged_incident_over_and_every_later_view_says_so(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    day = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    night = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    watch, first_ack = await _watching(app, day, pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED)
    cid = (await day.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-H1", "power", t0, severity=4)))).cluster_id
    await day.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, note="resetting the bus"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await night.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, note="mine now"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "acknowledged by 'operator'" in (err.value.details() or "") and "take_over" in (err.value.details() or "")
    request = pb.AcknowledgeClusterRequest(
        cluster_id=cid, note="night shift: bus reset pending", take_over=True, request_id="handover-1"
    )
    taken = (await night.AcknowledgeCluster(request)).cluster
    assert (taken.acknowledged_by, taken.acknowledge_note) == ("admin", "night shift: bus reset pending")
    assert (await night.AcknowledgeCluster(request)).cluster == taken  # a retry answers as the first call
    acks = [e.incident_acknowledged for e in await _events(bus, count=3)][1:]
    holders = [("operator", ""), ("admin", "operator")]  # (acknowledged by, taken over from)
    assert [(a.incident.acknowledged_by, a.taken_over_from) for a in acks] == holders
    watched = [await asyncio.wait_for(first_ack, 10), await asyncio.wait_for(watch.read(), 10)]
    assert [(w.cluster.acknowledged_by, w.taken_over_from) for w in watched] == holders
    watch.cancel()

    # The engine holds the new one: the next update carries it, and so does the store after a restart.
    thermal = _alert("SAT-H1", "thermal", t0 + timedelta(seconds=10))
    assert (await day.IngestAlert(pb.IngestAlertRequest(alert=thermal))).cluster_id == cid
    update = (await _events(bus, count=4))[-1].incident_updated
    assert (update.incident.acknowledged_by, update.incident.acknowledge_note) == ("admin", taken.acknowledge_note)
    await app.stop()
    app = await app_factory()
    day = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    shown = (await day.GetCluster(pb.GetClusterRequest(cluster_id=cid))).cluster
    assert (shown.acknowledged_by, shown.acknowledge_time) == ("admin", taken.acknowledge_time)


async def test_taking_over_ones_own_acknowledgement_updates_the_note_and_takes_it_from_nobody(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    day = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    watch, first_ack = await _watching(app, day, pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED)
    cid = (await day.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-H2", "power", t0)))).cluster_id
    await day.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=cid, note="resetting the bus"))
    again = pb.AcknowledgeClusterRequest(cluster_id=cid, note="bus reset, watching it", take_over=True)
    renewed = (await day.AcknowledgeCluster(again)).cluster
    assert (renewed.acknowledged_by, renewed.acknowledge_note) == ("operator", "bus reset, watching it")
    # Nobody handed anything over: a pager must not announce "operator took over from operator".
    acks = [e.incident_acknowledged for e in await _events(bus, count=3)][1:]
    assert [(a.incident.acknowledge_note, a.taken_over_from) for a in acks] == [
        ("resetting the bus", ""),
        ("bus reset, watching it", ""),
    ]
    watched = [await asyncio.wait_for(first_ack, 10), await asyncio.wait_for(watch.read(), 10)]
    assert [w.taken_over_from for w in watched] == ["", ""]
    watch.cancel()


async def test_a_retried_acknowledgement_answers_as_its_first_call_after_a_handover_and_a_restart(
    app_factory: Any, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    day = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    night = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    cid = (await day.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-H3", "power", t0)))).cluster_id
    mine = pb.AcknowledgeClusterRequest(cluster_id=cid, note="resetting the bus", request_id="ack-day")
    first = (await day.AcknowledgeCluster(mine)).cluster
    handover = pb.AcknowledgeClusterRequest(cluster_id=cid, note="night shift", take_over=True, request_id="ack-night")
    taken = (await night.AcknowledgeCluster(handover)).cluster

    def holder(cluster: pb.Cluster) -> tuple[str, str, datetime]:
        return cluster.acknowledged_by, cluster.acknowledge_note, cluster.acknowledge_time.ToDatetime(UTC)

    # The day shift's client lost the first answer and retries (with take_over or not): the answer is
    # the acknowledgement that call made, as every retry of a request_id answers, not the night's.
    for retry in (
        mine,
        pb.AcknowledgeClusterRequest(cluster_id=cid, note="resetting the bus", request_id="ack-day", take_over=True),
    ):
        assert holder((await day.AcknowledgeCluster(retry)).cluster) == holder(first)
    await app.stop()
    app = await app_factory()
    day = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    night = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    assert holder((await day.AcknowledgeCluster(mine)).cluster) == holder(first)
    assert holder((await night.AcknowledgeCluster(handover)).cluster) == holder(taken)
    # Nothing changed hands again: the incident is the night shift's.
    shown = (await day.GetCluster(pb.GetClusterRequest(cluster_id=cid))).cluster
    assert holder(shown) == holder(taken)


async def test_a_merge_into_an_unacknowledged_incident_keeps_a_sources_acknowledgement(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    ingest = stub.IngestAlert
    source = (await ingest(pb.IngestAlertRequest(alert=_alert("SAT-A1", "power", t0, severity=5)))).cluster_id
    unit = _alert("SAT-A2", "star-tracker", t0 + timedelta(seconds=20))
    target = (await ingest(pb.IngestAlertRequest(alert=unit))).cluster_id
    ack = pb.AcknowledgeClusterRequest(cluster_id=source, note="on the backup bus", request_id="ack-a1")
    acked = (await stub.AcknowledgeCluster(ack)).cluster
    merge = pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[source], request_id="merge-a")
    merged = (await stub.MergeClusters(merge)).cluster
    taken = (merged.acknowledged_by, merged.acknowledge_time, merged.acknowledge_note)
    assert taken == ("operator", acked.acknowledge_time, "on the backup bus")
    update = (await _events(bus, until="incident_closed"))[-2].incident_updated
    assert list(update.merged_cluster_ids) == [source]
    assert (update.incident.acknowledged_by, update.incident.acknowledge_note) == ("operator", "on the backup bus")
    # The source is closed, merged: acknowledging it is refused, and the refusal says where the work went.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeCluster(pb.AcknowledgeClusterRequest(cluster_id=source, take_over=True))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"merged into {target!r}" in (err.value.details() or "")

    await app.stop()  # stored, not only remembered
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    shown = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=target))).cluster
    assert (shown.acknowledged_by, shown.acknowledge_time, shown.acknowledge_note) == taken
    later = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-A1", "thermal", t0 + timedelta(seconds=30))))
    assert later.cluster_id == target
    update = (await _events(bus, count=6))[-1].incident_updated
    assert update.incident.acknowledged_by == "operator"


async def test_a_merge_that_cannot_be_made_changes_nothing(channel: grpc.aio.Channel) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    ids = [
        (await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert(f"SAT-N{k}", f"unit-{k}", t0)))).cluster_id
        for k in range(3)
    ]
    closed, open_source, target = ids
    await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=closed, reason="done"))
    bad = {
        "source_cluster_ids": pb.MergeClustersRequest(cluster_id=target),
        "source_cluster_ids[0]": pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[target]),
        "source_cluster_ids[1]": pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[closed, closed]),
        "note": pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[open_source], note="x" * 5000),
    }
    for field, request in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.MergeClusters(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in _violations(err.value), field
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.MergeClusters(pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=["no-such-cluster"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # One closed source refuses the whole merge: the open one keeps its alert.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.MergeClusters(pb.MergeClustersRequest(cluster_id=target, source_cluster_ids=[open_source, closed]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in (err.value.details() or "")
    kept = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=open_source))).cluster
    assert kept.status == pb.CLUSTER_STATUS_OPEN and kept.alert_count == 1 and not kept.merged_into_cluster_id
    assert (await stub.GetCluster(pb.GetClusterRequest(cluster_id=target))).cluster.alert_count == 1


async def test_a_downlinked_batch_straddling_a_restart_is_one_incident(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # Two satellites' batches, logged out of contact and downlinked at their passes, each cut in two
    # by a restart of the server. Hours apart, so the two batches do not correlate with each other.
    now = datetime.now(UTC)
    one = [_alert("SAT-DL1", sub, now - timedelta(hours=3, seconds=-i)) for i, sub in enumerate(("power", "thermal"))]
    two = [_alert("SAT-DL2", sub, now - timedelta(hours=2, seconds=-i)) for i, sub in enumerate(("power", "thermal"))]
    one.append(_alert("SAT-DL1", "propulsion", now - timedelta(hours=3, seconds=-5)))
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app.port))
    first = await stub.IngestAlert(pb.IngestAlertRequest(alert=one[0]))
    # SAT-DL1's pass began twenty minutes ago: its incident opened then; the next alert came just now.
    await db.execute(
        "UPDATE clusters SET opened_time = opened_time - interval '20 minutes' WHERE cluster_id = $1", first.cluster_id
    )
    assert (await stub.IngestAlert(pb.IngestAlertRequest(alert=one[1]))).cluster_id == first.cluster_id
    second = await stub.IngestAlert(pb.IngestAlertRequest(alert=two[0]))  # SAT-DL2's pass begins
    assert second.cluster_opened and second.cluster_id != first.cluster_id
    await app.stop()

    app_after = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", app_after.port))
    # The rest of each batch joins its incident, as it would have without the restart.
    rest = [await stub.IngestAlert(pb.IngestAlertRequest(alert=a)) for a in (one[2], two[1])]
    assert [(r.cluster_id, r.cluster_opened) for r in rest] == [(first.cluster_id, False), (second.cluster_id, False)]
    assert await db.fetchval("SELECT count(*) FROM clusters") == 2


async def _cluster_of(stub: correlation_pb2_grpc.CorrelationServiceStub, alert: pb.Alert) -> str:
    """The cluster an ingested alert is in (IngestAlert again answers the stored outcome: a replay)."""
    again = await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
    assert again.replay
    return again.cluster_id


async def test_bulk_stream_takes_batches_and_counts_indexes_across_messages(
    channel: grpc.aio.Channel, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=1500)
    alerts = [_alert(f"SAT-{i % 5}", "power", t0 + timedelta(seconds=i * 70)) for i in range(20)]
    alerts[12] = pb.Alert(alert_id="broken", satellite_id="", subsystem="power", severity=3, timestamp=_ts(t0))

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alert=alerts[0], alerts=alerts[1:10])  # indexes 0..9
        yield pb.IngestAlertsRequest()  # an empty batch (a loader's flush): no alerts, no index
        yield pb.IngestAlertsRequest(alerts=alerts[10:])  # indexes 10..19

    reply = await stub.IngestAlerts(requests())
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(12, "alert.satellite_id")]
    assert (reply.rejected, reply.accepted + reply.duplicates) == (1, 19)
    assert await db.fetchval("SELECT count(*) FROM alerts") == 19


async def test_a_stream_of_several_batches_stores_every_incident_as_its_alerts_add_up(
    channel: grpc.aio.Channel, db: Database
) -> None:
    """A storm longer than three ingest batches: the committer prepares each batch while the one
    before it is written, so consecutive batches update the same incidents. Every stored incident
    row must count exactly the alert rows stored for it."""
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    rng = random.Random(5)
    t0 = datetime.now(UTC) - timedelta(seconds=250)
    total = 3 * INGEST_BATCH + 500
    subsystems = ("power", "thermal", "propulsion", "adcs", "comms", "payload", "sensor-a", "sensor-b")
    alerts = [
        _alert(f"SAT-S{rng.randrange(60)}", rng.choice(subsystems), t0 + timedelta(seconds=rng.uniform(0, 240)))
        for _ in range(total)
    ]

    async def requests() -> Any:
        for k in range(0, total, 500):
            yield pb.IngestAlertsRequest(alerts=alerts[k : k + 500])

    reply = await stub.IngestAlerts(requests())
    assert reply.rejected == 0 and reply.accepted + reply.duplicates == total
    assert reply.duplicates > total // 2  # mostly repeats within the dedupe window, as in a storm
    stored = await db.fetch(
        """SELECT c.cluster_id, c.alert_count, c.duplicate_count, c.last_alert_time,
                  count(*) FILTER (WHERE a.duplicate_of IS NULL) AS alerts,
                  count(*) FILTER (WHERE a.duplicate_of IS NOT NULL) AS duplicates,
                  max(a.alert_time) FILTER (WHERE a.duplicate_of IS NULL) AS last_alert
           FROM clusters c JOIN alerts a USING (cluster_id) GROUP BY c.cluster_id"""
    )
    assert sum(r["alerts"] + r["duplicates"] for r in stored) == total
    assert sum(r["alerts"] for r in stored) == reply.accepted
    mismatched = [
        dict(r)
        for r in stored
        if (r["alert_count"], r["duplicate_count"], r["last_alert_time"])
        != (r["alerts"], r["duplicates"], r["last_alert"])
    ]
    assert mismatched == []


async def test_an_alert_id_repeated_within_one_batch_is_stored_once(channel: grpc.aio.Channel, db: Database) -> None:
    # One stream message is one group-commit batch: the repeats must get the first outcome (the
    # duplicate's repeat is still a duplicate of the same alert) and store nothing more.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    first = _alert("SAT-R", "power", t0)
    dup = _alert("SAT-R", "power", t0 + timedelta(seconds=10))
    other = _alert("SAT-Q", "payload", t0)
    reused = pb.Alert()
    reused.CopyFrom(first)
    reused.satellite_id = "SAT-Z"  # same id, another satellite: not a resend, refused

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=[first, dup, other, dup, first, reused])

    reply = await stub.IngestAlerts(requests())
    # Each alert is counted once: the repeats as replays, not again as accepted or duplicates.
    assert (reply.accepted, reply.duplicates, reply.replays, reply.rejected) == (2, 1, 2, 1)
    assert [r.index for r in reply.rejections] == [5]
    rows = await db.fetch("SELECT alert_id, cluster_id, duplicate_of FROM alerts WHERE satellite_id LIKE 'SAT-%'")
    by_id = {r["alert_id"]: r for r in rows}
    assert set(by_id) == {first.alert_id, dup.alert_id, other.alert_id}
    assert by_id[dup.alert_id]["duplicate_of"] == first.alert_id
    assert by_id[dup.alert_id]["cluster_id"] == by_id[first.alert_id]["cluster_id"]
    again = await stub.IngestAlert(pb.IngestAlertRequest(alert=dup))
    assert again.replay and again.duplicate and again.cluster_id == by_id[first.alert_id]["cluster_id"]

    async def resend() -> Any:  # a loader sending the same batch again, after a lost answer
        yield pb.IngestAlertsRequest(alerts=[first, dup, other])

    reply = await stub.IngestAlerts(resend())
    assert (reply.accepted, reply.duplicates, reply.replays, reply.rejected) == (0, 0, 3, 0)


async def test_an_incident_with_more_alerts_than_a_message_holds_is_still_shown_listed_and_closed(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # An alert storm's incident holds tens of thousands of alerts. Sent whole, GetCluster,
    # ListActiveClusters and CloseCluster failed with RESOURCE_EXHAUSTED (and the close had committed).
    server = await app_factory(max_message_bytes=64 * 1024)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", server.port))
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    # Forty subsystems on one satellite at once: one incident, none a duplicate of another.
    storm = [_alert("SAT-S", f"unit-{n:02d}", t0 + timedelta(milliseconds=n), severity=5) for n in range(40)]
    for alert in storm:
        alert.message = "x" * 3000  # 120 kB in all, twice the largest message

    async def requests() -> Any:
        for alert in storm:  # each message within the limit
            yield pb.IngestAlertsRequest(alert=alert)

    assert (await stub.IngestAlerts(requests())).accepted == 40
    (listed,) = (await stub.ListActiveClusters(pb.ListActiveClustersRequest())).clusters
    shown = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=listed.cluster_id))).cluster
    closed = (await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=listed.cluster_id, request_id="r1"))).cluster
    ids = [a.alert_id for a in storm]
    for cluster in (listed, shown, closed):
        assert cluster.alert_count == 40
        assert 0 < len(cluster.alerts) < 40
        assert [a.alert_id for a in cluster.alerts] == ids[: len(cluster.alerts)]  # the oldest
    assert closed.status == pb.CLUSTER_STATUS_CLOSED
    every = await stub.ListAlerts(pb.ListAlertsRequest(cluster_id=listed.cluster_id, page_size=10))
    assert [a.alert.alert_id for a in every.alerts] == ids[:10] and every.next_page_token


async def test_listings_in_the_basic_view_leave_the_alerts_out(channel: grpc.aio.Channel) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    for n, subsystem in enumerate(("power", "thermal", "propulsion")):
        await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-V", subsystem, t0 + timedelta(seconds=n))))
    active = pb.ListActiveClustersRequest(satellite_id="SAT-V")
    history = pb.ListClustersRequest(satellite_id="SAT-V")
    for listing, request in ((stub.ListActiveClusters, active), (stub.ListClusters, history)):
        (full,) = (await listing(request)).clusters  # unspecified: the full view
        assert len(full.alerts) == full.alert_count == 3
        request.view = pb.CLUSTER_VIEW_BASIC
        (basic,) = (await listing(request)).clusters
        assert not basic.alerts and basic.alert_count == 3
        del full.alerts[:]
        assert basic == full  # everything else as in the full view
        request.view = 7  # type: ignore[assignment]  # a value newer than this server
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await listing(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "view" in _violations(err.value)


async def test_each_incident_event_carries_the_tracking_id_of_the_request_that_caused_it(
    channel: grpc.aio.Channel, bus: Bus
) -> None:
    # The "updated" event went out under no tracking id at all (ingestion commits in a task of its
    # own), and the envelopes of "updated" and "closed" named the opening alert's request.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    opened = await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-T", "power", t0)), metadata=(("x-tracking-id", "trk-open"),)
    )
    await stub.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-T", "thermal", t0 + timedelta(seconds=5))),
        metadata=(("x-tracking-id", "trk-join"),),
    )
    await stub.CloseCluster(
        pb.CloseClusterRequest(cluster_id=opened.cluster_id, request_id="c1"),
        metadata=(("x-tracking-id", "trk-close"),),
    )
    events = await _events(bus, until="incident_closed")
    assert [(e.WhichOneof("payload"), e.tracking_id) for e in events] == [
        ("incident_opened", "trk-open"),
        ("incident_updated", "trk-join"),
        ("incident_closed", "trk-close"),
    ]
    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=opened.cluster_id))).cluster
    assert cluster.tracking_id == "trk-open"  # the incident's own stays the opening alert's


async def test_a_storm_batch_joining_an_incident_is_announced_in_events_nats_can_carry(
    channel: grpc.aio.Channel, bus: Bus
) -> None:
    # One "updated" event listed every alert a batch added: 1,000 ids of 256 characters, most of
    # four bytes, with their satellites made it 1.1 MB, over NATS's max_payload: never published.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    opener = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-0000", "power", t0)))
    storm = [_alert(f"SAT-{n:04d}-{'x' * 56}", "power", t0, alert_id=f"{n:04d}" + "𝔸" * 252) for n in range(1, 1001)]

    async def requests() -> Any:
        yield pb.IngestAlertsRequest(alerts=storm)

    assert (await stub.IngestAlerts(requests())).accepted == 1000
    announced: list[str] = []
    updates = 0
    sub = await bus.js.subscribe(bus.subjects.incidents("updated"), ordered_consumer=True)
    try:
        async with asyncio.timeout(15):
            while len(announced) < 1000:
                event = events_pb2.Event()
                event.ParseFromString((await sub.next_msg(timeout=15)).data)
                assert event.incident_updated.incident.cluster_id == opener.cluster_id
                announced += event.incident_updated.added_alert_ids
                updates += 1
    finally:
        await sub.unsubscribe()
    assert sorted(announced) == sorted(a.alert_id for a in storm)
    assert updates > 1  # the batch's ids, split


async def test_an_incident_over_a_whole_constellation_is_still_announced(channel: grpc.aio.Channel, bus: Bus) -> None:
    # Every event listed every satellite: 5,000 ids of 240 characters made each event of this
    # incident 1.2 MB, over NATS's max_payload, so none after the first few batches was published.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    fleet = [_alert(f"SAT-{n:04d}-{'x' * 231}", "power", t0) for n in range(5000)]
    sub = await bus.js.subscribe(bus.subjects.incidents("updated"), ordered_consumer=True)

    async def requests() -> Any:
        for k in range(0, len(fleet), 1000):
            yield pb.IngestAlertsRequest(alerts=fleet[k : k + 1000])

    try:
        assert (await stub.IngestAlerts(requests())).accepted == 5000
        async with asyncio.timeout(15):
            while True:
                event = events_pb2.Event()
                event.ParseFromString((await sub.next_msg(timeout=15)).data)
                incident = event.incident_updated.incident
                if incident.satellite_count == 5000:
                    break
    finally:
        await sub.unsubscribe()
    assert 0 < len(incident.satellite_ids) < 5000
    assert list(incident.satellite_ids) == sorted(a.satellite_id for a in fleet)[: len(incident.satellite_ids)]
    assert (incident.subsystem_count, list(incident.subsystems)) == (1, ["power"])


async def test_labels_are_stored_and_returned_as_sent(channel: grpc.aio.Channel) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    labelled = _alert("SAT-L", "power", t0)
    labelled.labels.update({"bus": "A", "unit": "PCDU-2", "note": "ünïcode ✓"})
    plain = _alert("SAT-L", "thermal", t0 + timedelta(seconds=5))
    for alert in (labelled, plain):
        reply = await stub.IngestAlert(pb.IngestAlertRequest(alert=alert))
    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=reply.cluster_id))).cluster
    stored = {a.alert_id: dict(a.labels) for a in cluster.alerts}
    assert stored == {labelled.alert_id: dict(labelled.labels), plain.alert_id: {}}


async def test_alerts_from_nats_take_the_same_path(server: Any, channel: grpc.aio.Channel, bus: Bus) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    watch = stub.WatchClusters(pb.WatchClustersRequest(satellite_ids=["SAT-42"]))
    first_event = asyncio.ensure_future(watch.read())
    alert = _alert("SAT-42", "adcs", datetime.now(UTC) - timedelta(seconds=5), severity=4)
    await bus.js.publish(bus.subjects.alerts_ingest, alert.SerializeToString())
    event = await asyncio.wait_for(first_event, 15)
    assert event.event_type == pb.CLUSTER_EVENT_TYPE_OPENED
    assert event.cluster.satellite_ids == ["SAT-42"]
    cluster = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=event.cluster.cluster_id))).cluster
    assert [a.alert_id for a in cluster.alerts] == [alert.alert_id]
    watch.cancel()


async def test_an_alert_from_nats_that_cannot_be_stored_is_dropped_not_redelivered(
    server: Any, channel: grpc.aio.Channel, bus: Bus, db: Database
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    watch = stub.WatchClusters(pb.WatchClustersRequest(satellite_ids=["SAT-43"]))
    first_event = asyncio.ensure_future(watch.read())
    t0 = datetime.now(UTC) - timedelta(seconds=5)
    poisoned = _alert("SAT-43", "adcs", t0)
    poisoned.labels["axis"] = "z\x00"
    # A tracking id header that could not be stored either is replaced, as a missing one is.
    await bus.js.publish(
        bus.subjects.alerts_ingest, poisoned.SerializeToString(), headers={"Aetherops-Tracking-Id": "t\x01"}
    )
    good = _alert("SAT-43", "power", t0)
    await bus.js.publish(
        bus.subjects.alerts_ingest, good.SerializeToString(), headers={"Aetherops-Tracking-Id": "t\x01"}
    )
    event = await asyncio.wait_for(first_event, 15)
    assert event.cluster.root_cause_alert_id == good.alert_id
    watch.cancel()
    stream = bus.subjects.stream_for(bus.subjects.alerts_ingest)

    async def settled() -> bool:
        info = await bus.js.consumer_info(stream, "correlation-alerts")
        return info.num_pending == 0 and info.num_ack_pending == 0

    # Both acknowledged: the refused one is not coming back to spoil later batches.
    await eventually(settled, what="both alert messages acknowledged")
    info = await bus.js.consumer_info(stream, "correlation-alerts")
    assert info.num_redelivered == 0
    rows = await db.fetch("SELECT alert_id, tracking_id FROM alerts WHERE satellite_id = 'SAT-43'")
    assert [r["alert_id"] for r in rows] == [good.alert_id]
    assert len(rows[0]["tracking_id"]) == 32  # a fresh one, not the unprintable header


async def test_watchers_get_what_their_filters_ask_for_from_one_subscription(
    server: Any, channel: grpc.aio.Channel
) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    closes = stub.WatchClusters(
        pb.WatchClustersRequest(satellite_ids=["SAT-W1"], event_types=[pb.CLUSTER_EVENT_TYPE_CLOSED])
    )
    severe = stub.WatchClusters(pb.WatchClustersRequest(min_severity=4))
    first_close, first_severe = asyncio.ensure_future(closes.read()), asyncio.ensure_future(severe.read())
    component = _correlation(server)
    assert component.feed is not None

    async def both_registered() -> bool:
        return len(component.feed._watchers) == 2

    await eventually(both_registered, what="both watchers registered")
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    mild = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-W1", "payload", t0, severity=2)))
    loud = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-W2", "propulsion", t0, severity=5)))
    await stub.CloseCluster(pb.CloseClusterRequest(cluster_id=mild.cluster_id, reason="ok"))
    got_close = await asyncio.wait_for(first_close, 15)
    got_severe = await asyncio.wait_for(first_severe, 15)
    # Each got the one event its filters let through, and nothing before it.
    assert (got_close.event_type, got_close.cluster.cluster_id) == (pb.CLUSTER_EVENT_TYPE_CLOSED, mild.cluster_id)
    assert got_close.cluster.status == pb.CLUSTER_STATUS_CLOSED
    assert (got_severe.event_type, got_severe.cluster.cluster_id) == (pb.CLUSTER_EVENT_TYPE_OPENED, loud.cluster_id)
    # The cluster as of the event is the cluster GetCluster shows (neither changed since), alerts
    # aside: it had no confidence, duplicate count, tracking id, duration or close time.
    for got in (got_close, got_severe):
        shown = (await stub.GetCluster(pb.GetClusterRequest(cluster_id=got.cluster.cluster_id))).cluster
        del shown.alerts[:]
        assert got.cluster == shown
        assert got.cluster.root_cause_confidence > 0 and got.cluster.tracking_id
    closes.cancel()
    severe.cancel()

    async def unsubscribed() -> bool:
        return component.feed._sub is None and not component.feed._watchers

    await eventually(unsubscribed, what="the feed to unsubscribe after the last watcher left")


async def test_a_watch_from_a_start_time_sends_what_it_missed_then_goes_live(
    server: Any, channel: grpc.aio.Channel, bus: Bus
) -> None:
    # A watcher that lost its stream ("watch again" at a restart) used to lose the events in between.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    stream = bus.subjects.stream_for(bus.subjects.incidents("opened"))

    async def stored(count: int) -> bool:
        return (await bus.js.stream_info(stream)).state.messages >= count

    t0 = datetime.now(UTC) - timedelta(seconds=30)
    # Subsystems no other satellite's correlate with, apart from SAT-R2's pair: three incidents.
    await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-R1", "unit-1", t0)))
    await eventually(lambda: stored(1), what="the first incident's event stored")
    start = datetime.now(UTC)  # what the watcher saw last: the events after it are the ones it missed
    missed = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-R2", "power", t0)))
    await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-R2", "thermal", t0 + timedelta(seconds=5))))
    await eventually(lambda: stored(3), what="the missed events stored")

    everything = stub.WatchClusters(pb.WatchClustersRequest(start_time=_ts(start)))
    only_r3 = stub.WatchClusters(pb.WatchClustersRequest(start_time=_ts(start), satellite_ids=["SAT-R3"]))
    replayed = [await asyncio.wait_for(everything.read(), 10) for _ in range(2)]
    assert [(r.event_type, r.cluster.cluster_id) for r in replayed] == [
        (pb.CLUSTER_EVENT_TYPE_OPENED, missed.cluster_id),
        (pb.CLUSTER_EVENT_TYPE_UPDATED, missed.cluster_id),
    ]
    assert replayed[1].cluster.subsystems == ["power", "thermal"]
    component = _correlation(server)
    assert component.feed is not None

    async def both_live() -> bool:
        return len(component.feed._watchers) == 2

    await eventually(both_live, what="both watches live")
    live = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-R3", "unit-3", t0)))
    # Next on both: the live event, nothing replayed twice before it, nothing of other satellites.
    for watch in (everything, only_r3):
        got = await asyncio.wait_for(watch.read(), 10)
        assert (got.event_type, got.cluster.cluster_id) == (pb.CLUSTER_EVENT_TYPE_OPENED, live.cluster_id)
        watch.cancel()


async def _store_opened_events(bus: Bus, event_ids: list[str]) -> None:
    """Stores an incident-opened event per id in JetStream, as the outbox relay would."""
    for n, event_id in enumerate(event_ids):
        event = events_pb2.Event(event_id=event_id)
        event.incident_opened.incident.cluster_id = f"c{n}"
        await bus.js.publish(bus.subjects.incidents("opened"), event.SerializeToString())


async def test_history_reads_what_jetstream_pushed_before_it_was_counted(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The replay consumer pushes at once. Counted as "pending" after the push (a busy machine), the
    # history read nothing, and the watch then waited for the live events only (CI saw it).
    from nats.js.client import JetStreamContext

    counted = JetStreamContext.PushSubscription.consumer_info

    async def after_the_push(sub: Any) -> Any:
        async def pushed() -> bool:
            return bool(sub.pending_msgs >= 2)  # both in nats-py's buffer, delivered, no longer pending

        await eventually(pushed, timeout_s=5, what="the replay consumer's push")
        return await counted(sub)

    monkeypatch.setattr(JetStreamContext.PushSubscription, "consumer_info", after_the_push)
    since = datetime.now(UTC) - timedelta(seconds=1)
    await _store_opened_events(bus, [f"h{n}" for n in range(2)])
    feed = IncidentFeed(bus)
    read = [item async for _, item in feed.history(Watcher(frozenset(), frozenset(), 0), since=since)]
    assert [item[2].event_id for item in read if item is not None] == ["h0", "h1"]


async def test_a_replay_ends_at_its_next_event_once_shutdown_began(bus: Bus) -> None:
    # A replay is not a registered watcher yet: it used to stream the whole history first, holding
    # the server's shutdown for its grace period, and only then heard the news.
    since = datetime.now(UTC) - timedelta(seconds=1)
    await _store_opened_events(bus, [f"s{n}" for n in range(3)])
    feed = IncidentFeed(bus)
    history = feed.history(Watcher(frozenset(), frozenset(), 0), since=since)
    (_, mark), (_, first) = [await anext(history) for _ in range(2)]  # the stream's end, then an event
    assert mark is None and first is not None and first[2].event_id == "s0"
    feed.end_streams()
    with pytest.raises(UnavailableError, match="shutting down"):
        await anext(history)
    await history.aclose()


async def test_a_slow_watcher_counts_only_wanted_events_it_lost(bus: Bus) -> None:
    feed = IncidentFeed(bus)
    slow = Watcher(frozenset(), frozenset({"SAT-S"}), 0, queue=asyncio.Queue(maxsize=1))
    everything = Watcher(frozenset(), frozenset(), 0)  # shows when the feed has seen all five
    await feed.add(slow)
    await feed.add(everything)
    try:
        for n, sat in enumerate(["SAT-S", "SAT-X", "SAT-S", "SAT-X", "SAT-S"]):
            event = events_pb2.Event(event_id=f"e{n}")
            event.incident_opened.incident.cluster_id = f"c{n}"
            event.incident_opened.incident.satellite_ids.append(sat)
            await bus.nc.publish(bus.subjects.incidents("opened"), event.SerializeToString())

        async def all_seen() -> bool:
            return everything.queue.qsize() == 5

        await eventually(all_seen, what="the feed to see all five events")
        assert slow.dropped == 2  # the two wanted ones it had no room for; the other satellite's never count
        _, _, kept = slow.queue.get_nowait()
        assert kept.incident_opened.incident.cluster_id == "c0"
    finally:
        await feed.close()


def test_a_watched_satellite_beyond_an_events_listed_satellites_is_not_missed() -> None:
    watcher = Watcher(frozenset(), frozenset({"SAT-9999"}), 0)
    listed = events_pb2.Incident(cluster_id="c1", satellite_ids=["SAT-0001", "SAT-0002"], satellite_count=2)
    assert not watcher.wants(pb.CLUSTER_EVENT_TYPE_OPENED, listed)
    # An incident over 5,000 satellites whose event could list only the first: the watched one may
    # be among the rest.
    cut_short = events_pb2.Incident(cluster_id="c2", satellite_ids=["SAT-0001", "SAT-0002"], satellite_count=5000)
    assert watcher.wants(pb.CLUSTER_EVENT_TYPE_OPENED, cut_short)
    assert Watcher(frozenset(), frozenset({"SAT-0002"}), 0).wants(pb.CLUSTER_EVENT_TYPE_OPENED, listed)


async def test_a_burst_of_calls_waits_its_turn_instead_of_being_cancelled(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # With its default limits grpc-core cancels calls once about a thousand wait unaccepted: this
    # burst lost 1,452 of its 4,000 calls to CANCELLED, which says nothing about why and which
    # clients do not retry. Shedding is the ingest queue's and the rate limiter's job (they answer
    # RESOURCE_EXHAUSTED with a delay), so grpc-core is let to queue a fleet's burst.
    server = await app_factory(rate_limit_burst=1_000_000, rate_limit_per_s=1_000_000)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", server.port))
    now = datetime.now(UTC)
    burst = [_alert(f"SAT-B{n}", "power", now) for n in range(4000)]
    results = await asyncio.gather(
        *(stub.IngestAlert(pb.IngestAlertRequest(alert=a), timeout=60) for a in burst), return_exceptions=True
    )
    refused = [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results if isinstance(r, Exception)]
    assert refused == []
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE satellite_id LIKE 'SAT-B%'") == len(burst)


@contextlib.asynccontextmanager
async def _write_held(
    db: Database, stub: correlation_pb2_grpc.CorrelationServiceStub, alert: pb.Alert
) -> AsyncIterator[None]:
    """Sends `alert` and holds its batch's write with a table lock for the body: what is ingested
    meanwhile waits in the queue. On exit the lock goes and `alert` is stored."""
    async with db.dedicated() as held:
        lock = held.transaction()
        await lock.start()
        await held.execute("LOCK TABLE alerts IN EXCLUSIVE MODE")
        first = asyncio.ensure_future(stub.IngestAlert(pb.IngestAlertRequest(alert=alert), timeout=60))

        async def write_waits() -> bool:
            query = "SELECT count(*) FROM pg_locks WHERE relation = 'alerts'::regclass AND NOT granted"
            return bool(await db.fetchval(query))

        await eventually(write_waits, what="the first write waiting for the lock")
        try:
            yield
        finally:
            await lock.rollback()
    await first


async def test_large_alerts_fill_the_queue_by_bytes_and_the_next_is_refused_and_never_stored(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    # 1 MiB of waiting alerts at most; each of these holds about 50 kB (wide characters count as
    # stored), so some twenty fit where the count limit would take 100,000.
    server = await app_factory(ingest_queue_bytes=1024 * 1024, rate_limit_burst=1_000_000, rate_limit_per_s=1_000_000)
    component = _correlation(server)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", server.port))
    when = datetime.now(UTC) - timedelta(seconds=30)

    def large(n: int) -> pb.Alert:
        alert = _alert(f"SAT-Q{n}", "power", when)
        alert.message = "\U0001f6f0" * 4096
        alert.labels.update({f"{k:02d}" + "\U0001f6f0" * 200: "\U0001f6f0" * 256 for k in range(16)})
        return alert

    sent: list[pb.Alert] = []
    calls: list[asyncio.Future[pb.IngestAlertResponse]] = []

    def send(alert: pb.Alert) -> asyncio.Future[pb.IngestAlertResponse]:
        sent.append(alert)
        calls.append(asyncio.ensure_future(stub.IngestAlert(pb.IngestAlertRequest(alert=alert), timeout=60)))
        return calls[-1]

    first = large(0)
    async with _write_held(db, stub, first):
        refused: grpc.aio.AioRpcError | None = None
        for n in range(1, 60):
            before = component.ingest_utilisation
            call = send(large(n))

            async def queued_or_refused(call: asyncio.Future[Any] = call, before: float = before) -> bool:
                return call.done() or component.ingest_utilisation > before

            await eventually(queued_or_refused, what=f"alert {n} queued or refused")
            if call.done():
                refused = call.exception()  # type: ignore[assignment]
                break
        assert isinstance(refused, grpc.aio.AioRpcError), refused
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes waiting" in (refused.details() or "")
        assert 10 < len(calls) < 40
        assert 0.9 < component.ingest_utilisation <= 1.0
        before = component.ingest_utilisation
        small = send(_alert("SAT-Q-small", "power", when))  # a small one still fits

        async def small_queued() -> bool:
            return component.ingest_utilisation > before

        await eventually(small_queued, what="the small alert queued")
        assert not small.done()

    answered = await asyncio.gather(*calls, return_exceptions=True)
    stored = [a.alert_id for a, r in zip(sent, answered, strict=True) if isinstance(r, pb.IngestAlertResponse)]
    assert len(stored) == len(sent) - 1 and sent[-1].alert_id in stored
    rows = await db.fetch("SELECT alert_id, message FROM alerts WHERE satellite_id LIKE 'SAT-Q%'")
    assert sorted(r["alert_id"] for r in rows) == sorted([first.alert_id, *stored])  # the refused one left no trace
    assert {r["alert_id"]: r["message"] for r in rows}[first.alert_id] == "\U0001f6f0" * 4096


def _bulk(prefix: str, count: int, when: datetime) -> list[pb.Alert]:
    """Alerts of about 1.5 kB each: a chunk of 1,000 is larger than a 1 MiB budget, so one is taken
    only while nothing else waits."""
    alerts = [_alert(f"{prefix}{n % 50}", "power", when) for n in range(count)]
    for a in alerts:
        a.message = "x" * 1000
    return alerts


async def test_a_stream_refused_by_a_full_queue_fails_whole_and_leaves_no_unretrieved_errors(
    app_factory: Any, channel_for: Any, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # A write held and one alert waiting behind it keep the queue from emptying, so every chunk of
    # the stream is refused.
    server = await app_factory(ingest_queue_bytes=1024 * 1024)
    component = _correlation(server)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", server.port))
    when = datetime.now(UTC) - timedelta(seconds=30)
    bulk = _bulk("SAT-S", 4000, when)
    async with _write_held(db, stub, _alert("SAT-S-1", "power", when)):
        second = asyncio.ensure_future(stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-S-2", "power", when))))

        async def second_queued() -> bool:
            return component.ingest_utilisation > 0

        await eventually(second_queued, what="the second alert queued")
        requests = [pb.IngestAlertsRequest(alerts=bulk[k : k + 500]) for k in range(0, len(bulk), 500)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IngestAlerts(iter(requests))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await second
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE satellite_id LIKE 'SAT-S%'") == 2
    # The stream's chunks that nobody awaited once the first failed must not log errors when freed.
    await server.stop()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_an_alert_from_nats_refused_by_a_full_queue_comes_back_and_is_stored(
    app_factory: Any, channel_for: Any, db: Database, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    # A write held and, waiting behind it, one chunk larger than the whole 1 MiB budget: the queue
    # refuses everything until the lock goes.
    server = await app_factory(ingest_queue_bytes=1024 * 1024)
    component = _correlation(server)
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("admin", server.port))
    when = datetime.now(UTC) - timedelta(seconds=30)
    async with _write_held(db, stub, _alert("SAT-N-1", "power", when)):
        stream = asyncio.ensure_future(
            stub.IngestAlerts(iter([pb.IngestAlertsRequest(alerts=_bulk("SAT-N", 1000, when))]))
        )

        async def over_budget() -> bool:
            return component.ingest_utilisation > 1.0

        await eventually(over_budget, what="the oversized chunk queued")
        from_nats = _alert("SAT-N-2", "thermal", when)
        await bus.js.publish(bus.subjects.alerts_ingest, from_nats.SerializeToString())

        async def refused() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "refused for now" in r.getMessage()]

        records = await eventually(refused, what="the alert from NATS refused")
        assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records)  # no traceback
        assert "1 of 1 messages refused for now (correlation-ingest: ingest queue is full" in records[0].getMessage()
    await stream

    async def stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id = $1", from_nats.alert_id))

    await eventually(stored, what="the alert from NATS stored once the queue had room")


async def test_an_alert_from_nats_the_database_cannot_take_for_now_comes_back_and_is_stored(
    server: Any, bus: Bus, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # A serialization failure on every insert: UNAVAILABLE, as during a failover.
    await db.execute(
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '40001'; END $$"""
    )
    await db.execute("CREATE TRIGGER refuse BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION refuse()")
    alert = _alert("SAT-U", "power", datetime.now(UTC) - timedelta(seconds=30))
    await bus.js.publish(bus.subjects.alerts_ingest, alert.SerializeToString())

    async def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused for now" in r.getMessage()]

    records = await eventually(refused, what="the alert from NATS refused")
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None  # a condition, not a fault
    assert not [r for r in caplog.records if r.name == "aetherops.bus" and r.exc_info is not None]
    await db.execute("DROP TRIGGER refuse ON alerts")

    async def stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM alerts WHERE alert_id = $1", alert.alert_id))

    await eventually(stored, what="the alert from NATS stored once the database took it")


async def test_many_problems_in_one_alert_are_answered_not_cut_off(channel: grpc.aio.Channel, db: Database) -> None:
    # 64 labels (the most allowed), every value with a NUL: listing all 64 problems made trailing
    # metadata over the client's 16 KiB limit, and the caller got RESOURCE_EXHAUSTED ("received
    # metadata size exceeds hard limit") instead of INVALID_ARGUMENT.
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    noisy = _alert("SAT-LBL", "power", datetime.now(UTC))
    for i in range(64):
        noisy.labels[f"label-number-{i:02d}-" + "k" * 18] = "v\x00"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IngestAlert(pb.IngestAlertRequest(alert=noisy))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rpc_status.from_call(err.value)
    assert details is not None
    bad_request = error_details_pb2.BadRequest()
    details.details[0].Unpack(bad_request)
    listed = len(bad_request.field_violations)
    assert 10 <= listed < 64 and {v.field for v in bad_request.field_violations} == {"alert.labels"}
    assert f"and {64 - listed} more problems not listed" in (err.value.details() or "")

    # A stream of such alerts still gets its counts (each rejection lists what fits, then a count).
    async def requests() -> AsyncIterator[pb.IngestAlertsRequest]:
        for n in range(1000):
            bad = pb.Alert()
            bad.CopyFrom(noisy)
            bad.alert_id = f"noisy-{n}"
            yield pb.IngestAlertsRequest(alert=bad)
        yield pb.IngestAlertsRequest(alert=_alert("SAT-LBL", "power", datetime.now(UTC)))

    reply = await stub.IngestAlerts(requests())
    assert (reply.accepted, reply.rejected) == (1, 1000)
    # The first ones, as many as fit in a megabyte; `rejected` counts them all.
    shown = len(reply.rejections)
    assert 100 < shown < 1000 and [r.index for r in reply.rejections] == list(range(shown))
    assert reply.rejections[0].problems[-1].description == f"and {64 - listed} more problems"
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE satellite_id = 'SAT-LBL'") == 1
