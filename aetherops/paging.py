"""Page tokens for keyset pagination, bound to the filters they were issued for.

A token is URL-safe base64 of JSON: the position after the last item of the page (what the next
query starts after) and a short hash of the request's filters. A token used with other filters is
refused (`page_token: was issued for other filters`) instead of silently skipping or repeating
rows; anything that does not decode is `page_token: not a token this server issued`. Every List
RPC pages this way, reading its token with `read_page_token`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from aetherops.errors import FieldViolation
from aetherops.text import chars_problem

__all__ = [
    "cut_page",
    "decode_page_token",
    "encode_page_token",
    "filters_key",
    "page_limit",
    "position_text",
    "read_page_token",
    "time_and_id",
]

T = TypeVar("T")

_NOT_OURS = "not a token this server issued"


def filters_key(*filters: object) -> str:
    """A short, stable hash of a request's filters (the token remembers it, not the filters)."""
    return hashlib.sha256("\x00".join(str(f) for f in filters).encode()).hexdigest()[:16]


def encode_page_token(position: dict[str, Any], filters: str) -> str:
    """The token for the page after `position` (JSON-able values) under `filters` (a `filters_key`)."""
    return base64.urlsafe_b64encode(json.dumps({"p": position, "f": filters}).encode()).decode()


def decode_page_token(token: str, filters: str) -> tuple[dict[str, Any] | None, FieldViolation | None]:
    """The position in `token`, or the field violation explaining why it cannot be used here."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        position, issued_for = data["p"], data["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None, FieldViolation("page_token", _NOT_OURS)
    if not isinstance(position, dict):
        return None, FieldViolation("page_token", _NOT_OURS)
    if issued_for != filters:
        return None, FieldViolation("page_token", "was issued for other filters")
    return position, None


def read_page_token(
    token: str, filters: str, parse: Callable[[dict[str, Any]], T], problems: list[FieldViolation]
) -> T | None:
    """Where the next page starts: `parse` applied to the position in `token`.

    None for an empty token (the first page), and None with a `page_token` violation appended to
    `problems` for a token that does not decode, was issued for other filters, or holds a position
    `parse` cannot read (it raises KeyError, TypeError, ValueError or OverflowError).
    """
    if not token:
        return None
    position, problem = decode_page_token(token, filters)
    if problem is None:
        assert position is not None
        try:
            return parse(position)
        except (KeyError, TypeError, ValueError, OverflowError):
            problem = FieldViolation("page_token", _NOT_OURS)
    problems.append(problem)
    return None


def position_text(value: object) -> str:
    """A text part of a page position (an id); TypeError for anything else, ValueError for text no
    stored id can hold. Not `str(value)`: that turned a forged null into the id "None", and the listing
    went on from there instead of refusing it. And not any text: a forged NUL or lone surrogate (JSON's
    "\\u0000" / "\\ud800" escapes) reached the query and failed it, the surrogate as INTERNAL."""
    if not isinstance(value, str):
        raise TypeError(f"a page position's id must be text, got {type(value).__name__}")
    if (problem := chars_problem(value)) is not None:
        raise ValueError(f"a page position's id {problem}")
    return value


def time_and_id(id_field: str) -> Callable[[dict[str, Any]], tuple[datetime, str]]:
    """The `read_page_token` parser of a (time, id) keyset position: {"t": ISO time, id_field: id}."""

    def parse(position: dict[str, Any]) -> tuple[datetime, str]:
        return datetime.fromisoformat(position_text(position["t"])), position_text(position[id_field])

    return parse


def page_limit(page_size: int, default: int = 50, most: int = 500) -> int:
    """Items per page: `page_size`, `default` when unset, never more than `most`."""
    return min(page_size or default, most)


def cut_page(
    rows: list[T],
    limit: int,
    position: Callable[[T], dict[str, Any]],
    filters: str,
    *,
    size: Callable[[T], int] | None = None,
    budget: int = 0,
) -> tuple[list[T], str]:
    """A page and the token for the next one, from `rows` fetched with one more than `limit` (that
    extra row only says that more follow; the token holds the position of the page's last item).
    With `size`, the page also ends before its items' sizes pass `budget` (it holds one at least)."""
    page = rows[:limit]
    if size is not None:
        used = 0
        for i, row in enumerate(page):
            used += size(row)
            if i and used > budget:
                page = page[:i]
                break
    if len(rows) <= len(page):
        return page, ""
    return page, encode_page_token(position(page[-1]), filters)
