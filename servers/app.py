"""The server process: composes the components, health, reflection and the lifecycle.

Start-up: listen at once with every service NOT_SERVING; bring up PostgreSQL
and NATS (embedded when no URL is configured) with retries and backoff; apply
migrations, create streams, start the outbox relay and the components; then
report SERVING. A monitor keeps health honest while the process runs.
With a Redis URL, the health service name `aetherops.ratelimit` reports the rate limits: SERVING while
they are shared through Redis, NOT_SERVING while Redis is unreachable and each process limits on its own.
The business services stay SERVING then (calls keep working on local limits).
Shutdown (SIGTERM/SIGINT): health NOT_SERVING, watch streams end (UNAVAILABLE: watch again), in-flight
RPCs get the grace period, then components, relay, pools and embedded servers stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aetherops.bus import Bus, OutboxRelay
from aetherops.clock import Clock, SystemClock
from aetherops.config import Settings
from aetherops.db import Database, apply_migrations
from aetherops.errors import UnavailableError
from aetherops.infra import EmbeddedNats, EmbeddedPostgres
from aetherops.services.retention import Retention
from aetherops.tasks import cancel_and_wait, periodically
from servers.component import Component, Infra
from servers.interceptors import Edge
from servers.metrics import Metrics
from servers.security import SecurityGate, server_credentials

__all__ = ["RATE_LIMIT_HEALTH_SERVICE", "Application", "server_options"]

log = logging.getLogger("aetherops.server")

HEALTH_SERVICE = "grpc.health.v1.Health"
RATE_LIMIT_HEALTH_SERVICE = "aetherops.ratelimit"
"""Health name of the Redis-shared rate limits (registered only when a Redis URL is configured)."""
T = TypeVar("T")


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options, chosen deliberately (see README, 'Server options')."""
    return [
        ("grpc.so_reuseport", 0),  # two servers must never silently share a port
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle clients every 60 s and drop them after 20 s without an answer, so
        # half-open connections (a ground station that vanished) do not pile up.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Allow clients' own keepalive pings down to every 10 s, even without calls in flight
        # (long WatchClusters/WatchExecution streams need them through NATs and load balancers).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Recycle connections after 30 min (with 30 s grace) so clients rebalance across replicas.
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
        # Let grpc-core queue a burst of calls until Python takes them. With its defaults (1,000
        # soft, 3,000 hard) it cancelled calls beyond about a thousand waiting: 1,452 of a burst of
        # 4,000 IngestAlert calls got CANCELLED, a status that says nothing of overload and that
        # clients do not retry. Shedding is the ingest queue's and the rate limiter's job: they
        # answer RESOURCE_EXHAUSTED with a retry delay.
        ("grpc.server.max_pending_requests", 10_000),
        ("grpc.server.max_pending_requests_hard_limit", 20_000),
    ]


def default_components(settings: Settings) -> list[Component]:
    from servers.registry import build_components

    return build_components(settings)


@dataclass
class Application:
    """One AetherOps server process."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    components_factory: Callable[[Settings], list[Component]] = default_components
    port: int = 0
    infra: Infra | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._components: list[Component] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._bring_up_task: asyncio.Task[None] | None = None
        self._embedded_pg: EmbeddedPostgres | None = None
        self._embedded_nats: EmbeddedNats | None = None
        self.retention: Retention | None = None
        self._stopping = False
        self._started: set[str] = set()
        self.metrics = Metrics()
        # Every RPC passes the gate; with no token file or JWT key configured it admits nobody (fail closed).
        # Buckets are keyed under the namespace, so tenants (and tests) sharing one Redis stay apart.
        prefix = f"{self.settings.namespace}:" if self.settings.namespace else ""
        self.gate = SecurityGate.from_config(self.settings.security(), redis_key_prefix=prefix)

    @property
    def components(self) -> list[Component]:
        return self._components

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Listens and begins bringing up dependencies in the background; returns the bound port."""
        self._components = self.components_factory(self.settings)
        server = grpc.aio.server(options=server_options(self.settings))
        edge = Edge(lambda service: service in self._started, self.metrics, self.gate)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for component in self._components:
            component.add_to_server(edge.registrar(server))
        names = [c.service_name for c in self._components]
        reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings.security())
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind"; it logged the reason (address in use) itself
            self.port = 0
        if self.port == 0:
            raise UnavailableError(f"cannot listen on {address}: in use, or not an address of this host")
        await server.start()
        self._server = server
        self.metrics.add_gauge_source(self._security_gauges)
        if self.settings.metrics_port >= 0:
            try:
                self.metrics.serve(self.settings.host, self.settings.metrics_port)
            except OSError as exc:
                raise UnavailableError(
                    f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port}: {exc.strerror}"
                ) from None
        self._bring_up_task = bring_up = asyncio.create_task(self._bring_up(), name="bring-up")
        bring_up.add_done_callback(self._bring_up_ended)
        self._tasks.append(bring_up)
        if self.gate.shares_rate_limits:
            # NOT_SERVING until the first probe has reached Redis; independent of the bring-up.
            await self._health.set(RATE_LIMIT_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._tasks.append(asyncio.create_task(self._watch_rate_limits(), name="rate-limit-monitor"))
        return self.port

    async def _set_health(self, status: int, *, only: list[Component] | None = None) -> None:
        targets = self._components if only is None else only
        for component in targets:
            await self._health.set(component.service_name, status)
        if only is None:
            await self._health.set("", status)

    async def _bring_up(self) -> None:
        settings = self.settings
        db_url, nats_url = settings.database_url, settings.nats_url
        if settings.uses_embedded_postgres:
            self._embedded_pg = EmbeddedPostgres(settings.data_dir)
            db_url = await asyncio.to_thread(self._embedded_pg.start)
            log.info("embedded PostgreSQL running in %s", settings.data_dir / "postgres")
        if settings.uses_embedded_nats:
            self._embedded_nats = EmbeddedNats(settings.data_dir)
            nats_url = await self._embedded_nats.astart()
            log.info("embedded NATS running at %s", nats_url)
        db = await _retry("PostgreSQL", lambda: Database.connect(db_url, settings.db_schema))
        await apply_migrations(db)
        bus = await _retry("NATS", lambda: Bus.connect(nats_url, settings.namespace))
        await _retry("JetStream", bus.ensure_streams)
        relay = OutboxRelay(db, bus, retention_s=settings.outbox_retention_s)
        self.infra = Infra(settings=settings, db=db, bus=bus, relay=relay, clock=self.clock)
        self._tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
        self.metrics.add_gauge_source(self._platform_gauges)
        for component in self._components:
            gauges = getattr(component, "gauges", None)  # optional (servers.component.Observable)
            if gauges is not None:
                self.metrics.add_gauge_source(gauges)
        for component in self._components:
            await component.start(self.infra)
            self._started.add(component.service_name)
        self.retention = Retention(
            db,
            self.clock,
            incident_retention_s=settings.incident_retention_s,
            idempotency_retention_s=settings.idempotency_retention_s,
            incidents="correlation" in settings.services,
        )
        if self.retention.enabled:
            rounds = periodically(Retention.INTERVAL_S, self.retention.run_once, "retention round", at_once=True)
            self._tasks.append(asyncio.create_task(rounds, name="retention"))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._monitor(), name="health-monitor"))
        self.ready.set()
        log.info("serving %s on %s", ",".join(c.name for c in self._components), self.address)

    def _security_gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        degraded = float(self.gate.rate_limit_degraded)
        return [
            ("aetherops_ratelimit_degraded", "1 while Redis is unreachable and limits are per process", {}, degraded)
        ]

    def _platform_gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        assert self.infra is not None
        relay = self.infra.relay
        return [
            ("aetherops_outbox_backlog", "Outbox events not yet published", {}, float(relay.backlog)),
            ("aetherops_outbox_oldest_age_seconds", "Age of the oldest unpublished event", {}, relay.oldest_age_s),
            ("aetherops_outbox_published_total", "Events published by this relay", {}, float(relay.published_total)),
            (
                "aetherops_outbox_dead_lettered_total",
                "Events over the NATS max_payload, kept in the outbox table and never published",
                {},
                float(relay.dead_lettered),
            ),
            (
                "aetherops_outbox_late_total",
                "Events committed more than the relay's scan lag after taking their ids, published up to a minute late",
                {},
                float(relay.late_found),
            ),
            *(
                (
                    "aetherops_retention_deleted_total",
                    "Rows deleted once past their retention",
                    {"kind": kind},
                    float(n),
                )
                for kind, n in (self.retention.deleted_total.items() if self.retention is not None else ())
            ),
            *(
                (
                    "aetherops_consumer_dropped_total",
                    "Messages JetStream stopped delivering to a consumer after its maximum deliveries",
                    {"consumer": consumer.durable},
                    float(consumer.dropped),
                )
                for consumer in self.infra.bus.consumers
            ),
        ]

    def _adapt_limits(self) -> None:
        """Tighten rate limits while an ingest queue is filling up (and relax them after)."""
        fill = [float(getattr(c, "ingest_utilisation", 0.0)) for c in self._components]
        if self.gate.observe_ingest_utilisation(max(fill, default=0.0)):
            log.warning("ingest queues at %.0f%%: rate limits %s", 100 * max(fill), "adjusted")

    async def _monitor(self, interval_s: float = 1.0, lost_after: int = 3) -> None:
        assert self.infra is not None
        serving = True
        failures = 0
        while True:
            await asyncio.sleep(interval_s)  # a periodic probe, not synchronisation
            self._adapt_limits()
            probe = self.infra.bus.connected and await self.infra.db.ping()
            # One slow probe under heavy load is not an outage: taking the service out of rotation
            # for it would turn overload into refusals. Lost means `lost_after` failed probes in a
            # row (about three seconds); back means the first good one.
            failures = 0 if probe else failures + 1
            ok = probe or (serving and failures < lost_after)
            if ok != serving and not self._stopping:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                log.warning("dependencies %s: health %s", "back" if ok else "lost", "SERVING" if ok else "NOT_SERVING")
                await self._set_health(status)

    async def _watch_rate_limits(self, interval_s: float = 1.0) -> None:
        """Keeps `aetherops.ratelimit` in step with Redis; the limiter logs each change of state once."""
        shown: bool | None = None
        while True:
            try:
                shared = await self.gate.probe_rate_limits()
            except Exception:  # Redis answered, but with an error (e.g. still loading): not usable
                if shown is not False:
                    log.exception("rate limit probe failed; reporting %s NOT_SERVING", RATE_LIMIT_HEALTH_SERVICE)
                shared = False
            if shared != shown and not self._stopping:
                shown = shared
                status = (
                    health_pb2.HealthCheckResponse.SERVING if shared else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self._health.set(RATE_LIMIT_HEALTH_SERVICE, status)
            await asyncio.sleep(interval_s)  # a periodic probe, not synchronisation

    async def stop(self) -> None:
        """Graceful shutdown; safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        for component in self._components:
            component.end_streams()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
        await cancel_and_wait(*self._tasks)
        for component in reversed(self._components):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        if self.infra is not None:
            await self.infra.bus.close()
            await self.infra.db.close()
        self.metrics.close()
        await self.gate.close()
        if self._embedded_nats is not None:
            await self._embedded_nats.astop()
        if self._embedded_pg is not None:
            await asyncio.to_thread(self._embedded_pg.stop)

    def _bring_up_ended(self, task: asyncio.Task[None]) -> None:
        # Kept until shutdown, the task's exception was never reported by asyncio: the server stayed
        # "starting" for ever without a word. Reported here, and not again when stopping.
        if task.cancelled() or task.exception() is None:
            return
        log.error("start-up failed: %s", task.exception(), exc_info=task.exception())
        self._tasks.remove(task)

    async def wait_ready(self, timeout_s: float | None = 30.0) -> None:
        """Waits until every component serves; raises if bring-up failed or timed out (None: no limit).

        Bring-up retries only dependencies it cannot reach; anything else (an embedded PostgreSQL that
        cannot start, a migration or a component that fails) ends it, and this says so."""
        bring_up = self._bring_up_task
        assert bring_up is not None, "start() first"
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait({bring_up, ready}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if bring_up.done() and bring_up.exception() is not None:
                raise UnavailableError(f"start-up failed: {bring_up.exception()}")
            raise UnavailableError(f"not ready within {timeout_s}s")


async def _retry(what: str, attempt: Callable[[], Awaitable[T]], *, first_delay_s: float = 0.2) -> T:
    """Retries with exponential backoff (capped at 10 s) until it succeeds, logging one line per failure."""
    delay = first_delay_s
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure to reach a dependency: say what, wait, try again
            log.warning("%s not reachable (%s); retrying in %.1fs", what, exc or type(exc).__name__, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
