"""The Redis-shared token bucket on a real Redis: atomic under concurrency, same arithmetic as the
pure TokenBucket, and an in-process fallback while Redis is away, reported by a real server's health.

Redis: AETHEROPS_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Each test uses its own key
prefix (a server: its namespace) and deletes its keys afterwards. Redis is taken away and brought
back through a TCP proxy the test cuts and restores; Redis itself is always the real one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from _poll import eventually
from _proxy import TcpProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aetherops.clock import ManualClock
from aetherops.errors import ConfigError
from aetherops.ratelimit import REDIS_KEY_PREFIX, TokenBucket
from aetherops.ratelimit_redis import RedisTokenBucket
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc
from servers.app import RATE_LIMIT_HEALTH_SERVICE

REDIS_URL = os.environ.get("AETHEROPS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
BUSINESS_SERVICES = (
    "aetherops.correlation.v1.CorrelationService",
    "aetherops.runbook.v1.RunbookService",
    "aetherops.capacity.v1.CapacityService",
)


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        await connection.ping()
    except redis.ConnectionError:
        await connection.aclose()
        pytest.fail(f"no Redis at {REDIS_URL} (set AETHEROPS_TEST_REDIS_URL)")
    yield connection
    await connection.aclose()


@pytest.fixture
async def prefix(client: redis.Redis) -> AsyncIterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}:"
    yield name
    keys = [key async for key in client.scan_iter(match=f"{REDIS_KEY_PREFIX}{name}*")]
    if keys:
        await client.delete(*keys)


def _closed_port() -> int:
    """A port nothing listens on (bound, then released, so connecting is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_concurrent_callers_on_two_limiters_never_exceed_the_burst(client: redis.Redis, prefix: str) -> None:
    # A refill of one token per ~3 hours: within the test, the burst is all there is.
    limiters = [
        RedisTokenBucket.from_url(REDIS_URL, 25, 1e-4, key_prefix=prefix),
        RedisTokenBucket.from_url(REDIS_URL, 25, 1e-4, key_prefix=prefix),
    ]
    try:
        decisions = await asyncio.gather(*(limiters[i % 2].try_acquire("alice|correlation") for i in range(200)))
        assert sum(d.allowed for d in decisions) == 25
        assert all(d.retry_after_s > 0 for d in decisions if not d.allowed)
        assert not any(limiter.degraded for limiter in limiters)
        # Another key has its own bucket.
        assert (await limiters[1].try_acquire("bob|correlation")).allowed
        assert await client.exists(f"{REDIS_KEY_PREFIX}{prefix}alice|correlation") == 1
    finally:
        for limiter in limiters:
            await limiter.close()


async def test_lua_script_agrees_with_the_pure_bucket(client: redis.Redis, prefix: str) -> None:
    clock = ManualClock()
    shared = RedisTokenBucket(client, 5, 2.0, key_prefix=prefix, clock=clock)
    pure = TokenBucket(5, 2.0, clock)
    # (seconds to advance, cost): drain, refuse, partial refills, a long idle, a cost above the burst.
    steps = [(0.0, 1.0), (0, 3), (0, 2), (0.25, 1), (0.5, 1), (0, 0.5), (10, 5), (0, 6), (1.3, 2)]
    for advance, cost in steps:
        clock.advance(advance)
        got = await shared.try_acquire("k|svc", cost)
        want = pure.try_acquire("k|svc", cost)
        assert got.allowed == want.allowed, (advance, cost)
        assert got.remaining == pytest.approx(want.remaining, abs=1e-9)
        assert got.retry_after_s == pytest.approx(want.retry_after_s, abs=1e-9)
        assert got.limit == want.limit == 5
    assert not shared.degraded


async def test_adaptive_factor_charges_cost_over_factor(client: redis.Redis, prefix: str) -> None:
    factor = 1.0
    limiter = RedisTokenBucket(client, 4, 1e-4, key_prefix=prefix, factor=lambda: factor, clock=ManualClock())
    assert (await limiter.try_acquire("k|svc")).remaining == pytest.approx(3)
    factor = 0.5  # tightened: each call costs two tokens, reported against a limit of 2
    decision = await limiter.try_acquire("k|svc")
    assert decision.allowed and decision.limit == pytest.approx(2) and decision.remaining == pytest.approx(0.5)
    assert not (await limiter.try_acquire("k|svc")).allowed


async def test_falls_back_in_process_when_redis_is_away(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    limiter = RedisTokenBucket.from_url(
        f"redis://:hunter2@127.0.0.1:{_closed_port()}/0", 2, 1.0, clock=clock, retry_interval_s=0
    )
    try:
        with caplog.at_level(logging.WARNING, logger="aetherops.ratelimit"):
            decisions = [await limiter.try_acquire("k|svc") for _ in range(3)]
        assert limiter.degraded
        assert [d.allowed for d in decisions] == [True, True, False]  # the in-process bucket decided
        assert decisions[2].retry_after_s == pytest.approx(1.0)
        assert limiter.fallback.tokens("k|svc") == pytest.approx(0)
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1, "one log line per change of state, not per call"
        assert "hunter2" not in caplog.text
    finally:
        await limiter.close()


async def test_degraded_and_back_when_redis_returns(client: redis.Redis, prefix: str) -> None:
    parsed: Any = client.connection_pool.connection_kwargs
    proxy = TcpProxy(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379))
    await proxy.start()
    db = parsed.get("db", 0)
    limiter = RedisTokenBucket.from_url(
        f"redis://127.0.0.1:{proxy.port}/{db}", 3, 1e-4, key_prefix=prefix, retry_interval_s=0
    )
    try:
        assert (await limiter.try_acquire("k|svc")).remaining == pytest.approx(2, abs=1e-3)
        assert not limiter.degraded
        await proxy.cut()
        assert (await limiter.try_acquire("k|svc")).allowed  # the in-process bucket, full
        assert limiter.degraded
        await proxy.start()  # same port
        decision = await limiter.try_acquire("k|svc")
        assert not limiter.degraded
        assert decision.remaining == pytest.approx(1, abs=1e-3)  # Redis's state survived the outage
    finally:
        await limiter.close()
        await proxy.cut()


def test_sizes_are_validated_before_any_io() -> None:
    with pytest.raises(ConfigError, match="burst_capacity"):
        RedisTokenBucket.from_url(REDIS_URL, 0, 1.0)


async def _health_cli(port: int) -> tuple[int, str]:
    """`aetherops health --service aetherops.ratelimit`, as an operator (or an orchestrator) runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli",
        "health",
        "--address",
        f"127.0.0.1:{port}",
        "--service",
        RATE_LIMIT_HEALTH_SERVICE,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip()


async def test_server_health_reports_redis_loss_and_recovery_while_calls_go_on(
    app_factory: Any, channel_for: Any, client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    parsed: Any = client.connection_pool.connection_kwargs
    proxy = TcpProxy(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379))
    await proxy.start()
    # Three calls per principal and service, refilled at one per 100 s: within the test, the burst is all.
    redis_url = f"redis://127.0.0.1:{proxy.port}/{parsed.get('db', 0)}"
    try:
        with caplog.at_level(logging.WARNING, logger="aetherops.ratelimit"):
            app = await app_factory(redis_url=redis_url, rate_limit_burst=3, rate_limit_per_s=0.01)
            channel = channel_for("viewer", app.port)
            health = health_pb2_grpc.HealthStub(channel)
            correlation = correlation_pb2_grpc.CorrelationServiceStub(channel)

            async def status(service: str) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return int(reply.status)

            async def calls(n: int) -> list[grpc.StatusCode]:
                codes = []
                for _ in range(n):
                    try:
                        await correlation.ListActiveClusters(correlation_pb2.ListActiveClustersRequest(), timeout=5)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                return codes

            async def limits_are(want: int) -> bool:
                return await status(RATE_LIMIT_HEALTH_SERVICE) == want

            ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
            await eventually(lambda: limits_are(SERVING), what="rate limits SERVING")
            assert await calls(4) == [ok, ok, ok, exhausted]
            key = f"{REDIS_KEY_PREFIX}{namespace}:viewer|{BUSINESS_SERVICES[0]}"
            assert await client.exists(key) == 1, "the bucket lives in Redis, under the server's namespace"

            await proxy.cut()
            await eventually(lambda: limits_are(NOT_SERVING), what="rate limits NOT_SERVING after Redis went away")
            for service in ("", *BUSINESS_SERVICES):
                assert await status(service) == SERVING, service
            # Calls go on, limited by this process's own bucket (full at first: it never saw the calls above).
            assert await calls(4) == [ok, ok, ok, exhausted]
            assert await _health_cli(app.port) == (1, "NOT_SERVING")

            await proxy.start()  # same port
            await eventually(lambda: limits_are(SERVING), what="rate limits SERVING after Redis came back")
            # Shared again: Redis's bucket for this principal is still empty.
            assert await calls(1) == [exhausted]
            assert await _health_cli(app.port) == (0, "SERVING")
        lost = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        back = [r for r in caplog.records if "Redis reachable again" in r.getMessage()]
        assert (len(lost), len(back)) == (1, 1), "one log line per change of state, not per call or probe"
    finally:
        await proxy.cut()
        keys = [k async for k in client.scan_iter(match=f"{REDIS_KEY_PREFIX}{namespace}:*")]
        if keys:
            await client.delete(*keys)


async def test_no_rate_limit_health_without_redis(server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=RATE_LIMIT_HEALTH_SERVICE), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
