"""RunbookService through a real server: bad input, $regex on RE2, versioning, dry runs, idempotency,
as-of reads, concurrency across two servers, exactly-once incident starts, old event schemas, approval
expiry and the agent circuit breaker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _poll import eventually
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from runbook_flow_test import Stubs, step, steps_by_id, struct, ts, wait_status

from aetherops.bus import Bus
from aetherops.db import Database
from aetherops.services.runbook import incident_execution_id
from gen.aetherops.events.v1 import events_pb2
from gen.aetherops.runbook.v1 import runbook_pb2 as pb
from gen.aetherops.runbook.v1 import runbook_pb2_grpc


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    code: grpc.StatusCode = err.value.code()
    return code


def simple(runbook_id: str = "rb", *, approval: bool = False, wait_s: float = 0.0) -> pb.Runbook:
    return pb.Runbook(
        runbook_id=runbook_id,
        name="Simple",
        steps=[
            step("one", "wait" if wait_s else "log", {"seconds": wait_s} if wait_s else {"message": "one ${sat}"}),
            step("two", "log", {"message": "two"}, approval=approval),
            step("three", "set_variable", {"name": "done", "value": True}),
        ],
    )


async def test_bad_input_gets_precise_statuses(server: Any, channel_for: Any, db: Database) -> None:
    stubs = Stubs(channel_for, server.port)
    broken = pb.Runbook(
        runbook_id="broken",
        name="",
        steps=[
            step("a", "log", {"message": "x"}),
            step("a", "no_such_action"),
            pb.RunbookStep(step_id="c", action="log", timeout=duration_pb2.Duration(seconds=-1)),
            step("d", "agent:undeclared_agent"),
        ],
        trigger_conditions=struct({"severity": {"$near": 3}}),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=broken))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert set(found) >= {
        "runbook.name",
        "runbook.steps[1].step_id",
        "runbook.steps[1].action",
        "runbook.steps[2].timeout",
        "runbook.steps[3].action",
    }, found
    assert any(f.startswith("runbook.trigger_conditions") for f in found), found
    assert "duplicate" in found["runbook.steps[1].step_id"]
    assert await db.fetchval("SELECT count(*) FROM runbooks") == 0
    empty = pb.Runbook(runbook_id="empty", name="Empty")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=empty))
    assert "runbook.steps" in violations(err.value)

    op = stubs.operator
    assert await code_of(op.GetRunbook(pb.GetRunbookRequest(runbook_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert await code_of(op.StartExecution(pb.StartExecutionRequest(runbook_id="nope"))) == grpc.StatusCode.NOT_FOUND
    for call in (
        op.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id="nope")),
        op.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id="nope")),
        op.RollbackExecution(pb.RollbackExecutionRequest(execution_id="nope")),
        stubs.approver.ApproveStep(pb.ApproveStepRequest(execution_id="nope", step_id="x")),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    assert await code_of(op.GetExecutionStatus(pb.GetExecutionStatusRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    # Text PostgreSQL cannot store (NUL) is the caller's error wherever it arrives, never INTERNAL.
    nul_name = simple("nul")
    nul_name.name = "Simple\x00"
    nul_variable = pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "S\x00"}))
    for call in (
        stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=nul_name)),
        stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple("nul"), request_id="r\x00")),
        op.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id="e\x00")),
    ):
        assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    # An id that could never exist is a field error too, not NOT_FOUND (README: ids are at most 256
    # characters and hold no NUL).
    for call, field in (
        (op.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id="e" * 300)), "execution_id"),
        (op.GetStepOutput(pb.GetStepOutputRequest(execution_id="nope", step_id="s" * 300)), "step_id"),
        (stubs.approver.ApproveStep(pb.ApproveStepRequest(execution_id="nope", step_id="s\x00")), "step_id"),
        (stubs.approver.RejectStep(pb.RejectStepRequest(execution_id=" nope", step_id="x")), "execution_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(err.value)) == {field}
    assert await db.fetchval("SELECT count(*) FROM runbooks") == 0
    # A step that could only fail when it runs is refused when registered.
    never = pb.Runbook(runbook_id="never", name="Never", steps=[step("w", "wait", {"seconds": -1})])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=never))
    assert "non-negative" in violations(err.value)["runbook.steps[0].parameters.seconds"]
    # So is a literal publish no stream captures, or with a payload that is not an object, in a
    # step or a rollback; a subject known only when the step runs is checked then.
    lost = step("p", "publish", {"subject": "nowhere.near", "payload": "text"})
    undo = step("q", "log", {"message": "x"}, rollback="publish", rollback_params={"subject": "runbook notes"})
    later = step("r", "publish", {"subject": "${where}", "payload": {"sat": "${sat}"}})
    never = pb.Runbook(runbook_id="never", name="Never", steps=[lost, undo, later])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=never))
    assert violations(err.value) == {
        "runbook.steps[0].parameters.subject": "no stream captures 'nowhere.near'",
        "runbook.steps[0].parameters.payload": "must be an object",
        "runbook.steps[1].rollback_parameters.subject": "must be a subject relative to the prefix",
    }

    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple(approval=True)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await op.StartExecution(pb.StartExecutionRequest(runbook_id="rb"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "variables.sat" in violations(err.value)

    assert await code_of(op.StartExecution(nul_variable)) == grpc.StatusCode.INVALID_ARGUMENT
    # A start's request id is stored with the execution: checked by field like every other request id.
    for bad_id, problem in (("a\x00b", "NUL"), ("r" * 300, "at most 256")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await op.StartExecution(
                pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "S"}), request_id=bad_id)
            )
        assert problem in violations(err.value)["request_id"]
    # Variables the started event could not carry through NATS (1 MiB) are refused, not set aside.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await op.StartExecution(pb.StartExecutionRequest(runbook_id="rb", variables=struct({"blob": "x" * 1_500_000})))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes as JSON" in violations(err.value)["variables"]
    )
    started = await op.StartExecution(pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "S1"})))
    eid = started.execution.execution_id
    approve = pb.ApproveStepRequest(execution_id=eid, step_id="two")
    assert await code_of(stubs.approver.ApproveStep(approve)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(stubs.approver.ApproveStep(pb.ApproveStepRequest(execution_id=eid, step_id="zz"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    await op.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    gate = await op.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    assert gate.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    # Four eyes: an admin holds the approver role, but did not start this one; the operator did. An admin
    # who starts an execution cannot approve it.
    own = await stubs.admin.StartExecution(pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "S"})))
    own_id = own.execution.execution_id
    await stubs.admin.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=own_id))
    await stubs.admin.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=own_id))
    own_approve = pb.ApproveStepRequest(execution_id=own_id, step_id="two")
    assert await code_of(stubs.admin.ApproveStep(own_approve)) == grpc.StatusCode.PERMISSION_DENIED
    await stubs.approver.ApproveStep(approve)
    assert await code_of(stubs.approver.ApproveStep(approve)) == grpc.StatusCode.FAILED_PRECONDITION


async def test_regex_conditions_run_on_re2(server: Any, channel_for: Any, db: Database) -> None:
    stubs = Stubs(channel_for, server.port)
    backref = simple("backref")
    backref.trigger_conditions.CopyFrom(struct({"msg": {"$regex": r"(a)\1"}}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=backref))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RE2" in violations(err.value)["runbook.trigger_conditions.msg.$regex"]

    nested = simple("nested")
    nested.trigger_conditions.CopyFrom(struct({"msg": {"$regex": "^(a+)+$"}}))
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=nested))
    # As a server that compiled $regex with Python's re stored it: a lookahead, which RE2 lacks. It must
    # not break the lookup (it is restored on the way) and simply never matches.
    legacy = dict(await db.fetchval("SELECT definition FROM runbooks WHERE runbook_id = 'nested'"))
    legacy.update(runbook_id="legacy", trigger_conditions={"msg": {"$regex": "^(?=a)a+$"}})
    await db.execute(
        "INSERT INTO runbooks (runbook_id, version, definition, created_time) VALUES ('legacy', 1, $1, now())",
        legacy,
    )

    find = stubs.operator.FindMatchingRunbooks
    # Python's re backtracks 2**40 times here, with every RPC of the server waiting; RE2 answers at once.
    none = await find(pb.FindMatchingRunbooksRequest(incident_data=struct({"msg": "a" * 40 + "!"})))
    assert list(none.runbooks) == []
    found = await find(pb.FindMatchingRunbooksRequest(incident_data=struct({"msg": "a" * 40})))
    assert [r.runbook_id for r in found.runbooks] == ["nested"]


async def test_a_stored_pattern_re2_refuses_is_named_at_start(
    app_factory: Any, channel_for: Any, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = await app_factory()
    stubs = Stubs(channel_for, app.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple("current")))
    legacy = dict(await db.fetchval("SELECT definition FROM runbooks WHERE runbook_id = 'current'"))
    legacy.update(runbook_id="legacy", trigger_conditions={"msg": {"$regex": "^(?=a)a+$"}})
    await db.execute(
        "INSERT INTO runbooks (runbook_id, version, definition, created_time) VALUES ('legacy', 1, $1, now())",
        legacy,
    )
    await app.stop()
    caplog.clear()
    await app_factory()  # loads it (it never matches) and says so: it would otherwise just stop triggering
    named = [r.getMessage() for r in caplog.records if "legacy" in r.getMessage() and r.levelname == "WARNING"]
    assert len(named) == 1 and "never matches" in named[0] and "trigger_conditions.msg.$regex" in named[0]


async def test_versioning_and_pagination(server: Any, channel_for: Any) -> None:
    stubs = Stubs(channel_for, server.port)
    first = await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple()))
    assert first.created and first.runbook.version == 1
    again = await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple()))
    assert not again.created and again.runbook.version == 1, "identical re-registration is a no-op"
    changed = simple()
    changed.description = "now with a description"
    second = await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=changed))
    assert second.created and second.runbook.version == 2
    latest = await stubs.operator.GetRunbook(pb.GetRunbookRequest(runbook_id="rb"))
    assert latest.runbook.version == 2 and latest.runbook.description == "now with a description"
    old = await stubs.operator.GetRunbook(pb.GetRunbookRequest(runbook_id="rb", version=1))
    assert old.runbook.version == 1 and old.runbook.description == ""
    assert await code_of(stubs.operator.GetRunbook(pb.GetRunbookRequest(runbook_id="rb", version=9))) == (
        grpc.StatusCode.NOT_FOUND
    )
    # Executions pin the version they started with.
    started = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": 1}))
    )
    assert started.execution.runbook_version == 2

    for i in range(5):
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple(f"extra-{i}")))
    ids: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.operator.ListRunbooks(pb.ListRunbooksRequest(page_size=2, page_token=token))
        ids.extend(r.runbook_id for r in page.runbooks)
        pages += 1
        assert all(r.version == (2 if r.runbook_id == "rb" else 1) for r in page.runbooks)
        token = page.next_page_token
        if not token:
            break
    assert ids == sorted([f"extra-{i}" for i in range(5)] + ["rb"]) and pages == 3

    names: list[str] = []
    token = ""
    while True:
        actions = await stubs.operator.ListActions(pb.ListActionsRequest(page_size=3, page_token=token))
        names.extend(a.name for a in actions.actions)
        token = actions.next_page_token
        if not token:
            break
    assert set(names) == {
        "log",
        "wait",
        "set_variable",
        "publish",
        "agent:switch_power_bus",
        "agent:safe_payload",
        "agent:reduce_heater_duty",
    }
    assert len(names) == len(set(names))
    bad_token = pb.ListActionsRequest(page_token="not-a-token")
    assert await code_of(stubs.operator.ListActions(bad_token)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_big_runbooks_cannot_break_the_runbook_list(server: Any, channel_for: Any, db: Database) -> None:
    # Three 2 MB runbooks were accepted, and from then on every ListRunbooks page (and `aetherops
    # runbooks list`) answered RESOURCE_EXHAUSTED: the page outgrew the 4 MiB message limit.
    stubs = Stubs(channel_for, server.port)
    huge = pb.Runbook(runbook_id="huge", name="Huge", steps=[step("s", "log", {"message": "x" * 300_000})])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=huge))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 262144 bytes as JSON" in violations(err.value)["runbook"]
    assert await db.fetchval("SELECT count(*) FROM runbooks") == 0
    # Twenty that each fit make a default page of 5 MB: pages are cut short by size instead.
    for i in range(20):
        big = pb.Runbook(runbook_id=f"big-{i:02d}", name="Big", steps=[step("s", "log", {"message": "x" * 250_000})])
        big.trigger_conditions.CopyFrom(struct({"subsystems": "power"}))
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=big))
    power = struct({"subsystems": ["power"]})

    async def every(call: Any, make: Any) -> tuple[list[str], int]:
        ids: list[str] = []
        token, pages = "", 0
        while True:
            page = await call(make(token))
            assert page.runbooks
            ids.extend(r.runbook_id for r in page.runbooks)
            pages += 1
            token = page.next_page_token
            if not token:
                return ids, pages

    listed, _ = await every(stubs.operator.ListRunbooks, lambda t: pb.ListRunbooksRequest(page_token=t))
    assert listed == [f"big-{i:02d}" for i in range(20)]
    # So is FindMatchingRunbooks, which answered every match at once (a 5 MB reply: RESOURCE_EXHAUSTED).
    find = stubs.operator.FindMatchingRunbooks
    matched, pages = await every(find, lambda t: pb.FindMatchingRunbooksRequest(incident_data=power, page_token=t))
    assert matched == listed and pages > 1
    sized, pages = await every(
        find, lambda t: pb.FindMatchingRunbooksRequest(incident_data=power, page_size=7, page_token=t)
    )
    assert sized == listed and pages >= 3
    # A token is for the incident data it was issued for.
    first = await find(pb.FindMatchingRunbooksRequest(incident_data=power, page_size=1))
    other = pb.FindMatchingRunbooksRequest(incident_data=struct({"subsystems": ["thermal"]}), page_token="x")
    other.page_token = first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await find(other)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(err.value)) == {"page_token"}


async def test_dry_run_plans_without_storing(server: Any, channel_for: Any, db: Database) -> None:
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple(approval=True)))
    reply = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "SAT-9"}), dry_run=True)
    )
    assert not reply.HasField("execution")
    assert [p.step_id for p in reply.plan] == ["one", "two", "three"]
    assert json_format.MessageToDict(reply.plan[0].rendered_parameters) == {"message": "one SAT-9"}
    assert [p.requires_approval for p in reply.plan] == [False, True, False]
    assert await db.fetchval("SELECT count(*) FROM executions") == 0
    assert await db.fetchval("SELECT count(*) FROM execution_events") == 0


async def test_start_is_idempotent_on_request_id_and_status_reads_as_of(
    server: Any, channel_for: Any, db: Database
) -> None:
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple()))
    request = pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": "S"}), request_id="req-1")
    first, second = await asyncio.gather(stubs.operator.StartExecution(request), stubs.operator.StartExecution(request))
    assert first.execution.execution_id == second.execution.execution_id
    again = await stubs.operator.StartExecution(request)
    assert again.execution.execution_id == first.execution.execution_id
    assert await db.fetchval("SELECT count(*) FROM executions") == 1
    eid = first.execution.execution_id

    step_request = pb.ExecuteNextStepRequest(execution_id=eid, request_id="step-1")
    one = await stubs.operator.ExecuteNextStep(step_request)
    retried = await stubs.operator.ExecuteNextStep(step_request)
    assert one.step_status == retried.step_status == pb.STEP_STATUS_COMPLETED
    assert steps_by_id(retried.execution)["two"].status == pb.STEP_STATUS_PENDING, "a retry does not run a step"
    after_one = one.execution.audit_log[-1].time.ToDatetime(tzinfo=UTC)
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    now = await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=eid))
    assert steps_by_id(now.execution)["two"].status == pb.STEP_STATUS_COMPLETED

    then = await stubs.operator.GetExecutionStatus(
        pb.GetExecutionStatusRequest(execution_id=eid, as_of_time=ts(after_one))
    )
    states = steps_by_id(then.execution)
    assert states["one"].status == pb.STEP_STATUS_COMPLETED and states["two"].status == pb.STEP_STATUS_PENDING
    assert then.execution.version == one.execution.version
    before = ts(first.execution.start_time.ToDatetime(tzinfo=UTC) - timedelta(seconds=1))
    early = pb.GetExecutionStatusRequest(execution_id=eid, as_of_time=before)
    assert await code_of(stubs.operator.GetExecutionStatus(early)) == grpc.StatusCode.NOT_FOUND


async def test_a_retry_racing_the_first_call_gets_its_answer_and_does_nothing_more(
    server: Any, channel_for: Any
) -> None:
    # A client that gave up waiting retries with the same request_id while the first call is still
    # running. The retry checked the request id before waiting for the execution, found nothing yet,
    # then ran the NEXT step (or failed: "not awaiting approval", "already rolled back").
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple(approval=True, wait_s=0.3)))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="rb"))
    eid = started.execution.execution_id

    step_request = pb.ExecuteNextStepRequest(execution_id=eid, request_id="step-1")
    answers = await asyncio.gather(*(stubs.operator.ExecuteNextStep(step_request) for _ in range(3)))
    assert {a.step_status for a in answers} == {pb.STEP_STATUS_COMPLETED}
    now = (await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=eid))).execution
    assert [s.status for s in now.steps] == [pb.STEP_STATUS_COMPLETED, pb.STEP_STATUS_PENDING, pb.STEP_STATUS_PENDING]

    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))  # the gate
    approve = pb.ApproveStepRequest(execution_id=eid, step_id="two", request_id="approve-1")
    approvals = await asyncio.gather(*(stubs.approver.ApproveStep(approve) for _ in range(3)))
    assert {steps_by_id(a.execution)["two"].approved_by for a in approvals} == {"approver"}

    rollback = pb.RollbackExecutionRequest(execution_id=eid, request_id="rollback-1")
    rollbacks = await asyncio.gather(*(stubs.operator.RollbackExecution(rollback) for _ in range(3)))
    assert {r.execution.status for r in rollbacks} == {pb.RUNBOOK_STATUS_ROLLED_BACK}

    # CancelExecution the same: racing retries all get the first call's answer, none "not running".
    other = (await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="rb"))).execution.execution_id
    cancel = pb.CancelExecutionRequest(execution_id=other, request_id="cancel-1")
    cancels = await asyncio.gather(*(stubs.operator.CancelExecution(cancel) for _ in range(3)))
    assert {c.execution.status for c in cancels} == {pb.RUNBOOK_STATUS_CANCELLED}

    # RegisterRunbook: a racing retry said created=false (it found the first call's version).
    changed = simple("rb")
    changed.description = "v2"
    register = pb.RegisterRunbookRequest(runbook=changed, request_id="register-1")
    registered = await asyncio.gather(*(stubs.admin.RegisterRunbook(register) for _ in range(4)))
    assert {(r.runbook.version, r.created) for r in registered} == {(2, True)}


async def test_a_request_id_reused_for_another_target_is_another_request(
    server: Any, channel_for: Any, db: Database
) -> None:
    # Idempotency records used to be global: the same request id for another runbook, another
    # caller or another step answered as a retry of the first request, and did nothing.
    stubs = Stubs(channel_for, server.port)
    alpha = await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple("rb-alpha"), request_id="reg-1"))
    beta = await stubs.admin.RegisterRunbook(
        pb.RegisterRunbookRequest(runbook=simple("rb-beta", approval=True), request_id="reg-1")
    )
    assert (alpha.runbook.runbook_id, beta.runbook.runbook_id) == ("rb-alpha", "rb-beta") and beta.created

    sat = struct({"sat": "SAT-1"})
    first = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb-alpha", variables=sat, request_id="start-1")
    )
    other_runbook = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb-beta", variables=sat, request_id="start-1")
    )
    other_caller = await stubs.admin.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb-alpha", variables=sat, request_id="start-1")
    )
    assert other_runbook.execution.runbook_id == "rb-beta"
    ids = {first.execution.execution_id, other_runbook.execution.execution_id, other_caller.execution.execution_id}
    assert len(ids) == 3 and await db.fetchval("SELECT count(*) FROM executions") == 3

    # Two gates in one execution, approved with one request id: both are approved.
    gates = pb.Runbook(
        runbook_id="rb-gates",
        name="Two gates",
        steps=[step("g1", "log", {"message": "1"}, approval=True), step("g2", "log", {"message": "2"}, approval=True)],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=gates))
    eid = (await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="rb-gates"))).execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    await stubs.approver.ApproveStep(pb.ApproveStepRequest(execution_id=eid, step_id="g1", request_id="ap-1"))
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    gate2 = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    assert gate2.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    approved = await stubs.approver.ApproveStep(
        pb.ApproveStepRequest(execution_id=eid, step_id="g2", request_id="ap-1")
    )
    assert steps_by_id(approved.execution)["g2"].approved_by == "approver"


async def test_two_servers_cannot_both_advance_one_execution(app_factory: Any, channel_for: Any) -> None:
    a, b = await app_factory(), await app_factory()
    on_a, on_b = Stubs(channel_for, a.port), Stubs(channel_for, b.port)
    await on_a.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple(wait_s=0.5)))
    started = await on_a.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": 1}))
    )
    eid = started.execution.execution_id
    request = pb.ExecuteNextStepRequest(execution_id=eid)
    results = await asyncio.gather(
        on_a.operator.ExecuteNextStep(request), on_b.operator.ExecuteNextStep(request), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, pb.ExecuteNextStepResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 1, results
    assert failed[0].code() == grpc.StatusCode.ABORTED
    status = (await on_b.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=eid))).execution
    states = steps_by_id(status)
    assert states["one"].status == pb.STEP_STATUS_COMPLETED and states["one"].attempts == 1
    assert states["two"].status == pb.STEP_STATUS_PENDING
    assert [e.transition for e in status.audit_log].count("STEP_STARTED") == 1

    # Afterwards either server carries on from the committed state.
    loser = on_b if failed[0] is results[1] else on_a
    winner = on_a if loser is on_b else on_b
    two = await loser.operator.ExecuteNextStep(request)
    assert two.step_status == pb.STEP_STATUS_COMPLETED and steps_by_id(two.execution)["two"].attempts == 1
    three = await winner.operator.ExecuteNextStep(request)
    assert three.execution.status == pb.RUNBOOK_STATUS_COMPLETED
    assert [e.seq for e in three.execution.audit_log] == list(range(1, three.execution.version + 1))


async def handled_at_least(component: Any, count: int) -> None:
    """Poll (bounded) the server's incident consumer: it lives in another task and acks asynchronously."""

    async def handled() -> bool:
        return component.consumer is not None and component.consumer.handled >= count

    await eventually(handled, timeout_s=10, what=f"{count} incident events handled")


def incident_event(cluster_id: str, event_id: str) -> bytes:
    event = events_pb2.Event(event_id=event_id, type="incidents.opened", source_service="correlation")
    event.aggregate_id = cluster_id
    event.incident_opened.incident.CopyFrom(
        events_pb2.Incident(
            cluster_id=cluster_id,
            satellite_ids=["SAT-1"],
            subsystems=["power", "thermal"],
            max_severity=5,
            root_cause_alert_id="a1",
            root_cause_subsystem="power",
            root_cause_satellite_id="SAT-1",
            alert_count=2,
        )
    )
    return bytes(event.SerializeToString())


async def test_an_auto_start_runbook_needing_what_no_incident_gives_is_refused(
    server: Any, channel_for: Any, db: Database
) -> None:
    # An incident start has only the incident's fields: "${bus}" failed every start, and the operator
    # learnt of it from a warning in the server's log, if at all.
    stubs = Stubs(channel_for, server.port)
    needy = pb.Runbook(
        runbook_id="needy",
        name="Needy",
        auto_start=True,
        trigger_conditions=struct({"subsystems": "power"}),
        steps=[
            step("set", "set_variable", {"name": "target", "value": "${root_cause_satellite_id}"}),
            step("use", "log", {"message": "${target} on ${subsystems.0}, bus ${bus}"}),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=needy))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert list(found) == ["runbook.steps[1].parameters"], found
    assert "${bus}" in found["runbook.steps[1].parameters"]
    assert await db.fetchval("SELECT count(*) FROM runbooks") == 0
    # Started by hand, the same steps may use a variable the caller gives.
    needy.auto_start = False
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=needy))


async def test_incident_delivered_twice_starts_once(server: Any, channel_for: Any, bus: Bus, db: Database) -> None:
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(
        runbook_id="auto",
        name="Auto",
        auto_start=True,
        trigger_conditions=struct({"$or": [{"root_cause_subsystem": "power"}, {"max_severity": {"$gte": 5}}]}),
        steps=[step("log", "log", {"message": "on ${root_cause_satellite_id}"})],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    component = next(c for c in server.components if c.name == "runbook")
    # Two deliveries with different message ids, as a re-publication after a crash would be.
    for n in range(2):
        await bus.js.publish(
            bus.subjects.incidents("opened"), incident_event("cluster-x", f"e{n}"), headers={"Nats-Msg-Id": f"e{n}"}
        )
    await handled_at_least(component, 2)
    eid = incident_execution_id("cluster-x", "auto")
    done = await wait_status(stubs.operator, eid, lambda e: e.status == pb.RUNBOOK_STATUS_COMPLETED)
    assert done.triggered_by == "incident:cluster-x"
    assert json_format.MessageToDict(done.variables)["subsystems"] == ["power", "thermal"]
    assert await db.fetchval("SELECT count(*) FROM executions") == 1
    assert await db.fetchval("SELECT incident_id FROM executions") == "cluster-x"
    # A delivery after the execution finished (and left memory) starts nothing either.
    await bus.js.publish(
        bus.subjects.incidents("opened"), incident_event("cluster-x", "e3"), headers={"Nats-Msg-Id": "e3"}
    )
    await handled_at_least(component, 3)
    assert await db.fetchval("SELECT count(*) FROM executions") == 1
    assert await db.fetchval("SELECT count(*) FROM execution_events WHERE execution_id = $1", eid) == done.version


async def test_an_incident_starts_a_runbook_that_uses_what_its_agent_returned(
    server: Any, channel_for: Any, bus: Bus
) -> None:
    """The incident gives only its own fields; the rollback switches back to the bus the agent reported."""
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(
        runbook_id="auto",
        name="Auto",
        auto_start=True,
        trigger_conditions=struct({"root_cause_subsystem": "power"}),
        steps=[
            step(
                "switch",
                "agent:switch_power_bus",
                {"satellite": "${root_cause_satellite_id}"},
                rollback="log",
                rollback_params={"message": "switch ${root_cause_satellite_id} back to ${previous_bus}"},
            ),
            step("note", "log", {"message": "was on ${previous_bus}"}),
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))

    async def on_request(msg: Any) -> None:
        reply = events_pb2.AgentActionReply(ok=True, output=struct({"previous_bus": "A"}))
        await msg.respond(json_format.MessageToJson(reply).encode())

    sub = await bus.nc.subscribe(bus.subjects.action("switch_power_bus"), cb=on_request)
    try:
        await bus.js.publish(
            bus.subjects.incidents("opened"), incident_event("c-1", "e1"), headers={"Nats-Msg-Id": "e1"}
        )
        eid = incident_execution_id("c-1", "auto")
        done = await wait_status(stubs.operator, eid, lambda e: e.status == pb.RUNBOOK_STATUS_COMPLETED)
    finally:
        await sub.unsubscribe()
    assert [a.detail for a in done.audit_log if a.transition == "ACTION_LOGGED"] == ["was on A"]
    rolled = await stubs.operator.RollbackExecution(pb.RollbackExecutionRequest(execution_id=eid))
    assert rolled.rolled_back_count == 1
    logged = [a.detail for a in rolled.execution.audit_log if a.transition == "ACTION_LOGGED"]
    assert logged[-1] == "switch SAT-1 back to A"


async def test_updates_published_before_the_updates_consumer_existed_are_not_replayed(
    app_factory: Any, channel_for: Any, bus: Bus, db: Database
) -> None:
    """The updates consumer joined a running deployment: a month of old incidents' updates in the stream
    must not start runbooks registered since (as the incidents stream's history would on a new durable)."""

    def updated(cluster_id: str) -> bytes:
        event = events_pb2.Event()
        event.ParseFromString(incident_event(cluster_id, f"u-{cluster_id}"))
        incident = events_pb2.Incident()
        incident.CopyFrom(event.incident_opened.incident)
        event.type = "incidents.updated"
        event.incident_updated.incident.CopyFrom(incident)
        return bytes(event.SerializeToString())

    await bus.js.publish(bus.subjects.incidents("updated"), updated("old"), headers={"Nats-Msg-Id": "u-old"})
    server = await app_factory()
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(
        runbook_id="auto",
        name="Auto",
        auto_start=True,
        trigger_conditions=struct({"root_cause_subsystem": "power"}),
        steps=[step("log", "log", {"message": "on ${root_cause_satellite_id}"})],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    await bus.js.publish(bus.subjects.incidents("updated"), updated("new"), headers={"Nats-Msg-Id": "u-new"})
    await wait_status(
        stubs.operator, incident_execution_id("new", "auto"), lambda e: e.status == pb.RUNBOOK_STATUS_COMPLETED
    )
    component = next(c for c in server.components if c.name == "runbook")
    assert component.update_consumer.handled == 1
    assert await db.fetchval("SELECT array_agg(incident_id) FROM executions") == ["new"]


async def test_events_of_an_older_schema_are_upcast(server: Any, channel_for: Any, db: Database) -> None:
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple()))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    # As the first writer stored them: schema_version 1, lower-case kinds, "step" instead of "step_id".
    v1 = [
        (
            1,
            "execution_started",
            "bob",
            {"runbook_id": "rb", "runbook_version": 1, "triggered_by": "bob", "variables": {"sat": "S"}},
        ),
        (2, "step_started", "bob", {"step": "one", "action": "log", "attempt": 1}),
        (3, "step_completed", "bob", {"step": "one", "output": {}}),
    ]
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO executions (execution_id, runbook_id, runbook_version, triggered_by, status, version,
                   started_time, updated_time) VALUES ('old', 'rb', 1, 'bob', 'RUNNING', 3, $1, $1)""",
            t0,
        )
        for seq, kind, by, data in v1:
            await conn.execute(
                """INSERT INTO execution_events (execution_id, seq, type, occurred_time, actor, data, schema_version)
                   VALUES ('old', $1, $2, $3, $4, $5, 1)""",
                seq,
                kind,
                t0 + timedelta(seconds=seq),
                by,
                data,
            )
    status = (await stubs.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id="old"))).execution
    assert steps_by_id(status)["one"].status == pb.STEP_STATUS_COMPLETED
    assert [e.transition for e in status.audit_log] == ["EXECUTION_STARTED", "STEP_STARTED", "STEP_COMPLETED"]
    # And the execution carries on, new events written in the current schema.
    nxt = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id="old"))
    assert nxt.step_status == pb.STEP_STATUS_COMPLETED
    assert await db.fetchval("SELECT min(schema_version) FROM execution_events WHERE seq > 3") == 2


async def test_approval_expires(server: Any, channel_for: Any) -> None:
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(
        runbook_id="expiring",
        name="Expiring",
        steps=[
            pb.RunbookStep(
                step_id="gate",
                action="log",
                parameters=struct({"message": "x"}),
                requires_approval=True,
                approval_timeout=duration_pb2.Duration(nanos=300_000_000),
            )
        ],
    )
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="expiring"))
    eid = started.execution.execution_id
    gate = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    assert gate.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    assert steps_by_id(gate.execution)["gate"].HasField("approval_expire_time")
    # Nobody approves: the ticker fails it.
    failed = await wait_status(stubs.operator, eid, lambda e: e.status != pb.RUNBOOK_STATUS_RUNNING, timeout_s=5)
    assert failed.status == pb.RUNBOOK_STATUS_FAILED and "expired" in failed.error
    assert "APPROVAL_EXPIRED" in [a.transition for a in failed.audit_log]
    # No request expired it: the ticker's transitions carry the execution's own tracking id.
    expired = [a for a in failed.audit_log if a.seq > gate.execution.version]
    assert expired and {a.tracking_id for a in expired} == {started.execution.tracking_id}
    assert started.execution.tracking_id
    late = pb.ApproveStepRequest(execution_id=eid, step_id="gate")
    assert await code_of(stubs.approver.ApproveStep(late)) == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_approver_rejects_a_gated_step_and_the_execution_fails(
    server: Any, channel_for: Any, db: Database
) -> None:
    stubs = Stubs(channel_for, server.port)
    viewer = runbook_pb2_grpc.RunbookServiceStub(channel_for("viewer", server.port))
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple("gated", approval=True)))
    started = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="gated", variables=struct({"sat": "S"}))
    )
    eid = started.execution.execution_id
    await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    gate = await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    assert gate.step_status == pb.STEP_STATUS_AWAITING_APPROVAL

    request = pb.RejectStepRequest(execution_id=eid, step_id="two", reason="bus B is in eclipse", request_id="no-1")
    assert await code_of(viewer.RejectStep(request)) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(stubs.operator.RejectStep(request)) == grpc.StatusCode.PERMISSION_DENIED
    too_long = pb.RejectStepRequest(execution_id=eid, step_id="two", reason="x" * 4097)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.approver.RejectStep(too_long)
    assert set(violations(err.value)) == {"reason"}
    unknown = pb.RejectStepRequest(execution_id="nope", step_id="two")
    assert await code_of(stubs.approver.RejectStep(unknown)) == grpc.StatusCode.NOT_FOUND

    rejected = (await stubs.approver.RejectStep(request)).execution
    reason = "approval for step two rejected by approver: bus B is in eclipse"
    assert rejected.status == pb.RUNBOOK_STATUS_FAILED and rejected.error == reason
    assert steps_by_id(rejected)["two"].status == pb.STEP_STATUS_FAILED
    assert steps_by_id(rejected)["three"].status == pb.STEP_STATUS_SKIPPED
    entry = next(a for a in rejected.audit_log if a.transition == "APPROVAL_REJECTED")
    assert (entry.actor, entry.step_id, entry.detail) == ("approver", "two", reason)
    # A retry answers as the first call did; another rejection finds nothing to decide.
    again = (await stubs.approver.RejectStep(request)).execution
    assert again.version == rejected.version and again.status == pb.RUNBOOK_STATUS_FAILED
    other = pb.RejectStepRequest(execution_id=eid, step_id="two")
    assert await code_of(stubs.approver.RejectStep(other)) == grpc.StatusCode.FAILED_PRECONDITION
    approve = pb.ApproveStepRequest(execution_id=eid, step_id="two")
    assert await code_of(stubs.approver.ApproveStep(approve)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await db.fetchval("SELECT status FROM executions WHERE execution_id = $1", eid) == "FAILED"


async def test_the_ticker_never_runs_a_step_approved_on_another_server(app_factory: Any, channel_for: Any) -> None:
    a, b = await app_factory(), await app_factory()
    on_a, on_b = Stubs(channel_for, a.port), Stubs(channel_for, b.port)
    runbook = simple("gated", approval=True)
    runbook.steps[1].approval_timeout.FromSeconds(2)
    await on_a.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    ids = []
    for _ in range(2):
        started = await on_a.operator.StartExecution(
            pb.StartExecutionRequest(runbook_id="gated", variables=struct({"sat": 1}))
        )
        eid = started.execution.execution_id
        ids.append(eid)
        one = await on_a.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
        assert one.step_status == pb.STEP_STATUS_COMPLETED
        gate = await on_a.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
        assert gate.step_status == pb.STEP_STATUS_AWAITING_APPROVAL
    approved_id, witness_id = ids
    # Approved on b while a still watches the gate.
    approved = await on_b.approver.ApproveStep(pb.ApproveStepRequest(execution_id=approved_id, step_id="two"))

    # a's ticker looks at its gates in the order they were requested, and the approved one expires
    # first: once the ticker has failed the witness, it has been past the approved one too.
    witness = await wait_status(on_a.operator, witness_id, lambda e: e.status != pb.RUNBOOK_STATUS_RUNNING)
    assert witness.status == pb.RUNBOOK_STATUS_FAILED and "expired" in witness.error
    status = (await on_a.operator.GetExecutionStatus(pb.GetExecutionStatusRequest(execution_id=approved_id))).execution
    assert status.version == approved.execution.version, [e.transition for e in status.audit_log]
    assert steps_by_id(status)["two"].status == pb.STEP_STATUS_PENDING
    # The approved step runs when someone asks for it, on either server.
    two = await on_a.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=approved_id))
    assert two.step_status == pb.STEP_STATUS_COMPLETED
    assert [e.actor for e in two.execution.audit_log if e.transition == "STEP_STARTED"][-1] == "operator"


async def test_watch_streams_every_transition_until_finished(server: Any, channel_for: Any) -> None:
    stubs = Stubs(channel_for, server.port)
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=simple()))
    started = await stubs.operator.StartExecution(
        pb.StartExecutionRequest(runbook_id="rb", variables=struct({"sat": 1}))
    )
    eid = started.execution.execution_id
    seen: list[tuple[str, int]] = []
    first = asyncio.Event()

    async def watch() -> None:
        async for update in stubs.operator.WatchExecution(pb.WatchExecutionRequest(execution_id=eid)):
            seen.append((update.transition, update.execution.version))
            first.set()

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(first.wait(), 5)
    for _ in range(3):
        await stubs.operator.ExecuteNextStep(pb.ExecuteNextStepRequest(execution_id=eid))
    await asyncio.wait_for(watcher, 10)
    assert seen[0] == ("EXECUTION_STARTED", 1)
    assert [v for _, v in seen] == list(range(1, len(seen) + 1)), "one update per transition, in order"
    assert seen[-1][0] == "EXECUTION_FINISHED"


async def test_agent_breaker_opens_and_fails_fast(server: Any, channel_for: Any) -> None:
    stubs = Stubs(channel_for, server.port)
    runbook = pb.Runbook(runbook_id="agent", name="Agent", steps=[step("call", "agent:safe_payload", timeout_s=2)])
    await stubs.admin.RegisterRunbook(pb.RegisterRunbookRequest(runbook=runbook))
    errors = []
    for _ in range(6):  # nobody listens: five failures open the breaker
        started = await stubs.operator.StartExecution(pb.StartExecutionRequest(runbook_id="agent"))
        reply = await stubs.operator.ExecuteNextStep(
            pb.ExecuteNextStepRequest(execution_id=started.execution.execution_id)
        )
        assert reply.step_status == pb.STEP_STATUS_FAILED
        errors.append(steps_by_id(reply.execution)["call"].error)
    assert all("no agent is listening" in e for e in errors[:5]), errors
    assert "circuit breaker" in errors[5] and "is open" in errors[5], errors[5]


async def test_announcement_with_a_bad_body_is_ignored(server: Any, channel_for: Any, bus: Bus) -> None:
    stubs = Stubs(channel_for, server.port)
    await bus.nc.publish(bus.subjects.action("_announce"), b"not json")
    await bus.nc.publish(bus.subjects.action("_announce"), json.dumps({"name": "late_agent"}).encode())

    async def announced() -> bool:
        names = [a.name for a in (await stubs.operator.ListActions(pb.ListActionsRequest())).actions]
        return "agent:late_agent" in names

    await eventually(announced, timeout_s=5, what="agent:late_agent announced")
