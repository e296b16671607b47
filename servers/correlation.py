"""CorrelationService servicer: proto <-> domain for alerts and clusters, and the NATS ingest path.

Alerts arrive by RPC or on the JetStream subject aetherops.alerts.ingest
(protobuf `aetherops.correlation.v1.Alert`, or its JSON form); both go through
CorrelationService.ingest. WatchClusters follows the incident subjects on NATS,
so watchers see events from every replica and never slow ingestion down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from aetherops.bus import DurableConsumer
from aetherops.clock import Clock
from aetherops.config import Settings
from aetherops.correlation import Alert, ClusterStatus, CorrelationEngine
from aetherops.db.correlation import ClusterRecord, StoredAlert
from aetherops.errors import (
    WATCH_ENDED_BY_SHUTDOWN,
    AlreadyExistsError,
    FieldViolation,
    UnavailableError,
    ValidationError,
)
from aetherops.services.correlation import INGEST_BATCH, CorrelationService, IncidentEvent
from aetherops.services.silences import SilenceService
from aetherops.silences import Silence
from aetherops.subsystems import load_dependency_graph
from aetherops.tasks import cancel_and_wait
from aetherops.text import MAX_ID_LEN, id_problem, text_problem, utf8_len
from aetherops.tracking import current_principal_name, current_tracking_id
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.events.v1 import events_pb2
from servers.bulk import ingest_stream, listed
from servers.component import GaugeSample, Infra
from servers.convert import from_ts, rejection, to_duration, to_ts
from servers.incident_feed import IncidentFeed, Watcher, WatchItem, incident_of

__all__ = [
    "CorrelationComponent",
    "alert_from_proto",
    "alert_to_proto",
    "cluster_to_proto",
    "encode_incident_event",
    "incident_to_proto",
]

log = logging.getLogger("aetherops.correlation")

_STREAM_CHUNK = 1000
# Two ingest batches per stream: the committer prepares the next batch while it writes one only when
# a full batch is already waiting, so a lone bulk stream needs more than one batch in flight. With
# one batch's worth (four chunks), one stream of an alert storm ran at 23,000-25,000 alerts/s; with
# two, 27,000-30,000 (two runs each, alternated).
_STREAM_CHUNKS_IN_FLIGHT = 2 * INGEST_BATCH // _STREAM_CHUNK

_EVENT_TYPES = {
    "opened": pb.CLUSTER_EVENT_TYPE_OPENED,
    "updated": pb.CLUSTER_EVENT_TYPE_UPDATED,
    "closed": pb.CLUSTER_EVENT_TYPE_CLOSED,
}


# ---- mapping ---------------------------------------------------------------------------------


def alert_from_proto(message: pb.Alert, field: str = "alert", *, tracking_id: str = "") -> Alert:
    """A domain alert, checked by the core (`validate_alert`) before use. A timestamp out of range is
    a field violation here; a missing one stays None, so the core reports it with every other problem.

    `tracking_id` is the request's: set here, the alert is never copied just to carry it.
    """
    when = from_ts(message, "timestamp", path=f"{field}.timestamp")
    # Positional, in Alert's field order: keywords cost 0.37 us more per alert, a tenth of this
    # function, which runs for every alert of every stream.
    return Alert(
        message.alert_id,
        message.satellite_id,
        message.subsystem,
        message.severity,
        cast(datetime, when),
        message.message,
        message.labels,  # copied by Alert, or the shared empty mapping
        tracking_id,
    )


def alert_to_proto(alert: Alert) -> pb.Alert:
    return pb.Alert(
        alert_id=alert.alert_id,
        satellite_id=alert.satellite_id,
        subsystem=alert.subsystem,
        severity=alert.severity,
        timestamp=to_ts(alert.timestamp),
        message=alert.message,
        labels=alert.labels_dict(),
        tracking_id=alert.tracking_id,
    )


def stored_alert_to_proto(stored: StoredAlert) -> pb.StoredAlert:
    return pb.StoredAlert(
        alert=alert_to_proto(stored.alert),
        cluster_id=stored.cluster_id or "",
        duplicate_of_alert_id=stored.duplicate_of or "",
        ingest_time=to_ts(stored.ingested_time),
        silence_id=stored.silence_id or "",
    )


class AlertBudget:
    """How many encoded bytes of alerts one response may still carry (see `cluster_to_proto`)."""

    def __init__(self, max_message_bytes: int) -> None:
        # A quarter of the message: the rest is for the clusters' other fields (a storm's incident
        # lists every satellite it hit), so the response always fits.
        self.remaining = max_message_bytes // 4


def cluster_to_proto(record: ClusterRecord, budget: AlertBudget) -> pb.Cluster:
    """The cluster with its alerts, oldest first, as many as `budget` still allows (shared by every
    cluster of one response): an alert storm's incident holds tens of thousands, more than any
    message may carry. With all of them, GetCluster, ListActiveClusters and CloseCluster answered
    RESOURCE_EXHAUSTED exactly during a storm, CloseCluster after the close had committed.
    `alert_count` says how many there are; ListAlerts pages through them all."""
    cluster = _cluster_fields(record)
    for alert in record.alerts:
        message = alert_to_proto(alert)
        # The field's tag and length prefix, generously. The store reads by a lower bound of this
        # (`repo.ALERT_BYTES_FLOOR`), so it reads every alert that can fit, and few more.
        budget.remaining -= message.ByteSize() + 8
        if budget.remaining < 0:
            break
        cluster.alerts.append(message)
    return cluster


_CLUSTER_STATUS_IN = {pb.CLUSTER_STATUS_OPEN: ClusterStatus.OPEN, pb.CLUSTER_STATUS_CLOSED: ClusterStatus.CLOSED}
_ACKNOWLEDGED_IN = {
    pb.ACKNOWLEDGEMENT_FILTER_UNSPECIFIED: None,
    pb.ACKNOWLEDGEMENT_FILTER_ACKNOWLEDGED: True,
    pb.ACKNOWLEDGEMENT_FILTER_UNACKNOWLEDGED: False,
}


def _acknowledged_in(value: pb.AcknowledgementFilter.ValueType) -> bool | None:
    """A listing's acknowledgement filter as the service takes it (None: both)."""
    if value not in _ACKNOWLEDGED_IN:
        raise ValidationError.single("acknowledgement", f"unknown acknowledgement filter {value}")
    return _ACKNOWLEDGED_IN[value]


def _alert_bytes(view: pb.ClusterView.ValueType, budget: AlertBudget) -> int:
    """The alert bytes a listing's clusters may carry in that view (BASIC: none, so none are read)."""
    if view not in pb.ClusterView.values():
        raise ValidationError.single("view", f"unknown cluster view {view}")
    return 0 if view == pb.CLUSTER_VIEW_BASIC else budget.remaining


def _cluster_fields(record: ClusterRecord) -> pb.Cluster:
    ack = record.acknowledgement
    return pb.Cluster(
        cluster_id=record.cluster_id,
        status=pb.CLUSTER_STATUS_OPEN if record.status == "OPEN" else pb.CLUSTER_STATUS_CLOSED,
        root_cause_alert_id=record.root_cause_alert_id or "",
        root_cause_confidence=record.root_cause_confidence,
        satellite_ids=record.satellites,
        subsystems=record.subsystems,
        max_severity=record.max_severity,
        first_alert_time=to_ts(record.first_alert_time),
        last_alert_time=to_ts(record.last_alert_time),
        close_time=to_ts(record.closed_time),
        duration=to_duration(record.duration_seconds),
        multi_satellite=record.multi_satellite,
        alert_count=record.alert_count,
        duplicate_count=record.duplicate_count,
        tracking_id=record.tracking_id,
        close_reason=record.close_reason,
        closed_by=record.closed_by,
        acknowledge_time=to_ts(ack.time) if ack else None,
        acknowledged_by=ack.by if ack else "",
        acknowledge_note=ack.note if ack else "",
        merged_into_cluster_id=record.merged_into or "",
    )


_EVENT_SATELLITES_BYTES = 256 * 1024
_EVENT_SUBSYSTEMS_BYTES = 64 * 1024


def _first_within(names: list[str], budget: int) -> list[str]:
    """The first names whose encoding fits in `budget` bytes. A solar storm's incident spans a whole
    constellation: 8,000 satellite ids of 128 characters made every event of it larger than NATS
    takes, so none was ever published, for the incident that mattered most."""
    if 4 * sum(map(len, names)) + 3 * len(names) <= budget:
        return names  # fits even at four bytes a character: no name-by-name count on the ingest path
    size = 0
    for i, name in enumerate(names):
        size += utf8_len(name) + 3  # the field's tag and length
        if size > budget:
            return names[:i]
    return names


def incident_to_proto(record: ClusterRecord, root: Alert | None) -> events_pb2.Incident:
    """The incident as its events carry it: the stored cluster and its root-cause alert (None when it
    has none)."""
    incident = events_pb2.Incident(
        cluster_id=record.cluster_id,
        satellite_ids=_first_within(record.satellites, _EVENT_SATELLITES_BYTES),
        subsystems=_first_within(record.subsystems, _EVENT_SUBSYSTEMS_BYTES),
        satellite_count=len(record.satellites),
        subsystem_count=len(record.subsystems),
        max_severity=record.max_severity,
        root_cause_alert_id=record.root_cause_alert_id or "",
        root_cause_subsystem=root.subsystem if root else "",
        root_cause_satellite_id=root.satellite_id if root else "",
        alert_count=record.alert_count,
        first_alert_time=to_ts(record.first_alert_time),
        last_alert_time=to_ts(record.last_alert_time),
        multi_satellite=record.multi_satellite,
        root_cause_confidence=record.root_cause_confidence,
        duplicate_count=record.duplicate_count,
        tracking_id=record.tracking_id,
    )
    if (ack := record.acknowledgement) is not None:  # set only then: this runs for every event
        incident.acknowledged_by = ack.by
        incident.acknowledge_time.FromDatetime(ack.time)
        incident.acknowledge_note = ack.note
    if record.merged_into:
        incident.merged_into_cluster_id = record.merged_into
    return incident


def encode_incident_event(event: IncidentEvent, event_id: str, occurred: datetime) -> bytes:
    envelope = events_pb2.Event(
        event_id=event_id,
        type=f"incidents.{event.kind}",
        occurred_time=to_ts(occurred),
        tracking_id=event.tracking_id,
        source_service="correlation",
        aggregate_id=event.cluster.cluster_id,
    )
    incident = incident_to_proto(event.cluster, event.root_cause)
    if event.kind == "opened":
        envelope.incident_opened.incident.CopyFrom(incident)
    elif event.kind == "updated":
        envelope.incident_updated.CopyFrom(
            events_pb2.IncidentUpdated(
                incident=incident,
                added_alert_ids=event.added_alert_ids,
                root_cause_changed=event.root_cause_changed,
                merged_cluster_ids=event.merged_cluster_ids,
                escalated_from_severity=event.escalated_from,
            )
        )
    elif event.kind == "acknowledged":
        envelope.incident_acknowledged.incident.CopyFrom(incident)
        envelope.incident_acknowledged.taken_over_from = event.taken_over_from
    else:
        envelope.incident_closed.CopyFrom(
            events_pb2.IncidentClosed(incident=incident, reason=event.reason, closed_by=event.closed_by)
        )
    return bytes(envelope.SerializeToString())


def _cluster_from_event(event: events_pb2.Event, status: pb.ClusterStatus.ValueType) -> pb.Cluster:
    """The cluster as of an incident event, as GetCluster would have shown it then (without alerts)."""
    incident = incident_of(event)
    cluster = pb.Cluster(
        cluster_id=incident.cluster_id,
        status=status,
        root_cause_alert_id=incident.root_cause_alert_id,
        root_cause_confidence=incident.root_cause_confidence,
        satellite_ids=incident.satellite_ids,
        subsystems=incident.subsystems,
        max_severity=incident.max_severity,
        first_alert_time=incident.first_alert_time,
        last_alert_time=incident.last_alert_time,
        multi_satellite=incident.multi_satellite,
        alert_count=incident.alert_count,
        duplicate_count=incident.duplicate_count,
        tracking_id=incident.tracking_id,
        acknowledged_by=incident.acknowledged_by,
        acknowledge_note=incident.acknowledge_note,
        merged_into_cluster_id=incident.merged_into_cluster_id,
    )
    if incident.HasField("acknowledge_time"):
        cluster.acknowledge_time.CopyFrom(incident.acknowledge_time)
    cluster.duration.FromNanoseconds(
        incident.last_alert_time.ToNanoseconds() - incident.first_alert_time.ToNanoseconds()
    )
    if status == pb.CLUSTER_STATUS_CLOSED:
        cluster.close_time.CopyFrom(event.occurred_time)  # a close is committed at its event's time
        cluster.close_reason = event.incident_closed.reason
        cluster.closed_by = event.incident_closed.closed_by
    return cluster


def _stream_sequence(msg: Msg) -> int | str:
    """The message's sequence in its JetStream stream ("?" for a message that did not come from one)."""
    try:
        return int(msg.metadata.sequence.stream)
    except NotJSMessageError:
        return "?"


def decode_alert_message(data: bytes) -> pb.Alert:
    """An alert from NATS: protobuf binary, or protobuf JSON when it starts with '{'."""
    message = pb.Alert()
    if data.lstrip()[:1] == b"{":
        json_format.Parse(data, message, ignore_unknown_fields=True)
    else:
        message.ParseFromString(data)
    return message


# ---- servicer ----------------------------------------------------------------------------------


class CorrelationServicer(correlation_pb2_grpc.CorrelationServiceServicer):
    def __init__(self, component: CorrelationComponent) -> None:
        self._c = component

    @property
    def _svc(self) -> CorrelationService:
        assert self._c.service is not None
        return self._c.service

    @property
    def _silences(self) -> SilenceService:
        assert self._c.silences is not None
        return self._c.silences

    async def IngestAlert(self, request: pb.IngestAlertRequest, context: Any) -> pb.IngestAlertResponse:
        if not request.HasField("alert"):
            raise ValidationError.single("alert", "required")
        alert = alert_from_proto(request.alert, tracking_id=current_tracking_id())
        problem = text_problem(request.request_id, MAX_ID_LEN)
        if problem is not None:
            # Reported with the alert's own problems, so one answer lists everything to fix.
            try:
                self._svc.validate(alert)
            except ValidationError as exc:
                raise ValidationError([FieldViolation("request_id", problem), *exc.violations]) from None
            raise ValidationError.single("request_id", problem)
        outcome = await self._svc.ingest(alert)
        return pb.IngestAlertResponse(
            cluster_id=outcome.cluster_id,
            duplicate=outcome.duplicate,
            duplicate_of_alert_id=outcome.duplicate_of or "",
            cluster_opened=outcome.opened,
            replay=outcome.replay,
            silence_id=outcome.silence_id or "",
        )

    async def IngestAlerts(
        self, request_iterator: AsyncIterator[pb.IngestAlertsRequest], context: Any
    ) -> pb.IngestAlertsResponse:
        tracking_id = current_tracking_id()

        def messages_of(request: pb.IngestAlertsRequest) -> Iterable[pb.Alert]:
            # `alert` first, then the batch. A message with neither is an empty batch (a loader
            # flushing nothing): it holds no alert, so it takes no index.
            return [request.alert, *request.alerts] if request.HasField("alert") else request.alerts

        def convert(message: pb.Alert) -> Alert:
            alert = alert_from_proto(message, tracking_id=tracking_id)
            self._svc.validate(alert)
            return alert

        outcomes, rejections = await ingest_stream(
            request_iterator,
            messages_of,
            convert,
            self._svc.ingest_many,
            chunk_size=_STREAM_CHUNK,
            in_flight=_STREAM_CHUNKS_IN_FLIGHT,
        )
        accepted = duplicates = replays = silenced = 0
        for i, outcome in outcomes:
            if outcome.conflict is not None:
                problem = FieldViolation("alert.alert_id", f"already taken by another alert ({outcome.conflict})")
                rejections.append(rejection(i, [problem]))
            elif outcome.replay:
                replays += 1
            elif outcome.silence_id is not None:
                silenced += 1
            elif outcome.duplicate:
                duplicates += 1
            else:
                accepted += 1
        return pb.IngestAlertsResponse(
            accepted=accepted,
            duplicates=duplicates,
            replays=replays,
            silenced=silenced,
            rejected=len(rejections),
            rejections=listed(rejections),
        )

    async def GetCluster(self, request: pb.GetClusterRequest, context: Any) -> pb.GetClusterResponse:
        _require_id(request.cluster_id, "cluster_id")
        budget = self._c.alert_budget()
        record = await self._svc.get_cluster(request.cluster_id, alert_bytes=budget.remaining)
        return pb.GetClusterResponse(cluster=cluster_to_proto(record, budget))

    async def ListActiveClusters(
        self, request: pb.ListActiveClustersRequest, context: Any
    ) -> pb.ListActiveClustersResponse:
        budget = self._c.alert_budget()
        page, token = await self._svc.list_active(
            page_size=request.page_size,
            page_token=request.page_token,
            satellite_id=request.satellite_id,
            min_severity=request.min_severity,
            acknowledged=_acknowledged_in(request.acknowledgement),
            alert_bytes=_alert_bytes(request.view, budget),
        )
        return pb.ListActiveClustersResponse(
            clusters=[cluster_to_proto(r, budget) for r in page], next_page_token=token
        )

    async def ListClusters(self, request: pb.ListClustersRequest, context: Any) -> pb.ListClustersResponse:
        status: ClusterStatus | None = None
        if request.status:
            status = _CLUSTER_STATUS_IN.get(request.status)
            if status is None:
                raise ValidationError.single("status", f"unknown status {request.status}")
        budget = self._c.alert_budget()
        page, token = await self._svc.list_clusters(
            page_size=request.page_size,
            page_token=request.page_token,
            status=status,
            satellite_id=request.satellite_id,
            min_severity=request.min_severity,
            start=from_ts(request, "start_time"),
            end=from_ts(request, "end_time"),
            acknowledged=_acknowledged_in(request.acknowledgement),
            alert_bytes=_alert_bytes(request.view, budget),
        )
        return pb.ListClustersResponse(clusters=[cluster_to_proto(r, budget) for r in page], next_page_token=token)

    async def ListAlerts(self, request: pb.ListAlertsRequest, context: Any) -> pb.ListAlertsResponse:
        page, token = await self._svc.list_alerts(
            page_size=request.page_size,
            page_token=request.page_token,
            tracking_id=request.tracking_id,
            cluster_id=request.cluster_id,
            satellite_id=request.satellite_id,
            silence_id=request.silence_id,
        )
        return pb.ListAlertsResponse(alerts=[stored_alert_to_proto(a) for a in page], next_page_token=token)

    async def CloseCluster(self, request: pb.CloseClusterRequest, context: Any) -> pb.CloseClusterResponse:
        _require_id(request.cluster_id, "cluster_id")
        budget = self._c.alert_budget()
        record = await self._svc.close(
            request.cluster_id,
            reason=request.reason,
            closed_by=current_principal_name() or "operator",
            request_id=request.request_id,
            alert_bytes=budget.remaining,
        )
        return pb.CloseClusterResponse(cluster=cluster_to_proto(record, budget))

    async def AcknowledgeCluster(
        self, request: pb.AcknowledgeClusterRequest, context: Any
    ) -> pb.AcknowledgeClusterResponse:
        _require_id(request.cluster_id, "cluster_id")
        budget = self._c.alert_budget()
        record = await self._svc.acknowledge(
            request.cluster_id,
            note=request.note,
            by=current_principal_name() or "operator",
            request_id=request.request_id,
            alert_bytes=budget.remaining,
            take_over=request.take_over,
        )
        return pb.AcknowledgeClusterResponse(cluster=cluster_to_proto(record, budget))

    async def MergeClusters(self, request: pb.MergeClustersRequest, context: Any) -> pb.MergeClustersResponse:
        _require_id(request.cluster_id, "cluster_id")
        budget = self._c.alert_budget()
        record = await self._svc.merge(
            request.cluster_id,
            list(request.source_cluster_ids),
            note=request.note,
            by=current_principal_name() or "operator",
            request_id=request.request_id,
            alert_bytes=budget.remaining,
        )
        return pb.MergeClustersResponse(cluster=cluster_to_proto(record, budget))

    async def IdentifyRootCause(
        self, request: pb.IdentifyRootCauseRequest, context: Any
    ) -> pb.IdentifyRootCauseResponse:
        _require_id(request.cluster_id, "cluster_id")
        alert, confidence = await self._svc.root_cause(request.cluster_id)
        if alert is None:
            return pb.IdentifyRootCauseResponse()
        return pb.IdentifyRootCauseResponse(alert_id=alert.alert_id, confidence=confidence, alert=alert_to_proto(alert))

    async def ScoreAlerts(self, request: pb.ScoreAlertsRequest, context: Any) -> pb.ScoreAlertsResponse:
        problems: list[FieldViolation] = []
        alerts = []
        for name in ("first", "second"):
            if not request.HasField(name):
                problems.append(FieldViolation(name, "required"))
                continue
            try:
                alert = alert_from_proto(getattr(request, name), name)
            except ValidationError as exc:
                problems.extend(exc.violations)
                continue
            problems += self._svc.score_problems(alert, name)
            alerts.append(alert)
        if problems:
            raise ValidationError(problems)
        components, would = self._svc.score(alerts[0], alerts[1])
        return pb.ScoreAlertsResponse(
            score=components.total,
            components=pb.ScoreComponents(
                time=components.time,
                satellite=components.satellite,
                dependency=components.dependency,
                severity=components.severity,
            ),
            would_correlate=would,
        )

    async def WatchClusters(
        self, request: pb.WatchClustersRequest, context: Any
    ) -> AsyncIterator[pb.WatchClustersResponse]:
        problems = self._svc.watch_filter_problems(request.satellite_ids, request.min_severity)
        known = pb.ClusterEventType.values()
        problems += [
            FieldViolation(f"event_types[{i}]", f"unknown event type {value}")
            for i, value in enumerate(request.event_types)
            if value not in known or value == pb.CLUSTER_EVENT_TYPE_UNSPECIFIED
        ]
        if problems:
            raise ValidationError(problems)
        since = from_ts(request, "start_time")
        feed = self._c.feed
        assert feed is not None
        watcher = Watcher(frozenset(request.event_types), frozenset(request.satellite_ids), request.min_severity)
        # With a start time: the stored events from then, read to the stream's end; then the watcher
        # joins the live feed, and the events stored meanwhile are read too. Those may also arrive
        # live: each is sent once (by event id). Joining only after the long read keeps the live
        # queue from filling (and dropping) while a day of history streams out.
        replayed: set[str] = set()
        last = 0
        if since is not None:
            async for seq, item in feed.history(watcher, since=since):
                last = seq
                if item is not None:
                    yield _watch_response(item, 0)
        await feed.add(watcher)
        try:
            if since is not None:
                async for _, item in feed.history(watcher, after_seq=last):
                    if item is not None:
                        replayed.add(item[2].event_id)
                        yield _watch_response(item, 0)
            while True:
                item = await watcher.queue.get()
                if item is None:
                    raise UnavailableError(WATCH_ENDED_BY_SHUTDOWN)
                if replayed and item[2].event_id in replayed:
                    continue
                missed, watcher.dropped = watcher.dropped, 0
                yield _watch_response(item, missed)
        finally:
            await feed.remove(watcher)

    async def CreateSilence(self, request: pb.CreateSilenceRequest, context: Any) -> pb.CreateSilenceResponse:
        if not request.HasField("silence"):
            raise ValidationError.single("silence", "required")
        given = request.silence
        silence = await self._silences.create(
            satellite_ids=given.satellite_ids,
            subsystems=given.subsystems,
            labels=dict(given.labels),
            start=from_ts(given, "start_time", path="silence.start_time"),
            end=from_ts(given, "end_time", path="silence.end_time"),
            comment=given.comment,
            request_id=request.request_id,
            by=current_principal_name(),
        )
        return pb.CreateSilenceResponse(silence=silence_to_proto(silence))

    async def ListSilences(self, request: pb.ListSilencesRequest, context: Any) -> pb.ListSilencesResponse:
        page, token = await self._silences.list_page(
            page_size=request.page_size,
            page_token=request.page_token,
            include_ended=request.include_ended,
            satellite_id=request.satellite_id,
        )
        return pb.ListSilencesResponse(silences=[silence_to_proto(s) for s in page], next_page_token=token)

    async def ExpireSilence(self, request: pb.ExpireSilenceRequest, context: Any) -> pb.ExpireSilenceResponse:
        silence = await self._silences.expire(
            request.silence_id, request_id=request.request_id, by=current_principal_name()
        )
        return pb.ExpireSilenceResponse(silence=silence_to_proto(silence))


def _watch_response(item: WatchItem, dropped: int) -> pb.WatchClustersResponse:
    event_type, status, event = item
    return pb.WatchClustersResponse(
        event_type=event_type,
        cluster=_cluster_from_event(event, status),
        event_time=event.occurred_time,
        dropped_events=dropped,
        escalated_from_severity=event.incident_updated.escalated_from_severity,
        taken_over_from=event.incident_acknowledged.taken_over_from,
    )


def silence_to_proto(s: Silence) -> pb.Silence:
    return pb.Silence(
        silence_id=s.silence_id,
        satellite_ids=sorted(s.satellite_ids),
        subsystems=sorted(s.subsystems),
        labels=dict(s.labels),
        start_time=to_ts(s.start_time),
        end_time=to_ts(s.end_time),
        comment=s.comment,
        created_by=s.created_by,
        create_time=to_ts(s.create_time),
        expired_by=s.expired_by,
        expire_time=to_ts(s.expire_time),
    )


def _require_id(value: str, field: str) -> None:
    # Checked before any lookup: an id longer than any stored one would otherwise come back in the
    # NOT_FOUND message, and a status message past the client's metadata limit breaks the call.
    problem = id_problem(value)
    if problem is not None:
        raise ValidationError.single(field, problem)


# ---- component ---------------------------------------------------------------------------------


class CorrelationComponent:
    name = "correlation"
    service_name = "aetherops.correlation.v1.CorrelationService"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.servicer = CorrelationServicer(self)
        self.service: CorrelationService | None = None
        self.silences: SilenceService | None = None
        self.infra: Infra | None = None
        self.feed: IncidentFeed | None = None
        self._consumer_task: asyncio.Task[None] | None = None

    def alert_budget(self) -> AlertBudget:
        """The alerts one response may carry (see `cluster_to_proto`)."""
        return AlertBudget(self._settings.max_message_bytes)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        correlation_pb2_grpc.add_CorrelationServiceServicer_to_server(self.servicer, server)

    def _engine(self, clock: Clock) -> CorrelationEngine:
        s = self._settings
        graph = load_dependency_graph(Path(s.dependency_graph_file)) if s.dependency_graph_file else None
        return CorrelationEngine(
            time_window_s=s.correlation_window_s,
            dedupe_window_s=s.dedupe_window_s,
            dependency_graph=graph,
            clock=clock,
            # CorrelationService answers replayed alert ids from PostgreSQL before the engine sees them.
            remember_alert_ids=False,
        )

    async def start(self, infra: Infra) -> None:
        self.infra = infra
        self.feed = IncidentFeed(infra.bus)
        engine = self._engine(infra.clock)
        silences = SilenceService(infra.db, infra.clock, engine.dependency_graph.canonical)
        await silences.start()
        self.silences = silences
        service = CorrelationService(
            infra.db,
            infra.relay,
            infra.bus.subjects,
            engine,
            encode_incident_event,
            infra.clock,
            max_future_skew_s=self._settings.max_future_skew_s,
            max_queue_bytes=self._settings.ingest_queue_bytes,
            resolve_after_s=self._settings.incident_resolve_after_s,
            silenced=silences.match,
        )
        await service.start()
        self.service = service
        consumer = DurableConsumer(
            infra.bus, infra.bus.subjects.alerts_ingest, "correlation-alerts", self._on_alert, concurrent=True
        )
        self._consumer_task = asyncio.create_task(consumer.run(), name="correlation-alerts")

    @property
    def ingest_utilisation(self) -> float:
        return self.service.queue_utilisation if self.service is not None else 0.0

    def gauges(self) -> list[GaugeSample]:
        if self.service is None:
            return []
        return [
            (
                "aetherops_active_clusters",
                "Open clusters whose last alert is within the correlation window (what ListActiveClusters lists)",
                {},
                float(self.service.engine.active_count()),
            ),
            (
                "aetherops_ingest_queue_utilisation",
                "Ingest queue fill, 0..1",
                {"service": "correlation"},
                self.ingest_utilisation,
            ),
        ]

    async def _on_alert(self, msg: Msg) -> None:
        assert self.service is not None
        alert_id = ""
        try:
            message = decode_alert_message(msg.data)
            alert_id = message.alert_id
            await self.service.ingest(alert_from_proto(message))
        except (ValidationError, AlreadyExistsError, json_format.ParseError, DecodeError, ValueError) as exc:
            # A malformed alert will never become valid, nor will a taken id become free: log it
            # and let it be acknowledged. The stream sequence finds the message (`nats stream get`)
            # and the alert id its sender, when the message got that far.
            log.warning(
                "rejected alert %r from NATS (stream sequence %s): %s", alert_id[:80], _stream_sequence(msg), exc
            )

    def end_streams(self) -> None:
        if self.feed is not None:
            self.feed.end_streams()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        if self._consumer_task is not None:
            await cancel_and_wait(self._consumer_task)
        if self.service is not None:
            await self.service.stop()
        if self.silences is not None:
            await self.silences.stop()
