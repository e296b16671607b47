"""`aetherops serve` as an operator runs it: a process of its own, stopped by a signal."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aetherops.auth import write_token_file
from aetherops.infra import free_port
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.correlation.v1 import correlation_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


async def _wait_serving(port: int, proc: asyncio.subprocess.Process, timeout_s: float = 60.0) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, asyncio.timeout(timeout_s):
        health = health_pb2_grpc.HealthStub(channel)
        while proc.returncode is None:
            try:
                reply = await health.Check(request, timeout=1, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)  # polling another process's health: nothing of ours to await
    raise AssertionError(f"aetherops serve exited with {proc.returncode} before serving")


async def test_ctrl_c_stops_serve_before_its_embedded_nats(pg_url: str, schema: str, tmp_path: Path) -> None:
    port = free_port()
    token = write_token_file(tmp_path / "tokens.json", {"test": ["admin"]})["test"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHEROPS_")}
    env.update(
        AETHEROPS_DATABASE_URL=pg_url,  # PostgreSQL from the suite; NATS embedded (no URL)
        AETHEROPS_DB_SCHEMA=schema,
        AETHEROPS_NAMESPACE=schema,
        AETHEROPS_PORT=str(port),
        AETHEROPS_METRICS_PORT="-1",
        AETHEROPS_SERVICES="correlation",
        AETHEROPS_AUTH_TOKENS_FILE=str(tmp_path / "tokens.json"),
        AETHEROPS_DATA_DIR=str(tmp_path / "data"),
        AETHEROPS_SHUTDOWN_GRACE_S="1",
    )
    # A process group of its own, as a shell gives a foreground job.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli",
        "serve",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        await _wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
            auth = (("authorization", f"Bearer {token}"),)
            # A watcher still open holds the shutdown for the whole grace period: the time in
            # which NATS must still be there.
            watch = stub.WatchClusters(pb.WatchClustersRequest(), metadata=auth)
            alert = pb.Alert(alert_id="ctrl-c-1", satellite_id="SAT-1", subsystem="power", severity=4)
            alert.timestamp.FromDatetime(datetime.now(UTC))
            await stub.IngestAlert(pb.IngestAlertRequest(alert=alert), metadata=auth)
            event = await asyncio.wait_for(watch.read(), timeout=30)
            assert list(event.cluster.satellite_ids) == ["SAT-1"]
            # What Ctrl-C in a terminal does: SIGINT to every process of the foreground group.
            os.killpg(proc.pid, signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            watch.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()  # aetherops stops the NATS it started
            await proc.wait()
    log = err.decode()
    assert proc.returncode == 0, log
    assert "embedded NATS running" in log
    assert "aetherops: stopped in" in log
    # NATS outlived the graceful shutdown: the bus never lost its server.
    assert "NATS disconnected" not in log, log


async def test_a_port_in_use_is_said_plainly(pg_url: str, schema: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHEROPS_")}
        env.update(
            AETHEROPS_DATABASE_URL=pg_url,
            AETHEROPS_DB_SCHEMA=schema,
            AETHEROPS_NAMESPACE=schema,
            AETHEROPS_PORT=str(port),
            AETHEROPS_METRICS_PORT="-1",
            AETHEROPS_SERVICES="correlation",
            AETHEROPS_NATS_URL="nats://127.0.0.1:1",  # never reached: listening comes first
            AETHEROPS_DATA_DIR=str(tmp_path / "data"),
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "serve", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    log = err.decode()
    assert proc.returncode == 1, log
    assert f"aetherops: cannot listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log


async def test_a_start_up_that_cannot_finish_says_why_and_exits(pg_url: str, schema: str, tmp_path: Path) -> None:
    # A failure bring-up does not retry (here the migrations meet a table they cannot read; an
    # embedded PostgreSQL that cannot start is another) left the server "starting" for ever, silent.
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".schema_migrations (x int)')
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHEROPS_")}
        env.update(
            AETHEROPS_DATABASE_URL=pg_url,
            AETHEROPS_DB_SCHEMA=schema,
            AETHEROPS_NAMESPACE=schema,
            AETHEROPS_PORT=str(free_port()),
            AETHEROPS_METRICS_PORT="-1",
            AETHEROPS_SERVICES="correlation",
            AETHEROPS_NATS_URL=os.environ.get("AETHEROPS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
            AETHEROPS_DATA_DIR=str(tmp_path / "data"),
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "serve", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        finally:
            if proc.returncode is None:  # it hung: do not leave it running after the test
                proc.kill()
                await proc.wait()
    finally:
        await conn.close()
    log = err.decode()
    assert proc.returncode == 1, log
    assert "aetherops: start-up failed: " in log and "column" in log
    assert log.count("UndefinedColumnError") == 1  # logged once, with its traceback
