"""The gRPC side of security: the role of every RPC, the per-call gate, and TLS credentials.

`RPC_ROLES` maps every RPC of the three services (full method name) to the role it needs; a unit test
walks the generated descriptors and fails when one is missing. Read RPCs (Get*, List*, Watch*, Find*,
Score*, Identify*, Compute*, Forecast*, Recommend*) need viewer; ingest, closing clusters, mission
planning and running executions need operator; ApproveStep and RejectStep need approver; RegisterRunbook needs admin.
Hierarchy: admin ⊇ {operator, approver} ⊇ viewer (see `aetherops.auth`).

Health and reflection need no credential: load balancers, orchestrators and `aetherops health` probe
them without a token, and they reveal nothing beyond what the public contracts say.

`SecurityGate.check(method, metadata)` runs on every call, in the call's own task, before the handler:
authenticate -> authorize -> rate limit (key "principal|service"). It raises the domain errors
(UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with a finite retry delay) that the edge
interceptor maps through `servers.status`, and records the principal for `current_principal()` and logs.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc

from aetherops.auth import ANONYMOUS, Authenticator, Principal, Role, SecurityConfig, authorize
from aetherops.errors import ConfigError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from aetherops.ratelimit import AdaptiveLimiter, Decision, RateLimiter, TokenBucket, limit_key
from aetherops.tracking import set_principal_name

__all__ = [
    "MAX_RETRY_AFTER_S",
    "PUBLIC_METHOD_PREFIXES",
    "RPC_ROLES",
    "AsyncRateLimiter",
    "InProcessRateLimiter",
    "SecurityGate",
    "SharedRateLimiter",
    "current_principal",
    "require_principal",
    "server_credentials",
]

_CORRELATION = "/aetherops.correlation.v1.CorrelationService/"
_RUNBOOK = "/aetherops.runbook.v1.RunbookService/"
_CAPACITY = "/aetherops.capacity.v1.CapacityService/"

RPC_ROLES: dict[str, Role] = {
    _CORRELATION + "IngestAlert": Role.OPERATOR,
    _CORRELATION + "IngestAlerts": Role.OPERATOR,
    _CORRELATION + "GetCluster": Role.VIEWER,
    _CORRELATION + "ListActiveClusters": Role.VIEWER,
    _CORRELATION + "ListClusters": Role.VIEWER,
    _CORRELATION + "ListSilences": Role.VIEWER,
    _CORRELATION + "CreateSilence": Role.OPERATOR,
    _CORRELATION + "ExpireSilence": Role.OPERATOR,
    _CORRELATION + "CloseCluster": Role.OPERATOR,
    _CORRELATION + "AcknowledgeCluster": Role.OPERATOR,
    _CORRELATION + "MergeClusters": Role.OPERATOR,
    _CORRELATION + "IdentifyRootCause": Role.VIEWER,
    _CORRELATION + "ScoreAlerts": Role.VIEWER,
    _CORRELATION + "WatchClusters": Role.VIEWER,
    _CORRELATION + "ListAlerts": Role.VIEWER,
    _RUNBOOK + "ListActions": Role.VIEWER,
    _RUNBOOK + "RegisterRunbook": Role.ADMIN,
    _RUNBOOK + "GetRunbook": Role.VIEWER,
    _RUNBOOK + "ListRunbooks": Role.VIEWER,
    _RUNBOOK + "FindMatchingRunbooks": Role.VIEWER,
    _RUNBOOK + "StartExecution": Role.OPERATOR,
    _RUNBOOK + "ExecuteNextStep": Role.OPERATOR,
    _RUNBOOK + "ApproveStep": Role.APPROVER,
    _RUNBOOK + "RejectStep": Role.APPROVER,
    _RUNBOOK + "RollbackExecution": Role.OPERATOR,
    _RUNBOOK + "CancelExecution": Role.OPERATOR,
    _RUNBOOK + "GetExecutionStatus": Role.VIEWER,
    _RUNBOOK + "GetStepOutput": Role.VIEWER,
    _RUNBOOK + "WatchExecution": Role.VIEWER,
    _RUNBOOK + "ListExecutions": Role.VIEWER,
    _CAPACITY + "IngestSnapshot": Role.OPERATOR,
    _CAPACITY + "IngestSnapshots": Role.OPERATOR,
    _CAPACITY + "AddScheduledMission": Role.OPERATOR,
    _CAPACITY + "DeleteScheduledMission": Role.OPERATOR,
    _CAPACITY + "ComputeConsumptionRate": Role.VIEWER,
    _CAPACITY + "ForecastExhaustion": Role.VIEWER,
    _CAPACITY + "GetFleetRiskSummary": Role.VIEWER,
    _CAPACITY + "GetCriticalForecasts": Role.VIEWER,
    _CAPACITY + "RecommendInterventions": Role.VIEWER,
    _CAPACITY + "ListSnapshots": Role.VIEWER,
    _CAPACITY + "ListScheduledMissions": Role.VIEWER,
}
"""Full method name -> the role a caller needs. A method missing here is refused (fail closed)."""

PUBLIC_METHOD_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
"""Methods that need no credential: health checks and reflection (operators' probes and tooling)."""

MAX_RETRY_AFTER_S = 60.0
"""Cap on the RetryInfo delay; also used when a request can never fit (the limiter says math.inf)."""

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("aetherops_principal", default=None)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served (None outside a gated call)."""
    return _principal.get()


def require_principal() -> Principal:
    """The authenticated caller; UnauthenticatedError when the call did not pass the gate.

    For decisions tied to an identity (the approver of a step, four eyes), so that a servicer wired
    without the gate refuses rather than approving as nobody.
    """
    principal = _principal.get()
    if principal is None or principal is ANONYMOUS:
        raise UnauthenticatedError("this call needs an authenticated caller")
    return principal


class AsyncRateLimiter(Protocol):
    """What the gate needs of a limiter: `RedisTokenBucket`, or `InProcessRateLimiter` around a pure one."""

    async def try_acquire(self, key: str, cost: float = 1.0) -> Decision: ...

    async def close(self) -> None: ...


@runtime_checkable
class SharedRateLimiter(AsyncRateLimiter, Protocol):
    """A limiter shared across replicas (`RedisTokenBucket`) that can fall back to in-process limits."""

    @property
    def degraded(self) -> bool: ...

    async def probe(self) -> bool: ...


class InProcessRateLimiter:
    """A pure (synchronous) limiter from `aetherops.ratelimit` behind the async protocol."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner

    async def try_acquire(self, key: str, cost: float = 1.0) -> Decision:
        return self.inner.try_acquire(key, cost)

    async def close(self) -> None:
        return None


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) > 1:
        # Two credentials are ambiguous; picking one would let a proxy's header be overridden.
        raise UnauthenticatedError("more than one authorization metadata entry")
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class SecurityGate:
    """authenticate -> authorize -> rate limit, once per call, before the handler runs."""

    def __init__(
        self,
        authenticator: Authenticator,
        limiter: AsyncRateLimiter | None = None,
        roles: Mapping[str, Role] = RPC_ROLES,
        adaptive: AdaptiveLimiter | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.roles = roles
        self._adaptive = adaptive

    @classmethod
    def from_config(cls, config: SecurityConfig, *, redis_key_prefix: str = "") -> SecurityGate:
        """The gate the server uses: tokens/JWTs from the config; Redis-shared limits when a URL is set.

        Redis is imported only then, so a process without Redis never needs the client to connect.
        `redis_key_prefix` keeps the buckets of tenants (or tests) sharing one Redis apart.
        """
        authenticator = Authenticator.from_config(config)
        # The adaptive wrapper holds the tighten/relax state; in Redis mode only its factor is used.
        adaptive = AdaptiveLimiter(TokenBucket(config.rate_limit_burst, config.rate_limit_per_s))
        limiter: AsyncRateLimiter
        if config.redis_url:
            from aetherops.ratelimit_redis import RedisTokenBucket

            limiter = RedisTokenBucket.from_url(
                config.redis_url,
                config.rate_limit_burst,
                config.rate_limit_per_s,
                factor=lambda: adaptive.current_factor,
                key_prefix=redis_key_prefix,
            )
        else:
            limiter = InProcessRateLimiter(adaptive)
        return cls(authenticator, limiter, adaptive=adaptive)

    @property
    def shares_rate_limits(self) -> bool:
        """True when the limits are meant to be shared across replicas (a Redis URL is configured)."""
        return isinstance(self.limiter, SharedRateLimiter)

    @property
    def rate_limit_degraded(self) -> bool:
        """True while Redis-shared limits have fallen back to in-process ones (for health and metrics)."""
        return isinstance(self.limiter, SharedRateLimiter) and self.limiter.degraded

    async def probe_rate_limits(self) -> bool:
        """Checks the shared limits' backend now; True while they are shared (always True for in-process ones)."""
        if isinstance(self.limiter, SharedRateLimiter):
            return await self.limiter.probe()
        return True

    def observe_ingest_utilisation(self, utilisation: float) -> bool:
        """Feed the ingest queue utilisation (0..1) to the adaptive limits; True when they changed."""
        return self._adaptive.observe_utilisation(utilisation) if self._adaptive is not None else False

    async def close(self) -> None:
        """Releases the limiter's connections (Redis); the server calls it on shutdown."""
        if self.limiter is not None:
            await self.limiter.close()

    async def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """Admit one call of `method` (full name, "/pkg.Service/Rpc") or raise a domain error."""
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return ANONYMOUS
        principal = self.authenticator.authenticate(_authorization(metadata))
        # Recorded before the checks that may still refuse, so the RPC's log line names who was refused.
        _principal.set(principal)
        set_principal_name(principal.name)
        role = self.roles.get(method)
        if role is None:
            raise PermissionDeniedError(f"{method} has no role assigned; refused")
        authorize(principal, role)
        if self.limiter is not None:
            service = method.lstrip("/").partition("/")[0]
            decision = await self.limiter.try_acquire(limit_key(principal.name, service), 1.0)
            if not decision.allowed:
                raise _exhausted(principal, service, decision)
        return principal


def _exhausted(principal: Principal, service: str, decision: Decision) -> ResourceExhaustedError:
    if math.isinf(decision.retry_after_s):
        # A single call never fits (the limit is tightened below one call); retrying soon is pointless,
        # but RetryInfo needs a finite delay, so the client is told to wait the longest we ever say.
        return ResourceExhaustedError(
            f"rate limit for {principal.name} on {service} is below one call right now", MAX_RETRY_AFTER_S
        )
    delay = min(max(decision.retry_after_s, 0.0), MAX_RETRY_AFTER_S)
    return ResourceExhaustedError(
        f"rate limit exceeded for {principal.name} on {service}; retry in {delay:.3f}s", delay
    )


class TlsSettings(Protocol):
    """Anything with the three TLS paths (a `SecurityConfig`, or the server's Settings)."""

    @property
    def tls_cert_file(self) -> Path | None: ...

    @property
    def tls_key_file(self) -> Path | None: ...

    @property
    def tls_client_ca_file(self) -> Path | None: ...


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files, requiring client certificates when a client CA is set.

    None when no certificate is configured (plaintext).
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert = _read(settings.tls_cert_file, "AETHEROPS_TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "AETHEROPS_TLS_KEY_FILE")
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read(settings.tls_client_ca_file, "AETHEROPS_TLS_CLIENT_CA_FILE")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(path: Path, var: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {path} ({exc.strerror})") from None
