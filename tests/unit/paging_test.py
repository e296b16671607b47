"""Page tokens: a round trip, the two refusals (foreign token, other filters), and reading a
position with `read_page_token`."""

from __future__ import annotations

import base64
from typing import Any

from aetherops.errors import FieldViolation
from aetherops.paging import (
    cut_page,
    decode_page_token,
    encode_page_token,
    filters_key,
    read_page_token,
    time_and_id,
)


def test_round_trip_under_the_same_filters() -> None:
    filters = filters_key("SAT-1", 2, None)
    token = encode_page_token({"t": 1_700_000_000_000_000, "m": "burn-1"}, filters)
    assert decode_page_token(token, filters) == ({"t": 1_700_000_000_000_000, "m": "burn-1"}, None)


def test_other_filters_and_foreign_tokens_are_field_violations() -> None:
    token = encode_page_token({"t": 1}, filters_key("SAT-1"))
    position, problem = decode_page_token(token, filters_key("SAT-2"))
    assert position is None and problem is not None
    assert (problem.field, problem.description) == ("page_token", "was issued for other filters")
    for foreign in (
        "not base64!",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"p": 3, "f": "x"}').decode(),
    ):
        position, problem = decode_page_token(foreign, filters_key("SAT-1"))
        assert position is None and problem is not None
        assert problem.description == "not a token this server issued"


def test_filters_key_separates_fields() -> None:
    assert filters_key("ab", "c") != filters_key("a", "bc")
    assert filters_key("a", None) == filters_key("a", None)


def _after(position: dict[str, Any]) -> tuple[int, str]:
    return int(position["t"]), str(position["id"])


def test_read_page_token_parses_the_position_or_reports_why_not() -> None:
    filters = filters_key("SAT-1")
    problems: list[FieldViolation] = []
    assert read_page_token("", filters, _after, problems) is None and problems == []  # the first page
    token = encode_page_token({"t": 5, "id": "a"}, filters)
    assert read_page_token(token, filters, _after, problems) == (5, "a") and problems == []
    for position in ({"t": "soon", "id": "a"}, {"t": 5}, {"t": [1], "id": "a"}):
        assert read_page_token(encode_page_token(position, filters), filters, _after, problems) is None
    assert read_page_token(token, filters_key("SAT-2"), _after, problems) is None
    assert [p.description for p in problems] == ["not a token this server issued"] * 3 + [
        "was issued for other filters"
    ]
    assert {p.field for p in problems} == {"page_token"}


def test_time_and_id_reads_a_keyset_position() -> None:
    filters = filters_key("x")
    problems: list[FieldViolation] = []
    token = encode_page_token({"t": "2026-12-04T09:00:00+00:00", "c": "C1"}, filters)
    when, cid = read_page_token(token, filters, time_and_id("c"), problems) or (None, None)
    assert (when.isoformat() if when else None, cid) == ("2026-12-04T09:00:00+00:00", "C1") and problems == []
    assert read_page_token(token, filters, time_and_id("a"), problems) is None  # no "a" in it
    bad = encode_page_token({"t": "yesterday", "c": "C1"}, filters)
    assert read_page_token(bad, filters, time_and_id("c"), problems) is None
    # A null or numeric id is forged, not the id "None" or "7" to go on after.
    for cid in (None, 7, ["C1"]):
        forged = encode_page_token({"t": "2026-12-04T09:00:00+00:00", "c": cid}, filters)
        assert read_page_token(forged, filters, time_and_id("c"), problems) is None
    assert [p.description for p in problems] == ["not a token this server issued"] * 5


def test_cut_page_by_count_and_by_size() -> None:
    rows = list(range(10))

    def position(n: int) -> dict[str, int]:
        return {"n": n}

    assert cut_page(rows[:3], 5, position, "f") == ([0, 1, 2], "")
    page, token = cut_page(rows[:6], 5, position, "f")
    assert page == [0, 1, 2, 3, 4] and decode_page_token(token, "f")[0] == {"n": 4}
    # Each row weighs 40: a budget of 100 holds two; a row over the budget alone is still a page.
    page, token = cut_page(rows[:6], 5, position, "f", size=lambda _: 40, budget=100)
    assert page == [0, 1] and decode_page_token(token, "f")[0] == {"n": 1}
    assert cut_page(rows[:1], 5, position, "f", size=lambda _: 500, budget=100) == ([0], "")
    page, token = cut_page(rows[:3], 5, position, "f", size=lambda _: 500, budget=100)
    assert page == [0] and token
