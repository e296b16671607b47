"""The platform through real PostgreSQL, NATS and grpc.aio servers: migrations, outbox, health,
reflection, graceful shutdown and start-up without a database."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
from _poll import eventually
from _proxy import TcpProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.js import api as js_api
from nats.js.errors import APIError, NoStreamResponseError

from aetherops.bus import Bus, DurableConsumer, OutboxRelay
from aetherops.config import Settings
from aetherops.db import Database, apply_migrations, outbox
from aetherops.infra import EmbeddedNats, free_port
from aetherops.tasks import cancel_and_wait
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc
from servers.app import Application

_README = Path(__file__).resolve().parents[2] / "README.md"

SERVICES = {
    "aetherops.correlation.v1.CorrelationService",
    "aetherops.runbook.v1.RunbookService",
    "aetherops.capacity.v1.CapacityService",
}


async def test_migrations_apply_once_and_rerun_is_a_no_op(pg_url: str, schema: str) -> None:
    db = await Database.connect(pg_url, schema)
    try:
        first = await apply_migrations(db)
        second = await apply_migrations(db)
        assert first and first == sorted(first)
        assert second == []
        rows = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == first
    finally:
        await db.close()


async def test_concurrent_migrations_take_turns(pg_url: str, schema: str) -> None:
    dbs = [await Database.connect(pg_url, schema) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(d) for d in dbs))
        applied = [v for r in results for v in r]
        assert len(applied) == len(set(applied)), "a migration ran twice"
        assert sorted(applied) == [r["version"] for r in await dbs[0].fetch("SELECT version FROM schema_migrations")]
    finally:
        for d in dbs:
            await d.close()


def _outbox_drained(db: Database) -> Callable[[], Awaitable[bool]]:
    """A condition for `eventually`: no outbox row is left unpublished."""

    async def drained() -> bool:
        return bool(await db.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_time IS NULL"))

    return drained


async def _write_events(db: Database, bus: Bus, n: int, start: int = 0) -> list[str]:
    ids = []
    async with db.transaction() as conn:
        events = [
            outbox.OutboxEvent(
                subject=bus.subjects.incidents("opened"),
                aggregate_id=f"agg-{i % 3}",
                payload=f"event-{i}".encode(),
            )
            for i in range(start, start + n)
        ]
        await outbox.append(conn, events)
        ids = [e.event_id for e in events]
    return ids


async def _stream_messages(bus: Bus, subject: str) -> list[Any]:
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    msgs = []
    try:
        while True:
            try:
                msgs.append(await sub.next_msg(timeout=0.5))
            except Exception:
                break
    finally:
        await sub.unsubscribe()
    return msgs


async def test_outbox_delivers_each_event_exactly_once_across_nats_restart(
    db: Database, tmp_path: Path, namespace: str
) -> None:
    # A NATS of our own, so this test may stop and restart it.
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await nats_server.astart()
    bus = await Bus.connect(url, namespace)
    relay_task: asyncio.Task[None] | None = None
    try:
        await bus.ensure_streams()
        relay = OutboxRelay(db, bus, batch_size=50, poll_interval_s=0.1)
        relay_task = asyncio.create_task(relay.run())
        first = await _write_events(db, bus, 120)
        relay.wake()

        all_published = _outbox_drained(db)
        await eventually(all_published, what="all outbox rows published")
        await nats_server.astop()
        # Written while NATS is away: they must wait, then go out once NATS is back.
        second = await _write_events(db, bus, 80, start=120)
        relay.wake()
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NULL") == 80
        await nats_server.astart()
        await eventually(all_published, timeout_s=30, what="all outbox rows published")
        # Simulate a relay that crashed after publishing but before marking: publish again.
        await db.execute(
            "UPDATE outbox SET published_time = NULL WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 10)"
        )
        relay.wake()
        await eventually(all_published, what="all outbox rows published")
        msgs = await _stream_messages(bus, bus.subjects.incidents(">"))
        got = [m.headers["Nats-Msg-Id"] for m in msgs]
        assert got == first + second, "every event exactly once, in commit order"
    finally:
        if relay_task is not None:
            relay_task.cancel()
            await asyncio.gather(relay_task, return_exceptions=True)
        await bus.close()
        await nats_server.astop()


async def test_a_dedicated_connection_keeps_its_session_state_to_itself(db: Database) -> None:
    key = f"test.{uuid.uuid4().hex}"
    async with db.dedicated({"enable_sort": "off"}) as conn:
        assert await conn.fetchval("SHOW enable_sort") == "off"
        assert await conn.fetchval("SHOW search_path") == db.schema
        assert await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
        async with db.dedicated() as other:
            assert not await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
    # Closed with it: the lock is free again, and pooled connections never saw the setting.
    async with db.dedicated() as other:
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
    assert await db.fetchval("SHOW enable_sort") == "on"


async def test_publish_all_returns_once_every_message_is_stored(bus: Bus) -> None:
    subject = bus.subjects.incidents("opened")
    ids = [str(uuid.uuid4()) for _ in range(40)]
    batch = [(subject, f"event {n}".encode(), {"Nats-Msg-Id": event_id}) for n, event_id in enumerate(ids)]
    await bus.publish_all(batch)
    await bus.publish_all(batch)  # again, as after a crash before marking: acked as duplicates, not stored
    msgs = await _stream_messages(bus, bus.subjects.incidents(">"))
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == ids
    assert [m.data for m in msgs] == [payload for _, payload, _ in batch]


async def test_publish_all_raises_when_jetstream_refuses_a_message(bus: Bus, namespace: str) -> None:
    stored = (bus.subjects.incidents("opened"), b"fine", {"Nats-Msg-Id": str(uuid.uuid4())})
    # No stream captures the subject: NATS answers "no responders" for it.
    with pytest.raises(NoStreamResponseError):
        await bus.publish_all([stored, (bus.subjects.subject("nowhere", "x"), b"lost", {})])
    # A stream refuses it (full, discarding new messages): JetStream's error.
    full = js_api.StreamConfig(
        name=f"{namespace.upper()}_FULL",
        subjects=[bus.subjects.subject("full", ">")],
        max_msgs=1,
        discard=js_api.DiscardPolicy.NEW,
    )
    await bus.js.add_stream(full)
    try:
        first, second = ((bus.subjects.subject("full", str(n)), b"x", {}) for n in range(2))
        await bus.publish_all([first])
        with pytest.raises(APIError, match="maximum messages"):
            await bus.publish_all([second, stored])
    finally:
        await bus.js.delete_stream(full.name)
    # A refusal spoils nothing for later batches.
    await bus.publish_all([stored])


async def test_an_event_too_large_for_nats_is_set_aside_and_the_rest_flow(db: Database, bus: Bus) -> None:
    # NATS refuses a message over its max_payload every time. Retried, it held back every later
    # event of every service for good (the relay backed off and tried the same row again).
    await bus.ensure_streams()
    before = await _write_events(db, bus, 2)
    async with db.transaction() as conn:
        huge = outbox.OutboxEvent(
            subject=bus.subjects.incidents("opened"), aggregate_id="agg-huge", payload=b"x" * bus.nc.max_payload
        )
        await outbox.append(conn, [huge])
    after = await _write_events(db, bus, 2, start=2)
    relay = OutboxRelay(db, bus, batch_size=50, poll_interval_s=0.05)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(_outbox_drained(db), what="the outbox drained past the oversized event")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (relay.dead_lettered, relay.published_total, relay.failures) == (1, 4, 0)
    msgs = await _stream_messages(bus, bus.subjects.incidents(">"))
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == before + after  # in order, without the huge one
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", huge.event_id) == 1  # kept


async def test_an_event_committed_after_the_scan_floor_passed_its_id_is_still_published(db: Database, bus: Bus) -> None:
    """Ids are taken at insert and seen at commit: a transaction that holds a low id while later
    events are published and the relay's scan floor moves past it. Its event goes out with the next
    search from the lowest id."""
    await bus.ensure_streams()
    floor = outbox.ScanFloor(lag_s=0.0, full_scan_s=1.0)
    relay = OutboxRelay(db, bus, batch_size=50, poll_interval_s=0.05, scan_floor=floor)
    straggler = outbox.OutboxEvent(subject=bus.subjects.incidents("opened"), aggregate_id="agg-late", payload=b"late")
    async with db.dedicated() as held:
        late = held.transaction()
        await late.start()
        await outbox.append(held, [straggler])
        late_id = await held.fetchval("SELECT id FROM outbox WHERE event_id = $1", straggler.event_id)
        others = await _write_events(db, bus, 3)
        task = asyncio.create_task(relay.run())
        try:

            async def passed() -> bool:
                published = await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NOT NULL")
                return published == 3 and floor.value > late_id

            await eventually(passed, what="the others published and the floor past the held id")
            await late.commit()
            await eventually(_outbox_drained(db), what="the late event published")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    msgs = await _stream_messages(bus, bus.subjects.incidents(">"))
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == [*others, straggler.event_id]
    assert relay.late_found == 1  # counted (aetherops_outbox_late_total) and logged


async def test_a_second_relay_takes_over_when_the_leader_stops(db: Database, bus: Bus) -> None:
    await bus.ensure_streams()
    leader, standby = (OutboxRelay(db, bus, batch_size=50, poll_interval_s=0.05) for _ in range(2))
    leader_task = asyncio.create_task(leader.run())
    standby_task: asyncio.Task[None] | None = None

    def published(relay: OutboxRelay, n: int) -> Callable[[], Any]:
        async def check() -> bool:
            return relay.published_total == n

        return check

    try:
        await _write_events(db, bus, 5)
        leader.wake()
        await eventually(published(leader, 5), what="the leader published")
        standby_task = asyncio.create_task(standby.run())
        await _write_events(db, bus, 5, start=5)
        leader.wake()
        await eventually(published(leader, 10), what="the leader published again")
        assert standby.published_total == 0, "one relay at a time"
        leader_task.cancel()
        await asyncio.gather(leader_task, return_exceptions=True)
        # The leader's lock ended with its connection: the standby takes over.
        await _write_events(db, bus, 5, start=10)
        await eventually(published(standby, 5), timeout_s=10, what="the standby took over")
    finally:
        for task in (leader_task, standby_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_published_events_past_retention_are_pruned_in_chunks_and_unpublished_never(
    db: Database, bus: Bus
) -> None:
    await _write_events(db, bus, 12)
    async with db.transaction() as conn:
        # 5 published two days ago, 3 just now, 4 never (however old they are).
        await conn.execute(
            """UPDATE outbox SET published_time = now() - interval '2 days'
               WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 5)"""
        )
        await conn.execute(
            """UPDATE outbox SET published_time = now()
               WHERE id IN (SELECT id FROM outbox WHERE published_time IS NULL ORDER BY id LIMIT 3)"""
        )
        await conn.execute("UPDATE outbox SET created_time = now() - interval '30 days'")
    async with db.connection() as conn:
        assert [await outbox.prune_published(conn, 86400, limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NOT NULL") == 3
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NULL") == 4


async def test_marking_fails_rather_than_leave_a_claimed_row_unmarked(db: Database, bus: Bus) -> None:
    await _write_events(db, bus, 3)
    with pytest.raises(RuntimeError, match="marked 2 of 3"):
        async with db.transaction() as conn:
            rows = await outbox.fetch_unpublished(conn, 10)
            wrong = dataclasses.replace(rows[1], location=(4_000_000, 1))
            await outbox.mark_published(conn, [rows[0], wrong, rows[2]])
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NULL") == 3


async def test_the_relay_prunes_once_it_has_published_everything(db: Database, bus: Bus) -> None:
    await bus.ensure_streams()
    await _write_events(db, bus, 30)
    await db.execute(
        "UPDATE outbox SET published_time = now() - interval '1 hour' WHERE id IN (SELECT id FROM outbox LIMIT 10)"
    )
    relay = OutboxRelay(db, bus, batch_size=50, poll_interval_s=0.1, retention_s=60)
    task = asyncio.create_task(relay.run())
    try:

        async def pruned() -> bool:
            return relay.pruned_total == 10

        await eventually(pruned, what="the 10 events published an hour ago pruned")
        # The 20 it published itself are younger than the retention: they stay, stamped.
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_time IS NOT NULL") == 20
        assert await db.fetchval("SELECT count(*) FROM outbox") == 20
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_health_and_reflection_list_every_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ["", *SERVICES]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert SERVICES | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_subset_of_services(app_factory: Any) -> None:
    app = await app_factory(services=("correlation", "capacity"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        ok = await stub.Check(health_pb2.HealthCheckRequest(service="aetherops.capacity.v1.CapacityService"))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="aetherops.runbook.v1.RunbookService"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unreachable_database_is_not_serving_not_a_crash(settings: Settings) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = Application(settings.with_overrides(database_url=dead))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            for name in ["", *SERVICES]:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            corr = correlation_pb2_grpc.CorrelationServiceStub(chan)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await corr.GetCluster(correlation_pb2.GetClusterRequest(cluster_id="x"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()


class _SlowComponent:
    """A CorrelationService whose GetCluster blocks until the test releases it."""

    name = "correlation"
    service_name = "aetherops.correlation.v1.CorrelationService"

    def __init__(self, settings: Settings) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        component = self

        class Servicer(correlation_pb2_grpc.CorrelationServiceServicer):
            async def GetCluster(self, request: Any, context: Any) -> Any:
                component.entered.set()
                await component.release.wait()
                return correlation_pb2.GetClusterResponse(
                    cluster=correlation_pb2.Cluster(cluster_id=request.cluster_id)
                )

        self.servicer = Servicer()

    def end_streams(self) -> None:
        """No watch streams."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        correlation_pb2_grpc.add_CorrelationServiceServicer_to_server(self.servicer, server)

    async def start(self, infra: Any) -> None:
        return None

    async def stop(self) -> None:
        return None


def _proxy_to_postgres(pg_url: str) -> tuple[TcpProxy, Callable[[int], str]]:
    """A proxy in front of the test PostgreSQL (TCP, or the embedded server's Unix socket) and the
    DSN that goes through it, given the proxy's port."""
    url = urlsplit(pg_url)
    query = parse_qs(url.query)
    user, db = url.username or "postgres", url.path.lstrip("/") or "postgres"
    if url.hostname:
        proxy = TcpProxy(url.hostname, url.port or 5432)
    else:
        socket_dir, port = query["host"][0], int(query.get("port", ["5432"])[0])
        proxy = TcpProxy("", 0, unix_path=f"{socket_dir}/.s.PGSQL.{port}")
    return proxy, lambda proxy_port: f"postgresql://{user}@127.0.0.1:{proxy_port}/{db}"


async def test_losing_postgres_is_not_serving_and_coming_back_is_serving(
    app_factory: Any, channel_for: Any, pg_url: str
) -> None:
    proxy, dsn = _proxy_to_postgres(pg_url)
    await proxy.start()
    try:
        app = await app_factory(database_url=dsn(proxy.port))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
            health = health_pb2_grpc.HealthStub(chan)

            async def status_is(want: int) -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                return reply.status == want

            assert await status_is(health_pb2.HealthCheckResponse.SERVING)
            await proxy.cut()
            # Three failed probes a second apart: one slow probe under load is not an outage.
            await eventually(
                lambda: status_is(health_pb2.HealthCheckResponse.NOT_SERVING), timeout_s=20, what="NOT_SERVING"
            )
            # Calls that need the database say so, precisely.
            corr = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", app.port))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await corr.GetCluster(correlation_pb2.GetClusterRequest(cluster_id="x"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            alert = correlation_pb2.Alert(
                alert_id=uuid.uuid4().hex, satellite_id="SAT-1", subsystem="power", severity=3
            )
            alert.timestamp.GetCurrentTime()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await corr.IngestAlert(correlation_pb2.IngestAlertRequest(alert=alert), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            await proxy.start()  # same port
            await eventually(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), timeout_s=20, what="SERVING")
            # Nothing of the refused alert stayed behind in memory: sent again, it is new and stored.
            reply = await corr.IngestAlert(correlation_pb2.IngestAlertRequest(alert=alert), timeout=10)
            assert not reply.replay and reply.cluster_opened
            cluster = await corr.GetCluster(correlation_pb2.GetClusterRequest(cluster_id=reply.cluster_id), timeout=10)
            assert [a.alert_id for a in cluster.cluster.alerts] == [alert.alert_id]
    finally:
        await proxy.cut()


async def test_graceful_shutdown_lets_in_flight_rpc_finish(settings: Settings, channel_for: Any) -> None:
    slow: list[_SlowComponent] = []

    def factory(s: Settings) -> list[Any]:
        slow.append(_SlowComponent(s))
        return slow

    app = Application(settings, components_factory=factory)
    await app.start()
    await app.wait_ready()
    async with channel_for("admin", app.port) as chan:
        stub = correlation_pb2_grpc.CorrelationServiceStub(chan)
        call = asyncio.ensure_future(stub.GetCluster(correlation_pb2.GetClusterRequest(cluster_id="c-1")))
        await asyncio.wait_for(slow[0].entered.wait(), 5)
        stopping = asyncio.create_task(app.stop())
        health = health_pb2_grpc.HealthStub(chan)

        async def not_serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.aio.AioRpcError:
                return True  # already refusing new calls
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await eventually(not_serving, timeout_s=5, what="health NOT_SERVING")
        slow[0].release.set()
        reply = await asyncio.wait_for(call, 5)
        assert reply.cluster.cluster_id == "c-1"
        await asyncio.wait_for(stopping, 10)


async def test_shutdown_ends_watch_streams_at_once_instead_of_waiting_out_the_grace(
    app_factory: Any, channel_for: Any
) -> None:
    from gen.aetherops.runbook.v1 import runbook_pb2, runbook_pb2_grpc

    # A watch never finishes by itself: each open one held SIGTERM for the whole grace period, and
    # its client then got "Cancelling all calls". A grace longer than the bounds below shows it.
    app = await app_factory(shutdown_grace_s=120.0)
    async with channel_for("admin", app.port) as chan:
        runbooks = runbook_pb2_grpc.RunbookServiceStub(chan)
        steps = [runbook_pb2.RunbookStep(step_id="s", action="log", requires_approval=True)]
        steps[0].parameters.update({"message": "x"})
        await runbooks.RegisterRunbook(
            runbook_pb2.RegisterRunbookRequest(runbook=runbook_pb2.Runbook(runbook_id="w", name="W", steps=steps))
        )
        started = await runbooks.StartExecution(runbook_pb2.StartExecutionRequest(runbook_id="w"))
        execution_watch = runbooks.WatchExecution(
            runbook_pb2.WatchExecutionRequest(execution_id=started.execution.execution_id)
        )
        await asyncio.wait_for(execution_watch.read(), 10)  # the current state: the watch is in place
        cluster_watch = correlation_pb2_grpc.CorrelationServiceStub(chan).WatchClusters(
            correlation_pb2.WatchClustersRequest()
        )
        feed = next(c for c in app.components if c.name == "correlation").feed

        async def watching() -> bool:
            return bool(feed._watchers)

        await eventually(watching, what="the cluster watch to be registered")

        stopping = asyncio.create_task(app.stop())
        for watch in (execution_watch, cluster_watch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(watch.read(), 30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down: watch again" in (err.value.details() or "")
        await asyncio.wait_for(stopping, 30)


async def test_tracking_id_is_echoed_in_the_trailing_metadata(channel: grpc.aio.Channel) -> None:
    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    tracking = uuid.uuid4().hex
    call = stub.GetCluster(
        correlation_pb2.GetClusterRequest(cluster_id="missing"), metadata=(("x-tracking-id", tracking),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    trailers = tuple(await call.trailing_metadata())
    assert ("x-tracking-id", tracking) in trailers
    # Beside the error's rich details, which an explicit status would otherwise replace.
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "grpc-status-details-bin" in dict(trailers)
    # A call without one gets the id the server made up, on success too.
    ok = stub.ListActiveClusters(correlation_pb2.ListActiveClustersRequest(page_size=1))
    await ok
    made_up = dict(tuple(await ok.trailing_metadata()))["x-tracking-id"]
    assert len(made_up) == 32 and made_up != tracking


async def test_postgres_unique_schema_isolation(pg_url: str, schema: str, db: Database) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        tables = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
        assert {"outbox", "schema_migrations"} <= {t["table_name"] for t in tables}
    finally:
        await conn.close()


async def test_metrics_move_under_traffic_and_log_lines_are_json(
    server: Any, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging
    import urllib.request

    from aetherops.logs import JsonFormatter

    stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
    tracking = uuid.uuid4().hex
    with caplog.at_level(logging.INFO, logger="aetherops.rpc"):
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetCluster(
                    correlation_pb2.GetClusterRequest(cluster_id=""), metadata=(("x-tracking-id", tracking),)
                )
        # The server logs a call as its handler ends, which may come after the client has its answer.

        async def logged() -> list[logging.LogRecord]:
            records = [r for r in caplog.records if r.name == "aetherops.rpc"]
            return records if len(records) >= 3 else []

        records = await eventually(logged, timeout_s=5, what="three rpc log lines")
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert len(lines) == 3
    for line in lines:
        assert line["rpc"] == "GetCluster" and line["service"] == "aetherops.correlation.v1.CorrelationService"
        assert line["tracking_id"] == tracking and line["code"] == "INVALID_ARGUMENT"
        assert line["latency_ms"] >= 0 and "principal" in line

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(scrape)
    method = "/aetherops.correlation.v1.CorrelationService/GetCluster"
    assert f'aetherops_rpc_total{{code="INVALID_ARGUMENT",method="{method}"}} 3.0' in text
    for gauge in (
        "aetherops_outbox_backlog",
        "aetherops_outbox_late_total",
        "aetherops_active_clusters",
        "aetherops_running_executions",
        "aetherops_ingest_queue_utilisation",
        "aetherops_fleet_risk_satellites",
    ):
        assert gauge in text, gauge
    for consumer in ("correlation-alerts", "capacity-telemetry", "runbook-incidents"):
        assert f'aetherops_consumer_dropped_total{{consumer="{consumer}"}} 0.0' in text, consumer
    # Every metric the README's table names is served.
    readme = await asyncio.to_thread(_README.read_text)
    table = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(aetherops_[a-z_]+)", table))
    assert len(named) == 15 and not {name for name in named if f"# TYPE {name} " not in text}


async def test_a_message_jetstream_gives_up_on_is_counted_and_logged(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    async def always_fails(msg: Any) -> None:
        raise ValueError("cannot handle this one")

    consumer = DurableConsumer(bus, bus.subjects.alerts_ingest, "gives-up", always_fails, max_deliver=2)
    assert consumer in bus.consumers
    task = asyncio.create_task(consumer.run())
    try:
        await bus.js.publish(bus.subjects.alerts_ingest, b"never handled")

        async def dropped() -> bool:
            return consumer.dropped == 1

        await eventually(dropped, what="JetStream's max-deliveries advisory")  # after 1 s + 2 s of naks
    finally:
        await cancel_and_wait(task)
    stream = bus.subjects.stream_for(bus.subjects.alerts_ingest)
    assert any(
        f"gave up on the message at stream {stream} sequence 1 after 2 deliveries" in r.getMessage()
        for r in caplog.records
        if r.levelname == "ERROR"
    )
