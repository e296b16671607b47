"""The asyncpg connection pool, bound to one schema, and its error translation (an unreachable
server, or one that cannot finish a transaction for now, is UnavailableError; text it cannot store
is ValidationError).

Every connection's search_path is the configured schema, so SQL names tables
unqualified and tests isolate themselves with a schema each.

Pooled connections carry no session state from one user to the next: nothing
takes a session advisory lock, LISTENs or SETs a session setting on one. (The one
exception is meant to outlive its user: the capacity repository's temp load table,
emptied at every commit, which asyncpg's reset would not drop either.) What needs
session state (the outbox relay's leader lock, the migration lock) takes a
`Database.dedicated` connection, which is closed afterwards. That is why a
connection going back to the pool is not reset with a query: asyncpg's default
reset (unlock all advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL) is one more
round trip on every release, and the correlation service releases a connection
per group commit. An open transaction is still rolled back on release.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from aetherops.errors import UnavailableError, ValidationError
from aetherops.text import NUL_PROBLEM

__all__ = ["Connection", "Database"]

Connection = asyncpg.Connection

_COMMAND_TIMEOUT_S = 60.0


def _server_settings(schema: str) -> dict[str, str]:
    return {"search_path": schema, "application_name": "aetherops"}


# Acquiring may open a new connection: refused, timed out, or the server is starting or stopping.
_CANNOT_CONNECT = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
# Raised by a statement on a connection that went away. Deliberately not OSError: a NATS error
# raised inside a transaction block (the outbox relay) must reach its own handler unchanged.
_CONNECTION_LOST = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)

# The database could not finish this transaction now, through no fault of the request: a deadlock or
# serialization failure (class 40), a full disk, memory or connection table (53), a lock timeout
# (55P03), an I/O error (58). The same request may well succeed when retried, so these are
# UnavailableError (the answer is UNAVAILABLE, which clients retry), not INTERNAL.
_TRANSIENT = (
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.PostgresSystemError,
)

# Text the database cannot store: NUL in `text` (22021), `\u0000` in `jsonb` (22P05). The validators
# of batched writes refuse it up front (see `aetherops.text`); what still gets here is a caller's
# value used in a single statement (a looked-up id, a filter, a request id), so it is their error.
_UNSTORABLE_TEXT = (
    asyncpg.exceptions.CharacterNotInRepertoireError,
    asyncpg.exceptions.UntranslatableCharacterError,
)


@contextmanager
def _translated() -> Iterator[None]:
    """Errors of statements run on a connection, as domain errors (see the module docstring)."""
    try:
        yield
    except _CONNECTION_LOST as exc:
        raise UnavailableError(f"PostgreSQL connection lost: {exc}") from exc
    except _TRANSIENT as exc:
        raise UnavailableError(f"PostgreSQL could not complete the transaction; retry: {exc}") from exc
    except _UNSTORABLE_TEXT as exc:
        raise ValidationError.single("request", f"text {NUL_PROBLEM} (PostgreSQL: {exc})") from exc


def _jsonb_encode(value: Any) -> bytes:
    if not value and isinstance(value, dict):
        return b"\x01{}"  # most alerts' labels: no JSON encoder needed
    return b"\x01" + json.dumps(value).encode()  # jsonb binary format: version 1, then the text


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing beyond asyncpg's own rollback (see the module docstring)."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON columns come back as Python objects, not strings. jsonb uses the binary format so
    # that COPY (binary) can write it too.
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog", format="binary"
    )


class Database:
    """A pool of connections to one schema of one PostgreSQL database."""

    def __init__(self, pool: asyncpg.Pool, schema: str, url: str, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self.schema = schema
        self._url = url
        self._timeout_s = timeout_s

    @classmethod
    async def connect(
        cls,
        url: str,
        schema: str = "public",
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout_s: float = 5.0,
    ) -> Database:
        """Connects (creating the schema if needed); UnavailableError when the server cannot be reached."""
        try:
            admin = await asyncpg.connect(url, timeout=timeout_s)
            try:
                await admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            except asyncpg.UniqueViolationError:
                pass  # two processes created it at the same moment
            finally:
                await admin.close()
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout_s,
                command_timeout=_COMMAND_TIMEOUT_S,
                server_settings=_server_settings(schema),
                init=_init_connection,
                reset=_keep_session,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise UnavailableError(f"PostgreSQL unreachable: {exc}") from exc
        return cls(pool, schema, url, timeout_s=timeout_s)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @asynccontextmanager
    async def dedicated(self, settings: Mapping[str, str] | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own, outside the pool, closed on exit: for session state (advisory
        locks, session settings such as `settings`), which then ends with it. Errors as `connection`."""
        try:
            conn = await asyncpg.connect(
                self._url,
                timeout=self._timeout_s,
                command_timeout=_COMMAND_TIMEOUT_S,
                server_settings={**_server_settings(self.schema), **(settings or {})},
            )
        except _CANNOT_CONNECT as exc:
            raise UnavailableError(f"PostgreSQL unreachable: {exc}") from exc
        try:
            with _translated():
                await _init_connection(conn)
                yield conn
        finally:
            try:
                await asyncio.wait_for(conn.close(), self._timeout_s)
            except BaseException as exc:
                conn.terminate()  # server or network gone, or we are cancelled: drop the socket
                if not isinstance(exc, Exception):
                    raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a transaction: committed on normal exit, rolled back on error."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. A database that cannot be reached, or a connection lost on the way,
        is UnavailableError (the caller's answer is UNAVAILABLE, not INTERNAL)."""
        try:
            conn = await self._pool.acquire()
        except _CANNOT_CONNECT as exc:
            raise UnavailableError(f"PostgreSQL unreachable: {exc}") from exc
        try:
            with _translated():
                yield conn
        finally:
            await self._pool.release(conn)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return str(await conn.execute(query, *args))

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when a trivial query answers within the timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self.fetchval("SELECT 1") == 1)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, UnavailableError):
            return False

    async def close(self, timeout_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout_s)
        except TimeoutError:
            self._pool.terminate()
