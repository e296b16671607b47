"""Unit tests for the event-sourced runbook engine (aetherops/runbook.py).

Deterministic: time comes from a ManualClock, ids from a counter, and tasks that must be "in the middle of
a step" wait on asyncio.Events (bounded with asyncio.wait_for), never on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aetherops.clock import ManualClock
from aetherops.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from aetherops.runbook import (
    ActionContext,
    ActionKind,
    EventType,
    ExecutionEvent,
    Runbook,
    RunbookEngine,
    RunbookStatus,
    RunbookStep,
    StepStatus,
    builtin_actions,
    event_from_dict,
    event_to_dict,
    project,
    render_parameters,
    runbook_from_dict,
    runbook_to_dict,
    upcast,
    validate_runbook,
    variable_references,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BOUND_S = 2.0  # upper bound for waiting on an event another task sets


class Recorder:
    """Custom actions that record their calls (with parameters) in one shared list, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.contexts: list[ActionContext] = []

    def action(self, name: str, output: dict[str, Any] | None = None, error: Exception | None = None) -> Any:
        async def handler(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any] | None:
            self.calls.append((name, params))
            self.contexts.append(ctx)
            if error is not None:
                raise error
            return output

        return handler

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def make_engine(clock: ManualClock, rec: Recorder) -> RunbookEngine:
    counter = itertools.count(1)
    engine = RunbookEngine(clock, id_factory=lambda: f"exec-{next(counter)}")
    for name in ("safe_payload", "switch_bus", "reduce_heater", "undo_safe", "undo_switch", "undo_heater"):
        engine.register_action(name, rec.action(name), idempotent=name.startswith("undo"))
    engine.register_action("boom", rec.action("boom", error=RuntimeError("bus controller rejected command")))
    engine.register_action("undo_boom", rec.action("undo_boom", error=RuntimeError("cannot undo")))
    engine.register_action("measure", rec.action("measure", output={"bus_voltage": 27.5, "bus": "B"}))
    return engine


@pytest.fixture
def engine(clock: ManualClock, rec: Recorder) -> RunbookEngine:
    return make_engine(clock, rec)


def three_steps(**changes: Any) -> Runbook:
    fields: dict[str, Any] = {
        "runbook_id": "power-anomaly",
        "name": "Power anomaly",
        "description": "Safe the payload, switch bus, reduce heaters",
        "steps": [
            RunbookStep("safe", "safe_payload", {"sat": "${satellite_id}"}, rollback_action="undo_safe"),
            RunbookStep(
                "switch", "switch_bus", {"to": "B"}, rollback_action="undo_switch", rollback_parameters={"to": "A"}
            ),
            RunbookStep("heater", "reduce_heater", {"duty": 0.4}, rollback_action="undo_heater"),
        ],
        "trigger_conditions": {"subsystems": "power", "max_severity": {"$gte": 4}},
        "auto_start": True,
    }
    fields.update(changes)
    return Runbook(**fields)


async def run_to_end(engine: RunbookEngine, execution_id: str) -> list[StepStatus]:
    statuses = []
    while engine.get_execution_status(execution_id).status is RunbookStatus.RUNNING:
        statuses.append(await engine.execute_next_step(execution_id))
        if statuses[-1] is StepStatus.AWAITING_APPROVAL:
            break
    return statuses


def transitions(engine: RunbookEngine, execution_id: str) -> list[tuple[str, str]]:
    return [(e.transition, e.step_id) for e in engine.get_execution_status(execution_id).audit_log]


# --- registration -----------------------------------------------------------------------------------


def test_register_and_retrieve_runbook(engine: RunbookEngine, clock: ManualClock) -> None:
    stored = engine.register_runbook(three_steps())
    assert stored.version == 1
    assert stored.create_time == T0
    assert isinstance(stored.steps, tuple)
    assert engine.get_runbook("power-anomaly") == stored
    assert engine.get_runbook("power-anomaly", 1) == stored
    assert engine.get_runbook("power-anomaly", 0) == stored
    assert engine.list_runbooks() == [stored]
    assert stored.step("switch").action == "switch_bus"
    with pytest.raises(NotFoundError):
        stored.step("nope")
    with pytest.raises(NotFoundError):
        engine.get_runbook("unknown")
    with pytest.raises(NotFoundError):
        engine.get_runbook("power-anomaly", 2)


def test_registered_definition_is_a_copy(engine: RunbookEngine) -> None:
    params: dict[str, Any] = {"to": "B"}
    stored = engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "switch_bus", params)]))
    params["to"] = "C"
    assert stored.steps[0].parameters == {"to": "B"}
    assert engine.get_runbook("r").steps[0].parameters == {"to": "B"}


def test_versioning_new_definition_creates_version_identical_is_idempotent(
    engine: RunbookEngine, clock: ManualClock
) -> None:
    v1, created = engine.register_runbook_ex(three_steps())
    assert created
    clock.advance(10)
    again, created_again = engine.register_runbook_ex(three_steps())
    assert (again, created_again) == (v1, False)
    assert again.create_time == T0  # unchanged: nothing new was stored
    v2 = engine.register_runbook(three_steps(description="changed"))
    assert v2.version == 2
    assert v2.create_time == T0 + timedelta(seconds=10)
    assert engine.get_runbook("power-anomaly") == v2
    assert engine.get_runbook("power-anomaly", 1) == v1
    assert engine.list_runbooks() == [v2]
    # Going back to the v1 definition is a change relative to the latest, so it is v3.
    assert engine.register_runbook(three_steps()).version == 3


async def test_executions_pin_the_version_they_started_with(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(three_steps())
    ctx = engine.start_execution("power-anomaly", "alice", {"satellite_id": "SAT-1"})
    engine.register_runbook(three_steps(steps=[RunbookStep("only", "measure")]))
    assert ctx.runbook_version == 1
    await run_to_end(engine, ctx.execution_id)
    assert rec.names() == ["safe_payload", "switch_bus", "reduce_heater"]
    later = engine.start_execution("power-anomaly", "alice", {})
    assert later.runbook_version == 2
    assert list(later.step_states) == ["only"]
    older = engine.start_execution("power-anomaly", "alice", {"satellite_id": "SAT-1"}, version=1)
    assert older.runbook_version == 1


def test_register_action_rejects_non_async_handlers_and_bad_names(engine: RunbookEngine) -> None:
    def sync_handler(params: dict[str, Any], ctx: ActionContext) -> None:
        return None

    with pytest.raises(ValidationError) as caught:
        engine.register_action("sync", sync_handler)  # type: ignore[arg-type]
    assert [v.field for v in caught.value.violations] == ["handler"]
    with pytest.raises(ValidationError) as caught:
        engine.register_action("agent:x", lambda p, c: None)  # type: ignore[arg-type,return-value]
    assert [v.field for v in caught.value.violations] == ["action_name", "handler"]  # both at once
    with pytest.raises(AlreadyExistsError):
        engine.register_action("log", Recorder().action("log"))

    class AsyncCallable:
        async def __call__(self, params: dict[str, Any], ctx: ActionContext) -> None:
            return None

    info = engine.register_action("callable_obj", AsyncCallable(), description="obj")
    assert info.kind is ActionKind.CUSTOM and not info.idempotent


def test_list_actions_shows_builtin_custom_and_agent_actions(engine: RunbookEngine) -> None:
    engine.declare_agent_action("switch_power_bus", description="on the ground agent", idempotent=True)
    actions = {a.name: a for a in engine.list_actions()}
    assert {"log", "wait", "set_variable"} <= actions.keys()
    assert actions["log"].kind is ActionKind.BUILTIN and actions["log"].idempotent
    assert actions["safe_payload"].kind is ActionKind.CUSTOM
    agent = actions["agent:switch_power_bus"]
    assert agent.kind is ActionKind.AGENT and agent.idempotent and agent.description == "on the ground agent"
    names = [a.name for a in engine.list_actions()]
    assert names[:3] == ["log", "set_variable", "wait"]  # built-ins first, then by name
    with pytest.raises(AlreadyExistsError):
        engine.declare_agent_action("switch_power_bus")
    with pytest.raises(ValidationError):
        engine.declare_agent_action("bad name")
    for description in ("x" * 1025, "nul\x00"):  # announced over NATS by the agent itself
        with pytest.raises(ValidationError) as caught:
            engine.declare_agent_action("chatty", description=description)
        assert caught.value.violations[0].field == "description"
    assert [a.name for a in builtin_actions()] == ["log", "wait", "set_variable"]
    bare = RunbookEngine(register_builtins=False)
    assert bare.list_actions() == []


def test_validation_reports_every_problem_at_once(engine: RunbookEngine) -> None:
    bad = Runbook(
        runbook_id="bad id!",
        name=" ",
        steps=[
            RunbookStep("a", "safe_payload", timeout_s=0),
            RunbookStep("a", "nope", timeout_s=-1, rollback_action="also_nope"),
            RunbookStep("c", "switch_bus", timeout_s=float("inf"), rollback_parameters={"x": 1}),
            RunbookStep("d", "switch_bus", approval_timeout_s=5),
            RunbookStep("e", "switch_bus", requires_approval=True, approval_timeout_s=-5, parameters={"x": object()}),
            RunbookStep("", "", rollback_action="", timeout_s=float("nan")),
        ],
        trigger_conditions={"$foo": 1, "sev": {"$gte": 4, "$bogus": 1}},
        status=RunbookStatus.RUNNING,
    )
    with pytest.raises(ValidationError) as caught:
        engine.register_runbook(bad)
    fields = [v.field for v in caught.value.violations]
    assert fields == [
        "runbook.runbook_id",
        "runbook.name",
        "runbook.status",
        "runbook.steps[0].timeout",
        "runbook.steps[1].step_id",
        "runbook.steps[1].action",
        "runbook.steps[1].timeout",
        "runbook.steps[1].rollback_action",
        "runbook.steps[2].timeout",
        "runbook.steps[2].rollback_parameters",
        "runbook.steps[3].approval_timeout",
        "runbook.steps[4].approval_timeout",
        "runbook.steps[4].parameters.x",
        "runbook.steps[5].step_id",
        "runbook.steps[5].action",
        "runbook.steps[5].timeout",
        "runbook.steps[5].rollback_action",
        "runbook.trigger_conditions.$foo",
        "runbook.trigger_conditions.sev.$bogus",
    ]
    assert "duplicate step id 'a'" in caught.value.violations[4].description
    assert "unknown action 'nope'" in caught.value.violations[5].description
    with pytest.raises(NotFoundError):
        engine.get_runbook("bad id!")


def test_validate_runbook_catches_missing_steps_duplicates_and_bad_timeouts() -> None:
    assert validate_runbook(Runbook("r", "R", [])) == ["runbook.steps: at least one step is required"]
    problems = validate_runbook(
        Runbook("r", "R", [RunbookStep("s", "x", timeout_s=0), RunbookStep("s", "y", rollback_action="z")]),
        known_actions={"x", "y"},
    )
    assert problems == [
        "runbook.steps[0].timeout: must be a positive number of seconds, not 0",
        "runbook.steps[1].step_id: duplicate step id 's' (also steps[0])",
        "runbook.steps[1].rollback_action: unknown action 'z'",
    ]
    # Without known_actions only the structure is checked.
    assert validate_runbook(Runbook("r", "R", [RunbookStep("s", "anything")])) == []
    assert validate_runbook(Runbook("r", "R", [RunbookStep("s", "x")], auto_start=True)) == [
        "runbook.trigger_conditions: auto_start needs trigger conditions"
    ]
    assert validate_runbook(Runbook("r", "R", [RunbookStep("s", "x", parameters=[1])])) == [  # type: ignore[arg-type]
        "runbook.steps[0].parameters: must be an object"
    ]


# --- starting, rendering, planning ---------------------------------------------------------------------


def test_start_creates_the_context(engine: RunbookEngine) -> None:
    engine.register_runbook(three_steps())
    ctx = engine.start_execution("power-anomaly", "alice", {"satellite_id": "SAT-1"})
    assert ctx.execution_id == "exec-1"
    assert ctx.runbook_id == "power-anomaly" and ctx.runbook_version == 1
    assert ctx.triggered_by == "alice"
    assert ctx.status is RunbookStatus.RUNNING and not ctx.finished
    assert ctx.current_step_index == 0
    assert [s.status for s in ctx.step_states.values()] == [StepStatus.PENDING] * 3
    assert ctx.variables == {"satellite_id": "SAT-1"}
    assert ctx.started_time == T0 and ctx.finished_time is None and ctx.error is None
    assert ctx.version == 1 == engine.version("exec-1")
    assert [(a.transition, a.actor, a.time, a.seq) for a in ctx.audit_log] == [("EXECUTION_STARTED", "alice", T0, 1)]
    assert engine.get_execution_status("exec-1") == ctx
    assert engine.list_executions() == [ctx]
    assert engine.list_executions(RunbookStatus.COMPLETED) == []


def test_start_validation(engine: RunbookEngine) -> None:
    engine.register_runbook(three_steps())
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("power-anomaly", " ", {}, execution_id="bad id")
    assert [v.field for v in caught.value.violations] == ["triggered_by", "execution_id", "variables.satellite_id"]
    assert "steps[0].parameters" in caught.value.violations[2].description
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("power-anomaly", "alice", {"satellite_id": float("nan")})
    assert [v.field for v in caught.value.violations] == ["variables.satellite_id"]
    with pytest.raises(ValidationError):
        engine.start_execution("power-anomaly", "alice", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        engine.start_execution("unknown", "alice", {})
    engine.start_execution("power-anomaly", "incident:c-1", {"satellite_id": "S"}, execution_id="inc-c-1")
    with pytest.raises(AlreadyExistsError):
        engine.start_execution("power-anomaly", "incident:c-1", {"satellite_id": "S"}, execution_id="inc-c-1")
    with pytest.raises(NotFoundError):
        engine.get_execution_status("nope")


def test_missing_rollback_parameter_variable_fails_the_start(engine: RunbookEngine) -> None:
    # A log step sets no variable: nothing can ever provide ${gone}.
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep(
                    "s", "log", {"message": "m"}, rollback_action="undo_safe", rollback_parameters={"x": "${gone}"}
                )
            ],
        )
    )
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("r", "alice", {})
    assert caught.value.violations[0].field == "variables.gone"


async def test_a_variable_an_earlier_step_sets_need_not_be_given_at_start(engine: RunbookEngine, rec: Recorder) -> None:
    """An incident start gives only the incident's fields: a step using what an earlier step returned (the
    bus an agent switched from, for the rollback to switch back) must not stop the start."""
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("mode", "set_variable", {"name": "mode", "value": {"bus": "A"}}),
                RunbookStep(
                    "switch",
                    "switch_bus",
                    {"from": "${mode.bus}"},
                    rollback_action="undo_switch",
                    rollback_parameters={"to": "${mode.bus}"},
                ),
                RunbookStep("measure", "measure", rollback_action="undo_safe", rollback_parameters={"v": "${bus}"}),
                RunbookStep("report", "safe_payload", {"voltage": "${bus_voltage} V"}),
            ],
        )
    )
    plan = engine.plan_execution("r", {})
    assert plan[1].parameters == {"from": "${mode.bus}"} and plan[3].parameters == {"voltage": "${bus_voltage} V"}
    ctx = engine.start_execution("r", "incident:c-1", {})
    assert await run_to_end(engine, ctx.execution_id) == [StepStatus.COMPLETED] * 4
    assert rec.calls[-1] == ("safe_payload", {"voltage": "27.5 V"})
    assert await engine.rollback_execution(ctx.execution_id) == 2
    assert ("undo_safe", {"v": "B"}) in rec.calls and ("undo_switch", {"to": "A"}) in rec.calls


def test_a_variable_only_a_later_step_sets_fails_the_start(engine: RunbookEngine) -> None:
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("use", "log", {"message": "${mode}"}),
                RunbookStep("mode", "set_variable", {"name": "mode", "value": 1}),
                RunbookStep("other", "log", {"message": "${other}"}),
            ],
        )
    )
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("r", "alice", {})
    assert [v.field for v in caught.value.violations] == ["variables.mode", "variables.other"]


def test_render_parameters() -> None:
    variables = {"sat": "SAT-1", "n": 3, "incident": {"severity": 5, "subsystems": ["power"]}, "flag": True}
    rendered = render_parameters(
        {
            "typed": "${n}",
            "nested": {"list": ["${sat}", "x-${n}", {"deep": "${incident.severity}"}]},
            "embedded": "sat ${sat} sev ${incident.severity} subs ${incident.subsystems} ${flag}",
            "escaped": "$${sat} stays",
            "whole_object": "${incident}",
            "untouched": 4.5,
            "not_a_ref": "${ bad }",
        },
        variables,
    )
    assert rendered == {
        "typed": 3,
        "nested": {"list": ["SAT-1", "x-3", {"deep": 5}]},
        "embedded": 'sat SAT-1 sev 5 subs ["power"] true',
        "escaped": "${sat} stays",
        "whole_object": {"severity": 5, "subsystems": ["power"]},
        "untouched": 4.5,
        "not_a_ref": "${ bad }",
    }
    assert variable_references({"a": ["${x}", "$${y}", "${z.w} ${x}"]}) == {"x", "z.w"}
    with pytest.raises(ValidationError) as caught:
        render_parameters({"a": "pre ${missing}"}, variables)
    assert caught.value.violations[0].field == "variables.missing"
    with pytest.raises(ValidationError):
        render_parameters("${missing}", variables)


async def test_parameters_render_at_step_time_from_current_variables(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("set", "set_variable", {"name": "target", "value": "${initial}-override"}),
                RunbookStep("use", "switch_bus", {"to": "${target}", "sat": "${satellite_id}"}),
            ],
        )
    )
    ctx = engine.start_execution("r", "alice", {"target": "A", "initial": "B", "satellite_id": "SAT-3"})
    await run_to_end(engine, ctx.execution_id)
    assert rec.calls == [("switch_bus", {"to": "B-override", "sat": "SAT-3"})]
    assert engine.get_execution_status(ctx.execution_id).variables["target"] == "B-override"


def test_dry_run_plans_without_handlers_or_events(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(
        three_steps(
            steps=[
                RunbookStep("safe", "safe_payload", {"sat": "${satellite_id}", "why": "sev ${severity}"}),
                RunbookStep("switch", "switch_bus", {"to": "B"}, requires_approval=True, rollback_action="undo_switch"),
                RunbookStep("heater", "reduce_heater", {"duty": 0.4}),
            ]
        )
    )
    plan = engine.plan_execution("power-anomaly", {"satellite_id": "SAT-9", "severity": 5})
    assert [(p.step_id, p.action, p.parameters, p.requires_approval, p.would_run, p.rollback_action) for p in plan] == [
        ("safe", "safe_payload", {"sat": "SAT-9", "why": "sev 5"}, False, True, None),
        ("switch", "switch_bus", {"to": "B"}, True, False, "undo_switch"),
        ("heater", "reduce_heater", {"duty": 0.4}, False, False, None),
    ]
    assert rec.calls == []
    assert engine.list_executions() == []
    with pytest.raises(ValidationError):
        engine.plan_execution("power-anomaly", {})
    with pytest.raises(NotFoundError):
        engine.plan_execution("nope", {})


# --- running --------------------------------------------------------------------------------------------


async def test_success_transitions_to_completed(engine: RunbookEngine, rec: Recorder, clock: ManualClock) -> None:
    engine.register_runbook(
        three_steps(
            steps=[
                RunbookStep("safe", "safe_payload", {"sat": "${satellite_id}"}),
                RunbookStep("measure", "measure"),
                RunbookStep("heater", "reduce_heater", {"duty": 0.4, "bus": "${bus}"}),
            ]
        )
    )
    ctx = engine.start_execution("power-anomaly", "alice", {"satellite_id": "SAT-1", "bus": "A"})
    clock.advance(1)
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.COMPLETED
    mid = engine.get_execution_status(ctx.execution_id)
    assert mid.current_step_index == 1
    assert mid.step_states["safe"].status is StepStatus.COMPLETED
    assert mid.step_states["safe"].attempts == 1
    assert mid.step_states["safe"].started_time == T0 + timedelta(seconds=1)
    assert mid.step_states["measure"].status is StepStatus.PENDING
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.COMPLETED
    assert await engine.execute_next_step(ctx.execution_id, actor="bob") is StepStatus.COMPLETED
    done = engine.get_execution_status(ctx.execution_id)
    assert done.status is RunbookStatus.COMPLETED and done.finished
    assert done.current_step_index == 3
    assert done.finished_time == T0 + timedelta(seconds=1)
    assert done.variables == {"satellite_id": "SAT-1", "bus": "B", "bus_voltage": 27.5}
    assert done.step_states["measure"].output == {"bus_voltage": 27.5, "bus": "B"}
    # The heater step saw the bus the measure step returned.
    assert rec.calls[-1] == ("reduce_heater", {"duty": 0.4, "bus": "B"})
    assert rec.contexts[0].execution_id == ctx.execution_id and rec.contexts[0].triggered_by == "alice"
    assert rec.contexts[0].attempt == 1 and rec.contexts[0].timeout_s == 60.0 and not rec.contexts[0].rollback
    with pytest.raises(FailedPreconditionError):
        await engine.execute_next_step(ctx.execution_id)
    assert transitions(engine, ctx.execution_id)[-1] == ("EXECUTION_FINISHED", "")
    assert done.audit_log[-1].actor == "bob"


async def test_failing_step_marks_step_and_execution_failed_without_crashing(
    engine: RunbookEngine, rec: Recorder
) -> None:
    engine.register_runbook(
        Runbook("r", "R", [RunbookStep("a", "safe_payload"), RunbookStep("b", "boom"), RunbookStep("c", "switch_bus")])
    )
    ctx = engine.start_execution("r", "alice", {})
    assert await run_to_end(engine, ctx.execution_id) == [StepStatus.COMPLETED, StepStatus.FAILED]
    state = engine.get_execution_status(ctx.execution_id)
    assert state.status is RunbookStatus.FAILED
    assert state.error == "step b failed: bus controller rejected command"
    assert state.step_states["b"].status is StepStatus.FAILED
    assert state.step_states["b"].error == "bus controller rejected command"
    assert state.step_states["c"].status is StepStatus.SKIPPED
    assert state.step_states["a"].status is StepStatus.COMPLETED  # no auto_rollback
    assert rec.names() == ["safe_payload", "boom"]
    assert ("STEP_SKIPPED", "c") in transitions(engine, ctx.execution_id)
    with pytest.raises(FailedPreconditionError):
        await engine.execute_next_step(ctx.execution_id)


@pytest.mark.parametrize(
    ("handler_result", "reason_fragment"),
    [
        (ValueError(), "ValueError"),  # an exception without a message is named by its type
        (TimeoutError("agent did not answer"), "agent did not answer"),  # the action's own timeout
        ("a string", "action returned str, not an object"),
        ({"x": float("inf")}, "non-JSON output (output.x: numbers must be finite)"),
        ({"dump": "x" * 300_000}, "too large an output (at most 262144 bytes as JSON"),  # must fit in an event
    ],
)
async def test_handler_errors_and_bad_outputs_fail_the_step(
    engine: RunbookEngine, handler_result: Any, reason_fragment: str
) -> None:
    async def handler(params: dict[str, Any], ctx: ActionContext) -> Any:
        if isinstance(handler_result, BaseException):
            raise handler_result
        return handler_result

    engine.register_action("odd", handler)
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "odd")]))
    ctx = engine.start_execution("r", "alice", {})
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.FAILED
    state = engine.get_execution_status(ctx.execution_id)
    assert state.status is RunbookStatus.FAILED
    assert reason_fragment in (state.step_states["s"].error or "")


async def test_timeout_cancels_the_handler_and_fails_the_step(engine: RunbookEngine) -> None:
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(params: dict[str, Any], ctx: ActionContext) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    engine.register_action("hang", hang)
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "hang", timeout_s=0.05), RunbookStep("t", "measure")]))
    ctx = engine.start_execution("r", "alice", {})
    status = await asyncio.wait_for(engine.execute_next_step(ctx.execution_id), BOUND_S)
    assert status is StepStatus.FAILED
    assert cancelled.is_set()
    state = engine.get_execution_status(ctx.execution_id)
    assert state.step_states["s"].error == "timed out after 0.05s"
    assert state.error == "step s failed: timed out after 0.05s"
    assert state.status is RunbookStatus.FAILED
    assert state.step_states["t"].status is StepStatus.SKIPPED


async def test_a_step_that_timed_out_is_rolled_back_too_one_that_failed_is_not(
    engine: RunbookEngine, rec: Recorder
) -> None:
    # The bus switch answered too late: it may have switched all the same, so the rollback switches
    # back (rollback actions are idempotent). A step that said it failed did nothing to undo.
    async def slow_switch(params: dict[str, Any], ctx: ActionContext) -> None:
        await asyncio.Event().wait()

    engine.register_action("slow_switch", slow_switch)
    steps = [
        RunbookStep("safe", "safe_payload", rollback_action="undo_safe"),
        RunbookStep("switch", "slow_switch", {"to": "B"}, timeout_s=0.05, rollback_action="undo_switch"),
    ]
    engine.register_runbook(Runbook("r", "R", steps, auto_rollback=True))
    ctx = engine.start_execution("r", "alice", {})
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.COMPLETED
    assert await asyncio.wait_for(engine.execute_next_step(ctx.execution_id), BOUND_S) is StepStatus.FAILED
    state = engine.get_execution_status(ctx.execution_id)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["safe_payload", "undo_switch", "undo_safe"]  # newest first
    assert state.step_states["switch"].status is StepStatus.ROLLED_BACK
    assert state.error == "step switch failed: timed out after 0.05s"

    engine.register_runbook(
        Runbook("f", "F", [RunbookStep("boom", "boom", rollback_action="undo_switch")], auto_rollback=True)
    )
    failed = engine.start_execution("f", "alice", {})
    rec.calls.clear()
    assert await engine.execute_next_step(failed.execution_id) is StepStatus.FAILED
    assert rec.names() == ["boom"]
    assert engine.get_execution_status(failed.execution_id).step_states["boom"].status is StepStatus.FAILED


async def test_a_step_a_restart_interrupted_is_rolled_back_when_its_action_is_not_idempotent(
    clock: ManualClock, rec: Recorder
) -> None:
    source = make_engine(clock, rec)
    runbook = source.register_runbook(
        Runbook("r", "R", [RunbookStep("switch", "switch_bus", rollback_action="undo_switch")], auto_rollback=True)
    )
    ctx = source.start_execution("r", "alice", {})
    events = [*source.events(ctx.execution_id)]
    # As if the process died while switch_bus ran: its STEP_STARTED is the last event stored.
    started = ExecutionEvent(
        execution_id=ctx.execution_id,
        seq=events[-1].seq + 1,
        type=EventType.STEP_STARTED,
        actor="alice",
        occurred_time=T0,
        data={"step_id": "switch", "action": "switch_bus", "attempt": 1},
    )
    fresh = make_engine(clock, rec)
    await fresh.load_execution(runbook, [*events, started])
    state = fresh.get_execution_status(ctx.execution_id)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["undo_switch"]


async def test_action_missing_at_run_time_fails_the_step(clock: ManualClock, rec: Recorder) -> None:
    source = make_engine(clock, rec)
    runbook = source.register_runbook(Runbook("r", "R", [RunbookStep("s", "measure")]))
    ctx = source.start_execution("r", "alice", {})
    fresh = RunbookEngine(clock)  # e.g. restarted without the deployment's custom actions
    await fresh.load_execution(runbook, source.events(ctx.execution_id))
    assert await fresh.execute_next_step(ctx.execution_id) is StepStatus.FAILED
    assert fresh.get_execution_status(ctx.execution_id).step_states["s"].error == "action 'measure' is not registered"


# --- built-ins and agents -------------------------------------------------------------------------------


async def test_builtin_actions(engine: RunbookEngine) -> None:
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("note", "log", {"message": "safing ${satellite_id}"}),
                RunbookStep("pause", "wait", {"seconds": 0}),
                RunbookStep("remember", "set_variable", {"name": "mode", "value": {"bus": "B"}}),
            ],
        )
    )
    ctx = engine.start_execution("r", "alice", {"satellite_id": "SAT-2"})
    assert await run_to_end(engine, ctx.execution_id) == [StepStatus.COMPLETED] * 3
    state = engine.get_execution_status(ctx.execution_id)
    assert state.variables["mode"] == {"bus": "B"}
    logged = [a for a in state.audit_log if a.transition == "ACTION_LOGGED"]
    assert [(a.step_id, a.detail) for a in logged] == [("note", "safing SAT-2")]
    variable_set = [a for a in state.audit_log if a.transition == "VARIABLE_SET"]
    assert variable_set[0].detail == 'mode = {"bus": "B"}'


@pytest.mark.parametrize(
    ("action", "params", "field"),
    [
        ("log", {}, "parameters.message"),
        ("wait", {"seconds": -1}, "parameters.seconds"),
        ("wait", {"seconds": "soon"}, "parameters.seconds"),
        ("set_variable", {"value": 1}, "parameters.name"),
    ],
)
async def test_builtin_actions_refuse_bad_literal_parameters_at_registration(
    engine: RunbookEngine, action: str, params: dict[str, Any], field: str
) -> None:
    # A definition that can only fail when it runs is refused up front, in a step or its rollback.
    with pytest.raises(ValidationError) as err:
        engine.register_runbook(Runbook("r", "R", [RunbookStep("s", action, params)]))
    assert [v.field for v in err.value.violations] == [f"runbook.steps[0].{field}"]
    undo = RunbookStep("s", "log", {"message": "x"}, rollback_action=action, rollback_parameters=params)
    with pytest.raises(ValidationError) as err:
        engine.register_runbook(Runbook("r", "R", [undo]))
    assert [v.field for v in err.value.violations] == [f"runbook.steps[0].rollback_{field}"]


async def test_a_registered_actions_parameter_rules_apply_at_registration(engine: RunbookEngine) -> None:
    def rules(params: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [] if params.get("bus") in ("A", "B") else [("bus", "must be A or B")]

    async def switch(params: dict[str, Any], ctx: ActionContext) -> None:
        return None

    engine.register_action("bus_switch", switch, check=rules)
    with pytest.raises(ValidationError) as err:
        engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "bus_switch", {"bus": "C"})]))
    assert [(v.field, v.description) for v in err.value.violations] == [
        ("runbook.steps[0].parameters.bus", "must be A or B")
    ]
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "bus_switch", {"bus": "B"})]))


@pytest.mark.parametrize(
    ("action", "params", "variables", "field"),
    [
        ("wait", {"seconds": "${delay}"}, {"delay": -1}, "parameters.seconds"),
        ("wait", {"seconds": "${delay}"}, {"delay": "soon"}, "parameters.seconds"),
        ("set_variable", {"name": "${which}", "value": 1}, {"which": ""}, "parameters.name"),
    ],
)
async def test_builtin_actions_reject_bad_rendered_parameters_when_they_run(
    engine: RunbookEngine, action: str, params: dict[str, Any], variables: dict[str, Any], field: str
) -> None:
    # What a reference stands for is known only then.
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", action, params)]))
    ctx = engine.start_execution("r", "alice", variables)
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.FAILED
    assert field in (engine.get_execution_status(ctx.execution_id).step_states["s"].error or "")


async def test_agent_actions_go_through_the_injected_invoker(engine: RunbookEngine) -> None:
    engine.declare_agent_action("switch_power_bus")
    engine.register_runbook(
        Runbook("r", "R", [RunbookStep("s", "agent:switch_power_bus", {"sat": "${sat}"}, timeout_s=7)])
    )
    calls: list[tuple[str, dict[str, Any], float]] = []

    async def invoker(agent: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        calls.append((agent, params, timeout_s))
        return {"bus": "B"}

    engine.set_agent_invoker(invoker)
    ctx = engine.start_execution("r", "alice", {"sat": "SAT-4"})
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.COMPLETED
    assert calls == [("switch_power_bus", {"sat": "SAT-4"}, 7)]
    assert engine.get_execution_status(ctx.execution_id).variables["bus"] == "B"


async def test_agent_invoker_failure_fails_fast_with_its_message(engine: RunbookEngine) -> None:
    engine.declare_agent_action("switch_power_bus")
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "agent:switch_power_bus")]))

    class CircuitOpen(Exception):
        pass

    async def open_circuit(agent: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        raise CircuitOpen(f"circuit for aetherops.actions.{agent} is OPEN; failing fast")

    engine.set_agent_invoker(open_circuit)
    ctx = engine.start_execution("r", "alice", {})
    assert await engine.execute_next_step(ctx.execution_id) is StepStatus.FAILED
    state = engine.get_execution_status(ctx.execution_id)
    assert state.step_states["s"].error == "circuit for aetherops.actions.switch_power_bus is OPEN; failing fast"

    engine.set_agent_invoker(None)
    ctx2 = engine.start_execution("r", "alice", {})
    assert await engine.execute_next_step(ctx2.execution_id) is StepStatus.FAILED
    assert "no agent invoker configured" in (
        engine.get_execution_status(ctx2.execution_id).step_states["s"].error or ""
    )


# --- approvals ------------------------------------------------------------------------------------------


def gated_runbook(**step_changes: Any) -> Runbook:
    return Runbook(
        "gated",
        "Gated",
        [
            RunbookStep("safe", "safe_payload", rollback_action="undo_safe"),
            RunbookStep("switch", "switch_bus", requires_approval=True, rollback_action="undo_switch", **step_changes),
            RunbookStep("heater", "reduce_heater"),
        ],
    )


async def test_approval_gate_pauses_until_a_second_person_approves(
    engine: RunbookEngine, rec: Recorder, clock: ManualClock
) -> None:
    engine.register_runbook(gated_runbook())
    ctx = engine.start_execution("gated", "alice", {})
    eid = ctx.execution_id
    assert await engine.execute_next_step(eid) is StepStatus.COMPLETED
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    version = engine.version(eid)
    # Asking again neither runs the step nor records anything.
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    assert engine.version(eid) == version
    assert rec.names() == ["safe_payload"]
    waiting = engine.get_execution_status(eid)
    assert waiting.awaiting_approval == ["switch"]
    assert waiting.step_states["switch"].approval_expires_time is None
    assert waiting.status is RunbookStatus.RUNNING

    with pytest.raises(PermissionDeniedError):
        engine.approve_step(eid, "switch", "alice")  # four eyes
    with pytest.raises(FailedPreconditionError):
        engine.approve_step(eid, "heater", "bob")  # not awaiting approval
    with pytest.raises(NotFoundError):
        engine.approve_step(eid, "nope", "bob")
    with pytest.raises(NotFoundError):
        engine.approve_step("nope", "switch", "bob")
    with pytest.raises(ValidationError):
        engine.approve_step(eid, "switch", "  ")

    clock.advance(5)
    assert engine.approve_step(eid, "switch", "bob") is True
    approved = engine.get_execution_status(eid)
    assert approved.step_states["switch"].approved_by == "bob"
    assert approved.step_states["switch"].status is StepStatus.PENDING
    assert rec.names() == ["safe_payload"]  # approval alone runs nothing
    with pytest.raises(FailedPreconditionError):
        engine.approve_step(eid, "switch", "carol")  # already approved

    assert await engine.execute_next_step(eid) is StepStatus.COMPLETED
    assert await engine.execute_next_step(eid) is StepStatus.COMPLETED
    assert rec.names() == ["safe_payload", "switch_bus", "reduce_heater"]
    done = engine.get_execution_status(eid)
    assert done.status is RunbookStatus.COMPLETED
    granted = [a for a in done.audit_log if a.transition == "APPROVAL_GRANTED"]
    assert [(a.actor, a.step_id, a.time, a.detail) for a in granted] == [
        ("bob", "switch", T0 + timedelta(seconds=5), "approved by bob")
    ]


async def test_a_step_approved_already_says_by_whom_and_what_comes_next(engine: RunbookEngine) -> None:
    # Not "step is PENDING, not awaiting approval": a second approver (or one who would reject)
    # needs to hear that it is decided, by whom, and how it can still be stopped.
    engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    engine.approve_step(eid, "switch", "bob")
    told = "step 'switch' was approved by 'bob' already; it runs on the next ExecuteNextStep (CancelExecution stops it)"
    with pytest.raises(FailedPreconditionError) as again:
        engine.approve_step(eid, "switch", "carol")
    assert str(again.value) == told
    with pytest.raises(FailedPreconditionError) as rejected:
        await engine.reject_step(eid, "switch", "carol")
    assert str(rejected.value) == told


async def test_approval_expiry_fails_the_execution(engine: RunbookEngine, clock: ManualClock, rec: Recorder) -> None:
    engine.register_runbook(gated_runbook(approval_timeout_s=60))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    other = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    expires = T0 + timedelta(seconds=60)
    assert engine.get_execution_status(eid).step_states["switch"].approval_expires_time == expires
    clock.advance(59)
    assert await engine.expire_approvals() == []
    clock.advance(1)
    with pytest.raises(FailedPreconditionError, match="expired"):
        engine.approve_step(eid, "switch", "bob")  # too late, even before the sweep ran
    assert await engine.expire_approvals() == [eid]
    state = engine.get_execution_status(eid)
    reason = f"approval for step switch expired at {expires.isoformat()}"
    assert state.status is RunbookStatus.FAILED and state.error == reason
    assert state.step_states["switch"].status is StepStatus.FAILED
    assert state.step_states["heater"].status is StepStatus.SKIPPED
    expired = [a for a in state.audit_log if a.transition == "APPROVAL_EXPIRED"]
    assert [(a.actor, a.detail) for a in expired] == [("system", reason)]
    assert await engine.expire_approvals() == []  # once only
    assert engine.get_execution_status(other).status is RunbookStatus.RUNNING
    assert rec.names() == ["safe_payload"]


async def test_a_rejected_approval_fails_the_step_and_the_execution(
    engine: RunbookEngine, clock: ManualClock, rec: Recorder
) -> None:
    engine.register_runbook(gated_runbook(approval_timeout_s=60))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    with pytest.raises(FailedPreconditionError):
        await engine.reject_step(eid, "switch", "bob")  # nothing awaits approval yet
    await engine.execute_next_step(eid)
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    with pytest.raises(NotFoundError):
        await engine.reject_step(eid, "nope", "bob")
    with pytest.raises(ValidationError) as err:
        await engine.reject_step(eid, "switch", " ", "x" * 5000)
    assert {v.field for v in err.value.violations} == {"approver", "reason"}
    assert engine.get_execution_status(eid).status is RunbookStatus.RUNNING  # nothing half-done

    clock.advance(3)
    # The trigger may stop what it started: four eyes guard going ahead, not stopping.
    await engine.reject_step(eid, "switch", "alice", "bus B is in eclipse")
    state = engine.get_execution_status(eid)
    reason = "approval for step switch rejected by alice: bus B is in eclipse"
    assert state.status is RunbookStatus.FAILED and state.error == reason
    assert state.step_states["switch"].status is StepStatus.FAILED
    assert state.step_states["switch"].error == reason
    assert state.step_states["heater"].status is StepStatus.SKIPPED
    rejected = [a for a in state.audit_log if a.transition == "APPROVAL_REJECTED"]
    assert [(a.actor, a.step_id, a.time, a.detail) for a in rejected] == [
        ("alice", "switch", T0 + timedelta(seconds=3), reason)
    ]
    assert rec.names() == ["safe_payload"]  # the gated step never ran
    with pytest.raises(FailedPreconditionError):
        engine.approve_step(eid, "switch", "bob")  # decided
    with pytest.raises(FailedPreconditionError):
        await engine.reject_step(eid, "switch", "bob")


async def test_a_cancelled_execution_stops_where_it_is_and_can_still_be_rolled_back(
    engine: RunbookEngine, clock: ManualClock, rec: Recorder
) -> None:
    runbook = gated_runbook()
    # auto_rollback is for failures: a cancel leaves what ran as it is, all the same.
    engine.register_runbook(Runbook(runbook.runbook_id, runbook.name, runbook.steps, auto_rollback=True))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    assert await engine.execute_next_step(eid) is StepStatus.AWAITING_APPROVAL
    with pytest.raises(ValidationError) as err:
        await engine.cancel_execution(eid, " ", "x" * 5000)
    assert {v.field for v in err.value.violations} == {"actor", "reason"}
    assert engine.get_execution_status(eid).status is RunbookStatus.RUNNING  # nothing half-done

    clock.advance(2)
    await engine.cancel_execution(eid, "carol", "the fault cleared")
    state = engine.get_execution_status(eid)
    why = "cancelled by carol: the fault cleared"
    assert state.status is RunbookStatus.CANCELLED and state.error == why and state.finished
    assert [state.step_states[s].status for s in ("safe", "switch", "heater")] == [
        StepStatus.COMPLETED,
        StepStatus.SKIPPED,
        StepStatus.SKIPPED,
    ]
    assert [(a.transition, a.actor, a.time) for a in state.audit_log[-3:]] == [
        ("STEP_SKIPPED", "carol", T0 + timedelta(seconds=2)),
        ("STEP_SKIPPED", "carol", T0 + timedelta(seconds=2)),
        ("EXECUTION_FINISHED", "carol", T0 + timedelta(seconds=2)),
    ]
    assert rec.names() == ["safe_payload"]  # nothing rolled back, nothing more run
    with pytest.raises(FailedPreconditionError):
        await engine.cancel_execution(eid, "carol")
    with pytest.raises(FailedPreconditionError):
        await engine.execute_next_step(eid)
    with pytest.raises(FailedPreconditionError):
        engine.approve_step(eid, "switch", "bob")
    # What ran can still be undone.
    assert await engine.rollback_execution(eid, "carol") == 1
    assert engine.get_execution_status(eid).status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["safe_payload", "undo_safe"]


async def test_a_rejection_rolls_back_with_auto_rollback_and_an_expired_gate_cannot_be_rejected(
    engine: RunbookEngine, clock: ManualClock, rec: Recorder
) -> None:
    runbook = gated_runbook(approval_timeout_s=10)
    engine.register_runbook(Runbook(runbook.runbook_id, runbook.name, runbook.steps, auto_rollback=True))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)
    await engine.reject_step(eid, "switch", "bob")
    assert engine.get_execution_status(eid).status is RunbookStatus.ROLLED_BACK
    assert engine.get_execution_status(eid).error == "approval for step switch rejected by bob"
    assert rec.names() == ["safe_payload", "undo_safe"]

    late = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(late)
    await engine.execute_next_step(late)
    clock.advance(10)
    with pytest.raises(FailedPreconditionError, match="expired"):
        await engine.reject_step(late, "switch", "bob")


async def test_execute_next_step_notices_an_expired_approval(engine: RunbookEngine, clock: ManualClock) -> None:
    engine.register_runbook(gated_runbook(approval_timeout_s=10))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)
    clock.advance(10)
    assert await engine.execute_next_step(eid) is StepStatus.FAILED
    assert "expired" in (engine.get_execution_status(eid).error or "")


# --- rollback -------------------------------------------------------------------------------------------


async def test_single_step_rollback(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(Runbook("r", "R", [RunbookStep("safe", "safe_payload", rollback_action="undo_safe")]))
    eid = engine.start_execution("r", "alice", {}).execution_id
    await run_to_end(engine, eid)
    assert await engine.rollback_execution(eid, actor="carol") == 1
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert state.step_states["safe"].status is StepStatus.ROLLED_BACK
    assert rec.names() == ["safe_payload", "undo_safe"]
    assert rec.contexts[-1].rollback
    audit = [(a.transition, a.actor) for a in state.audit_log[-3:]]
    assert audit == [("ROLLBACK_STARTED", "carol"), ("STEP_ROLLED_BACK", "carol"), ("EXECUTION_FINISHED", "carol")]
    with pytest.raises(FailedPreconditionError):
        await engine.rollback_execution(eid)
    with pytest.raises(NotFoundError):
        await engine.rollback_execution("nope")


async def test_multi_step_rollback_runs_in_reverse_order(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("safe", "safe_payload", rollback_action="undo_safe", rollback_parameters={"sat": "${sat}"}),
                RunbookStep("measure", "measure"),  # nothing to undo
                RunbookStep(
                    "switch", "switch_bus", rollback_action="undo_switch", rollback_parameters={"to": "${bus}"}
                ),
                RunbookStep("heater", "reduce_heater", rollback_action="undo_heater"),
                RunbookStep("fail", "boom", rollback_action="undo_boom"),
            ],
        )
    )
    eid = engine.start_execution("r", "alice", {"sat": "SAT-1", "bus": "A"}).execution_id
    await run_to_end(engine, eid)
    assert engine.get_execution_status(eid).status is RunbookStatus.FAILED
    rec.calls.clear()
    assert await engine.rollback_execution(eid) == 3
    # Reverse order; the failed step is not compensated; rollback params see the variables as they are now.
    assert rec.calls == [("undo_heater", {}), ("undo_switch", {"to": "B"}), ("undo_safe", {"sat": "SAT-1"})]
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert state.error == "step fail failed: bus controller rejected command"  # why it was rolled back
    assert {k: s.status for k, s in state.step_states.items()} == {
        "safe": StepStatus.ROLLED_BACK,
        "measure": StepStatus.COMPLETED,
        "switch": StepStatus.ROLLED_BACK,
        "heater": StepStatus.ROLLED_BACK,
        "fail": StepStatus.FAILED,
    }
    rolled = [a.step_id for a in state.audit_log if a.transition == "STEP_ROLLED_BACK"]
    assert rolled == ["heater", "switch", "safe"]


async def test_failing_rollback_action_is_recorded_and_rollback_continues(engine: RunbookEngine, rec: Recorder) -> None:
    broken = {"on": True}

    async def flaky_undo(params: dict[str, Any], ctx: ActionContext) -> None:
        rec.calls.append(("flaky_undo", params))
        if broken["on"]:
            raise RuntimeError("relay stuck")

    engine.register_action("flaky_undo", flaky_undo)
    engine.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("a", "safe_payload", rollback_action="undo_safe"),
                RunbookStep("b", "switch_bus", rollback_action="flaky_undo"),
                RunbookStep("c", "reduce_heater", rollback_action="undo_heater"),
            ],
        )
    )
    eid = engine.start_execution("r", "alice", {}).execution_id
    await run_to_end(engine, eid)
    rec.calls.clear()
    assert await engine.rollback_execution(eid) == 2
    assert rec.names() == ["undo_heater", "flaky_undo", "undo_safe"]
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.FAILED
    assert state.error == "rollback incomplete: b: relay stuck"
    assert state.step_states["b"].status is StepStatus.COMPLETED
    assert state.step_states["b"].error == "rollback failed: relay stuck"
    assert ("STEP_ROLLBACK_FAILED", "b") in transitions(engine, eid)
    # Retrying rolls back only what is left.
    broken["on"] = False
    rec.calls.clear()
    assert await engine.rollback_execution(eid) == 1
    assert rec.names() == ["flaky_undo"]
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert state.error is None, "the execution had completed: no 'rollback incomplete' is left"
    assert state.step_states["b"].status is StepStatus.ROLLED_BACK and state.step_states["b"].error is None


async def test_rolling_back_a_running_execution_aborts_it_first(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)  # now awaiting approval
    assert await engine.rollback_execution(eid, "alice") == 1
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert state.error == "aborted for rollback by alice"
    assert state.step_states["switch"].status is StepStatus.SKIPPED
    assert state.step_states["safe"].status is StepStatus.ROLLED_BACK
    with pytest.raises(FailedPreconditionError):
        engine.approve_step(eid, "switch", "bob")
    assert [t for t, _ in transitions(engine, eid)][-6:] == [
        "STEP_SKIPPED",
        "STEP_SKIPPED",
        "EXECUTION_FINISHED",
        "ROLLBACK_STARTED",
        "STEP_ROLLED_BACK",
        "EXECUTION_FINISHED",
    ]


async def test_auto_rollback_on_failure(engine: RunbookEngine, rec: Recorder) -> None:
    engine.register_runbook(three_steps(steps=[*three_steps().steps, RunbookStep("fail", "boom")], auto_rollback=True))
    eid = engine.start_execution("power-anomaly", "incident:c-9", {"satellite_id": "SAT-1"}).execution_id
    statuses = await run_to_end(engine, eid)
    assert statuses == [StepStatus.COMPLETED] * 3 + [StepStatus.FAILED]
    assert rec.names() == [
        "safe_payload",
        "switch_bus",
        "reduce_heater",
        "boom",
        "undo_heater",
        "undo_switch",
        "undo_safe",
    ]
    state = engine.get_execution_status(eid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert state.step_states["fail"].status is StepStatus.FAILED
    finished = [a.detail for a in state.audit_log if a.transition == "EXECUTION_FINISHED"]
    assert finished == [
        "execution FAILED: step fail failed: bus controller rejected command",
        "execution ROLLED_BACK: step fail failed: bus controller rejected command",
    ]


async def test_auto_rollback_after_approval_expiry(engine: RunbookEngine, clock: ManualClock, rec: Recorder) -> None:
    runbook = gated_runbook(approval_timeout_s=1)
    engine.register_runbook(Runbook(runbook.runbook_id, runbook.name, runbook.steps, auto_rollback=True))
    eid = engine.start_execution("gated", "alice", {}).execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)
    clock.advance(2)
    assert await engine.expire_approvals() == [eid]
    assert engine.get_execution_status(eid).status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["safe_payload", "undo_safe"]


# --- audit ----------------------------------------------------------------------------------------------


async def test_audit_log_records_every_transition_with_time_and_actor(
    engine: RunbookEngine, clock: ManualClock
) -> None:
    engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    clock.advance(1)
    await engine.execute_next_step(eid, actor="alice")
    clock.advance(1)
    await engine.execute_next_step(eid, actor="alice")
    clock.advance(1)
    engine.approve_step(eid, "switch", "bob")
    clock.advance(1)
    await engine.execute_next_step(eid, actor="bob")
    await engine.execute_next_step(eid)
    state = engine.get_execution_status(eid)
    assert [(a.seq, a.transition, a.step_id, a.actor, (a.time - T0).seconds) for a in state.audit_log] == [
        (1, "EXECUTION_STARTED", "", "alice", 0),
        (2, "STEP_STARTED", "safe", "alice", 1),
        (3, "STEP_COMPLETED", "safe", "alice", 1),
        (4, "APPROVAL_REQUESTED", "switch", "alice", 2),
        (5, "APPROVAL_GRANTED", "switch", "bob", 3),
        (6, "STEP_STARTED", "switch", "bob", 4),
        (7, "STEP_COMPLETED", "switch", "bob", 4),
        (8, "STEP_STARTED", "heater", "system", 4),
        (9, "STEP_COMPLETED", "heater", "system", 4),
        (10, "EXECUTION_FINISHED", "", "system", 4),
    ]
    assert state.audit_log[0].detail == "runbook gated v1 started by alice"
    assert state.audit_log[1].detail == "attempt 1 of action safe_payload"
    assert state.audit_log[3].detail == "approval required"
    assert state.audit_log[-1].detail == "execution COMPLETED"
    assert len(state.audit_log) == len(engine.events(eid)) == state.version


# --- event sourcing -------------------------------------------------------------------------------------


async def test_state_is_the_projection_of_the_events(engine: RunbookEngine) -> None:
    runbook = engine.register_runbook(three_steps(steps=[*three_steps().steps, RunbookStep("m", "measure")]))
    eid = engine.start_execution("power-anomaly", "alice", {"satellite_id": "SAT-1"}).execution_id
    await run_to_end(engine, eid)
    await engine.rollback_execution(eid)
    events = engine.events(eid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert project(runbook, events) == engine.get_execution_status(eid)


async def test_event_dict_round_trip_is_json_able(engine: RunbookEngine, clock: ManualClock) -> None:
    runbook = engine.register_runbook(gated_runbook(approval_timeout_s=30))
    eid = engine.start_execution("gated", "alice", {"nested": {"a": [1, 2.5, None, True]}}).execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)
    engine.approve_step(eid, "switch", "bob")
    await run_to_end(engine, eid)
    events = engine.events(eid)
    stored = json.loads(json.dumps([event_to_dict(e) for e in events]))
    assert all(d["schema_version"] == 2 for d in stored)
    restored = [event_from_dict(d) for d in stored]
    assert restored == events
    assert project(runbook, restored) == engine.get_execution_status(eid)


def test_event_from_dict_reports_every_problem() -> None:
    with pytest.raises(ValidationError) as caught:
        event_from_dict(
            {
                "schema_version": 2,
                "execution_id": "",
                "seq": 0,
                "type": "NOPE",
                "occurred_time": "yesterday",
                "actor": "",
                "data": [],
            }
        )
    assert [v.field for v in caught.value.violations] == [
        "event.execution_id",
        "event.seq",
        "event.type",
        "event.occurred_time",
        "event.actor",
        "event.data",
    ]
    with pytest.raises(ValidationError) as caught:
        event_from_dict(
            {
                "schema_version": 2,
                "execution_id": "e",
                "seq": 1,
                "type": "STEP_STARTED",
                "occurred_time": "2026-01-01T00:00:00",
                "actor": "a",
            }
        )
    assert [v.description for v in caught.value.violations] == ["must carry a time zone"]


# Events as a v1 writer stored them (see `upcast` for the shape): kinds in lower case, "by", epoch "ts",
# "step" in data, "approval_given", and {"final_status": ...}. The first one predates the schema_version key.
V1_EVENTS: list[dict[str, Any]] = [
    {
        "execution_id": "old-1",
        "seq": 1,
        "kind": "execution_started",
        "by": "alice",
        "ts": 1767225600.0,
        "data": {"runbook_id": "gated", "runbook_version": 1, "triggered_by": "alice", "variables": {"sat": "S1"}},
    },
    {
        "schema_version": 1,
        "execution_id": "old-1",
        "seq": 2,
        "kind": "step_started",
        "by": "alice",
        "ts": 1767225601.0,
        "data": {"step": "safe", "action": "safe_payload", "attempt": 1},
    },
    {
        "schema_version": 1,
        "execution_id": "old-1",
        "seq": 3,
        "kind": "step_completed",
        "by": "alice",
        "ts": 1767225602.5,
        "data": {"step": "safe", "output": {}},
    },
    {
        "schema_version": 1,
        "execution_id": "old-1",
        "seq": 4,
        "kind": "approval_requested",
        "by": "alice",
        "ts": 1767225603,
        "data": {"step": "switch", "expires_time": None},
    },
    {
        "schema_version": 1,
        "execution_id": "old-1",
        "seq": 5,
        "kind": "approval_given",
        "by": "bob",
        "ts": 1767225604.0,
        "data": {"step": "switch", "approver": "bob"},
    },
]


async def test_upcast_reads_stored_v1_events(clock: ManualClock, rec: Recorder) -> None:
    up = upcast(V1_EVENTS[1])
    assert up == {
        "schema_version": 2,
        "execution_id": "old-1",
        "seq": 2,
        "type": "STEP_STARTED",
        "occurred_time": "2026-01-01T00:00:01+00:00",
        "actor": "alice",
        "data": {"step_id": "safe", "action": "safe_payload", "attempt": 1},
    }
    events = [event_from_dict(d) for d in V1_EVENTS]
    assert events[4].type is EventType.APPROVAL_GRANTED and events[4].actor == "bob"
    assert events[2].occurred_time == datetime(2026, 1, 1, 0, 0, 2, 500000, tzinfo=UTC)
    finished = upcast(
        {
            "schema_version": 1,
            "execution_id": "old-1",
            "seq": 9,
            "kind": "execution_finished",
            "by": "",
            "ts": 0,
            "data": {"final_status": "rolled_back"},
        }
    )
    assert finished["type"] == "EXECUTION_FINISHED" and finished["data"] == {"status": "ROLLED_BACK"}
    assert finished["actor"] == "system"

    # The old stream loads and continues: the approved step runs now.
    engine = make_engine(clock, rec)
    runbook = engine.register_runbook(gated_runbook())
    state = await engine.load_execution(runbook, events)
    assert state.step_states["switch"].approved_by == "bob"
    assert state.step_states["safe"].status is StepStatus.COMPLETED
    assert await engine.execute_next_step("old-1") is StepStatus.COMPLETED
    assert rec.names() == ["switch_bus"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"schema_version": 3, "seq": 1}, "event.schema_version"),
        ({"schema_version": 1, "by": "a"}, "event.kind"),
        ({"kind": "step_started", "seq": 1, "ts": "noon"}, "event.ts"),
    ],
)
def test_upcast_rejects_unknown_versions_and_malformed_v1(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        upcast(raw)
    assert caught.value.violations[0].field == field


async def test_get_execution_status_as_of(engine: RunbookEngine, clock: ManualClock) -> None:
    runbook = engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    clock.advance(10)
    await engine.execute_next_step(eid)
    clock.advance(10)
    await engine.execute_next_step(eid)
    clock.advance(10)
    engine.approve_step(eid, "switch", "bob")
    await run_to_end(engine, eid)

    at_start = engine.get_execution_status(eid, as_of=T0 + timedelta(seconds=5))
    assert at_start.version == 1 and at_start.current_step_index == 0
    assert at_start.status is RunbookStatus.RUNNING
    waiting = engine.get_execution_status(eid, as_of=T0 + timedelta(seconds=25))
    assert waiting.awaiting_approval == ["switch"]
    assert waiting.step_states["safe"].status is StepStatus.COMPLETED
    assert engine.get_execution_status(eid, as_of=T0 + timedelta(hours=1)) == engine.get_execution_status(eid)
    assert project(runbook, engine.events(eid), as_of=T0 + timedelta(seconds=25)) == waiting
    with pytest.raises(NotFoundError):
        engine.get_execution_status(eid, as_of=T0 - timedelta(seconds=1))


def test_project_rejects_broken_streams(engine: RunbookEngine) -> None:
    runbook = engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    started = engine.events(eid)[0]

    def event(seq: int, kind: EventType, data: dict[str, Any], execution_id: str = eid) -> ExecutionEvent:
        return ExecutionEvent(execution_id, seq, kind, T0, "system", data)

    with pytest.raises(ValidationError, match="no events"):
        project(runbook, [])
    with pytest.raises(ValidationError, match="gap or repeat"):
        project(runbook, [started, event(3, EventType.STEP_STARTED, {"step_id": "safe"})])
    with pytest.raises(ValidationError, match="starts with EXECUTION_STARTED"):
        project(runbook, [event(1, EventType.STEP_STARTED, {"step_id": "safe"})])
    with pytest.raises(ValidationError, match="belongs to execution"):
        project(runbook, [started, event(2, EventType.STEP_STARTED, {"step_id": "safe"}, "other")])
    with pytest.raises(ValidationError, match="unknown step"):
        project(runbook, [started, event(2, EventType.STEP_STARTED, {"step_id": "ghost"})])


async def test_take_new_events_hands_over_each_event_once(engine: RunbookEngine) -> None:
    engine.register_runbook(gated_runbook())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    first = engine.take_new_events(eid)
    assert [e.type for e in first] == [EventType.EXECUTION_STARTED]
    assert engine.take_new_events(eid) == []
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)
    new = engine.take_new_events(eid)
    assert [(e.seq, e.type) for e in new] == [
        (2, EventType.STEP_STARTED),
        (3, EventType.STEP_COMPLETED),
        (4, EventType.APPROVAL_REQUESTED),
    ]
    assert engine.version(eid) == 4
    assert engine.take_new_events(eid) == []
    with pytest.raises(NotFoundError):
        engine.take_new_events("nope")
    with pytest.raises(NotFoundError):
        engine.version("nope")


# --- restart --------------------------------------------------------------------------------------------


class Blocker:
    """An action that signals when it starts and then waits until released (or forever)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return {"done": self.calls}


async def crash_mid_step(
    clock: ManualClock, rec: Recorder, *, idempotent: bool, auto_rollback: bool = False
) -> tuple[Runbook, list[ExecutionEvent]]:
    """Run an execution in one engine until its second step is RUNNING and return the stored stream then."""
    old = make_engine(clock, rec)
    blocker = Blocker()
    old.register_action("slow", blocker, idempotent=idempotent)
    runbook = old.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("a", "safe_payload", rollback_action="undo_safe"),
                RunbookStep("b", "slow"),
                RunbookStep("c", "reduce_heater"),
            ],
            auto_rollback=auto_rollback,
        )
    )
    eid = old.start_execution("r", "alice", {}, execution_id="e1").execution_id
    await old.execute_next_step(eid)
    task = asyncio.create_task(old.execute_next_step(eid))
    await asyncio.wait_for(blocker.started.wait(), BOUND_S)
    stored = old.take_new_events(eid)
    assert stored[-1].type is EventType.STEP_STARTED
    task.cancel()  # the "crash"; what the old engine does about it afterwards is never stored
    with pytest.raises(asyncio.CancelledError):
        await task
    rec.calls.clear()
    return runbook, stored


async def test_load_after_crash_retries_an_idempotent_running_step(clock: ManualClock, rec: Recorder) -> None:
    runbook, stored = await crash_mid_step(clock, rec, idempotent=True)
    engine = make_engine(clock, rec)
    blocker = Blocker()
    blocker.release.set()
    engine.register_action("slow", blocker, idempotent=True)
    state = await engine.load_execution(runbook, stored)
    assert state.status is RunbookStatus.RUNNING
    assert state.step_states["b"].status is StepStatus.PENDING
    assert state.step_states["b"].error == "interrupted while running; action is idempotent, will retry"
    assert [e.type for e in engine.take_new_events("e1")] == [EventType.STEP_INTERRUPTED]
    assert await engine.execute_next_step("e1") is StepStatus.COMPLETED
    assert engine.get_execution_status("e1").step_states["b"].attempts == 2
    assert await engine.execute_next_step("e1") is StepStatus.COMPLETED
    assert engine.get_execution_status("e1").status is RunbookStatus.COMPLETED
    assert blocker.calls == 1


async def test_load_after_crash_fails_a_non_idempotent_running_step(clock: ManualClock, rec: Recorder) -> None:
    runbook, stored = await crash_mid_step(clock, rec, idempotent=False)
    engine = make_engine(clock, rec)
    engine.register_action("slow", Blocker())
    state = await engine.load_execution(runbook, stored)
    assert state.status is RunbookStatus.FAILED
    assert state.step_states["b"].status is StepStatus.FAILED
    assert state.step_states["b"].error == "interrupted by restart; action not idempotent"
    assert state.error == "step b failed: interrupted by restart; action not idempotent"
    assert state.step_states["c"].status is StepStatus.SKIPPED
    assert state.step_states["a"].status is StepStatus.COMPLETED
    assert [e.type for e in engine.take_new_events("e1")] == [
        EventType.STEP_FAILED,
        EventType.STEP_SKIPPED,
        EventType.EXECUTION_FINISHED,
    ]
    assert rec.calls == []


async def test_load_after_crash_rolls_back_a_non_idempotent_step_with_auto_rollback(
    clock: ManualClock, rec: Recorder
) -> None:
    runbook, stored = await crash_mid_step(clock, rec, idempotent=False, auto_rollback=True)
    engine = make_engine(clock, rec)
    state = await engine.load_execution(runbook, stored)  # "slow" is not even registered: not idempotent
    assert state.status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["undo_safe"]


async def test_an_execution_awaiting_approval_survives_a_restart(clock: ManualClock, rec: Recorder) -> None:
    old = make_engine(clock, rec)
    runbook = old.register_runbook(gated_runbook(approval_timeout_s=600))
    eid = old.start_execution("gated", "alice", {}).execution_id
    await old.execute_next_step(eid)
    await old.execute_next_step(eid)
    stored = [event_from_dict(json.loads(json.dumps(event_to_dict(e)))) for e in old.take_new_events(eid)]

    engine = make_engine(clock, rec)
    engine.restore_runbook(runbook)
    state = await engine.load_execution(engine.get_runbook("gated", 1), stored)
    assert state.awaiting_approval == ["switch"]
    assert state.step_states["switch"].approval_expires_time == T0 + timedelta(seconds=600)
    assert engine.take_new_events(eid) == []  # nothing to settle
    assert engine.version(eid) == len(stored)
    with pytest.raises(PermissionDeniedError):
        engine.approve_step(eid, "switch", "alice")
    engine.approve_step(eid, "switch", "bob")
    assert await run_to_end(engine, eid) == [StepStatus.COMPLETED, StepStatus.COMPLETED]
    assert engine.get_execution_status(eid).status is RunbookStatus.COMPLETED


async def test_load_settles_streams_cut_between_events(clock: ManualClock, rec: Recorder) -> None:
    source = make_engine(clock, rec)
    ok = source.register_runbook(Runbook("ok", "OK", [RunbookStep("a", "measure")]))
    bad = source.register_runbook(Runbook("bad", "Bad", [RunbookStep("a", "boom"), RunbookStep("b", "measure")]))
    ok_id = source.start_execution("ok", "alice", {}).execution_id
    bad_id = source.start_execution("bad", "alice", {}).execution_id
    await source.execute_next_step(ok_id)
    await source.execute_next_step(bad_id)
    ok_cut = [e for e in source.events(ok_id) if e.type is not EventType.EXECUTION_FINISHED]
    bad_cut = [e for e in source.events(bad_id) if e.type is EventType.STEP_STARTED or e.seq == 1]
    bad_cut.append(next(e for e in source.events(bad_id) if e.type is EventType.STEP_FAILED))

    engine = make_engine(clock, rec)
    assert (await engine.load_execution(ok, ok_cut)).status is RunbookStatus.COMPLETED
    resumed = await engine.load_execution(bad, bad_cut)
    assert resumed.status is RunbookStatus.FAILED
    assert resumed.error == "step a failed: bus controller rejected command"
    assert resumed.step_states["b"].status is StepStatus.SKIPPED


async def test_load_resumes_an_interrupted_or_missing_auto_rollback(clock: ManualClock, rec: Recorder) -> None:
    source = make_engine(clock, rec)
    runbook = source.register_runbook(
        Runbook(
            "r",
            "R",
            [
                RunbookStep("a", "safe_payload", rollback_action="undo_safe"),
                RunbookStep("b", "switch_bus", rollback_action="undo_switch"),
                RunbookStep("c", "boom"),
            ],
            auto_rollback=True,
        )
    )
    eid = source.start_execution("r", "alice", {}).execution_id
    await run_to_end(source, eid)
    events = source.events(eid)
    first_undo = next(i for i, e in enumerate(events) if e.type is EventType.STEP_ROLLED_BACK)
    mid = events[: first_undo + 1]  # b rolled back, a not yet
    before_rollback = [
        e for e in events if e.seq <= next(x.seq for x in events if x.type is EventType.EXECUTION_FINISHED)
    ]

    rec.calls.clear()
    engine = make_engine(clock, rec)
    state = await engine.load_execution(runbook, mid)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["undo_safe"]
    assert EventType.ROLLBACK_INTERRUPTED in [e.type for e in engine.take_new_events(eid)]

    rec.calls.clear()
    other = make_engine(clock, rec)
    state = await other.load_execution(runbook, before_rollback)
    assert state.status is RunbookStatus.ROLLED_BACK
    assert rec.names() == ["undo_switch", "undo_safe"]


async def test_load_validates_the_stream(engine: RunbookEngine) -> None:
    runbook = engine.register_runbook(gated_runbook())
    other = engine.register_runbook(three_steps())
    eid = engine.start_execution("gated", "alice", {}).execution_id
    events = engine.events(eid)
    with pytest.raises(ValidationError, match="no events"):
        await engine.load_execution(runbook, [])
    with pytest.raises(ValidationError, match="starts with"):
        await engine.load_execution(runbook, [ExecutionEvent(eid, 1, EventType.STEP_STARTED, T0, "a", {})])
    with pytest.raises(ValidationError, match="not power-anomaly v1"):
        await engine.load_execution(other, events)
    with pytest.raises(AlreadyExistsError):
        await engine.load_execution(runbook, events)
    engine.evict_execution(eid)
    with pytest.raises(NotFoundError):
        engine.get_execution_status(eid)
    assert (await engine.load_execution(runbook, events)).execution_id == eid


def test_restore_runbook(engine: RunbookEngine, clock: ManualClock) -> None:
    stored = runbook_from_dict(json.loads(json.dumps(runbook_to_dict(engine.register_runbook(three_steps())))))
    fresh = make_engine(clock, Recorder())
    fresh.restore_runbook(stored)
    fresh.restore_runbook(stored)  # idempotent
    assert fresh.get_runbook("power-anomaly") == stored
    assert stored.create_time == T0
    with pytest.raises(ConflictError):
        fresh.restore_runbook(three_steps(name="other", version=1))
    with pytest.raises(ValidationError):
        fresh.restore_runbook(three_steps())  # version 0: never stored
    with pytest.raises(ValidationError):
        fresh.restore_runbook(Runbook("x", "X", [], version=1))
    # A restored engine versions on from the stored versions.
    assert fresh.register_runbook_ex(three_steps()) == (stored, False)


def test_a_stored_runbook_with_a_pre_re2_regex_is_restored_and_never_matches(
    engine: RunbookEngine, clock: ManualClock
) -> None:
    # Registered while $regex still used Python's re (a lookahead); RE2 cannot compile it. Refusing it at
    # restore would keep the service from starting; a new registration is refused with the field.
    conditions = {"subsystems": {"$regex": "^(?=p)power$"}}
    stored = three_steps(trigger_conditions=conditions, version=1)
    engine.restore_runbook(stored)
    engine.restore_runbook(three_steps(runbook_id="other", trigger_conditions={"subsystems": "power"}, version=1))
    matching = engine.find_matching_runbooks({"subsystems": ["power"], "max_severity": 5})
    assert [r.runbook_id for r in matching] == ["other"]
    with pytest.raises(ValidationError) as caught:
        engine.register_runbook(three_steps(trigger_conditions=conditions))
    assert [v.field for v in caught.value.violations] == ["runbook.trigger_conditions.subsystems.$regex"]


def test_runbook_dict_round_trip_and_errors(engine: RunbookEngine) -> None:
    runbook = engine.register_runbook(gated_runbook(approval_timeout_s=5))
    assert runbook_from_dict(runbook_to_dict(runbook)) == runbook
    draft = Runbook("d", "D", [RunbookStep("s", "log", {"message": "hi"})], status=RunbookStatus.DRAFT)
    assert runbook_from_dict(runbook_to_dict(draft)) == draft
    with pytest.raises(ValidationError):
        runbook_from_dict({"runbook_id": "x"})
    with pytest.raises(ValidationError):
        runbook_from_dict({"runbook_id": "x", "name": "X", "steps": [{"step_id": "s", "action": "log"}], "status": "?"})


# --- triggers -------------------------------------------------------------------------------------------


def test_find_matching_runbooks(engine: RunbookEngine) -> None:
    power = engine.register_runbook(three_steps())
    manual = engine.register_runbook(three_steps(runbook_id="manual-power", auto_start=False))
    engine.register_runbook(three_steps(runbook_id="draft-power", status=RunbookStatus.DRAFT))
    engine.register_runbook(Runbook("no-conditions", "N", [RunbookStep("s", "measure")]))
    engine.register_runbook(
        three_steps(
            runbook_id="thermal", trigger_conditions={"$or": [{"subsystems": "thermal"}, {"satellites": "SAT-9"}]}
        )
    )
    incident = {"cluster_id": "c-1", "max_severity": 5, "subsystems": ["power"], "satellites": ["SAT-1"]}
    assert [r.runbook_id for r in engine.find_matching_runbooks(incident)] == ["manual-power", "power-anomaly"]
    assert engine.find_matching_runbooks(incident, auto_start_only=True) == [power]
    assert manual.version == 1
    assert [r.runbook_id for r in engine.find_matching_runbooks({"subsystems": ["thermal"], "max_severity": 1})] == [
        "thermal"
    ]
    assert engine.find_matching_runbooks({"max_severity": 3, "subsystems": "power"}) == []


# --- concurrency ----------------------------------------------------------------------------------------


async def test_concurrent_execute_next_step_never_advances_twice(engine: RunbookEngine) -> None:
    blocker = Blocker()
    running = 0
    peak = 0

    async def tracked(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await blocker(params, ctx)
        finally:
            running -= 1

    engine.register_action("tracked", tracked)
    engine.register_runbook(Runbook("r", "R", [RunbookStep("only", "tracked")]))
    eid = engine.start_execution("r", "alice", {}).execution_id
    first = asyncio.create_task(engine.execute_next_step(eid))
    await asyncio.wait_for(blocker.started.wait(), BOUND_S)
    second = asyncio.create_task(engine.execute_next_step(eid))
    rollback = asyncio.create_task(engine.rollback_execution(eid))
    blocker.release.set()
    assert await asyncio.wait_for(first, BOUND_S) is StepStatus.COMPLETED
    with pytest.raises(FailedPreconditionError):  # the second call saw the finished execution
        await asyncio.wait_for(second, BOUND_S)
    assert await asyncio.wait_for(rollback, BOUND_S) == 0  # waited for the step instead of racing it
    assert blocker.calls == 1 and peak == 1
    state = engine.get_execution_status(eid)
    assert state.step_states["only"].attempts == 1
    assert [e.type for e in engine.events(eid)].count(EventType.STEP_STARTED) == 1


async def test_cancelled_step_is_settled_like_a_restart(engine: RunbookEngine) -> None:
    for idempotent in (True, False):
        blocker = Blocker()
        name = f"slow_{idempotent}".lower()
        engine.register_action(name, blocker, idempotent=idempotent)
        engine.register_runbook(Runbook(name, "R", [RunbookStep("s", name)]))
        eid = engine.start_execution(name, "alice", {}).execution_id
        task = asyncio.create_task(engine.execute_next_step(eid))
        await asyncio.wait_for(blocker.started.wait(), BOUND_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        state = engine.get_execution_status(eid)
        if idempotent:
            assert state.status is RunbookStatus.RUNNING
            assert state.step_states["s"].status is StepStatus.PENDING
        else:
            assert state.status is RunbookStatus.FAILED
            assert state.step_states["s"].error == "interrupted by restart; action not idempotent"


async def test_action_logs_are_kept_when_the_step_is_cancelled(engine: RunbookEngine) -> None:
    gate = asyncio.Event()

    async def chatty(params: dict[str, Any], ctx: ActionContext) -> None:
        ctx.log("about to switch")
        gate.set()
        await asyncio.Event().wait()

    engine.register_action("chatty", chatty, idempotent=True)
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "chatty")]))
    eid = engine.start_execution("r", "alice", {}).execution_id
    task = asyncio.create_task(engine.execute_next_step(eid))
    await asyncio.wait_for(gate.wait(), BOUND_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(t, s) for t, s in transitions(engine, eid)][-2:] == [("ACTION_LOGGED", "s"), ("STEP_INTERRUPTED", "s")]


def test_default_engine_uses_system_clock_and_uuid_ids() -> None:
    engine = RunbookEngine()
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "log", {"message": "x"})]))
    before = datetime.now(UTC)
    ctx = engine.start_execution("r", "alice", {})
    assert len(ctx.execution_id) == 32 and int(ctx.execution_id, 16) >= 0
    assert before <= ctx.started_time <= datetime.now(UTC)


def test_variables_must_be_json_shaped(engine: RunbookEngine) -> None:
    engine.register_runbook(Runbook("r", "R", [RunbookStep("s", "measure")]))
    deep: Any = "bottom"
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("r", "alice", {"keys": {1: "a"}, "deep": deep, "obj": object()})
    descriptions = [v.description for v in caught.value.violations]
    assert descriptions == ["object keys must be strings, not int", "nested too deeply", "object is not JSON-able"]
    # What jsonb (NUL) or a Struct's doubles (huge integers) cannot hold is refused by path too.
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("r", "alice", {"sat": "S\x00", "k\x00": 1, "n": [10**400], "ok": 2**64})
    assert [v.field for v in caught.value.violations] == ["variables.sat", "variables", "variables.n[0]"]
    with pytest.raises(ValidationError) as caught:  # the started event carries them whole
        engine.start_execution("r", "alice", {"blob": "x" * 300_000})
    assert [v.field for v in caught.value.violations] == ["variables"]


async def test_events_record_the_tracking_id_of_whoever_caused_them(clock: ManualClock, rec: Recorder) -> None:
    current = ["trk-start"]
    engine = RunbookEngine(clock, tracking=lambda: current[0])
    engine.register_action("safe_payload", rec.action("safe_payload"))
    runbook = engine.register_runbook(
        Runbook(
            runbook_id="gated",
            name="Gated",
            steps=[
                RunbookStep("safe", "safe_payload", {}),
                RunbookStep("after", "safe_payload", {}, requires_approval=True),
            ],
        )
    )
    eid = engine.start_execution("gated", "incident:c-1", {}, incident_id="c-1").execution_id
    await engine.execute_next_step(eid)
    await engine.execute_next_step(eid)  # asks for approval, still under the start's id
    current[0] = "trk-approve"
    engine.approve_step(eid, "after", "bob")
    await engine.execute_next_step(eid)
    state = engine.get_execution_status(eid)
    assert (state.tracking_id, state.incident_id) == ("trk-start", "c-1")
    by_transition = [(a.transition, a.step_id, a.tracking_id) for a in state.audit_log]
    assert by_transition[:5] == [
        ("EXECUTION_STARTED", "", "trk-start"),
        ("STEP_STARTED", "safe", "trk-start"),
        ("STEP_COMPLETED", "safe", "trk-start"),
        ("APPROVAL_REQUESTED", "after", "trk-start"),
        ("APPROVAL_GRANTED", "after", "trk-approve"),
    ]
    assert {t for _, _, t in by_transition[5:]} == {"trk-approve"}
    # The tracking id survives the stored form and the fold.
    stored = [event_from_dict(json.loads(json.dumps(event_to_dict(e)))) for e in engine.events(eid)]
    assert stored == engine.events(eid)
    assert project(runbook, stored) == state
    # A bad incident id is refused like a bad execution id.
    with pytest.raises(ValidationError) as caught:
        engine.start_execution("gated", "alice", {}, incident_id="not an id")
    assert [v.field for v in caught.value.violations] == ["incident_id"]


def test_v1_events_take_a_tracking_id_kept_beside_them() -> None:
    assert "tracking_id" not in upcast(V1_EVENTS[1])
    assert event_from_dict({**V1_EVENTS[1], "tracking_id": "trk-old"}).tracking_id == "trk-old"
    with pytest.raises(ValidationError):
        event_from_dict({**event_to_dict(event_from_dict(V1_EVENTS[0])), "tracking_id": 7})
