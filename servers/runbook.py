"""RunbookService servicer: proto <-> domain mapping, the event encoder, the incident consumer, agents.

* Incident triggers: durable JetStream consumers on aetherops.incidents.opened ("runbook-incidents")
  and aetherops.incidents.updated ("runbook-incident-updates") decode events.v1.Event and hand the
  incident to RunbookService.start_for_incident as a dict with the keys of
  `aetherops.services.runbook.INCIDENT_FIELDS` - cluster_id, satellite_ids, subsystems, max_severity,
  root_cause_alert_id, root_cause_subsystem, root_cause_satellite_id, alert_count, multi_satellite.
  Runbook authors write trigger_conditions against these names; the same dict becomes the execution's
  variables (`${root_cause_satellite_id}` in step parameters). Updates count because an incident opens
  with its first alert (or first commit batch): a severity that rises, a subsystem or satellite that
  joins later, alert_count and multi_satellite are only ever seen in an update. The execution id per
  (incident, runbook) keeps it to one execution per incident, however many updates match. The updates
  consumer came later than the incidents stream: created, it starts at the server's start rather
  than replaying a month of old incidents' updates.
* Starts by hand for an incident (StartExecution incident_id) get the same dict as variables, under
  the caller's: `incident_from_record` turns the stored incident into the message its events carry
  (the correlation server's conversion) and that into the dict as the consumers do.
* Closed incidents: a third durable consumer on aetherops.incidents.closed ("runbook-incident-closes",
  from the server's start like the updates one) has RunbookService.note_incident_closed record
  INCIDENT_CLOSED in the audit trail of every execution the incident started that is still running.
* Agents: `agent:<name>` actions are declared from the constructor's `agent_actions` (default
  the AETHEROPS_AGENT_ACTIONS setting), and at runtime when an agent
  announces itself with JSON {"name": ..., "description": ..., "idempotent": ...} on
  aetherops.actions._announce (core NATS, under the namespace prefix).
* WatchExecution: the service wakes watchers after its own commits; commits of other replicas wake
  them through the runbook events on NATS (one subscription per process, filtered by execution id).
* Tracking: an incident event is handled under the tracking id it carries (the envelope's, else the
  NATS header's, which the durable consumer sets), so the executions it starts and their transitions
  record the tracking id of the alert that opened the incident.
* Identities: the approver and triggered_by come from `_principal_or` - the authenticated principal
  when authentication set one, else the request field (documented in the proto).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from aetherops.bus import DurableConsumer
from aetherops.config import Settings
from aetherops.correlation import Alert
from aetherops.db.correlation import ClusterRecord
from aetherops.db.runbook import ExecutionRow
from aetherops.errors import ValidationError
from aetherops.runbook import (
    DEFAULT_STEP_TIMEOUT_S,
    ActionInfo,
    ActionKind,
    ExecutionContext,
    PlannedStep,
    Runbook,
    RunbookStatus,
    RunbookStep,
    StepStatus,
)
from aetherops.services.agents import AgentInvoker
from aetherops.services.runbook import (
    CircuitChange,
    OutboxMessage,
    PublishedMessage,
    RunbookService,
    Transition,
    incident_variables,
)
from aetherops.tracking import current_principal_name, reset_tracking_id, set_tracking_id
from gen.aetherops.events.v1 import events_pb2
from gen.aetherops.runbook.v1 import runbook_pb2 as pb
from gen.aetherops.runbook.v1 import runbook_pb2_grpc
from servers.component import GaugeSample, Infra
from servers.convert import from_duration, from_struct, from_ts, to_duration, to_struct, to_ts
from servers.correlation import incident_to_proto

__all__ = [
    "RunbookComponent",
    "encode_message",
    "execution_row_to_proto",
    "incident_from_event",
    "incident_from_record",
]

log = logging.getLogger("aetherops.runbook")


_STEP_STATUS = {s: getattr(pb, f"STEP_STATUS_{s.value}") for s in StepStatus}
_RUNBOOK_STATUS = {s: getattr(pb, f"RUNBOOK_STATUS_{s.value}") for s in RunbookStatus}
_RUNBOOK_STATUS_IN = {v: k for k, v in _RUNBOOK_STATUS.items()}
_ACTION_KIND = {k: getattr(pb, f"ACTION_KIND_{k.value}") for k in ActionKind}


def _principal_or(request_value: str, context: Any) -> str:
    """Who is acting: THE one place deciding it. The authenticated principal (set by the security
    interceptor) wins; until authentication is configured, the request field says."""
    return current_principal_name() or request_value


# ---- mapping -----------------------------------------------------------------------------------------


def runbook_from_proto(message: pb.Runbook) -> Runbook:
    steps = []
    for i, step in enumerate(message.steps):
        timeout = from_duration(step, "timeout", path=f"runbook.steps[{i}].timeout")
        steps.append(
            RunbookStep(
                step_id=step.step_id,
                action=step.action,
                parameters=from_struct(step.parameters),
                requires_approval=step.requires_approval,
                timeout_s=DEFAULT_STEP_TIMEOUT_S if timeout is None else timeout,
                rollback_action=step.rollback_action or None,
                rollback_parameters=from_struct(step.rollback_parameters),
                approval_timeout_s=from_duration(step, "approval_timeout", path=f"runbook.steps[{i}].approval_timeout"),
            )
        )
    status = _RUNBOOK_STATUS_IN.get(message.status, RunbookStatus.ACTIVE)
    return Runbook(
        runbook_id=message.runbook_id,
        name=message.name,
        description=message.description,
        steps=steps,
        trigger_conditions=from_struct(message.trigger_conditions),
        auto_start=message.auto_start,
        auto_rollback=message.auto_rollback,
        status=status if message.status else RunbookStatus.ACTIVE,
    )


def runbook_to_proto(runbook: Runbook) -> pb.Runbook:
    return pb.Runbook(
        runbook_id=runbook.runbook_id,
        name=runbook.name,
        description=runbook.description,
        steps=[
            pb.RunbookStep(
                step_id=s.step_id,
                action=s.action,
                parameters=to_struct(dict(s.parameters)),
                requires_approval=s.requires_approval,
                timeout=to_duration(s.timeout_s),
                rollback_action=s.rollback_action or "",
                rollback_parameters=to_struct(dict(s.rollback_parameters)),
                approval_timeout=to_duration(s.approval_timeout_s) if s.approval_timeout_s is not None else None,
            )
            for s in runbook.steps
        ],
        trigger_conditions=to_struct(dict(runbook.trigger_conditions)),
        auto_start=runbook.auto_start,
        auto_rollback=runbook.auto_rollback,
        version=runbook.version,
        status=_RUNBOOK_STATUS[runbook.status],
        create_time=to_ts(runbook.create_time),
    )


OUTPUT_BYTES = 2 * 1024 * 1024
"""Most bytes of step outputs one Execution carries; the rest are marked output_omitted (GetStepOutput
has them). Each output may take 256 KiB: twenty such steps made every answer about the execution
(its status, each step's reply, the watch) outgrow the 4 MiB message limit."""


def _steps_to_proto(state: ExecutionContext) -> list[pb.StepState]:
    steps, room = [], OUTPUT_BYTES
    for s in state.step_states.values():
        step = pb.StepState(
            step_id=s.step_id,
            action=s.action,
            status=_STEP_STATUS[s.status],
            start_time=to_ts(s.started_time),
            finish_time=to_ts(s.finished_time),
            attempts=s.attempts,
            error=s.error or "",
            approved_by=s.approved_by or "",
            approval_expire_time=to_ts(s.approval_expires_time),
        )
        if s.output is not None:
            output = to_struct(dict(s.output))
            room -= output.ByteSize()
            if room >= 0:
                step.output.CopyFrom(output)
            else:
                step.output_omitted = True
        steps.append(step)
    return steps


def execution_to_proto(state: ExecutionContext) -> pb.Execution:
    return pb.Execution(
        execution_id=state.execution_id,
        runbook_id=state.runbook_id,
        runbook_version=state.runbook_version,
        triggered_by=state.triggered_by,
        status=_RUNBOOK_STATUS[state.status],
        current_step_index=state.current_step_index,
        steps=_steps_to_proto(state),
        variables=to_struct(dict(state.variables)),
        audit_log=[
            pb.AuditEntry(
                time=to_ts(a.time),
                actor=a.actor,
                transition=a.transition,
                step_id=a.step_id,
                detail=a.detail,
                seq=a.seq,
                tracking_id=a.tracking_id,
            )
            for a in state.audit_log
        ],
        start_time=to_ts(state.started_time),
        finish_time=to_ts(state.finished_time),
        error=state.error or "",
        version=state.version,
        tracking_id=state.tracking_id,
        incident_id=state.incident_id,
    )


def execution_row_to_proto(row: ExecutionRow) -> pb.Execution:
    """A ListExecutions entry: what the executions index holds (no steps, variables or audit log)."""
    return pb.Execution(
        execution_id=row.execution_id,
        runbook_id=row.runbook_id,
        runbook_version=row.runbook_version,
        triggered_by=row.triggered_by,
        status=_RUNBOOK_STATUS[RunbookStatus(row.status)],
        current_step_index=row.current_step_index,
        start_time=to_ts(row.started_time),
        finish_time=to_ts(row.finished_time),
        version=row.version,
        tracking_id=row.tracking_id,
        incident_id=row.incident_id,
    )


def _action_to_proto(info: ActionInfo) -> pb.Action:
    return pb.Action(
        name=info.name, description=info.description, kind=_ACTION_KIND[info.kind], idempotent=info.idempotent
    )


def _plan_to_proto(plan: Sequence[PlannedStep]) -> list[pb.PlannedStep]:
    return [
        pb.PlannedStep(
            step_id=p.step_id,
            action=p.action,
            rendered_parameters=to_struct(dict(p.parameters)),
            requires_approval=p.requires_approval,
        )
        for p in plan
    ]


def encode_message(message: OutboxMessage) -> bytes:
    """The events.v1.Event envelope of what the runbook service writes to the outbox."""
    envelope = events_pb2.Event(
        event_id=message.event_id,
        type=message.event_type,
        source_service="runbook",
    )
    if isinstance(message, Transition):
        envelope.occurred_time.FromDatetime(message.occurred_time)
        envelope.tracking_id = message.tracking_id
        envelope.aggregate_id = message.execution_id
        envelope.execution_transition.CopyFrom(
            events_pb2.ExecutionTransition(
                execution_id=message.execution_id,
                runbook_id=message.runbook_id,
                transition=message.transition,
                step_id=message.step_id,
                actor=message.actor,
                execution_status=message.execution_status,
                data=to_struct(dict(message.data)),
            )
        )
    elif isinstance(message, PublishedMessage):
        envelope.occurred_time.FromDatetime(message.occurred_time)
        envelope.tracking_id = message.tracking_id
        envelope.aggregate_id = message.execution_id
        envelope.execution_transition.CopyFrom(
            events_pb2.ExecutionTransition(
                execution_id=message.execution_id,
                runbook_id=message.runbook_id,
                transition="PUBLISHED",
                step_id=message.step_id,
                actor=message.actor,
                execution_status="RUNNING",
                data=to_struct(dict(message.payload)),
            )
        )
    else:
        assert isinstance(message, CircuitChange)
        change = message.change
        envelope.occurred_time.FromDatetime(change.time)
        envelope.aggregate_id = change.name
        envelope.circuit_state_changed.CopyFrom(
            events_pb2.CircuitStateChanged(
                name=change.name,
                from_state=change.from_state.value,
                to_state=change.to_state.value,
                reason=change.reason,
            )
        )
    return bytes(envelope.SerializeToString())


def incident_from_event(event: events_pb2.Event) -> dict[str, Any] | None:
    """The incident data runbooks match on, from an incident_opened or incident_updated event (None for
    other payloads)."""
    payload = event.WhichOneof("payload")
    if payload == "incident_opened":
        return _incident_data(event.incident_opened.incident)
    if payload == "incident_updated":
        return _incident_data(event.incident_updated.incident)
    return None


def incident_from_record(record: ClusterRecord, root: Alert | None) -> dict[str, Any]:
    """The incident data of a stored incident (and its root-cause alert): what its events would carry,
    converted as they are, so that a start by hand for the incident gets the variables an incident
    start would (`RunbookService(incident_data=...)`)."""
    return _incident_data(incident_to_proto(record, root))


def _incident_data(incident: events_pb2.Incident) -> dict[str, Any]:
    """The incident data runbooks match on and executions get as variables, from the event's incident."""
    return incident_variables(
        {
            "cluster_id": incident.cluster_id,
            "satellite_ids": list(incident.satellite_ids),
            "subsystems": list(incident.subsystems),
            "max_severity": incident.max_severity,
            "root_cause_alert_id": incident.root_cause_alert_id,
            "root_cause_subsystem": incident.root_cause_subsystem,
            "root_cause_satellite_id": incident.root_cause_satellite_id,
            "alert_count": incident.alert_count,
            "multi_satellite": incident.multi_satellite,
        }
    )


def _incident_event(msg: Msg) -> events_pb2.Event | None:
    """The event a message carries (None, and a warning, for bytes that are not one)."""
    event = events_pb2.Event()
    try:
        event.ParseFromString(msg.data)
    except DecodeError as exc:
        log.warning("ignoring an undecodable incident event: %s", exc)  # redelivery would not help
        return None
    return event


@contextlib.contextmanager
def _tracked(event: events_pb2.Event) -> Iterator[None]:
    """Within the block, the event's tracking id (when it has one) is the current one."""
    token = set_tracking_id(event.tracking_id) if event.tracking_id else None
    try:
        yield
    finally:
        if token is not None:
            reset_tracking_id(token)


# ---- servicer ---------------------------------------------------------------------------------------


class RunbookServicer(runbook_pb2_grpc.RunbookServiceServicer):
    def __init__(self, component: RunbookComponent) -> None:
        self._c = component

    @property
    def _svc(self) -> RunbookService:
        assert self._c.service is not None
        return self._c.service

    async def ListActions(self, request: pb.ListActionsRequest, context: Any) -> pb.ListActionsResponse:
        page, token = self._svc.list_actions(page_size=request.page_size, page_token=request.page_token)
        return pb.ListActionsResponse(actions=[_action_to_proto(a) for a in page], next_page_token=token)

    async def RegisterRunbook(self, request: pb.RegisterRunbookRequest, context: Any) -> pb.RegisterRunbookResponse:
        if not request.HasField("runbook"):
            raise ValidationError.single("runbook", "required")
        stored, created = await self._svc.register_runbook(
            runbook_from_proto(request.runbook), request_id=request.request_id
        )
        return pb.RegisterRunbookResponse(runbook=runbook_to_proto(stored), created=created)

    async def GetRunbook(self, request: pb.GetRunbookRequest, context: Any) -> pb.GetRunbookResponse:
        runbook = await self._svc.get_runbook(request.runbook_id, request.version)
        return pb.GetRunbookResponse(runbook=runbook_to_proto(runbook))

    async def ListRunbooks(self, request: pb.ListRunbooksRequest, context: Any) -> pb.ListRunbooksResponse:
        page, token = await self._svc.list_runbooks(page_size=request.page_size, page_token=request.page_token)
        return pb.ListRunbooksResponse(runbooks=[runbook_to_proto(r) for r in page], next_page_token=token)

    async def FindMatchingRunbooks(
        self, request: pb.FindMatchingRunbooksRequest, context: Any
    ) -> pb.FindMatchingRunbooksResponse:
        found, token = await self._svc.find_matching_page(
            from_struct(request.incident_data), page_size=request.page_size, page_token=request.page_token
        )
        return pb.FindMatchingRunbooksResponse(runbooks=[runbook_to_proto(r) for r in found], next_page_token=token)

    async def StartExecution(self, request: pb.StartExecutionRequest, context: Any) -> pb.StartExecutionResponse:
        variables = from_struct(request.variables)
        if request.dry_run:
            plan = await self._svc.plan(request.runbook_id, variables, incident_id=request.incident_id)
            return pb.StartExecutionResponse(plan=_plan_to_proto(plan))
        state = await self._svc.start_execution(
            request.runbook_id,
            _principal_or(request.triggered_by, context),
            variables,
            request_id=request.request_id,
            incident_id=request.incident_id,
            check_incident=True,
        )
        return pb.StartExecutionResponse(execution=execution_to_proto(state))

    async def ExecuteNextStep(self, request: pb.ExecuteNextStepRequest, context: Any) -> pb.ExecuteNextStepResponse:
        status, state = await self._svc.execute_next_step(
            request.execution_id, actor=_principal_or("", context) or "operator", request_id=request.request_id
        )
        return pb.ExecuteNextStepResponse(step_status=_STEP_STATUS[status], execution=execution_to_proto(state))

    async def ApproveStep(self, request: pb.ApproveStepRequest, context: Any) -> pb.ApproveStepResponse:
        state = await self._svc.approve_step(
            request.execution_id,
            request.step_id,
            _principal_or(request.approver, context),
            request_id=request.request_id,
        )
        return pb.ApproveStepResponse(execution=execution_to_proto(state))

    async def RejectStep(self, request: pb.RejectStepRequest, context: Any) -> pb.RejectStepResponse:
        state = await self._svc.reject_step(
            request.execution_id,
            request.step_id,
            _principal_or(request.approver, context),
            reason=request.reason,
            request_id=request.request_id,
        )
        return pb.RejectStepResponse(execution=execution_to_proto(state))

    async def RollbackExecution(
        self, request: pb.RollbackExecutionRequest, context: Any
    ) -> pb.RollbackExecutionResponse:
        count, state = await self._svc.rollback_execution(
            request.execution_id, actor=_principal_or("", context) or "operator", request_id=request.request_id
        )
        return pb.RollbackExecutionResponse(rolled_back_count=count, execution=execution_to_proto(state))

    async def CancelExecution(self, request: pb.CancelExecutionRequest, context: Any) -> pb.CancelExecutionResponse:
        state = await self._svc.cancel_execution(
            request.execution_id,
            _principal_or("", context) or "operator",
            reason=request.reason,
            request_id=request.request_id,
        )
        return pb.CancelExecutionResponse(execution=execution_to_proto(state))

    async def GetExecutionStatus(
        self, request: pb.GetExecutionStatusRequest, context: Any
    ) -> pb.GetExecutionStatusResponse:
        state = await self._svc.get_status(request.execution_id, from_ts(request, "as_of_time"))
        return pb.GetExecutionStatusResponse(execution=execution_to_proto(state))

    async def GetStepOutput(self, request: pb.GetStepOutputRequest, context: Any) -> pb.GetStepOutputResponse:
        output = await self._svc.step_output(request.execution_id, request.step_id)
        return pb.GetStepOutputResponse(output=None if output is None else to_struct(dict(output)))

    async def ListExecutions(self, request: pb.ListExecutionsRequest, context: Any) -> pb.ListExecutionsResponse:
        status: RunbookStatus | None = None
        if request.status:
            status = _RUNBOOK_STATUS_IN.get(request.status)
            if status is None:
                raise ValidationError.single("status", f"unknown status {request.status}")
        rows, token = await self._svc.list_executions(
            page_size=request.page_size,
            page_token=request.page_token,
            tracking_id=request.tracking_id,
            incident_id=request.incident_id,
            runbook_id=request.runbook_id,
            status=status,
        )
        return pb.ListExecutionsResponse(executions=[execution_row_to_proto(r) for r in rows], next_page_token=token)

    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: Any
    ) -> AsyncIterator[pb.WatchExecutionResponse]:
        async for state, transition in self._svc.watch(request.execution_id):
            yield pb.WatchExecutionResponse(execution=execution_to_proto(state), transition=transition)


# ---- component ---------------------------------------------------------------------------------------


class RunbookComponent:
    name = "runbook"
    service_name = "aetherops.runbook.v1.RunbookService"

    def __init__(self, settings: Settings, agent_actions: Sequence[str] | None = None) -> None:
        self._settings = settings
        self._agent_actions = tuple(settings.agent_actions if agent_actions is None else agent_actions)
        self.servicer = RunbookServicer(self)
        self.service: RunbookService | None = None
        self.infra: Infra | None = None
        self.consumer: DurableConsumer | None = None
        self.update_consumer: DurableConsumer | None = None
        self.close_consumer: DurableConsumer | None = None
        self._consumer_tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        runbook_pb2_grpc.add_RunbookServiceServicer_to_server(self.servicer, server)

    def end_streams(self) -> None:
        if self.service is not None:
            self.service.end_watches()

    def gauges(self) -> list[GaugeSample]:
        if self.service is None:
            return []
        running = len(self.service.engine.list_executions(RunbookStatus.RUNNING))
        return [("aetherops_running_executions", "Executions in memory still running", {}, float(running))]

    async def start(self, infra: Infra) -> None:
        self.infra = infra
        subjects = infra.bus.subjects
        agents = AgentInvoker(infra.bus.nc, subjects, clock=infra.clock)
        service = RunbookService(
            infra.db,
            infra.relay,
            subjects,
            encode_message,
            infra.clock,
            incident_data=incident_from_record,
            agents=agents,
            agent_actions=self._agent_actions,
        )
        await service.start()
        self.service = service
        nc = infra.bus.nc
        self._subscriptions.append(await nc.subscribe(subjects.runbook("*"), cb=self._on_runbook_event))
        self._subscriptions.append(await nc.subscribe(subjects.action("_announce"), cb=self._on_announce))
        self.consumer = DurableConsumer(infra.bus, subjects.incidents("opened"), "runbook-incidents", self._on_incident)
        self.update_consumer = DurableConsumer(
            infra.bus,
            subjects.incidents("updated"),
            "runbook-incident-updates",
            self._on_incident,
            start_time=infra.clock.now(),
        )
        self.close_consumer = DurableConsumer(
            infra.bus,
            subjects.incidents("closed"),
            "runbook-incident-closes",
            self._on_incident_closed,
            start_time=infra.clock.now(),
        )
        for consumer in (self.consumer, self.update_consumer, self.close_consumer):
            self._consumer_tasks.append(asyncio.create_task(consumer.run(), name=consumer.durable))

    async def _on_incident(self, msg: Msg) -> None:
        assert self.service is not None
        event = _incident_event(msg)
        incident = incident_from_event(event) if event is not None else None
        if event is None or incident is None or not incident.get("cluster_id"):
            return
        # The executions it starts (and their driven steps) record the incident event's tracking id.
        with _tracked(event):
            # Errors other than bad input (e.g. PostgreSQL down) propagate: the message is redelivered.
            await self.service.start_for_incident(incident)

    async def _on_incident_closed(self, msg: Msg) -> None:
        assert self.service is not None
        event = _incident_event(msg)
        if event is None or event.WhichOneof("payload") != "incident_closed":
            return
        closed = event.incident_closed
        if not closed.incident.cluster_id:
            return
        # The audit entries record the tracking id of the request that closed the incident.
        with _tracked(event):
            await self.service.note_incident_closed(closed.incident.cluster_id, closed.closed_by, closed.reason)

    async def _on_runbook_event(self, msg: Msg) -> None:
        if self.service is None:
            return
        event = events_pb2.Event()
        with contextlib.suppress(DecodeError):
            event.ParseFromString(msg.data)
            if event.aggregate_id:
                self.service.notify(event.aggregate_id)

    async def _on_announce(self, msg: Msg) -> None:
        if self.service is None:
            return
        try:
            body = json.loads(msg.data)
            name = body["name"]
            info = self.service.declare_agent(
                str(name), description=str(body.get("description", "")), idempotent=bool(body.get("idempotent", False))
            )
        except (ValueError, KeyError, TypeError, RecursionError, ValidationError) as exc:
            log.warning("ignoring a malformed agent announcement: %s", exc)
            return
        if info is not None:
            log.info("agent action %s declared by announcement", info.name)

    async def stop(self) -> None:
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions.clear()
        for task in self._consumer_tasks:
            task.cancel()
        await asyncio.gather(*self._consumer_tasks, return_exceptions=True)
        self._consumer_tasks.clear()
        if self.service is not None:
            await self.service.stop()
