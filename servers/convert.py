"""Conversions shared by every servicer: timestamps, durations, structs, bulk-ingest rejections."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from aetherops.errors import FieldViolation, ValidationError
from gen.aetherops.common.v1 import common_pb2
from servers.status import first_violations

__all__ = ["from_duration", "from_struct", "from_ts", "rejection", "to_duration", "to_struct", "to_ts"]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from an aware datetime (a naive one is read as UTC), exact to the microsecond.

    Integer arithmetic on the difference from the epoch: Timestamp.FromDatetime does the same in
    pure Python at several times the cost, and every event and response carries a few of these.
    """
    if value is None:
        return None
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def from_ts(message: Any, field: str, *, path: str = "") -> datetime | None:
    """The timestamp field as an aware UTC datetime, or None when it is not set.

    A set value outside Timestamp's range (which datetime cannot hold either) is a ValidationError
    naming `path` (by default `field`).
    """
    if not message.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, field)
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999):
        raise ValidationError.single(
            path or field, "outside the range of google.protobuf.Timestamp (years 1 to 9999, nanos 0 to 999999999)"
        )
    return _EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)  # positional: a third of the cost of keywords


# google.protobuf.Duration's valid range: about +-10,000 years, nanos with the sign of seconds.
_MAX_DURATION_SECONDS = 315_576_000_000


def from_duration(message: Any, field: str, *, path: str = "") -> float | None:
    """The duration field in seconds, or None when it is not set. A set value outside Duration's
    range is a ValidationError naming `path` (by default `field`)."""
    if not message.HasField(field):
        return None
    d: duration_pb2.Duration = getattr(message, field)
    seconds, nanos = d.seconds, d.nanos
    if not (
        -_MAX_DURATION_SECONDS <= seconds <= _MAX_DURATION_SECONDS
        and -999_999_999 <= nanos <= 999_999_999
        and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
    ):
        raise ValidationError.single(
            path or field, "outside the range of google.protobuf.Duration (+-315576000000 s, nanos of the same sign)"
        )
    return seconds + nanos / 1e9


def to_duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if value:
        # Through JSON so that datetimes and other non-JSON values arrive as strings, not errors.
        s.update(json.loads(json.dumps(value, default=str)))
    return s


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(value)
    return out


def rejection(index: int, problem: ValidationError | Sequence[FieldViolation]) -> common_pb2.Rejection:
    """One rejected item of a client-streaming ingest, with its index and field problems."""
    violations = problem.violations if isinstance(problem, ValidationError) else list(problem)
    # Bounded as a status is: a reply of a thousand rejections of 64 bad labels each would outgrow
    # the 4 MiB message limit (the caller got RESOURCE_EXHAUSTED after the good items were stored).
    shown = first_violations(violations)
    if len(shown) < len(violations):
        shown = [*shown, FieldViolation(shown[-1].field, f"and {len(violations) - len(shown)} more problems")]
    violations = shown
    return common_pb2.Rejection(
        index=index,
        reason="; ".join(f"{v.field}: {v.description}" for v in violations),
        problems=[common_pb2.FieldProblem(field=v.field, description=v.description) for v in violations],
    )
