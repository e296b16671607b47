"""The runbook core: remediation procedures run step by step as an event-sourced execution engine.

A `Runbook` is an ordered list of `RunbookStep`s, each naming an action (a registered async handler, a
built-in, or an `agent:<name>` answered by a ground-station agent through an injected invoker). An
execution is an append-only stream of `ExecutionEvent`s; its state (`ExecutionContext`) is nothing but
the fold of those events (`project`), so the persistence layer stores events and nothing else:

* every state-changing engine call appends events; `RunbookEngine.take_new_events` hands over the ones
  not yet stored, `RunbookEngine.version` is the last sequence number (optimistic concurrency);
* after a restart `RunbookEngine.load_execution(runbook, events)` rebuilds an execution and settles what
  the crash left open (a step that was RUNNING is retried only if its action is idempotent);
* `get_execution_status(..., as_of=...)` folds only the events up to a time.

Decisions worth knowing (all tested in tests/unit/runbook_test.py):

* Versioning: registering an existing runbook_id with a different definition creates version N+1; the
  identical definition again returns the latest version unchanged. "Identical" compares with the latest
  version only. Executions pin the version they started with.
* `${name}` references in step (and rollback) parameters are checked at start - a variable that is
  neither given nor possibly set by an earlier step fails the start - and rendered when the step runs,
  from the execution's variables at that moment (so values a previous step set with `set_variable` or
  returned are seen). "Possibly set": `set_variable` sets its literal name; `log` and `wait` set nothing;
  any other action (an agent's, a custom one) may return any variable, so after one of them every
  reference is left to the run (a variable still missing then fails that step). A rollback's
  parameters may also use what its own step set. A string that is exactly `${name}` keeps
  the variable's type; embedded references are rendered as text. `$${x}` is a literal `${x}`. Dotted names
  (`${incident.severity}`) look into nested variables.
* Failure: a handler exception or timeout fails the step and the execution; the remaining steps are
  SKIPPED. With `auto_rollback` the engine then rolls back.
* Rollback runs the rollback actions of COMPLETED steps that have one, in reverse step order, and of a
  step that FAILED by timing out (or by a restart interrupting an action that is not idempotent): it
  may have acted all the same, so it is undone too. A failing
  rollback action is recorded (STEP_ROLLBACK_FAILED), the step stays COMPLETED with the error, and the
  rollback carries on with the other steps; the execution then ends FAILED ("rollback incomplete") rather
  than ROLLED_BACK, and `rollback_execution` may be called again to retry just those steps (one that
  completes ends ROLLED_BACK with the error the execution had before its first rollback). Rolling back a
  RUNNING execution first finishes it FAILED ("aborted for rollback") so the stream never shows a RUNNING
  execution without pending steps. Rollback actions should be idempotent: an interrupted rollback is
  resumed after a restart and may repeat the action that was in flight.
* Approval: the approver must differ from `triggered_by` (four eyes). Approving makes the step runnable;
  `execute_next_step` runs it. An approval gate with `approval_timeout_s` expires at request time + that
  span; `expire_approvals` (or the next `execute_next_step`) fails the execution then.
* Concurrency: each execution has an asyncio.Lock; execute/rollback/expire hold it for their whole run,
  so two concurrent calls never both advance one execution - the second sees the first one's result.
  `approve_step` is synchronous (no await between check and append), hence atomic within the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from aetherops.clock import Clock, SystemClock
from aetherops.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    FieldViolation,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    ValidationError,
)
from aetherops.runbook_conditions import MISSING, match_conditions, resolve_path, validate_conditions
from aetherops.text import chars_problem, text_problem

__all__ = [
    "AGENT_PREFIX",
    "CURRENT_SCHEMA_VERSION",
    "ActionContext",
    "ActionDefinition",
    "ActionHandler",
    "ActionInfo",
    "ActionKind",
    "AgentInvoker",
    "AuditEntry",
    "EventType",
    "ExecutionContext",
    "ExecutionEvent",
    "ParameterCheck",
    "PlannedStep",
    "Runbook",
    "RunbookEngine",
    "RunbookStatus",
    "RunbookStep",
    "StepState",
    "StepStatus",
    "builtin_actions",
    "event_from_dict",
    "event_to_dict",
    "key_problem",
    "match_conditions",
    "project",
    "render_parameters",
    "require_parameters",
    "runbook_from_dict",
    "runbook_to_dict",
    "unprovided_references",
    "upcast",
    "validate_conditions",
    "validate_runbook",
    "variable_references",
]

CURRENT_SCHEMA_VERSION: Final = 2
AGENT_PREFIX: Final = "agent:"
SYSTEM_ACTOR: Final = "system"
DEFAULT_STEP_TIMEOUT_S: Final = 60.0

_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def key_problem(value: object) -> str | None:
    """Why `value` cannot be an execution's or incident's id here (None when it can)."""
    if isinstance(value, str) and _ID_RE.match(value):
        return None
    return "must be 1-128 letters, digits, '.', '_' or '-'"


_ACTION_NAME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
# `$${x}` escapes a literal `${x}`; names are identifiers joined by dots (nested variables).
_REFERENCE_RE: Final = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


# --- enums ------------------------------------------------------------------------------------------


class StepStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    ROLLED_BACK = "ROLLED_BACK"


class RunbookStatus(StrEnum):
    """DRAFT/ACTIVE describe a runbook definition; RUNNING..ROLLED_BACK an execution."""

    DRAFT = "DRAFT"
    ACTIVE = "ACTIVE"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELLED = "CANCELLED"


class EventType(StrEnum):
    EXECUTION_STARTED = "EXECUTION_STARTED"
    STEP_STARTED = "STEP_STARTED"
    STEP_COMPLETED = "STEP_COMPLETED"
    STEP_FAILED = "STEP_FAILED"
    STEP_SKIPPED = "STEP_SKIPPED"
    # A RUNNING step was cut off (restart or cancellation) and its idempotent action will be retried.
    STEP_INTERRUPTED = "STEP_INTERRUPTED"
    APPROVAL_REQUESTED = "APPROVAL_REQUESTED"
    APPROVAL_GRANTED = "APPROVAL_GRANTED"
    APPROVAL_EXPIRED = "APPROVAL_EXPIRED"
    APPROVAL_REJECTED = "APPROVAL_REJECTED"
    VARIABLE_SET = "VARIABLE_SET"
    ACTION_LOGGED = "ACTION_LOGGED"
    ROLLBACK_STARTED = "ROLLBACK_STARTED"
    STEP_ROLLED_BACK = "STEP_ROLLED_BACK"
    STEP_ROLLBACK_FAILED = "STEP_ROLLBACK_FAILED"
    ROLLBACK_INTERRUPTED = "ROLLBACK_INTERRUPTED"
    EXECUTION_FINISHED = "EXECUTION_FINISHED"
    # The incident that started a running execution closed (see `RunbookEngine.note_incident_closed`).
    INCIDENT_CLOSED = "INCIDENT_CLOSED"


class ActionKind(StrEnum):
    BUILTIN = "BUILTIN"
    CUSTOM = "CUSTOM"
    AGENT = "AGENT"


_OPEN_STEP: Final = frozenset({StepStatus.PENDING, StepStatus.AWAITING_APPROVAL, StepStatus.RUNNING})


# --- definitions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunbookStep:
    """One step: `action` with `parameters`, optionally gated by approval and undone by `rollback_action`."""

    step_id: str
    action: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    requires_approval: bool = False
    timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    rollback_action: str | None = None
    rollback_parameters: Mapping[str, Any] = field(default_factory=dict)
    # Only with requires_approval: the execution fails when nobody approves within this span.
    approval_timeout_s: float | None = None


@dataclass(frozen=True)
class Runbook:
    """A procedure definition. `version` and `create_time` are assigned by `RunbookEngine.register_runbook`."""

    runbook_id: str
    name: str
    steps: Sequence[RunbookStep]
    description: str = ""
    trigger_conditions: Mapping[str, Any] = field(default_factory=dict)
    auto_start: bool = False
    auto_rollback: bool = False
    version: int = 0
    status: RunbookStatus = RunbookStatus.ACTIVE
    create_time: datetime | None = None

    def __post_init__(self) -> None:
        # A tuple, so a registered definition cannot change under an execution that pinned it.
        object.__setattr__(self, "steps", tuple(self.steps))

    def step(self, step_id: str) -> RunbookStep:
        for step in self.steps:
            if step.step_id == step_id:
                return step
        raise NotFoundError(f"runbook {self.runbook_id!r} has no step {step_id!r}")


@dataclass(frozen=True)
class ActionInfo:
    name: str
    description: str
    idempotent: bool
    kind: ActionKind


@dataclass
class ActionContext:
    """What a handler learns about the step it runs for; `log` writes into the execution's audit trail."""

    execution_id: str
    runbook_id: str
    step_id: str
    triggered_by: str
    variables: Mapping[str, Any]
    attempt: int
    timeout_s: float
    now: datetime
    rollback: bool = False
    messages: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.messages.append(str(message))


ActionHandler = Callable[[dict[str, Any], ActionContext], Awaitable[Mapping[str, Any] | None]]
AgentInvoker = Callable[[str, dict[str, Any], float], Awaitable[Mapping[str, Any]]]


ParameterCheck = Callable[[Mapping[str, Any]], list[tuple[str, str]]]
"""An action's parameter rules: the (parameter, problem) pairs of a step's parameters. Run on the
rendered parameters when the step runs (see `require_parameters`), and on the literal ones (no `${...}`
in them: a check skips what is only known then) when the runbook is registered, so a definition that
can only fail is refused up front. Given to `RunbookEngine.register_action`."""


@dataclass(frozen=True)
class ActionDefinition:
    """A handler with its metadata, as returned by `builtin_actions()`."""

    name: str
    handler: ActionHandler
    description: str
    idempotent: bool
    check: ParameterCheck | None = None


# --- built-in actions -------------------------------------------------------------------------------


def _log_problems(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [] if "message" in params else [("message", "log needs a message")]


def _wait_problems(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    seconds = params.get("seconds", 0)
    if variable_references(seconds):
        return []  # known when the step runs
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
        return [("seconds", "wait needs a non-negative number of seconds")]
    return []


def _set_variable_problems(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    name = params.get("name")
    if variable_references(name):
        return []
    if not isinstance(name, str) or not name:
        return [("name", "set_variable needs a variable name")]
    return []


_PARAMETER_PROBLEMS: Final[dict[str, Callable[[Mapping[str, Any]], list[tuple[str, str]]]]] = {
    "log": _log_problems,
    "wait": _wait_problems,
    "set_variable": _set_variable_problems,
}


def require_parameters(check: ParameterCheck, params: Mapping[str, Any]) -> None:
    """ValidationError (fields `parameters.<name>`) when rendered parameters break an action's rules."""
    problems = check(params)
    if problems:
        raise ValidationError([FieldViolation(f"parameters.{name}", problem) for name, problem in problems])


def _require_parameters(action: str, params: Mapping[str, Any]) -> None:
    require_parameters(_PARAMETER_PROBLEMS[action], params)


async def _log_action(params: dict[str, Any], ctx: ActionContext) -> None:
    _require_parameters("log", params)
    ctx.log(str(params["message"]))


async def _wait_action(params: dict[str, Any], ctx: ActionContext) -> None:
    _require_parameters("wait", params)
    await asyncio.sleep(params.get("seconds", 0))


async def _set_variable_action(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    _require_parameters("set_variable", params)
    return {params["name"]: params.get("value")}


def builtin_actions() -> list[ActionDefinition]:
    """The pure built-ins (log, wait, set_variable); the server adds NATS `publish` via register_action."""
    return [
        ActionDefinition(
            "log", _log_action, "Record parameters.message in the execution's audit trail.", True, _log_problems
        ),
        ActionDefinition("wait", _wait_action, "Wait parameters.seconds seconds.", True, _wait_problems),
        ActionDefinition(
            "set_variable",
            _set_variable_action,
            "Set execution variable parameters.name to parameters.value.",
            True,
            _set_variable_problems,
        ),
    ]


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutionEvent:
    """One fact in an execution's stream. `data` is JSON-able; `seq` starts at 1 per execution.
    `tracking_id` names the request that caused it ('' when the engine has no tracking source)."""

    execution_id: str
    seq: int
    type: EventType
    occurred_time: datetime
    actor: str
    data: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = CURRENT_SCHEMA_VERSION
    tracking_id: str = ""


def event_to_dict(event: ExecutionEvent) -> dict[str, Any]:
    """The current (v2) JSON-able form of an event."""
    return {
        "schema_version": CURRENT_SCHEMA_VERSION,
        "execution_id": event.execution_id,
        "seq": event.seq,
        "type": event.type.value,
        "occurred_time": event.occurred_time.isoformat(),
        "actor": event.actor,
        "data": _json_copy(event.data),
        "tracking_id": event.tracking_id,
    }


# v1 (written before approvals could expire and before agent actions) spelled event kinds in lower case
# and called APPROVAL_GRANTED "approval_given"; EXECUTION_FINISHED carried {"final_status": "completed"}.
_V1_KIND_RENAMES: Final = MappingProxyType({"approval_given": EventType.APPROVAL_GRANTED.value})


def upcast(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a stored event dict of any known schema version to the current one (v2).

    v1 shape (schema_version 1, or no schema_version key at all - the first writer omitted it)::

        {"execution_id": str, "seq": int, "kind": "step_started", "by": "alice",
         "ts": 1767225600.0 (epoch seconds, UTC), "data": {...}}

    Differences from v2: `kind` (lower case; "approval_given" for APPROVAL_GRANTED) instead of `type`,
    `by` instead of `actor`, `ts` epoch float instead of an ISO-8601 `occurred_time`, `data.step`
    instead of `data.step_id`, and EXECUTION_FINISHED data `{"final_status": "completed"}` instead of
    `{"status": "COMPLETED"}`.
    """
    version = raw.get("schema_version", 1)
    if version == CURRENT_SCHEMA_VERSION:
        return dict(raw)
    if version != 1:
        raise ValidationError.single("event.schema_version", f"unsupported event schema version {version!r}")
    violations = [
        FieldViolation(f"event.{key}", "missing in a v1 event") for key in ("kind", "ts", "seq") if key not in raw
    ]
    if violations:
        raise ValidationError(violations)
    kind = str(raw["kind"])
    type_name = _V1_KIND_RENAMES.get(kind, kind.upper())
    ts = raw["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValidationError.single("event.ts", "a v1 timestamp is epoch seconds")
    data = dict(raw.get("data") or {})
    if "step" in data and "step_id" not in data:
        data["step_id"] = data.pop("step")
    if type_name == EventType.EXECUTION_FINISHED.value and "final_status" in data:
        data["status"] = str(data.pop("final_status")).upper()
    return {
        "schema_version": CURRENT_SCHEMA_VERSION,
        "execution_id": raw.get("execution_id", ""),
        "seq": raw["seq"],
        "type": type_name,
        "occurred_time": datetime.fromtimestamp(float(ts), UTC).isoformat(),
        "actor": raw.get("by") or SYSTEM_ACTOR,
        "data": data,
        # v1 knew no tracking ids; a store that kept one beside the event passes it along.
        **({"tracking_id": raw["tracking_id"]} if "tracking_id" in raw else {}),
    }


def event_from_dict(raw: Mapping[str, Any]) -> ExecutionEvent:
    """Parse a stored event dict (any known schema version, upcast first); ValidationError if malformed."""
    d = upcast(raw)
    violations: list[FieldViolation] = []
    execution_id = d.get("execution_id")
    if not isinstance(execution_id, str) or not execution_id:
        violations.append(FieldViolation("event.execution_id", "must be a non-empty string"))
    seq = d.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        violations.append(FieldViolation("event.seq", "must be an integer >= 1"))
    type_name = d.get("type")
    if type_name not in EventType.__members__:
        violations.append(FieldViolation("event.type", f"unknown event type {type_name!r}"))
    occurred: datetime | None = None
    try:
        occurred = datetime.fromisoformat(str(d.get("occurred_time")))
    except ValueError:
        violations.append(FieldViolation("event.occurred_time", "must be an ISO-8601 timestamp"))
    if occurred is not None and occurred.tzinfo is None:
        violations.append(FieldViolation("event.occurred_time", "must carry a time zone"))
    actor = d.get("actor")
    if not isinstance(actor, str) or not actor:
        violations.append(FieldViolation("event.actor", "must be a non-empty string"))
    data = d.get("data", {})
    if not isinstance(data, Mapping):
        violations.append(FieldViolation("event.data", "must be an object"))
    # Optional: events written before tracking ids were recorded have none.
    tracking_id = d.get("tracking_id", "")
    if not isinstance(tracking_id, str):
        violations.append(FieldViolation("event.tracking_id", "must be a string"))
    if violations:
        raise ValidationError(violations)
    assert occurred is not None  # for mypy: a parse failure was reported above
    return ExecutionEvent(
        execution_id=str(execution_id),
        seq=int(seq),  # type: ignore[arg-type]  # checked above: an int >= 1
        type=EventType(str(type_name)),
        occurred_time=occurred.astimezone(UTC),
        actor=str(actor),
        data=_json_copy(data),
        tracking_id=str(tracking_id),
    )


# --- projection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepState:
    step_id: str
    action: str
    status: StepStatus
    started_time: datetime | None
    finished_time: datetime | None
    attempts: int
    error: str | None
    output: Mapping[str, Any] | None
    approved_by: str | None
    approval_expires_time: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    """One transition: who (`actor`) did what (`transition`, an EventType name) to which step, when, and
    under which request (`tracking_id`)."""

    time: datetime
    actor: str
    transition: str
    step_id: str
    detail: str
    seq: int
    tracking_id: str = ""


@dataclass(frozen=True)
class ExecutionContext:
    """An execution's state: the fold of its events. `version` is the last event's seq; `incident_id` and
    `tracking_id` come from EXECUTION_STARTED (the incident it was started for, the request that started it)."""

    execution_id: str
    runbook_id: str
    runbook_version: int
    triggered_by: str
    status: RunbookStatus
    current_step_index: int
    step_states: Mapping[str, StepState]
    variables: Mapping[str, Any]
    audit_log: Sequence[AuditEntry]
    started_time: datetime
    finished_time: datetime | None
    error: str | None
    version: int
    incident_id: str = ""
    tracking_id: str = ""

    @property
    def finished(self) -> bool:
        return self.status is not RunbookStatus.RUNNING

    @property
    def awaiting_approval(self) -> list[str]:
        """Step ids waiting for an approval (at most one: steps run in order)."""
        return [s.step_id for s in self.step_states.values() if s.status is StepStatus.AWAITING_APPROVAL]


@dataclass
class _StepRecord:
    step_id: str
    action: str
    status: StepStatus = StepStatus.PENDING
    started_time: datetime | None = None
    finished_time: datetime | None = None
    attempts: int = 0
    error: str | None = None
    output: dict[str, Any] | None = None
    approved_by: str | None = None
    approval_expires_time: datetime | None = None
    # A FAILED step whose action timed out or was interrupted: it may have acted (see `_rolls_back`).
    effect_unknown: bool = False

    def freeze(self) -> StepState:
        return StepState(
            step_id=self.step_id,
            action=self.action,
            status=self.status,
            started_time=self.started_time,
            finished_time=self.finished_time,
            attempts=self.attempts,
            error=self.error,
            output=_json_copy(self.output) if self.output is not None else None,
            approved_by=self.approved_by,
            approval_expires_time=self.approval_expires_time,
        )


class _Projection:
    """The mutable fold of one execution's events; the engine applies each new event incrementally."""

    def __init__(self, runbook: Runbook) -> None:
        self.runbook = runbook
        self.execution_id = ""
        self.triggered_by = ""
        self.incident_id = ""
        self.tracking_id = ""
        self.status = RunbookStatus.RUNNING
        self.steps: dict[str, _StepRecord] = {s.step_id: _StepRecord(s.step_id, s.action) for s in runbook.steps}
        self.variables: dict[str, Any] = {}
        self.audit: list[AuditEntry] = []
        self.started_time: datetime | None = None
        self.finished_time: datetime | None = None
        self.error: str | None = None
        self.version = 0
        self.rollback_in_progress = False
        self.rollback_attempted = False
        # The error the execution had when its first rollback started: a rollback that completes ends
        # with it, also when it is a retry after an incomplete one (whose error is "rollback incomplete").
        self.error_before_rollback: str | None = None

    def current_index(self) -> int:
        for index, step in enumerate(self.runbook.steps):
            if self.steps[step.step_id].status in _OPEN_STEP:
                return index
        return len(self.runbook.steps)

    def apply(self, event: ExecutionEvent) -> None:
        if event.seq != self.version + 1:
            raise ValidationError.single("events", f"event seq {event.seq} follows seq {self.version}; gap or repeat")
        if self.version == 0:
            if event.type is not EventType.EXECUTION_STARTED:
                raise ValidationError.single("events[0].type", "an execution stream starts with EXECUTION_STARTED")
            self.execution_id = event.execution_id
        elif event.execution_id != self.execution_id:
            raise ValidationError.single("events", f"event {event.seq} belongs to execution {event.execution_id!r}")
        data = event.data
        step_id = str(data.get("step_id", ""))
        rec: _StepRecord | None = None
        if step_id:
            rec = self.steps.get(step_id)
            if rec is None:
                raise ValidationError.single(f"events[{event.seq - 1}].data.step_id", f"unknown step {step_id!r}")
        at = event.occurred_time
        kind = event.type
        if kind is EventType.EXECUTION_STARTED:
            self.triggered_by = str(data.get("triggered_by", event.actor))
            self.incident_id = str(data.get("incident_id", ""))
            self.tracking_id = event.tracking_id
            self.variables = dict(_json_copy(data.get("variables", {})))
            self.started_time = at
        elif kind is EventType.EXECUTION_FINISHED:
            self.status = RunbookStatus(str(data["status"]))
            self.error = data.get("error")
            self.finished_time = at
            self.rollback_in_progress = False
        elif kind is EventType.VARIABLE_SET:
            self.variables[str(data["name"])] = _json_copy(data.get("value"))
        elif kind is EventType.ROLLBACK_STARTED:
            if not self.rollback_attempted:
                self.error_before_rollback = self.error
            self.rollback_in_progress = True
            self.rollback_attempted = True
        elif rec is not None:
            self._apply_step(kind, rec, data, event)
        self.version = event.seq
        self.audit.append(
            AuditEntry(
                time=at,
                actor=event.actor,
                transition=kind.value,
                step_id=step_id,
                detail=_describe(event),
                seq=event.seq,
                tracking_id=event.tracking_id,
            )
        )

    @staticmethod
    def _apply_step(kind: EventType, rec: _StepRecord, data: Mapping[str, Any], event: ExecutionEvent) -> None:
        at = event.occurred_time
        if kind is EventType.STEP_STARTED:
            rec.status = StepStatus.RUNNING
            rec.started_time = at
            rec.finished_time = None
            rec.attempts += 1
            rec.error = None
            rec.effect_unknown = False
        elif kind is EventType.STEP_COMPLETED:
            rec.status = StepStatus.COMPLETED
            rec.finished_time = at
            output = data.get("output")
            rec.output = dict(output) if isinstance(output, Mapping) else None
        elif kind in (EventType.STEP_FAILED, EventType.APPROVAL_EXPIRED, EventType.APPROVAL_REJECTED):
            rec.status = StepStatus.FAILED
            rec.finished_time = at
            rec.error = str(data.get("reason", ""))
            rec.effect_unknown = bool(data.get("effect_unknown", False))
        elif kind is EventType.STEP_SKIPPED:
            rec.status = StepStatus.SKIPPED
            rec.finished_time = at
        elif kind is EventType.STEP_INTERRUPTED:
            rec.status = StepStatus.PENDING
            rec.error = str(data.get("reason", ""))
        elif kind is EventType.APPROVAL_REQUESTED:
            rec.status = StepStatus.AWAITING_APPROVAL
            expires = data.get("expires_time")
            rec.approval_expires_time = datetime.fromisoformat(expires) if isinstance(expires, str) else None
        elif kind is EventType.APPROVAL_GRANTED:
            rec.status = StepStatus.PENDING
            rec.approved_by = str(data.get("approver", event.actor))
        elif kind is EventType.STEP_ROLLED_BACK:
            rec.status = StepStatus.ROLLED_BACK
            rec.error = None
        elif kind is EventType.STEP_ROLLBACK_FAILED:
            rec.error = f"rollback failed: {data.get('reason', '')}"
        # ACTION_LOGGED and ROLLBACK_INTERRUPTED (and INCIDENT_CLOSED, which names no step) change
        # nothing but the audit trail.

    def snapshot(self) -> ExecutionContext:
        assert self.started_time is not None  # every projection starts with EXECUTION_STARTED
        return ExecutionContext(
            execution_id=self.execution_id,
            runbook_id=self.runbook.runbook_id,
            runbook_version=self.runbook.version,
            triggered_by=self.triggered_by,
            status=self.status,
            current_step_index=self.current_index(),
            step_states={step_id: rec.freeze() for step_id, rec in self.steps.items()},
            variables=_json_copy(self.variables),
            audit_log=tuple(self.audit),
            started_time=self.started_time,
            finished_time=self.finished_time,
            error=self.error,
            version=self.version,
            incident_id=self.incident_id,
            tracking_id=self.tracking_id,
        )


def _describe(event: ExecutionEvent) -> str:
    d = event.data
    kind = event.type
    if kind is EventType.EXECUTION_STARTED:
        return f"runbook {d.get('runbook_id')} v{d.get('runbook_version')} started by {d.get('triggered_by')}"
    if kind is EventType.STEP_STARTED:
        return f"attempt {d.get('attempt')} of action {d.get('action')}"
    if kind is EventType.STEP_COMPLETED:
        output = d.get("output")
        return "completed" + (f"; output keys {sorted(output)}" if isinstance(output, Mapping) and output else "")
    if kind is EventType.APPROVAL_REQUESTED:
        expires = d.get("expires_time")
        return "approval required" + (f" before {expires}" if expires else "")
    if kind is EventType.APPROVAL_GRANTED:
        return f"approved by {d.get('approver', event.actor)}"
    if kind is EventType.VARIABLE_SET:
        value = json.dumps(d.get("value"), sort_keys=True)
        if len(value) > _AUDIT_VALUE_CHARS:
            value = value[:_AUDIT_VALUE_CHARS] + f"… ({len(value)} characters)"
        return f"{d.get('name')} = {value}"
    if kind is EventType.ACTION_LOGGED:
        return str(d.get("message", ""))
    if kind is EventType.STEP_ROLLED_BACK:
        return f"rollback action {d.get('rollback_action')} succeeded"
    if kind is EventType.EXECUTION_FINISHED:
        error = d.get("error")
        return f"execution {d.get('status')}" + (f": {error}" if error else "")
    return str(d.get("reason", ""))


def project(runbook: Runbook, events: Sequence[ExecutionEvent], as_of: datetime | None = None) -> ExecutionContext:
    """Fold `events` (optionally only those that occurred at or before `as_of`) into the execution's state.

    ValidationError when the stream is empty (before `as_of`), has gaps, mixes executions or names
    steps the runbook does not have.
    """
    projection = _Projection(runbook)
    for event in events:
        if as_of is not None and event.occurred_time > as_of:
            break  # streams are in seq order, and seq order is time order
        projection.apply(event)
    if projection.version == 0:
        raise ValidationError.single("events", "no events" + (f" at or before {as_of.isoformat()}" if as_of else ""))
    return projection.snapshot()


_MAX_DOUBLE = sys.float_info.max
MAX_ACTION_DESCRIPTION_LEN = 1024
MAX_REJECT_REASON_LEN = 4096
MAX_JSON_BYTES = 256 * 1024
"""Largest start variables, action output and runbook definition, as compact JSON. Variables and
output travel whole in one event, and a NATS message holds 1 MiB by default: the outbox relay sets
aside an event it cannot send. Definitions travel in replies: a few megabytes each made every
ListRunbooks page outgrow the 4 MiB message limit."""


MAX_VARIABLES_BYTES = 1024 * 1024
"""Largest an execution's variables may grow as step outputs are merged into them: they travel whole in
every answer about the execution (its status, each step's reply, each watch update), beside the
outputs, and twenty outputs of MAX_JSON_BYTES made that outgrow the 4 MiB message limit."""

_AUDIT_VALUE_CHARS = 200
"""A variable's value in its audit entry is cut to this many characters: the trail says what changed;
the value is whole in the variables and the step's output."""


def _json_size_problem(value: Any, limit: int = MAX_JSON_BYTES) -> str | None:
    """Why a JSON-able value is too large (None when it is not): to carry in an event, by default."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    return f"at most {limit} bytes as JSON, got {size}" if size > limit else None


# --- validation and rendering ----------------------------------------------------------------------


def _json_violations(value: Any, path: str, out: list[FieldViolation], depth: int = 0) -> None:
    """Problems of a value that must be stored (jsonb) and sent (protobuf Struct, whose numbers are doubles)."""
    if depth > 64:
        out.append(FieldViolation(path, "nested too deeply"))
    elif value is None or isinstance(value, bool):
        return
    elif isinstance(value, str):
        problem = chars_problem(value)
        if problem is not None:
            out.append(FieldViolation(path, problem))
    elif isinstance(value, int):
        if abs(value) > _MAX_DOUBLE:
            out.append(FieldViolation(path, "numbers must be finite (this integer is beyond any double)"))
    elif isinstance(value, float):
        if not math.isfinite(value):
            out.append(FieldViolation(path, "numbers must be finite"))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _json_violations(item, f"{path}[{i}]", out, depth + 1)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(FieldViolation(path, f"object keys must be strings, not {type(key).__name__}"))
            elif (problem := chars_problem(key)) is not None:
                out.append(FieldViolation(path, f"object key {key[:32]!r} {problem}"))
            else:
                _json_violations(item, f"{path}.{key}", out, depth + 1)
    else:
        out.append(FieldViolation(path, f"{type(value).__name__} is not JSON-able"))


def _json_copy(value: Any) -> Any:
    # Cheaper than copy.deepcopy for the JSON-shaped values that flow through events.
    if isinstance(value, Mapping):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_copy(v) for v in value]
    return value


def _positive_finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 < value < math.inf


def _runbook_violations(
    runbook: Runbook, known_actions: Mapping[str, ParameterCheck | None] | None, *, stored: bool = False
) -> list[FieldViolation]:
    """`known_actions`: each action that may be named, with its parameter rules (None: no check)."""
    out: list[FieldViolation] = []
    if not isinstance(runbook.runbook_id, str) or not _ID_RE.match(runbook.runbook_id):
        out.append(FieldViolation("runbook.runbook_id", "must be 1-128 letters, digits, '.', '_' or '-'"))
    if not isinstance(runbook.name, str) or not runbook.name.strip():
        out.append(FieldViolation("runbook.name", "must not be empty"))
    if runbook.status not in (RunbookStatus.ACTIVE, RunbookStatus.DRAFT):
        out.append(FieldViolation("runbook.status", "a runbook definition is ACTIVE or DRAFT"))
    if not runbook.steps:
        out.append(FieldViolation("runbook.steps", "at least one step is required"))
    seen: dict[str, int] = {}
    for i, step in enumerate(runbook.steps):
        prefix = f"runbook.steps[{i}]"
        if not isinstance(step.step_id, str) or not _ID_RE.match(step.step_id):
            out.append(FieldViolation(f"{prefix}.step_id", "must be 1-128 letters, digits, '.', '_' or '-'"))
        elif step.step_id in seen:
            out.append(
                FieldViolation(
                    f"{prefix}.step_id", f"duplicate step id {step.step_id!r} (also steps[{seen[step.step_id]}])"
                )
            )
        else:
            seen[step.step_id] = i
        if not isinstance(step.action, str) or not step.action:
            out.append(FieldViolation(f"{prefix}.action", "must name an action"))
        elif known_actions is not None and step.action not in known_actions:
            out.append(FieldViolation(f"{prefix}.action", f"unknown action {step.action!r}"))
        if not _positive_finite(step.timeout_s):
            out.append(
                FieldViolation(f"{prefix}.timeout", f"must be a positive number of seconds, not {step.timeout_s!r}")
            )
        if step.rollback_action is not None:
            if not step.rollback_action:
                out.append(FieldViolation(f"{prefix}.rollback_action", "must name an action or be unset"))
            elif known_actions is not None and step.rollback_action not in known_actions:
                out.append(FieldViolation(f"{prefix}.rollback_action", f"unknown action {step.rollback_action!r}"))
        elif step.rollback_parameters:
            out.append(FieldViolation(f"{prefix}.rollback_parameters", "given without a rollback_action"))
        if step.approval_timeout_s is not None:
            if not step.requires_approval:
                out.append(FieldViolation(f"{prefix}.approval_timeout", "only meaningful with requires_approval"))
            elif not _positive_finite(step.approval_timeout_s):
                out.append(FieldViolation(f"{prefix}.approval_timeout", "must be a positive number of seconds"))
        for name, action in (("parameters", step.action), ("rollback_parameters", step.rollback_action)):
            value = getattr(step, name)
            if not isinstance(value, Mapping):
                out.append(FieldViolation(f"{prefix}.{name}", "must be an object"))
                continue
            _json_violations(value, f"{prefix}.{name}", out)
            check = known_actions.get(action or "") if known_actions is not None else None
            if check is not None:
                out.extend(FieldViolation(f"{prefix}.{name}.{key}", problem) for key, problem in check(value))
    # A stored version may hold a $regex from before RE2 (a lookaround, say): it must still load, and never
    # matches; refusing it would stop the service from starting.
    out.extend(validate_conditions(runbook.trigger_conditions, "runbook.trigger_conditions", lenient_regex=stored))
    if runbook.auto_start and not runbook.trigger_conditions:
        out.append(FieldViolation("runbook.trigger_conditions", "auto_start needs trigger conditions"))
    # Measured only when the rest is sound (it must serialise); a stored version is loaded as it is.
    if not out and not stored and (problem := _json_size_problem(runbook_to_dict(runbook))) is not None:
        out.append(FieldViolation("runbook", problem))
    return out


def validate_runbook(
    runbook: Runbook, known_actions: Mapping[str, ParameterCheck | None] | Collection[str] | None = None
) -> list[str]:
    """Every problem with a definition, as "field: description" strings (empty when valid).

    Checks at least one step, unique step ids, positive timeouts, JSON-able parameters and valid trigger
    conditions; with `known_actions` also that every action and rollback action is one of them, and
    that literal parameters keep the actions' rules (`RunbookEngine.action_checks`; given only names,
    the built-ins' rules).
    """
    if known_actions is not None and not isinstance(known_actions, Mapping):
        known_actions = {name: _PARAMETER_PROBLEMS.get(name) for name in known_actions}
    return [f"{v.field}: {v.description}" for v in _runbook_violations(runbook, known_actions)]


def variable_references(value: Any) -> set[str]:
    """The `${name}` references in a (nested) parameter value, escaped `$${...}` excluded."""
    found: set[str] = set()

    def walk(item: Any) -> None:
        if isinstance(item, str):
            found.update(m.group(2) for m in _REFERENCE_RE.finditer(item) if not m.group(1))
        elif isinstance(item, Mapping):
            for v in item.values():
                walk(v)
        elif isinstance(item, list | tuple):
            for v in item:
                walk(v)

    walk(value)
    return found


def render_parameters(value: Any, variables: Mapping[str, Any], *, keep_missing: bool = False) -> Any:
    """Substitute `${name}` references in strings of a nested value; a missing variable is a ValidationError
    (with `keep_missing`, as a dry run renders what a step may set later, the reference stays as written).

    A string that is exactly one reference becomes the variable's value with its type; references
    embedded in text are rendered as text (strings verbatim, other values as JSON).
    """
    if isinstance(value, str):
        match = _REFERENCE_RE.fullmatch(value)
        if match is not None and not match.group(1):
            if keep_missing and resolve_path(variables, match.group(2)) is MISSING:
                return value
            return _json_copy(_lookup(variables, match.group(2)))

        def substitute(m: re.Match[str]) -> str:
            if m.group(1):
                return m.group(0)[1:]  # "$${x}" is an escaped literal "${x}"
            if keep_missing and resolve_path(variables, m.group(2)) is MISSING:
                return m.group(0)
            found = _lookup(variables, m.group(2))
            return found if isinstance(found, str) else json.dumps(found, sort_keys=True)

        return _REFERENCE_RE.sub(substitute, value)
    if isinstance(value, Mapping):
        return {k: render_parameters(v, variables, keep_missing=keep_missing) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render_parameters(v, variables, keep_missing=keep_missing) for v in value]
    return value


def _lookup(variables: Mapping[str, Any], name: str) -> Any:
    found = resolve_path(variables, name)
    if found is MISSING:
        raise ValidationError.single(f"variables.{name}", "referenced by a step but not provided")
    return found


# Built-ins that never return variables (set_variable returns the one it names).
_SETS_NOTHING: Final = frozenset({"log", "wait"})


def _may_set(step: RunbookStep) -> set[str] | None:
    """The variables a completed step may have set (None: any - an action whose output is not known)."""
    if step.action in _SETS_NOTHING:
        return set()
    if step.action == "set_variable":
        name = step.parameters.get("name")
        return {name} if isinstance(name, str) and not variable_references(name) else None
    return None


def unprovided_references(runbook: Runbook, provided: Callable[[str], bool]) -> list[tuple[int, str, str]]:
    """(step index, "parameters" or "rollback_parameters", reference) of every reference that can only
    fail: not `provided` and not set by an earlier step (see the module docstring); a rollback runs
    after its own step, so it may also use what that one set."""
    out: list[tuple[int, str, str]] = []
    settable: set[str] | None = set()  # None once an earlier step may have set anything

    def check(i: int, name: str) -> None:
        step = runbook.steps[i]
        for ref in sorted(variable_references(getattr(step, name))):
            if settable is None or ref.split(".", 1)[0] in settable:
                continue
            if not provided(ref):
                out.append((i, name, ref))

    for i, step in enumerate(runbook.steps):
        check(i, "parameters")
        sets = _may_set(step)
        settable = None if sets is None or settable is None else settable | sets
        check(i, "rollback_parameters")
    return out


def _missing_variables(runbook: Runbook, variables: Mapping[str, Any]) -> list[FieldViolation]:
    """References the start variables cannot satisfy (`unprovided_references`)."""
    return [
        FieldViolation(f"variables.{ref}", f"required by runbook.steps[{i}].{name} but not provided")
        for i, name, ref in unprovided_references(runbook, lambda ref: resolve_path(variables, ref) is not MISSING)
    ]


# --- runbook serialisation (for the store) ----------------------------------------------------------


def runbook_to_dict(runbook: Runbook) -> dict[str, Any]:
    """A JSON-able dict of a definition (what the store persists per version)."""
    return {
        "runbook_id": runbook.runbook_id,
        "name": runbook.name,
        "description": runbook.description,
        "steps": [
            {
                "step_id": s.step_id,
                "action": s.action,
                "parameters": _json_copy(s.parameters),
                "requires_approval": s.requires_approval,
                "timeout_s": s.timeout_s,
                "rollback_action": s.rollback_action,
                "rollback_parameters": _json_copy(s.rollback_parameters),
                "approval_timeout_s": s.approval_timeout_s,
            }
            for s in runbook.steps
        ],
        "trigger_conditions": _json_copy(runbook.trigger_conditions),
        "auto_start": runbook.auto_start,
        "auto_rollback": runbook.auto_rollback,
        "version": runbook.version,
        "status": runbook.status.value,
        "create_time": runbook.create_time.isoformat() if runbook.create_time else None,
    }


def runbook_from_dict(d: Mapping[str, Any]) -> Runbook:
    """Inverse of `runbook_to_dict`; ValidationError when the dict is not shaped like one."""
    try:
        steps = [
            RunbookStep(
                step_id=s["step_id"],
                action=s["action"],
                parameters=dict(s.get("parameters") or {}),
                requires_approval=bool(s.get("requires_approval", False)),
                timeout_s=s.get("timeout_s", DEFAULT_STEP_TIMEOUT_S),
                rollback_action=s.get("rollback_action") or None,
                rollback_parameters=dict(s.get("rollback_parameters") or {}),
                approval_timeout_s=s.get("approval_timeout_s"),
            )
            for s in d["steps"]
        ]
        create_time = d.get("create_time")
        return Runbook(
            runbook_id=d["runbook_id"],
            name=d["name"],
            description=d.get("description", ""),
            steps=steps,
            trigger_conditions=dict(d.get("trigger_conditions") or {}),
            auto_start=bool(d.get("auto_start", False)),
            auto_rollback=bool(d.get("auto_rollback", False)),
            version=int(d.get("version", 0)),
            status=RunbookStatus(d.get("status", RunbookStatus.ACTIVE.value)),
            create_time=datetime.fromisoformat(create_time) if create_time else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValidationError.single("runbook", f"not a stored runbook: {exc!r}") from exc


def _definition_key(runbook: Runbook) -> str:
    d = runbook_to_dict(runbook)
    del d["version"], d["create_time"]
    return json.dumps(d, sort_keys=True)


# --- the engine -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedStep:
    """A dry run's view of one step. `would_run`: runs right after start, without waiting for an approval
    (True for the steps before the first approval gate)."""

    step_id: str
    action: str
    parameters: Mapping[str, Any]
    requires_approval: bool
    would_run: bool
    rollback_action: str | None = None


@dataclass
class _Action:
    info: ActionInfo
    handler: ActionHandler
    check: ParameterCheck | None = None


@dataclass
class _Execution:
    runbook: Runbook
    events: list[ExecutionEvent]
    state: _Projection
    lock: asyncio.Lock
    taken: int = 0


def _check_stop(who: tuple[str, object, str], reason: str) -> None:
    """ValidationError naming every problem of a request to stop an execution (reject a step, cancel):
    `who` is (field, value, what to say when it is empty); the reason is kept, so it is bounded."""
    field, value, missing = who
    problems = []
    if not isinstance(value, str) or not value.strip():
        problems.append(FieldViolation(field, missing))
    problem = text_problem(reason, MAX_REJECT_REASON_LEN)
    if problem is not None:
        problems.append(FieldViolation("reason", problem))
    if problems:
        raise ValidationError(problems)


def _not_awaiting_approval(step_id: str, record: _StepRecord) -> FailedPreconditionError:
    """Why a step cannot be approved or rejected now; for one approved already, by whom and what follows."""
    if record.status is StepStatus.PENDING and record.approved_by is not None:
        return FailedPreconditionError(
            f"step {step_id!r} was approved by {record.approved_by!r} already; it runs on the next"
            " ExecuteNextStep (CancelExecution stops it)"
        )
    return FailedPreconditionError(f"step {step_id!r} is {record.status.value}, not awaiting approval")


def _new_id() -> str:
    return uuid.uuid4().hex


def _no_tracking() -> str:
    return ""


def _reason(exc: BaseException) -> str:
    # Failure texts come from anywhere (an agent's error string): NUL, which could not be stored,
    # becomes the replacement character rather than losing the failure.
    text = str(exc).replace("\x00", "\ufffd")
    return text if text else type(exc).__name__


class RunbookEngine:
    """Registers actions and runbooks and runs executions as event streams held in memory."""

    def __init__(
        self,
        clock: Clock | None = None,
        id_factory: Callable[[], str] = _new_id,
        *,
        register_builtins: bool = True,
        tracking: Callable[[], str] | None = None,
    ) -> None:
        """`tracking()` names the request on whose behalf events are being appended; every new event
        records it (the application passes the current request's tracking id)."""
        self._clock: Clock = clock or SystemClock()
        self._id_factory = id_factory
        self._tracking: Callable[[], str] = tracking or _no_tracking
        self._actions: dict[str, _Action] = {}
        self._runbooks: dict[str, dict[int, Runbook]] = {}
        self._executions: dict[str, _Execution] = {}
        self._agent_invoker: AgentInvoker | None = None
        if register_builtins:
            for action in builtin_actions():
                self.register_action(
                    action.name,
                    action.handler,
                    idempotent=action.idempotent,
                    description=action.description,
                    builtin=True,
                    check=action.check,
                )

    # -- actions --

    def register_action(
        self,
        name: str,
        handler: ActionHandler,
        *,
        idempotent: bool = False,
        description: str = "",
        builtin: bool = False,
        check: ParameterCheck | None = None,
    ) -> ActionInfo:
        """Register an async handler under `name`; ValidationError for a bad name or a non-async handler.

        `check`: the action's parameter rules, applied to literal parameters when a runbook is
        registered (the handler applies them to rendered ones, e.g. with `require_parameters`)."""
        violations: list[FieldViolation] = []
        if not isinstance(name, str) or not _ACTION_NAME_RE.match(name):
            violations.append(
                FieldViolation("action_name", "must start with a letter: letters, digits, '_', '.', '-' (max 64)")
            )
        if not _is_async_callable(handler):
            violations.append(FieldViolation("handler", "must be an async function (async def)"))
        if violations:
            raise ValidationError(violations)
        if name in self._actions:
            raise AlreadyExistsError(f"action {name!r} is already registered")
        info = ActionInfo(name, description, idempotent, ActionKind.BUILTIN if builtin else ActionKind.CUSTOM)
        self._actions[name] = _Action(info, handler, check)
        return info

    def declare_agent_action(self, name: str, *, description: str = "", idempotent: bool = False) -> ActionInfo:
        """Declare `agent:<name>`, answered through the agent invoker (see `set_agent_invoker`)."""
        if not isinstance(name, str) or not _ACTION_NAME_RE.match(name):
            raise ValidationError.single("name", "must start with a letter: letters, digits, '_', '.', '-' (max 64)")
        problem = text_problem(description, MAX_ACTION_DESCRIPTION_LEN)
        if problem is not None:  # announced by an agent over NATS, and listed to every operator
            raise ValidationError.single("description", problem)
        full = AGENT_PREFIX + name
        if full in self._actions:
            raise AlreadyExistsError(f"action {full!r} is already declared")

        async def invoke(params: dict[str, Any], ctx: ActionContext) -> Mapping[str, Any] | None:
            invoker = self._agent_invoker
            if invoker is None:
                raise UnavailableError(f"no agent invoker configured for {full}")
            result = await invoker(name, params, ctx.timeout_s)
            return result

        info = ActionInfo(full, description, idempotent, ActionKind.AGENT)
        self._actions[full] = _Action(info, invoke)
        return info

    def action_checks(self) -> dict[str, ParameterCheck | None]:
        """Every action that a runbook may name, with its parameter rules (None: none known)."""
        return {name: action.check for name, action in self._actions.items()}

    def set_agent_invoker(self, invoker: AgentInvoker | None) -> None:
        """`invoker(agent_name, params, timeout_s)`; whatever it raises (e.g. an open circuit) fails the step."""
        self._agent_invoker = invoker

    def list_actions(self) -> list[ActionInfo]:
        return sorted(
            (a.info for a in self._actions.values()), key=lambda info: (info.kind != ActionKind.BUILTIN, info.name)
        )

    # -- runbooks --

    def register_runbook(self, runbook: Runbook) -> Runbook:
        """Validate and register; see the module docstring for versioning. Returns the stored version."""
        return self.register_runbook_ex(runbook)[0]

    def register_runbook_ex(self, runbook: Runbook) -> tuple[Runbook, bool]:
        """Like `register_runbook`, also saying whether a new version was created (False: identical)."""
        violations = _runbook_violations(runbook, self.action_checks())
        if violations:
            raise ValidationError(violations)
        versions = self._runbooks.setdefault(runbook.runbook_id, {})
        if versions:
            latest = versions[max(versions)]
            if _definition_key(latest) == _definition_key(runbook):
                return latest, False
        stored = _replace_runbook(runbook, version=max(versions, default=0) + 1, create_time=self._clock.now())
        versions[stored.version] = stored
        return stored, True

    def restore_runbook(self, runbook: Runbook) -> None:
        """Reinstall a stored version as is (after a restart); ConflictError if that version differs."""
        if runbook.version < 1:
            raise ValidationError.single("runbook.version", "a stored runbook has a version >= 1")
        violations = _runbook_violations(runbook, None, stored=True)
        if violations:
            raise ValidationError(violations)
        versions = self._runbooks.setdefault(runbook.runbook_id, {})
        existing = versions.get(runbook.version)
        if existing is not None:
            if _definition_key(existing) != _definition_key(runbook):
                raise ConflictError(f"runbook {runbook.runbook_id!r} v{runbook.version} differs from the one loaded")
            return
        versions[runbook.version] = runbook

    def get_runbook(self, runbook_id: str, version: int | None = None) -> Runbook:
        versions = self._runbooks.get(runbook_id)
        if not versions:
            raise NotFoundError(f"runbook {runbook_id!r} not found")
        if version is None or version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise NotFoundError(f"runbook {runbook_id!r} has no version {version}")
        return versions[version]

    def list_runbooks(self) -> list[Runbook]:
        """The latest version of every runbook, by id."""
        return [self.get_runbook(runbook_id) for runbook_id in sorted(self._runbooks)]

    def find_matching_runbooks(
        self, incident_data: Mapping[str, Any], *, auto_start_only: bool = False
    ) -> list[Runbook]:
        """ACTIVE runbooks (latest versions) with trigger conditions that match; a runbook without
        conditions is not incident-triggered and never matches."""
        return [
            runbook
            for runbook in self.list_runbooks()
            if runbook.status is RunbookStatus.ACTIVE
            and runbook.trigger_conditions
            and (runbook.auto_start or not auto_start_only)
            # lenient: a restored version may hold a pre-RE2 $regex (it never matches; see _runbook_violations)
            and match_conditions(runbook.trigger_conditions, incident_data, lenient_regex=True)
        ]

    # -- executions: start, plan, inspect --

    def _start_checks(self, runbook: Runbook, variables: Mapping[str, Any]) -> list[FieldViolation]:
        if not isinstance(variables, Mapping):
            return [FieldViolation("variables", "must be an object")]
        out: list[FieldViolation] = []
        _json_violations(variables, "variables", out)
        if not out and (problem := _json_size_problem(variables)) is not None:
            out.append(FieldViolation("variables", problem))
        return out or _missing_variables(runbook, variables)

    def start_execution(
        self,
        runbook_id: str,
        triggered_by: str,
        variables: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        version: int | None = None,
        incident_id: str = "",
    ) -> ExecutionContext:
        """Start an execution of the latest (or the given) version; nothing runs until execute_next_step.
        `incident_id` names the incident it is started for (recorded in EXECUTION_STARTED).

        ValidationError for an empty `triggered_by`, non-JSON variables or a missing `${variable}`;
        AlreadyExistsError when `execution_id` is taken (callers use a deterministic id for exactly-once).
        """
        runbook = self.get_runbook(runbook_id, version)
        variables = variables or {}
        violations: list[FieldViolation] = []
        if not isinstance(triggered_by, str) or not triggered_by.strip():
            violations.append(FieldViolation("triggered_by", "must name who starts the execution"))
        if execution_id is not None and (problem := key_problem(execution_id)) is not None:
            violations.append(FieldViolation("execution_id", problem))
        if incident_id and (problem := key_problem(incident_id)) is not None:
            violations.append(FieldViolation("incident_id", problem))
        violations.extend(self._start_checks(runbook, variables))
        if violations:
            raise ValidationError(violations)
        execution_id = execution_id or self._id_factory()
        if execution_id in self._executions:
            raise AlreadyExistsError(f"execution {execution_id!r} exists already")
        execution = _Execution(runbook, [], _Projection(runbook), asyncio.Lock())
        self._executions[execution_id] = execution
        data: dict[str, Any] = {
            "runbook_id": runbook.runbook_id,
            "runbook_version": runbook.version,
            "triggered_by": triggered_by,
            "variables": _json_copy(variables),
        }
        if incident_id:
            data["incident_id"] = incident_id
        started = ExecutionEvent(
            execution_id=execution_id,
            seq=1,
            type=EventType.EXECUTION_STARTED,
            occurred_time=self._clock.now(),
            actor=triggered_by,
            data=data,
            tracking_id=self._tracking(),
        )
        self._record(execution, started)
        return execution.state.snapshot()

    def plan_execution(
        self, runbook_id: str, variables: Mapping[str, Any] | None = None, *, version: int | None = None
    ) -> list[PlannedStep]:
        """A dry run: the steps with rendered parameters; calls no handler and records nothing."""
        runbook = self.get_runbook(runbook_id, version)
        variables = variables or {}
        violations = self._start_checks(runbook, variables)
        if violations:
            raise ValidationError(violations)
        plan: list[PlannedStep] = []
        gated = False
        for step in runbook.steps:
            gated = gated or step.requires_approval
            plan.append(
                PlannedStep(
                    step_id=step.step_id,
                    action=step.action,
                    # A reference an earlier step may set is shown as written.
                    parameters=render_parameters(step.parameters, variables, keep_missing=True),
                    requires_approval=step.requires_approval,
                    would_run=not gated,
                    rollback_action=step.rollback_action,
                )
            )
        return plan

    def _get(self, execution_id: str) -> _Execution:
        execution = self._executions.get(execution_id)
        if execution is None:
            raise NotFoundError(f"execution {execution_id!r} not found")
        return execution

    def get_execution_status(self, execution_id: str, as_of: datetime | None = None) -> ExecutionContext:
        """The current state, or the state as of a past time (NotFoundError if it had not started then)."""
        execution = self._get(execution_id)
        if as_of is None:
            return execution.state.snapshot()
        if as_of < execution.events[0].occurred_time:
            raise NotFoundError(f"execution {execution_id!r} had not started at {as_of.isoformat()}")
        return project(execution.runbook, execution.events, as_of)

    def list_executions(self, status: RunbookStatus | None = None) -> list[ExecutionContext]:
        return [e.state.snapshot() for e in self._executions.values() if status is None or e.state.status is status]

    def events(self, execution_id: str) -> list[ExecutionEvent]:
        """All events of an execution so far (stored or not)."""
        return list(self._get(execution_id).events)

    def take_new_events(self, execution_id: str) -> list[ExecutionEvent]:
        """Events appended since the last call (or since load): what the store has yet to persist."""
        execution = self._get(execution_id)
        new = execution.events[execution.taken :]
        execution.taken = len(execution.events)
        return new

    def version(self, execution_id: str) -> int:
        """The seq of the execution's last event (its optimistic-concurrency version)."""
        return self._get(execution_id).state.version

    def evict_execution(self, execution_id: str) -> None:
        """Forget an execution (e.g. after losing an optimistic-concurrency race, to reload it from the store)."""
        self._get(execution_id)
        del self._executions[execution_id]

    # -- executions: running --

    def _record(self, execution: _Execution, event: ExecutionEvent) -> None:
        execution.state.apply(event)
        execution.events.append(event)

    def _append(self, execution: _Execution, kind: EventType, actor: str, data: Mapping[str, Any]) -> None:
        event = ExecutionEvent(
            execution_id=execution.state.execution_id,
            seq=execution.state.version + 1,
            type=kind,
            occurred_time=self._clock.now(),
            actor=actor,
            data=data,
            tracking_id=self._tracking(),
        )
        self._record(execution, event)

    async def execute_next_step(self, execution_id: str, *, actor: str = SYSTEM_ACTOR) -> StepStatus:
        """Run the next step and answer with its status (AWAITING_APPROVAL if it is gated and unapproved).

        FailedPreconditionError once the execution has finished. Handler errors never escape: they fail
        the step and the execution (and roll back with auto_rollback).
        """
        execution = self._get(execution_id)
        async with execution.lock:
            state = execution.state
            if state.status is not RunbookStatus.RUNNING:
                raise FailedPreconditionError(f"execution {execution_id!r} is {state.status.value}")
            index = state.current_index()
            if index >= len(execution.runbook.steps):  # pragma: no cover - defensive; load settles this
                # Only reachable when a stream ended right after its last step (crash before the finish event).
                self._append(execution, EventType.EXECUTION_FINISHED, SYSTEM_ACTOR, {"status": "COMPLETED"})
                return state.steps[execution.runbook.steps[-1].step_id].status
            step = execution.runbook.steps[index]
            record = state.steps[step.step_id]
            if record.status is StepStatus.AWAITING_APPROVAL:
                if self._expired(record):
                    await self._expire_locked(execution, step)
                    return StepStatus.FAILED
                return StepStatus.AWAITING_APPROVAL
            if step.requires_approval and record.approved_by is None:
                expires = (
                    (self._clock.now() + timedelta(seconds=step.approval_timeout_s)).isoformat()
                    if step.approval_timeout_s is not None
                    else None
                )
                self._append(
                    execution, EventType.APPROVAL_REQUESTED, actor, {"step_id": step.step_id, "expires_time": expires}
                )
                return StepStatus.AWAITING_APPROVAL
            return await self._run_step(execution, index, actor)

    async def _call(
        self,
        execution: _Execution,
        step: RunbookStep,
        action_name: str,
        parameters: Mapping[str, Any],
        *,
        rollback: bool,
    ) -> tuple[dict[str, Any] | None, str | None, bool]:
        """Run one action under the step's timeout: (output, None, False) on success, (None, reason, unknown)
        on failure, `unknown` when it timed out: the action may have acted all the same (an agent that
        switched the bus and answered too late), so its step's rollback must run (see `_rolls_back`)."""
        state = execution.state
        ctx = ActionContext(
            execution_id=state.execution_id,
            runbook_id=execution.runbook.runbook_id,
            step_id=step.step_id,
            triggered_by=state.triggered_by,
            variables=_json_copy(state.variables),
            attempt=state.steps[step.step_id].attempts,
            timeout_s=step.timeout_s,
            now=self._clock.now(),
            rollback=rollback,
        )
        output: Mapping[str, Any] | None = None
        reason: str | None = None
        unknown = False
        action = self._actions.get(action_name)
        deadline = asyncio.timeout(step.timeout_s)
        try:
            if action is None:
                raise NotFoundError(f"action {action_name!r} is not registered")
            params = render_parameters(parameters, state.variables)
            async with deadline:
                output = await action.handler(params, ctx)
        except TimeoutError as exc:
            # Our deadline, or a TimeoutError the action raised itself (e.g. an agent request timing out).
            reason = f"timed out after {step.timeout_s:g}s" if deadline.expired() else _reason(exc)
            unknown = True
        except asyncio.CancelledError:
            self._flush_logs(execution, step, ctx)
            raise
        except Exception as exc:
            reason = _reason(exc)
        self._flush_logs(execution, step, ctx)
        if reason is not None:
            return None, reason, unknown
        if output is None:
            return {}, None, False
        if not isinstance(output, Mapping):
            return None, f"action returned {type(output).__name__}, not an object", False
        problems: list[FieldViolation] = []
        _json_violations(output, "output", problems)
        if problems:
            return None, f"action returned a non-JSON output ({problems[0].field}: {problems[0].description})", False
        if (problem := _json_size_problem(output)) is not None:
            return None, f"action returned too large an output ({problem})", False
        merged = {**execution.state.variables, **output}
        if not rollback and (problem := _json_size_problem(merged, MAX_VARIABLES_BYTES)) is not None:
            return None, f"the action's output would make the variables too large ({problem})", False
        return dict(_json_copy(output)), None, False

    def _flush_logs(self, execution: _Execution, step: RunbookStep, ctx: ActionContext) -> None:
        for message in ctx.messages:
            self._append(
                execution, EventType.ACTION_LOGGED, SYSTEM_ACTOR, {"step_id": step.step_id, "message": message}
            )
        ctx.messages.clear()

    async def _run_step(self, execution: _Execution, index: int, actor: str) -> StepStatus:
        step = execution.runbook.steps[index]
        record = execution.state.steps[step.step_id]
        self._append(
            execution,
            EventType.STEP_STARTED,
            actor,
            {"step_id": step.step_id, "action": step.action, "attempt": record.attempts + 1},
        )
        try:
            output, reason, unknown = await self._call(execution, step, step.action, step.parameters, rollback=False)
        except asyncio.CancelledError:
            # The caller gave up on us (e.g. shutdown): settle the step as a restart would, without running
            # more actions now; an auto rollback this skips runs when the execution is next loaded.
            self._settle_interrupted(execution, step)
            raise
        if reason is not None or output is None:
            failed: dict[str, Any] = {"step_id": step.step_id, "reason": reason}
            if unknown:
                failed["effect_unknown"] = True
            self._append(execution, EventType.STEP_FAILED, actor, failed)
            await self._fail_locked(execution, f"step {step.step_id} failed: {reason}", actor)
            return StepStatus.FAILED
        for name, value in output.items():
            self._append(
                execution, EventType.VARIABLE_SET, actor, {"step_id": step.step_id, "name": name, "value": value}
            )
        self._append(execution, EventType.STEP_COMPLETED, actor, {"step_id": step.step_id, "output": output})
        if execution.state.current_index() >= len(execution.runbook.steps):
            self._append(execution, EventType.EXECUTION_FINISHED, actor, {"status": RunbookStatus.COMPLETED.value})
        return StepStatus.COMPLETED

    def _settle_interrupted(self, execution: _Execution, step: RunbookStep) -> None:
        """A RUNNING step lost its handler: retry later if idempotent, else fail it and the execution."""
        action = self._actions.get(step.action)
        if action is not None and action.info.idempotent:
            self._append(
                execution,
                EventType.STEP_INTERRUPTED,
                SYSTEM_ACTOR,
                {"step_id": step.step_id, "reason": "interrupted while running; action is idempotent, will retry"},
            )
            return
        reason = "interrupted by restart; action not idempotent"
        # It was running: whether it acted is not known, so a rollback undoes it too.
        failed = {"step_id": step.step_id, "reason": reason, "effect_unknown": True}
        self._append(execution, EventType.STEP_FAILED, SYSTEM_ACTOR, failed)
        self._finish_failed(execution, f"step {step.step_id} failed: {reason}", SYSTEM_ACTOR)

    def _finish_failed(self, execution: _Execution, error: str, actor: str) -> None:
        self._skip_open_steps(execution, "execution failed", actor)
        self._append(
            execution, EventType.EXECUTION_FINISHED, actor, {"status": RunbookStatus.FAILED.value, "error": error}
        )

    async def _fail_locked(self, execution: _Execution, error: str, actor: str) -> None:
        self._finish_failed(execution, error, actor)
        if execution.runbook.auto_rollback:
            await self._rollback_locked(execution, SYSTEM_ACTOR)

    def _skip_open_steps(self, execution: _Execution, reason: str, actor: str) -> None:
        for step in execution.runbook.steps:
            if execution.state.steps[step.step_id].status in (StepStatus.PENDING, StepStatus.AWAITING_APPROVAL):
                self._append(execution, EventType.STEP_SKIPPED, actor, {"step_id": step.step_id, "reason": reason})

    # -- approvals --

    def _expired(self, record: _StepRecord) -> bool:
        expires = record.approval_expires_time
        return expires is not None and self._clock.now() >= expires

    def approve_step(self, execution_id: str, step_id: str, approver: str) -> bool:
        """Grant the approval a step waits for; the step then runs on the next execute_next_step.

        NotFoundError for an unknown execution or step; ValidationError for an empty approver;
        PermissionDeniedError when the approver triggered the execution (four eyes);
        FailedPreconditionError when the step is not awaiting approval or its approval has expired.
        """
        execution = self._get(execution_id)
        step = execution.runbook.step(step_id)
        if not isinstance(approver, str) or not approver.strip():
            raise ValidationError.single("approver", "must name who approves")
        state = execution.state
        if approver.strip() == state.triggered_by.strip():
            raise PermissionDeniedError(
                f"{approver!r} triggered execution {execution_id!r} and cannot approve its steps"
            )
        record = state.steps[step.step_id]
        if state.status is not RunbookStatus.RUNNING or record.status is not StepStatus.AWAITING_APPROVAL:
            raise _not_awaiting_approval(step_id, record)
        if self._expired(record):
            raise FailedPreconditionError(f"the approval for step {step_id!r} expired")
        self._append(execution, EventType.APPROVAL_GRANTED, approver, {"step_id": step_id, "approver": approver})
        return True

    async def reject_step(self, execution_id: str, step_id: str, approver: str, reason: str = "") -> None:
        """Refuse the approval a step waits for: the step and the execution fail with the reason, and
        roll back with auto_rollback.

        The execution's trigger may reject (four eyes guard going ahead, not stopping). NotFoundError for
        an unknown execution or step; ValidationError for an empty approver or a reason too long to keep;
        FailedPreconditionError when the step is not awaiting approval or its approval has expired.
        """
        execution = self._get(execution_id)
        step = execution.runbook.step(step_id)
        _check_stop(("approver", approver, "must name who rejects"), reason)
        async with execution.lock:
            state = execution.state
            record = state.steps[step.step_id]
            if state.status is not RunbookStatus.RUNNING or record.status is not StepStatus.AWAITING_APPROVAL:
                raise _not_awaiting_approval(step_id, record)
            if self._expired(record):
                raise FailedPreconditionError(f"the approval for step {step_id!r} expired")
            why = f"approval for step {step_id} rejected by {approver}" + (f": {reason}" if reason else "")
            self._append(
                execution,
                EventType.APPROVAL_REJECTED,
                approver,
                {"step_id": step_id, "approver": approver, "reason": why},
            )
            await self._fail_locked(execution, why, approver)

    async def note_incident_closed(self, execution_id: str, reason: str) -> bool:
        """Record in a running execution's audit trail that the incident which started it has closed.

        Nothing else changes. An approver about to let a remediation go ahead must see that its incident
        is over, but whether the remediation is still wanted is for people to decide (reject the step,
        cancel the execution, roll it back):
        the fault may have cleared because of the steps already run. False when the execution has
        finished, or holds the record already (an incident event delivered again). NotFoundError for
        an unknown execution.
        """
        execution = self._get(execution_id)
        async with execution.lock:
            state = execution.state
            if state.status is not RunbookStatus.RUNNING:
                return False
            if any(entry.transition == EventType.INCIDENT_CLOSED for entry in state.audit):
                return False
            self._append(execution, EventType.INCIDENT_CLOSED, f"incident:{state.incident_id}", {"reason": reason})
            return True

    async def cancel_execution(self, execution_id: str, actor: str, reason: str = "") -> None:
        """Stop a running execution where it is: the steps not run yet are skipped, the execution is
        CANCELLED with the reason as its error, and nothing is rolled back (`rollback_execution` undoes
        the completed steps, after a cancel too). A step whose action is running holds the execution's
        lock, so it finishes first.

        NotFoundError for an unknown execution; ValidationError for an empty actor or a reason too long
        to keep; FailedPreconditionError once the execution has finished.
        """
        execution = self._get(execution_id)
        _check_stop(("actor", actor, "must name who cancels"), reason)
        async with execution.lock:
            state = execution.state
            if state.status is not RunbookStatus.RUNNING:
                raise FailedPreconditionError(f"execution {execution_id!r} is {state.status.value}, not running")
            why = f"cancelled by {actor}" + (f": {reason}" if reason else "")
            self._skip_open_steps(execution, why, actor)
            self._append(
                execution, EventType.EXECUTION_FINISHED, actor, {"status": RunbookStatus.CANCELLED.value, "error": why}
            )

    async def _expire_locked(self, execution: _Execution, step: RunbookStep) -> None:
        expires = execution.state.steps[step.step_id].approval_expires_time
        assert expires is not None
        reason = f"approval for step {step.step_id} expired at {expires.isoformat()}"
        self._append(execution, EventType.APPROVAL_EXPIRED, SYSTEM_ACTOR, {"step_id": step.step_id, "reason": reason})
        await self._fail_locked(execution, reason, SYSTEM_ACTOR)

    async def expire_approvals(self) -> list[str]:
        """Fail every execution whose approval gate has expired (by the clock); returns their ids."""
        expired: list[str] = []
        for execution_id, execution in list(self._executions.items()):
            if not any(
                self._expired(r) and r.status is StepStatus.AWAITING_APPROVAL for r in execution.state.steps.values()
            ):
                continue
            async with execution.lock:
                state = execution.state
                for step in execution.runbook.steps:
                    record = state.steps[step.step_id]
                    if state.status is RunbookStatus.RUNNING and record.status is StepStatus.AWAITING_APPROVAL:
                        if self._expired(record):
                            await self._expire_locked(execution, step)
                            expired.append(execution_id)
        return expired

    # -- rollback --

    async def rollback_execution(self, execution_id: str, actor: str = SYSTEM_ACTOR) -> int:
        """Run the rollback actions of COMPLETED steps in reverse order; returns how many succeeded.

        FailedPreconditionError if the execution is already ROLLED_BACK. See the module docstring for
        what happens when a rollback action fails.
        """
        execution = self._get(execution_id)
        async with execution.lock:
            if execution.state.status is RunbookStatus.ROLLED_BACK:
                raise FailedPreconditionError(f"execution {execution_id!r} is already rolled back")
            return await self._rollback_locked(execution, actor)

    async def _rollback_locked(self, execution: _Execution, actor: str) -> int:
        state = execution.state
        if state.status is RunbookStatus.RUNNING:
            self._skip_open_steps(execution, f"execution rolled back by {actor}", actor)
            self._append(
                execution,
                EventType.EXECUTION_FINISHED,
                actor,
                {"status": RunbookStatus.FAILED.value, "error": f"aborted for rollback by {actor}"},
            )
        if not state.rollback_in_progress:
            self._append(
                execution, EventType.ROLLBACK_STARTED, actor, {"reason": state.error or f"requested by {actor}"}
            )
        original_error = state.error_before_rollback
        rolled_back = 0
        failures: list[str] = []
        for step in reversed(execution.runbook.steps):
            if not _rolls_back(state.steps[step.step_id]) or not step.rollback_action:
                continue
            output, reason, _unknown = await self._call(
                execution, step, step.rollback_action, step.rollback_parameters, rollback=True
            )
            if reason is None:
                rolled_back += 1
                self._append(
                    execution,
                    EventType.STEP_ROLLED_BACK,
                    actor,
                    {"step_id": step.step_id, "rollback_action": step.rollback_action, "output": output},
                )
            else:
                failures.append(f"{step.step_id}: {reason}")
                self._append(
                    execution, EventType.STEP_ROLLBACK_FAILED, actor, {"step_id": step.step_id, "reason": reason}
                )
        data: dict[str, Any]
        if failures:
            data = {"status": RunbookStatus.FAILED.value, "error": "rollback incomplete: " + "; ".join(failures)}
        else:
            data = {"status": RunbookStatus.ROLLED_BACK.value, "error": original_error}
        self._append(execution, EventType.EXECUTION_FINISHED, actor, data)
        return rolled_back

    # -- restart --

    async def load_execution(self, runbook: Runbook, events: Iterable[ExecutionEvent]) -> ExecutionContext:
        """Rebuild an execution from its stored events and settle whatever a crash left open.

        A step left RUNNING is retried later (STEP_INTERRUPTED, back to PENDING) if its action is
        idempotent, else FAILED ("interrupted by restart; action not idempotent") with the execution
        (rolled back with auto_rollback). An interrupted rollback is resumed; a FAILED execution whose
        auto rollback never started is rolled back. The loaded events count as taken; the settling ones
        are new (take_new_events).
        """
        stream = list(events)
        if not stream:
            raise ValidationError.single("events", "no events to load")
        first = stream[0]
        if first.type is not EventType.EXECUTION_STARTED:
            raise ValidationError.single("events[0].type", "an execution stream starts with EXECUTION_STARTED")
        if (first.data.get("runbook_id"), first.data.get("runbook_version")) != (runbook.runbook_id, runbook.version):
            raise ValidationError.single(
                "runbook",
                f"events are for {first.data.get('runbook_id')} v{first.data.get('runbook_version')}, "
                f"not {runbook.runbook_id} v{runbook.version}",
            )
        if first.execution_id in self._executions:
            raise AlreadyExistsError(f"execution {first.execution_id!r} is loaded already")
        execution = _Execution(runbook, [], _Projection(runbook), asyncio.Lock())
        for event in stream:
            self._record(execution, event)
        execution.taken = len(execution.events)
        self._executions[first.execution_id] = execution
        async with execution.lock:
            await self._recover_locked(execution)
        return execution.state.snapshot()

    async def _recover_locked(self, execution: _Execution) -> None:
        state = execution.state
        runbook = execution.runbook
        for step in runbook.steps:
            if state.steps[step.step_id].status is StepStatus.RUNNING:
                self._settle_interrupted(execution, step)
        if state.status is RunbookStatus.RUNNING:
            failed = [s.step_id for s in runbook.steps if state.steps[s.step_id].status is StepStatus.FAILED]
            if failed:
                # Crashed between a step's failure and the execution's.
                error = f"step {failed[0]} failed: {state.steps[failed[0]].error}"
                self._finish_failed(execution, error, SYSTEM_ACTOR)
            elif state.current_index() >= len(runbook.steps):
                # Crashed between the last step's completion and the execution's.
                self._append(execution, EventType.EXECUTION_FINISHED, SYSTEM_ACTOR, {"status": "COMPLETED"})
        if state.rollback_in_progress:
            self._append(
                execution, EventType.ROLLBACK_INTERRUPTED, SYSTEM_ACTOR, {"reason": "interrupted by restart; resuming"}
            )
            await self._rollback_locked(execution, SYSTEM_ACTOR)
        elif state.status is RunbookStatus.FAILED and runbook.auto_rollback and not state.rollback_attempted:
            await self._rollback_locked(execution, SYSTEM_ACTOR)


def _is_async_callable(handler: Any) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - async callable objects count too
    return call is not None and inspect.iscoroutinefunction(call)


def _replace_runbook(runbook: Runbook, *, version: int, create_time: datetime) -> Runbook:
    # Copies of the caller's dicts, so mutating them later cannot change a version executions pinned.
    steps = [
        RunbookStep(
            step_id=s.step_id,
            action=s.action,
            parameters=_json_copy(s.parameters),
            requires_approval=s.requires_approval,
            timeout_s=s.timeout_s,
            rollback_action=s.rollback_action,
            rollback_parameters=_json_copy(s.rollback_parameters),
            approval_timeout_s=s.approval_timeout_s,
        )
        for s in runbook.steps
    ]
    return Runbook(
        runbook_id=runbook.runbook_id,
        name=runbook.name,
        steps=steps,
        description=runbook.description,
        trigger_conditions=_json_copy(runbook.trigger_conditions),
        auto_start=runbook.auto_start,
        auto_rollback=runbook.auto_rollback,
        version=version,
        status=runbook.status,
        create_time=create_time,
    )


def _rolls_back(record: _StepRecord) -> bool:
    """Whether a rollback runs the step's rollback action: it completed, or it failed without saying
    whether it acted (timed out, or interrupted). Rollback actions are idempotent (module docstring), so
    undoing what may not have happened is safe, and leaving undone what did happen is not."""
    return record.status is StepStatus.COMPLETED or (record.status is StepStatus.FAILED and record.effect_unknown)
