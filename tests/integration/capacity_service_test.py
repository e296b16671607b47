"""CapacityService RPCs through a real server, PostgreSQL and NATS: bad input (INVALID_ARGUMENT with
every field violation, nothing stored), NOT_FOUND, idempotent ingestion and missions, pagination.

The server here runs the Capacity component alone, so these tests do not depend on the other
services; `capacity_flow_test.py` runs the full server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from aetherops.config import Settings
from aetherops.db import Database
from aetherops.errors import ConfigError
from aetherops.paging import encode_page_token, filters_key
from gen.aetherops.capacity.v1 import capacity_pb2 as pb
from gen.aetherops.capacity.v1 import capacity_pb2_grpc
from servers.app import Application
from servers.capacity import CapacityComponent

FUEL = pb.RESOURCE_TYPE_FUEL
POWER = pb.RESOURCE_TYPE_POWER


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Application]:
    application = Application(settings, components_factory=lambda s: [CapacityComponent(s)])
    await application.start()
    try:
        await application.wait_ready()
        yield application
    finally:
        await application.stop()


@pytest.fixture
async def stub(app: Application, channel_for: Any) -> AsyncIterator[capacity_pb2_grpc.CapacityServiceStub]:
    async with channel_for("admin", app.port) as channel:
        yield capacity_pb2_grpc.CapacityServiceStub(channel)


@pytest.fixture
def db(app: Application) -> Database:  # the server's own pool on this test's schema
    assert app.infra is not None
    return app.infra.db


def snap(sat: str, resource: Any, when: datetime, value: float, unit: str = "kg") -> pb.ResourceSnapshot:
    message = pb.ResourceSnapshot(satellite_id=sat, resource_type=resource, value=value, unit=unit)
    message.timestamp.FromDatetime(when)
    return message


def history(sat: str, *, hours: int = 48, start: float = 100.0, per_hour: float = 1.0) -> list[pb.ResourceSnapshot]:
    """Hourly fuel readings ending an hour ago, depleting `per_hour` kg per hour."""
    now = datetime.now(UTC).replace(microsecond=0)
    return [snap(sat, FUEL, now - timedelta(hours=hours - i), start - per_hour * i) for i in range(hours)]


async def ingest(stub: capacity_pb2_grpc.CapacityServiceStub, snapshots: Iterable[pb.ResourceSnapshot]) -> Any:
    async def requests() -> AsyncIterator[pb.IngestSnapshotsRequest]:
        for s in snapshots:
            yield pb.IngestSnapshotsRequest(snapshot=s)

    return await stub.IngestSnapshots(requests())


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """field -> description of the google.rpc.BadRequest in the error's details."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return {v.field: v.description for v in bad.field_violations}
    return {}


async def test_bad_snapshot_reports_every_violation_and_stores_nothing(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    far_future = datetime.now(UTC) + timedelta(hours=2)
    bad = snap("", pb.RESOURCE_TYPE_UNSPECIFIED, far_future, -1.0, unit="")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {
        "snapshot.satellite_id",
        "snapshot.resource_type",
        "snapshot.value",
        "snapshot.timestamp",
        "snapshot.unit",
    }
    for value in (float("nan"), float("inf")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, datetime.now(UTC), value)))
        assert violations(caught.value) == {"snapshot.value": "must be finite"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-1", 9, datetime.now(UTC), 1.0)))
    assert set(violations(caught.value)) == {"snapshot.resource_type"}
    beyond = snap("SAT-1", FUEL, datetime.now(UTC), 1.0)
    beyond.timestamp.seconds = 10**12  # past year 9999: outside Timestamp's range
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=beyond))
    assert set(violations(caught.value)) == {"snapshot.timestamp"}
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots") == 0


async def test_implausible_values_and_times_are_refused_and_not_stored(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    huge = snap("SAT-X", FUEL, datetime.now(UTC) - timedelta(minutes=5), 1e308)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=huge))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most" in violations(caught.value)["snapshot.value"]
    reply = await ingest(stub, [snap("SAT-X", FUEL, datetime(1970, 1, 1, tzinfo=UTC), 50.0)])
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(0, "snapshot.timestamp")]
    # Whitespace at an end of an id would make a satellite (or unit) of its own: refused, not split.
    spaced = [snap(" SAT-X", FUEL, datetime.now(UTC), 50.0), snap("SAT-X", FUEL, datetime.now(UTC), 50.0, unit="kg ")]
    reply = await ingest(stub, spaced)
    assert [(r.index, r.problems[0].field, r.problems[0].description) for r in reply.rejections] == [
        (0, "snapshot.satellite_id", "must not start or end with whitespace"),
        (1, "snapshot.unit", "must not start or end with whitespace"),
    ]
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots WHERE satellite_id = 'SAT-X'") == 0


async def test_text_postgresql_cannot_store_is_refused_and_spoils_no_batch(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    # NUL in text fails a PostgreSQL statement: found only there, it failed every snapshot of the batch.
    now = datetime.now(UTC)
    reply = await ingest(stub, [snap("SAT-1", FUEL, now, 5.0), snap("SAT-\x00", FUEL, now, 5.0)])
    assert (reply.accepted, reply.rejected) == (1, 1)
    assert reply.rejections[0].index == 1 and reply.rejections[0].problems[0].field == "snapshot.satellite_id"
    for request in (
        pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, now, 4.0, unit="k\x00g")),
        pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, now, 4.0), request_id="r\x00"),
        pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, now, 4.0), request_id="r" * 257),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.IngestSnapshot(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violations(caught.value)) <= {"snapshot.unit", "request_id"}
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots") == 1


async def test_unit_must_stay_the_same_for_a_series(stub: capacity_pb2_grpc.CapacityServiceStub, db: Database) -> None:
    now = datetime.now(UTC)
    await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, now - timedelta(hours=1), 5.0)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-1", FUEL, now, 4.0, unit="lb")))
    assert set(violations(caught.value)) == {"snapshot.unit"}
    # A new series with two units in one stream: the first wins, the other is rejected by index.
    reply = await ingest(
        stub,
        [snap("SAT-2", POWER, now - timedelta(minutes=2), 9.0, "Wh"), snap("SAT-2", POWER, now, 8.0, "kWh")],
    )
    assert (reply.accepted, reply.duplicates, reply.rejected) == (1, 0, 1)
    assert reply.rejections[0].index == 1 and reply.rejections[0].problems[0].field == "snapshot.unit"
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots") == 2


async def test_a_stream_with_many_rejections_still_gets_its_answer(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    # A backfill in the wrong unit: every reason names both units and the series. Listing each of
    # 4,000 rejections made a reply over the 4 MiB message limit: RESOURCE_EXHAUSTED, after the good
    # snapshots had been stored, and the same again on every retry.
    sat = "S" * 256
    now = datetime.now(UTC).replace(microsecond=0)
    await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap(sat, FUEL, now - timedelta(days=1), 90.0)))
    wrong = [snap(sat, FUEL, now - timedelta(seconds=i), 50.0, unit="u" * 256) for i in range(4000)]
    good = [snap("SAT-OK", FUEL, now - timedelta(minutes=i), 10.0) for i in range(3)]
    reply = await ingest(stub, [*good, *wrong])
    assert (reply.accepted, reply.duplicates, reply.rejected) == (3, 0, 4000)
    # The first ones in stream order: at most 1,000, and at most a megabyte of them.
    listed = len(reply.rejections)
    assert 500 < listed <= 1000 and [r.index for r in reply.rejections] == list(range(3, 3 + listed))
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots") == 4


async def test_snapshots_are_stored_once_and_request_ids_replay(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    one = snap("SAT-1", FUEL, datetime.now(UTC) - timedelta(minutes=5), 42.0)
    first = await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=one, request_id="req-1"))
    retried = await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=one, request_id="req-1"))
    again = await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=one))
    assert (first.duplicate, retried.duplicate, again.duplicate) == (False, False, True)

    snapshots = history("SAT-3", hours=10)
    bad = snap("SAT-3", FUEL, datetime.now(UTC), -5.0)
    reply = await ingest(stub, [*snapshots, snapshots[0], bad, *snapshots[:3]])
    assert (reply.accepted, reply.duplicates, reply.rejected) == (10, 4, 1)
    assert [r.index for r in reply.rejections] == [11]
    assert reply.rejections[0].problems[0].field == "snapshot.value"
    reply = await ingest(stub, snapshots)
    assert (reply.accepted, reply.duplicates, reply.rejected) == (0, 10, 0)
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots WHERE satellite_id = 'SAT-3'") == 10


async def test_a_request_id_reused_for_another_snapshot_or_mission_is_another_request(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    # A global idempotency scope answered these as retries of the first request and stored nothing.
    now = datetime.now(UTC) - timedelta(minutes=30)
    await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-R", FUEL, now, 80.0), request_id="s-1"))
    later = snap("SAT-R", FUEL, now + timedelta(minutes=10), 79.0)
    reply = await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=later, request_id="s-1"))
    assert not reply.duplicate
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots WHERE satellite_id = 'SAT-R'") == 2

    start = datetime.now(UTC) + timedelta(days=1)
    for mission_id in ("burn-1", "burn-2"):
        mission = pb.ScheduledMission(
            mission_id=mission_id,
            satellite_id="SAT-R",
            resource_impacts=[pb.ResourceImpact(resource_type=FUEL, amount=10.0)],
        )
        mission.start_time.FromDatetime(start)
        mission.end_time.FromDatetime(start + timedelta(hours=1))
        stored = await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=mission, request_id="m-1"))
        assert stored.mission.mission_id == mission_id
    assert await db.fetchval("SELECT count(*) FROM capacity_missions") == 2


async def test_another_value_for_a_stored_time_is_refused_not_called_a_duplicate(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    when = datetime.now(UTC) - timedelta(minutes=5)
    await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-V", FUEL, when, 80.0)))
    assert (await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-V", FUEL, when, 80.0)))).duplicate
    # It used to answer duplicate: true, and the 10 kg reading was dropped without a word.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-V", FUEL, when, 10.0)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "80 is stored" in violations(caught.value)["snapshot.value"]
    later = when + timedelta(minutes=1)
    reply = await ingest(
        stub,
        [
            snap("SAT-V", FUEL, when, 80.0),
            snap("SAT-V", FUEL, when, 11.0),
            snap("SAT-V", FUEL, later, 79.0),
            snap("SAT-V", FUEL, later, 78.0),
        ],
    )
    assert (reply.accepted, reply.duplicates) == (1, 1)
    assert [(r.index, r.problems[0].field) for r in reply.rejections] == [(1, "snapshot.value"), (3, "snapshot.value")]
    rows = await db.fetch("SELECT value FROM capacity_snapshots WHERE satellite_id = 'SAT-V' ORDER BY snapshot_time")
    assert [r["value"] for r in rows] == [80.0, 79.0]


async def test_queries_validate_and_unknown_satellites_are_not_found(
    stub: capacity_pb2_grpc.CapacityServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ForecastExhaustion(pb.ForecastExhaustionRequest(satellite_id=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {"satellite_id", "resource_type"}
    for call in (
        stub.ForecastExhaustion(pb.ForecastExhaustionRequest(satellite_id="GHOST", resource_type=FUEL)),
        stub.ComputeConsumptionRate(pb.ComputeConsumptionRateRequest(satellite_id="GHOST", resource_type=FUEL)),
        stub.RecommendInterventions(pb.RecommendInterventionsRequest(satellite_id="GHOST")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # An id no satellite can have is named (not a NOT_FOUND echoing 5,000 characters, nor a NUL
    # reaching PostgreSQL).
    for bad in ("x" * 5000, "SAT\x00", " SAT-1"):
        for call in (
            stub.ForecastExhaustion(pb.ForecastExhaustionRequest(satellite_id=bad, resource_type=FUEL)),
            stub.ListSnapshots(pb.ListSnapshotsRequest(satellite_id=bad, resource_type=FUEL)),
            stub.ListScheduledMissions(pb.ListScheduledMissionsRequest(satellite_id=bad)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad[:20]
            assert set(violations(caught.value)) == {"satellite_id"}, bad[:20]

    # Known satellite, too little history: an empty forecast with the reason, not an error.
    await ingest(stub, history("SAT-1", hours=2))
    reply = await stub.ForecastExhaustion(pb.ForecastExhaustionRequest(satellite_id="SAT-1", resource_type=FUEL))
    assert not reply.HasField("forecast") and "insufficient history" in reply.reason
    rate = await stub.ComputeConsumptionRate(
        pb.ComputeConsumptionRateRequest(satellite_id="SAT-1", resource_type=POWER)
    )
    assert not rate.HasField("rate") and "no POWER snapshots" in rate.reason


async def test_missions_validate_replace_by_id_and_replay_by_request_id(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    start = datetime.now(UTC) + timedelta(days=1)
    mission = pb.ScheduledMission(
        mission_id="burn-1",
        satellite_id="SAT-1",
        resource_impacts=[pb.ResourceImpact(resource_type=FUEL, amount=10.0)],
    )
    mission.start_time.FromDatetime(start)
    mission.end_time.FromDatetime(start - timedelta(hours=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=mission))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {"mission.end_time"}

    broken = pb.ScheduledMission(
        resource_impacts=[
            pb.ResourceImpact(amount=float("nan")),
            pb.ResourceImpact(resource_type=FUEL, amount=float("inf")),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=broken))
    assert {
        "mission.mission_id",
        "mission.satellite_id",
        "mission.start_time",
        "mission.end_time",
        "mission.resource_impacts[0].resource_type",
        "mission.resource_impacts[1].amount",  # the caller's index, past the refused first entry
    } <= set(violations(caught.value))
    # A zeroed clock (1970) is refused, as for snapshots and alerts, not stored as a mission.
    zeroed = pb.ScheduledMission()
    zeroed.CopyFrom(mission)
    zeroed.start_time.FromDatetime(datetime(1970, 1, 1, tzinfo=UTC))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=zeroed))
    assert violations(caught.value) == {
        "mission.start_time": "must not be before 2000-01-01 (a clock that was never set?)"
    }
    assert await db.fetchval("SELECT count(*) FROM capacity_missions") == 0

    mission.end_time.FromDatetime(start + timedelta(hours=1))
    stored = await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=mission, request_id="m-1"))
    assert stored.mission == mission
    # Same request_id with another payload: the first answer, nothing changed.
    changed = pb.ScheduledMission()
    changed.CopyFrom(mission)
    changed.resource_impacts[0].amount = 99.0
    replay = await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=changed, request_id="m-1"))
    assert replay.mission == mission
    # Same mission_id, new request: replaces.
    replaced = await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=changed, request_id="m-2"))
    assert replaced.mission.resource_impacts[0].amount == 99.0
    rows = await db.fetch("SELECT mission_id, resource_impacts FROM capacity_missions")
    assert [(r["mission_id"], r["resource_impacts"]) for r in rows] == [("burn-1", {"1": 99.0})]

    # A cancelled mission is deleted, and the forecast stops counting it.
    await ingest(stub, history("SAT-1"))
    query = pb.ForecastExhaustionRequest(satellite_id="SAT-1", resource_type=FUEL)
    counted = (await stub.ForecastExhaustion(query)).forecast
    # ~29 kg are left when the 99 kg burn starts: the tank runs dry during it, and only what it burns
    # until then (its impact spread over its hour) is in the forecast.
    exhaustion = counted.predicted_exhaustion_time.ToDatetime(tzinfo=UTC)
    assert start < exhaustion < start + timedelta(hours=1)
    assert counted.scheduled_impact == pytest.approx(99.0 * (exhaustion - start) / timedelta(hours=1), rel=1e-6)
    delete = pb.DeleteScheduledMissionRequest(mission_id="burn-1", request_id="d-1")
    deleted = await stub.DeleteScheduledMission(delete)
    assert deleted.mission == replaced.mission
    assert (await stub.DeleteScheduledMission(delete)).mission == replaced.mission  # a retry
    assert (await stub.ForecastExhaustion(query)).forecast.scheduled_impact == 0.0
    assert await db.fetchval("SELECT count(*) FROM capacity_missions") == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteScheduledMission(pb.DeleteScheduledMissionRequest(mission_id="burn-1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteScheduledMission(pb.DeleteScheduledMissionRequest(mission_id=""))
    assert set(violations(caught.value)) == {"mission_id"}


async def test_a_mission_retry_racing_the_first_call_gets_its_answer(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    # Retries that overlap the first call (a client that gave up waiting): the retries of a delete
    # found no answer yet, waited for the row, and then found no mission: NOT_FOUND for a delete
    # that succeeded. A retried add with another payload could overwrite the first one.
    start = datetime.now(UTC) + timedelta(days=1)
    mission = pb.ScheduledMission(
        mission_id="burn-r", satellite_id="SAT-R", resource_impacts=[pb.ResourceImpact(resource_type=FUEL, amount=5.0)]
    )
    mission.start_time.FromDatetime(start)
    mission.end_time.FromDatetime(start + timedelta(hours=1))
    changed = pb.ScheduledMission()
    changed.CopyFrom(mission)
    changed.resource_impacts[0].amount = 99.0
    adds = await asyncio.gather(
        *(
            stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=m, request_id="add-r"))
            for m in [mission] * 4 + [changed] * 4
        )
    )
    assert len({a.mission.resource_impacts[0].amount for a in adds}) == 1, "every retry answers as the first call"
    stored = await db.fetchval("SELECT count(*) FROM capacity_missions WHERE mission_id = 'burn-r'")
    assert stored == 1
    delete = pb.DeleteScheduledMissionRequest(mission_id="burn-r", request_id="del-r")
    deleted = await asyncio.gather(*(stub.DeleteScheduledMission(delete) for _ in range(8)))
    assert {d.mission.mission_id for d in deleted} == {"burn-r"}
    assert await db.fetchval("SELECT count(*) FROM capacity_missions") == 0


async def test_a_snapshot_retry_racing_the_first_call_gets_its_answer(
    stub: capacity_pb2_grpc.CapacityServiceStub, db: Database
) -> None:
    # Retries overlapping the first call all passed the replay lookup before it committed: the first
    # said stored (duplicate=false) and the retries duplicate=true, for one request.
    when = datetime.now(UTC) - timedelta(minutes=1)
    for attempt in range(3):  # the retries land in the first call's batch or a later one
        one = snap("SAT-RACE", FUEL, when + timedelta(seconds=attempt), 42.0)
        request = pb.IngestSnapshotRequest(snapshot=one, request_id=f"race-{attempt}")
        replies = await asyncio.gather(*(stub.IngestSnapshot(request) for _ in range(8)))
        assert [r.duplicate for r in replies] == [False] * 8
    # Without a request id, a resend is a duplicate as before.
    again = await stub.IngestSnapshot(pb.IngestSnapshotRequest(snapshot=snap("SAT-RACE", FUEL, when, 42.0)))
    assert again.duplicate
    assert await db.fetchval("SELECT count(*) FROM capacity_snapshots WHERE satellite_id = 'SAT-RACE'") == 3


async def test_critical_forecasts_page_through_in_urgency_order(
    stub: capacity_pb2_grpc.CapacityServiceStub,
) -> None:
    # Seven satellites running out in about 2..8 days, three healthy ones.
    snapshots = []
    for i in range(10):
        days_left = 2.0 + i if i < 7 else 400.0
        per_hour = 47.0 / (48.0 + 24.0 * days_left) * 2.0
        snapshots += history(f"SAT-{i:02d}", start=94.0, per_hour=per_hour)
    snapshots += history("SAT-NEW", hours=1)  # one reading: no forecast yet
    reply = await ingest(stub, snapshots)
    assert reply.accepted == 481
    everything = await stub.GetCriticalForecasts(pb.GetCriticalForecastsRequest(page_size=100))
    expected = [(f.satellite_id, f.resource_type) for f in everything.forecasts]
    assert expected == [(f"SAT-{i:02d}", FUEL) for i in range(7)]
    assert not everything.next_page_token
    days = [f.days_remaining for f in everything.forecasts]
    assert days == sorted(days) and days[-1] < 14.0

    seen: list[tuple[str, int]] = []
    token = ""
    pages = 0
    while True:
        page = await stub.GetCriticalForecasts(pb.GetCriticalForecastsRequest(page_size=3, page_token=token))
        seen += [(f.satellite_id, f.resource_type) for f in page.forecasts]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == expected and pages == 3

    horizon = pb.GetCriticalForecastsRequest(page_size=100)
    horizon.horizon.FromTimedelta(timedelta(days=4.5))
    near = await stub.GetCriticalForecasts(horizon)
    assert [f.satellite_id for f in near.forecasts] == ["SAT-00", "SAT-01", "SAT-02"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetCriticalForecasts(pb.GetCriticalForecastsRequest(page_token="not-a-token", page_size=-1))
    assert set(violations(caught.value)) == {"page_token", "page_size"}

    summary = await stub.GetFleetRiskSummary(pb.GetFleetRiskSummaryRequest())
    assert [g.risk_level for g in summary.groups] == [
        pb.RISK_LEVEL_CRITICAL,
        pb.RISK_LEVEL_WARNING,
        pb.RISK_LEVEL_WATCH,
        pb.RISK_LEVEL_NOMINAL,
    ]
    assert list(summary.groups[0].satellite_ids) == [f"SAT-{i:02d}" for i in range(7)]
    assert list(summary.groups[3].satellite_ids) == ["SAT-07", "SAT-08", "SAT-09"]
    assert summary.satellite_count == 10
    # Named apart, not left out: an operator must see that its risk is unknown.
    assert list(summary.unforecast_satellite_ids) == ["SAT-NEW"]


async def test_critical_forecasts_pages_skip_nothing_while_the_clock_runs(
    stub: capacity_pb2_grpc.CapacityServiceStub,
) -> None:
    # Three satellites with the same history run out at the same moment. Between two pages the
    # clock moves on, and every days_remaining shrinks with it: a page token holding the last
    # item's days_remaining then put the next satellites before it, and paging ended after one.
    await ingest(stub, [s for sat in ("SAT-A", "SAT-B", "SAT-C") for s in history(sat, start=94.0, per_hour=1.0)])
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.GetCriticalForecasts(pb.GetCriticalForecastsRequest(page_size=1, page_token=token))
        seen += [f.satellite_id for f in page.forecasts]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["SAT-A", "SAT-B", "SAT-C"]


async def test_list_snapshots_pages_through_a_series_in_time_order(
    stub: capacity_pb2_grpc.CapacityServiceStub,
) -> None:
    series = history("SAT-HIST", hours=25)
    await ingest(stub, [*series, snap("SAT-HIST", POWER, datetime.now(UTC) - timedelta(hours=1), 50.0, "Wh")])
    times = [s.timestamp.ToDatetime(tzinfo=UTC) for s in series]

    seen: list[pb.ResourceSnapshot] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListSnapshots(
            pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=FUEL, page_size=10, page_token=token)
        )
        seen.extend(page.snapshots)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3, "10 + 10 + 5: the last page has no token"
    assert [(s.timestamp.ToDatetime(tzinfo=UTC), s.value, s.unit) for s in seen] == [
        (t, s.value, "kg") for t, s in zip(times, series, strict=True)
    ]
    assert {(s.satellite_id, s.resource_type) for s in seen} == {("SAT-HIST", FUEL)}, "the power series stays out"

    # A range is [start_time, end_time).
    ranged = pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=FUEL)
    ranged.start_time.FromDatetime(times[5])
    ranged.end_time.FromDatetime(times[8])
    assert [s.value for s in (await stub.ListSnapshots(ranged)).snapshots] == [s.value for s in series[5:8]]

    # A token belongs to its series and range.
    first = await stub.ListSnapshots(pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=FUEL, page_size=5))
    for request in (
        pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=POWER, page_token=first.next_page_token),
        pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=FUEL, page_token="not-a-token"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListSnapshots(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violations(caught.value)) == {"page_token"}

    backwards = pb.ListSnapshotsRequest(satellite_id="SAT-HIST", resource_type=FUEL, page_size=-1)
    backwards.start_time.FromDatetime(times[8])
    backwards.end_time.FromDatetime(times[5])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(backwards)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {"end_time", "page_size"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(pb.ListSnapshotsRequest(satellite_id=""))
    assert set(violations(caught.value)) == {"satellite_id", "resource_type"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(pb.ListSnapshotsRequest(satellite_id="GHOST", resource_type=FUEL))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_storage_capacity_from_the_capacity_config_file(
    settings: Settings, channel_for: Any, tmp_path: Any
) -> None:
    config = tmp_path / "capacity.yaml"
    config.write_text("storage:\n  default_capacity: 500\n  satellites: {SAT-BIG: 5000}\n")
    now = datetime.now(UTC).replace(microsecond=0)
    # 48 hourly readings filling 2 GB an hour from 100 GB: a 500 GB disk is full in about 8 days.
    filling = [
        snap(sat, pb.RESOURCE_TYPE_STORAGE, now - timedelta(hours=48 - i), 100.0 + 2.0 * i, unit="GB")
        for sat in ("SAT-S", "SAT-BIG")
        for i in range(48)
    ]
    for configured in (False, True):
        overrides = {"capacity_config_file": str(config)} if configured else {}
        app = Application(settings.with_overrides(**overrides), components_factory=lambda s: [CapacityComponent(s)])
        await app.start()
        try:
            await app.wait_ready()
            async with channel_for("admin", app.port) as channel:
                stub = capacity_pb2_grpc.CapacityServiceStub(channel)
                if not configured:
                    await ingest(stub, filling)
                request = pb.ForecastExhaustionRequest(satellite_id="SAT-S", resource_type=pb.RESOURCE_TYPE_STORAGE)
                reply = await stub.ForecastExhaustion(request)
                if not configured:
                    assert not reply.HasField("forecast")
                    assert "storage capacity of SAT-S unknown" in reply.reason
                    continue
                assert reply.forecast.HasField("predicted_exhaustion_time"), reply.reason
                assert reply.forecast.days_remaining == pytest.approx((500 - 194) / 48, rel=0.1)
                big = await stub.ForecastExhaustion(
                    pb.ForecastExhaustionRequest(satellite_id="SAT-BIG", resource_type=pb.RESOURCE_TYPE_STORAGE)
                )
                assert big.forecast.days_remaining == pytest.approx((5000 - 194) / 48, rel=0.1)
        finally:
            await app.stop()


async def test_a_bad_capacity_config_file_stops_the_server_from_being_built(settings: Settings, tmp_path: Any) -> None:
    config = tmp_path / "capacity.json"
    config.write_text('{"storage": {"default_capacity": -5}}')
    with pytest.raises(ConfigError, match=r"storage\.default_capacity: must be a positive number"):
        CapacityComponent(settings.with_overrides(capacity_config_file=str(config)))


async def test_list_scheduled_missions_filters_and_pages(stub: capacity_pb2_grpc.CapacityServiceStub) -> None:
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)

    def mission(mission_id: str, day: int, resource: Any, sat: str = "SAT-M") -> pb.ScheduledMission:
        m = pb.ScheduledMission(
            mission_id=mission_id,
            satellite_id=sat,
            resource_impacts=[pb.ResourceImpact(resource_type=resource, amount=3.0)],
        )
        m.start_time.FromDatetime(base + timedelta(days=day))
        m.end_time.FromDatetime(base + timedelta(days=day, hours=6))
        return m

    imaging = mission("imaging-2", 2, POWER)
    imaging.resource_impacts.add(resource_type=FUEL, amount=0.0)  # no fuel used: not a fuel mission
    for m in (
        mission("burn-3", 3, FUEL),
        mission("burn-1", 1, FUEL),
        imaging,
        mission("burn-0", 0, FUEL, sat="SAT-OTHER"),
    ):
        await stub.AddScheduledMission(pb.AddScheduledMissionRequest(mission=m))

    async def ids(**fields: Any) -> list[str]:
        reply = await stub.ListScheduledMissions(pb.ListScheduledMissionsRequest(satellite_id="SAT-M", **fields))
        return [m.mission_id for m in reply.missions]

    assert await ids() == ["burn-1", "imaging-2", "burn-3"], "earliest start first, one satellite only"
    assert await ids(resource_type=FUEL) == ["burn-1", "burn-3"]
    window_start, window_end = pb.ListScheduledMissionsRequest().start_time, pb.ListScheduledMissionsRequest().end_time
    window_start.FromDatetime(base + timedelta(days=1, hours=7))  # after burn-1 ended
    window_end.FromDatetime(base + timedelta(days=3))  # burn-3 starts exactly here: not overlapping
    assert await ids(start_time=window_start, end_time=window_end) == ["imaging-2"]

    first = await stub.ListScheduledMissions(pb.ListScheduledMissionsRequest(satellite_id="SAT-M", page_size=2))
    assert [m.mission_id for m in first.missions] == ["burn-1", "imaging-2"] and first.next_page_token
    assert first.missions[0].resource_impacts[0].amount == 3.0
    rest = await stub.ListScheduledMissions(
        pb.ListScheduledMissionsRequest(satellite_id="SAT-M", page_size=2, page_token=first.next_page_token)
    )
    assert [m.mission_id for m in rest.missions] == ["burn-3"] and not rest.next_page_token
    assert await stub.ListScheduledMissions(pb.ListScheduledMissionsRequest(satellite_id="GHOST")) == (
        pb.ListScheduledMissionsResponse()
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListScheduledMissions(
            pb.ListScheduledMissionsRequest(
                satellite_id="SAT-M", resource_type=FUEL, page_token=first.next_page_token, page_size=-1
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {"page_token", "page_size"}, "a token is bound to its filters"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListScheduledMissions(
            pb.ListScheduledMissionsRequest(
                satellite_id="", resource_type=99, start_time=window_end, end_time=window_start
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("mission_id", "time"),
    [("burn\u0000x", 0), ("\ud800", 0), ("burn-1", "5"), ("burn-1", 1.5), ("burn-1", True)],
    ids=["nul", "lone-surrogate", "text-time", "fractional-time", "boolean-time"],
)
async def test_a_forged_mission_page_token_is_refused_not_an_internal_error(
    stub: capacity_pb2_grpc.CapacityServiceStub, mission_id: str, time: object
) -> None:
    # The filters hash is no secret, so a client can build a token whose mission id PostgreSQL cannot
    # take (JSON's "\u0000" and "\ud800" escapes): that once reached the query and failed it, as
    # INTERNAL for the surrogate. Nor is a time that is not an integer one (int() took "5", 1.5 and
    # true, and the listing went on from there). It is a token this server never issued.
    position = {"t": time, "m": mission_id}
    token = encode_page_token(position, filters_key("SAT-M", 0, None, None))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListScheduledMissions(pb.ListScheduledMissionsRequest(satellite_id="SAT-M", page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == {"page_token": "not a token this server issued"}
