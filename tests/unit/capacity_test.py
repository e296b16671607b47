"""Unit tests of the capacity forecasting core (aetherops/capacity.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import pytest

from aetherops.capacity import (
    MAX_SNAPSHOT_VALUE,
    CapacityPlanner,
    ExhaustionForecast,
    MissionScheduleEntry,
    ResourceSnapshot,
    ResourceType,
    RiskLevel,
    aggregate_mission_impact,
    classify_risk_level,
    datetime_to_us,
    diff_risk_levels,
    interpolate_value,
    linear_regression,
    risk_levels,
    theil_sen,
    validate_mission,
    validate_snapshot,
)
from aetherops.clock import ManualClock, SystemClock
from aetherops.errors import ConfigError, ValidationError

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FUEL, POWER, STORAGE, BANDWIDTH = (
    ResourceType.FUEL,
    ResourceType.POWER,
    ResourceType.STORAGE,
    ResourceType.BANDWIDTH,
)
UNITS = {FUEL: "kg", POWER: "Wh", STORAGE: "GB", BANDWIDTH: "MB"}


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def planner_at(now_days: float, **kwargs: object) -> tuple[CapacityPlanner, ManualClock]:
    clock = ManualClock(day(now_days))
    return CapacityPlanner(clock, **kwargs), clock  # type: ignore[arg-type]


def feed(
    planner: CapacityPlanner,
    sat: str,
    resource: ResourceType,
    days: Sequence[float] | npt.NDArray[np.float64],
    values: Sequence[float] | npt.NDArray[np.float64],
    unit: str | None = None,
) -> int:
    snaps = [
        ResourceSnapshot(sat, resource, day(float(d)), float(v), unit or UNITS[resource])
        for d, v in zip(days, values, strict=True)
    ]
    return planner.ingest_snapshots(snaps)


def linear(
    planner: CapacityPlanner,
    sat: str,
    resource: ResourceType,
    start: float,
    rate: float,
    n_days: int = 30,
    unit: str | None = None,
) -> None:
    """Daily snapshots over [0, n_days] of start − rate·day."""
    days = list(range(n_days + 1))
    feed(planner, sat, resource, days, [start - rate * d for d in days], unit)


# ---- helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "level"),
    [
        (-5.0, RiskLevel.CRITICAL),
        (0.0, RiskLevel.CRITICAL),
        (13.999, RiskLevel.CRITICAL),
        (14.0, RiskLevel.WARNING),
        (29.999, RiskLevel.WARNING),
        (30.0, RiskLevel.WATCH),
        (59.999, RiskLevel.WATCH),
        (60.0, RiskLevel.NOMINAL),
        (1e6, RiskLevel.NOMINAL),
        (math.inf, RiskLevel.NOMINAL),
        (None, RiskLevel.NOMINAL),
    ],
)
def test_risk_level_boundaries(days: float | None, level: RiskLevel) -> None:
    assert classify_risk_level(days) is level


def test_risk_level_rejects_nan_and_orders_by_severity() -> None:
    with pytest.raises(ValueError):
        classify_risk_level(math.nan)
    assert RiskLevel.NOMINAL < RiskLevel.WATCH < RiskLevel.WARNING < RiskLevel.CRITICAL


def test_linear_regression_exact_on_known_data() -> None:
    slope, intercept, r2 = linear_regression([0, 1, 2, 3], [1, 3, 5, 7])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    # Textbook example: slope 0.6, intercept 2.2, r² 0.6.
    slope, intercept, r2 = linear_regression([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert slope == pytest.approx(0.6)
    assert intercept == pytest.approx(2.2)
    assert r2 == pytest.approx(0.6)
    assert linear_regression([0, 1, 2], [4, 4, 4]) == pytest.approx((0.0, 4.0, 1.0))


@pytest.mark.parametrize(
    ("x", "y"),
    [([1.0], [1.0]), ([1.0, 1.0], [1.0, 2.0]), ([1.0, 2.0], [1.0]), ([1.0, 2.0], [1.0, math.nan])],
)
def test_linear_regression_rejects_degenerate_input(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        linear_regression(x, y)


def test_theil_sen_ignores_outliers_least_squares_does_not() -> None:
    x = np.arange(20.0)
    y = 3.0 * x + 5.0
    y[[4, 11]] += 200.0
    slope, intercept = theil_sen(x, y)
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(5.0)
    assert abs(linear_regression(x, y)[0] - 3.0) > 0.5
    with pytest.raises(ValueError):
        theil_sen([1.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        theil_sen([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        theil_sen([[1.0, 2.0]], [[1.0, 2.0]])  # type: ignore[list-item]


def test_interpolate_value() -> None:
    snaps = [
        ResourceSnapshot("s", FUEL, day(2), 80.0, "kg"),
        ResourceSnapshot("s", FUEL, day(0), 100.0, "kg"),
        ResourceSnapshot("s", FUEL, day(1), math.nan, "kg"),  # skipped
    ]
    assert interpolate_value(snaps, day(1)) == pytest.approx(90.0)
    assert interpolate_value(snaps, day(0.5)) == pytest.approx(95.0)
    assert interpolate_value(snaps, day(0)) == 100.0
    assert interpolate_value(snaps, day(2)) == 80.0
    assert interpolate_value(snaps, day(3)) is None
    assert interpolate_value(snaps, day(-1)) is None
    assert interpolate_value([], day(0)) is None
    assert interpolate_value(snaps[:1], day(2)) == 80.0


def test_aggregate_mission_impact_sums_over_a_range_prorated() -> None:
    missions = [
        MissionScheduleEntry("a", "s1", day(1), day(2), {FUEL: 10.0}),
        MissionScheduleEntry("b", "s1", day(5), day(7), {FUEL: 4.0, POWER: 3.0}),
        MissionScheduleEntry("c", "s2", day(1), day(2), {FUEL: 100.0}),
        MissionScheduleEntry("d", "s1", day(3), day(4), {POWER: 1.0}),
    ]
    assert aggregate_mission_impact(missions, "s1", FUEL, day(0), day(10)) == pytest.approx(14.0)
    assert aggregate_mission_impact(missions, "s1", FUEL, day(0), day(6)) == pytest.approx(12.0)
    assert aggregate_mission_impact(missions, "s1", POWER, day(0), day(10)) == pytest.approx(4.0)
    assert aggregate_mission_impact(missions, "s1", STORAGE, day(0), day(10)) == 0.0
    assert aggregate_mission_impact(missions, "s1", FUEL, day(10), day(0)) == 0.0
    assert aggregate_mission_impact(missions, "s2", FUEL, day(1.5), day(3)) == pytest.approx(50.0)


# ---- validation ------------------------------------------------------------------------------------


def test_validate_snapshot_reports_every_violation() -> None:
    now = day(0)
    bad = ResourceSnapshot("", 0, datetime(2026, 1, 1), math.nan, "")  # type: ignore[arg-type]
    fields = [v.field for v in validate_snapshot(bad, now=now)]
    assert fields == [
        "snapshot.satellite_id",
        "snapshot.resource_type",
        "snapshot.value",
        "snapshot.timestamp",
        "snapshot.unit",
    ]
    assert validate_snapshot(ResourceSnapshot("s", FUEL, now, 1.0, "kg"), now=now) == []
    # An int matching the proto enum is accepted; a bool or other type is not.
    assert validate_snapshot(ResourceSnapshot("s", 1, now, 1.0, "kg"), now=now) == []  # type: ignore[arg-type]
    assert validate_snapshot(ResourceSnapshot("s", True, now, 1.0, "kg"), now=now)  # type: ignore[arg-type]
    future = ResourceSnapshot("s", FUEL, now + timedelta(seconds=301), 1.0, "kg")
    assert [v.field for v in validate_snapshot(future, now=now)] == ["snapshot.timestamp"]
    assert validate_snapshot(future, now=now, max_future_skew_s=400) == []
    for value, text in ((-1.0, "negative"), (math.inf, "finite"), ("3", "number")):
        got = validate_snapshot(ResourceSnapshot("s", FUEL, now, value, "kg"), now=now)  # type: ignore[arg-type]
        assert len(got) == 1 and text in got[0].description
    not_dt = ResourceSnapshot("s", FUEL, "yesterday", 1.0, "kg")  # type: ignore[arg-type]
    assert [v.field for v in validate_snapshot(not_dt, now=now)] == ["snapshot.timestamp"]
    # Text PostgreSQL cannot store, and ids longer than an index key should be, are refused by field.
    nul = ResourceSnapshot("S\x00", FUEL, now, 1.0, "k\x00g")
    assert [(v.field, "NUL" in v.description) for v in validate_snapshot(nul, now=now)] == [
        ("snapshot.satellite_id", True),
        ("snapshot.unit", True),
    ]
    long_id = ResourceSnapshot("s" * 257, FUEL, now, 1.0, "kg")
    assert [v.field for v in validate_snapshot(long_id, now=now)] == ["snapshot.satellite_id"]


def test_implausible_snapshots_are_refused_on_every_path() -> None:
    # 1e308 overflowed the fit (NaN confidence in forecasts); a zeroed clock stretched a series over
    # centuries. Both paths refuse them: one snapshot at a time, and arrays (bulk and restore).
    now = day(0)
    huge = ResourceSnapshot("s", FUEL, now, 1e308, "kg")
    assert [(v.field, "at most" in v.description) for v in validate_snapshot(huge, now=now)] == [
        ("snapshot.value", True)
    ]
    assert validate_snapshot(ResourceSnapshot("s", FUEL, now, MAX_SNAPSHOT_VALUE, "kg"), now=now) == []
    for when in (datetime(1970, 1, 1, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC)):
        old = ResourceSnapshot("s", FUEL, when, 1.0, "kg")
        assert [(v.field, "before 2000" in v.description) for v in validate_snapshot(old, now=now)] == [
            ("snapshot.timestamp", True)
        ]
    start = now + timedelta(days=1)
    burn = MissionScheduleEntry("m", "s", start, start + timedelta(hours=1), {FUEL: -1e308})
    assert [(v.field, "at most" in v.description) for v in validate_mission(burn)] == [
        ("mission.resource_impacts[0].amount", True)
    ]
    planner, _clock = planner_at(10)
    times = np.array([datetime_to_us(day(d)) for d in (1, 2, 3)] + [0], dtype=np.int64)
    report = planner.ingest_series("s", FUEL, "kg", times, np.array([9.0, 1e300, 7.0, 6.0]))
    assert report.accepted == 2
    assert [(i, "at most" in r or "before 2000" in r) for i, r in report.rejected] == [(1, True), (3, True)]


def test_validate_mission() -> None:
    ok = MissionScheduleEntry("m", "s", day(1), day(2), {FUEL: 1.0})
    assert validate_mission(ok) == []
    bad = MissionScheduleEntry("", " ", day(2), day(1), {FUEL: math.nan, 9: 1.0})  # type: ignore[dict-item]
    fields = [v.field for v in validate_mission(bad)]
    assert fields == [
        "mission.mission_id",
        "mission.satellite_id",
        "mission.end_time",
        "mission.resource_impacts[0].amount",
        "mission.resource_impacts[1].resource_type",
    ]
    naive = MissionScheduleEntry("m", "s", datetime(2026, 1, 1), day(2))
    assert [v.field for v in validate_mission(naive)] == ["mission.start_time"]
    nul = MissionScheduleEntry("m\x00", "s\x00", day(1), day(2), description="burn \x00")
    assert [v.field for v in validate_mission(nul)] == [
        "mission.mission_id",
        "mission.satellite_id",
        "mission.description",
    ]
    wordy = MissionScheduleEntry("m", "s", day(1), day(2), description="x" * 4097)
    assert [v.field for v in validate_mission(wordy)] == ["mission.description"]
    # The stored impacts are a read-only copy.
    impacts = {FUEL: 1.0}
    entry = MissionScheduleEntry("m", "s", day(1), day(2), impacts)
    impacts[FUEL] = 5.0
    assert entry.resource_impacts[FUEL] == 1.0


# ---- ingestion -------------------------------------------------------------------------------------


def test_single_ingestion_and_duplicates() -> None:
    planner, _ = planner_at(1)
    snap = ResourceSnapshot("sat-1", FUEL, day(0), 100.0, "kg")
    assert planner.ingest_snapshot(snap) is True
    assert planner.ingest_snapshot(ResourceSnapshot("sat-1", FUEL, day(0), 99.0, "kg")) is False
    assert [s.value for s in planner.history("sat-1", FUEL)] == [100.0]  # first value kept
    assert planner.has_satellite("sat-1") and not planner.has_satellite("sat-2")
    assert planner.known_satellites() == ["sat-1"]
    assert planner.history("sat-2", FUEL) == []


def test_single_ingestion_rejects_with_all_violations_and_mixed_units() -> None:
    planner, _ = planner_at(1)
    with pytest.raises(ValidationError) as err:
        planner.ingest_snapshot(ResourceSnapshot("", FUEL, day(0), -1.0, ""))
    assert {v.field for v in err.value.violations} == {
        "snapshot.satellite_id",
        "snapshot.value",
        "snapshot.unit",
    }
    planner.ingest_snapshot(ResourceSnapshot("s", FUEL, day(0), 10.0, "kg"))
    with pytest.raises(ValidationError) as err:
        planner.ingest_snapshot(ResourceSnapshot("s", FUEL, day(0.5), 10.0, "lb"))
    assert err.value.violations[0].field == "snapshot.unit"
    assert "'lb' differs from 'kg'" in err.value.violations[0].description
    # Another resource may have its own unit.
    assert planner.ingest_snapshot(ResourceSnapshot("s", POWER, day(0), 10.0, "Wh"))


def test_bulk_ingestion_counts_and_reports() -> None:
    planner, _ = planner_at(10)
    snaps = [
        ResourceSnapshot("s", FUEL, day(0), 10.0, "kg"),
        ResourceSnapshot("s", FUEL, day(1), math.nan, "kg"),
        ResourceSnapshot("s", FUEL, day(2), 9.0, "kg"),
        ResourceSnapshot("s", FUEL, day(0), 10.0, "kg"),  # duplicate
        ResourceSnapshot("s", FUEL, day(3), 8.0, "g"),  # mixed unit
        ResourceSnapshot("s", FUEL, day(1.5), 9.5, "kg"),  # out of order: fine
    ]
    report = planner.ingest_snapshots_detailed(snaps)
    assert report.accepted == 3
    assert report.duplicates == 1
    assert [i for i, _ in report.rejected] == [1, 4]
    assert "snapshot.value: must be finite" in report.rejected[0][1]
    assert "snapshot.unit" in report.rejected[1][1]
    assert [s.timestamp for s in planner.history("s", FUEL)] == [day(0), day(1.5), day(2)]
    assert planner.ingest_snapshots(snaps) == 0


def test_array_ingestion_matches_snapshot_path() -> None:
    planner, _clock = planner_at(10)
    times = np.array([datetime_to_us(day(d)) for d in (3, 1, 2, 2, 12, 0)], dtype=np.int64)
    values = np.array([7.0, 9.0, 8.0, 8.5, 1.0, -1.0])
    report = planner.ingest_series("s", FUEL, "kg", times, values)
    assert report.accepted == 3
    assert report.duplicates == 1
    assert [i for i, _ in report.rejected] == [4, 5]
    assert "future" in report.rejected[0][1] and "negative" in report.rejected[1][1]
    # Merging older points and skipping existing ones.
    more = np.array([datetime_to_us(day(d)) for d in (0, 1, 4)]).astype("datetime64[us]")
    report = planner.ingest_series("s", FUEL, "kg", more, np.array([10.0, 99.0, 6.0]))
    assert (report.accepted, report.duplicates) == (2, 1)
    assert [s.value for s in planner.history("s", FUEL)] == [10.0, 9.0, 8.0, 7.0, 6.0]
    with pytest.raises(ValidationError):
        planner.ingest_series("s", FUEL, "lb", times, values)
    with pytest.raises(ValidationError):
        planner.ingest_series("s", FUEL, "kg", times[:2], values)
    assert planner.ingest_series("s", FUEL, "kg", times[:0], values[:0]).accepted == 0
    # Growth beyond the initial capacity keeps everything.
    many = np.array([datetime_to_us(day(5 + i / 100)) for i in range(300)], dtype=np.int64)
    assert planner.ingest_series("s", FUEL, "kg", many, np.full(300, 5.0)).accepted == 300
    for i in range(40):
        planner.ingest_snapshot(ResourceSnapshot("s", FUEL, day(4.5 + i / 1000), 6.5, "kg"))
    hist = planner.history("s", FUEL)
    assert len(hist) == 345
    assert all(a.timestamp < b.timestamp for a, b in itertools.pairwise(hist))


# ---- rates and forecasts ---------------------------------------------------------------------------


def test_consumption_rate_from_regression() -> None:
    planner, _ = planner_at(30)
    linear(planner, "s", FUEL, 100.0, 2.0)
    rate = planner.compute_consumption_rate("s", FUEL)
    assert rate is not None
    assert rate.rate_per_day == pytest.approx(2.0)
    assert rate.confidence == pytest.approx(1.0)
    assert rate.sample_period_days == pytest.approx(30.0)
    assert rate.sample_count == 31


def test_insufficient_data_returns_none_with_reason() -> None:
    planner, _ = planner_at(5)
    assert planner.compute_consumption_rate("ghost", FUEL) is None
    assert "unknown satellite" in planner.forecast_exhaustion_detailed("ghost", FUEL).reason
    planner.ingest_snapshot(ResourceSnapshot("s", FUEL, day(0), 10.0, "kg"))
    assert planner.forecast_exhaustion("s", FUEL) is None  # one point
    assert "1 snapshot" in planner.compute_consumption_rate_detailed("s", FUEL).reason
    # Re-sending the same timestamp does not make a second point.
    planner.ingest_snapshot(ResourceSnapshot("s", FUEL, day(0), 9.0, "kg"))
    assert planner.forecast_exhaustion("s", FUEL) is None
    feed(planner, "s", FUEL, [0.1, 0.2], [9.9, 9.8])  # enough points, too short a span
    assert "day(s)" in planner.forecast_exhaustion_detailed("s", FUEL).reason
    assert "no POWER snapshots" in planner.forecast_exhaustion_detailed("s", POWER).reason
    relaxed = CapacityPlanner(ManualClock(day(5)), min_history_points=2, min_history_days=0.0)
    feed(relaxed, "s", FUEL, [0.0, 0.5], [10.0, 9.0])
    assert relaxed.forecast_exhaustion("s", FUEL) is not None


def test_basic_forecast() -> None:
    planner, _ = planner_at(30)
    linear(planner, "s", FUEL, 100.0, 2.0)  # 40 kg left at day 30, 2 kg/day
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None
    assert f.current_value == 40.0
    assert f.days_remaining == pytest.approx(20.0)
    assert f.predicted_exhaustion_date == day(50)
    assert f.risk_level is RiskLevel.WARNING
    assert f.rate_per_day == pytest.approx(2.0)
    assert f.unit == "kg"
    assert f.days_remaining_p10 == f.days_remaining_p50 == f.days_remaining_p90 == pytest.approx(20.0)
    assert "burns" in f.recommended_action


def test_days_count_from_now_and_exhausted_resources_are_critical() -> None:
    planner, clock = planner_at(35)  # last snapshot five days ago
    linear(planner, "s", FUEL, 100.0, 2.0)
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None and f.days_remaining == pytest.approx(15.0)
    clock.set(day(80))
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None and f.days_remaining == 0.0 and f.risk_level is RiskLevel.CRITICAL
    planner2, _ = planner_at(30)
    linear(planner2, "s", POWER, 30.0, 1.0)  # reaches zero exactly at day 30
    f = planner2.forecast_exhaustion("s", POWER)
    assert f is not None and f.days_remaining == pytest.approx(0.0, abs=1e-9)


def test_forecast_includes_scheduled_missions() -> None:
    planner, _ = planner_at(30)
    linear(planner, "s", FUEL, 100.0, 2.0)
    planner.add_scheduled_mission(MissionScheduleEntry("burn-1", "s", day(32), day(33), {FUEL: 10.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("other", "s2", day(32), day(33), {FUEL: 30.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("power", "s", day(31), day(32), {POWER: 3.0}))
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None
    assert f.days_remaining == pytest.approx(15.0)  # 10 kg less = 5 days at 2 kg/day
    assert f.scheduled_impact == pytest.approx(10.0)
    assert f.mission_ids == ("burn-1",)
    assert "burn-1" in f.recommended_action
    # A burn big enough runs the tank dry during the burn itself.
    planner.add_scheduled_mission(MissionScheduleEntry("burn-1", "s", day(32), day(34), {FUEL: 80.0}))
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None
    # 36 kg left at day 32; the burn uses 40 kg/day + 2 background → empty after 36/42 day.
    assert f.days_remaining == pytest.approx(2.0 + 36.0 / 42.0)
    assert [m.mission_id for m in planner.missions("s")] == ["power", "burn-1"]
    assert len(planner.missions()) == 3
    # A gain (negative use) that more than offsets the consumption.
    planner3, _ = planner_at(30)
    linear(planner3, "s", POWER, 100.0, 0.0)
    planner3.add_scheduled_mission(MissionScheduleEntry("charge", "s", day(31), day(32), {POWER: -5.0}))
    planner3.add_scheduled_mission(MissionScheduleEntry("payload", "s", day(33), day(34), {POWER: 50.0}))
    f = planner3.forecast_exhaustion("s", POWER)
    assert f is not None and f.days_remaining is None and f.scheduled_impact == pytest.approx(45.0)
    with pytest.raises(ValidationError):
        planner.add_scheduled_mission(MissionScheduleEntry("bad", "s", day(2), day(1)))


def test_missions_after_the_exhaustion_are_not_counted() -> None:
    # 40 kg left at day 30, 2 kg/day, a 10 kg burn at day 32: empty at day 45. A burn after that
    # changes nothing the forecast says: not the date, not the missions, the impact or the advice.
    planner, _ = planner_at(30)
    linear(planner, "s", FUEL, 100.0, 2.0)
    planner.add_scheduled_mission(MissionScheduleEntry("burn-1", "s", day(32), day(33), {FUEL: 10.0}))
    before = planner.forecast_exhaustion("s", FUEL)
    assert before is not None and before.days_remaining == pytest.approx(15.0)
    planner.add_scheduled_mission(MissionScheduleEntry("burn-late", "s", day(50), day(51), {FUEL: 20.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("refuel-late", "s", day(60), day(61), {FUEL: -30.0}))
    (f,) = planner.forecast_fleet()
    assert f == before
    assert f.mission_ids == ("burn-1",) and f.scheduled_impact == pytest.approx(10.0)
    assert "burn-late" not in f.recommended_action
    (defer,) = [d for d in planner.recommend_interventions("s") if d["action"] == "defer_burn"]
    assert defer["mission_ids"] == ["burn-1"]
    # Empty at the newest snapshot: no mission still ahead changes that.
    empty, _ = planner_at(30)
    linear(empty, "s", FUEL, 30.0, 1.0)
    empty.add_scheduled_mission(MissionScheduleEntry("burn-2", "s", day(31), day(33), {FUEL: 4.0}))
    f = empty.forecast_exhaustion("s", FUEL)
    assert f is not None and f.days_remaining == 0.0
    assert f.mission_ids == () and f.scheduled_impact == 0.0 and f.recommended_action == "reduce or defer burns"


def test_a_mission_under_way_when_the_resource_runs_out_counts_only_up_to_then() -> None:
    # 36 kg left at day 32, 2 kg/day, and an 80 kg burn over days 32-34 (40 kg/day): the tank is empty
    # 36/42 of a day into the burn, which by then has used 40·36/42 kg. The other 80 − that is never
    # burnt: the impact the forecast includes is only what comes before the exhaustion.
    planner, _ = planner_at(30)
    linear(planner, "s", FUEL, 100.0, 2.0)
    planner.add_scheduled_mission(MissionScheduleEntry("burn-1", "s", day(32), day(34), {FUEL: 80.0}))
    (f,) = planner.forecast_fleet()
    assert f.days_remaining == pytest.approx(2.0 + 36.0 / 42.0)
    assert f.mission_ids == ("burn-1",) and "burn-1" in f.recommended_action
    assert f.scheduled_impact == pytest.approx(40.0 * 36.0 / 42.0)
    # What the forecast says adds up: the fuel left, less the trend and the missions to the exhaustion.
    assert f.current_value - 2.0 * f.days_remaining - f.scheduled_impact == pytest.approx(0.0, abs=1e-9)
    assert planner.forecast_exhaustion("s", FUEL) == f


def test_mission_moved_to_another_satellite_is_reindexed() -> None:
    planner, _ = planner_at(30)
    planner.add_scheduled_mission(MissionScheduleEntry("m", "a", day(31), day(32), {FUEL: 1.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("m", "b", day(31), day(32), {FUEL: 1.0}))
    assert planner.missions("a") == [] and [m.satellite_id for m in planner.missions("b")] == ["b"]


def test_not_depleting_is_nominal_without_date() -> None:
    planner, _ = planner_at(30)
    linear(planner, "s", POWER, 100.0, -1.0)  # charging
    linear(planner, "s", FUEL, 100.0, 0.0)
    linear(planner, "s", BANDWIDTH, 1e6, 1e-4)  # runs out only after the ten-year horizon
    for resource in (POWER, FUEL, BANDWIDTH):
        f = planner.forecast_exhaustion("s", resource)
        assert f is not None
        assert f.days_remaining is None and f.predicted_exhaustion_date is None
        assert f.risk_level is RiskLevel.NOMINAL and f.recommended_action == "none"


def test_storage_fills_towards_capacity() -> None:
    planner, _ = planner_at(30, storage_capacity={"s": 500.0}, default_storage_capacity=1000.0)
    days = list(range(31))
    feed(planner, "s", STORAGE, days, [100.0 + 10.0 * d for d in days])  # 400 used at day 30
    feed(planner, "t", STORAGE, days, [100.0 + 10.0 * d for d in days])
    feed(planner, "p", STORAGE, days, [10.0 + 2.0 * d for d in days], unit="%")
    f = planner.forecast_exhaustion("s", STORAGE)
    assert f is not None and f.days_remaining == pytest.approx(10.0) and f.rate_per_day == pytest.approx(10.0)
    f = planner.forecast_exhaustion("t", STORAGE)
    assert f is not None and f.days_remaining == pytest.approx(60.0)
    f = planner.forecast_exhaustion("p", STORAGE)  # 70 % used, 2 %/day
    assert f is not None and f.days_remaining == pytest.approx(15.0)
    unknown, _ = planner_at(30)
    feed(unknown, "s", STORAGE, days, [float(d) for d in days])
    assert "capacity" in unknown.forecast_exhaustion_detailed("s", STORAGE).reason
    # A recorded data take (a mission using storage) is removed from the history too.
    planner.add_scheduled_mission(MissionScheduleEntry("take", "u", day(10), day(11), {STORAGE: 50.0}))
    feed(planner, "u", STORAGE, days, [100.0 + 10.0 * d + (50.0 if d >= 11 else 0.0) for d in days])
    f = planner.forecast_exhaustion("u", STORAGE)  # 450 used of 1000 at 10/day
    assert f is not None and f.rate_per_day == pytest.approx(10.0) and f.days_remaining == pytest.approx(55.0)


def test_bandwidth_budget_resets_each_period() -> None:
    kwargs = {"bandwidth_period_days": 10.0, "bandwidth_period_anchor": day(0), "min_history_days": 0.5}
    planner, clock = planner_at(25, **kwargs)
    # Period [20, 30): budget 100 MB at day 20, 5 MB/day: runs out at day 40, after the reset → fine.
    hours = [20 + h / 24 for h in range(0, 121, 6)]
    feed(planner, "s", BANDWIDTH, [0, 5, 10], [100.0, 0.0, 100.0])  # older periods are ignored
    feed(planner, "s", BANDWIDTH, hours, [100.0 - 5.0 * (d - 20) for d in hours])
    f = planner.forecast_exhaustion("s", BANDWIDTH)
    assert f is not None and f.days_remaining is None and f.risk_level is RiskLevel.NOMINAL
    feed(planner, "t", BANDWIDTH, hours, [30.0 - 5.0 * (d - 20) for d in hours])  # empty at day 26
    f = planner.forecast_exhaustion("t", BANDWIDTH)
    assert f is not None and f.days_remaining == pytest.approx(1.0) and f.risk_level is RiskLevel.CRITICAL
    clock.set(day(30.5))  # a new period without snapshots yet
    assert "current bandwidth period" in planner.forecast_exhaustion_detailed("t", BANDWIDTH).reason
    assert planner.fleet_insufficient()[("t", BANDWIDTH)].startswith("insufficient history")
    # Without a period the same series is a plain depleting budget.
    plain, _ = planner_at(25, min_history_days=0.5)
    feed(plain, "s", BANDWIDTH, hours, [100.0 - 5.0 * (d - 20) for d in hours])
    f = plain.forecast_exhaustion("s", BANDWIDTH)
    assert f is not None and f.days_remaining == pytest.approx(15.0)


def test_a_daily_bandwidth_budget_is_forecast_with_the_default_history_rules() -> None:
    """The README's daily budget never holds the default day of snapshots: a budget running out within
    the hour got no forecast at all, however late in the day."""
    planner, clock = planner_at(20 + 15.5 / 24, bandwidth_period_days=1.0, bandwidth_period_anchor=day(0))
    hours = [20 + h / 24 for h in range(16)]  # 00:00 to 15:00, 6 GB an hour out of 100
    feed(planner, "s", BANDWIDTH, hours, [100.0 - 6.0 * h for h in range(16)])
    f = planner.forecast_exhaustion("s", BANDWIDTH)
    assert f is not None and f.risk_level is RiskLevel.CRITICAL
    assert f.days_remaining == pytest.approx((16 + 2 / 3 - 15.5) / 24)  # empty at 16:40
    assert f.confidence == pytest.approx(15 / 24), "a whole period is full history, not a week"
    assert planner.get_fleet_risk_summary()[RiskLevel.CRITICAL] == ["s"]
    # Right after the reset, two hours of snapshots are still too few (a tenth of the period).
    clock.set(day(21 + 2.5 / 24))
    feed(planner, "s", BANDWIDTH, [21 + h / 24 for h in range(3)], [100.0, 94.0, 88.0])
    reason = planner.forecast_exhaustion_detailed("s", BANDWIDTH).reason
    assert reason.startswith("insufficient history: 0.0833 day(s)") and reason.endswith("need at least 0.1")
    # Other resources keep the default day.
    feed(planner, "f", FUEL, hours, [50.0 - h for h in range(16)])
    assert "need at least 1" in planner.forecast_exhaustion_detailed("f", FUEL).reason


# ---- step changes and robustness ------------------------------------------------------------------


def burn_series() -> tuple[list[float], list[float]]:
    """Hourly fuel for 30 days at 0.5 kg/day with a 40 kg burn between day 14 and day 14.5."""
    rng = np.random.default_rng(3)
    days = [h / 24 for h in range(30 * 24 + 1)]
    values = []
    for d in days:
        burnt = 40.0 * min(1.0, max(0.0, (d - 14.0) / 0.5))
        values.append(100.0 - 0.5 * d - burnt + float(rng.normal(0.0, 0.05)))
    return days, values


def test_unrecorded_burn_fools_least_squares_not_the_robust_fit() -> None:
    days, values = burn_series()  # 45 kg left at day 30 → 90 days at 0.5 kg/day
    robust, _ = planner_at(30)
    ols, _ = planner_at(30, robust=False)
    for planner in (robust, ols):
        feed(planner, "s", FUEL, days, values)
    good = robust.forecast_exhaustion("s", FUEL)
    bad = ols.forecast_exhaustion("s", FUEL)
    assert good is not None and bad is not None
    assert good.rate_per_day == pytest.approx(0.5, rel=0.05)
    assert good.days_remaining == pytest.approx(90.0, rel=0.05)
    assert good.risk_level is RiskLevel.NOMINAL
    # Least squares reads the burn as a steep rate: roughly a third of the true time, a false alarm.
    assert bad.rate_per_day > 1.5
    assert bad.days_remaining is not None and bad.days_remaining < 35.0
    assert bad.risk_level is not RiskLevel.NOMINAL


def test_recorded_burn_is_removed_before_fitting() -> None:
    days, values = burn_series()
    burn = MissionScheduleEntry("burn", "s", day(14), day(14.5), {FUEL: 40.0})
    for robust in (True, False):
        planner, _ = planner_at(30, robust=robust)
        planner.add_scheduled_mission(burn)
        feed(planner, "s", FUEL, days, values)
        f = planner.forecast_exhaustion("s", FUEL)
        assert f is not None
        assert f.rate_per_day == pytest.approx(0.5, rel=0.05)
        assert f.days_remaining == pytest.approx(90.0, rel=0.05)
        assert f.current_value == pytest.approx(45.0, abs=0.3)
        assert f.mission_ids == ()  # the burn is history, not a planned impact


def test_burn_in_progress_counts_its_remaining_part() -> None:
    planner, _ = planner_at(30)
    days = list(range(31))
    # A 20 kg burn over days 29..31: half of it is in the data already.
    feed(planner, "s", FUEL, days, [100.0 - d - 10.0 * max(0.0, d - 29.0) for d in days])
    planner.add_scheduled_mission(MissionScheduleEntry("burn", "s", day(29), day(31), {FUEL: 20.0}))
    f = planner.forecast_exhaustion("s", FUEL)
    assert f is not None
    assert f.rate_per_day == pytest.approx(1.0)
    assert f.scheduled_impact == pytest.approx(10.0)
    # 60 kg at day 30; the last day of the burn takes 11 kg, then 1 kg/day: 1 + 49 days.
    assert f.days_remaining == pytest.approx(50.0)


def test_uncertainty_interval_from_fit_error_wider_for_longer_horizons() -> None:
    rng = np.random.default_rng(5)
    days = np.arange(0, 30.0, 1 / 24)
    noise = rng.normal(0.0, 1.0, days.size)
    for robust in (True, False):
        planner, _ = planner_at(30, robust=robust)
        feed(planner, "near", FUEL, days, 100.0 - 2.0 * days + noise)  # ~20 days left
        feed(planner, "far", FUEL, days, 220.0 - 2.0 * days + noise)  # ~80 days left
        near = planner.forecast_exhaustion("near", FUEL)
        far = planner.forecast_exhaustion("far", FUEL)
        assert near is not None and far is not None
        for f in (near, far):
            assert f.days_remaining_p10 is not None and f.days_remaining_p90 is not None
            assert f.days_remaining_p10 < f.days_remaining_p50 < f.days_remaining_p90  # type: ignore[operator]
            assert f.days_remaining_p50 == f.days_remaining
            assert 0.0 < f.confidence <= 1.0
        assert near.days_remaining == pytest.approx(20.0, rel=0.05)
        assert far.days_remaining == pytest.approx(80.0, rel=0.05)
        assert far.days_remaining_p10 is not None and near.days_remaining_p10 is not None
        assert far.days_remaining_p90 is not None and near.days_remaining_p90 is not None
        far_width = far.days_remaining_p90 - far.days_remaining_p10
        near_width = near.days_remaining_p90 - near.days_remaining_p10
        assert far_width > 2.0 * near_width


def test_nearly_flat_resource_has_open_ended_optimistic_bound() -> None:
    rng = np.random.default_rng(8)
    days = np.arange(0, 30.0, 0.25)
    planner, _ = planner_at(30)
    feed(planner, "s", POWER, days, 1000.0 - 0.01 * days + rng.normal(0.0, 5.0, days.size))
    f = planner.forecast_exhaustion("s", POWER)
    assert f is not None and f.days_remaining_p90 is None and f.risk_level is RiskLevel.NOMINAL


# ---- fleet -----------------------------------------------------------------------------------------


def mixed_fleet(robust: bool) -> CapacityPlanner:
    """Series of different lengths, resources, units, missions and noise."""
    rng = np.random.default_rng(11)
    planner, _ = planner_at(
        40,
        robust=robust,
        default_storage_capacity=800.0,
        bandwidth_period_days=30.0,
        bandwidth_period_anchor=day(0),
    )
    for i in range(12):
        sat = f"sat-{i:02d}"
        for resource in ResourceType:
            n = int(rng.integers(3, 400))
            days = np.sort(rng.choice(np.arange(0, 40 * 24) / 24, size=n, replace=False))
            level = float(rng.uniform(100, 700))
            rate = float(rng.uniform(-1, 25))
            values = np.clip(level - rate * days + rng.normal(0, 2.0, n), 0.0, None)
            if resource is STORAGE:
                values = np.clip(800.0 - values, 0.0, None)
            feed(planner, sat, resource, days, values)
        if i % 3 == 0:
            planner.add_scheduled_mission(
                MissionScheduleEntry(f"m-{i}", sat, day(10), day(11), {FUEL: 20.0, STORAGE: 5.0})
            )
            planner.add_scheduled_mission(
                MissionScheduleEntry(f"n-{i}", sat, day(42), day(45), {FUEL: 30.0, POWER: 10.0})
            )
    return planner


@pytest.mark.parametrize("robust", [True, False])
def test_fleet_path_agrees_with_single_series_path(robust: bool) -> None:
    planner = mixed_fleet(robust)
    fleet = planner.forecast_fleet()
    insufficient = planner.fleet_insufficient()
    assert len(fleet) + len(insufficient) == 48
    assert len(fleet) > 40
    for f in fleet:
        single = planner.forecast_exhaustion(f.satellite_id, f.resource_type)
        assert single is not None
        assert single.risk_level is f.risk_level
        assert single.mission_ids == f.mission_ids
        for name in ("days_remaining", "days_remaining_p10", "days_remaining_p90"):
            a, b = getattr(single, name), getattr(f, name)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9, abs=1e-9)
        assert single.rate_per_day == pytest.approx(f.rate_per_day, rel=1e-9, abs=1e-12)
        assert single.confidence == pytest.approx(f.confidence, rel=1e-9, abs=1e-12)
    # The per-satellite list is the same computation again.
    per_sat = planner.satellite_forecasts("sat-03")
    assert [f.resource_type for f in per_sat] == sorted(f.resource_type for f in per_sat)
    assert all(f.satellite_id == "sat-03" for f in per_sat)


def test_fleet_block_cache_is_invalidated_by_new_data() -> None:
    planner = mixed_fleet(True)
    before = {(f.satellite_id, f.resource_type): f for f in planner.forecast_fleet()}
    again = {(f.satellite_id, f.resource_type): f for f in planner.forecast_fleet()}
    assert before == again
    feed(planner, "sat-01", POWER, [39.95], [0.0])
    cached = planner.forecast_fleet()
    planner.clear_caches()
    assert cached == planner.forecast_fleet()
    planner.clear_caches(block_means=True)  # rebuilt from the raw points: the very same numbers
    assert cached == planner.forecast_fleet()
    changed = {(f.satellite_id, f.resource_type): f for f in cached}
    assert changed[("sat-01", POWER)].current_value == 0.0
    assert changed[("sat-01", POWER)] != before[("sat-01", POWER)]
    # One snapshot at a time leaves the series to be rebuilt by the next computation.
    planner.ingest_snapshot(ResourceSnapshot("sat-02", FUEL, day(39.97), 1.0, "kg"))
    assert planner.forecast_exhaustion("sat-02", FUEL).current_value == 1.0  # type: ignore[union-attr]
    fleet = {(f.satellite_id, f.resource_type): f for f in planner.forecast_fleet()}
    assert fleet[("sat-02", FUEL)] == planner.forecast_exhaustion("sat-02", FUEL)


_MAD_TO_SIGMA = 1.482602218505602
_Z90 = 1.2815515655446004
_Burn = tuple[float, float, float]  # (start day, end day, kg), absolute days


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs)))


def _done(s: float, e: float, t: float) -> float:
    return min(1.0, max(0.0, (t - s) / (e - s)))


def reference_forecast(
    days: Sequence[float],
    values: Sequence[float],
    now: float,
    *,
    robust: bool,
    capacity: float | None = None,
    burns: Sequence[_Burn] = (),
) -> tuple[float | None, float | None, float | None]:
    """(P50, P10, P90) days remaining of one series, written from the model's description alone.

    `capacity` makes the values storage used (remaining = capacity − used); `burns` are recorded
    missions: before the newest snapshot their realised part is added back before fitting."""
    last = days[-1]
    t = [d - last for d in days]
    y = [capacity - v if capacity is not None else v for v in values]
    y = [
        v + sum(a * _done(s - last, e - last, ti) for s, e, a in burns if s < last) for ti, v in zip(t, y, strict=True)
    ]
    adjust = sum(a * _done(s - last, e - last, 0.0) for s, e, a in burns if s < last)
    n = len(t)
    if robust:
        blocks = min(n, 24)
        cuts = [(b * n) // blocks for b in range(blocks + 1)]
        nb = [cuts[b + 1] - cuts[b] for b in range(blocks)]
        tb = [sum(t[cuts[b] : cuts[b + 1]]) / nb[b] for b in range(blocks)]
        yb = [sum(y[cuts[b] : cuts[b + 1]]) / nb[b] for b in range(blocks)]
        lag = max(1, blocks // 4)
        slope = _median([(yb[k + lag] - yb[k]) / (tb[k + lag] - tb[k]) for k in range(blocks - lag)])
        keep = min(blocks, max(2, blocks // 4))
        level = _median([yb[k] - slope * tb[k] for k in range(blocks - keep, blocks)])
        resid = [yb[k] - level - slope * tb[k] for k in range(blocks)]
        diff = [resid[k + 1] - resid[k] for k in range(blocks - 1)]
        mid = _median(diff)
        sigma = _MAD_TO_SIGMA * _median([abs(d - mid) for d in diff]) * math.sqrt(n / blocks / 2.0)
        tm = sum(k * b for k, b in zip(nb, tb, strict=True)) / n
        sxx = sum(k * (b - tm) ** 2 for k, b in zip(nb, tb, strict=True))
    else:
        tm, ym = sum(t) / n, sum(y) / n
        sxx = sum((a - tm) ** 2 for a in t)
        slope = sum((a - tm) * (b - ym) for a, b in zip(t, y, strict=True)) / sxx
        level = ym - slope * tm
        ssr = sum((b - level - slope * a) ** 2 for a, b in zip(t, y, strict=True))
        sigma = math.sqrt(ssr / (n - 2)) if n > 2 else 0.0
    se_slope = sigma / math.sqrt(sxx)
    se_level = sigma * math.sqrt(1.0 / n + tm * tm / sxx)
    rate = -slope
    level -= adjust
    ramps = [(s - last, e - last, a) for s, e, a in burns]

    def remaining(lv: float, rt: float, x: float) -> float:
        return lv - rt * x - sum(a * (_done(s, e, x) - _done(s, e, 0.0)) for s, e, a in ramps)

    def days_left(lv: float, rt: float) -> float | None:
        # Remaining is linear between the mission edges: find the first segment that reaches zero.
        edges = sorted({0.0, *(p for s, e, _ in ramps for p in (s, e) if p > 0.0)})
        hit = None
        for x0, x1 in itertools.pairwise(edges):
            r0, r1 = remaining(lv, rt, x0), remaining(lv, rt, x1)
            if r0 <= 0.0:
                hit = x0
                break
            if r1 <= 0.0:
                hit = x0 + (x1 - x0) * r0 / (r0 - r1)
                break
        else:
            r0 = remaining(lv, rt, edges[-1])
            hit = edges[-1] if r0 <= 0.0 else (edges[-1] + r0 / rt if rt > 0.0 else None)
        if hit is None:
            return None
        left = max(hit - (now - last), 0.0)
        return left if left <= 3650.0 else None

    return (
        days_left(level, rate),
        days_left(level - _Z90 * se_level, rate + _Z90 * se_slope),
        days_left(level + _Z90 * se_level, rate - _Z90 * se_slope),
    )


@pytest.mark.parametrize("robust", [True, False])
def test_fleet_forecasts_match_a_plain_per_series_reference(robust: bool) -> None:
    """The vectorised fleet path against `reference_forecast`, series by series (P10/P50/P90), on a
    random fleet with unrecorded steps, recorded past, running and future burns, storage and short
    series; and against `forecast_exhaustion` of a planner fed one snapshot at a time that never
    computed the fleet."""
    rng = np.random.default_rng(23)
    now = 60.0
    fleet, _ = planner_at(now, robust=robust, default_storage_capacity=1000.0)
    single, _ = planner_at(now, robust=robust, default_storage_capacity=1000.0)
    expected: dict[tuple[str, ResourceType], tuple[float | None, float | None, float | None]] = {}
    burns_of: dict[str, list[_Burn]] = {}
    for i in range(30):
        sat = f"sat-{i:02d}"
        burns: list[_Burn] = []
        if i % 3 == 0:
            burns.append((float(rng.uniform(5, 40)), float(rng.uniform(41, 50)), float(rng.uniform(20, 60))))
        if i % 4 == 0:
            burns.append((59.0, 61.5, float(rng.uniform(10, 40))))  # running now
        if i % 5 == 0:
            start = float(rng.uniform(61, 80))
            burns.append((start, start + float(rng.uniform(0.5, 3)), float(rng.uniform(20, 200))))
        burns_of[sat] = burns
        for j, burn in enumerate(burns):
            mission = MissionScheduleEntry(f"{sat}-m{j}", sat, day(burn[0]), day(burn[1]), {FUEL: burn[2]})
            fleet.add_scheduled_mission(mission)
            single.add_scheduled_mission(mission)
        for resource in ResourceType:
            n = int(rng.choice([3, 10, 23, 24, 25, 100, 500, 700]))
            days = np.sort(rng.choice(np.arange(0, 58 * 24) / 24, size=n, replace=False))
            level = float(rng.uniform(300, 900))
            remaining = level - float(rng.uniform(-2, 20)) * days + rng.normal(0, 3.0, n)
            if rng.random() < 0.3:  # an unrecorded step somewhere in the history
                remaining -= rng.uniform(20, 100) * (days >= rng.uniform(days[0], days[-1]))
            recorded = burns if resource is FUEL else []
            remaining -= sum(a * np.clip((days - s) / (e - s), 0, 1) for s, e, a in recorded if s < days[-1])
            remaining = np.clip(remaining, 0.0, None)
            values = np.clip(1000.0 - remaining, 0.0, None) if resource is STORAGE else remaining
            fleet.ingest_series(sat, resource, UNITS[resource], [datetime_to_us(day(d)) for d in days], values)
            for d, v in zip(days, values, strict=True):
                single.ingest_snapshot(ResourceSnapshot(sat, resource, day(float(d)), float(v), UNITS[resource]))
            expected[(sat, resource)] = reference_forecast(
                list(days),
                list(values),
                now,
                robust=robust,
                capacity=1000.0 if resource is STORAGE else None,
                burns=recorded,
            )
    forecasts = fleet.forecast_fleet()
    assert len(forecasts) == 120
    assert fleet.forecast_fleet() == forecasts  # warm: the kept fits
    fleet.clear_caches(block_means=True)
    assert fleet.forecast_fleet() == forecasts  # rebuilt from the raw points
    levels = set()
    for f in forecasts:
        key = (f.satellite_id, f.resource_type)
        p50, p10, p90 = expected[key]
        assert f.days_remaining_p50 == f.days_remaining
        for got, want in ((f.days_remaining, p50), (f.days_remaining_p10, p10), (f.days_remaining_p90, p90)):
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-7, abs=1e-7), key
        assert f.risk_level is classify_risk_level(p50)
        levels.add(f.risk_level)
        # Same points by another ingest path, one series at a time: the very same forecast.
        assert single.forecast_exhaustion(*key) == f
    assert levels == set(RiskLevel)
    # Every kind of burn is in there, and the summary is the forecasts' worst level per satellite.
    assert any(b[0] < 60.0 < b[1] for bs in burns_of.values() for b in bs)
    summary = fleet.get_fleet_risk_summary()
    worst: dict[str, RiskLevel] = {}
    for f in forecasts:
        worst[f.satellite_id] = max(worst.get(f.satellite_id, RiskLevel.NOMINAL), f.risk_level)
    assert summary == {level: sorted(s for s, w in worst.items() if w is level) for level in RiskLevel}


def python_block_fit(t: list[float], y: list[float]) -> tuple[float, float]:
    """An independent plain implementation of the robust fit: (slope, level at t = 0)."""
    n = len(t)
    blocks = min(n, 24)
    tb, yb = [], []
    for b in range(blocks):
        lo, hi = (b * n) // blocks, ((b + 1) * n) // blocks
        tb.append(sum(t[lo:hi]) / (hi - lo))
        yb.append(sum(y[lo:hi]) / (hi - lo))
    lag = max(1, blocks // 4)
    slope = float(np.median([(yb[k + lag] - yb[k]) / (tb[k + lag] - tb[k]) for k in range(blocks - lag)]))
    keep = min(blocks, max(2, blocks // 4))
    level = float(np.median([yb[k] - slope * tb[k] for k in range(blocks - keep, blocks)]))
    return slope, level


def test_robust_fit_matches_plain_implementation() -> None:
    rng = np.random.default_rng(2)
    for n in (3, 7, 24, 25, 100, 721):
        planner, _ = planner_at(50, min_history_days=0.0)
        days = np.sort(rng.choice(np.arange(0, 50 * 24) / 24, size=n, replace=False))
        values = 500.0 - 3.0 * days + rng.normal(0, 4.0, n)
        feed(planner, "s", FUEL, days, values)
        rate = planner.compute_consumption_rate("s", FUEL)
        assert rate is not None
        slope, level = python_block_fit(list(days - days[-1]), list(values))
        assert rate.rate_per_day == pytest.approx(-slope, rel=1e-9)
        f = planner.forecast_exhaustion("s", FUEL)
        assert f is not None and f.days_remaining is not None
        now_rel = 50.0 - float(days[-1])
        assert f.days_remaining == pytest.approx(max(level / -slope - now_rel, 0.0), rel=1e-9)


def test_ols_mode_matches_linear_regression_helper() -> None:
    rng = np.random.default_rng(4)
    days = np.sort(rng.uniform(0, 20, 50))
    values = 300.0 - 4.0 * days + rng.normal(0, 3.0, 50)
    planner, _ = planner_at(20, robust=False)
    feed(planner, "s", FUEL, days, values)
    slope, _intercept, r2 = linear_regression(days, values)
    rate = planner.compute_consumption_rate("s", FUEL)
    assert rate is not None
    assert rate.rate_per_day == pytest.approx(-slope, rel=1e-9)
    span = days[-1] - days[0]
    assert rate.confidence == pytest.approx(r2 * min(1.0, span / 7.0), rel=1e-9)


def test_fleet_risk_summary_groups_by_worst_resource() -> None:
    planner, _ = planner_at(30, default_storage_capacity=1000.0)
    linear(planner, "a", FUEL, 100.0, 3.0)  # 10 left → 3.3 days: CRITICAL
    linear(planner, "a", POWER, 1000.0, 1.0)  # NOMINAL
    linear(planner, "b", FUEL, 100.0, 2.0)  # 40 left → 20 days: WARNING
    linear(planner, "c", POWER, 150.0, 2.5)  # 75 left → 30 days: WATCH (boundary)
    linear(planner, "c", BANDWIDTH, 1000.0, 1.0)  # NOMINAL
    linear(planner, "d", STORAGE, 100.0, -1.0)  # storage used growing 1/day: 870 days
    linear(planner, "e", POWER, 100.0, 1.0)  # 70 left → 70 days: NOMINAL
    feed(planner, "young", FUEL, [29.9], [1.0])  # no forecast: not listed
    summary = planner.get_fleet_risk_summary()
    assert summary == {
        RiskLevel.CRITICAL: ["a"],
        RiskLevel.WARNING: ["b"],
        RiskLevel.WATCH: ["c"],
        RiskLevel.NOMINAL: ["d", "e"],
    }
    assert planner.known_satellites() == ["a", "b", "c", "d", "e", "young"]
    assert planner.satellites_without_forecast() == ["young"]


def test_critical_forecasts_filtered_and_sorted_by_urgency() -> None:
    planner, _ = planner_at(30)
    linear(planner, "a", FUEL, 100.0, 3.0)  # 3.33 days
    linear(planner, "b", FUEL, 100.0, 3.2)  # 1.25 days
    linear(planner, "b", POWER, 100.0, 2.9)  # 4.48 days
    linear(planner, "c", FUEL, 100.0, 2.0)  # 20 days
    linear(planner, "d", FUEL, 44.0, 1.0)  # 14 left at 1/day: 14 days exactly, WARNING, not critical
    got = planner.get_critical_forecasts()
    assert [(f.satellite_id, f.resource_type) for f in got] == [("b", FUEL), ("a", FUEL), ("b", POWER)]
    assert all(f.risk_level is RiskLevel.CRITICAL for f in got)
    wider = planner.get_critical_forecasts(max_days=30.0)
    assert [f.satellite_id for f in wider] == ["b", "a", "b", "d", "c"]
    assert planner.get_critical_forecasts(max_days=1.0) == []


def test_risk_changes_detects_transitions() -> None:
    planner, clock = planner_at(30)
    linear(planner, "a", FUEL, 100.0, 2.0)  # 20 days: WARNING
    linear(planner, "b", POWER, 1000.0, 1.0)  # NOMINAL
    changes, state = planner.risk_changes({})
    assert [(c.satellite_id, c.previous_risk_level, c.risk_level) for c in changes] == [("a", None, RiskLevel.WARNING)]
    assert not changes[0].entered_critical
    assert state == {("a", FUEL): RiskLevel.WARNING, ("b", POWER): RiskLevel.NOMINAL}
    assert planner.risk_changes(state)[0] == []
    clock.advance(days=7)  # 13 days left now
    changes, state = planner.risk_changes(state)
    assert [(c.satellite_id, c.previous_risk_level, c.risk_level) for c in changes] == [
        ("a", RiskLevel.WARNING, RiskLevel.CRITICAL)
    ]
    assert changes[0].entered_critical and changes[0].forecast.days_remaining == pytest.approx(13.0)
    everything, _ = planner.risk_changes({}, unknown_as=None)
    assert len(everything) == 2
    forecasts = planner.forecast_fleet()
    assert risk_levels(forecasts) == state
    assert diff_risk_levels(state, forecasts) == []


# ---- interventions ---------------------------------------------------------------------------------


def intervention_planner() -> CapacityPlanner:
    planner, _ = planner_at(30, default_storage_capacity=1000.0)
    linear(planner, "s", FUEL, 100.0, 2.0)  # 40 kg, 20 days
    planner.add_scheduled_mission(MissionScheduleEntry("burn-a", "s", day(32), day(33), {FUEL: 10.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("burn-b", "s", day(35), day(36), {FUEL: 4.0}))
    planner.add_scheduled_mission(MissionScheduleEntry("late", "s", day(90), day(91), {FUEL: 4.0}))
    linear(planner, "s", POWER, 100.0, 2.5)  # 25 left → 10 days
    linear(planner, "s", STORAGE, 100.0, -25.0)  # used 850 at day 30 → 150 free, 6 days
    linear(planner, "s", BANDWIDTH, 100.0, 1.5)  # 55 left → 36.7 days: WATCH
    return planner


def test_interventions_for_all_four_resources_with_computed_days_gained() -> None:
    planner = intervention_planner()
    fuel = planner.forecast_exhaustion("s", FUEL)
    assert fuel is not None and fuel.days_remaining == pytest.approx(13.0)  # (40 − 14) / 2
    got = planner.recommend_interventions("s")
    by_action = {d["action"]: d for d in got}
    assert set(by_action) == {
        "defer_burn",
        "reduce_burns",
        "lower_payload_duty_cycle",
        "purge_storage",
        "prioritise_downlink",
        "prioritise_communication_windows",
    }
    defer = [d for d in got if d["action"] == "defer_burn"]
    # The bigger burn first; deferring it gains its 10 kg at 2 kg/day.
    assert [d["mission_ids"] for d in defer] == [["burn-a"], ["burn-b"]]
    assert defer[0]["days_gained"] == pytest.approx(5.0)
    assert defer[1]["days_gained"] == pytest.approx(2.0)
    assert by_action["reduce_burns"]["mission_ids"] == ["burn-a", "burn-b"]
    assert by_action["reduce_burns"]["days_gained"] == pytest.approx(0.2 * 14.0 / 2.0)
    # Power: 25 Wh at 2.5 Wh/day → 10 days; a 25 % lower duty cycle → 13.33 days.
    assert by_action["lower_payload_duty_cycle"]["days_gained"] == pytest.approx(10.0 / 0.75 - 10.0)
    # Storage: purging 20 % of 850 GB frees 170 GB = 6.8 days at 25 GB/day.
    assert by_action["purge_storage"]["days_gained"] == pytest.approx(6.8)
    assert by_action["prioritise_downlink"]["days_gained"] == pytest.approx(6.0 / 0.75 - 6.0)
    bw = by_action["prioritise_communication_windows"]
    assert bw["risk_level"] is RiskLevel.WATCH
    assert bw["days_gained"] == pytest.approx((55.0 / 1.5) / 0.75 - 55.0 / 1.5)
    # Most urgent resource first.
    assert [d["resource_type"] for d in got][:2] == [STORAGE, STORAGE]
    assert got[-1]["resource_type"] is BANDWIDTH
    assert planner.recommend_interventions("ghost") == []


def test_fuel_without_burns_recommends_reducing_consumption() -> None:
    planner, _ = planner_at(30, horizon_days=100.0)
    linear(planner, "s", FUEL, 100.0, 3.0)  # 10 kg left: 3.33 days
    linear(planner, "s", POWER, 1000.0, 1.0)  # NOMINAL: nothing to do
    got = planner.recommend_interventions("s")
    assert [d["action"] for d in got] == ["reduce_fuel_consumption"]
    assert got[0]["days_gained"] == pytest.approx((10.0 / 3.0) / 0.8 - 10.0 / 3.0)
    # An intervention that removes the exhaustion altogether gains up to the horizon.
    planner2, _ = planner_at(30, horizon_days=100.0)
    linear(planner2, "s", FUEL, 100.0, 0.0)
    planner2.add_scheduled_mission(MissionScheduleEntry("big", "s", day(31), day(32), {FUEL: 150.0}))
    (defer, reduce) = planner2.recommend_interventions("s")
    assert defer["action"] == "defer_burn" and defer["days_gained"] == pytest.approx(100.0 - 1.0 - 2 / 3)
    assert reduce["action"] == "reduce_burns"


# ---- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_history_points": 1},
        {"min_history_days": -1.0},
        {"horizon_days": 0.0},
        {"bandwidth_period_days": 0.0},
        {"bandwidth_period_anchor": datetime(2026, 1, 1)},
        {"storage_capacity": {"s": -5.0}},
        {"default_storage_capacity": math.inf},
        {"duty_cycle_reduction": 1.0},
        {"chunk_size": 0},
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CapacityPlanner(ManualClock(), **kwargs)  # type: ignore[arg-type]


def test_defaults_and_small_chunks() -> None:
    assert isinstance(CapacityPlanner()._clock, SystemClock)
    planner, _ = planner_at(40, chunk_size=3, default_storage_capacity=800.0)
    reference = mixed_fleet(True)
    for (sat, resource), series in reference._series.items():
        times, values = series.view()
        planner.ingest_series(sat, resource, series.unit, times, values)
    for mission in reference.missions():
        planner.add_scheduled_mission(mission)
    reference_fc = {(f.satellite_id, f.resource_type): f.days_remaining for f in reference.forecast_fleet()}
    got = {(f.satellite_id, f.resource_type): f.days_remaining for f in planner.forecast_fleet()}
    # Same data, different chunking: identical except bandwidth (no period configured here).
    for key, value in got.items():
        if key[1] is not BANDWIDTH:
            assert (value is None and reference_fc[key] is None) or value == pytest.approx(reference_fc[key])
    planner.clear_caches()
    assert isinstance(planner.forecast_fleet()[0], ExhaustionForecast)
