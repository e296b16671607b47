"""The one place where domain errors become gRPC statuses.

Validation errors carry a google.rpc.BadRequest with one field violation per
problem; rate limits carry a google.rpc.RetryInfo. Anything unexpected is
INTERNAL with the tracking id, never a traceback to the caller.

A status travels in the trailing metadata, which a gRPC client refuses over 16 KiB (and may refuse
over 8 KiB): an alert with 64 bad labels came back RESOURCE_EXHAUSTED ("received metadata size
exceeds hard limit") instead of its problems. So the message and the violations listed are bounded
(`MESSAGE_BYTES`, `DETAIL_BYTES`); the message says how many problems were left out.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aetherops import errors
from aetherops.errors import FieldViolation

__all__ = ["DETAIL_BYTES", "MESSAGE_BYTES", "first_violations", "status_for"]

MESSAGE_BYTES = 512
"""Most UTF-8 bytes of a status message (grpc-message percent-encodes non-ASCII: up to 3x on the wire)."""
DETAIL_BYTES = 3072
"""Most bytes of field violations one status (or one bulk rejection) lists (base64 on the wire: 4/3x)."""

_CODES: list[tuple[type[errors.AetherOpsError], int]] = [
    (errors.ValidationError, code_pb2.INVALID_ARGUMENT),
    (errors.ConfigError, code_pb2.INVALID_ARGUMENT),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.ConflictError, code_pb2.ABORTED),
    (errors.FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (errors.PermissionDeniedError, code_pb2.PERMISSION_DENIED),
    (errors.UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (errors.ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, code_pb2.UNAVAILABLE),
]


def status_for(exc: errors.AetherOpsError) -> grpc.Status:
    """The gRPC status (with rich details) for a domain error."""
    code = code_pb2.INTERNAL
    for kind, mapped in _CODES:
        if isinstance(exc, kind):
            code = mapped
            break
    message, left_out = str(exc), ""
    if isinstance(exc, errors.ValidationError):
        shown = first_violations(exc.violations)
        if len(shown) < len(exc.violations):
            message = "; ".join(f"{v.field}: {v.description}" for v in shown)
            left_out = f" (and {len(exc.violations) - len(shown)} more problems not listed)"
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in shown
            ]
        )
    status = status_pb2.Status(code=code, message=_cut(message) + left_out)
    if isinstance(exc, errors.ValidationError):
        _attach(status, detail)
    if isinstance(exc, errors.ResourceExhaustedError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        _attach(status, error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def first_violations(violations: list[FieldViolation], budget: int = DETAIL_BYTES) -> list[FieldViolation]:
    """The leading `violations` that fit in `budget` bytes of field and description (at least one)."""
    used = 0
    for i, v in enumerate(violations):
        used += len(v.field.encode()) + len(v.description.encode()) + 8  # + protobuf framing
        if used > budget and i > 0:
            return violations[:i]
    return violations


def _cut(message: str) -> str:
    data = message.encode()
    if len(data) <= MESSAGE_BYTES:
        return message
    return data[:MESSAGE_BYTES].decode(errors="ignore") + "…"


def _attach(status: status_pb2.Status, message: error_details_pb2.BadRequest | error_details_pb2.RetryInfo) -> None:
    packed = any_pb2.Any()
    packed.Pack(message)
    status.details.append(packed)
