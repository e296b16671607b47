"""The async SDK against a running server (and, for retries and deadlines, a scripted one).

Runbook RPCs are tested against the contract; they pass once the runbook
service is implemented.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _poll import eventually

from clients.sdk import (
    AetherOpsClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    SyncAetherOpsClient,
    Unavailable,
    alert,
    resource_type,
    snapshot,
)
from gen.aetherops.capacity.v1 import capacity_pb2
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc


@pytest.fixture
async def client(server: Any, tokens: dict[str, str]) -> AsyncIterator[AetherOpsClient]:
    async with AetherOpsClient(f"127.0.0.1:{server.port}", token=tokens["admin"], timeout=10.0) as sdk:
        yield sdk


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_ingest_alert_then_get_cluster(client: AetherOpsClient) -> None:
    alert_id = _id("sdk")
    reply = await client.ingest_alert(
        alert_id=alert_id, satellite_id="SAT-SDK", subsystem="power", severity=4, message="undervoltage"
    )
    assert reply.cluster_id and reply.cluster_opened and not reply.replay
    again = await client.ingest_alert(
        alert_id=alert_id, satellite_id="SAT-SDK", subsystem="power", severity=4, message="undervoltage"
    )
    assert again.replay and again.cluster_id == reply.cluster_id
    cluster = (await client.get_cluster(reply.cluster_id)).cluster
    assert [a.alert_id for a in cluster.alerts] == [alert_id]
    listed = [c.cluster_id async for c in client.iter_active_clusters(satellite_id="SAT-SDK")]
    assert reply.cluster_id in listed
    (full,) = (await client.list_active_clusters(satellite_id="SAT-SDK")).clusters
    (basic,) = (await client.list_clusters(satellite_id="SAT-SDK", with_alerts=False)).clusters
    assert len(full.alerts) == full.alert_count == 1 and not basic.alerts and basic.alert_count == 1


async def test_tracking_id_round_trip(client: AetherOpsClient) -> None:
    tracking = _id("trk")
    reply = await client.ingest_alert(
        alert_id=_id("a"), satellite_id="SAT-TRK", subsystem="comms", severity=2, tracking_id=tracking
    )
    assert client.last_tracking_id == tracking
    cluster = (await client.get_cluster(reply.cluster_id)).cluster
    assert cluster.tracking_id == tracking
    assert cluster.alerts[0].tracking_id == tracking
    await client.get_fleet_risk_summary()
    generated = client.last_tracking_id
    assert generated and generated != tracking


async def test_query_rpcs_page_through_with_the_iterators(client: AetherOpsClient) -> None:
    tracking = _id("trk")
    alerts = [
        alert(alert_id=_id("q"), satellite_id=f"SAT-Q{i}", subsystem="comms", severity=2, timestamp_=None)
        for i in range(3)
    ]
    await client.ingest_alerts(alerts, tracking_id=tracking)
    stored = [a async for a in client.iter_alerts(by_tracking_id=tracking, page_size=2)]
    assert sorted(a.alert.alert_id for a in stored) == sorted(a.alert_id for a in alerts)
    assert client.last_tracking_id != tracking, "by_tracking_id filters; the calls go under their own ids"

    await client.register_runbook(
        {
            "runbook_id": "sdk-q",
            "name": "q",
            "steps": [{"step_id": "s", "action": "log", "parameters": {"message": "m"}}],
        }
    )
    started = await client.start_execution("sdk-q", incident_id=stored[0].cluster_id, tracking_id=tracking)
    by_incident = [e async for e in client.iter_executions(incident_id=stored[0].cluster_id)]
    by_tracking = [e async for e in client.iter_executions(by_tracking_id=tracking, page_size=1)]
    assert [e.execution_id for e in by_incident] == [e.execution_id for e in by_tracking]
    assert by_tracking[0].execution_id == started.execution.execution_id

    now = datetime.now(UTC).replace(microsecond=0)
    points = [
        snapshot(
            satellite_id="SAT-QS", resource="fuel", value=50.0 - i, unit="kg", timestamp_=now - timedelta(hours=5 - i)
        )
        for i in range(5)
    ]
    await client.ingest_snapshots(points)
    history = [s async for s in client.iter_snapshots("SAT-QS", "fuel", start=now - timedelta(hours=4), page_size=2)]
    assert [s.value for s in history] == [49.0, 48.0, 47.0, 46.0]

    for k, (hours, resource) in enumerate([(30, "fuel"), (10, "fuel"), (20, "power"), (20, "fuel"), (-9, "fuel")]):
        mission = capacity_pb2.ScheduledMission(
            mission_id=f"M{k}",
            satellite_id="SAT-QS",
            resource_impacts=[capacity_pb2.ResourceImpact(resource_type=resource_type(resource), amount=1.0)],
        )
        mission.start_time.FromDatetime(now + timedelta(hours=hours))
        mission.end_time.FromDatetime(now + timedelta(hours=hours + 1))
        await client.add_scheduled_mission(mission)
    fuel_ahead = client.iter_scheduled_missions("SAT-QS", "fuel", start=now, page_size=2)
    assert [m.mission_id async for m in fuel_ahead] == ["M1", "M3", "M0"]


async def test_invalid_argument_carries_field_violations(client: AetherOpsClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.ingest_alert(alert_id=_id("bad"), satellite_id="", subsystem="power", severity=9)
    fields = {v.field for v in caught.value.field_violations}
    assert "alert.severity" in fields
    assert caught.value.tracking_id
    assert caught.value.tracking_id in str(caught.value)


async def test_not_found_and_failed_precondition(client: AetherOpsClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_cluster("no-such-cluster", tracking_id="trk-nf")
    assert caught.value.tracking_id == "trk-nf"
    reply = await client.ingest_alert(alert_id=_id("c"), satellite_id="SAT-CLOSE", subsystem="adcs", severity=3)
    request_id = uuid.uuid4().hex
    closed = await client.close_cluster(reply.cluster_id, reason="resolved", request_id=request_id)
    assert closed.cluster.status == correlation_pb2.CLUSTER_STATUS_CLOSED
    # The same request_id is a retry (answered as before); a new one is a second close.
    retried = await client.close_cluster(reply.cluster_id, reason="resolved", request_id=request_id)
    assert retried.cluster.cluster_id == reply.cluster_id
    with pytest.raises(FailedPrecondition):
        await client.close_cluster(reply.cluster_id, reason="again")
    with pytest.raises(FailedPrecondition, match="closed"):
        await client.acknowledge_cluster(reply.cluster_id, note="too late")


async def test_acknowledge_cluster(client: AetherOpsClient) -> None:
    reply = await client.ingest_alert(alert_id=_id("k"), satellite_id="SAT-ACK", subsystem="power", severity=4)
    acked = (await client.acknowledge_cluster(reply.cluster_id, note="on it")).cluster
    assert acked.acknowledged_by and acked.acknowledge_note == "on it" and acked.HasField("acknowledge_time")
    with pytest.raises(FailedPrecondition, match="acknowledged by"):
        await client.acknowledge_cluster(reply.cluster_id)
    handed = (await client.acknowledge_cluster(reply.cluster_id, note="next shift", take_over=True)).cluster
    assert handed.acknowledge_note == "next shift"


async def test_merge_clusters(client: AetherOpsClient) -> None:
    ids = [
        (
            await client.ingest_alert(
                alert_id=_id(f"m{k}"), satellite_id=f"SAT-MRG{k}", subsystem=f"unit-{k}", severity=3
            )
        ).cluster_id
        for k in range(2)
    ]
    merged = (await client.merge_clusters(ids[0], [ids[1]], note="one fault")).cluster
    assert merged.cluster_id == ids[0] and merged.alert_count == 2
    with pytest.raises(FailedPrecondition, match="merged into"):
        await client.merge_clusters(ids[0], [ids[1]])


async def test_bulk_ingest_reports_rejections_by_index(client: AetherOpsClient) -> None:
    now = datetime.now(UTC)
    alerts = [
        alert(alert_id=_id("b"), satellite_id="SAT-BULK", subsystem="power", severity=3, timestamp_=now),
        alert(alert_id=_id("b"), satellite_id="SAT-BULK", subsystem="power", severity=7, timestamp_=now),
        alert(alert_id=_id("b"), satellite_id="SAT-BULK2", subsystem="thermal", severity=2, timestamp_=now),
    ]
    reply = await client.ingest_alerts(alerts)
    assert reply.accepted + reply.duplicates == 2
    assert [r.index for r in reply.rejections] == [1]


async def test_capacity_forecast_and_fleet_risk(client: AetherOpsClient) -> None:
    now = datetime.now(UTC)
    snapshots = [
        snapshot(
            satellite_id="SAT-CAP",
            resource="fuel",
            value=100 - 2 * d,
            unit="kg",
            timestamp_=now - timedelta(days=20 - d),
        )
        for d in range(20)
    ]
    reply = await client.ingest_snapshots(snapshots)
    assert reply.accepted == 20
    single = await client.ingest_snapshot(snapshots[-1])
    assert single.duplicate
    forecast = (await client.forecast_exhaustion("SAT-CAP", "fuel")).forecast
    assert forecast.rate_per_day == pytest.approx(2.0, rel=0.05)
    assert forecast.HasField("days_remaining")
    rate = (await client.compute_consumption_rate("SAT-CAP", "fuel")).rate
    assert rate.sample_count == 20
    summary = await client.get_fleet_risk_summary()
    assert any("SAT-CAP" in g.satellite_ids for g in summary.groups)


async def test_runbook_register_start_status(client: AetherOpsClient) -> None:
    runbook_id = _id("rb")
    definition = {
        "runbook_id": runbook_id,
        "name": "announce",
        "steps": [{"step_id": "say", "action": "log", "parameters": {"message": "bus ${bus}"}}],
    }
    registered = await client.register_runbook(definition)
    assert registered.created and registered.runbook.version == 1
    plan = await client.start_execution(runbook_id, variables={"bus": "B"}, dry_run=True)
    assert plan.plan[0].rendered_parameters["message"] == "bus B"
    started = await client.start_execution(runbook_id, variables={"bus": "B"})
    status = await client.get_execution_status(started.execution.execution_id)
    assert status.execution.runbook_id == runbook_id


async def test_matching_runbooks_page_through(client: AetherOpsClient) -> None:
    tag = _id("tag")
    ids = sorted(_id("match") for _ in range(3))
    for runbook_id in ids:
        await client.register_runbook(
            {
                "runbook_id": runbook_id,
                "name": "match",
                "trigger_conditions": {"tag": tag},
                "steps": [{"step_id": "say", "action": "log", "parameters": {"message": "hi"}}],
            }
        )
    first = await client.find_matching_runbooks({"tag": tag}, page_size=2)
    assert [r.runbook_id for r in first.runbooks] == ids[:2] and first.next_page_token
    assert [r.runbook_id async for r in client.iter_matching_runbooks({"tag": tag}, page_size=1)] == ids


# -- retries and deadlines against a scripted server ------------------------------------------


class _Flaky(correlation_pb2_grpc.CorrelationServiceServicer):
    """UNAVAILABLE (CANCELLED for IngestAlert, as grpc-core sheds calls) for the first `failures`
    calls of each method, then an answer."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.never = asyncio.Event()

    def _attempt(self, name: str) -> bool:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name] <= self.failures

    async def GetCluster(self, request: Any, context: Any) -> Any:
        if self._attempt("GetCluster"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        return correlation_pb2.GetClusterResponse(cluster=correlation_pb2.Cluster(cluster_id=request.cluster_id))

    async def IngestAlert(self, request: Any, context: Any) -> Any:
        if self._attempt("IngestAlert"):
            await context.abort(grpc.StatusCode.CANCELLED, "shed")
        return correlation_pb2.IngestAlertResponse(cluster_id="c-1")

    async def IngestAlerts(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            pass
        if self._attempt("IngestAlerts"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        return correlation_pb2.IngestAlertsResponse()

    async def ListActiveClusters(self, request: Any, context: Any) -> Any:
        await self.never.wait()  # answers only after the client's deadline
        return correlation_pb2.ListActiveClustersResponse()


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[_Flaky, int]]:
    servicer = _Flaky(failures=2)  # type: ignore[abstract]  # only the RPCs under test are scripted
    scripted = grpc.aio.server()
    correlation_pb2_grpc.add_CorrelationServiceServicer_to_server(servicer, scripted)
    port = scripted.add_insecure_port("127.0.0.1:0")
    await scripted.start()
    yield servicer, port
    servicer.never.set()
    await scripted.stop(None)


async def test_idempotent_reads_are_retried_on_unavailable(flaky: tuple[_Flaky, int]) -> None:
    servicer, port = flaky
    async with AetherOpsClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.01)) as sdk:
        reply = await sdk.get_cluster("c-9")
        assert reply.cluster.cluster_id == "c-9"
        assert servicer.calls["GetCluster"] == 3
        # Client streams are not in the retry policy: the first UNAVAILABLE is final.
        with pytest.raises(Unavailable):
            await sdk.ingest_alerts([correlation_pb2.Alert(alert_id="x")])
        assert servicer.calls["IngestAlerts"] == 1


async def test_ingest_shed_with_cancelled_is_retried(flaky: tuple[_Flaky, int]) -> None:
    servicer, port = flaky
    async with AetherOpsClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.01)) as sdk:
        reply = await sdk.ingest_alert(alert_id="a-1", satellite_id="SAT-1", subsystem="power", severity=3)
        assert reply.cluster_id == "c-1"
        assert servicer.calls["IngestAlert"] == 3


async def test_without_retry_policy_unavailable_surfaces(flaky: tuple[_Flaky, int]) -> None:
    servicer, port = flaky
    async with AetherOpsClient(f"127.0.0.1:{port}", retry=None) as sdk:
        with pytest.raises(Unavailable):
            await sdk.get_cluster("c-9")
        assert servicer.calls["GetCluster"] == 1


async def test_default_deadline_applies(flaky: tuple[_Flaky, int]) -> None:
    from clients.sdk import DeadlineExceeded

    _, port = flaky
    async with AetherOpsClient(f"127.0.0.1:{port}", timeout=0.3) as sdk:
        with pytest.raises(DeadlineExceeded) as caught:
            await sdk.list_active_clusters()
        assert caught.value.tracking_id


async def test_a_watch_ended_by_shutdown_raises_unavailable_at_once(app_factory: Any, tokens: dict[str, str]) -> None:
    # The server ends a watch at shutdown with UNAVAILABLE ("watch again"). While the SDK's retry
    # policy covered the watches, that was retried against the stopped server, and the sync
    # client's iterator then waited for ever instead of raising.
    app = await app_factory(shutdown_grace_s=30.0)
    address, token = f"127.0.0.1:{app.port}", tokens["admin"]
    outcome: list[BaseException] = []

    def watch_in_a_thread() -> None:
        with SyncAetherOpsClient(address, token=token, timeout=None) as sync_client:
            try:
                for _ in sync_client.watch_clusters():
                    pass
            except Unavailable as exc:
                outcome.append(exc)

    async with AetherOpsClient(address, token=token, timeout=None) as async_client:
        thread = threading.Thread(target=watch_in_a_thread, daemon=True)
        thread.start()
        async_watch = async_client.watch_clusters()
        pending = asyncio.ensure_future(anext(aiter(async_watch)))
        feed = next(c for c in app.components if c.name == "correlation").feed

        async def both_watching() -> bool:
            return len(feed._watchers) == 2

        await eventually(both_watching, what="both watches registered")
        await app.stop()
        with pytest.raises(Unavailable, match="watch again"):
            await asyncio.wait_for(pending, 10)

        async def thread_done() -> bool:
            return not thread.is_alive()

        await eventually(thread_done, timeout_s=10, what="the sync watch to end")
        assert len(outcome) == 1 and "watch again" in str(outcome[0])
