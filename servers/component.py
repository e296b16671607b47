"""What a service contributes to the server, and the shared infrastructure handed to it.

A component registers its servicer at once (so reflection lists it and calls
get UNAVAILABLE rather than UNIMPLEMENTED while the database is away) and is
started when PostgreSQL and NATS are reachable and migrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc

from aetherops.bus import Bus, OutboxRelay
from aetherops.clock import Clock
from aetherops.config import Settings
from aetherops.db import Database

__all__ = ["Component", "GaugeSample", "Infra", "Observable"]


@dataclass
class Infra:
    """Connections shared by every component of one process."""

    settings: Settings
    db: Database
    bus: Bus
    relay: OutboxRelay
    clock: Clock


class Component(Protocol):
    name: str
    """Short name used by --services."""
    service_name: str
    """Fully qualified gRPC service name (health and reflection)."""

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self, infra: Infra) -> None: ...

    async def stop(self) -> None: ...

    def end_streams(self) -> None:
        """Shutdown has begun: end the component's watch streams (UNAVAILABLE, `WATCH_ENDED_BY_SHUTDOWN`)
        and take no new ones. Called before the grace period, which in-flight calls get to finish: a
        watch never finishes, and an open one held every SIGTERM for the whole grace period."""
        ...


GaugeSample = tuple[str, str, dict[str, str], float]
"""(metric name, help, labels, value), as servers.metrics takes them."""


class Observable(Protocol):
    """Optional for a component: what it reports to /metrics and to the adaptive rate limits."""

    def gauges(self) -> list[GaugeSample]: ...

    @property
    def ingest_utilisation(self) -> float: ...
