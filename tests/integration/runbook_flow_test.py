"""Runbook flows through real servers, PostgreSQL and NATS: an incident starts a runbook that waits for
a second person and then calls an agent; a failed step rolls back in reverse order; an execution
waiting for approval survives a restart."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _poll import eventually
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from nats.aio.msg import Msg

from aetherops.bus import Bus
from aetherops.db import Database
from aetherops.db import runbook as runbook_repo
from aetherops.services.runbook import incident_execution_id
from gen.aetherops.correlation.v1 import correlation_pb2 as cpb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.events.v1 import events_pb2
from gen.aetherops.runbook.v1 import runbook_pb2 as pb
from gen.aetherops.runbook.v1 import runbook_pb2_grpc

Reply = Callable[[events_pb2.AgentActionRequest], events_pb2.AgentActionReply]


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(dict(value))
    return s


def step(
    step_id: str,
    action: str,
    params: Mapping[str, Any] | None = None,
    *,
    approval: bool = False,
    timeout_s: float = 5.0,
    rollback: str = "",
    rollback_params: Mapping[str, Any] | None = None,
) -> pb.RunbookStep:
    return pb.RunbookStep(
        step_id=step_id,
        action=action,
        parameters=struct(params or {}),
        requires_approval=approval,
        timeout=duration_pb2.Duration(seconds=int(timeout_s), nanos=int((timeout_s % 1) * 1e9)),
        rollback_action=rollback,
        rollback_parameters=struct(rollback_params or {}),
    )


def ts(when: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


class Stubs:
    """RunbookService stubs authenticated as the test principals: admin registers runbooks, operator
    starts and runs executions, approver approves (the server takes identities from the credential)."""

    def __init__(self, channel_for: Callable[[str, int], grpc.aio.Channel], port: int) -> None:
        self.admin = runbook_pb2_grpc.RunbookServiceStub(channel_for("admin", port))
        self.operator = runbook_pb2_grpc.RunbookServiceStub(channel_for("operator", port))
        self.approver = runbook_pb2_grpc.RunbookServiceStub(channel_for("approver", port))
        self.correlation = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", port))


@asynccontextmanager
async def agent(bus: Bus, name: str, reply: Reply) -> AsyncIterator[list[events_pb2.AgentActionRequest]]:
    """A ground-station agent answering aetherops.actions.<name>; yields the requests it received."""
    seen: list[events_pb2.AgentActionRequest] = []

    async def on_request(msg: Msg) -> None:
        request = json_format.Parse(msg.data, events_pb2.AgentActionRequest())  # the wire is protobuf JSON
        seen.append(request)
        await msg.respond(json_format.MessageToJson(reply(request)).encode())

    sub = await bus.nc.subscribe(bus.subjects.action(name), cb=on_request)
    await bus.nc.flush()
    try:
        yield seen
    finally:
        await sub.unsubscribe()


async def announced_agent(bus: Bus, stubs: Stubs, name: str, on_request: Callable[[Msg], Awaitable[None]]) -> Any:
    """An agent answering `agent:<name>` with `on_request`, announced and listed by the server; its
    subscription (unsubscribe when done)."""
    sub = await bus.nc.subscribe(bus.subjects.action(name), cb=on_request)
    await bus.nc.publish(bus.subjects.action("_announce"), json.dumps({"name": name, "description": name}).encode())

    async def announced() -> bool:
        actions = (await stubs.operator.ListActions(pb.ListActionsRequest(page_size=100))).actions
        return any(a.name == f"agent:{name}" for a in actions)

    await eventually(announced, timeout_s=5, what=f"agent:{name} announced")
    return sub


async def waiting_at_its_gate(stubs: Stubs, runbook: pb.Runbook) -> str:
    """Registers a runbook of one step and then a gated one, starts it and runs it up to the gate:
    the execution's id."""
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id=runbook.runbook_id))
    execution_id = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    waiting = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert waiting.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    return execution_id


async def wait_status(
    stub: runbook_pb2_grpc.RunbookServiceStub,
    execution_id: str,
    done: Callable[[pb.Execution], bool],
    timeout_s: float = 15.0,
) -> pb.Execution:
    """Poll (bounded) for a state that another system (the NATS consumer, the driver) brings about."""

    async def reached() -> pb.Execution | None:
        try:
            reply = await stub.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=execution_id))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None  # not started yet
        return reply.execution if done(reply.execution) else None

    result: pb.Execution = await eventually(reached, timeout_s=timeout_s, what=f"execution {execution_id} state")
    return result


async def ingest_alert(
    stubs: Stubs, satellite_id: str, subsystem: str, severity: int, at: datetime
) -> cpb.IngestAlertResponse:
    """Ingests an alert through CorrelationService: it opens an incident or joins one."""
    alert = cpb.Alert(
        alert_id=uuid.uuid4().hex,
        satellite_id=satellite_id,
        subsystem=subsystem,
        severity=severity,
        timestamp=ts(at),
        message=f"{subsystem} anomaly",
    )
    reply: cpb.IngestAlertResponse = await stubs.correlation.IngestAlert(cpb.IngestAlertRequest(alert=alert))
    return reply


def steps_by_id(execution: pb.Execution) -> dict[str, pb.StepState]:
    return {s.step_id: s for s in execution.steps}


async def test_cascading_alert_starts_runbook_that_waits_for_approval_then_calls_an_agent(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="power-bus-recovery",
        name="Power bus recovery",
        trigger_conditions=struct({"subsystems": "power", "max_severity": {"$gte": 4}}),
        auto_start=True,
        steps=[
            step("note", "log", {"message": "incident ${cluster_id} on ${root_cause_satellite_id}"}),
            step("switch", "agent:switch_power_bus", {"satellite": "${root_cause_satellite_id}"}, approval=True),
            step(
                "report",
                "publish",
                {"subject": "runbook.notes.power", "payload": {"satellite": "${root_cause_satellite_id}"}},
            ),
        ],
    )
    registered = await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    assert registered.created and registered.runbook.version == 1
    unrelated = pb.Runbook(
        runbook_id="comms-only",
        name="Comms only",
        trigger_conditions=struct({"subsystems": "comms"}),
        auto_start=True,
        steps=[step("s", "log", {"message": "x"})],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=unrelated))

    # A power fault, then the thermal fallout on the same satellite: one incident.
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    alerts = [
        cpb.Alert(
            alert_id=uuid.uuid4().hex,
            satellite_id="SAT-7",
            subsystem=sub,
            severity=sev,
            timestamp=ts(t0 + timedelta(seconds=i * 5)),
            message=f"{sub} anomaly",
        )
        for i, (sub, sev) in enumerate([("power", 5), ("thermal", 3), ("thermal", 4)])
    ]
    replies = [await stubs.correlation.IngestAlert(cpb.IngestAlertRequest(alert=a)) for a in alerts]
    cluster_id = replies[0].cluster_id
    assert replies[0].cluster_opened and {r.cluster_id for r in replies} == {cluster_id}

    execution_id = incident_execution_id(cluster_id, "power-bus-recovery")
    waiting = await wait_status(
        stubs.operator,
        execution_id,
        lambda e: steps_by_id(e)["switch"].status == pb.STEP_STATUS_AWAITING_APPROVAL,
    )
    assert waiting.triggered_by == f"incident:{cluster_id}"
    assert steps_by_id(waiting)["note"].status == pb.STEP_STATUS_COMPLETED
    assert json_format.MessageToDict(waiting.variables)["root_cause_satellite_id"] == "SAT-7"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.operator.GetExecutionStatus(
            pb.GetExecutionStatusRequest(execution_id=incident_execution_id(cluster_id, "comms-only"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, "a runbook whose conditions do not match never starts"

    runbook_events = await bus.js.subscribe(bus.subjects.runbook(">"), ordered_consumer=True)
    async with agent(
        bus,
        "switch_power_bus",
        lambda req: events_pb2.AgentActionReply(ok=True, output=struct({"bus": "B"})),
    ) as requests:
        approved = await stubs.approver.ApproveStep(
            pb.ApproveStepRequest(execution_id=execution_id, step_id="switch", approver="ignored: from the token")
        )
        assert steps_by_id(approved.execution)["switch"].approved_by == "approver"
        done = await wait_status(stubs.operator, execution_id, lambda e: e.status != pb.RUNBOOK_STATUS_RUNNING)
    assert done.status == pb.RUNBOOK_STATUS_COMPLETED, done.error
    assert len(requests) == 1
    request = requests[0]
    assert request.execution_id == execution_id and request.step_id == "switch"
    assert request.action == "agent:switch_power_bus"
    assert json_format.MessageToDict(request.parameters) == {"satellite": "SAT-7"}
    assert json_format.MessageToDict(done.variables)["bus"] == "B", "agent output becomes a variable"

    # The audit trail: every transition, with who and when, in order.
    audit = list(done.audit_log)
    assert [a.seq for a in audit] == list(range(1, len(audit) + 1)) and done.version == len(audit)
    assert all(a.actor and a.time.seconds > 0 for a in audit)
    transitions = [(a.transition, a.step_id) for a in audit]
    for expected in [
        ("EXECUTION_STARTED", ""),
        ("STEP_STARTED", "note"),
        ("ACTION_LOGGED", "note"),
        ("STEP_COMPLETED", "note"),
        ("APPROVAL_REQUESTED", "switch"),
        ("APPROVAL_GRANTED", "switch"),
        ("STEP_STARTED", "switch"),
        ("VARIABLE_SET", "switch"),
        ("STEP_COMPLETED", "switch"),
        ("STEP_COMPLETED", "report"),
        ("EXECUTION_FINISHED", ""),
    ]:
        assert expected in transitions, expected
    assert audit[0].actor == f"incident:{cluster_id}"
    assert next(a for a in audit if a.transition == "APPROVAL_GRANTED").actor == "approver"
    assert next(a for a in audit if a.transition == "ACTION_LOGGED").detail == f"incident {cluster_id} on SAT-7"

    # Every transition reached NATS through the outbox, and so did the publish step's message.
    seen: list[events_pb2.Event] = []
    async with asyncio.timeout(10):
        while not any(
            e.aggregate_id == execution_id and e.execution_transition.transition == "EXECUTION_FINISHED" for e in seen
        ):
            msg = await runbook_events.next_msg(timeout=10)
            event = events_pb2.Event()
            event.ParseFromString(msg.data)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event.event_id
            seen.append(event)
    await runbook_events.unsubscribe()
    mine = [e for e in seen if e.aggregate_id == execution_id]
    assert [e.execution_transition.transition for e in mine if e.type != "runbook.notes.power"] == [
        a.transition for a in audit
    ]
    published = [e for e in mine if e.type == "runbook.notes.power"]
    assert len(published) == 1
    assert json_format.MessageToDict(published[0].execution_transition.data) == {"satellite": "SAT-7"}


async def test_failed_step_rolls_back_every_step_in_reverse_order(app_factory: Any, bus: Bus, channel_for: Any) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    undone: list[str] = []

    def record(request: events_pb2.AgentActionRequest) -> events_pb2.AgentActionReply:
        undone.append(json_format.MessageToDict(request.parameters)["undo"])
        return events_pb2.AgentActionReply(ok=True)

    async with agent(bus, "recorder", record) as rollback_requests:
        # The recorder agent declares itself at runtime.
        await bus.nc.publish(
            bus.subjects.action("_announce"),
            json.dumps({"name": "recorder", "description": "records what it undoes", "idempotent": True}).encode(),
        )

        async def announced() -> Any:
            actions = (await stubs.operator.ListActions(pb.ListActionsRequest(page_size=100))).actions
            return next((a for a in actions if a.name == "agent:recorder"), None)

        recorder = await eventually(announced, timeout_s=5, what="agent:recorder announced")
        assert recorder.kind == pb.ACTION_KIND_AGENT and recorder.idempotent

        runbook = pb.Runbook(
            runbook_id="safe-mode",
            name="Safe mode",
            auto_rollback=True,
            steps=[
                step(
                    f"s{i}",
                    "set_variable",
                    {"name": f"v{i}", "value": i},
                    rollback="agent:recorder",
                    rollback_params={"undo": f"s{i}"},
                )
                for i in (1, 2, 3)
            ]
            + [step("payload", "agent:safe_payload", {"mode": "safe"})],
        )
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
        started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="safe-mode"))
        execution_id = started.execution.execution_id
        assert started.execution.triggered_by == "operator"
        async with agent(bus, "safe_payload", lambda req: events_pb2.AgentActionReply(ok=False, error="payload busy")):
            for expected in ["s1", "s2", "s3"]:
                reply = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
                assert reply.step_status == pb.STEP_STATUS_COMPLETED, expected
            failed = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert failed.step_status == pb.STEP_STATUS_FAILED
    execution = failed.execution
    assert undone == ["s3", "s2", "s1"], "rollback actions run in reverse step order"
    assert [r.step_id for r in rollback_requests] == ["s3", "s2", "s1"]
    assert execution.status == pb.RUNBOOK_STATUS_ROLLED_BACK
    states = steps_by_id(execution)
    assert all(states[s].status == pb.STEP_STATUS_ROLLED_BACK for s in ("s1", "s2", "s3"))
    assert states["payload"].status == pb.STEP_STATUS_FAILED and "payload busy" in states["payload"].error
    assert [a.step_id for a in execution.audit_log if a.transition == "STEP_ROLLED_BACK"] == ["s3", "s2", "s1"]

    # Rolling back again is refused: there is nothing left to undo.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.operator.RollbackExecution(pb.RollbackExecutionRequest(execution_id=execution_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_execution_awaiting_approval_survives_a_restart(app_factory: Any, channel_for: Any) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="heater",
        name="Heater duty",
        steps=[
            step("announce", "log", {"message": "reducing heater duty on ${satellite}"}),
            step("reduce", "set_variable", {"name": "duty", "value": "40%"}, approval=True),
            step("confirm", "log", {"message": "duty now ${duty}"}),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="heater", variables=struct({"satellite": "SAT-3", "duty": "100%"}))
    )
    execution_id = started.execution.execution_id
    first = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert first.step_status == pb.STEP_STATUS_COMPLETED
    gate = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert gate.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    await app.stop()

    app2 = await app_factory()
    stubs = Stubs(channel_for, app2.port)
    status = (
        await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=execution_id))
    ).execution
    assert status.status == pb.RUNBOOK_STATUS_RUNNING
    assert steps_by_id(status)["reduce"].status == pb.STEP_STATUS_AWAITING_APPROVAL
    # Still awaiting: nothing runs without the approval, after the restart too.
    still = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert still.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    approved = await stubs.approver.ApproveStep(pb.ApproveStepRequest(execution_id=execution_id, step_id="reduce"))
    assert steps_by_id(approved.execution)["reduce"].approved_by == "approver"
    reduce = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert reduce.step_status == pb.STEP_STATUS_COMPLETED
    confirm = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert confirm.execution.status == pb.RUNBOOK_STATUS_COMPLETED
    logged = [a.detail for a in confirm.execution.audit_log if a.transition == "ACTION_LOGGED"]
    assert logged == ["reducing heater duty on SAT-3", "duty now 40%"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_approval_that_expires_across_a_restart_fails_and_rolls_back(
    app_factory: Any, channel_for: Any
) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    gate = step("gate", "log", {"message": "switch to the redundant bus"}, approval=True)
    gate.approval_timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    runbook = pb.Runbook(
        runbook_id="bus-switch",
        name="Bus switch",
        auto_rollback=True,
        steps=[
            step(
                "prepare",
                "set_variable",
                {"name": "armed", "value": True},
                rollback="log",
                rollback_params={"message": "disarmed"},
            ),
            gate,
        ],
    )
    execution_id = await waiting_at_its_gate(stubs, runbook)
    await app.stop()

    # Nobody approves, and nobody asks for the next step: the restarted service's ticker must act.
    app2 = await app_factory()
    stubs = Stubs(channel_for, app2.port)
    done = await wait_status(stubs.operator, execution_id, lambda e: e.status == pb.RUNBOOK_STATUS_ROLLED_BACK)
    transitions = [(a.transition, a.step_id) for a in done.audit_log]
    assert ("APPROVAL_EXPIRED", "gate") in transitions and ("STEP_ROLLED_BACK", "prepare") in transitions


async def test_a_replica_takes_up_the_gates_of_a_replica_that_stopped(app_factory: Any, channel_for: Any) -> None:
    # Two replicas. B starts first, so it never loads (at start) the execution A starts afterwards;
    # when A stops, B must watch its approval gate all the same (it did only after a restart).
    b = await app_factory()
    b_service = next(c for c in b.components if c.name == "runbook").service
    b_service._adopt_after_s = 0.5  # a test's patience (30 s in service)
    a = await app_factory()
    stubs = Stubs(channel_for, a.port)
    gate = step("gate", "log", {"message": "switch to the redundant bus"}, approval=True)
    gate.approval_timeout.CopyFrom(duration_pb2.Duration(seconds=2))
    runbook = pb.Runbook(runbook_id="adopt", name="Adopt", steps=[step("note", "log", {"message": "hi"}), gate])
    execution_id = await waiting_at_its_gate(stubs, runbook)
    await a.stop()

    stubs = Stubs(channel_for, b.port)
    done = await wait_status(stubs.operator, execution_id, lambda e: e.status != pb.RUNBOOK_STATUS_RUNNING)
    assert done.status == pb.RUNBOOK_STATUS_FAILED
    assert ("APPROVAL_EXPIRED", "gate") in [(x.transition, x.step_id) for x in done.audit_log]


async def test_an_execution_rolling_back_is_one_a_restart_picks_up(
    app_factory: Any, bus: Bus, channel_for: Any, db: Database
) -> None:
    # A rollback runs after the execution FAILED (or COMPLETED). A server that died in the middle
    # of it left the rest of the rollback undone for good: a restart loads only RUNNING executions.
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    asked, release = asyncio.Event(), asyncio.Event()

    async def safe_payload(msg: Msg) -> None:
        asked.set()
        await release.wait()  # the rollback action is in flight until the test lets it finish
        await msg.respond(json_format.MessageToJson(events_pb2.AgentActionReply(ok=True)).encode())

    sub = await bus.nc.subscribe(bus.subjects.action("safe_payload"), cb=safe_payload)
    await bus.nc.flush()
    runbook = pb.Runbook(
        runbook_id="unwind",
        name="Unwind",
        auto_rollback=True,
        steps=[
            step("arm", "log", {"message": "armed"}, rollback="agent:safe_payload", timeout_s=10.0),
            step("fail", "wait", {"seconds": 2}, timeout_s=0.2),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="unwind"))
    execution_id = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    failing = asyncio.ensure_future(
        stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    )
    try:
        await asyncio.wait_for(asked.wait(), timeout=15.0)  # the rollback action is called
        async with db.connection() as conn:
            loaded = {row.execution_id for row in await runbook_repo.unfinished_executions(conn)}
        assert execution_id in loaded, "a restart now would leave the rollback half done"
    finally:
        release.set()
        reply = await failing
        await sub.unsubscribe()
    assert reply.execution.status == pb.RUNBOOK_STATUS_ROLLED_BACK
    async with db.connection() as conn:
        assert execution_id not in {row.execution_id for row in await runbook_repo.unfinished_executions(conn)}


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b'{"ok": true, "output": {"bus": "B\\u0000"}}', "output.bus: must not contain NUL"),
        (b'{"ok": true, "output": {"n": 1' + b"0" * 400 + b"}}", "output.n: numbers must be finite"),
        (b'{"ok": false, "error": "bus\\u0000 busy"}', "agent odd failed: bus\ufffd busy"),
        (b'{"ok": true, "output": {"bus": "\\udfff"}}', "output.bus: must be valid Unicode"),
    ],
    ids=["nul-in-output", "integer-beyond-double", "nul-in-error", "lone-surrogate"],
)
async def test_an_agent_reply_that_cannot_be_kept_fails_its_step(
    app_factory: Any, bus: Bus, channel_for: Any, reply: bytes, reason: str
) -> None:
    # Agents are other people's programs. Their output is stored (jsonb) and sent (Struct, doubles):
    # what neither can hold used to fail the write after the action ran, and the call was INTERNAL.
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)

    async def on_request(msg: Msg) -> None:
        await msg.respond(reply)

    sub = await announced_agent(bus, stubs, "odd", on_request)
    runbook = pb.Runbook(runbook_id="odd", name="Odd", steps=[step("ask", "agent:odd", {"x": 1})])
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="odd"))
    done = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=started.execution.execution_id))
    await sub.unsubscribe()
    assert done.step_status == pb.STEP_STATUS_FAILED
    assert reason in steps_by_id(done.execution)["ask"].error
    assert done.execution.status == pb.RUNBOOK_STATUS_FAILED


async def test_an_incident_that_grows_to_match_starts_the_runbook_once(app_factory: Any, channel_for: Any) -> None:
    """An incident opens with its first alert; the severity that rises and the subsystem that joins later
    are only ever in its updates. A runbook matching only the grown incident still starts, once."""
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="thermal-critical",
        name="Thermal critical",
        trigger_conditions=struct({"subsystems": "thermal", "max_severity": {"$gte": 5}}),
        auto_start=True,
        steps=[step("note", "log", {"message": "${alert_count} alerts, worst ${max_severity}"})],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    t0 = datetime.now(UTC) - timedelta(seconds=30)

    async def ingest(subsystem: str, severity: int, at_s: int) -> cpb.IngestAlertResponse:
        return await ingest_alert(stubs, "SAT-9", subsystem, severity, t0 + timedelta(seconds=at_s))

    opened = await ingest("power", 3, 0)
    assert opened.cluster_opened
    cluster_id = opened.cluster_id
    grown = await ingest("thermal", 5, 5)
    assert grown.cluster_id == cluster_id and not grown.cluster_opened
    execution_id = incident_execution_id(cluster_id, "thermal-critical")
    done = await wait_status(stubs.operator, execution_id, lambda e: e.status == pb.RUNBOOK_STATUS_COMPLETED)
    assert done.incident_id == cluster_id and done.triggered_by == f"incident:{cluster_id}"
    variables = json_format.MessageToDict(done.variables)
    assert set(variables["subsystems"]) == {"power", "thermal"} and variables["max_severity"] == 5

    # A further update of the incident matches too, and starts nothing more.
    component = next(c for c in app.components if c.name == "runbook")
    handled = component.update_consumer.handled
    assert (await ingest("propulsion", 5, 10)).cluster_id == cluster_id

    async def update_handled() -> bool:
        return bool(component.update_consumer.handled > handled)

    await eventually(update_handled, timeout_s=10, what="the incident's further update handled")
    listed = await stubs.operator.ListExecutions(pb.ListExecutionsRequest(incident_id=cluster_id))
    assert [e.execution_id for e in listed.executions] == [execution_id]


async def test_a_start_by_hand_for_an_incident_gets_its_fields_under_the_given_variables(
    app_factory: Any, channel_for: Any
) -> None:
    # An operator reruns a procedure for an incident by hand: its steps name the incident's satellites
    # and root cause as an incident start would have them, and a variable the operator gives wins.
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    message = "${root_cause_subsystem} on ${root_cause_satellite_id}, ${alert_count} alerts, worst ${max_severity}"
    runbook = pb.Runbook(
        runbook_id="rerun-safe-mode",
        name="Rerun safe mode",
        steps=[step("note", "log", {"message": message, "satellites": "${satellite_ids}"})],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    cluster_id = (await ingest_alert(stubs, "SAT-4", "power", 3, t0)).cluster_id
    joined = await ingest_alert(stubs, "SAT-4", "thermal", 4, t0 + timedelta(seconds=5))
    assert joined.cluster_id == cluster_id

    request = pb.StartExecutionRequest(
        runbook_id="rerun-safe-mode", incident_id=cluster_id, variables=struct({"max_severity": "5 (paged)"})
    )
    dry_run = pb.StartExecutionRequest(dry_run=True)
    dry_run.MergeFrom(request)
    [planned] = (await stubs.operator.StartExecution(dry_run)).plan
    expected = "power on SAT-4, 2 alerts, worst 5 (paged)"
    assert json_format.MessageToDict(planned.rendered_parameters)["message"] == expected
    started = (await stubs.operator.StartExecution(request)).execution
    variables = json_format.MessageToDict(started.variables)
    assert variables["cluster_id"] == cluster_id and variables["satellite_ids"] == ["SAT-4"]
    assert set(variables["subsystems"]) == {"power", "thermal"} and variables["multi_satellite"] is False
    assert variables["max_severity"] == "5 (paged)", "the variable given wins over the incident's field"
    done = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=started.execution_id))
    assert done.step_status == pb.STEP_STATUS_COMPLETED
    assert [a.detail for a in done.execution.audit_log if a.transition == "ACTION_LOGGED"] == [expected]


async def test_an_incident_that_closes_is_recorded_in_the_audit_of_its_waiting_execution(
    app_factory: Any, channel_for: Any
) -> None:
    # A power fault starts a bus switch that waits for approval; the fault clears and the incident is
    # closed. The approver must see that before approving a switch nobody needs any more.
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="bus-switch",
        name="Bus switch",
        trigger_conditions=struct({"subsystems": "power"}),
        auto_start=True,
        steps=[step("switch", "log", {"message": "switching"}, approval=True)],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    alert = cpb.Alert(
        alert_id=uuid.uuid4().hex, satellite_id="SAT-C", subsystem="power", severity=4, timestamp=ts(datetime.now(UTC))
    )
    cluster_id = (await stubs.correlation.IngestAlert(cpb.IngestAlertRequest(alert=alert))).cluster_id
    execution_id = incident_execution_id(cluster_id, "bus-switch")
    await wait_status(
        stubs.operator, execution_id, lambda e: steps_by_id(e)["switch"].status == pb.STEP_STATUS_AWAITING_APPROVAL
    )

    await stubs.correlation.CloseCluster(
        cpb.CloseClusterRequest(cluster_id=cluster_id, reason="bus voltage nominal again", request_id=uuid.uuid4().hex)
    )

    def closed_entries(e: pb.Execution) -> list[pb.AuditEntry]:
        return [a for a in e.audit_log if a.transition == "INCIDENT_CLOSED"]

    noted = await wait_status(stubs.operator, execution_id, lambda e: bool(closed_entries(e)))
    [entry] = closed_entries(noted)
    assert entry.actor == f"incident:{cluster_id}"
    assert entry.detail == f"incident {cluster_id} closed by operator: bus voltage nominal again"
    # Nothing else changes: whether the switch is still wanted is the approver's call.
    assert noted.status == pb.RUNBOOK_STATUS_RUNNING
    assert steps_by_id(noted)["switch"].status == pb.STEP_STATUS_AWAITING_APPROVAL

    # The event delivered again (or a second close path) records nothing more.
    component = next(c for c in app.components if c.name == "runbook")
    assert await component.service.note_incident_closed(cluster_id, "operator", "again") == []
    again = await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=execution_id))
    assert len(closed_entries(again.execution)) == 1


async def test_an_operator_cancels_an_execution_without_rolling_it_back(app_factory: Any, channel_for: Any) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="cancellable",
        name="Cancellable",
        auto_rollback=True,
        steps=[
            step("note", "log", {"message": "first"}, rollback="log", rollback_params={"message": "undo"}),
            step("switch", "log", {"message": "switching"}, approval=True),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="cancellable"))
    execution_id = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))

    viewer = runbook_pb2_grpc.RunbookServiceStub(channel_for("viewer", app.port))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await viewer.CancelExecution(pb.CancelExecutionRequest(execution_id=execution_id))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request = pb.CancelExecutionRequest(execution_id=execution_id, reason="fault cleared", request_id=uuid.uuid4().hex)
    cancelled = (await stubs.operator.CancelExecution(request)).execution
    assert cancelled.status == pb.RUNBOOK_STATUS_CANCELLED
    assert cancelled.error == "cancelled by operator: fault cleared"
    assert [s.status for s in cancelled.steps] == [pb.STEP_STATUS_COMPLETED, pb.STEP_STATUS_SKIPPED]
    # A retry answers as the first call did; another cancel is refused; nothing was rolled back.
    assert (await stubs.operator.CancelExecution(request)).execution == cancelled
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.operator.CancelExecution(pb.CancelExecutionRequest(execution_id=execution_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await stubs.operator.ListExecutions(pb.ListExecutionsRequest(status=pb.RUNBOOK_STATUS_CANCELLED))
    assert [e.execution_id for e in listed.executions] == [execution_id]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.operator.CancelExecution(pb.CancelExecutionRequest(execution_id="no-such-execution"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_retried_rollback_that_completes_keeps_the_error_that_ended_the_execution(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    # A rollback whose action failed left the execution FAILED ("rollback incomplete"); the retry that
    # then undid the rest answered ROLLED_BACK with that same "rollback incomplete" as its error, and
    # why the execution had ended (here the operator's cancel) was gone from its state.
    app = await app_factory(agent_actions=("relay",))
    stubs = Stubs(channel_for, app.port)
    replies = [events_pb2.AgentActionReply(ok=False, error="relay stuck"), events_pb2.AgentActionReply(ok=True)]
    runbook = pb.Runbook(
        runbook_id="relay-safe",
        name="Relay",
        steps=[
            step("open", "log", {"message": "opening"}, rollback="agent:relay"),
            step("close", "log", {"message": "closing"}, approval=True),
        ],
    )
    execution_id = await waiting_at_its_gate(stubs, runbook)
    await stubs.operator.CancelExecution(pb.CancelExecutionRequest(execution_id=execution_id, reason="fault cleared"))
    rollback = pb.RollbackExecutionRequest(execution_id=execution_id)
    async with agent(bus, "relay", lambda request: replies.pop(0)):
        incomplete = (await stubs.operator.RollbackExecution(rollback)).execution
        assert incomplete.status == pb.RUNBOOK_STATUS_FAILED
        assert incomplete.error == "rollback incomplete: open: agent relay failed: relay stuck"
        retried = await stubs.operator.RollbackExecution(rollback)
    assert retried.rolled_back_count == 1 and not replies
    assert retried.execution.status == pb.RUNBOOK_STATUS_ROLLED_BACK
    assert retried.execution.error == "cancelled by operator: fault cleared"
    assert steps_by_id(retried.execution)["open"].status == pb.STEP_STATUS_ROLLED_BACK


async def test_a_step_that_timed_out_is_undone_by_the_rollback(app_factory: Any, bus: Bus, channel_for: Any) -> None:
    # The bus switch did not answer in time: it may have switched all the same, so the rollback
    # switches back (rollback actions are idempotent). Before, only completed steps were undone.
    app = await app_factory(agent_actions=("bus",))
    stubs = Stubs(channel_for, app.port)
    runbook = pb.Runbook(
        runbook_id="slow-switch",
        name="Slow switch",
        steps=[
            step("note", "log", {"message": "switching"}, rollback="log", rollback_params={"message": "undo"}),
            step("switch", "wait", {"seconds": 30}, timeout_s=0.2, rollback="agent:bus", rollback_params={"to": "A"}),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="slow-switch"))
    execution_id = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    failed = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
    assert failed.execution.error == "step switch failed: timed out after 0.2s"
    asked: list[events_pb2.AgentActionRequest] = []

    def switch_back(request: events_pb2.AgentActionRequest) -> events_pb2.AgentActionReply:
        asked.append(request)
        return events_pb2.AgentActionReply(ok=True)

    async with agent(bus, "bus", switch_back):
        rolled = await stubs.operator.RollbackExecution(pb.RollbackExecutionRequest(execution_id=execution_id))
    assert rolled.rolled_back_count == 2 and len(asked) == 1
    assert rolled.execution.status == pb.RUNBOOK_STATUS_ROLLED_BACK
    assert [s.status for s in rolled.execution.steps] == [pb.STEP_STATUS_ROLLED_BACK, pb.STEP_STATUS_ROLLED_BACK]


async def test_big_outputs_leave_every_answer_about_the_execution_within_the_message_limit(
    app_factory: Any, bus: Bus, channel_for: Any
) -> None:
    # Each output may take 256 KiB, and an agent's output becomes variables (and an audit entry):
    # twelve such steps made every answer about the execution (each step's reply, its status, the
    # watch) outgrow the 4 MiB message limit - RESOURCE_EXHAUSTED, with the steps run all the same.
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    dumps = [f"{n:02d}" + "x" * 200_000 for n in range(12)]

    async def on_request(msg: Msg) -> None:
        request = json_format.Parse(msg.data, events_pb2.AgentActionRequest())
        n = int(request.step_id.removeprefix("dump-"))
        # The same key each time (the variables stay one dump), then a key of its own (they grow).
        output = {"dump": dumps[n]} if n < 12 else {f"dump{n}": dumps[n % 12]}
        reply = events_pb2.AgentActionReply(ok=True, output=struct(output))
        await msg.respond(json_format.MessageToJson(reply).encode())

    sub = await announced_agent(bus, stubs, "dumper", on_request)
    steps = [step(f"dump-{n}", "agent:dumper", {"n": n}) for n in range(12)]
    await stubs.admin.RegisterRunbook(
        pb.RegisterRunbookRequest(runbook=pb.Runbook(runbook_id="dumps", name="Dumps", steps=steps))
    )
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="dumps"))
    execution_id = started.execution.execution_id
    for _ in steps:
        reply = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
        assert reply.step_status == pb.STEP_STATUS_COMPLETED
    status = (
        await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=execution_id))
    ).execution
    assert status.status == pb.RUNBOOK_STATUS_COMPLETED and status.ByteSize() < 4 * 1024 * 1024
    kept = [s.step_id for s in status.steps if s.HasField("output")]
    omitted = [s.step_id for s in status.steps if s.output_omitted]
    assert kept == [f"dump-{n}" for n in range(len(kept))] and 5 <= len(kept) < 12
    assert omitted == [f"dump-{n}" for n in range(len(kept), 12)]
    # The audit says which variable changed, not its 200,000 characters.
    assert all(len(a.detail) < 300 for a in status.audit_log)
    # An omitted output, whole.
    last = await stubs.operator.GetStepOutput(pb.GetStepOutputRequest(execution_id=execution_id, step_id="dump-11"))
    assert json_format.MessageToDict(last.output) == {"dump": dumps[11]}
    for request, code in (
        (pb.GetStepOutputRequest(execution_id=execution_id, step_id="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.GetStepOutputRequest(execution_id="nope", step_id="dump-1"), grpc.StatusCode.NOT_FOUND),
        (pb.GetStepOutputRequest(execution_id=execution_id), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.operator.GetStepOutput(request)
        assert err.value.code() == code, request

    # Variables that would outgrow 1 MiB: the step that would do it fails, the execution with it.
    growing = [step(f"dump-{n}", "agent:dumper", {"n": n}) for n in range(12, 18)]
    await stubs.admin.RegisterRunbook(
        pb.RegisterRunbookRequest(runbook=pb.Runbook(runbook_id="grow", name="Grow", steps=growing))
    )
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="grow"))
    execution_id = started.execution.execution_id
    outcomes = []
    for _ in growing:
        reply = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=execution_id))
        outcomes.append(reply.step_status)
        if reply.step_status == pb.STEP_STATUS_FAILED:
            break
    await sub.unsubscribe()
    assert outcomes == [pb.STEP_STATUS_COMPLETED] * 5 + [pb.STEP_STATUS_FAILED]
    assert "would make the variables too large" in steps_by_id(reply.execution)["dump-17"].error
