"""CapacityService servicer: proto <-> domain for snapshots, missions and forecasts, the event and
alert encoders, the NATS telemetry ingest path and the component.

Business rules live in `aetherops.services.capacity.CapacityService` and the core planner; this
module only maps messages, reports mapping problems (unset enums, missing timestamps) together
with the service's own violations, and encodes what the service hands it.

NATS telemetry
--------------
Subject ``aetherops.telemetry.<satellite_id>.<resource>`` (namespace-prefixed when one is set),
where ``<resource>`` is ``fuel``, ``power``, ``storage`` or ``bandwidth`` (case-insensitive;
``RESOURCE_TYPE_FUEL`` or the enum number also work). The payload is either

* JSON: ``{"timestamp": "2026-03-01T12:00:00Z", "value": 41.5, "unit": "kg"}`` — timestamp
  RFC 3339 with an offset, value a finite number >= 0, unit as for IngestSnapshot; or
* a binary ``aetherops.capacity.v1.ResourceSnapshot``; its satellite_id / resource_type may be
  left empty (the subject says), and when set they must match the subject.

The durable consumer ``capacity-telemetry`` feeds each point to the service's streaming reduction
(one stored snapshot per series per 60 s bucket: the bucket's last reading, see the service module).
Invalid points are logged, counted and acknowledged: they will never become valid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from aetherops.bus import DurableConsumer
from aetherops.capacity import (
    CapacityPlanner,
    ConsumptionRate,
    ExhaustionForecast,
    MissionScheduleEntry,
    ResourceSnapshot,
    ResourceType,
    RiskChange,
    RiskLevel,
    validate_mission,
)
from aetherops.capacity_config import load_capacity_config
from aetherops.config import Settings
from aetherops.errors import FieldViolation, ValidationError
from aetherops.services.capacity import CapacityAlert, CapacityService
from aetherops.tasks import cancel_and_wait
from gen.aetherops.capacity.v1 import capacity_pb2 as pb
from gen.aetherops.capacity.v1 import capacity_pb2_grpc
from gen.aetherops.correlation.v1 import correlation_pb2
from gen.aetherops.events.v1 import events_pb2
from servers.bulk import ingest_stream, listed
from servers.component import GaugeSample, Infra
from servers.convert import from_duration, from_ts, rejection, to_ts

__all__ = [
    "CapacityComponent",
    "decode_telemetry",
    "encode_alert",
    "encode_risk_event",
    "forecast_to_proto",
    "mission_from_proto",
    "mission_to_proto",
    "resource_from_proto",
    "snapshot_from_proto",
    "snapshot_to_proto",
]

log = logging.getLogger("aetherops.capacity")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CRITICAL_FIRST = (RiskLevel.CRITICAL, RiskLevel.WARNING, RiskLevel.WATCH, RiskLevel.NOMINAL)
_CHUNK = 1000
_IMPACT_FIELD = re.compile(r"mission\.resource_impacts\[(\d+)\](.*)")
# Two ingest batches' worth per stream (the committer's batches hold up to 2,000), as for alerts: a
# lone bulk stream keeps the committer busy, and a faster sender waits on flow control.
_CHUNKS_IN_FLIGHT = 4


def _one(request: pb.IngestSnapshotsRequest) -> tuple[pb.IngestSnapshotsRequest]:
    return (request,)  # one snapshot per stream message


# ---- mapping ------------------------------------------------------------------------------------


def _res(resource: ResourceType) -> pb.ResourceType.ValueType:
    # The core's enums carry the proto numbers (see aetherops.capacity).
    return cast("pb.ResourceType.ValueType", int(resource))


def _risk(level: RiskLevel) -> pb.RiskLevel.ValueType:
    return cast("pb.RiskLevel.ValueType", int(level))


def resource_from_proto(value: int) -> ResourceType | None:
    """The domain resource type, None for RESOURCE_TYPE_UNSPECIFIED or an unknown number."""
    try:
        return ResourceType(value) if value else None
    except ValueError:
        return None


def _resource_field(value: int, field: str) -> ResourceType:
    resource = resource_from_proto(value)
    if resource is None:
        raise ValidationError.single(field, "unspecified or unknown resource type")
    return resource


def snapshot_from_proto(message: pb.ResourceSnapshot, service: CapacityService) -> ResourceSnapshot:
    """A checked domain snapshot; raises ValidationError with every problem found."""
    problems: list[FieldViolation] = []
    resource = resource_from_proto(message.resource_type)
    if resource is None:
        problems.append(FieldViolation("snapshot.resource_type", "unspecified or unknown resource type"))
    when = from_ts(message, "timestamp", path="snapshot.timestamp")
    if when is None:
        problems.append(FieldViolation("snapshot.timestamp", "required"))
    snapshot = ResourceSnapshot(
        satellite_id=message.satellite_id,
        # The core reports an unknown resource type itself when handed the raw number.
        resource_type=resource if resource is not None else cast(ResourceType, message.resource_type),
        timestamp=when if when is not None else _EPOCH,
        value=message.value,
        unit=message.unit,
    )
    reported = {p.field for p in problems}
    problems.extend(v for v in service.check(snapshot) if v.field not in reported)
    if problems:
        raise ValidationError(problems)
    return snapshot


def snapshot_to_proto(snapshot: ResourceSnapshot) -> pb.ResourceSnapshot:
    return pb.ResourceSnapshot(
        satellite_id=snapshot.satellite_id,
        resource_type=_res(snapshot.resource_type),
        timestamp=to_ts(snapshot.timestamp),
        value=snapshot.value,
        unit=snapshot.unit,
    )


def mission_from_proto(message: pb.ScheduledMission) -> MissionScheduleEntry:
    """A domain mission; raises ValidationError with every problem (mapping and core rules) at once."""
    problems: list[FieldViolation] = []
    start = from_ts(message, "start_time", path="mission.start_time")
    end = from_ts(message, "end_time", path="mission.end_time")
    for name, value in (("start_time", start), ("end_time", end)):
        if value is None:
            problems.append(FieldViolation(f"mission.{name}", "required"))
    impacts: dict[ResourceType, float] = {}
    positions: list[int] = []  # the message's index of each entry of `impacts`, in order
    for i, impact in enumerate(message.resource_impacts):
        resource = resource_from_proto(impact.resource_type)
        if resource is None:
            problems.append(
                FieldViolation(f"mission.resource_impacts[{i}].resource_type", "unspecified or unknown resource type")
            )
        elif resource in impacts:
            problems.append(FieldViolation(f"mission.resource_impacts[{i}].resource_type", "listed twice"))
        else:
            impacts[resource] = impact.amount
            positions.append(i)
    entry = MissionScheduleEntry(
        mission_id=message.mission_id,
        satellite_id=message.satellite_id,
        start_time=start if start is not None else _EPOCH,
        end_time=end if end is not None else _EPOCH,
        resource_impacts=impacts,
        description=message.description,
    )
    reported = {p.field for p in problems}
    for v in validate_mission(entry):
        if v.field in reported or (v.field == "mission.end_time" and (start is None or end is None)):
            continue
        core = _IMPACT_FIELD.fullmatch(v.field)
        if core is not None:
            # The core numbers the entries it was given, which skip refused ones: name the caller's.
            v = FieldViolation(f"mission.resource_impacts[{positions[int(core[1])]}]{core[2]}", v.description)
        problems.append(v)
    if problems:
        raise ValidationError(problems)
    return entry


def mission_to_proto(entry: MissionScheduleEntry) -> pb.ScheduledMission:
    return pb.ScheduledMission(
        mission_id=entry.mission_id,
        satellite_id=entry.satellite_id,
        start_time=to_ts(entry.start_time),
        end_time=to_ts(entry.end_time),
        resource_impacts=[
            pb.ResourceImpact(resource_type=_res(r), amount=a) for r, a in sorted(entry.resource_impacts.items())
        ],
        description=entry.description,
    )


def forecast_to_proto(f: ExhaustionForecast) -> pb.ExhaustionForecast:
    message = pb.ExhaustionForecast(
        satellite_id=f.satellite_id,
        resource_type=_res(f.resource_type),
        current_value=f.current_value,
        unit=f.unit,
        predicted_exhaustion_time=to_ts(f.predicted_exhaustion_date),
        risk_level=_risk(f.risk_level),
        confidence=f.confidence,
        recommended_action=f.recommended_action,
        rate_per_day=f.rate_per_day,
        scheduled_impact=f.scheduled_impact,
    )
    # Optional fields stay unset for "not within the horizon" instead of carrying a fake number.
    for name in ("days_remaining", "days_remaining_p10", "days_remaining_p50", "days_remaining_p90"):
        value = getattr(f, name)
        if value is not None:
            setattr(message, name, value)
    return message


def _rate_to_proto(rate: ConsumptionRate) -> pb.ConsumptionRate:
    return pb.ConsumptionRate(
        satellite_id=rate.satellite_id,
        resource_type=_res(rate.resource_type),
        rate_per_day=rate.rate_per_day,
        confidence=rate.confidence,
        sample_period_days=rate.sample_period_days,
        sample_count=rate.sample_count,
    )


def encode_risk_event(
    change: RiskChange, event_id: str, event_type: str, occurred: datetime, tracking_id: str
) -> bytes:
    """The events.v1.Event envelope of a risk change. A first-seen series reports NOMINAL as its
    previous level: the service stores no row for a series that was never at risk."""
    f = change.forecast
    risk = events_pb2.RiskChanged(
        satellite_id=change.satellite_id,
        resource_type=_res(change.resource_type),
        previous_risk_level=_risk(change.previous_risk_level or RiskLevel.NOMINAL),
        risk_level=_risk(change.risk_level),
        predicted_exhaustion_time=to_ts(f.predicted_exhaustion_date),
    )
    if f.days_remaining is not None:
        risk.days_remaining = f.days_remaining
    envelope = events_pb2.Event(
        event_id=event_id,
        type=event_type,
        occurred_time=to_ts(occurred),
        tracking_id=tracking_id,
        source_service="capacity",
        aggregate_id=f"{change.satellite_id}/{change.resource_type.name.lower()}",
        risk_changed=risk,
    )
    return bytes(envelope.SerializeToString())


def encode_alert(alert: CapacityAlert) -> bytes:
    """The aetherops.correlation.v1.Alert the Correlation service ingests from NATS."""
    message = correlation_pb2.Alert(
        alert_id=alert.alert_id,
        satellite_id=alert.satellite_id,
        subsystem=alert.subsystem,
        severity=alert.severity,
        timestamp=to_ts(alert.timestamp),
        message=alert.message,
        labels=alert.labels,
    )
    return bytes(message.SerializeToString())


def _telemetry_resource(token: str) -> ResourceType | None:
    name = token.strip().upper().removeprefix("RESOURCE_TYPE_")
    if name.isdigit():
        return resource_from_proto(int(name))
    return ResourceType.__members__.get(name)


def decode_telemetry(subject_tail: str, data: bytes) -> tuple[str, ResourceType, datetime, float, str]:
    """(satellite_id, resource, timestamp, value, unit) of one telemetry message; `subject_tail` is
    ``<satellite_id>.<resource>``. Raises ValidationError naming every problem."""
    parts = subject_tail.split(".")
    if len(parts) != 2 or not parts[0]:
        raise ValidationError.single("subject", "expected aetherops.telemetry.<satellite_id>.<resource>")
    satellite_id, token = parts
    resource = _telemetry_resource(token)
    problems: list[FieldViolation] = []
    if resource is None:
        problems.append(FieldViolation("subject", f"unknown resource {token!r}"))
    when: datetime | None = None
    value = math.nan
    unit = ""
    if data.lstrip()[:1] == b"{":
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise ValidationError.single("payload", f"not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValidationError.single("payload", "expected a JSON object")
        raw_time = body.get("timestamp")
        try:
            when = datetime.fromisoformat(raw_time) if isinstance(raw_time, str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            problems.append(FieldViolation("timestamp", "required: RFC 3339 with an offset"))
            when = None
        raw_value = body.get("value")
        if isinstance(raw_value, int | float) and not isinstance(raw_value, bool):
            try:
                value = float(raw_value)
            except OverflowError:  # a JSON integer beyond any float
                problems.append(FieldViolation("value", "must be finite"))
        else:
            problems.append(FieldViolation("value", "required: a number"))
        raw_unit = body.get("unit")
        unit = raw_unit if isinstance(raw_unit, str) else ""
    else:
        message = pb.ResourceSnapshot()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise ValidationError.single("payload", f"neither JSON nor a ResourceSnapshot: {exc}") from None
        if message.satellite_id and message.satellite_id != satellite_id:
            problems.append(FieldViolation("satellite_id", "differs from the subject"))
        if message.resource_type and resource is not None and message.resource_type != int(resource):
            problems.append(FieldViolation("resource_type", "differs from the subject"))
        when = from_ts(message, "timestamp")
        if when is None:
            problems.append(FieldViolation("timestamp", "required"))
        value, unit = message.value, message.unit
    if problems:
        raise ValidationError(problems)
    assert resource is not None and when is not None
    return satellite_id, resource, when, value, unit


# ---- servicer -----------------------------------------------------------------------------------


class CapacityServicer(capacity_pb2_grpc.CapacityServiceServicer):
    def __init__(self, component: CapacityComponent) -> None:
        self._c = component

    @property
    def _svc(self) -> CapacityService:
        assert self._c.service is not None
        return self._c.service

    async def IngestSnapshot(self, request: pb.IngestSnapshotRequest, context: Any) -> pb.IngestSnapshotResponse:
        if not request.HasField("snapshot"):
            raise ValidationError.single("snapshot", "required")
        snapshot = snapshot_from_proto(request.snapshot, self._svc)
        duplicate = await self._svc.ingest(snapshot, request.request_id)
        return pb.IngestSnapshotResponse(duplicate=duplicate)

    async def IngestSnapshots(
        self, request_iterator: AsyncIterator[pb.IngestSnapshotsRequest], context: Any
    ) -> pb.IngestSnapshotsResponse:
        def convert(request: pb.IngestSnapshotsRequest) -> ResourceSnapshot:
            if not request.HasField("snapshot"):
                raise ValidationError.single("snapshot", "required")
            return snapshot_from_proto(request.snapshot, self._svc)

        outcomes, rejections = await ingest_stream(
            request_iterator, _one, convert, self._svc.ingest_many, chunk_size=_CHUNK, in_flight=_CHUNKS_IN_FLIGHT
        )
        accepted = duplicates = 0
        for i, outcome in outcomes:
            if outcome.violations:
                rejections.append(rejection(i, outcome.violations))
            elif outcome.duplicate:
                duplicates += 1
            else:
                accepted += 1
        return pb.IngestSnapshotsResponse(
            accepted=accepted, duplicates=duplicates, rejected=len(rejections), rejections=listed(rejections)
        )

    async def AddScheduledMission(
        self, request: pb.AddScheduledMissionRequest, context: Any
    ) -> pb.AddScheduledMissionResponse:
        if not request.HasField("mission"):
            raise ValidationError.single("mission", "required")
        stored = await self._svc.add_mission(mission_from_proto(request.mission), request.request_id)
        return pb.AddScheduledMissionResponse(mission=mission_to_proto(stored))

    async def DeleteScheduledMission(
        self, request: pb.DeleteScheduledMissionRequest, context: Any
    ) -> pb.DeleteScheduledMissionResponse:
        deleted = await self._svc.delete_mission(request.mission_id, request.request_id)
        return pb.DeleteScheduledMissionResponse(mission=mission_to_proto(deleted))

    async def ComputeConsumptionRate(
        self, request: pb.ComputeConsumptionRateRequest, context: Any
    ) -> pb.ComputeConsumptionRateResponse:
        resource = _checked_query(request.satellite_id, request.resource_type)
        result = self._svc.consumption_rate(request.satellite_id, resource)
        if result.rate is None:
            return pb.ComputeConsumptionRateResponse(reason=result.reason)
        return pb.ComputeConsumptionRateResponse(rate=_rate_to_proto(result.rate))

    async def ForecastExhaustion(
        self, request: pb.ForecastExhaustionRequest, context: Any
    ) -> pb.ForecastExhaustionResponse:
        resource = _checked_query(request.satellite_id, request.resource_type)
        result = self._svc.forecast(request.satellite_id, resource)
        if result.forecast is None:
            return pb.ForecastExhaustionResponse(reason=result.reason)
        return pb.ForecastExhaustionResponse(forecast=forecast_to_proto(result.forecast))

    async def GetFleetRiskSummary(
        self, request: pb.GetFleetRiskSummaryRequest, context: Any
    ) -> pb.GetFleetRiskSummaryResponse:
        summary, unforecast = self._svc.fleet_summary()
        return pb.GetFleetRiskSummaryResponse(
            groups=[pb.RiskGroup(risk_level=_risk(level), satellite_ids=summary[level]) for level in _CRITICAL_FIRST],
            satellite_count=sum(len(ids) for ids in summary.values()),
            compute_time=to_ts(self._c.now()),
            unforecast_satellite_ids=unforecast,
        )

    async def GetCriticalForecasts(
        self, request: pb.GetCriticalForecastsRequest, context: Any
    ) -> pb.GetCriticalForecastsResponse:
        horizon_s = from_duration(request, "horizon")
        horizon = horizon_s / 86400.0 if horizon_s is not None else None
        forecasts, token = self._svc.critical_forecasts(
            horizon_days=horizon, page_size=request.page_size, page_token=request.page_token
        )
        return pb.GetCriticalForecastsResponse(
            forecasts=[forecast_to_proto(f) for f in forecasts], next_page_token=token
        )

    async def RecommendInterventions(
        self, request: pb.RecommendInterventionsRequest, context: Any
    ) -> pb.RecommendInterventionsResponse:
        found = self._svc.interventions(request.satellite_id)
        return pb.RecommendInterventionsResponse(
            interventions=[
                pb.Intervention(
                    resource_type=_res(d["resource_type"]),
                    action=d["action"],
                    description=d["description"],
                    days_gained=d["days_gained"],
                    mission_ids=d["mission_ids"],
                )
                for d in found
            ]
        )

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Any) -> pb.ListSnapshotsResponse:
        resource = _checked_query(request.satellite_id, request.resource_type)
        snapshots, token = await self._svc.list_snapshots(
            request.satellite_id,
            resource,
            start=from_ts(request, "start_time"),
            end=from_ts(request, "end_time"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSnapshotsResponse(snapshots=[snapshot_to_proto(s) for s in snapshots], next_page_token=token)

    async def ListScheduledMissions(
        self, request: pb.ListScheduledMissionsRequest, context: Any
    ) -> pb.ListScheduledMissionsResponse:
        # Unspecified means any resource; a number outside the enum is a mistake, not "any".
        resource = None
        if request.resource_type != pb.RESOURCE_TYPE_UNSPECIFIED:
            resource = _resource_field(request.resource_type, "resource_type")
        missions, token = await self._svc.list_missions(
            request.satellite_id,
            resource,
            start=from_ts(request, "start_time"),
            end=from_ts(request, "end_time"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListScheduledMissionsResponse(missions=[mission_to_proto(m) for m in missions], next_page_token=token)


def _checked_query(satellite_id: str, resource_type: int) -> ResourceType:
    """The request's resource type; every problem with the two query fields reported at once."""
    problems: list[FieldViolation] = []
    if not satellite_id.strip():
        problems.append(FieldViolation("satellite_id", "must not be empty"))
    resource = resource_from_proto(resource_type)
    if resource is None:
        problems.append(FieldViolation("resource_type", "unspecified or unknown resource type"))
    if problems:
        raise ValidationError(problems)
    assert resource is not None
    return resource


# ---- component ----------------------------------------------------------------------------------


class CapacityComponent:
    """The Capacity service in a server process: servicer, application service and telemetry consumer.

    `planner_options` go to `CapacityPlanner` (e.g. ``default_storage_capacity``, ``bandwidth_period_days``).
    """

    name = "capacity"
    service_name = "aetherops.capacity.v1.CapacityService"

    def __init__(self, settings: Settings, **planner_options: Any) -> None:
        self._settings = settings
        # Read when the server is built, so a bad file stops `aetherops serve` at once (exit 2).
        configured = load_capacity_config(settings.capacity_config_file) if settings.capacity_config_file else {}
        self._planner_options = {**configured, **planner_options}
        self.servicer = CapacityServicer(self)
        self.service: CapacityService | None = None
        self.infra: Infra | None = None
        self._consumer_task: asyncio.Task[None] | None = None
        self._telemetry_prefix = ""

    def now(self) -> datetime:
        """The server's clock (the injected one once started)."""
        return self.infra.clock.now() if self.infra is not None else datetime.now(UTC)

    def end_streams(self) -> None:
        """Capacity has no watch streams."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        capacity_pb2_grpc.add_CapacityServiceServicer_to_server(self.servicer, server)

    @property
    def ingest_utilisation(self) -> float:
        return self.service.queue_utilisation if self.service is not None else 0.0

    def gauges(self) -> list[GaugeSample]:
        if self.service is None:
            return []
        samples: list[GaugeSample] = [
            (
                "aetherops_ingest_queue_utilisation",
                "Ingest queue fill, 0..1",
                {"service": "capacity"},
                self.ingest_utilisation,
            ),
        ]
        for level, count in self.service.risk_counts().items():
            samples.append(
                ("aetherops_fleet_risk_satellites", "Satellites per risk level", {"level": level.name}, float(count))
            )
        return samples

    async def start(self, infra: Infra) -> None:
        self.infra = infra
        planner = CapacityPlanner(
            infra.clock, max_future_skew_s=self._settings.max_future_skew_s, **self._planner_options
        )
        service = CapacityService(
            infra.db,
            infra.relay,
            infra.bus.subjects,
            planner,
            encode_risk_event,
            encode_alert,
            infra.clock,
            max_future_skew_s=self._settings.max_future_skew_s,
        )
        await service.start()
        self.service = service
        self._telemetry_prefix = infra.bus.subjects.subject("telemetry") + "."
        consumer = DurableConsumer(infra.bus, infra.bus.subjects.telemetry(), "capacity-telemetry", self._on_telemetry)
        self._consumer_task = asyncio.create_task(consumer.run(), name="capacity-telemetry")

    async def _on_telemetry(self, msg: Msg) -> None:
        assert self.service is not None
        try:
            sat, resource, when, value, unit = decode_telemetry(
                msg.subject.removeprefix(self._telemetry_prefix), msg.data
            )
            self.service.add_telemetry(sat, resource, when, value, unit)
        except ValidationError as exc:
            # A malformed point will never become valid: log it and let it be acknowledged.
            log.warning("rejected telemetry on %s: %s", msg.subject, exc)

    async def stop(self) -> None:
        if self._consumer_task is not None:
            await cancel_and_wait(self._consumer_task)
        if self.service is not None:
            await self.service.stop()
