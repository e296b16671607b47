"""Fixtures over real PostgreSQL and NATS.

AETHEROPS_TEST_DATABASE_URL / AETHEROPS_TEST_NATS_URL name running servers (CI
sets them); without them the suite starts an embedded PostgreSQL and NATS once
per session. Each test gets its own schema and its own NATS namespace, so tests
never see each other's rows, streams or subjects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from aetherops.bus import Bus
from aetherops.config import Settings
from aetherops.db import Database, apply_migrations
from aetherops.infra import EmbeddedNats, EmbeddedPostgres

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")


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
async def bus(nats_url: str, namespace: str) -> AsyncIterator[Bus]:
    connection = await Bus.connect(nats_url, namespace)
    await connection.ensure_streams()
    yield connection
    await connection.close()
    await _delete_streams(nats_url, namespace)


@pytest.fixture
def settings(pg_url: str, nats_url: str, namespace: str, schema: str, tmp_path: Path) -> Settings:
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
    )


@pytest.fixture
async def app_factory(settings: Settings, nats_url: str, namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """Starts servers (grpc.aio, port 0) sharing this test's schema and namespace; stops them all after."""
    from servers.app import Application

    apps: list[Application] = []

    async def start(**changes: Any) -> Application:
        app = Application(settings.with_overrides(**changes) if changes else settings)
        apps.append(app)
        await app.start()
        await app.wait_ready()
        return app

    yield start
    for app in apps:
        await app.stop()
    await _delete_streams(nats_url, namespace)


@pytest.fixture
async def server(app_factory: Callable[..., Any]) -> Any:
    return await app_factory()


@pytest.fixture
async def channel(server: Any) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan
