"""Idempotency records: the result of a mutating request, stored under its request_id.

A retried request (same scope and request_id) gets the stored result instead of
acting twice. The record is written in the same transaction as the change. Every
request looks its request_id up first, so that is where the id is checked: it is
a key of the table's index, and a bad one must not fail a batch that stores it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from aetherops.errors import ValidationError
from aetherops.text import MAX_ID_LEN, text_problem

__all__ = ["lock", "recall", "remember"]


async def lock(conn: asyncpg.Connection, scope: str, request_id: str) -> None:
    """Make this transaction wait for any other holding the same (scope, request_id) to end. Call it
    before `recall` in the transaction that acts: a retry racing its first call (a client that gave
    up waiting) then recalls the first answer instead of acting again, e.g. deleting what the first
    call deleted (NOT_FOUND) or storing its own payload over the first one's."""
    if request_id:
        _check(request_id)  # before PostgreSQL sees it: a NUL would fail the query, not the request
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", scope, request_id)


def _check(request_id: str) -> None:
    problem = text_problem(request_id, MAX_ID_LEN)
    if problem is not None:
        raise ValidationError.single("request_id", problem)


async def recall(conn: asyncpg.Connection, scope: str, request_id: str) -> dict[str, Any] | None:
    if not request_id:
        return None
    _check(request_id)
    value = await conn.fetchval(
        "SELECT response FROM idempotency WHERE scope = $1 AND request_id = $2", scope, request_id
    )
    return dict(value) if value is not None else None


async def remember(conn: asyncpg.Connection, scope: str, request_id: str, result: dict[str, Any]) -> None:
    if request_id:
        await conn.execute(
            "INSERT INTO idempotency (scope, request_id, response) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            scope,
            request_id,
            result,
        )
