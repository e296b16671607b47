"""Request builders shared by the async and sync clients.

Each builder turns Python values (datetimes, dicts, names like "fuel") into the
generated request message, and fills an empty request_id with a uuid so that a
retried write carries the same idempotency key as its first attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from gen.aetherops.capacity.v1 import capacity_pb2
from gen.aetherops.correlation.v1 import correlation_pb2
from gen.aetherops.runbook.v1 import runbook_pb2

__all__ = [
    "TimeLike",
    "alert",
    "duration",
    "request_id",
    "resource_type",
    "runbook",
    "snapshot",
    "struct",
    "timestamp",
]

TimeLike = datetime | str | timestamp_pb2.Timestamp


def request_id(value: str | None) -> str:
    """The caller's idempotency key, or a fresh one."""
    return value or uuid.uuid4().hex


def timestamp(value: TimeLike | None) -> timestamp_pb2.Timestamp:
    """A Timestamp from a datetime (naive = UTC), an RFC 3339 string or a Timestamp; now when None."""
    if isinstance(value, timestamp_pb2.Timestamp):
        return value
    if value is None:
        value = datetime.now(UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def duration(value: timedelta | float) -> duration_pb2.Duration:
    """A Duration from a timedelta or seconds."""
    result = duration_pb2.Duration()
    if isinstance(value, timedelta):
        result.FromTimedelta(value)
    else:
        result.FromNanoseconds(int(value * 1e9))
    return result


def struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    if values:
        result.update(dict(values))
    return result


def _enum_number(enum: Any, prefix: str, value: int | str, what: str) -> int:
    """An enum number from its number, full name (PREFIX_NAME) or short name (name, any case)."""
    if isinstance(value, int):
        return value
    name = value.strip().upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        known = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
        raise ValueError(f"unknown {what} {value!r} (one of {known})") from None


def resource_type(value: int | str) -> capacity_pb2.ResourceType.ValueType:
    """A ResourceType number from its number, full name (RESOURCE_TYPE_FUEL) or short name (fuel)."""
    return capacity_pb2.ResourceType.ValueType(
        _enum_number(capacity_pb2.ResourceType, "RESOURCE_TYPE_", value, "resource type")
    )


def runbook_status(value: int | str) -> runbook_pb2.RunbookStatus.ValueType:
    """A RunbookStatus number from its number, full name (RUNBOOK_STATUS_RUNNING) or short name (running)."""
    return runbook_pb2.RunbookStatus.ValueType(
        _enum_number(runbook_pb2.RunbookStatus, "RUNBOOK_STATUS_", value, "status")
    )


def cluster_status(value: int | str) -> correlation_pb2.ClusterStatus.ValueType:
    """A ClusterStatus number from its number, full name (CLUSTER_STATUS_OPEN) or short name (open)."""
    return correlation_pb2.ClusterStatus.ValueType(
        _enum_number(correlation_pb2.ClusterStatus, "CLUSTER_STATUS_", value, "status")
    )


def acknowledgement(acknowledged: bool | None) -> correlation_pb2.AcknowledgementFilter.ValueType:
    """A listing's acknowledgement filter: True, only acknowledged clusters; False, only the others."""
    if acknowledged is None:
        return correlation_pb2.ACKNOWLEDGEMENT_FILTER_UNSPECIFIED
    if acknowledged:
        return correlation_pb2.ACKNOWLEDGEMENT_FILTER_ACKNOWLEDGED
    return correlation_pb2.ACKNOWLEDGEMENT_FILTER_UNACKNOWLEDGED


def cluster_view(with_alerts: bool) -> correlation_pb2.ClusterView.ValueType:
    """A listing's view: FULL with the clusters' alerts, BASIC without (cheap to poll)."""
    return correlation_pb2.CLUSTER_VIEW_FULL if with_alerts else correlation_pb2.CLUSTER_VIEW_BASIC


def list_clusters(
    *,
    status: int | str,
    satellite_id: str,
    min_severity: int,
    start: TimeLike | None,
    end: TimeLike | None,
    page_size: int,
    page_token: str,
    acknowledged: bool | None = None,
    with_alerts: bool = True,
) -> correlation_pb2.ListClustersRequest:
    request = correlation_pb2.ListClustersRequest(
        page_size=page_size,
        page_token=page_token,
        status=cluster_status(status),
        satellite_id=satellite_id,
        min_severity=min_severity,
        acknowledgement=acknowledgement(acknowledged),
        view=cluster_view(with_alerts),
    )
    if start is not None:
        request.start_time.CopyFrom(timestamp(start))
    if end is not None:
        request.end_time.CopyFrom(timestamp(end))
    return request


def silence(
    *,
    end: TimeLike,
    comment: str,
    satellite_ids: Iterable[str] = (),
    subsystems: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    start: TimeLike | None = None,
) -> correlation_pb2.Silence:
    """A silence to create: from `start` (None: when the server stores it) until `end`."""
    message = correlation_pb2.Silence(
        satellite_ids=list(satellite_ids),
        subsystems=list(subsystems),
        labels=dict(labels or {}),
        end_time=timestamp(end),
        comment=comment,
    )
    if start is not None:
        message.start_time.CopyFrom(timestamp(start))
    return message


def alert(
    *,
    alert_id: str,
    satellite_id: str,
    subsystem: str,
    severity: int,
    timestamp_: TimeLike | None = None,
    message: str = "",
    labels: Mapping[str, str] | None = None,
) -> correlation_pb2.Alert:
    return correlation_pb2.Alert(
        alert_id=alert_id,
        satellite_id=satellite_id,
        subsystem=subsystem,
        severity=severity,
        timestamp=timestamp(timestamp_),
        message=message,
        labels=dict(labels or {}),
    )


def snapshot(
    *, satellite_id: str, resource: int | str, value: float, unit: str, timestamp_: TimeLike | None = None
) -> capacity_pb2.ResourceSnapshot:
    return capacity_pb2.ResourceSnapshot(
        satellite_id=satellite_id,
        resource_type=resource_type(resource),
        timestamp=timestamp(timestamp_),
        value=value,
        unit=unit,
    )


def runbook(definition: runbook_pb2.Runbook | Mapping[str, Any]) -> runbook_pb2.Runbook:
    """A Runbook from the message or its JSON form (e.g. loaded from YAML)."""
    if isinstance(definition, runbook_pb2.Runbook):
        return definition
    return json_format.ParseDict(dict(definition), runbook_pb2.Runbook())
