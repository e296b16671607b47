"""The SDK's one exception hierarchy, mapped from gRPC statuses at the edge.

Every failed call raises an `AetherOpsError` subclass chosen by status code,
never a bare grpc.RpcError. Rich details the server attaches (google.rpc.Status
in the `grpc-status-details-bin` trailer) are decoded here: field violations of
a google.rpc.BadRequest, the delay of a google.rpc.RetryInfo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.sdk._config import echoed_tracking_id

__all__ = [
    "Aborted",
    "AetherOpsError",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "method_name",
]


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class AetherOpsError(Exception):
    """A call failed. `code` is the gRPC status code, `tracking_id` the id to quote in a report."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        tracking_id: str = "",
        method: str = "",
        field_violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.tracking_id = tracking_id
        self.method = method
        self.field_violations: list[FieldViolation] = list(field_violations)
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.tracking_id:
            text += f" (tracking id {self.tracking_id})"
        return text


class Cancelled(AetherOpsError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(AetherOpsError):
    """The request was malformed; `field_violations` lists every problem the server found."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(AetherOpsError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(AetherOpsError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AetherOpsError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AetherOpsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AetherOpsError):
    """Rate limited; `retry_after` (seconds) comes from google.rpc.RetryInfo when the server sent one."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AetherOpsError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(AetherOpsError):
    code = grpc.StatusCode.ABORTED


class Unimplemented(AetherOpsError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(AetherOpsError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(AetherOpsError):
    """The server could not be reached (after the retry policy's attempts, for idempotent methods)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(AetherOpsError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[AetherOpsError]] = {
    kind.code: kind
    for kind in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


def _details(call: Any) -> tuple[list[FieldViolation], float | None]:
    """Field violations and retry delay from the rich status, when there is one."""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError, TypeError):
        # A status whose rich details contradict its code, or a call object without
        # trailers (e.g. a local failure): report the plain status rather than hide it.
        return [], None
    if status is None:
        return [], None
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToNanoseconds() / 1e9
    return violations, retry_after


def from_rpc_error(error: grpc.RpcError, *, tracking_id: str = "", method: str = "") -> AetherOpsError:
    """The typed exception for a failed call (sync grpc.RpcError/grpc.Call or grpc.aio.AioRpcError).

    The tracking id is the one the server echoed in its trailing metadata, else
    the one the SDK sent (`tracking_id`).
    """
    call: Any = error
    code = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
    message = call.details() if callable(getattr(call, "details", None)) else str(error)
    echoed = ""
    if callable(getattr(call, "trailing_metadata", None)):
        try:
            echoed = echoed_tracking_id(call.trailing_metadata())
        except Exception:
            echoed = ""  # some call objects cannot report metadata once failed locally
    violations, retry_after = _details(call)
    kind = _BY_CODE.get(code, AetherOpsError)
    return kind(
        message or code.name,
        code=code,
        tracking_id=echoed or tracking_id,
        method=method,
        field_violations=violations,
        retry_after=retry_after,
    )


def method_name(method: Any) -> str:
    """The RPC path of a multi-callable, for error messages (best effort)."""
    for attribute in ("_method", "method"):
        value = getattr(method, attribute, None)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, str):
            return value
    return ""
