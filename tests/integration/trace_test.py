"""One tracking id through the whole system, and back out of `aetherops trace`.

x-tracking-id on IngestAlert -> the stored alert row -> the incident event's NATS header -> the
execution the incident started (its row, and the audit rows the driver wrote) -> the audit rows of
the ApproveStep request (its own tracking id) -> ListAlerts / ListExecutions -> `aetherops trace`
run as a real process against the server.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cli_test import Result, run_cli
from runbook_flow_test import Stubs, step, struct, ts, wait_status

from aetherops.bus import HEADER_TRACKING_ID, Bus
from aetherops.db import Database
from aetherops.services.runbook import incident_execution_id
from gen.aetherops.correlation.v1 import correlation_pb2 as cpb
from gen.aetherops.events.v1 import events_pb2
from gen.aetherops.runbook.v1 import runbook_pb2 as pb


@pytest.fixture
def cli(server: Any, tokens: dict[str, str]) -> Any:
    """`aetherops ...` against the test's server, as a viewer: tracing needs no more than reads."""

    async def run(*args: str) -> Result:
        return await run_cli(f"127.0.0.1:{server.port}", tokens["viewer"], *args)

    return run


def _tracking(call_metadata: Any) -> str:
    return dict(call_metadata or ())["x-tracking-id"]


async def _incident_opened(bus: Bus, cluster_id: str) -> tuple[events_pb2.Event, dict[str, str]]:
    """The incidents.opened event of the cluster, with its NATS headers."""
    sub = await bus.js.subscribe(bus.subjects.incidents("opened"), ordered_consumer=True)
    try:
        async with asyncio.timeout(10):
            while True:
                msg = await sub.next_msg(timeout=10)
                event = events_pb2.Event()
                event.ParseFromString(msg.data)
                if event.aggregate_id == cluster_id:
                    return event, dict(msg.headers or {})
    finally:
        await sub.unsubscribe()


async def test_one_tracking_id_from_ingest_to_trace(
    server: Any, channel_for: Any, bus: Bus, db: Database, cli: Any
) -> None:
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(
        runbook_id="trace-power",
        name="Power recovery, traced",
        trigger_conditions=struct({"subsystems": "power"}),
        auto_start=True,
        steps=[
            step("note", "log", {"message": "incident ${cluster_id}"}),
            step("switch", "log", {"message": "switching bus"}, approval=True),
            step("done", "set_variable", {"name": "recovered", "value": True}),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))

    ingest_tracking = "trk-" + uuid.uuid4().hex
    alert = cpb.Alert(
        alert_id=uuid.uuid4().hex,
        satellite_id="SAT-TRC",
        subsystem="power",
        severity=5,
        timestamp=ts(datetime.now(UTC) - timedelta(seconds=5)),
        message="bus undervoltage",
    )
    call = stubs.correlation.IngestAlert(
        cpb.IngestAlertRequest(alert=alert), metadata=(("x-tracking-id", ingest_tracking),)
    )
    reply = await call
    assert _tracking(await call.trailing_metadata()) == ingest_tracking
    cluster_id = reply.cluster_id
    assert reply.cluster_opened

    # The stored alert row and the incident event on NATS (header and envelope) carry it.
    assert await db.fetchval("SELECT tracking_id FROM alerts WHERE alert_id = $1", alert.alert_id) == ingest_tracking
    event, headers = await _incident_opened(bus, cluster_id)
    assert headers[HEADER_TRACKING_ID] == ingest_tracking and event.tracking_id == ingest_tracking

    # The incident started the execution under the alert's tracking id: the row, and every audit row
    # the driver wrote until the approval gate.
    execution_id = incident_execution_id(cluster_id, "trace-power")
    waiting = await wait_status(
        stubs.operator, execution_id, lambda e: e.steps[1].status == pb.STEP_STATUS_AWAITING_APPROVAL
    )
    assert (waiting.tracking_id, waiting.incident_id) == (ingest_tracking, cluster_id)
    assert {a.tracking_id for a in waiting.audit_log} == {ingest_tracking}
    row = await db.fetchrow("SELECT tracking_id, incident_id FROM executions WHERE execution_id = $1", execution_id)
    assert row is not None and (row["tracking_id"], row["incident_id"]) == (ingest_tracking, cluster_id)

    # The approval is a request of its own: what it caused carries its tracking id.
    approve_tracking = "trk-" + uuid.uuid4().hex
    await stubs.approver.ApproveStep(
        pb.ApproveStepRequest(execution_id=execution_id, step_id="switch"),
        metadata=(("x-tracking-id", approve_tracking),),
    )
    done = await wait_status(stubs.operator, execution_id, lambda e: e.status == pb.RUNBOOK_STATUS_COMPLETED)
    audit = {(a.transition, a.step_id): a.tracking_id for a in done.audit_log}
    assert audit[("EXECUTION_STARTED", "")] == ingest_tracking
    assert audit[("STEP_COMPLETED", "note")] == ingest_tracking
    assert audit[("APPROVAL_GRANTED", "switch")] == approve_tracking
    # The driver ApproveStep resumed carries on under the approval's tracking id.
    assert audit[("STEP_COMPLETED", "done")] == approve_tracking
    assert done.tracking_id == ingest_tracking, "the execution keeps the tracking id it started under"
    stored = {
        r["seq"]: r["tracking_id"]
        for r in await db.fetch("SELECT seq, tracking_id FROM execution_events WHERE execution_id = $1", execution_id)
    }
    assert stored == {a.seq: a.tracking_id for a in done.audit_log}

    # The query RPCs answer by either tracking id.
    listed = await stubs.correlation.ListAlerts(cpb.ListAlertsRequest(tracking_id=ingest_tracking))
    assert [(a.alert.alert_id, a.cluster_id, a.alert.tracking_id) for a in listed.alerts] == [
        (alert.alert_id, cluster_id, ingest_tracking)
    ]
    for tracking in (ingest_tracking, approve_tracking):
        found = await stubs.operator.ListExecutions(pb.ListExecutionsRequest(tracking_id=tracking))
        assert [e.execution_id for e in found.executions] == [execution_id], tracking

    # A manual start for the same incident, under a third tracking id, is part of the incident too.
    manual_tracking = "trk-" + uuid.uuid4().hex
    manual = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(
            runbook_id="trace-power",
            incident_id=cluster_id,
            variables=struct({"cluster_id": cluster_id}),
            request_id=uuid.uuid4().hex,
        ),
        metadata=(("x-tracking-id", manual_tracking),),
    )
    assert (manual.execution.tracking_id, manual.execution.incident_id) == (manual_tracking, cluster_id)
    by_incident = await stubs.operator.ListExecutions(pb.ListExecutionsRequest(incident_id=cluster_id))
    assert {e.execution_id for e in by_incident.executions} == {execution_id, manual.execution.execution_id}

    # Back out of the CLI: the tree, then the JSON a script reads.
    tree: Result = await cli("trace", ingest_tracking)
    assert tree.code == 0, tree.err
    for expected in (ingest_tracking, alert.alert_id, cluster_id, execution_id, manual.execution.execution_id):
        assert expected in tree.out
    assert "step switch" in tree.out and "approved by approver" in tree.out
    assert f"also under tracking id {approve_tracking}" in tree.out
    traced = (await cli("trace", ingest_tracking, "--json")).json()
    (incident,) = traced["incidents"]
    assert incident["incident_id"] == cluster_id and incident["cluster"]["tracking_id"] == ingest_tracking
    assert [a["alert"]["alert_id"] for a in incident["alerts"]] == [alert.alert_id]
    executions = {e["execution_id"]: e for e in incident["executions"]}
    assert set(executions) == {execution_id, manual.execution.execution_id}
    assert [s["status"] for s in executions[execution_id]["steps"]] == ["STEP_STATUS_COMPLETED"] * 3
    assert traced["executions"] == []

    # The approval's tracking id leads to the execution it acted on, under its incident.
    approval = (await cli("trace", approve_tracking, "--json")).json()
    assert [i["incident_id"] for i in approval["incidents"]] == [cluster_id]
    assert [e["execution_id"] for e in approval["incidents"][0]["executions"]] == [execution_id]
    assert approval["incidents"][0]["alerts"] == []

    nothing = await cli("trace", "trk-never-used")
    assert nothing.code == 1 and "nothing found for tracking id trk-never-used" in nothing.err
    assert (await cli("trace", "trk-never-used", "--json")).json()["error"]["code"] == "NOT_FOUND"
    assert (await cli("trace", " ")).code == 2


async def test_trace_of_a_start_without_incident(server: Any, channel_for: Any, cli: Any) -> None:
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(
        pb.RegisterRunbookRequest(
            runbook=pb.Runbook(runbook_id="plain", name="Plain", steps=[step("only", "log", {"message": "hi"})])
        )
    )
    tracking = "trk-" + uuid.uuid4().hex
    started = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="plain", request_id=uuid.uuid4().hex),
        metadata=(("x-tracking-id", tracking),),
    )
    execution_id = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    traced = await cli("trace", tracking)
    assert traced.code == 0, traced.err
    assert f"execution {execution_id}" in traced.out and "step only" in traced.out and "COMPLETED" in traced.out
    as_json = (await cli("trace", tracking, "--json")).json()
    assert as_json["incidents"] == [] and [e["execution_id"] for e in as_json["executions"]] == [execution_id]
