"""Silences through a real server and PostgreSQL: what they cover is stored and listed but opens
and joins no incident (so nothing pages); expiry, idempotency, restart, roles and bad input."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from correlation_flow_test import _violations

from aetherops.clock import ManualClock
from aetherops.db import Database, apply_migrations
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from servers.convert import to_ts


def _alert(sat: str, subsystem: str, when: datetime, **labels: str) -> pb.Alert:
    return pb.Alert(
        alert_id=uuid.uuid4().hex,
        satellite_id=sat,
        subsystem=subsystem,
        severity=4,
        timestamp=to_ts(when),
        labels=labels,
    )


def _burn(now: datetime, **fields: Any) -> pb.Silence:
    given: dict[str, Any] = {
        "satellite_ids": ["SAT-S1"],
        "subsystems": ["propulsion", "aocs"],  # aocs: an alias of adcs
        "start_time": to_ts(now - timedelta(minutes=10)),
        "end_time": to_ts(now + timedelta(hours=1)),
        "comment": "burn 7: thrusters and attitude expected to complain",
        **fields,
    }
    return pb.Silence(**given)


async def test_a_silenced_burn_opens_no_incident_until_it_is_expired(
    server: Any, channel_for: Any, db: Database
) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    now = datetime.now(UTC)
    created = (await operator.CreateSilence(pb.CreateSilenceRequest(silence=_burn(now), request_id="burn-7"))).silence
    assert created.silence_id and created.created_by == "operator" and created.create_time.seconds > 0
    assert list(created.subsystems) == ["adcs", "propulsion"]  # stored canonical

    async def ingest(alert: pb.Alert) -> pb.IngestAlertResponse:
        return await operator.IngestAlert(pb.IngestAlertRequest(alert=alert))

    thruster = _alert("SAT-S1", "propulsion", now - timedelta(minutes=1))
    covered = await ingest(thruster)
    assert (covered.silence_id, covered.cluster_id, covered.cluster_opened) == (created.silence_id, "", False)
    assert (await ingest(_alert("SAT-S1", "AOCS", now - timedelta(seconds=50)))).silence_id == created.silence_id
    # Not covered: another subsystem, another satellite.
    power = await ingest(_alert("SAT-S1", "power", now - timedelta(seconds=40)))
    other = await ingest(_alert("SAT-S2", "propulsion", now - timedelta(seconds=30)))
    assert power.cluster_opened and not power.silence_id and other.cluster_id and not other.silence_id
    # A retry answers the same; it stores nothing twice.
    again = await ingest(thruster)
    assert again.replay and again.silence_id == created.silence_id and not again.cluster_id

    # Bulk: counted apart.
    batch = [_alert("SAT-S1", "propulsion", now - timedelta(seconds=20)), _alert("SAT-S3", "comms", now)]

    async def requests() -> AsyncIterator[pb.IngestAlertsRequest]:
        yield pb.IngestAlertsRequest(alerts=batch)

    bulk = await operator.IngestAlerts(requests())
    assert (bulk.silenced, bulk.accepted, bulk.rejected) == (1, 1, 0)

    # Stored, listed under the silence, and in no incident: no incident holds them, no event names them.
    listed = (await viewer.ListAlerts(pb.ListAlertsRequest(silence_id=created.silence_id))).alerts
    assert [a.alert.subsystem for a in listed] == ["propulsion", "AOCS", "propulsion"]
    assert {(a.cluster_id, a.silence_id) for a in listed} == {("", created.silence_id)}
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE silence_id IS NOT NULL AND cluster_id IS NOT NULL") == 0
    clustered = await db.fetchval("SELECT sum(alert_count) FROM clusters")
    assert clustered == 3  # power, SAT-S2's propulsion, SAT-S3's comms
    payloads = b"".join(r["payload"] for r in await db.fetch("SELECT payload FROM outbox"))
    assert all(a.alert.alert_id.encode() not in payloads for a in listed)

    shown = (await viewer.ListSilences(pb.ListSilencesRequest())).silences
    assert [s.silence_id for s in shown] == [created.silence_id]

    # Expired: alerts observed from now on correlate again; one observed before still does not.
    ended = (
        await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=created.silence_id, request_id="stop-1"))
    ).silence
    assert ended.expired_by == "operator" and ended.end_time.ToDatetime(UTC) <= datetime.now(UTC)
    repeat = await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=created.silence_id, request_id="stop-1"))
    assert repeat.silence == ended
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=created.silence_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not (await viewer.ListSilences(pb.ListSilencesRequest())).silences
    assert len((await viewer.ListSilences(pb.ListSilencesRequest(include_ended=True))).silences) == 1
    downlinked = await ingest(_alert("SAT-S1", "propulsion", now - timedelta(minutes=2)))
    assert downlinked.silence_id == created.silence_id
    live = await ingest(_alert("SAT-S1", "propulsion", datetime.now(UTC) + timedelta(seconds=1)))
    assert live.cluster_id and not live.silence_id

    # Creating again under the same request id answers with the first silence and stores nothing.
    retried = await operator.CreateSilence(pb.CreateSilenceRequest(silence=_burn(now), request_id="burn-7"))
    assert retried.silence.silence_id == created.silence_id
    assert await db.fetchval("SELECT count(*) FROM silences") == 1


async def test_silences_cover_by_labels_and_survive_a_restart(app_factory: Any, channel_for: Any) -> None:
    now = datetime.now(UTC)
    app = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    test_campaign = pb.Silence(
        labels={"campaign": "tvac-3"}, end_time=to_ts(now + timedelta(hours=2)), comment="thermal vacuum test"
    )
    created = (await stub.CreateSilence(pb.CreateSilenceRequest(silence=test_campaign))).silence
    assert created.start_time.ToDatetime(UTC) <= datetime.now(UTC)  # default: now
    await app.stop()

    after = await app_factory()
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", after.port))
    later = datetime.now(UTC)
    tagged = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-T1", "thermal", later, campaign="tvac-3")))
    untagged = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-T2", "thermal", later, campaign="x")))
    assert tagged.silence_id == created.silence_id and untagged.cluster_opened
    # Observed before the silence began (it began when it was created): correlated as ever.
    before = await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-T3", "thermal", now, campaign="tvac-3")))
    assert before.cluster_id and not before.silence_id


async def test_silence_bad_input_roles_and_unknown_ids(server: Any, channel_for: Any, db: Database) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    now = datetime.now(UTC)

    async def bad(silence: pb.Silence) -> set[str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await operator.CreateSilence(pb.CreateSilenceRequest(silence=silence))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return set(_violations(err.value))

    assert await bad(_burn(now, satellite_ids=[], subsystems=[])) == {"silence.satellite_ids"}
    unbounded = _burn(now)
    unbounded.ClearField("end_time")
    assert await bad(unbounded) == {"silence.end_time"}
    assert await bad(_burn(now, end_time=to_ts(now + timedelta(days=40)), comment="")) == {
        "silence.end_time",
        "silence.comment",
    }
    assert await bad(_burn(now, satellite_ids=["SAT\x00"], labels={"k": "v" * 300})) == {
        "silence.satellite_ids",
        "silence.labels",
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.CreateSilence(pb.CreateSilenceRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await db.fetchval("SELECT count(*) FROM silences") == 0

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await viewer.CreateSilence(pb.CreateSilenceRequest(silence=_burn(now)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id="no-such-silence"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await viewer.ListSilences(pb.ListSilencesRequest(page_token="garbage", satellite_id=" SAT"))
    assert set(_violations(err.value)) == {"page_token", "satellite_id"}

    # Paging, newest first, by satellite.
    ids = []
    for i in range(3):
        made = await operator.CreateSilence(
            pb.CreateSilenceRequest(silence=_burn(now, satellite_ids=[f"SAT-P{i % 2}"]))
        )
        ids.append(made.silence.silence_id)
    first = await viewer.ListSilences(pb.ListSilencesRequest(page_size=2))
    rest = await viewer.ListSilences(pb.ListSilencesRequest(page_size=2, page_token=first.next_page_token))
    assert [s.silence_id for s in [*first.silences, *rest.silences]] == sorted(ids, reverse=True)
    assert not rest.next_page_token
    by_sat = (await viewer.ListSilences(pb.ListSilencesRequest(satellite_id="SAT-P0"))).silences
    assert sorted(s.silence_id for s in by_sat) == sorted([ids[0], ids[2]])


async def test_a_burn_that_is_over_can_be_silenced_but_a_window_out_of_reach_is_refused(
    app_factory: Any, channel_for: Any, db: Database
) -> None:
    clock = ManualClock(datetime.now(UTC))
    app = await app_factory(clock=clock)
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    now = clock.now()

    def starting_now(silence: pb.Silence) -> pb.Silence:
        silence.ClearField("start_time")  # from now: the server's now, for a retry its first call's
        return silence

    async def refused(silence: pb.Silence, request_id: str) -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await operator.CreateSilence(pb.CreateSilenceRequest(silence=silence, request_id=request_id))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return _violations(err.value)

    # The burn ended an hour ago, out of contact: its alerts come down at the next pass, and are covered.
    over = _burn(now, start_time=to_ts(now - timedelta(hours=3)), end_time=to_ts(now - timedelta(hours=1)))
    burn = (await operator.CreateSilence(pb.CreateSilenceRequest(silence=over, request_id="burn-6"))).silence
    downlinked = await operator.IngestAlert(
        pb.IngestAlertRequest(alert=_alert("SAT-S1", "propulsion", now - timedelta(hours=2)))
    )
    assert downlinked.silence_id == burn.silence_id and not downlinked.cluster_id

    # A wrong date: ended longer ago than alerts are covered after a silence's end (7 days), or, with no
    # start given (from now), not after now.
    ancient = _burn(now, start_time=to_ts(now - timedelta(days=9)), end_time=to_ts(now - timedelta(days=8)))
    said = await refused(ancient, "typo-1")
    assert set(said) == {"silence.end_time"}
    assert "could cover none" in said["silence.end_time"] and now.isoformat() in said["silence.end_time"]
    said = await refused(starting_now(_burn(now, end_time=to_ts(now - timedelta(minutes=1)))), "typo-2")
    assert set(said) == {"silence.end_time"} and "must be after start_time" in said["silence.end_time"]
    assert await db.fetchval("SELECT count(*) FROM silences") == 1
    # Nothing remembered under a refused request id: corrected, the same id creates.
    fixed = await operator.CreateSilence(pb.CreateSilenceRequest(silence=_burn(now), request_id="typo-1"))
    assert fixed.silence.end_time.ToDatetime(UTC) > now

    # Created in time, retried (same request id) long after the end: the first answer, nothing new stored.
    from_now = starting_now(_burn(now, end_time=to_ts(now + timedelta(hours=2))))
    first_from_now = await operator.CreateSilence(pb.CreateSilenceRequest(silence=from_now, request_id="burn-9"))
    clock.advance(days=10)
    again = await operator.CreateSilence(pb.CreateSilenceRequest(silence=over, request_id="burn-6"))
    again_from_now = await operator.CreateSilence(pb.CreateSilenceRequest(silence=from_now, request_id="burn-9"))
    assert (again.silence, again_from_now.silence) == (burn, first_from_now.silence)
    assert await db.fetchval("SELECT count(*) FROM silences") == 3
    # A new request id is refused now.
    assert set(await refused(over, "burn-10")) == {"silence.end_time"}


async def test_listing_by_satellite_includes_the_silences_naming_no_satellite(server: Any, channel_for: Any) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    now = datetime.now(UTC)

    async def create(**fields: Any) -> str:
        return (await operator.CreateSilence(pb.CreateSilenceRequest(silence=_burn(now, **fields)))).silence.silence_id

    own = await create(satellite_ids=["SAT-L1"])
    await create(satellite_ids=["SAT-L2"])
    fleetwide = await create(satellite_ids=[], subsystems=["comms"])  # a ground-station outage: every satellite
    by_label = await create(satellite_ids=[], subsystems=[], labels={"campaign": "tvac-3"})
    listed = (await operator.ListSilences(pb.ListSilencesRequest(satellite_id="SAT-L1"))).silences
    assert [s.silence_id for s in listed] == [by_label, fleetwide, own]  # newest first; not SAT-L2's
    first = await operator.ListSilences(pb.ListSilencesRequest(satellite_id="SAT-L1", page_size=2))
    rest = await operator.ListSilences(
        pb.ListSilencesRequest(satellite_id="SAT-L1", page_size=2, page_token=first.next_page_token)
    )
    assert [s.silence_id for s in [*first.silences, *rest.silences]] == [by_label, fleetwide, own]
    # Listed because it applies: it covers this satellite's alerts.
    comms = await operator.IngestAlert(pb.IngestAlertRequest(alert=_alert("SAT-L1", "comms", now)))
    assert comms.silence_id == fleetwide


async def test_expiring_a_silence_not_yet_started_ends_it_with_an_empty_window(
    server: Any, channel_for: Any, db: Database
) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    now = datetime.now(UTC)
    planned = _burn(now, start_time=to_ts(now + timedelta(minutes=1)), end_time=to_ts(now + timedelta(hours=2)))
    created = (await operator.CreateSilence(pb.CreateSilenceRequest(silence=planned))).silence
    ended = (await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=created.silence_id))).silence
    assert ended.start_time == ended.end_time == ended.expire_time
    assert ended.end_time.ToDatetime(UTC) <= datetime.now(UTC)
    # Ended, so listed only with those ended, as it was answered; and ended already for a second expiry.
    assert not (await operator.ListSilences(pb.ListSilencesRequest())).silences
    assert list((await operator.ListSilences(pb.ListSilencesRequest(include_ended=True))).silences) == [ended]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.ExpireSilence(pb.ExpireSilenceRequest(silence_id=created.silence_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # An alert observed in the planned window correlates (a little ahead of time: within the skew allowed).
    alert = _alert("SAT-S1", "propulsion", now + timedelta(minutes=2))
    reply = await operator.IngestAlert(pb.IngestAlertRequest(alert=alert))
    assert reply.cluster_id and not reply.silence_id


async def test_silences_stored_with_a_backward_window_are_mended_by_the_migration(db: Database) -> None:
    # What expiring one not yet started stored before migration 15.
    await db.execute("ALTER TABLE silences DROP CONSTRAINT silences_end_not_before_start")
    await db.execute("DELETE FROM schema_migrations WHERE version = 15")
    start, expired = datetime(2026, 12, 5, 12, tzinfo=UTC), datetime(2026, 12, 5, 10, tzinfo=UTC)
    await db.execute(
        "INSERT INTO silences (silence_id, labels, start_time, end_time, comment, create_time, expire_time)"
        " VALUES ('s1', '{\"a\": \"b\"}', $1, $2, 'c', $2, $2)",
        start,
        expired,
    )
    assert await apply_migrations(db) == [15]
    assert tuple(await db.fetchrow("SELECT start_time, end_time FROM silences")) == (expired, expired)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE silences SET start_time = $1", start)


async def test_a_retry_of_a_silence_deleted_by_retention_is_not_found(app_factory: Any, channel_for: Any) -> None:
    # Answers kept for ever (0), silences for the least allowed: a request id outlives its silence.
    clock = ManualClock(datetime.now(UTC))
    app = await app_factory(clock=clock, idempotency_retention_s=0, incident_retention_s=8 * 86_400)
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
    create = pb.CreateSilenceRequest(silence=_burn(clock.now()), request_id="burn-old")
    created = (await operator.CreateSilence(create)).silence
    expire = pb.ExpireSilenceRequest(silence_id=created.silence_id, request_id="expire-old")
    await operator.ExpireSilence(expire)
    clock.advance(days=9)
    assert app.retention is not None and (await app.retention.run_once())["silences"] == 1
    for retry in (lambda: operator.CreateSilence(create), lambda: operator.ExpireSilence(expire)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await retry()
        # Not INTERNAL: the silence the first call made or ended is gone, and the answer says which.
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert created.silence_id in (err.value.details() or "")
