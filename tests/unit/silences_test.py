"""Silences: which alerts they cover, what a valid one is, and the ingest path's index."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from aetherops.silences import MAX_SILENCE, Silence, SilenceIndex, end_problems, silence_problems
from aetherops.subsystems import DEFAULT_DEPENDENCY_GRAPH as GRAPH

T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def _silence(silence_id: str = "s1", hours: float = 1.0, **matchers: object) -> Silence:
    return Silence(
        silence_id=silence_id,
        start_time=T0,
        end_time=T0 + timedelta(hours=hours),
        comment="burn 7",
        **matchers,  # type: ignore[arg-type]
    )


def _index(*silences: Silence, now: datetime = T0) -> SilenceIndex:
    index = SilenceIndex(GRAPH.canonical)
    index.replace_all(silences, now)
    return index


def test_every_matcher_that_is_set_must_match_within_the_window() -> None:
    burn = _silence(
        satellite_ids=frozenset({"SAT-1"}), subsystems=frozenset({"propulsion", "adcs"}), labels={"mode": "burn"}
    )
    inside = T0 + timedelta(minutes=30)
    assert burn.covers("SAT-1", "propulsion", {"mode": "burn", "extra": "x"}, inside)
    assert not burn.covers("SAT-2", "propulsion", {"mode": "burn"}, inside)
    assert not burn.covers("SAT-1", "power", {"mode": "burn"}, inside)
    assert not burn.covers("SAT-1", "propulsion", {}, inside)
    assert not burn.covers("SAT-1", "propulsion", {"mode": "burn"}, T0 - timedelta(seconds=1))
    assert burn.covers("SAT-1", "adcs", {"mode": "burn"}, T0)  # the start is in, the end is out
    assert not burn.covers("SAT-1", "adcs", {"mode": "burn"}, T0 + timedelta(hours=1))


def test_the_index_matches_by_the_alerts_observation_time_and_resolves_aliases() -> None:
    index = _index(_silence(satellite_ids=frozenset({"SAT-1"}), subsystems=frozenset({"adcs"})))
    # "aocs" is an alias of adcs; observed in the window, downlinked whenever.
    found = index.match("SAT-1", "AOCS", {}, T0 + timedelta(minutes=5))
    assert found is not None and found.silence_id == "s1"
    assert index.match("SAT-1", "adcs", {}, T0 + timedelta(hours=2)) is None
    assert index.match("SAT-2", "adcs", {}, T0 + timedelta(minutes=5)) is None


def test_several_covering_silences_name_the_first_created() -> None:
    index = _index(
        _silence("s2", labels={"test": "yes"}),
        _silence("s1", satellite_ids=frozenset({"SAT-1"})),
        _silence("s3", satellite_ids=frozenset({"SAT-1"}), subsystems=frozenset({"power"})),
    )
    found = index.match("SAT-1", "power", {"test": "yes"}, T0)
    assert found is not None and found.silence_id == "s1"
    only_labels = index.match("SAT-9", "power", {"test": "yes"}, T0)
    assert only_labels is not None and only_labels.silence_id == "s2"
    assert index.match("SAT-9", "power", {"test": "no"}, T0) is None


def test_an_ended_silence_still_covers_its_window_for_a_week_then_leaves() -> None:
    ended = _silence(satellite_ids=frozenset({"SAT-1"}))
    late = T0 + timedelta(days=6)
    index = _index(ended, now=late)
    assert index and index.match("SAT-1", "power", {}, T0 + timedelta(minutes=1)) is not None
    index.replace_all([ended], T0 + timedelta(days=8))
    assert not index and index.match("SAT-1", "power", {}, T0 + timedelta(minutes=1)) is None


def test_expiring_moves_the_end_to_now_and_put_replaces() -> None:
    silence = _silence(satellite_ids=frozenset({"SAT-1"}))
    index = _index(silence)
    now = T0 + timedelta(minutes=10)
    expired = silence.expired(now, "ops-1")
    assert (expired.end_time, expired.expired_by, expired.expire_time) == (now, "ops-1", now)
    assert expired.is_over(now) and not silence.is_over(now)
    index.put(expired, now)
    assert len(index) == 1
    assert index.match("SAT-1", "power", {}, now - timedelta(minutes=1)) is not None  # observed before: still
    assert index.match("SAT-1", "power", {}, now + timedelta(minutes=1)) is None
    # Expiring after the natural end keeps the natural end.
    assert silence.expired(T0 + timedelta(hours=3), "x").end_time == silence.end_time


def test_problems_of_a_silence_name_their_fields() -> None:
    assert silence_problems(_silence(satellite_ids=frozenset({"SAT-1"}))) == []
    fields = {v.field for v in silence_problems(_silence())}
    assert fields == {"silence.satellite_ids"}  # no matcher: it would silence everything
    bad = Silence(
        silence_id="",
        start_time=T0,
        end_time=T0,
        comment=" ",
        satellite_ids=frozenset({" SAT-1"}),
        subsystems=frozenset({"x\x00"}),
        labels={"": "v"},
    )
    assert {v.field for v in silence_problems(bad)} == {
        "silence.satellite_ids",
        "silence.subsystems",
        "silence.labels",
        "silence.comment",
        "silence.end_time",
    }
    too_long = _silence(hours=MAX_SILENCE.total_seconds() / 3600 + 1, satellite_ids=frozenset({"SAT-1"}))
    assert [v.field for v in silence_problems(too_long)] == ["silence.end_time"]
    ancient = Silence(
        silence_id="",
        start_time=datetime(1970, 1, 1, tzinfo=UTC),
        end_time=datetime(1970, 1, 2, tzinfo=UTC),
        comment="c",
        labels={"a": "b"},
    )
    assert [v.field for v in silence_problems(ancient)] == ["silence.start_time"]


def test_a_silence_to_create_must_be_able_to_cover_an_alert() -> None:
    burn = _silence(satellite_ids=frozenset({"SAT-1"}))  # T0 until T0 + 1 h
    reach = timedelta(seconds=SilenceIndex.KEEP_AFTER_END_S)  # alerts downlinked this long after the end count
    assert end_problems(burn, T0 - timedelta(days=1)) == []
    assert end_problems(burn, T0 + timedelta(hours=2)) == []  # over, but its alerts may not be down yet
    assert end_problems(burn, T0 + timedelta(hours=1) + reach - timedelta(seconds=1)) == []
    for now in (T0 + timedelta(hours=1) + reach, T0 + timedelta(days=30)):
        [problem] = end_problems(burn, now)
        assert problem.field == "silence.end_time"
        assert "could cover none" in problem.description and now.isoformat() in problem.description
    assert [v.field for v in end_problems(burn, T0 + timedelta(days=9), field_prefix="s")] == ["s.end_time"]
    # With no start given, the start stands for the creation time (for a retry, its first call's):
    # an end not after it is left to end_problems, which the service asks after the idempotency look-up.
    no_start = replace(burn, start_time=T0 + timedelta(hours=2))
    assert [v.field for v in silence_problems(no_start)] == ["silence.end_time"]
    assert silence_problems(no_start, start_given=False) == []
    [problem] = end_problems(no_start, T0 + timedelta(hours=2), start_given=False)
    assert problem.field == "silence.end_time" and "must be after start_time" in problem.description


def test_expiring_a_silence_not_yet_started_leaves_an_empty_window_not_a_backward_one() -> None:
    planned = _silence(satellite_ids=frozenset({"SAT-1"}))
    now = T0 - timedelta(hours=2)
    expired = planned.expired(now, "ops-1")
    assert (expired.start_time, expired.end_time, expired.expire_time) == (now, now, now)
    assert expired.is_over(now)
    for when in (now, T0, T0 + timedelta(minutes=30)):
        assert not expired.covers("SAT-1", "power", {}, when)
    # The index drops it at once: nothing, however late it arrives, can fall in an empty window.
    index = _index(planned, now=now)
    index.put(expired, now)
    assert not index and index.match("SAT-1", "power", {}, T0 + timedelta(minutes=30)) is None
