"""Correlation over gRPC against `aetherops serve` with real PostgreSQL and NATS.

Prints, as medians over --runs:
  * IngestAlert from --callers concurrent callers, and the same server's health Check as the
    empty-RPC baseline, with their ratio (target >= 0.6); and ScoreAlerts, an authenticated call that
    stores nothing, which shows what any business RPC costs over health before ingestion adds its part
    (the edge: authentication, rate limit, tracking id, metrics; and the larger messages);
  * IngestAlerts client streaming: durable alerts/s (the reply comes after the commit; target >= 30,000),
    for two alert mixes (see MIXES) and with one alert per stream message or batches of 500;
  * alert in -> incident event on NATS at a paced 1,000 alerts/s: p50/p95 (target p95 <= 50 ms), with
    the alerts published on NATS (aetherops.alerts.ingest) and sent as IngestAlert calls;
  * a dashboard's ListActiveClusters (page of 50) during a storm of 50 incidents of 2,000 alerts each:
    time and server CPU per call (no target in the issue: what polling costs the ingest path).

Uses AETHEROPS_TEST_DATABASE_URL / AETHEROPS_TEST_NATS_URL (defaults: the local services) with a
throwaway schema and namespace. `--quick` shrinks every phase to a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import nats
from _cleanup import cancel_on_sigterm  # sibling module: scripts run as python bench/<name>.py
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aetherops.auth import write_token_file
from aetherops.infra import free_port
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from gen.aetherops.events.v1 import events_pb2

DB = os.environ.get("AETHEROPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
NATS = os.environ.get("AETHEROPS_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _alert(now: datetime) -> pb.Alert:
    # A satellite and an unknown subsystem of its own: every alert opens a cluster, so every
    # alert produces exactly one incident event (time alone never correlates).
    key = uuid.uuid4().hex
    alert = pb.Alert(alert_id=key, satellite_id=f"S-{key[:10]}", subsystem=f"x{key[10:16]}", severity=3)
    alert.timestamp.FromDatetime(now)
    return alert


_STORM_SUBSYSTEMS = [
    *("power", "thermal", "propulsion", "adcs", "comms", "payload", "obc", "data"),
    *(f"sensor-{k}" for k in range(8)),
]


def _storm_alert(now: datetime, rng: random.Random, satellites: list[str]) -> pb.Alert:
    # An alert storm: 1,000 satellites x 16 subsystems (8 of the bus, 8 unknown sensor groups),
    # drawn at random. The first alert of a satellite opens or joins its incident, the first of each
    # subsystem adds to it, and repeats within the dedupe window are stored as duplicates. A fault
    # keeps its severity (a repeat at a higher one would be an escalation, kept as a new alert).
    key = uuid.uuid4().hex
    satellite, subsystem = rng.choice(satellites), rng.choice(_STORM_SUBSYSTEMS)
    alert = pb.Alert(
        alert_id=key,
        satellite_id=satellite,
        subsystem=subsystem,
        severity=1 + hash((satellite, subsystem)) % 5,
    )
    alert.timestamp.FromDatetime(now)
    return alert


_SHED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)
"""How an overloaded server refuses a call (grpc-core's pending-request limit; our ingest queue)."""

MIXES = ("new", "storm")
"""`new`: every alert opens an incident (one cluster row and one event per alert, the worst case);
`storm`: an alert flood over 1,000 satellites (see `_storm_alert`; most alerts are duplicates)."""


async def _drained(namespace: str, timeout_s: float = 120.0) -> None:
    """Waits until the relay published everything, so one phase's backlog does not bill the next."""
    conn = await asyncpg.connect(DB)
    try:
        async with asyncio.timeout(timeout_s):
            # Polling another process's progress: there is nothing to await.
            while await conn.fetchval(  # noqa: ASYNC110
                f'SELECT count(*) FROM "{namespace}".outbox WHERE published_time IS NULL'
            ):
                await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _closed_loop(callers: int, seconds: float, call: object, cpu: list[float] | None = None) -> float:
    """Calls per second with `callers` concurrent loops for `seconds`.

    With `cpu=[pid]`, appends the server's CPU microseconds per call: unlike the rate, it does not
    depend on what else the machine is doing.
    """
    pid = int(cpu[0]) if cpu else 0
    cpu_before = _cpu_seconds(pid) if pid else 0.0
    deadline = time.perf_counter() + seconds
    counts = [0] * callers

    async def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            await call()  # type: ignore[operator]
            counts[i] += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(callers)))
    if cpu:
        cpu.append((_cpu_seconds(pid) - cpu_before) / sum(counts) * 1e6)
    return sum(counts) / (time.perf_counter() - start)


async def _streaming(
    stub: correlation_pb2_grpc.CorrelationServiceStub, streams: int, per_stream: int, mix: str, per_message: int
) -> tuple[float, float]:
    """Durable alerts/s over `streams` concurrent IngestAlerts streams, `per_message` alerts per
    message, and the share of them stored as duplicates."""
    now = datetime.now(UTC)
    rng = random.Random(7)
    storm = [f"STORM-{uuid.uuid4().hex[:6]}-{n}" for n in range(1000)]
    batches = []
    for _ in range(streams):
        if mix == "new":
            alerts = [_alert(now) for _ in range(per_stream)]
        else:
            alerts = [_storm_alert(now, rng, storm) for _ in range(per_stream)]
        if per_message == 1:
            batches.append([pb.IngestAlertsRequest(alert=a) for a in alerts])
        else:
            batches.append(
                [pb.IngestAlertsRequest(alerts=alerts[k : k + per_message]) for k in range(0, per_stream, per_message)]
            )
    start = time.perf_counter()
    replies = await asyncio.gather(*(stub.IngestAlerts(iter(b)) for b in batches))
    elapsed = time.perf_counter() - start
    assert all(r.rejected == 0 for r in replies), replies
    stored = sum(r.accepted + r.duplicates for r in replies)
    assert stored == streams * per_stream, stored
    return stored / elapsed, sum(r.duplicates for r in replies) / stored


async def _latency(
    stub: correlation_pb2_grpc.CorrelationServiceStub,
    namespace: str,
    rate: int,
    seconds: float,
    path: str,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[float, float, dict[str, int]]:
    """Alert in -> incident-opened event on NATS, p50/p95 in ms, at a paced `rate` alerts/s, and the
    calls the server refused, by status code.

    `path` "unary": one IngestAlert call per alert; "nats": published on aetherops.alerts.ingest
    (the JetStream path other services use). Every alert opens an incident, so each yields one event.
    A server offered more calls than it can take sheds some: a full ingest queue answers
    RESOURCE_EXHAUSTED, and grpc-core cancels calls once 10,000 wait unaccepted (its pending-request
    limit, `servers.app.server_options`). Those are counted, not timed; any other failure stops the
    benchmark.
    """
    disconnects: list[float] = []  # a core subscription misses what is published while it is away

    async def disconnected() -> None:
        disconnects.append(time.perf_counter())

    nc = await nats.connect(NATS, disconnected_cb=disconnected)
    sent: dict[str, float] = {}
    order: dict[str, int] = {}  # alert id -> its place in the sending order (for a failure's report)
    lags: list[float] = []
    done = asyncio.Event()
    total = int(rate * seconds)
    expected = total  # events to wait for: one per alert the server took

    async def on_event(msg: object) -> None:
        event = events_pb2.Event()
        event.ParseFromString(msg.data)  # type: ignore[attr-defined]
        root = event.incident_opened.incident.root_cause_alert_id
        if root in sent:
            lags.append(time.perf_counter() - sent.pop(root))
            if len(lags) >= expected:
                done.set()

    sub = await nc.subscribe(f"{namespace}.aetherops.incidents.opened", cb=on_event)
    # A round trip, so the server has the subscription before the first alert: nats-py only queues
    # the SUB, and a busy client flushed it after the first event had been published (one of 5,000
    # events "lost" in a full run, right after the streaming phase).
    await nc.flush()
    ingest_subject = f"{namespace}.aetherops.alerts.ingest"
    js = nc.jetstream()
    stored: list[Awaitable[object]] = []  # JetStream's acknowledgements of the published alerts
    pending = []
    start = time.perf_counter()
    for i in range(total):
        # Paced open loop: the i-th alert leaves at start + i/rate, whatever the replies do.
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        alert = _alert(datetime.now(UTC))
        sent[alert.alert_id] = time.perf_counter()
        order[alert.alert_id] = i
        if path == "nats":
            # Acknowledged publishes (awaited after the loop): a plain publish has no guarantee that
            # the stream stored the alert, and a lost one would leave this phase waiting for its event.
            stored.append(await js.publish_async(ingest_subject, alert.SerializeToString()))
        else:
            # Metadata per call, not a client interceptor: at 1,000 calls/s on this machine an
            # interceptor's extra task per call made the client, not the server, the bottleneck
            # (median reply time 0.5 s instead of 0.08 s).
            call = stub.IngestAlert(pb.IngestAlertRequest(alert=alert), metadata=metadata)
            pending.append(asyncio.ensure_future(call))
    await asyncio.wait_for(asyncio.gather(*stored), 30)
    results = await asyncio.gather(*pending, return_exceptions=True)
    refused: dict[str, int] = {}
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError) and r.code() in _SHED:
            refused[r.code().name] = refused.get(r.code().name, 0) + 1
        elif isinstance(r, BaseException):
            raise RuntimeError(f"an IngestAlert call failed: {r!r}")
    expected = total - sum(refused.values())
    if len(lags) >= expected:
        done.set()
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        missing = list(sent)[:5]
        raise RuntimeError(
            f"{path} path: {expected - len(lags)} of {expected} incident events did not arrive within 60 s"
            f" of the last alert (alerts number {[order[k] for k in missing]} of the sending order;"
            f" NATS disconnects of this subscriber: {len(disconnects)}); where they are: "
            + "; ".join(await _whereabouts(namespace, missing))
        ) from None
    finally:
        await sub.unsubscribe()
        await nc.close()
    lags.sort()
    return lags[len(lags) // 2] * 1000, lags[int(len(lags) * 0.95)] * 1000, refused


async def _whereabouts(namespace: str, alert_ids: list[str]) -> list[str]:
    """For a failure's report: each alert's cluster and its outbox events, as stored (ids, when
    written and published; an event published but not received was lost on the way to this
    subscriber, one never published points at the relay)."""
    conn = await asyncpg.connect(DB)
    try:
        out = []
        for alert_id in alert_ids:
            cluster = await conn.fetchval(f'SELECT cluster_id FROM "{namespace}".alerts WHERE alert_id = $1', alert_id)
            events = await conn.fetch(
                f"""SELECT id, subject, created_time, published_time, clock_timestamp() AS now
                    FROM "{namespace}".outbox WHERE aggregate_id = $1 ORDER BY id""",
                cluster,
            )
            out.append(f"{alert_id}: cluster {cluster}, events {[dict(e) for e in events]}")
        return out
    finally:
        await conn.close()


async def _listing(
    stub: correlation_pb2_grpc.CorrelationServiceStub, pid: int, calls: int, metadata: tuple[tuple[str, str], ...]
) -> list[tuple[float, float, str]]:
    """Per view (full, then basic): ms per ListActiveClusters call, server CPU ms per call, and what the
    page showed, with 50 storm incidents of 2,000 alerts each (every alert a subsystem of its own: none
    is a duplicate)."""
    now = datetime.now(UTC)
    storm = f"LIST-{uuid.uuid4().hex[:6]}"
    messages = []
    for i in range(50):
        alerts = [
            pb.Alert(
                alert_id=uuid.uuid4().hex,
                satellite_id=f"{storm}-{i}",
                subsystem=f"unit-{j}",
                severity=3,
                message="bus undervoltage on the primary power bus",
            )
            for j in range(2000)
        ]
        for alert in alerts:
            alert.timestamp.FromDatetime(now)
        messages += [pb.IngestAlertsRequest(alerts=alerts[k : k + 500]) for k in range(0, 2000, 500)]
    reply = await stub.IngestAlerts(iter(messages))
    assert reply.accepted == 100_000, reply
    out = []
    for view in (pb.CLUSTER_VIEW_FULL, pb.CLUSTER_VIEW_BASIC):
        request = pb.ListActiveClustersRequest(page_size=50, view=view)
        cpu_before, start = _cpu_seconds(pid), time.perf_counter()
        for _ in range(calls):
            page = await stub.ListActiveClusters(request, metadata=metadata)
        elapsed, cpu = (time.perf_counter() - start) / calls, (_cpu_seconds(pid) - cpu_before) / calls
        shown = f"{sum(len(c.alerts) for c in page.clusters):,} alerts shown, {page.ByteSize():,} bytes"
        out.append((elapsed * 1000, cpu * 1000, shown))
    return out


async def main() -> None:
    cancel_on_sigterm()
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", type=int, default=96)
    parser.add_argument(
        "--unary-latency-rate",
        type=int,
        default=1000,
        help="alerts/s for the unary latency phase (a machine that cannot serve that many calls queues them)",
    )
    parser.add_argument(
        "--phases", default="unary,stream,latency,list", help="comma-separated subset of unary,stream,latency,list"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    runs = 1 if args.quick else args.runs
    streams, per_stream = (2, 2_000) if args.quick else (4, 25_000)
    latency_seconds = 1.0 if args.quick else 5.0
    phases = set(args.phases.split(","))

    namespace = "bench" + uuid.uuid4().hex[:8]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_token_file(Path(tmp) / "tokens.json", {"bench": ["admin"]})
        env = {
            **os.environ,
            "AETHEROPS_DATABASE_URL": DB,
            "AETHEROPS_NATS_URL": NATS,
            "AETHEROPS_DB_SCHEMA": namespace,
            "AETHEROPS_NAMESPACE": namespace,
            "AETHEROPS_PORT": str(port),
            "AETHEROPS_METRICS_PORT": "-1",
            "AETHEROPS_SERVICES": "correlation",
            "AETHEROPS_AUTH_TOKENS_FILE": str(Path(tmp) / "tokens.json"),
            "AETHEROPS_RATE_LIMIT_BURST": "1000000",
            "AETHEROPS_RATE_LIMIT_PER_S": "1000000",
            "AETHEROPS_LOG_LEVEL": os.environ.get("BENCH_SERVER_LOG_LEVEL", "WARNING"),
            "AETHEROPS_DATA_DIR": tmp,
        }
        # BENCH_SERVER_LOG=path keeps the server's log (with BENCH_SERVER_LOG_LEVEL=INFO, one line per RPC).
        server_log = Path(os.environ.get("BENCH_SERVER_LOG", os.devnull)).open("w")  # noqa: ASYNC230
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "serve", env=env, stderr=server_log
        )
        metadata = (("authorization", f"Bearer {tokens['bench']}"),)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                async with asyncio.timeout(60):
                    while True:
                        try:
                            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                                break
                        except grpc.aio.AioRpcError:
                            pass
                        await asyncio.sleep(0.1)  # waiting for another process to come up
                stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
                check = health_pb2.HealthCheckRequest(service="aetherops.correlation.v1.CorrelationService")
                now = datetime.now(UTC)

                async def health_call() -> None:
                    await health.Check(check)

                rng = random.Random(11)
                storm = [f"STORM-{uuid.uuid4().hex[:6]}-{n}" for n in range(1000)]

                pair = pb.ScoreAlertsRequest(first=_alert(now), second=_alert(now))

                async def score_call() -> None:
                    await stub.ScoreAlerts(pair, metadata=metadata)

                def ingest_call(mix: str) -> Callable[[], Awaitable[None]]:
                    async def call() -> None:
                        alert = _alert(now) if mix == "new" else _storm_alert(now, rng, storm)
                        await stub.IngestAlert(pb.IngestAlertRequest(alert=alert), metadata=metadata)

                    return call

                health_rates: list[float] = []
                latencies: dict[tuple[str, int], list[tuple[float, float]]] = {}
                refused: dict[str, int] = {}  # unary latency calls the server shed, over all runs
                ingest_rates: dict[str, list[float]] = {}
                ratios: dict[str, list[float]] = {}
                cpu_per_call: dict[str, list[tuple[float, float]]] = {}
                stream_rates: dict[tuple[str, int], list[float]] = {}
                listing: list[tuple[float, float, str]] = []
                dup_shares: dict[str, float] = {}
                for _ in range(runs if "unary" in phases else 0):
                    for mix in MIXES:
                        # Health and ingest back to back, so each ratio is measured in one stretch.
                        await _drained(namespace)
                        health_cpu: list[float] = [server.pid]
                        ingest_cpu: list[float] = [server.pid]
                        h = await _closed_loop(args.callers, seconds, health_call, health_cpu)
                        i = await _closed_loop(args.callers, seconds, ingest_call(mix), ingest_cpu)
                        cpu_per_call.setdefault(mix, []).append((health_cpu[1], ingest_cpu[1]))
                        health_rates.append(h)
                        ingest_rates.setdefault(mix, []).append(i)
                        ratios.setdefault(mix, []).append(i / h)
                    await _drained(namespace)
                    health_cpu, score_cpu = [server.pid], [server.pid]
                    h = await _closed_loop(args.callers, seconds, health_call, health_cpu)
                    s = await _closed_loop(args.callers, seconds, score_call, score_cpu)
                    cpu_per_call.setdefault("score", []).append((health_cpu[1], score_cpu[1]))
                    ratios.setdefault("score", []).append(s / h)

                class _Authed(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
                    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
                        return await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), requests)

                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[_Authed()]) as authed:
                    bulk = correlation_pb2_grpc.CorrelationServiceStub(authed)
                    for mix in MIXES if "stream" in phases else ():
                        for per_message in (1, 500):
                            for _ in range(runs):
                                await _drained(namespace)
                                rate, dup_share = await _streaming(bulk, streams, per_stream, mix, per_message)
                                stream_rates.setdefault((mix, per_message), []).append(rate)
                                dup_shares[mix] = dup_share
                    if "list" in phases:
                        await _drained(namespace)
                        listing = await _listing(bulk, server.pid, 2 if args.quick else 5, metadata)

                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                    paced = correlation_pb2_grpc.CorrelationServiceStub(plain)
                    for path, rate in (("nats", 1000), ("unary", args.unary_latency_rate)):
                        for _ in range(runs if "latency" in phases else 0):
                            await _drained(namespace)
                            p50, p95, shed = await _latency(paced, namespace, rate, latency_seconds, path, metadata)
                            latencies.setdefault((path, rate), []).append((p50, p95))
                            for code, count in shed.items():
                                refused[code] = refused.get(code, 0) + count
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)
            conn = await asyncpg.connect(DB)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
            await conn.close()
            nc = await nats.connect(NATS)
            js = nc.jetstream()
            for name in ("INCIDENTS", "RUNBOOK", "CAPACITY", "ALERTS", "TELEMETRY"):
                try:
                    await js.delete_stream(f"{namespace.upper()}_{name}")
                except Exception:
                    pass
            await nc.close()
            server_log.close()

    med = statistics.median
    print(f"runs: {runs}, callers: {args.callers}")
    if health_rates:
        print(f"health Check (empty-RPC baseline): {med(health_rates):,.0f} calls/s")
    for mix, rates in ingest_rates.items():
        per_run = [round(r, 2) for r in ratios[mix]]
        health_us, ingest_us = med(c[0] for c in cpu_per_call[mix]), med(c[1] for c in cpu_per_call[mix])
        print(
            f"IngestAlert, mix {mix:5}: {med(rates):,.0f} alerts/s durable; ratio to health {med(ratios[mix]):.2f}"
            f" (target >= 0.6; per run {per_run}); server CPU per call {ingest_us:.0f} us vs health {health_us:.0f} us"
        )
    if "score" in ratios:
        health_us, score_us = med(c[0] for c in cpu_per_call["score"]), med(c[1] for c in cpu_per_call["score"])
        print(
            f"ScoreAlerts (authenticated, stores nothing): ratio to health {med(ratios['score']):.2f}"
            f" (no target; per run {[round(r, 2) for r in ratios['score']]}); server CPU per call {score_us:.0f} us"
            f" vs health {health_us:.0f} us"
        )
    for (mix, per_message), rates in stream_rates.items():
        print(
            f"IngestAlerts streaming, mix {mix:5} ({dup_shares[mix]:.0%} duplicates), {per_message:3} alert(s)/message"
            f" ({streams} streams x {per_stream}): {med(rates):,.0f} durable alerts/s"
            f"  (target >= 30,000; per run {[round(r) for r in rates]})"
        )
    for (path, rate), figures in latencies.items():
        how = "published on aetherops.alerts.ingest" if path == "nats" else "one IngestAlert call each"
        print(
            f"alert -> incident event on NATS at {rate:,} alerts/s ({how}): p50 {med(f[0] for f in figures):.1f} ms,"
            f" p95 {med(f[1] for f in figures):.1f} ms  (target p95 <= 50 ms at 1,000 alerts/s)"
        )
    for view, (ms, cpu_ms, shown) in zip(("full", "basic"), listing, strict=False):
        print(
            f"ListActiveClusters (page of 50, {view} view) over 50 storm incidents of 2,000 alerts: {ms:.0f} ms"
            f" per call, server CPU {cpu_ms:.0f} ms per call ({shown})"
        )
    if refused:
        total = runs * int(args.unary_latency_rate * latency_seconds)
        print(f"  unary calls shed by the overloaded server: {refused} of {total} (not timed; see _latency)")


if __name__ == "__main__":
    asyncio.run(main())
