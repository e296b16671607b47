"""The sync SDK against grpcio-testing's in-process channel.

The client runs in a worker thread; the test thread plays the server with
`take_*` (which blocks until the client's call arrives, so no sleeps) and
answers with responses, metadata and rich error statuses.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from clients.sdk import (
    RETRYABLE_METHODS,
    TRACKING_HEADER,
    AetherOpsError,
    ClientConfig,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    SyncAetherOpsClient,
    Unavailable,
)
from gen.aetherops.capacity.v1 import capacity_pb2
from gen.aetherops.correlation.v1 import correlation_pb2
from gen.aetherops.runbook.v1 import runbook_pb2

CORRELATION = correlation_pb2.DESCRIPTOR.services_by_name["CorrelationService"]
RUNBOOK = runbook_pb2.DESCRIPTOR.services_by_name["RunbookService"]
CAPACITY = capacity_pb2.DESCRIPTOR.services_by_name["CapacityService"]


class _Recording:
    """Wraps a multi-callable to record the deadline each call is made with."""

    def __init__(self, inner: Any, timeouts: list[float | None]) -> None:
        self._inner = inner
        self._timeouts = timeouts

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._timeouts.append(kwargs.get("timeout"))
        return self._inner(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        self._timeouts.append(kwargs.get("timeout"))
        return self._inner.with_call(*args, **kwargs)


class _RecordingChannel:
    """grpc_testing's channel, plus a record of deadlines (it does not expose them to the test side)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.timeouts: list[float | None] = []

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recording(self.inner.unary_unary(method, *args, **kwargs), self.timeouts)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recording(self.inner.unary_stream(method, *args, **kwargs), self.timeouts)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recording(self.inner.stream_unary(method, *args, **kwargs), self.timeouts)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recording(self.inner.stream_stream(method, *args, **kwargs), self.timeouts)


@pytest.fixture
def channel() -> _RecordingChannel:
    return _RecordingChannel(grpc_testing.channel([CORRELATION, RUNBOOK, CAPACITY], grpc_testing.strict_real_time()))


@pytest.fixture
def client(channel: _RecordingChannel) -> Iterator[SyncAetherOpsClient]:
    config = ClientConfig(address="unused:0", token="s3cret", timeout_s=7.5)
    with SyncAetherOpsClient(config=config, channel=channel) as sdk:
        yield sdk


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def _meta(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _rich(code: int, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def _run(pool: ThreadPoolExecutor, call: Callable[[], Any]) -> Future[Any]:
    return pool.submit(call)


def test_unary_call_sends_tracking_id_token_and_default_deadline(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: client.get_cluster("c-1", tracking_id="trk-42"))
    metadata, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["GetCluster"])
    sent = _meta(metadata)
    assert request.cluster_id == "c-1"
    assert sent[TRACKING_HEADER] == "trk-42"
    assert sent["authorization"] == "Bearer s3cret"
    cluster = correlation_pb2.Cluster(cluster_id="c-1", status=correlation_pb2.CLUSTER_STATUS_OPEN)
    rpc.terminate(
        correlation_pb2.GetClusterResponse(cluster=cluster), ((TRACKING_HEADER, "trk-42"),), grpc.StatusCode.OK, ""
    )
    reply = future.result()
    assert reply.cluster.cluster_id == "c-1"
    assert client.last_tracking_id == "trk-42"
    assert channel.timeouts == [7.5]


def test_tracking_id_is_generated_per_call_and_the_servers_is_kept(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    seen = []
    for _ in range(2):
        future = _run(pool, lambda: client.get_fleet_risk_summary(timeout=1.0))
        metadata, _, rpc = channel.inner.take_unary_unary(CAPACITY.methods_by_name["GetFleetRiskSummary"])
        sent = _meta(metadata)[TRACKING_HEADER]
        seen.append(sent)
        reply = capacity_pb2.GetFleetRiskSummaryResponse(satellite_count=3)
        rpc.terminate(reply, ((TRACKING_HEADER, sent),), grpc.StatusCode.OK, "")
        assert future.result().satellite_count == 3
        assert client.last_tracking_id == sent
    assert len(set(seen)) == 2 and all(len(t) == 32 for t in seen)
    assert channel.timeouts == [1.0, 1.0]


def test_the_tracking_id_the_server_answers_with_wins_over_the_one_sent(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    # The server replaces an id it refuses (over 128 characters) and answers with its own, in the trailers.
    too_long = "t" * 200
    future = _run(pool, lambda: client.get_cluster("c-1", tracking_id=too_long))
    metadata, _, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["GetCluster"])
    assert _meta(metadata)[TRACKING_HEADER] == too_long
    reply = correlation_pb2.GetClusterResponse(cluster=correlation_pb2.Cluster(cluster_id="c-1"))
    rpc.terminate(reply, ((TRACKING_HEADER, "srv-made-1"),), grpc.StatusCode.OK, "")
    future.result()
    assert client.last_tracking_id == "srv-made-1"

    future = _run(pool, lambda: client.get_cluster("missing", tracking_id=too_long))
    _, _, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["GetCluster"])
    trailers = (*_rich(code_pb2.NOT_FOUND, "no such cluster"), (TRACKING_HEADER, "srv-made-2"))
    rpc.terminate(None, trailers, grpc.StatusCode.NOT_FOUND, "no such cluster")
    with pytest.raises(AetherOpsError) as caught:
        future.result()
    assert caught.value.tracking_id == "srv-made-2"


def test_invalid_argument_carries_field_violations_and_tracking_id(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(
        pool, lambda: client.ingest_alert(alert_id="a-1", satellite_id="SAT-1", subsystem="power", severity=9)
    )
    metadata, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["IngestAlert"])
    assert request.alert.alert_id == "a-1" and request.alert.timestamp.seconds > 0
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="alert.severity", description="must be 1-5"),
            error_details_pb2.BadRequest.FieldViolation(field="alert.message", description="too long"),
        ]
    )
    trailers = (
        *_rich(code_pb2.INVALID_ARGUMENT, "alert.severity: must be 1-5", bad),
        (TRACKING_HEADER, _meta(metadata)[TRACKING_HEADER]),
    )
    rpc.terminate(None, trailers, grpc.StatusCode.INVALID_ARGUMENT, "alert.severity: must be 1-5")
    with pytest.raises(InvalidArgument) as caught:
        future.result()
    error = caught.value
    assert isinstance(error, AetherOpsError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("alert.severity", "must be 1-5"),
        ("alert.message", "too long"),
    ]
    assert error.tracking_id == _meta(metadata)[TRACKING_HEADER]
    assert error.tracking_id in str(error)


def test_resource_exhausted_carries_retry_after(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: client.forecast_exhaustion("SAT-1", "fuel"))
    _, request, rpc = channel.inner.take_unary_unary(CAPACITY.methods_by_name["ForecastExhaustion"])
    assert request.resource_type == capacity_pb2.RESOURCE_TYPE_FUEL
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    rpc.terminate(
        None, _rich(code_pb2.RESOURCE_EXHAUSTED, "slow down", info), grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"
    )
    with pytest.raises(ResourceExhausted) as caught:
        future.result()
    assert caught.value.retry_after == pytest.approx(2.5)


def test_plain_status_maps_to_its_exception_with_the_sent_tracking_id(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: client.get_runbook("nope", tracking_id="mine"))
    _, _, rpc = channel.inner.take_unary_unary(RUNBOOK.methods_by_name["GetRunbook"])
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "runbook nope not found")
    with pytest.raises(NotFound) as caught:
        future.result()
    assert caught.value.tracking_id == "mine"
    assert caught.value.message == "runbook nope not found"
    future = _run(pool, lambda: client.list_runbooks())
    _, _, rpc = channel.inner.take_unary_unary(RUNBOOK.methods_by_name["ListRunbooks"])
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "down")
    with pytest.raises(Unavailable):
        future.result()


def test_mutations_get_a_request_id_unless_given(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: client.close_cluster("c-1", reason="resolved"))
    _, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["CloseCluster"])
    assert request.reason == "resolved" and len(request.request_id) == 32
    rpc.terminate(correlation_pb2.CloseClusterResponse(), (), grpc.StatusCode.OK, "")
    future.result()
    future = _run(pool, lambda: client.acknowledge_cluster("c-1", note="on it"))
    _, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["AcknowledgeCluster"])
    assert (request.cluster_id, request.note, len(request.request_id)) == ("c-1", "on it", 32)
    rpc.terminate(correlation_pb2.AcknowledgeClusterResponse(), (), grpc.StatusCode.OK, "")
    future.result()
    future = _run(pool, lambda: client.merge_clusters("c-1", ("c-2", "c-3"), note="one fault"))
    _, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["MergeClusters"])
    assert (request.cluster_id, list(request.source_cluster_ids), len(request.request_id)) == (
        "c-1",
        ["c-2", "c-3"],
        32,
    )
    rpc.terminate(correlation_pb2.MergeClustersResponse(), (), grpc.StatusCode.OK, "")
    future.result()
    future = _run(pool, lambda: client.start_execution("rb-1", variables={"bus": "B"}, request_id="r-1"))
    _, request, rpc = channel.inner.take_unary_unary(RUNBOOK.methods_by_name["StartExecution"])
    assert request.request_id == "r-1" and request.variables["bus"] == "B"
    rpc.terminate(runbook_pb2.StartExecutionResponse(), (), grpc.StatusCode.OK, "")
    future.result()


def test_execution_status_filters_take_names_as_resources_do(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    for given, expected in (
        ("running", runbook_pb2.RUNBOOK_STATUS_RUNNING),
        ("RUNBOOK_STATUS_CANCELLED", runbook_pb2.RUNBOOK_STATUS_CANCELLED),
        (runbook_pb2.RUNBOOK_STATUS_FAILED, runbook_pb2.RUNBOOK_STATUS_FAILED),
    ):
        future = _run(pool, lambda given=given: client.list_executions(status=given))
        _, request, rpc = channel.inner.take_unary_unary(RUNBOOK.methods_by_name["ListExecutions"])
        assert request.status == expected
        rpc.terminate(runbook_pb2.ListExecutionsResponse(), (), grpc.StatusCode.OK, "")
        future.result()
    with pytest.raises(ValueError, match="unknown status 'runing'"):
        client.list_executions(status="runing")


def test_cluster_history_takes_status_names_and_times(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: client.list_clusters(status="closed", start="2026-12-01T00:00:00Z", satellite_id="S"))
    _, request, rpc = channel.inner.take_unary_unary(CORRELATION.methods_by_name["ListClusters"])
    assert request.status == correlation_pb2.CLUSTER_STATUS_CLOSED and request.satellite_id == "S"
    assert request.start_time.ToJsonString() == "2026-12-01T00:00:00Z" and not request.HasField("end_time")
    rpc.terminate(correlation_pb2.ListClustersResponse(), (), grpc.StatusCode.OK, "")
    future.result()
    with pytest.raises(ValueError, match="unknown status 'opne'"):
        client.list_clusters(status="opne")


def test_bulk_ingest_streams_every_alert(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    alerts = [
        correlation_pb2.Alert(alert_id=f"a-{i}", satellite_id="SAT-1", subsystem="power", severity=3) for i in range(3)
    ]
    future = _run(pool, lambda: client.ingest_alerts(alerts))
    _, rpc = channel.inner.take_stream_unary(CORRELATION.methods_by_name["IngestAlerts"])
    received = [rpc.take_request().alert.alert_id for _ in alerts]
    rpc.requests_closed()
    assert received == ["a-0", "a-1", "a-2"]
    rpc.terminate(correlation_pb2.IngestAlertsResponse(accepted=3), (), grpc.StatusCode.OK, "")
    assert future.result().accepted == 3
    # An upload lasts as long as its input: not the default deadline (7.5 s here), only one given.
    future = _run(pool, lambda: client.ingest_snapshots([], timeout=60.0))
    _, rpc = channel.inner.take_stream_unary(CAPACITY.methods_by_name["IngestSnapshots"])
    rpc.requests_closed()
    rpc.terminate(capacity_pb2.IngestSnapshotsResponse(), (), grpc.StatusCode.OK, "")
    future.result()
    assert channel.timeouts == [None, 60.0]


def test_watch_streams_responses_and_maps_the_final_error(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    consumed: queue.Queue[str] = queue.Queue()

    def consume() -> tuple[list[str], BaseException | None]:
        seen: list[str] = []
        try:
            for event in client.watch_execution("ex-1"):
                seen.append(event.transition)
                consumed.put(event.transition)
        except AetherOpsError as exc:
            return seen, exc
        return seen, None

    future = _run(pool, consume)
    _, request, rpc = channel.inner.take_unary_stream(RUNBOOK.methods_by_name["WatchExecution"])
    assert request.execution_id == "ex-1"
    for transition in ("STEP_STARTED", "STEP_COMPLETED"):
        rpc.send_response(runbook_pb2.WatchExecutionResponse(transition=transition))
        # grpc_testing drops undelivered responses on an error status: wait until the client has each one.
        assert consumed.get(timeout=5) == transition
    rpc.terminate((), grpc.StatusCode.NOT_FOUND, "execution vanished")
    seen, error = future.result()
    assert seen == ["STEP_STARTED", "STEP_COMPLETED"]
    assert isinstance(error, NotFound)
    # Watch streams are long-lived: no default deadline.
    assert channel.timeouts == [None]


def test_a_cluster_watch_from_a_start_time_sends_it(
    client: SyncAetherOpsClient, channel: _RecordingChannel, pool: ThreadPoolExecutor
) -> None:
    future = _run(pool, lambda: list(client.watch_clusters(satellite_ids=["S"], since="2026-12-01T00:00:00Z")))
    _, request, rpc = channel.inner.take_unary_stream(CORRELATION.methods_by_name["WatchClusters"])
    assert request.start_time.ToJsonString() == "2026-12-01T00:00:00Z" and list(request.satellite_ids) == ["S"]
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert future.result() == []


def test_retry_policy_is_a_service_config_for_idempotent_methods_only() -> None:
    options = dict(ClientConfig(retry=RetryPolicy(max_attempts=3)).channel_options())
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("aetherops.correlation.v1.CorrelationService", "IngestAlert") in names
    assert ("aetherops.runbook.v1.RunbookService", "StartExecution") in names
    assert ("aetherops.capacity.v1.CapacityService", "GetFleetRiskSummary") in names
    assert ("aetherops.correlation.v1.CorrelationService", "IngestAlerts") not in names
    assert ("aetherops.capacity.v1.CapacityService", "IngestSnapshots") not in names
    assert method_config["retryPolicy"]["maxAttempts"] == 3
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert len(names) == sum(len(m) for m in RETRYABLE_METHODS.values())
    # Every named method exists in the contracts.
    for service, method in names:
        descriptor = {s.full_name: s for s in (CORRELATION, RUNBOOK, CAPACITY)}[service]
        assert method in descriptor.methods_by_name
    assert "grpc.service_config" not in dict(ClientConfig(retry=None).channel_options())


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETHEROPS_ADDRESS", "sat-ops:6000")
    monkeypatch.setenv("AETHEROPS_TOKEN", "tok")
    config = ClientConfig.from_env()
    assert (config.address, config.token, config.secure) == ("sat-ops:6000", "tok", False)
    assert ClientConfig.from_env(address="other:1").address == "other:1"
    assert ClientConfig(root_certificates=b"pem").secure
    assert ClientConfig(certificate_chain=b"cert", private_key=b"key").secure  # mTLS, system roots
    with pytest.raises(ValueError, match="go together"):
        ClientConfig(certificate_chain=b"cert")
