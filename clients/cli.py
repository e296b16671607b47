"""The `aetherops` command line: `aetherops serve` runs the system.

Settings come from AETHEROPS_* variables; flags override them. Exit codes:
0 after a clean shutdown, 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from aetherops.config import Settings
from aetherops.errors import ConfigError
from aetherops.logs import configure_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aetherops", description="Operations backbone for a satellite fleet."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the gRPC services (embedded PostgreSQL and NATS unless URLs are set)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--services", help="comma-separated subset of correlation,runbook,capacity")
    serve.add_argument("--data-dir", type=Path, help="where embedded PostgreSQL and NATS keep data")
    serve.add_argument("--database-url", help="PostgreSQL DSN (default: embedded)")
    serve.add_argument("--nats-url", help="NATS URL (default: embedded)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    check = sub.add_parser("health", help="gRPC health check; exit 0 when SERVING (container health checks)")
    check.add_argument("--address", default="127.0.0.1:50051")
    check.add_argument("--service", default="", help="a service name; empty = the whole server")
    check.add_argument("--timeout", type=float, default=3.0)
    return parser


async def _health(address: str, service: str, timeout_s: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            print(f"{address}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _settings(args: argparse.Namespace) -> Settings:
    services = tuple(s.strip() for s in args.services.split(",") if s.strip()) if args.services else None
    return Settings.from_env(
        host=args.host,
        port=args.port,
        services=services,
        data_dir=args.data_dir,
        database_url=args.database_url,
        nats_url=args.nats_url,
        log_level=args.log_level,
    )


async def _serve(settings: Settings) -> int:
    from servers.app import Application

    started = time.monotonic()
    app = Application(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await app.start()
    print(
        f"aetherops: listening on {settings.host}:{port}; bringing up dependencies",
        file=sys.stderr,
        flush=True,
    )
    ready = asyncio.create_task(app.ready.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print(
            f"aetherops: serving {','.join(settings.services)} on {settings.host}:{port} "
            f"(ready in {time.monotonic() - started:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    await stopping
    ready.cancel()
    t0 = time.monotonic()
    await app.stop()
    print(f"aetherops: stopped in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    # The embedded servers are child processes started after gRPC is running; gRPC's fork
    # handlers are not needed for that (we exec at once) and only print warnings.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = _settings(args)
        except ConfigError as exc:
            print(f"aetherops: invalid setting: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level)
        return asyncio.run(_serve(settings))
    if args.command == "health":
        return asyncio.run(_health(args.address, args.service, args.timeout))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
