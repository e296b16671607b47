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

__all__ = ["recall", "remember"]


async def recall(conn: asyncpg.Connection, scope: str, request_id: str) -> dict[str, Any] | None:
    if not request_id:
        return None
    problem = text_problem(request_id, MAX_ID_LEN)
    if problem is not None:
        raise ValidationError.single("request_id", problem)
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
