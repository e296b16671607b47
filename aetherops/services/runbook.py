"""The runbook application service: the event-sourced engine, its PostgreSQL event store and the outbox.

Durability rules:

* Every engine call that changes an execution is followed by one transaction that appends the new
  events (`execution_events`, primary key (execution_id, seq)), updates the `executions` index and
  writes one outbox row per event (`aetherops.runbook.<transition lowercased>`, Nats-Msg-Id derived from
  (execution_id, seq), so a re-publication is dropped by JetStream). Runbook definitions are committed
  before the engine learns them. If a commit fails, the execution is evicted from the engine and
  reloaded from the store on next use: memory never holds what is not committed.
* Before any action runs, the events so far (STEP_STARTED, ROLLBACK_STARTED ...) are committed
  ("checkpoint"). So a crash in the middle of an action leaves a RUNNING step in the store, which the
  next load settles (retried if the action is idempotent, else failed); and a second replica that
  tries to run the same step loses the primary-key race *before* calling the action: concurrent
  ExecuteNextStep/ApproveStep on one execution cannot both advance it (the loser gets ConflictError,
  i.e. ABORTED, and reloads).
* A replica that finds a step RUNNING in the store treats it as abandoned only after the step's
  timeout (plus a grace) has passed since it started - until then its owner may still be running it
  (ConflictError; at start-up such executions are retried by the ticker).
* At start all runbook versions and every unfinished execution are loaded; events the load itself
  appends (settling interrupted steps, resuming rollbacks) are persisted. A ticker (every second)
  fails executions whose approval gate expired - gates loaded from the store too, including one that
  expired while no server ran - and never does more: a gate approved on another replica meanwhile is
  left to whoever runs the step.
* Every replica also takes up, every `ADOPT_AFTER_S`, the unfinished executions it does not hold
  that nothing has changed for that long: those of a replica that stopped (or started after this one
  did). Their gates are then watched here, and incident-started ones driven here - safely even if
  their owner is merely slow, by the rules above.
* Finished executions are evicted from memory after their last commit; reads (status, as-of, watch)
  always fold the stored events, so every replica answers the same.

Who drives an execution: executions started by an incident (`triggered_by = "incident:<cluster id>"`)
are driven by a background driver in this process - steps run until an approval gate or the end, and
after ApproveStep the driver continues. Manually started executions advance only through
ExecuteNextStep (one step per call).

Tracking ids: every event records the tracking id of the request that caused it (the engine asks
`current_tracking_id`), and the `executions` row the one that started it: the StartExecution request, or
for incident starts the incident event's (the consumer runs under it), so an alert's tracking id leads to
the execution it caused. Work no request asked for - a driver resumed after a restart, the ticker
expiring an approval, settling a load - runs under the execution's own tracking id.

Actions: the core's built-ins (log, wait, set_variable), `publish` (below) and the declared agent
actions `agent:<name>` (see aetherops.services.agents). `publish` writes its message to the outbox of
the step's own commit, so the message leaves if and only if the step is committed; its
`parameters.subject` is relative to the namespace prefix (e.g. "runbook.notes.power") and must be
captured by one of the JetStream streams (incidents.>, runbook.>, capacity.>, alerts.>, telemetry.>),
`parameters.payload` (an object) becomes the `data` of an events.v1.Event with an
`execution_transition` (transition "PUBLISHED").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from aetherops.bus import Subjects
from aetherops.circuit import TransitionEvent
from aetherops.clock import Clock
from aetherops.correlation import Alert
from aetherops.db import Database, idempotency, outbox
from aetherops.db import correlation as correlation_repo
from aetherops.db import runbook as repo
from aetherops.db.correlation import ClusterRecord
from aetherops.errors import (
    WATCH_ENDED_BY_SHUTDOWN,
    AlreadyExistsError,
    ConflictError,
    FieldViolation,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from aetherops.paging import (
    cut_page,
    encode_page_token,
    filters_key,
    page_limit,
    position_text,
    read_page_token,
    time_and_id,
)
from aetherops.runbook import (
    ActionContext,
    ActionHandler,
    ActionInfo,
    EventType,
    ExecutionContext,
    ExecutionEvent,
    PlannedStep,
    Runbook,
    RunbookEngine,
    RunbookStatus,
    StepStatus,
    builtin_actions,
    key_problem,
    project,
    require_parameters,
    runbook_from_dict,
    runbook_to_dict,
    unprovided_references,
    validate_runbook,
    variable_references,
)
from aetherops.runbook_conditions import validate_conditions
from aetherops.services.agents import AgentCall, AgentInvoker
from aetherops.tasks import periodically
from aetherops.text import MAX_ID_LEN, filter_problems, id_problem, text_problem
from aetherops.tracking import current_tracking_id, reset_tracking_id, set_tracking_id

__all__ = [
    "INCIDENT_FIELDS",
    "CircuitChange",
    "IncidentData",
    "MessageEncoder",
    "PublishedMessage",
    "RunbookService",
    "StepTiming",
    "Transition",
    "incident_execution_id",
    "incident_variables",
]

log = logging.getLogger("aetherops.runbook")

T = TypeVar("T")

# Deterministic ids (exactly-once incident starts, idempotent StartExecution, outbox event ids).
_NS = uuid.UUID("6f1c1a52-3f0e-4c53-9a51-0d5e2b8f7a10")

INCIDENT_FIELDS = (
    "cluster_id",
    "satellite_ids",
    "subsystems",
    "max_severity",
    "root_cause_alert_id",
    "root_cause_subsystem",
    "root_cause_satellite_id",
    "alert_count",
    "multi_satellite",
)
"""The incident data runbook trigger_conditions match against (and the variables an incident start sets,
and a start by hand for an incident: see `RunbookService.start_execution`)."""

# A RUNNING step found in the store is abandoned once its timeout and this grace have passed.
_LEASE_GRACE_S = 5.0
ADOPT_AFTER_S = 30.0
"""An unfinished execution unchanged this long, and not held by this replica, is taken up by it: at
start, a replica loads every unfinished execution, but one started on another replica afterwards was
watched (its approval gate's expiry) and driven (an incident's) only there, so when that replica
stopped, nobody did either until a restart."""
_PAGE_JSON_BYTES = 1024 * 1024  # of runbook definitions per ListRunbooks page (one always fits)
_MAX_PAGE = 500
_EXECUTION_STATUSES = (
    RunbookStatus.RUNNING,
    RunbookStatus.COMPLETED,
    RunbookStatus.FAILED,
    RunbookStatus.ROLLED_BACK,
    RunbookStatus.CANCELLED,
)


def incident_execution_id(cluster_id: str, runbook_id: str) -> str:
    """The one execution an incident may start for a runbook (exactly once, however often delivered)."""
    return str(uuid.uuid5(_NS, f"incident\x00{cluster_id}\x00{runbook_id}"))


def _request_execution_id(runbook_id: str, triggered_by: str, request_id: str) -> str:
    """The execution a start request makes, the same for its retries. Scoped by runbook and principal:
    the same request id from another caller, or for another runbook, is another request (a global
    one answered it with the first caller's execution and started nothing)."""
    return str(uuid.uuid5(_NS, f"start\x00{runbook_id}\x00{triggered_by}\x00{request_id}"))


def _event_id(execution_id: str, seq: int) -> str:
    return str(uuid.uuid5(_NS, f"event\x00{execution_id}\x00{seq}"))


# ---- what the outbox carries (encoded by the server layer) ------------------------------------------


@dataclass(frozen=True)
class Transition:
    """One committed execution event, as an events.v1.Event with an execution_transition."""

    event_id: str
    subject: str
    event_type: str
    execution_id: str
    runbook_id: str
    transition: str
    step_id: str
    actor: str
    execution_status: str
    data: Mapping[str, Any]
    occurred_time: datetime
    tracking_id: str
    seq: int


@dataclass(frozen=True)
class PublishedMessage:
    """What a `publish` step sends (committed with the step)."""

    event_id: str
    subject: str
    event_type: str
    execution_id: str
    runbook_id: str
    step_id: str
    actor: str
    payload: Mapping[str, Any]
    occurred_time: datetime
    tracking_id: str


@dataclass(frozen=True)
class CircuitChange:
    """An agent breaker's transition, as an events.v1.Event with circuit_state_changed."""

    event_id: str
    subject: str
    event_type: str
    change: TransitionEvent


OutboxMessage = Transition | PublishedMessage | CircuitChange
MessageEncoder = Callable[[OutboxMessage], bytes]
IncidentData = Callable[[ClusterRecord, Alert | None], Mapping[str, Any]]
"""A stored incident (and its root-cause alert) as the incident data its events carry. Given by the
server layer: it builds the event's incident message from the stored one and reads that as it reads an
event's, so a start by hand for an incident gets the very variables an incident start would."""


class Waker(Protocol):
    """The outbox relay, as far as the service is concerned (wake it after a commit)."""

    def wake(self) -> None: ...


@dataclass
class StepTiming:
    """Where the time of one ExecuteNextStep went (filled in when passed; used by the benchmark)."""

    engine_s: float = 0.0  # inside the engine call, minus actions and checkpoints
    action_s: float = 0.0
    checkpoint_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0


@dataclass
class _OpState:
    execution_id: str
    conflict: BaseException | None = None
    timing: StepTiming | None = None
    published: list[PublishedMessage] = field(default_factory=list)


_current_op: contextvars.ContextVar[_OpState | None] = contextvars.ContextVar("runbook_op", default=None)


@dataclass(frozen=True)
class _StartInfo:
    incident_id: str
    start_request_id: str | None


def _definition_key(runbook: Runbook) -> str:
    return json.dumps(repo.definition_of(runbook_to_dict(runbook)), sort_keys=True)


def _beyond_incident(runbook: Runbook) -> list[FieldViolation]:
    """An auto-start runbook's references that an incident start cannot satisfy: it has only the
    incident's fields, so each would fail every start (seen only as a warning in the log)."""
    fields = ", ".join(INCIDENT_FIELDS)
    return [
        FieldViolation(
            f"runbook.steps[{i}].{name}",
            f"${{{ref}}} is neither incident data ({fields}) nor set by an earlier step: "
            "an incident could never start this auto_start runbook",
        )
        for i, name, ref in unprovided_references(runbook, lambda ref: ref.split(".", 1)[0] in INCIDENT_FIELDS)
    ]


def _violations(problems: Iterable[str]) -> list[FieldViolation]:
    out = []
    for problem in problems:
        name, _, description = problem.partition(": ")
        out.append(FieldViolation(name, description))
    return out


def _page(page_size: int, page_token: str, listing: str) -> tuple[int, str]:
    """Page size and the id to list after, for the unfiltered listings (`listing` names which)."""
    problems: list[FieldViolation] = []
    if page_size < 0:
        problems.append(FieldViolation("page_size", "must not be negative"))
    after = read_page_token(page_token, filters_key(listing), _after_id, problems)
    if problems:
        raise ValidationError(problems)
    return page_limit(page_size), after or ""


def _after_id(position: dict[str, Any]) -> str:
    return position_text(position["id"])


def _token(last: str, listing: str) -> str:
    return encode_page_token({"id": last}, filters_key(listing))


def _sized(definitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading runbook definitions within `_PAGE_JSON_BYTES` (at least one): 50 definitions of up
    to MAX_JSON_BYTES each would outgrow the 4 MiB reply limit, and every call for that page would
    fail the same way."""
    size = 0
    for i, definition in enumerate(definitions):
        size += len(json.dumps(definition, separators=(",", ":"), ensure_ascii=False).encode())
        if i and size > _PAGE_JSON_BYTES:
            return definitions[:i]
    return definitions


@contextlib.contextmanager
def _on_behalf_of(tracking_id: str) -> Iterator[None]:
    """Within the block, `tracking_id` is the current one - unless a request's is set already."""
    if current_tracking_id() or not tracking_id:
        yield
        return
    token = set_tracking_id(tracking_id)
    try:
        yield
    finally:
        reset_tracking_id(token)


class RunbookService:
    """Runbooks and executions, durably; see the module docstring."""

    def __init__(
        self,
        db: Database,
        relay: Waker,
        subjects: Subjects,
        encode: MessageEncoder,
        clock: Clock,
        *,
        incident_data: IncidentData,
        agents: AgentInvoker | None = None,
        agent_actions: Sequence[str] = (),
        tick_interval_s: float = 1.0,
        adopt_after_s: float = ADOPT_AFTER_S,
    ) -> None:
        self._db = db
        self._relay = relay
        self._subjects = subjects
        self._encode = encode
        self._incident_data = incident_data
        self._clock = clock
        self._agents = agents
        self._tick_interval_s = tick_interval_s
        self._adopt_after_s = adopt_after_s
        self._next_adoption: datetime | None = None
        self._engine = RunbookEngine(clock, register_builtins=False, tracking=current_tracking_id)
        for action in builtin_actions():
            self._engine.register_action(
                action.name,
                self._guarded(action.handler),
                idempotent=action.idempotent,
                description=action.description,
                builtin=True,
                check=action.check,
            )
        self._engine.register_action(
            "publish",
            self._guarded(self._publish_action),
            check=self._publish_problems,
            idempotent=False,
            description=(
                "Publish parameters.payload (an object) on NATS subject parameters.subject (relative to the "
                "namespace prefix, captured by a stream), committed together with the step."
            ),
            builtin=True,
        )
        self._engine.set_agent_invoker(self._invoke_agent)
        for name in agent_actions:
            self.declare_agent(name)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._committed: dict[str, int] = {}  # execution -> committed version held in the engine
        self._may_settle: set[str] = set()  # evicted by us while no action of ours was in flight
        self._deferred: set[str] = set()  # unfinished executions whose load waits for a step lease
        self._gates: dict[str, datetime] = {}  # execution -> approval expiry
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._watches_ending = False  # shutdown has begun (see `end_watches`)
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def engine(self) -> RunbookEngine:
        return self._engine

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every runbook version and unfinished execution, then start the ticker and drivers."""
        async with self._db.connection() as conn:
            rows = await repo.load_runbooks(conn)
            unfinished = await repo.unfinished_executions(conn)
        for row in rows:
            runbook = runbook_from_dict(row.definition)
            self._engine.restore_runbook(runbook)
            # Stored before $regex moved to RE2, a pattern RE2 refuses loads but never matches (see
            # `aetherops.runbook_conditions`): say so once, or the runbook just stops triggering.
            for problem in validate_conditions(runbook.trigger_conditions, "trigger_conditions"):
                log.warning(
                    "runbook %s version %d: %s: %s; it never matches until registered again",
                    runbook.runbook_id,
                    runbook.version,
                    problem.field,
                    problem.description,
                )
        for pending in unfinished:
            try:
                await self._load(pending.execution_id)
            except ConflictError as exc:
                log.info("execution %s not loaded yet: %s", pending.execution_id, exc)
                self._deferred.add(pending.execution_id)
                continue
            self._resume(pending.execution_id, pending.triggered_by)
        log.info("runbook service loaded %d runbook versions, %d unfinished executions", len(rows), len(unfinished))
        self._ticker = asyncio.create_task(
            periodically(self._tick_interval_s, self.tick, "runbook ticker"), name="runbook-ticker"
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop the ticker and drivers; in-flight RPC operations get `grace_s` to commit first."""
        if self._ticker is not None:
            self._ticker.cancel()
        background = [t for t in [self._ticker, *self._drivers.values()] if t is not None]
        for task in self._drivers.values():
            task.cancel()
        inflight = [t for t in self._tasks if not t.done()]
        if inflight:
            _done, pending = await asyncio.wait(inflight, timeout=grace_s)
            for task in pending:
                task.cancel()
            background.extend(pending)
        # Cancelled children report CancelledError as a result; a cancellation of stop() itself propagates.
        await asyncio.gather(*background, return_exceptions=True)

    def _spawn(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _shielded(self, coro: Awaitable[T], name: str) -> T:
        """Run to completion even if the RPC that asked is cancelled (a client disconnect must not
        cut a step in half)."""
        return await asyncio.shield(self._spawn(coro, name))

    # ---- actions -----------------------------------------------------------------------------------

    def declare_agent(self, name: str, *, description: str = "", idempotent: bool = False) -> ActionInfo | None:
        """Declare `agent:<name>` (None if it was declared already)."""
        try:
            return self._engine.declare_agent_action(
                name,
                description=description or f"Answered by an agent on {self._subjects.action(name)}",
                idempotent=idempotent,
            )
        except AlreadyExistsError:
            return None

    def list_actions(self, *, page_size: int, page_token: str) -> tuple[list[ActionInfo], str]:
        limit, after = _page(page_size, page_token, "actions")
        ordered = sorted(self._engine.list_actions(), key=lambda a: a.name)
        remaining = [a for a in ordered if a.name > after]
        return cut_page(remaining, limit, lambda a: {"id": a.name}, filters_key("actions"))

    def _guarded(self, handler: ActionHandler) -> ActionHandler:
        """Wrap a handler: commit the events so far before it runs, and time it."""

        async def run(params: dict[str, Any], ctx: ActionContext) -> Mapping[str, Any] | None:
            await self._checkpoint()
            op = _current_op.get()
            started = time.perf_counter()
            try:
                return await handler(params, ctx)
            finally:
                if op is not None and op.timing is not None:
                    op.timing.action_s += time.perf_counter() - started

        return run

    async def _checkpoint(self) -> None:
        op = _current_op.get()
        if op is None:  # pragma: no cover - every engine call that runs actions goes through _op
            return
        started = time.perf_counter()
        try:
            # A failure is marked on the op by _persist: the engine turns it into a failed step in
            # memory, and _op discards all of that.
            await self._persist(op.execution_id)
        finally:
            if op.timing is not None:
                op.timing.checkpoint_s += time.perf_counter() - started

    def _publish_problems(self, params: Mapping[str, Any]) -> list[tuple[str, str]]:
        """`publish`'s parameter rules (see `ParameterCheck`): a subject some stream captures, an object."""
        problems = []
        subject = params.get("subject")
        if variable_references(subject):
            pass  # known when the step runs
        elif not isinstance(subject, str) or not subject or subject.startswith(".") or " " in subject:
            problems.append(("subject", "must be a subject relative to the prefix"))
        else:
            try:
                self._subjects.stream_for(self._subjects.prefix + subject)
            except ValueError:
                problems.append(("subject", f"no stream captures {subject!r}"))
        payload = params.get("payload", {})
        if not variable_references(payload) and not isinstance(payload, Mapping):
            problems.append(("payload", "must be an object"))
        return problems

    async def _publish_action(self, params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        require_parameters(self._publish_problems, params)
        full = self._subjects.prefix + params["subject"]
        payload = params.get("payload", {})
        op = _current_op.get()
        assert op is not None
        event_id = str(uuid.uuid4())
        op.published.append(
            PublishedMessage(
                event_id=event_id,
                subject=full,
                event_type=self._subjects.event_type(full),
                execution_id=ctx.execution_id,
                runbook_id=ctx.runbook_id,
                step_id=ctx.step_id,
                actor=ctx.triggered_by,
                payload=dict(payload),
                occurred_time=self._clock.now(),
                tracking_id=current_tracking_id(),
            )
        )
        return {}

    async def _invoke_agent(self, name: str, params: dict[str, Any], timeout_s: float) -> Mapping[str, Any]:
        await self._checkpoint()
        if self._agents is None:
            raise NotFoundError(f"no agent transport configured for agent:{name}")
        op = _current_op.get()
        execution_id = op.execution_id if op is not None else ""
        call = AgentCall(execution_id, self._step_in_flight(execution_id), current_tracking_id())
        started = time.perf_counter()
        try:
            return await self._agents.invoke(name, params, timeout_s, call)
        finally:
            if op is not None and op.timing is not None:
                op.timing.action_s += time.perf_counter() - started

    def _step_in_flight(self, execution_id: str) -> str:
        """The step an action is running for (the engine's invoker callback does not say)."""
        try:
            events = self._engine.events(execution_id)
        except NotFoundError:
            return ""
        open_step = ""
        rolled: set[str] = set()
        rolling = False
        for event in events:
            step_id = str(event.data.get("step_id", ""))
            if event.type is EventType.STEP_STARTED:
                open_step = step_id
            elif event.type in (EventType.STEP_COMPLETED, EventType.STEP_FAILED, EventType.STEP_INTERRUPTED):
                open_step = ""
            elif event.type is EventType.ROLLBACK_STARTED:
                rolling, rolled = True, set()
            elif event.type in (EventType.STEP_ROLLED_BACK, EventType.STEP_ROLLBACK_FAILED):
                rolled.add(step_id)
            elif event.type is EventType.EXECUTION_FINISHED and rolling:
                rolling = False
        if open_step:
            return open_step
        if rolling:
            state = self._engine.get_execution_status(execution_id)
            runbook = self._engine.get_runbook(state.runbook_id, state.runbook_version)
            for step in reversed(runbook.steps):
                status = state.step_states[step.step_id].status
                if step.rollback_action and status is StepStatus.COMPLETED and step.step_id not in rolled:
                    return step.step_id
        return ""

    # ---- runbooks ----------------------------------------------------------------------------------

    async def register_runbook(self, runbook: Runbook, *, request_id: str = "") -> tuple[Runbook, bool]:
        """Validate and store a new version (or nothing, for an identical definition): (runbook, created)."""
        problems = _violations(validate_runbook(runbook, self._engine.action_checks()))
        if runbook.auto_start:
            problems += _beyond_incident(runbook)
        if problems:
            raise ValidationError(problems)
        scope = f"runbook.register.{runbook.runbook_id}"  # per runbook: another runbook is another request
        async with self._db.transaction() as conn:
            # A retry racing the first call waits for it, then answers as it did (created included).
            await idempotency.lock(conn, scope, request_id)
            remembered = await idempotency.recall(conn, scope, request_id)
            if remembered is not None:
                row = await repo.get_runbook(conn, remembered["runbook_id"], remembered["version"])
                assert row is not None
                stored, created = runbook_from_dict(row.definition), bool(remembered["created"])
            else:
                # Registrations of one id take turns, so versions are assigned without gaps or races.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "runbook:" + runbook.runbook_id)
                latest = await repo.get_runbook(conn, runbook.runbook_id)
                latest_rb = runbook_from_dict(latest.definition) if latest is not None else None
                if latest_rb is not None and _definition_key(latest_rb) == _definition_key(runbook):
                    stored, created = latest_rb, False
                else:
                    version = latest_rb.version + 1 if latest_rb is not None else 1
                    now = self._clock.now()
                    stored = runbook_from_dict(
                        {**runbook_to_dict(runbook), "version": version, "create_time": now.isoformat()}
                    )
                    await repo.insert_runbook(
                        conn, repo.RunbookRow(stored.runbook_id, version, runbook_to_dict(stored), now)
                    )
                    created = True
                await idempotency.remember(
                    conn,
                    scope,
                    request_id,
                    {"runbook_id": stored.runbook_id, "version": stored.version, "created": created},
                )
        # Only now, committed, does the engine learn it.
        await self._sync_runbook(stored.runbook_id)
        return stored, created

    async def _sync_runbook(self, runbook_id: str) -> None:
        """Restore the versions of one runbook other replicas (or we) committed that the engine lacks."""
        try:
            known = self._engine.get_runbook(runbook_id).version
        except NotFoundError:
            known = 0
        async with self._db.connection() as conn:
            rows = await repo.load_runbooks(conn, runbook_id, after_version=known)
        for row in rows:
            self._engine.restore_runbook(runbook_from_dict(row.definition))

    async def _sync_all_runbooks(self) -> None:
        async with self._db.connection() as conn:
            latest = await repo.latest_versions(conn)
        for runbook_id, version in latest.items():
            try:
                behind = self._engine.get_runbook(runbook_id).version < version
            except NotFoundError:
                behind = True
            if behind:
                await self._sync_runbook(runbook_id)

    async def _runbook_version(self, runbook_id: str, version: int) -> Runbook:
        try:
            return self._engine.get_runbook(runbook_id, version)
        except NotFoundError:
            await self._sync_runbook(runbook_id)
            return self._engine.get_runbook(runbook_id, version)

    async def get_runbook(self, runbook_id: str, version: int = 0) -> Runbook:
        if not runbook_id:
            raise ValidationError.single("runbook_id", "required")
        if version < 0:
            raise ValidationError.single("version", "must not be negative")
        async with self._db.connection() as conn:
            row = await repo.get_runbook(conn, runbook_id, version)
        if row is None:
            what = f"runbook {runbook_id!r}" + (f" version {version}" if version else "")
            raise NotFoundError(f"{what} not found")
        return runbook_from_dict(row.definition)

    async def list_runbooks(self, *, page_size: int, page_token: str) -> tuple[list[Runbook], str]:
        limit, after = _page(page_size, page_token, "runbooks")
        async with self._db.connection() as conn:
            rows = await repo.list_latest_runbooks(conn, after_id=after, limit=limit + 1)
        kept = _sized([row.definition for row in rows[:limit]])
        page = [runbook_from_dict(d) for d in kept]
        return page, _token(page[-1].runbook_id, "runbooks") if len(rows) > len(page) else ""

    async def find_matching(self, incident_data: Mapping[str, Any], *, auto_start_only: bool = False) -> list[Runbook]:
        await self._sync_all_runbooks()
        return self._engine.find_matching_runbooks(incident_data, auto_start_only=auto_start_only)

    async def find_matching_page(
        self, incident_data: Mapping[str, Any], *, page_size: int, page_token: str
    ) -> tuple[list[Runbook], str]:
        """One page of the runbooks `incident_data` matches, by runbook id (as ListRunbooks pages,
        cut by size too). The token is bound to the incident data."""
        listing = "matching " + json.dumps(incident_data, sort_keys=True, separators=(",", ":"), default=str)
        limit, after = _page(page_size, page_token, listing)
        found = [r for r in await self.find_matching(incident_data) if r.runbook_id > after]
        kept = _sized([runbook_to_dict(r) for r in found[:limit]])
        page = found[: len(kept)]
        return page, _token(page[-1].runbook_id, listing) if len(found) > len(page) else ""

    # ---- executions: start -------------------------------------------------------------------------

    async def plan(self, runbook_id: str, variables: Mapping[str, Any], *, incident_id: str = "") -> list[PlannedStep]:
        """A dry run: nothing is called, nothing is stored. With an `incident_id`, of the start by hand
        for that incident (its data under `variables`, as `start_execution` with `check_incident`)."""
        if not runbook_id:
            raise ValidationError.single("runbook_id", "required")
        if incident_id:
            variables = await self._with_incident(incident_id, variables)
        await self._sync_runbook(runbook_id)
        return self._engine.plan_execution(runbook_id, variables)

    async def _with_incident(self, incident_id: str, variables: Mapping[str, Any] | None) -> dict[str, Any]:
        """`variables` over the data of the stored incident `incident_id` (as its events give it, so the
        variables an incident start would have): a start by hand for the incident can use the same
        `${satellite_ids}`, and what the caller gives explicitly wins. NOT_FOUND for an id no stored
        incident has: a mistyped id would link the execution to nothing, and `executions --incident`
        and `trace` would never show it."""
        if (problem := key_problem(incident_id)) is not None:
            raise ValidationError.single("incident_id", problem)
        async with self._db.connection() as conn:
            record = await correlation_repo.get_cluster(conn, incident_id, alert_bytes=0)
            if record is None:
                raise NotFoundError(f"incident {incident_id!r} not found")
            root = await correlation_repo.root_alert(conn, record)
        return {**self._incident_data(record, root), **(variables or {})}

    async def start_execution(
        self,
        runbook_id: str,
        triggered_by: str,
        variables: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
        execution_id: str | None = None,
        incident_id: str = "",
        check_incident: bool = False,
    ) -> ExecutionContext:
        """Start (and commit) an execution. With a request_id, a retry answers with the same execution;
        with an explicit execution_id that exists already, AlreadyExistsError. With `check_incident`
        (a start by hand), the stored incident `incident_id` must exist, and its data are variables
        under the given ones (see `_with_incident`)."""
        if not runbook_id:
            raise ValidationError.single("runbook_id", "required")
        if request_id:
            # Checked here: it is stored with the execution, not looked up as other request ids are.
            problem = text_problem(request_id, MAX_ID_LEN)
            if problem is not None:
                raise ValidationError.single("request_id", problem)
            execution_id = _request_execution_id(runbook_id, triggered_by, request_id)
        eid = execution_id or uuid.uuid4().hex
        if request_id or execution_id:
            async with self._db.connection() as conn:
                existing = await repo.get_execution(conn, eid)
            if existing is not None:
                if request_id:
                    return await self.get_status(eid)
                raise AlreadyExistsError(f"execution {eid!r} exists already")
        if incident_id and check_incident:
            # Only for a new start: a retry answers its execution, also once retention has deleted the
            # incident (executions and their request ids are kept for ever).
            variables = await self._with_incident(incident_id, variables)
        await self._sync_runbook(runbook_id)
        info = _StartInfo(incident_id, request_id or None)

        async def start() -> ExecutionContext:
            self._engine.start_execution(
                runbook_id, triggered_by, variables or {}, execution_id=eid, incident_id=incident_id
            )
            return await self._persist(eid, start=info)

        try:
            state = await self._shielded(self._with_lock(eid, lambda: self._op(eid, start)), f"start-{eid}")
        except AlreadyExistsError:
            if request_id:  # a concurrent retry of the same request won
                return await self.get_status(eid)
            raise
        return state

    async def start_for_incident(self, incident: Mapping[str, Any]) -> list[str]:
        """Start every ACTIVE auto_start runbook the incident matches, once per (incident, runbook):
        called for the incident's opening and for each of its updates, so a runbook starts when the
        incident first matches it, and never again for that incident."""
        cluster_id = str(incident.get("cluster_id", ""))
        if not cluster_id:
            raise ValidationError.single("incident.cluster_id", "required")
        started = []
        for runbook in await self.find_matching(incident, auto_start_only=True):
            eid = incident_execution_id(cluster_id, runbook.runbook_id)
            try:
                await self.start_execution(
                    runbook.runbook_id,
                    f"incident:{cluster_id}",
                    dict(incident),
                    execution_id=eid,
                    incident_id=cluster_id,
                )
            except AlreadyExistsError:
                # The usual case for an update of an incident that matched before: not worth a line each.
                log.debug("incident %s already started runbook %s", cluster_id, runbook.runbook_id)
                continue
            except ValidationError as exc:
                # E.g. the runbook needs a variable the incident lacks: retrying will not help.
                log.warning("incident %s cannot start runbook %s: %s", cluster_id, runbook.runbook_id, exc)
                continue
            started.append(eid)
            self._drive(eid)
        return started

    async def note_incident_closed(self, cluster_id: str, closed_by: str = "", reason: str = "") -> list[str]:
        """Tell every running execution the incident started that the incident has closed: an entry in
        its audit trail (INCIDENT_CLOSED), nothing more (see `RunbookEngine.note_incident_closed`).
        Returns the ids of the executions told now; a repeated call (the event delivered again) tells
        none. Found in PostgreSQL, so an execution no replica has loaded (waiting at a gate since a
        restart) is told too."""
        if not cluster_id:
            raise ValidationError.single("incident.cluster_id", "required")
        why = (
            f"incident {cluster_id} closed"
            + (f" by {closed_by}" if closed_by else "")
            + (f": {reason}" if reason else "")
        )
        async with self._db.connection() as conn:
            # An incident starts at most one execution per runbook: one page holds them all.
            rows = await repo.list_executions(
                conn, incident_id=cluster_id, status=RunbookStatus.RUNNING.value, limit=_MAX_PAGE
            )
        return [row.execution_id for row in rows if await self._note_incident_closed(row.execution_id, why)]

    async def _note_incident_closed(self, execution_id: str, why: str) -> bool:
        async def note() -> bool:
            noted = await self._engine.note_incident_closed(execution_id, why)
            await self._persist(execution_id)
            return noted

        return await self._shielded(
            self._with_lock(execution_id, lambda: self._op(execution_id, note, load=True)),
            f"incident-closed-{execution_id}",
        )

    # ---- executions: commands ----------------------------------------------------------------------

    async def execute_next_step(
        self, execution_id: str, *, actor: str = "system", request_id: str = "", timing: StepTiming | None = None
    ) -> tuple[StepStatus, ExecutionContext]:
        _require(execution_id, "execution_id")
        scope = f"runbook.execute.{execution_id}"

        async def replay(remembered: Mapping[str, Any]) -> tuple[StepStatus, ExecutionContext]:
            return StepStatus(remembered["step_status"]), await self.get_status(execution_id)

        started = time.perf_counter()

        async def step() -> tuple[StepStatus, ExecutionContext]:
            op = _current_op.get()
            assert op is not None
            op.timing = timing
            engine_started = time.perf_counter()
            status = await self._engine.execute_next_step(execution_id, actor=actor)
            if timing is not None:
                timing.engine_s += time.perf_counter() - engine_started - timing.action_s - timing.checkpoint_s
            commit_started = time.perf_counter()
            state = await self._persist(execution_id, remember=(scope, request_id, {"step_status": status.value}))
            if timing is not None:
                timing.commit_s += time.perf_counter() - commit_started
            return status, state

        result = await self._once(execution_id, scope, request_id, replay, step, f"step-{execution_id}")
        if timing is not None:
            timing.total_s = time.perf_counter() - started
        return result

    async def approve_step(
        self, execution_id: str, step_id: str, approver: str, *, request_id: str = ""
    ) -> ExecutionContext:
        _require(execution_id, "execution_id")
        _require(step_id, "step_id")
        scope = f"runbook.approve.{execution_id}.{step_id}"  # per step: another step is another approval

        async def replay(remembered: Mapping[str, Any]) -> ExecutionContext:
            return await self.get_status(execution_id)

        approved = False  # a replay drives nothing: the call that approved did

        async def approve() -> ExecutionContext:
            nonlocal approved
            self._engine.approve_step(execution_id, step_id, approver)
            state = await self._persist(execution_id, remember=(scope, request_id, {"step_id": step_id}))
            approved = True
            return state

        state = await self._once(execution_id, scope, request_id, replay, approve, f"approve-{execution_id}")
        if approved and state.triggered_by.startswith("incident:"):
            self._drive(execution_id)
        return state

    async def reject_step(
        self, execution_id: str, step_id: str, approver: str, *, reason: str = "", request_id: str = ""
    ) -> ExecutionContext:
        """Refuse a step's approval: the execution fails (and rolls back with auto_rollback)."""
        _require(execution_id, "execution_id")
        _require(step_id, "step_id")
        scope = f"runbook.reject.{execution_id}.{step_id}"

        async def replay(remembered: Mapping[str, Any]) -> ExecutionContext:
            return await self.get_status(execution_id)

        async def reject() -> ExecutionContext:
            await self._engine.reject_step(execution_id, step_id, approver, reason)
            return await self._persist(execution_id, remember=(scope, request_id, {"step_id": step_id}))

        return await self._once(execution_id, scope, request_id, replay, reject, f"reject-{execution_id}")

    async def cancel_execution(
        self, execution_id: str, actor: str, *, reason: str = "", request_id: str = ""
    ) -> ExecutionContext:
        """Stop a running execution where it is, without rolling back (see `RunbookEngine.cancel_execution`)."""
        _require(execution_id, "execution_id")
        scope = f"runbook.cancel.{execution_id}"

        async def replay(remembered: Mapping[str, Any]) -> ExecutionContext:
            return await self.get_status(execution_id)

        async def cancel() -> ExecutionContext:
            await self._engine.cancel_execution(execution_id, actor, reason)
            return await self._persist(execution_id, remember=(scope, request_id, {}))

        return await self._once(execution_id, scope, request_id, replay, cancel, f"cancel-{execution_id}")

    async def rollback_execution(
        self, execution_id: str, *, actor: str = "system", request_id: str = ""
    ) -> tuple[int, ExecutionContext]:
        _require(execution_id, "execution_id")
        scope = f"runbook.rollback.{execution_id}"

        async def replay(remembered: Mapping[str, Any]) -> tuple[int, ExecutionContext]:
            return int(remembered["rolled_back"]), await self.get_status(execution_id)

        async def rollback() -> tuple[int, ExecutionContext]:
            count = await self._engine.rollback_execution(execution_id, actor)
            state = await self._persist(execution_id, remember=(scope, request_id, {"rolled_back": count}))
            return count, state

        return await self._once(execution_id, scope, request_id, replay, rollback, f"rollback-{execution_id}")

    async def _once(
        self,
        execution_id: str,
        scope: str,
        request_id: str,
        replay: Callable[[Mapping[str, Any]], Awaitable[T]],
        fn: Callable[[], Awaitable[T]],
        name: str,
    ) -> T:
        """Run `fn` on the execution under its lock, unless the request id's answer is remembered: then
        `replay` it. Checked before waiting for the lock (a plain retry) and again once it is held: a
        retry that raced the first call (the client gave up waiting) found nothing at first, waited,
        and then ran the next step, or failed because the first call had approved or rolled back."""

        async def recalled() -> dict[str, Any] | None:
            if not request_id:
                return None
            async with self._db.connection() as conn:
                return await idempotency.recall(conn, scope, request_id)

        remembered = await recalled()
        if remembered is not None:
            return await replay(remembered)

        async def locked() -> T:
            again = await recalled()
            if again is not None:
                return await replay(again)
            return await self._op(execution_id, fn, load=True)

        return await self._shielded(self._with_lock(execution_id, locked), name)

    # ---- executions: reads -------------------------------------------------------------------------

    async def _read(self, execution_id: str) -> tuple[Runbook, list[ExecutionEvent]]:
        async with self._db.connection() as conn:
            row = await repo.get_execution(conn, execution_id)
            if row is None:
                raise NotFoundError(f"execution {execution_id!r} not found")
            events = await repo.load_events(conn, execution_id)
        return await self._runbook_version(row.runbook_id, row.runbook_version), events

    async def get_status(self, execution_id: str, as_of: datetime | None = None) -> ExecutionContext:
        """The committed state (any replica answers the same), or the state as of a past time."""
        _require(execution_id, "execution_id")
        runbook, events = await self._read(execution_id)
        if as_of is not None and (not events or as_of < events[0].occurred_time):
            raise NotFoundError(f"execution {execution_id!r} had not started at {as_of.isoformat()}")
        return project(runbook, events, as_of)

    async def step_output(self, execution_id: str, step_id: str) -> Mapping[str, Any] | None:
        """A step's output as committed (None while it has none)."""
        _require(step_id, "step_id")
        state = await self.get_status(execution_id)
        step = state.step_states.get(step_id)
        if step is None:
            raise NotFoundError(f"execution {execution_id!r} has no step {step_id!r}")
        return step.output

    async def list_executions(
        self,
        *,
        page_size: int,
        page_token: str,
        tracking_id: str = "",
        incident_id: str = "",
        runbook_id: str = "",
        status: RunbookStatus | None = None,
    ) -> tuple[list[repo.ExecutionRow], str]:
        """One page of the `executions` index, newest start first. `tracking_id` matches executions started
        under it and those a request under it changed (see repo.list_executions)."""
        problems: list[FieldViolation] = []
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        problems += filter_problems(tracking_id=tracking_id, incident_id=incident_id, runbook_id=runbook_id)
        if status is not None and status not in _EXECUTION_STATUSES:
            names = ", ".join(s.value for s in _EXECUTION_STATUSES)
            problems.append(FieldViolation("status", f"{status.value} is not an execution status ({names})"))
        filters = filters_key(tracking_id, incident_id, runbook_id, status.value if status else "")
        after = read_page_token(page_token, filters, time_and_id("e"), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        async with self._db.connection() as conn:
            rows = await repo.list_executions(
                conn,
                tracking_id=tracking_id,
                incident_id=incident_id,
                runbook_id=runbook_id,
                status=status.value if status else "",
                after=after,
                limit=limit + 1,
            )
        return cut_page(rows, limit, lambda e: {"t": e.started_time.isoformat(), "e": e.execution_id}, filters)

    async def watch(self, execution_id: str) -> AsyncIterator[tuple[ExecutionContext, str]]:
        """The current state, then the state after every committed transition, until it finishes."""
        _require(execution_id, "execution_id")
        wake = asyncio.Event()
        self._watchers.setdefault(execution_id, set()).add(wake)
        try:
            last = 0
            while True:
                if self._watches_ending:
                    raise UnavailableError(WATCH_ENDED_BY_SHUTDOWN)
                wake.clear()
                runbook, events = await self._read(execution_id)
                # The first answer is the current state; after that, one answer per new transition.
                seqs = [len(events)] if last == 0 else range(last + 1, len(events) + 1)
                for seq in seqs:
                    yield project(runbook, events[:seq]), events[seq - 1].type.value
                    last = seq
                if _watch_done(runbook, events):
                    return
                # Woken by a local commit or, for other replicas' commits, by their NATS events;
                # the timeout only bounds the damage of a missed wake-up.
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (client gone).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await wake.wait()
        finally:
            waiting = self._watchers.get(execution_id)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self._watchers[execution_id]

    def end_watches(self) -> None:
        """Shutdown has begun: every watch ends (UNAVAILABLE) at its next turn, and no new one starts."""
        self._watches_ending = True
        for waiting in self._watchers.values():
            for wake in waiting:
                wake.set()

    def notify(self, execution_id: str) -> None:
        """Something committed a transition of the execution (here, or another replica via NATS)."""
        for wake in self._watchers.get(execution_id, ()):
            wake.set()

    # ---- the machinery -----------------------------------------------------------------------------

    async def _load(self, execution_id: str) -> None:
        async def nothing() -> None:
            return None

        await self._with_lock(execution_id, lambda: self._op(execution_id, nothing, load=True))

    async def _with_lock(self, execution_id: str, fn: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.get(execution_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[execution_id] = lock
        async with lock:
            return await fn()

    def _loaded(self, execution_id: str) -> bool:
        try:
            self._engine.version(execution_id)
        except NotFoundError:
            return False
        return True

    async def _op(self, execution_id: str, fn: Callable[[], Awaitable[T]], *, load: bool = False) -> T:
        """Run one engine operation on an execution (lock held): load it if needed, discard whatever was
        not committed if anything fails, evict it from memory once it finished."""
        op = _OpState(execution_id)
        token = _current_op.set(op)
        try:
            if load:
                await self._ensure(execution_id)
            with _on_behalf_of(self._tracking_of(execution_id)):
                return await fn()
        except BaseException:
            self._discard_uncommitted(execution_id)
            raise
        finally:
            _current_op.reset(token)
            self._evict_if_finished(execution_id)

    def _tracking_of(self, execution_id: str) -> str:
        """The tracking id the execution was started under ('' while it is not loaded)."""
        if not self._loaded(execution_id):
            return ""
        return self._engine.get_execution_status(execution_id).tracking_id

    def _discard_uncommitted(self, execution_id: str) -> None:
        if not self._loaded(execution_id):
            return
        if self._engine.version(execution_id) != self._committed.get(execution_id):
            self._engine.evict_execution(execution_id)
            self._committed.pop(execution_id, None)
            # No action of ours is in flight for it (we hold its lock), so a RUNNING step the store
            # shows was cut off by us: the reload may settle it at once.
            self._may_settle.add(execution_id)

    def _evict_if_finished(self, execution_id: str) -> None:
        if self._loaded(execution_id) and self._engine.get_execution_status(execution_id).finished:
            self._engine.evict_execution(execution_id)
            self._committed.pop(execution_id, None)
            self._gates.pop(execution_id, None)

    async def _ensure(self, execution_id: str) -> None:
        """Have the engine hold the committed state of the execution (load, or reload when stale)."""
        async with self._db.connection() as conn:
            if self._loaded(execution_id):
                stored = await repo.execution_version(conn, execution_id)
                if stored == self._committed.get(execution_id):
                    return
                # Another replica advanced it: our copy is stale.
                self._engine.evict_execution(execution_id)
                self._committed.pop(execution_id, None)
            row = await repo.get_execution(conn, execution_id)
            if row is None:
                raise NotFoundError(f"execution {execution_id!r} not found")
            events = await repo.load_events(conn, execution_id)
        runbook = await self._runbook_version(row.runbook_id, row.runbook_version)
        if execution_id not in self._may_settle:
            self._check_lease(runbook, events)
        self._committed[execution_id] = len(events)
        with _on_behalf_of(row.tracking_id):
            await self._engine.load_execution(runbook, events)
            await self._persist(execution_id)  # what settling the load appended (raises a failed checkpoint's error)
        self._may_settle.discard(execution_id)
        self._deferred.discard(execution_id)

    def _check_lease(self, runbook: Runbook, events: Sequence[ExecutionEvent]) -> None:
        """ConflictError while a RUNNING step (or a rollback) may still be in flight on another replica."""
        if not events:
            return
        state = project(runbook, events)
        now = self._clock.now()
        longest = max(s.timeout_s for s in runbook.steps)
        for step in runbook.steps:
            record = state.step_states[step.step_id]
            if record.status is StepStatus.RUNNING and record.started_time is not None:
                until = record.started_time + timedelta(seconds=step.timeout_s + _LEASE_GRACE_S)
                if now < until:
                    raise ConflictError(
                        f"step {step.step_id!r} of execution {state.execution_id!r} is running elsewhere "
                        f"(started {record.started_time.isoformat()}); retry after {until.isoformat()}"
                    )
        rolling = any(e.type is EventType.ROLLBACK_STARTED for e in events) and (
            events[-1].type is not EventType.EXECUTION_FINISHED
        )
        if rolling:
            until = events[-1].occurred_time + timedelta(seconds=longest + _LEASE_GRACE_S)
            if now < until:
                raise ConflictError(
                    f"execution {state.execution_id!r} is being rolled back elsewhere; retry after {until.isoformat()}"
                )

    async def _persist(
        self,
        execution_id: str,
        *,
        start: _StartInfo | None = None,
        remember: tuple[str, str, dict[str, Any]] | None = None,
    ) -> ExecutionContext:
        """Commit the engine's new events for the execution with the index row, outbox and idempotency
        record; returns the committed state."""
        op = _current_op.get()
        if op is not None and op.conflict is not None:
            # An earlier commit of this operation failed: nothing after it may be committed.
            raise op.conflict
        events = self._engine.take_new_events(execution_id)
        state = self._engine.get_execution_status(execution_id)
        published = list(op.published) if op is not None and op.execution_id == execution_id else []
        if not events:
            if remember is not None and remember[1]:
                async with self._db.transaction() as conn:
                    await idempotency.remember(conn, *remember)
            # A load appends nothing when there is nothing to settle, yet the ticker must learn of a
            # gate it holds: after a restart, an approval nobody gave expired only when someone
            # asked for the next step by hand.
            self._track_gate(state)
            return state
        circuit = self._agents.drain_transitions() if self._agents is not None else []
        messages = self._outbox(state, events, published, circuit)
        now = self._clock.now()
        # The index's finished_time waits for the last EXECUTION_FINISHED: a rollback after the
        # execution failed (or completed) is work a restart must pick up (`repo.unfinished_executions`).
        settled_time = state.finished_time if events[-1].type is EventType.EXECUTION_FINISHED else None
        try:
            async with self._db.transaction() as conn:
                if start is not None:
                    await repo.insert_execution(
                        conn,
                        repo.ExecutionRow(
                            execution_id=execution_id,
                            runbook_id=state.runbook_id,
                            runbook_version=state.runbook_version,
                            triggered_by=state.triggered_by,
                            status=state.status.value,
                            version=state.version,
                            current_step_index=state.current_step_index,
                            incident_id=start.incident_id,
                            start_request_id=start.start_request_id,
                            started_time=state.started_time,
                            finished_time=settled_time,
                            updated_time=now,
                            tracking_id=state.tracking_id,
                        ),
                    )
                await repo.append_events(conn, events)
                if start is None:
                    await repo.update_execution(
                        conn,
                        execution_id,
                        status=state.status.value,
                        version=state.version,
                        current_step_index=state.current_step_index,
                        finished_time=settled_time,
                        updated_time=now,
                    )
                await outbox.append(conn, messages)
                if remember is not None:
                    await idempotency.remember(conn, *remember)
        except BaseException as exc:
            if self._agents is not None and circuit:
                self._agents.requeue_transitions(circuit)
            if op is not None and op.execution_id == execution_id:
                op.conflict = exc
            raise
        if op is not None and op.execution_id == execution_id:
            op.published.clear()
        self._committed[execution_id] = state.version
        self._relay.wake()
        self._track_gate(state)
        self.notify(execution_id)
        return state

    def _outbox(
        self,
        state: ExecutionContext,
        events: Sequence[ExecutionEvent],
        published: Sequence[PublishedMessage],
        circuit: Sequence[TransitionEvent],
    ) -> list[outbox.OutboxEvent]:
        tracking = current_tracking_id()
        # What a publish step sent goes first: it happened before the step's completion.
        out = [self._row(message, message.execution_id, tracking) for message in published]
        for event in events:
            subject = self._subjects.runbook(event.type.value.lower())
            transition = Transition(
                event_id=_event_id(event.execution_id, event.seq),
                subject=subject,
                event_type=self._subjects.event_type(subject),
                execution_id=event.execution_id,
                runbook_id=state.runbook_id,
                transition=event.type.value,
                step_id=str(event.data.get("step_id", "")),
                actor=event.actor,
                execution_status=state.status.value,
                data=event.data,
                occurred_time=event.occurred_time,
                tracking_id=event.tracking_id or tracking,
                seq=event.seq,
            )
            out.append(self._row(transition, event.execution_id, transition.tracking_id))
        for change in circuit:
            subject = self._subjects.runbook("circuit_state_changed")
            circuit_change = CircuitChange(str(uuid.uuid4()), subject, self._subjects.event_type(subject), change)
            out.append(self._row(circuit_change, change.name, tracking))
        return out

    def _row(self, message: OutboxMessage, aggregate_id: str, tracking: str) -> outbox.OutboxEvent:
        return outbox.OutboxEvent(
            subject=message.subject,
            aggregate_id=aggregate_id,
            payload=self._encode(message),
            tracking_id=tracking,
            event_id=message.event_id,
        )

    def _track_gate(self, state: ExecutionContext) -> None:
        expiry = None
        if not state.finished:
            for step in state.step_states.values():
                if step.status is StepStatus.AWAITING_APPROVAL and step.approval_expires_time is not None:
                    expiry = step.approval_expires_time
        if expiry is None:
            self._gates.pop(state.execution_id, None)
        else:
            self._gates[state.execution_id] = expiry

    # ---- background: drivers and the ticker ----------------------------------------------------------

    def _resume(self, execution_id: str, triggered_by: str) -> None:
        """After a load: incident-started executions not waiting for a person carry on by themselves."""
        if not triggered_by.startswith("incident:") or not self._loaded(execution_id):
            return
        state = self._engine.get_execution_status(execution_id)
        if not state.finished and not state.awaiting_approval:
            self._drive(execution_id)

    def _drive(self, execution_id: str) -> None:
        running = self._drivers.get(execution_id)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self._drive_loop(execution_id), name=f"drive-{execution_id}")
        self._drivers[execution_id] = task
        task.add_done_callback(
            lambda t: self._drivers.pop(execution_id, None) if self._drivers.get(execution_id) is t else None
        )

    async def _drive_loop(self, execution_id: str) -> None:
        conflicts = 0
        while True:
            try:
                status, state = await self.execute_next_step(execution_id)
            except ConflictError as exc:
                conflicts += 1
                if conflicts > 3:
                    log.warning("driver for %s gives up after repeated conflicts: %s", execution_id, exc)
                    return
                continue  # reloaded: carry on from the committed state
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Finished meanwhile (FailedPrecondition) or the store is down: a person or the next
                # start-up takes it from here.
                log.info("driver for %s stops: %s", execution_id, exc)
                return
            if state.finished or status is StepStatus.AWAITING_APPROVAL:
                return

    async def _adopt(self, now: datetime) -> None:
        """Loads the unfinished executions unchanged for `adopt_after_s` that this replica does not
        hold; resumes the incident-started ones (see `ADOPT_AFTER_S`)."""
        async with self._db.connection() as conn:
            idle = await repo.unfinished_executions(conn, idle_before=now - timedelta(seconds=self._adopt_after_s))
        for row in idle:
            execution_id = row.execution_id
            if self._loaded(execution_id) or execution_id in self._deferred:
                continue
            try:
                await self._load(execution_id)
            except ConflictError:
                self._deferred.add(execution_id)  # a step still within its lease: the ticker retries
                continue
            except NotFoundError:
                continue
            log.info("took up execution %s (unchanged since %s)", execution_id, row.updated_time.isoformat())
            self._resume(execution_id, row.triggered_by)

    async def _expire(self, execution_id: str) -> None:
        """Fail the execution if its gate, as committed, is still open and past its expiry. Since the
        gate was tracked another replica may have approved it (the load then sees that): the ticker
        only ever expires, it never runs a step nobody asked for."""

        async def expire() -> None:
            state = self._engine.get_execution_status(execution_id)
            self._track_gate(state)
            expiry = self._gates.get(execution_id)
            if expiry is None or expiry > self._clock.now():
                return
            # The engine expires the gate itself when asked to move on.
            await self._engine.execute_next_step(execution_id)
            await self._persist(execution_id)

        await self._shielded(
            self._with_lock(execution_id, lambda: self._op(execution_id, expire, load=True)), f"expire-{execution_id}"
        )

    async def tick(self) -> None:
        """Fail executions whose approval expired; retry loads that waited for a step lease; now and
        then, take up executions nobody else seems to hold (`_adopt`)."""
        now = self._clock.now()
        if self._next_adoption is None or now >= self._next_adoption:
            self._next_adoption = now + timedelta(seconds=self._adopt_after_s)
            await self._adopt(now)
        for execution_id, expiry in list(self._gates.items()):
            if expiry <= now:
                try:
                    await self._expire(execution_id)
                except (ConflictError, NotFoundError) as exc:
                    log.info("expiring %s: %s", execution_id, exc)
                    self._gates.pop(execution_id, None)
        for execution_id in list(self._deferred):
            try:
                await self._load(execution_id)
            except ConflictError:
                continue
            except NotFoundError:
                self._deferred.discard(execution_id)
                continue
            state = await self.get_status(execution_id)
            self._resume(execution_id, state.triggered_by)


def _watch_done(runbook: Runbook, events: Sequence[ExecutionEvent]) -> bool:
    """Finished for good: the last event finished it, and no automatic rollback is still to come."""
    if not events or events[-1].type is not EventType.EXECUTION_FINISHED:
        return False
    failed = events[-1].data.get("status") == RunbookStatus.FAILED.value
    rollback_started = any(e.type is EventType.ROLLBACK_STARTED for e in events)
    return not (failed and runbook.auto_rollback and not rollback_started)


def _require(value: str, name: str) -> None:
    """An execution or step id a request names: one that could never exist (over-long, NUL, blank) is
    the caller's error, as the README promises for every id, not NOT_FOUND."""
    problem = id_problem(value)
    if problem is not None:
        raise ValidationError.single(name, "required" if not value else problem)


def incident_variables(incident: Mapping[str, Any]) -> dict[str, Any]:
    """Only the documented incident fields (what trigger conditions and step parameters may use)."""
    return {k: incident[k] for k in INCIDENT_FIELDS if k in incident}
