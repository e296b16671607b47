"""The one place where domain errors become gRPC statuses.

Validation errors carry a google.rpc.BadRequest with one field violation per
problem; rate limits carry a google.rpc.RetryInfo. Anything unexpected is
INTERNAL with the tracking id, never a traceback to the caller.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aetherops import errors

__all__ = ["status_for"]

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
    status = status_pb2.Status(code=code, message=str(exc))
    if isinstance(exc, errors.ValidationError):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        _attach(status, detail)
    if isinstance(exc, errors.ResourceExhaustedError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        _attach(status, error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def _attach(status: status_pb2.Status, message: error_details_pb2.BadRequest | error_details_pb2.RetryInfo) -> None:
    packed = any_pb2.Any()
    packed.Pack(message)
    status.details.append(packed)
