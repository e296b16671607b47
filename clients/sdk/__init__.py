"""The AetherOps Python SDK: typed async and sync clients of the three services.

    from clients.sdk import AetherOpsClient, NotFound

    async with AetherOpsClient("127.0.0.1:50051", token="...") as client:
        reply = await client.ingest_alert(alert_id="a-1", satellite_id="SAT-001", subsystem="power", severity=5)
        cluster = (await client.get_cluster(reply.cluster_id)).cluster

Both clients send a tracking id (`x-tracking-id`) and the bearer token with
every call, apply a default deadline, let gRPC retry idempotent methods on
UNAVAILABLE and CANCELLED (service config), and raise `AetherOpsError` subclasses.
"""

from clients.sdk._aio import AetherOpsClient
from clients.sdk._config import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    RETRYABLE_METHODS,
    TRACKING_HEADER,
    ClientConfig,
    RetryPolicy,
)
from clients.sdk._errors import (
    Aborted,
    AetherOpsError,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from clients.sdk._requests import alert, resource_type, snapshot
from clients.sdk._sync import SyncAetherOpsClient

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT_S",
    "RETRYABLE_METHODS",
    "TRACKING_HEADER",
    "Aborted",
    "AetherOpsClient",
    "AetherOpsError",
    "AlreadyExists",
    "Cancelled",
    "ClientConfig",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SyncAetherOpsClient",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "alert",
    "resource_type",
    "snapshot",
]
