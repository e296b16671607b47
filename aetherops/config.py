"""Settings for `aetherops serve`: one dataclass, read from flags and AETHEROPS_* variables.

Invalid values stop start-up with a ConfigError that names the setting. The
README's configuration table lists the same settings; a test keeps the two and
docker-compose.yml in step.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from aetherops.auth import SecurityConfig
from aetherops.errors import ConfigError

__all__ = ["ALL_SERVICES", "ENV_VARS", "INGEST_QUEUE_BYTES", "MIN_INCIDENT_RETENTION_S", "Settings"]

ALL_SERVICES: tuple[str, ...] = ("correlation", "runbook", "capacity")

INGEST_QUEUE_BYTES = 256 * 1024 * 1024
"""Default of `Settings.ingest_queue_bytes`: 100,000 typical alerts (the queue's count limit) take
about 50 MB, so only large ones meet it."""

MIN_INCIDENT_RETENTION_S = 8 * 86400.0
"""Least `Settings.incident_retention_s`: a silence must outlive the 7 days after its end in which it
still covers alerts downlinked late (`aetherops.silences.SilenceIndex.KEEP_AFTER_END_S`)."""

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


@dataclass(frozen=True)
class Settings:
    """Everything a server process needs to know at start."""

    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default."""
    port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    services: tuple[str, ...] = ALL_SERVICES
    """Which services this process runs (all three by default)."""
    database_url: str = ""
    """PostgreSQL DSN. Empty: start an embedded PostgreSQL under data_dir."""
    nats_url: str = ""
    """NATS URL (JetStream enabled). Empty: start an embedded nats-server under data_dir."""
    redis_url: str = ""
    """Redis URL for rate limits shared across replicas. Empty: in-process limits."""
    data_dir: Path = field(default_factory=lambda: Path.home() / ".aetherops")
    """Where the embedded PostgreSQL and NATS keep their data."""
    db_schema: str = "public"
    """PostgreSQL schema holding AetherOps' tables (tests use one per test)."""
    namespace: str = ""
    """Prefix for NATS subjects, stream names and Redis rate-limit keys, for isolating tests or tenants. Empty: none."""
    metrics_port: int = 9464
    """Prometheus /metrics port; 0 picks a free one, -1 turns the endpoint off."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM, in-flight RPCs get this long to finish."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    ingest_queue_bytes: int = INGEST_QUEUE_BYTES
    """Memory the alerts waiting for their commit may hold (messages and labels as stored, plus a fixed
    part per alert); past it, ingest answers RESOURCE_EXHAUSTED with a retry delay."""
    log_level: str = "INFO"
    """Python logging level."""
    correlation_window_s: float = 300.0
    """Alerts further apart than this never join one cluster."""
    dedupe_window_s: float = 60.0
    """Same satellite and subsystem within this span: a duplicate."""
    incident_resolve_after_s: float = 3600.0
    """An open incident without an alert for this long is closed by the system (0: never). At least the
    correlation window: an incident that can still be joined stays open."""
    max_future_skew_s: float = 300.0
    """Alerts and snapshots timestamped further than this in the future are rejected."""
    outbox_retention_s: float = 7 * 86400.0
    """Published outbox events older than this are deleted (JetStream keeps the event history; the
    outbox only needs them until they are published, and a while after for diagnosis)."""
    incident_retention_s: float = 90 * 86400.0
    """Incidents closed longer ago than this are deleted with their alerts, and so are silences that ended
    that long ago, with the alerts they kept out (0: kept for ever). An alert re-sent after its row went
    is ingested again. At least 8 days: a silence covers alerts downlinked up to 7 days after its end."""
    idempotency_retention_s: float = 7 * 86400.0
    """Stored answers of mutating requests are kept this long: a retry with the same request_id within it
    gets the first answer; after it, the request acts again (0: kept for ever; else at least an hour)."""
    agent_actions: tuple[str, ...] = ("switch_power_bus", "safe_payload", "reduce_heater_duty")
    """Agent actions (`agent:<name>`) runbooks may use; agents answer on aetherops.actions.<name>."""
    dependency_graph_file: str = ""
    """JSON or YAML file replacing the default subsystem dependency graph."""
    capacity_config_file: str = ""
    """JSON or YAML file with storage capacities and the bandwidth budget period (see
    `aetherops.capacity_config`). Empty: storage forecasts only in "%", bandwidth never resets."""
    auth_tokens_file: str = ""
    """YAML/JSON file of static API tokens, stored as SHA-256 (see README, Security). Empty: `aetherops serve`
    on loopback creates <data_dir>/auth_tokens.json with an admin token."""
    jwt_issuer: str = ""
    """Required `iss` of accepted JWTs (needed when a JWT key is set)."""
    jwt_audience: str = ""
    """Required `aud` of accepted JWTs (needed when a JWT key is set)."""
    jwt_hs256_secret_file: str = ""
    """File holding the HS256 shared secret. Set this or the RS256 key, not both."""
    jwt_rs256_public_key_file: str = ""
    """PEM public key verifying RS256 JWTs."""
    tls_cert_file: str = ""
    """PEM server certificate (chain). With the key: TLS. Empty: plaintext."""
    tls_key_file: str = ""
    """PEM private key of the server certificate."""
    tls_client_ca_file: str = ""
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."""
    rate_limit_burst: float = 100.0
    """Calls a principal may make to one service in a burst."""
    rate_limit_per_s: float = 50.0
    """Sustained calls per second per principal and service (token refill rate)."""

    def __post_init__(self) -> None:
        # Infinity is no setting's "never" (0 is, where there is one): it overflowed the time arithmetic
        # of whatever used it, at the first alert or the first retention round rather than at start.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                _check(math.isfinite(value), f.name, f"must be a finite number, got {value!r}")
        _check(0 <= self.port <= 65535, "port", f"must be 0-65535, got {self.port}")
        _check(bool(self.host), "host", "must not be empty")
        _check(
            -1 <= self.metrics_port <= 65535, "metrics_port", f"must be -1 (off) or 0-65535, got {self.metrics_port}"
        )
        _check(bool(self.services), "services", "name at least one service")
        for name in self.services:
            _check(name in ALL_SERVICES, "services", f"unknown service {name!r}; choose from {ALL_SERVICES}")
        _check(
            self.database_url == "" or self.database_url.startswith(("postgres://", "postgresql://")),
            "database_url",
            "must start with postgresql://",
        )
        _check(
            self.nats_url == "" or self.nats_url.startswith(("nats://", "tls://")),
            "nats_url",
            "must start with nats:// or tls://",
        )
        _check(
            self.redis_url == "" or self.redis_url.startswith(("redis://", "rediss://")),
            "redis_url",
            "must start with redis://",
        )
        _check(
            re.fullmatch(r"[a-z_][a-z0-9_]*", self.db_schema) is not None,
            "db_schema",
            "must be an identifier",
        )
        _check(
            self.namespace == "" or _NAMESPACE_RE.fullmatch(self.namespace) is not None,
            "namespace",
            "lowercase letters, digits and _, starting with a letter",
        )
        _check(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must not be negative")
        _check(self.max_message_bytes >= 64 * 1024, "max_message_bytes", "must be at least 65536")
        _check(self.ingest_queue_bytes >= 1024 * 1024, "ingest_queue_bytes", "must be at least 1048576")
        _check(self.correlation_window_s > 0, "correlation_window_s", "must be positive")
        _check(self.dedupe_window_s >= 0, "dedupe_window_s", "must not be negative")
        _check(
            self.incident_resolve_after_s == 0 or self.incident_resolve_after_s >= self.correlation_window_s,
            "incident_resolve_after_s",
            "must be 0 (never) or at least correlation_window_s",
        )
        for agent in self.agent_actions:
            _check(re.fullmatch(r"[a-z][a-z0-9_]*", agent) is not None, "agent_actions", f"bad agent name {agent!r}")
        _check(self.max_future_skew_s >= 0, "max_future_skew_s", "must not be negative")
        _check(self.outbox_retention_s >= 60, "outbox_retention_s", "must be at least 60 seconds")
        _check(
            self.incident_retention_s == 0 or self.incident_retention_s >= MIN_INCIDENT_RETENTION_S,
            "incident_retention_s",
            f"must be 0 (keep) or at least {MIN_INCIDENT_RETENTION_S:g} seconds (8 days)",
        )
        # An incident is deleted only once nothing can join it or be answered from it any more.
        _check(
            self.incident_retention_s == 0 or self.incident_retention_s >= self.correlation_window_s,
            "incident_retention_s",
            "must be 0 (keep) or at least correlation_window_s",
        )
        _check(
            self.idempotency_retention_s == 0 or self.idempotency_retention_s >= 3600,
            "idempotency_retention_s",
            "must be 0 (keep) or at least 3600 seconds",
        )
        _check(
            self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
            "log_level",
            "DEBUG, INFO, WARNING or ERROR",
        )
        self.security()  # the security settings' own checks (they name their variables)

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.database_url == ""

    @property
    def uses_embedded_nats(self) -> bool:
        return self.nats_url == ""

    def security(self) -> SecurityConfig:
        """The authentication, TLS and rate-limit settings, as `aetherops.auth` and `servers.security` take them."""

        def path(value: str) -> Path | None:
            return Path(value).expanduser() if value else None

        return SecurityConfig(
            tokens_file=path(self.auth_tokens_file),
            jwt_issuer=self.jwt_issuer,
            jwt_audience=self.jwt_audience,
            jwt_hs256_secret_file=path(self.jwt_hs256_secret_file),
            jwt_rs256_public_key_file=path(self.jwt_rs256_public_key_file),
            tls_cert_file=path(self.tls_cert_file),
            tls_key_file=path(self.tls_key_file),
            tls_client_ca_file=path(self.tls_client_ca_file),
            rate_limit_burst=self.rate_limit_burst,
            rate_limit_per_s=self.rate_limit_per_s,
            redis_url=self.redis_url,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from AETHEROPS_* variables, then explicit overrides (flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = ENV_VARS[f.name]
            if var in env and env[var] != "":
                values[f.name] = _parse(f.name, env[var])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


ENV_VARS: dict[str, str] = {f.name: "AETHEROPS_" + f.name.upper() for f in fields(Settings)}
"""Setting name -> environment variable (AETHEROPS_DATABASE_URL, ...)."""

_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(Settings)}
"""Setting name -> its annotation, which says how its variable is parsed (so no setting can be missed)."""


def _parse(name: str, raw: str) -> Any:
    var = ENV_VARS[name]
    kind = _TYPES[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}: expected a number, got {raw!r}") from None
    if kind == "tuple[str, ...]":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if kind == "Path":
        return Path(raw).expanduser()
    return raw


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{ENV_VARS.get(name, name)}: {message}")
