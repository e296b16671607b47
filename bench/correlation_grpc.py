"""Correlation over gRPC against `aetherops serve` with real PostgreSQL and NATS.

Prints, as medians over --runs:
  * IngestAlert from --callers concurrent callers, and the same server's health Check as the
    empty-RPC baseline, with their ratio (target >= 0.6);
  * IngestAlerts client streaming: durable alerts/s (the reply comes after the commit; target >= 30,000);
  * alert in -> incident event on NATS at a paced 1,000 alerts/s: p50/p95 (target p95 <= 50 ms).

Uses AETHEROPS_TEST_DATABASE_URL / AETHEROPS_TEST_NATS_URL (defaults: the local services) with a
throwaway schema and namespace. `--quick` shrinks every phase to a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import nats
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


async def _closed_loop(callers: int, seconds: float, call: object) -> float:
    """Calls per second with `callers` concurrent loops for `seconds`."""
    deadline = time.perf_counter() + seconds
    counts = [0] * callers

    async def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            await call()  # type: ignore[operator]
            counts[i] += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(callers)))
    return sum(counts) / (time.perf_counter() - start)


async def _streaming(stub: correlation_pb2_grpc.CorrelationServiceStub, streams: int, per_stream: int) -> float:
    now = datetime.now(UTC)
    batches = [[pb.IngestAlertsRequest(alert=_alert(now)) for _ in range(per_stream)] for _ in range(streams)]
    start = time.perf_counter()
    replies = await asyncio.gather(*(stub.IngestAlerts(iter(b)) for b in batches))
    elapsed = time.perf_counter() - start
    assert all(r.rejected == 0 for r in replies), replies
    return sum(r.accepted for r in replies) / elapsed


async def _latency(
    stub: correlation_pb2_grpc.CorrelationServiceStub, namespace: str, rate: int, seconds: float
) -> tuple[float, float]:
    nc = await nats.connect(NATS)
    sent: dict[str, float] = {}
    lags: list[float] = []
    done = asyncio.Event()
    total = int(rate * seconds)

    async def on_event(msg: object) -> None:
        event = events_pb2.Event()
        event.ParseFromString(msg.data)  # type: ignore[attr-defined]
        root = event.incident_opened.incident.root_cause_alert_id
        if root in sent:
            lags.append(time.perf_counter() - sent.pop(root))
            if len(lags) >= total:
                done.set()

    sub = await nc.subscribe(f"{namespace}.aetherops.incidents.opened", cb=on_event)
    pending = []
    start = time.perf_counter()
    for i in range(total):
        # Paced open loop: the i-th alert leaves at start + i/rate, whatever the replies do.
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        alert = _alert(datetime.now(UTC))
        sent[alert.alert_id] = time.perf_counter()
        pending.append(asyncio.ensure_future(stub.IngestAlert(pb.IngestAlertRequest(alert=alert))))
    await asyncio.gather(*pending)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
        await nc.close()
    lags.sort()
    return lags[len(lags) // 2] * 1000, lags[int(len(lags) * 0.95)] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", type=int, default=96)
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    runs = 1 if args.quick else args.runs
    streams, per_stream = (2, 2_000) if args.quick else (4, 25_000)
    latency_seconds = 1.0 if args.quick else 5.0

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
            "AETHEROPS_LOG_LEVEL": "WARNING",
            "AETHEROPS_DATA_DIR": tmp,
        }
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
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

                async def ingest_call() -> None:
                    await stub.IngestAlert(pb.IngestAlertRequest(alert=_alert(now)), metadata=metadata)

                health_rates, ingest_rates, ratios, stream_rates, p50s, p95s = [], [], [], [], [], []
                for _ in range(runs):
                    h = await _closed_loop(args.callers, seconds, health_call)
                    i = await _closed_loop(args.callers, seconds, ingest_call)
                    health_rates.append(h)
                    ingest_rates.append(i)
                    ratios.append(i / h)

                class _Authed(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
                    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
                        return await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), requests)

                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[_Authed()]) as authed:
                    bulk = correlation_pb2_grpc.CorrelationServiceStub(authed)
                    for _ in range(runs):
                        stream_rates.append(await _streaming(bulk, streams, per_stream))

                class _AuthedUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
                    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
                        return await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)

                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[_AuthedUnary()]) as authed:
                    paced = correlation_pb2_grpc.CorrelationServiceStub(authed)
                    for _ in range(runs):
                        p50, p95 = await _latency(paced, namespace, 1000, latency_seconds)
                        p50s.append(p50)
                        p95s.append(p95)
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

    med = statistics.median
    print(f"runs: {runs}, callers: {args.callers}")
    print(f"health Check (empty-RPC baseline): {med(health_rates):,.0f} calls/s")
    print(f"IngestAlert (durable, committed):  {med(ingest_rates):,.0f} alerts/s")
    per_run = [round(r, 2) for r in ratios]
    print(f"ratio IngestAlert / health:        {med(ratios):.2f}  (target >= 0.6; per run {per_run})")
    print(
        f"IngestAlerts streaming ({streams} streams x {per_stream}): {med(stream_rates):,.0f} durable alerts/s"
        "  (target >= 30,000)"
    )
    print(
        f"alert -> incident event on NATS at 1,000 alerts/s: p50 {med(p50s):.1f} ms, p95 {med(p95s):.1f} ms"
        "  (target p95 <= 50 ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
