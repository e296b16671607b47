"""Fixtures over real PostgreSQL and NATS.

AETHEROPS_TEST_DATABASE_URL / AETHEROPS_TEST_NATS_URL name running servers (CI
sets them); without them the suite starts an embedded PostgreSQL and NATS once
per session. Each test gets its own schema and its own NATS namespace, so tests
never see each other's rows, streams or subjects.

Servers require authentication: each test gets a token file with one principal per role
(TEST_PRINCIPALS). The `channel` fixture is authenticated as "admin"; `channel_for(principal, port)`
opens channels as anyone else (four-eyes tests need an operator and a different approver).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from aetherops.auth import write_token_file
from aetherops.bus import Bus
from aetherops.clock import Clock, SystemClock
from aetherops.config import Settings
from aetherops.db import Database, apply_migrations
from aetherops.infra import EmbeddedNats, EmbeddedPostgres

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

TEST_PRINCIPALS: dict[str, list[str]] = {
    "admin": ["admin"],
    "operator": ["operator"],
    "operator2": ["operator"],
    "approver": ["approver"],
    "approver2": ["approver"],
    "viewer": ["viewer"],
}
"""Principal -> roles in every test's token file; each principal's name is its tokens[] key."""


class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {self._token}")
        return details._replace(metadata=metadata)


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Iterable[Any]) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Iterable[Any]) -> Any:
        return await continuation(self._details(details), requests)


def authed_channel(target: str, token: str) -> grpc.aio.Channel:
    """A plaintext channel that authenticates every call with `token`.

    One interceptor object per call shape: grpc.aio files each interceptor under the first
    shape it implements only, so one class implementing all four would miss streaming calls.
    """
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return grpc.aio.insecure_channel(target, interceptors=[kind(token) for kind in kinds])


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("AETHEROPS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("AETHEROPS_TEST_NATS_URL")
    if url:
        yield url
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    yield server.start()
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def schema(pg_url: str, namespace: str) -> AsyncIterator[str]:
    yield namespace
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def db(pg_url: str, schema: str) -> AsyncIterator[Database]:
    database = await Database.connect(pg_url, schema)
    await apply_migrations(database)
    yield database
    await database.close()


async def _delete_streams(url: str, namespace: str) -> None:
    bus = await Bus.connect(url, namespace)
    try:
        for spec in bus.subjects.streams():
            try:
                await bus.js.delete_stream(spec.name)
            except Exception:
                pass  # never created by this test
    finally:
        await bus.close()


@pytest.fixture
async def streams_cleanup(nats_url: str, namespace: str) -> AsyncIterator[None]:
    """Deletes the test namespace's JetStream streams after everything that used them has stopped
    (the tests share the machine's NATS: streams left behind pile up from run to run)."""
    yield
    await _delete_streams(nats_url, namespace)


@pytest.fixture
async def bus(nats_url: str, namespace: str, streams_cleanup: None) -> AsyncIterator[Bus]:
    connection = await Bus.connect(nats_url, namespace)
    await connection.ensure_streams()
    yield connection
    await connection.close()


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    """Principal -> plaintext token for TEST_PRINCIPALS; the server reads only their hashes."""
    return write_token_file(tmp_path / "auth_tokens.json", TEST_PRINCIPALS)


@pytest.fixture
def settings(
    pg_url: str,
    nats_url: str,
    namespace: str,
    schema: str,
    tmp_path: Path,
    tokens: dict[str, str],
    streams_cleanup: None,
) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        database_url=pg_url,
        nats_url=nats_url,
        db_schema=schema,
        namespace=namespace,
        data_dir=tmp_path,
        shutdown_grace_s=2.0,
        metrics_port=0,
        auth_tokens_file=str(tmp_path / "auth_tokens.json"),
    )


@pytest.fixture
async def app_factory(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Starts servers (grpc.aio, port 0) sharing this test's schema and namespace; stops them all after.
    `clock` (default: the system's) is the servers' time, for a test that needs time to pass."""
    from servers.app import Application

    apps: list[Application] = []

    async def start(clock: Clock | None = None, **changes: Any) -> Application:
        app = Application(settings.with_overrides(**changes) if changes else settings, clock=clock or SystemClock())
        apps.append(app)
        await app.start()
        await app.wait_ready()
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def server(app_factory: Callable[..., Any]) -> Any:
    return await app_factory()


@pytest.fixture
async def channel(server: Any, tokens: dict[str, str]) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `server` authenticated as "admin"."""
    async with authed_channel(f"127.0.0.1:{server.port}", tokens["admin"]) as chan:
        yield chan


@pytest.fixture
async def channel_for(tokens: dict[str, str]) -> AsyncIterator[Callable[[str, int], grpc.aio.Channel]]:
    """`channel_for("approver", server.port)`: a channel authenticated as that principal; closed after the test."""
    opened: list[grpc.aio.Channel] = []

    def make(principal: str, port: int) -> grpc.aio.Channel:
        chan = authed_channel(f"127.0.0.1:{port}", tokens[principal])
        opened.append(chan)
        return chan

    yield make
    for chan in opened:
        await chan.close()
