"""ListAlerts, ListClusters and ListExecutions through a real server: filters, pagination (tokens bound to their
filters), order, and bad input as INVALID_ARGUMENT with the offending fields. Both are viewer reads."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from runbook_flow_test import step, struct, ts
from runbook_service_test import violations

from aetherops.db import Database
from aetherops.db import correlation as repo
from gen.aetherops.correlation.v1 import correlation_pb2 as cpb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.runbook.v1 import runbook_pb2 as pb
from gen.aetherops.runbook.v1 import runbook_pb2_grpc


async def _pages(call: Callable[[str], Awaitable[Any]], field: str) -> tuple[list[Any], int]:
    """Every item of a paged listing and the number of pages it took."""
    items: list[Any] = []
    token, pages = "", 0
    while True:
        page = await call(token)
        items.extend(getattr(page, field))
        pages += 1
        token = page.next_page_token
        if not token:
            return items, pages


async def _bad(call: Awaitable[Any]) -> set[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return set(violations(caught.value))


async def test_list_alerts_by_tracking_id_cluster_and_satellite(server: Any, channel_for: Any) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
    first = [
        cpb.Alert(
            alert_id=f"la-{uuid.uuid4().hex[:8]}-{i}",
            satellite_id=sat,
            subsystem=sub,
            severity=4,
            timestamp=ts(t0 + timedelta(seconds=5 * i)),
        )
        for i, (sat, sub) in enumerate(
            [("SAT-L1", "power"), ("SAT-L1", "thermal"), ("SAT-L1", "power"), ("SAT-L1", "comms"), ("SAT-L2", "power")]
        )
    ]

    async def requests() -> AsyncIterator[cpb.IngestAlertsRequest]:
        for alert in first:
            yield cpb.IngestAlertsRequest(alert=alert)

    bulk, other = "trk-bulk-" + uuid.uuid4().hex, "trk-other-" + uuid.uuid4().hex
    reply = await operator.IngestAlerts(requests(), metadata=(("x-tracking-id", bulk),))
    assert (reply.accepted, reply.duplicates) == (4, 1), "the second power alert duplicates the first"
    later = cpb.Alert(alert_id=f"la-{uuid.uuid4().hex}", satellite_id="SAT-L1", subsystem="adcs", severity=3)
    later.timestamp.CopyFrom(ts(t0 + timedelta(seconds=30)))
    await operator.IngestAlert(cpb.IngestAlertRequest(alert=later), metadata=(("x-tracking-id", other),))

    # Every alert of the bulk stream, in alert-time order, two per page; the duplicate is marked.
    listed, pages = await _pages(
        lambda token: viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id=bulk, page_size=2, page_token=token)),
        "alerts",
    )
    assert pages == 3
    assert [a.alert.alert_id for a in listed] == [a.alert_id for a in first]
    assert {a.alert.tracking_id for a in listed} == {bulk}
    assert listed[2].duplicate_of_alert_id == first[0].alert_id and listed[2].cluster_id == listed[0].cluster_id
    assert all(a.ingest_time.seconds > 0 for a in listed)

    # By cluster: the bulk alerts of that cluster and whatever else joined it, duplicates included.
    cluster_id = listed[0].cluster_id
    (other_alert,) = (await viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id=other))).alerts
    expected = [a for a in [*listed, other_alert] if a.cluster_id == cluster_id]
    expected.sort(key=lambda a: (a.alert.timestamp.seconds, a.alert.alert_id))
    by_cluster = (await viewer.ListAlerts(cpb.ListAlertsRequest(cluster_id=cluster_id))).alerts
    assert [a.alert.alert_id for a in by_cluster] == [a.alert.alert_id for a in expected]
    # Filters combine.
    narrowed = await viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id=bulk, satellite_id="SAT-L2"))
    assert [a.alert.alert_id for a in narrowed.alerts] == [first[4].alert_id]
    assert not (await viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id="trk-none"))).alerts

    # Bad input.
    assert await _bad(viewer.ListAlerts(cpb.ListAlertsRequest(satellite_id="SAT-L1"))) == {"tracking_id"}
    assert await _bad(viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id="x" * 300, page_size=-1))) == {
        "tracking_id",
        "page_size",
    }
    assert await _bad(viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id=bulk, page_token="garbage"))) == {
        "page_token"
    }
    page = await viewer.ListAlerts(cpb.ListAlertsRequest(tracking_id=bulk, page_size=1))
    reused = cpb.ListAlertsRequest(tracking_id=other, page_token=page.next_page_token)
    assert await _bad(viewer.ListAlerts(reused)) == {"page_token"}
    # A filter no stored id can match is named, not answered with an empty page (a NUL would
    # otherwise fail the query and be blamed on the whole request).
    assert await _bad(viewer.ListAlerts(cpb.ListAlertsRequest(cluster_id="c\x00", satellite_id=" SAT-L1"))) == {
        "cluster_id",
        "satellite_id",
    }
    # An unknown cluster or silence is NOT_FOUND; a known one with no alerts (here: none on that
    # satellite) is an empty page.
    for unknown in (cpb.ListAlertsRequest(cluster_id="c-nope"), cpb.ListAlertsRequest(silence_id="s-nope")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await viewer.ListAlerts(unknown)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, unknown
    assert not (await viewer.ListAlerts(cpb.ListAlertsRequest(cluster_id=cluster_id, satellite_id="SAT-L9"))).alerts


async def test_listing_filters_no_id_can_match_are_refused_by_field(server: Any, channel_for: Any) -> None:
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    for bad in ("SAT\x00", "x" * 300, "SAT-1 "):
        assert await _bad(viewer.ListActiveClusters(cpb.ListActiveClustersRequest(satellite_id=bad))) == {
            "satellite_id"
        }, bad
        assert await _bad(viewer.ListClusters(cpb.ListClustersRequest(satellite_id=bad))) == {"satellite_id"}, bad
        assert await _bad(viewer.ListSilences(cpb.ListSilencesRequest(satellite_id=bad))) == {"satellite_id"}, bad


async def test_list_clusters_is_the_incident_history_open_quiet_and_closed(server: Any, channel_for: Any) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    now = datetime.now(UTC).replace(microsecond=0)

    async def incident(sat: str, sub: str, when: datetime, severity: int = 3) -> str:
        alert = cpb.Alert(alert_id=uuid.uuid4().hex, satellite_id=sat, subsystem=sub, severity=severity)
        alert.timestamp.CopyFrom(ts(when))
        return (await operator.IngestAlert(cpb.IngestAlertRequest(alert=alert))).cluster_id

    # A quiet incident two hours old by its alert (downlinked late), a live one, and one an operator
    # has closed. Hours apart: three incidents.
    quiet = await incident("SAT-H1", "power", now - timedelta(hours=2), severity=5)
    live = await incident("SAT-H2", "thermal", now - timedelta(seconds=30))
    closed = await incident("SAT-H3", "comms", now - timedelta(hours=5))
    await operator.CloseCluster(cpb.CloseClusterRequest(cluster_id=closed, reason="handled"))

    async def ids(**filters: Any) -> list[str]:
        found, _ = await _pages(
            lambda token: viewer.ListClusters(cpb.ListClustersRequest(page_size=1, page_token=token, **filters)),
            "clusters",
        )
        return [c.cluster_id for c in found]

    # ListActiveClusters leaves the quiet one out; ListClusters has every open one, and the history.
    active = (await viewer.ListActiveClusters(cpb.ListActiveClustersRequest())).clusters
    assert [c.cluster_id for c in active] == [live]
    # Most recently opened first: ids start with the time they were made (two made within one
    # millisecond may come in either order, so the test orders them by id as the listing must).
    newest_first = sorted([quiet, live, closed], reverse=True)
    assert await ids() == newest_first
    assert await ids(status=cpb.CLUSTER_STATUS_OPEN) == [c for c in newest_first if c != closed]
    assert await ids(status=cpb.CLUSTER_STATUS_CLOSED) == [closed]
    assert await ids(satellite_id="SAT-H1") == [quiet]
    assert await ids(min_severity=5) == [quiet]
    # By alert time: what had alerts in [start, end).
    assert await ids(start_time=ts(now - timedelta(hours=3))) == [c for c in newest_first if c != closed]
    assert await ids(start_time=ts(now - timedelta(hours=3)), end_time=ts(now - timedelta(hours=1))) == [quiet]
    assert await ids(end_time=ts(now - timedelta(hours=2))) == [closed]
    shown = (await viewer.ListClusters(cpb.ListClustersRequest(status=cpb.CLUSTER_STATUS_CLOSED))).clusters[0]
    assert (shown.closed_by, shown.close_reason, len(shown.alerts)) == ("operator", "handled", 1)

    # Paging is by opening: an incident that grows or closes while you page keeps its place.
    first = await viewer.ListClusters(cpb.ListClustersRequest(page_size=1))
    assert [c.cluster_id for c in first.clusters] == newest_first[:1]
    await incident("SAT-H2", "thermal", now - timedelta(seconds=10), severity=4)
    await operator.CloseCluster(cpb.CloseClusterRequest(cluster_id=live, reason="done"))
    rest, _ = await _pages(
        lambda token: viewer.ListClusters(
            cpb.ListClustersRequest(page_size=1, page_token=token or first.next_page_token)
        ),
        "clusters",
    )
    assert [c.cluster_id for c in rest] == newest_first[1:]

    # Bad input.
    assert await _bad(viewer.ListClusters(cpb.ListClustersRequest(status=cast_status(9)))) == {"status"}
    assert await _bad(viewer.ListClusters(cpb.ListClustersRequest(min_severity=6))) == {"min_severity"}
    backwards = cpb.ListClustersRequest(start_time=ts(now), end_time=ts(now - timedelta(hours=1)), page_size=-1)
    assert await _bad(viewer.ListClusters(backwards)) == {"end_time", "page_size"}
    assert await _bad(viewer.ListClusters(cpb.ListClustersRequest(satellite_id=" SAT-H1"))) == {"satellite_id"}
    reused = cpb.ListClustersRequest(status=cpb.CLUSTER_STATUS_OPEN, page_token=first.next_page_token)
    assert await _bad(viewer.ListClusters(reused)) == {"page_token"}


def cast_status(number: int) -> Any:
    """A ClusterStatus number this server does not know (a newer client's)."""
    return cpb.ClusterStatus.ValueType(number)


async def test_cluster_listings_take_only_what_is_unattended_or_only_what_is_acknowledged(
    server: Any, channel_for: Any
) -> None:
    operator = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    opened = []
    for sat in ("SAT-A1", "SAT-A2", "SAT-A3"):
        alert = cpb.Alert(
            alert_id=uuid.uuid4().hex, satellite_id=sat, subsystem=f"unit-{sat}", severity=3, timestamp=ts(t0)
        )
        opened.append((await operator.IngestAlert(cpb.IngestAlertRequest(alert=alert))).cluster_id)
    await operator.AcknowledgeCluster(cpb.AcknowledgeClusterRequest(cluster_id=opened[1], note="on it"))
    unattended, acknowledged = cpb.ACKNOWLEDGEMENT_FILTER_UNACKNOWLEDGED, cpb.ACKNOWLEDGEMENT_FILTER_ACKNOWLEDGED

    async def active(which: int, token: str = "") -> Any:
        return await viewer.ListActiveClusters(
            cpb.ListActiveClustersRequest(acknowledgement=which, page_size=1, page_token=token)
        )

    async def history(which: int, token: str = "") -> Any:
        return await viewer.ListClusters(cpb.ListClustersRequest(acknowledgement=which, page_size=1, page_token=token))

    for listing in (active, history):
        left, _ = await _pages(lambda token, listing=listing: listing(unattended, token), "clusters")
        assert {c.cluster_id for c in left} == {opened[0], opened[2]}, listing
        assert not any(c.acknowledged_by for c in left)
        taken, _ = await _pages(lambda token, listing=listing: listing(acknowledged, token), "clusters")
        assert [(c.cluster_id, c.acknowledged_by) for c in taken] == [(opened[1], "operator")]
        everything, _ = await _pages(lambda token, listing=listing: listing(0, token), "clusters")
        assert {c.cluster_id for c in everything} == set(opened)
        # A page token holds its filter: the next page of the unattended is not a page of the acknowledged.
        first = await listing(unattended)
        assert "page_token" in await _bad(listing(acknowledged, first.next_page_token))
        assert "acknowledgement" in await _bad(listing(7))


async def test_list_executions_filters_and_pages_newest_first(server: Any, channel_for: Any) -> None:
    admin = runbook_pb2_grpc.RunbookServiceStub(channel_for("admin", server.port))
    operator = runbook_pb2_grpc.RunbookServiceStub(channel_for("operator", server.port))
    viewer = runbook_pb2_grpc.RunbookServiceStub(channel_for("viewer", server.port))
    for runbook_id, approval in (("rb-a", False), ("rb-b", True)):
        await admin.RegisterRunbook(
            pb.RegisterRunbookRequest(
                runbook=pb.Runbook(
                    runbook_id=runbook_id,
                    name=runbook_id,
                    steps=[step("s", "log", {"message": "x"}, approval=approval)],
                )
            )
        )
    suffix = uuid.uuid4().hex
    x, y, z = f"trk-x-{suffix}", f"trk-y-{suffix}", f"trk-z-{suffix}"

    async def start(runbook_id: str, tracking: str, incident_id: str = "") -> str:
        reply = await operator.StartExecution(
            pb.StartExecutionRequest(runbook_id=runbook_id, incident_id=incident_id, request_id=uuid.uuid4().hex),
            metadata=(("x-tracking-id", tracking),),
        )
        return reply.execution.execution_id

    e1 = await start("rb-a", x)
    # An incident to start them for (a StartExecution naming an incident nobody stored is NOT_FOUND).
    alert = cpb.Alert(alert_id=uuid.uuid4().hex, satellite_id="SAT-E", subsystem="power", severity=3)
    alert.timestamp.CopyFrom(ts(datetime.now(UTC)))
    correlation = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
    incident = (await correlation.IngestAlert(cpb.IngestAlertRequest(alert=alert))).cluster_id
    e2 = await start("rb-a", y, incident)
    e3 = await start("rb-b", x, incident)
    done = await operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=e1), metadata=(("x-tracking-id", z),))
    assert done.execution.status == pb.RUNBOOK_STATUS_COMPLETED

    listed, pages = await _pages(
        lambda token: viewer.ListExecutions(pb.ListExecutionsRequest(page_size=2, page_token=token)), "executions"
    )
    assert pages == 2 and [e.execution_id for e in listed] == [e3, e2, e1], "newest start first"
    entry = {e.execution_id: e for e in listed}
    assert (entry[e2].runbook_id, entry[e2].incident_id, entry[e2].tracking_id) == ("rb-a", incident, y)
    assert entry[e2].triggered_by == "operator" and entry[e2].start_time.seconds > 0
    assert entry[e1].status == pb.RUNBOOK_STATUS_COMPLETED and entry[e1].finish_time.seconds > 0
    assert not entry[e1].steps and not entry[e1].audit_log, "index entries: GetExecutionStatus has the rest"

    async def ids(**filters: Any) -> list[str]:
        reply = await viewer.ListExecutions(pb.ListExecutionsRequest(**filters))
        return [e.execution_id for e in reply.executions]

    assert await ids(tracking_id=x) == [e3, e1]
    assert await ids(tracking_id=z) == [e1], "ExecuteNextStep under z changed e1"
    assert await ids(incident_id=incident) == [e3, e2]
    assert await ids(runbook_id="rb-a") == [e2, e1]
    assert await ids(status=pb.RUNBOOK_STATUS_COMPLETED) == [e1]
    assert await ids(status=pb.RUNBOOK_STATUS_RUNNING, incident_id=incident, tracking_id=x) == [e3]
    assert await ids(runbook_id="rb-none") == []

    assert await _bad(viewer.ListExecutions(pb.ListExecutionsRequest(status=pb.RUNBOOK_STATUS_DRAFT))) == {"status"}
    assert await _bad(viewer.ListExecutions(pb.ListExecutionsRequest(status=99))) == {"status"}  # type: ignore[arg-type]
    assert await _bad(viewer.ListExecutions(pb.ListExecutionsRequest(page_size=-1, runbook_id="r" * 300))) == {
        "page_size",
        "runbook_id",
    }
    nul = pb.ListExecutionsRequest(incident_id="inc\x00", tracking_id="t\x00")
    assert await _bad(viewer.ListExecutions(nul)) == {"incident_id", "tracking_id"}
    assert await _bad(viewer.ListExecutions(pb.ListExecutionsRequest(page_token="%%%"))) == {"page_token"}
    page = await viewer.ListExecutions(pb.ListExecutionsRequest(page_size=1))
    other = pb.ListExecutionsRequest(runbook_id="rb-a", page_token=page.next_page_token)
    assert await _bad(viewer.ListExecutions(other)) == {"page_token"}
    # The server's own token with the id nulled: refused, not read as the id "None".
    token = json.loads(base64.urlsafe_b64decode(page.next_page_token))
    token["p"]["e"] = None
    forged = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
    assert await _bad(viewer.ListExecutions(pb.ListExecutionsRequest(page_size=1, page_token=forged))) == {"page_token"}
    bad_start = pb.StartExecutionRequest(runbook_id="rb-a", incident_id="not an id", variables=struct({}))
    assert await _bad(operator.StartExecution(bad_start)) == {"incident_id"}
    unknown = pb.StartExecutionRequest(runbook_id="rb-a", incident_id="c-unknown", variables=struct({}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.StartExecution(unknown)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cluster_pages_are_cut_by_the_size_of_their_satellite_lists(
    server: Any, channel_for: Any, db: Database
) -> None:
    # Six storm incidents over 3,000 satellites with long ids: about 750 KB of names each. One page of
    # them outgrew the 4 MiB message limit (RESOURCE_EXHAUSTED on every call).
    now = datetime.now(UTC)
    satellites = [f"SAT-{n:04d}-" + "x" * 240 for n in range(3000)]
    records = [
        repo.ClusterRecord(f"c-storm-{k}", "OPEN", None, 0.5, satellites, ["power"], 4, now, now, now, 3000, 0)
        for k in range(6)
    ]
    async with db.connection() as conn:
        await repo.write_batch(conn, records, {r.cluster_id for r in records}, set(), [], [])
    viewer = correlation_pb2_grpc.CorrelationServiceStub(channel_for("viewer", server.port))
    for call, make in (
        (viewer.ListClusters, lambda t: cpb.ListClustersRequest(page_size=50, page_token=t)),
        (viewer.ListActiveClusters, lambda t: cpb.ListActiveClustersRequest(page_size=50, page_token=t)),
    ):
        listed, pages = await _pages(lambda token, call=call, make=make: call(make(token)), "clusters")
        assert sorted(c.cluster_id for c in listed) == [r.cluster_id for r in records] and pages >= 2
        assert all(len(c.satellite_ids) == 3000 for c in listed)
