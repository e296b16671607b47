"""Connection settings shared by the async and sync clients.

The retry policy lives in a gRPC service config handed to the channel, not in
a Python loop: gRPC then retries transparently, with backoff, only on
UNAVAILABLE and CANCELLED and only for the methods named here (reads, and
writes that are idempotent on a key the SDK always sends), and never after a
response has started to arrive. CANCELLED from the server is load shed before
the call started (grpc-core past its pending-call limit, a proxy) or a call cut
off by a server shutting down; a cancellation of the caller's own is not
retried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT_S",
    "RETRYABLE_METHODS",
    "TRACKING_HEADER",
    "ClientConfig",
    "RetryPolicy",
    "echoed_tracking_id",
    "new_tracking_id",
    "resolve_config",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
TRACKING_HEADER = "x-tracking-id"

# Methods gRPC may retry (see RetryPolicy.retryable_status_codes). Reads are safe to repeat; IngestAlert is
# idempotent on alert_id, IngestSnapshot on (satellite, resource, timestamp), and the
# other writes on request_id, which the SDK fills with a uuid when the caller leaves it
# empty (so the retry carries the same key as the first attempt). Client streams
# (IngestAlerts, IngestSnapshots) are left out: their rejections are reported by
# position in the stream, and gRPC's retry buffer would cap large uploads anyway. So are the
# watches: a watch the server ends before its first event ("shutting down: watch again") was retried
# against a server that is gone, and the sync client's iterator then waited for ever instead of
# raising UNAVAILABLE, the caller's cue to watch again (elsewhere).
RETRYABLE_METHODS: dict[str, tuple[str, ...]] = {
    "aetherops.correlation.v1.CorrelationService": (
        "IngestAlert",
        "GetCluster",
        "ListActiveClusters",
        "ListClusters",
        "CloseCluster",
        "AcknowledgeCluster",
        "MergeClusters",
        "CreateSilence",
        "ListSilences",
        "ExpireSilence",
        "IdentifyRootCause",
        "ScoreAlerts",
        "ListAlerts",
    ),
    "aetherops.runbook.v1.RunbookService": (
        "ListActions",
        "RegisterRunbook",
        "GetRunbook",
        "ListRunbooks",
        "FindMatchingRunbooks",
        "StartExecution",
        "ExecuteNextStep",
        "ApproveStep",
        "RejectStep",
        "RollbackExecution",
        "CancelExecution",
        "GetExecutionStatus",
        "GetStepOutput",
        "ListExecutions",
    ),
    "aetherops.capacity.v1.CapacityService": (
        "IngestSnapshot",
        "AddScheduledMission",
        "DeleteScheduledMission",
        "ComputeConsumptionRate",
        "ForecastExhaustion",
        "GetFleetRiskSummary",
        "GetCriticalForecasts",
        "RecommendInterventions",
        "ListSnapshots",
        "ListScheduledMissions",
    ),
}


def echoed_tracking_id(metadata: Any) -> str:
    """The tracking id in response metadata ('' when absent)."""
    for key, value in metadata or ():
        if key == TRACKING_HEADER and isinstance(value, str):
            return value
    return ""


def new_tracking_id() -> str:
    """A fresh tracking id, of the shape the server makes (aetherops.ids): 12 hex digits of
    milliseconds since 1970, then 20 random ones. The server indexes them; ids in time order keep
    its inserts on the index's last pages."""
    return f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retryPolicy for the idempotent methods (see RETRYABLE_METHODS)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def service_config(self) -> str:
        """The JSON service config for the `grpc.service_config` channel option."""
        names = [
            {"service": service, "method": method}
            for service, methods in RETRYABLE_METHODS.items()
            for method in methods
        ]
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to connect.

    `token` is sent as `authorization: Bearer <token>` on every call. TLS is used
    when `tls` is true or any PEM below is given; without `root_certificates`
    TLS trusts the system roots. `certificate_chain` and `private_key` (both or
    neither) are the client certificate for servers that require mTLS.
    `timeout_s` is the default deadline of each call (None: no deadline); every
    method takes its own `timeout=` too.
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    max_message_bytes: int = 4 * 1024 * 1024
    extra_options: Sequence[tuple[str, Any]] = ()

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            # One without the other fails deep inside the TLS handshake with an unhelpful message.
            raise ValueError("certificate_chain and private_key go together (the client certificate for mTLS)")

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Settings from AETHEROPS_ADDRESS and AETHEROPS_TOKEN; keyword arguments that are not None win."""
        values: dict[str, Any] = {
            "address": os.environ.get("AETHEROPS_ADDRESS") or DEFAULT_ADDRESS,
            "token": os.environ.get("AETHEROPS_TOKEN") or None,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def secure(self) -> bool:
        return self.tls or any(
            pem is not None for pem in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Keep long Watch* streams alive through NATs; the server permits pings every 10 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if self.retry is not None:
            options.append(("grpc.enable_retries", 1))
            options.append(("grpc.service_config", self.retry.service_config()))
        else:
            options.append(("grpc.enable_retries", 0))
        options.extend(self.extra_options)
        return options

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def metadata(self, tracking_id: str, extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
        """Call metadata: the tracking id, the bearer token and anything the caller adds."""
        items: list[tuple[str, str]] = [(TRACKING_HEADER, tracking_id)]
        if self.token:
            items.append(("authorization", f"Bearer {self.token}"))
        items.extend(extra)
        return tuple(items)


UNSET: Any = object()


def resolve_config(
    config: ClientConfig | None,
    *,
    address: str | None,
    token: str | None,
    tls: bool,
    root_certificates: bytes | None,
    timeout: float | None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    retry: RetryPolicy | None,
) -> ClientConfig:
    """The clients' constructor arguments on top of `config` (or of the environment when it is None).

    `timeout` and `retry` use the UNSET sentinel, since None is a meaningful value for
    both (no deadline, no retries).
    """
    base = config if config is not None else ClientConfig.from_env()
    changes: dict[str, Any] = {}
    if address:
        changes["address"] = address
    if token:
        changes["token"] = token
    if tls:
        changes["tls"] = True
    if root_certificates is not None:
        changes["root_certificates"] = root_certificates
    if certificate_chain is not None or private_key is not None:
        changes["certificate_chain"] = certificate_chain
        changes["private_key"] = private_key
    if timeout is not UNSET:
        changes["timeout_s"] = timeout
    if retry is not UNSET:
        changes["retry"] = retry
    return dataclasses.replace(base, **changes)
