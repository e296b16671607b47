"""Capacity forecasting core: when does each satellite resource run out, and what to do about it.

This module is pure (numpy and the standard library only, time from an injected `Clock`). The gRPC
Capacity service, PostgreSQL persistence and NATS ingestion are built on top of it.

Resource semantics
------------------
Every series is turned into a *remaining* quantity that depletes towards zero:

* ``FUEL`` and ``POWER``: the snapshot value is what is left (kg, Wh, ...); remaining = value.
* ``STORAGE``: the snapshot value is storage *used*; remaining = capacity - value. The capacity is
  100 when the unit is ``"%"``; otherwise it comes from ``storage_capacity[satellite_id]`` or
  ``default_storage_capacity`` (same unit as the snapshots). Without a capacity no forecast is made
  (the detailed methods say why).
* ``BANDWIDTH``: the snapshot value is the downlink budget left in the current period. With
  ``bandwidth_period_days`` set, periods are fixed windows aligned to ``bandwidth_period_anchor``: only
  the current period's snapshots are fitted and a budget that would run out only after the period
  ends is not at risk (it resets). With ``bandwidth_period_days=None`` (default) the budget is treated
  as one non-resetting allowance, like fuel.

A mission's ``resource_impacts`` are planned *use* (positive) or gain (negative) of a resource, in the
resource's unit, spread evenly over ``[start_time, end_time]``; use always lowers what remains (for
storage it fills the store).

Forecast model
--------------
1. Past missions (those that started before the newest snapshot) are removed from the history before
   fitting: their recorded impact is added back over their window, so a burn does not look like a
   change of background rate. The consumption rate is therefore the *background* rate.
2. A line is fitted to remaining vs time. ``robust=True`` (the default) cuts each series into
   min(n, 24) blocks of consecutive points and works on the block means: the slope is the median of
   the slopes between block means ``max(1, blocks // 4)`` apart (a Sen-type estimator: Theil–Sen
   restricted to pairs a fixed lag apart, which a step change in the middle cannot capture the way it
   captures half of all Theil–Sen pairs), the level is the median of ``mean_y − slope·mean_t`` over
   the newest quarter of the blocks, and σ comes from the median absolute deviation of successive
   block-residual differences. All three ignore an unrecorded step such as a burn nobody told us
   about, and the per-point work is two sums, which the planner does when the points arrive (see
   below). `theil_sen` is the full O(n²) estimator for single series. ``robust=False`` is ordinary
   least squares over all points (Prometheus ``predict_linear``).
3. The level at the newest snapshot is projected forward with the background rate plus the not yet
   realised part of every scheduled mission; the first time remaining reaches zero is the exhaustion
   time. ``days_remaining`` counts from the clock's *now* (0 when already exhausted).
4. P10/P50/P90: the fit's standard errors of rate and level (from σ) give a pessimistic
   (level − z·se, rate + z·se) and optimistic (level + z·se, rate − z·se) scenario with z = 1.2816.
   Because days ≈ level / rate, the interval widens with the horizon. P50 is the point forecast.
5. A resource that is not depleting (or would run out only beyond ``horizon_days``, default ten years)
   has ``days_remaining=None``, ``predicted_exhaustion_date=None`` and is NOMINAL. The same ``None``
   in P10/P90 means "not within the horizon in that scenario".

Risk levels (`classify_risk_level`): CRITICAL when days < 14, WARNING when 14 <= days < 30, WATCH when
30 <= days < 60, NOMINAL when days >= 60 or not depleting.

The fleet path (`CapacityPlanner.forecast_fleet` and everything built on it) works on fleet-wide
arrays with one row per series (`_Table`): point counts, newest point and the robust fit's block means
are brought up to date when a bulk ingest stores points (a single-snapshot ingest leaves its row to the
next computation), and each row's fit is kept until its series changes. A fleet computation therefore
fits just the rows that changed, all at once from their block means, and the rest is array arithmetic
over the rows; rows whose history includes recorded past missions are refitted from their adjusted
points every time. The single-series path runs the very same code on one row, so the two agree by
construction (and the tests check both against a plain per-series implementation).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from aetherops.clock import EARLIEST_TIME, TOO_EARLY, Clock, SystemClock
from aetherops.errors import ConfigError, FieldViolation, ValidationError
from aetherops.text import id_problem, text_problem

__all__ = [
    "CRITICAL_DAYS",
    "MAX_DESCRIPTION_LEN",
    "MAX_SNAPSHOT_VALUE",
    "WARNING_DAYS",
    "WATCH_DAYS",
    "CapacityPlanner",
    "ConsumptionRate",
    "ExhaustionForecast",
    "ForecastResult",
    "IngestReport",
    "MissionScheduleEntry",
    "RateResult",
    "ResourceSnapshot",
    "ResourceType",
    "RiskChange",
    "RiskLevel",
    "aggregate_mission_impact",
    "classify_risk_level",
    "datetime_to_us",
    "diff_risk_levels",
    "interpolate_value",
    "linear_regression",
    "risk_levels",
    "theil_sen",
    "validate_mission",
    "validate_snapshot",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_US_PER_DAY = 86_400_000_000
MAX_SNAPSHOT_VALUE = 1e15
"""Largest snapshot value (and mission impact) accepted: beyond any real tank, battery, disk or link,
even a petabyte counted in bytes, and small enough that the forecast's sums of squares stay finite.
A value of 1e308 overflowed them and put NaN into forecasts."""
_EARLIEST_SNAPSHOT_US = int((EARLIEST_TIME - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
MAX_DESCRIPTION_LEN = 4096
"""Longest mission description, in characters."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# z such that P(Z < z) = 0.9 for a standard normal: the P10/P90 half-width in standard errors.
_Z90 = 1.2815515655446004
# 1.4826 * MAD estimates σ for normal noise.
_MAD_TO_SIGMA = 1.482602218505602

# A week of history gives a fit full confidence (less scales it down; see `_history_days`).
_FULL_HISTORY_DAYS = 7.0

#: Days-remaining boundaries of the risk levels (see `classify_risk_level`).
CRITICAL_DAYS = 14.0
WARNING_DAYS = 30.0
WATCH_DAYS = 60.0


class ResourceType(IntEnum):
    """A consumable resource; the numbers match the proto enum."""

    FUEL = 1
    POWER = 2
    STORAGE = 3
    BANDWIDTH = 4


class RiskLevel(IntEnum):
    """Risk by days remaining; ordered so that max() is the worst. Numbers match the proto enum."""

    NOMINAL = 1
    WATCH = 2
    WARNING = 3
    CRITICAL = 4


@dataclass(frozen=True)
class ResourceSnapshot:
    """One observation of one resource of one satellite (value in `unit`, timestamp tz-aware UTC)."""

    satellite_id: str
    resource_type: ResourceType
    timestamp: datetime
    value: float
    unit: str


@dataclass(frozen=True)
class ConsumptionRate:
    """Background consumption of a resource; positive `rate_per_day` means it is being used up."""

    satellite_id: str
    resource_type: ResourceType
    rate_per_day: float
    confidence: float
    sample_period_days: float
    sample_count: int = 0


@dataclass(frozen=True)
class ExhaustionForecast:
    """When a resource runs out. `days_remaining` etc. are None when it does not within the horizon."""

    satellite_id: str
    resource_type: ResourceType
    current_value: float
    predicted_exhaustion_date: datetime | None
    days_remaining: float | None
    risk_level: RiskLevel
    confidence: float
    recommended_action: str
    days_remaining_p10: float | None = None
    days_remaining_p50: float | None = None
    days_remaining_p90: float | None = None
    unit: str = ""
    rate_per_day: float = 0.0
    #: Sum of the scheduled mission impacts included in the forecast: of each mission (its impact spread
    #: evenly over its window), the part between the newest snapshot and the time the resource runs out
    #: (`_Row.runs_out`, also past the horizon), so nothing of a mission that starts later, and of one
    #: under way then only what comes before (the rest is never used and changes nothing the forecast
    #: says); when the resource never runs out, all that is still to come.
    scheduled_impact: float = 0.0
    #: The scheduled missions whose impacts are included (as for scheduled_impact).
    mission_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class MissionScheduleEntry:
    """A planned activity; `resource_impacts` maps a resource to its use (+) or gain (−) over the window."""

    mission_id: str
    satellite_id: str
    start_time: datetime
    end_time: datetime
    resource_impacts: Mapping[ResourceType, float] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        # A read-only copy, so a caller mutating its dict later cannot change a stored mission.
        object.__setattr__(self, "resource_impacts", MappingProxyType(dict(self.resource_impacts)))


@dataclass(frozen=True)
class IngestReport:
    """Outcome of a bulk ingest: stored, already-present and rejected (index, reason) snapshots."""

    accepted: int
    duplicates: int
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ForecastResult:
    """A forecast, or None with the reason (e.g. insufficient history)."""

    forecast: ExhaustionForecast | None
    reason: str = ""


@dataclass(frozen=True)
class RateResult:
    """A consumption rate, or None with the reason."""

    rate: ConsumptionRate | None
    reason: str = ""


@dataclass(frozen=True)
class RiskChange:
    """The risk level of one (satellite, resource) moved; `previous_risk_level` None = first seen."""

    satellite_id: str
    resource_type: ResourceType
    previous_risk_level: RiskLevel | None
    risk_level: RiskLevel
    forecast: ExhaustionForecast

    @property
    def entered_critical(self) -> bool:
        """True when the change is into CRITICAL (the service then also raises an alert)."""
        return self.risk_level is RiskLevel.CRITICAL and self.previous_risk_level is not RiskLevel.CRITICAL


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def datetime_to_us(when: datetime) -> int:
    """Microseconds since the Unix epoch of a tz-aware datetime (exact integer arithmetic)."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _us_to_datetime(us: float) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _as_float_vector(values: Sequence[float] | FloatArray, name: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def linear_regression(x: Sequence[float] | FloatArray, y: Sequence[float] | FloatArray) -> tuple[float, float, float]:
    """Ordinary least squares ``y ≈ slope·x + intercept``; returns (slope, intercept, r²).

    r² is 1.0 when y is constant (the line explains all of it). Raises ValueError for fewer than two
    points, mismatched lengths, non-finite input or identical x values — the engine checks these
    before calling and reports them as reasons instead.
    """
    xa = _as_float_vector(x, "x")
    ya = _as_float_vector(y, "y")
    if xa.shape != ya.shape:
        raise ValueError("x and y must have the same length")
    if xa.size < 2:
        raise ValueError("linear regression needs at least two points")
    xm = float(xa.mean())
    ym = float(ya.mean())
    dx = xa - xm
    dy = ya - ym
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("linear regression needs at least two distinct x values")
    slope = float(dx @ dy) / sxx
    intercept = ym - slope * xm
    resid = ya - (intercept + slope * xa)
    ss_res = float(resid @ resid)
    ss_tot = float(dy @ dy)
    r_squared = 1.0 if ss_tot == 0.0 else min(1.0, max(0.0, 1.0 - ss_res / ss_tot))
    return slope, intercept, r_squared


def theil_sen(x: Sequence[float] | FloatArray, y: Sequence[float] | FloatArray) -> tuple[float, float]:
    """Theil–Sen estimator: (median of all pairwise slopes, median of y − slope·x).

    Robust to up to ~29 % outliers and to step changes; O(n²) memory, meant for single series.
    Raises ValueError like `linear_regression`.
    """
    xa = _as_float_vector(x, "x")
    ya = _as_float_vector(y, "y")
    if xa.shape != ya.shape:
        raise ValueError("x and y must have the same length")
    i, j = np.triu_indices(xa.size, k=1)
    dx = xa[j] - xa[i]
    keep = dx != 0.0
    if not np.any(keep):
        raise ValueError("Theil-Sen needs at least two distinct x values")
    slope = float(np.median((ya[j] - ya[i])[keep] / dx[keep]))
    intercept = float(np.median(ya - slope * xa))
    return slope, intercept


def classify_risk_level(days_remaining: float | None) -> RiskLevel:
    """Map days remaining to a risk level.

    CRITICAL: days < 14 (including 0 and negative); WARNING: 14 <= days < 30; WATCH: 30 <= days < 60;
    NOMINAL: days >= 60, +inf, or None (not depleting). NaN is a programming error (ValueError).
    """
    if days_remaining is None:
        return RiskLevel.NOMINAL
    if math.isnan(days_remaining):
        raise ValueError("days_remaining must not be NaN")
    if days_remaining < CRITICAL_DAYS:
        return RiskLevel.CRITICAL
    if days_remaining < WARNING_DAYS:
        return RiskLevel.WARNING
    if days_remaining < WATCH_DAYS:
        return RiskLevel.WATCH
    return RiskLevel.NOMINAL


def _classify_array(days: FloatArray) -> npt.NDArray[np.int64]:
    """Vectorised `classify_risk_level`; NaN stands for None (not depleting)."""
    levels = np.full(days.shape, int(RiskLevel.NOMINAL), dtype=np.int64)
    finite = ~np.isnan(days)
    levels[finite & (days < WATCH_DAYS)] = int(RiskLevel.WATCH)
    levels[finite & (days < WARNING_DAYS)] = int(RiskLevel.WARNING)
    levels[finite & (days < CRITICAL_DAYS)] = int(RiskLevel.CRITICAL)
    return levels


def interpolate_value(snapshots: Sequence[ResourceSnapshot], target_time: datetime) -> float | None:
    """Linearly interpolated value at `target_time` between the bracketing snapshots.

    Order of `snapshots` does not matter; non-finite values are skipped. Returns the exact value on a
    snapshot time, and None when there are no usable snapshots or the time is outside their range
    (extrapolation is what the forecast is for).
    """
    points = sorted((datetime_to_us(s.timestamp), float(s.value)) for s in snapshots if math.isfinite(s.value))
    if not points:
        return None
    target = datetime_to_us(target_time)
    if target < points[0][0] or target > points[-1][0]:
        return None
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= target <= t1:
            if t1 == t0 or target == t0:
                return v0
            return v0 + (v1 - v0) * (target - t0) / (t1 - t0)
    return points[-1][1]  # single point, target equal to it


def _fraction_done(start_us: float, end_us: float, t_us: float) -> float:
    """Share of a mission's impact realised by time t (linear over its window)."""
    if end_us <= start_us:
        return 1.0 if t_us >= start_us else 0.0
    return min(1.0, max(0.0, (t_us - start_us) / (end_us - start_us)))


def aggregate_mission_impact(
    entries: Iterable[MissionScheduleEntry],
    satellite_id: str,
    resource_type: ResourceType,
    start: datetime,
    end: datetime,
) -> float:
    """Total impact on one resource of one satellite's missions within [start, end].

    A mission's impact is spread evenly over its window, so a mission half inside the range counts
    half. Missions of other satellites or without an impact on the resource count zero.
    """
    lo = datetime_to_us(start)
    hi = datetime_to_us(end)
    if hi < lo:
        return 0.0
    total = 0.0
    for entry in entries:
        if entry.satellite_id != satellite_id:
            continue
        amount = entry.resource_impacts.get(resource_type, 0.0)
        if amount == 0.0:
            continue
        s = datetime_to_us(entry.start_time)
        e = datetime_to_us(entry.end_time)
        total += amount * (_fraction_done(s, e, hi) - _fraction_done(s, e, lo))
        if e <= s and lo == s:  # an instantaneous mission exactly at the range start is inside it
            total += amount
    return total


def _coerce_resource(value: object) -> ResourceType | None:
    if isinstance(value, ResourceType):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return ResourceType(value)
        except ValueError:
            return None
    return None


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


_TOO_LARGE = f"must be at most {MAX_SNAPSHOT_VALUE:g}"


def validate_snapshot(
    snapshot: ResourceSnapshot, *, now: datetime, max_future_skew_s: float = 300.0
) -> list[FieldViolation]:
    """Every problem with one snapshot (empty list when it is fine). Stateless: unit consistency
    with already stored snapshots is checked by `CapacityPlanner`."""
    violations: list[FieldViolation] = []
    problem = id_problem(snapshot.satellite_id)
    if problem is not None:
        violations.append(FieldViolation("snapshot.satellite_id", problem))
    if _coerce_resource(snapshot.resource_type) is None:
        violations.append(FieldViolation("snapshot.resource_type", f"unknown resource type {snapshot.resource_type!r}"))
    if not _is_real(snapshot.value):
        violations.append(FieldViolation("snapshot.value", "must be a number"))
    elif not math.isfinite(float(snapshot.value)):
        violations.append(FieldViolation("snapshot.value", "must be finite"))
    elif float(snapshot.value) < 0.0:
        violations.append(FieldViolation("snapshot.value", "must not be negative"))
    elif float(snapshot.value) > MAX_SNAPSHOT_VALUE:
        violations.append(FieldViolation("snapshot.value", _TOO_LARGE))
    ts = snapshot.timestamp
    if not isinstance(ts, datetime):
        violations.append(FieldViolation("snapshot.timestamp", "must be a datetime"))
    elif ts.tzinfo is None or ts.utcoffset() is None:
        violations.append(FieldViolation("snapshot.timestamp", "must be timezone-aware"))
    elif ts < EARLIEST_TIME:
        violations.append(FieldViolation("snapshot.timestamp", TOO_EARLY))
    elif (ts - now).total_seconds() > max_future_skew_s:
        violations.append(FieldViolation("snapshot.timestamp", f"is more than {max_future_skew_s:g} s in the future"))
    problem = id_problem(snapshot.unit)
    if problem is not None:
        violations.append(FieldViolation("snapshot.unit", problem))
    return violations


def validate_mission(entry: MissionScheduleEntry) -> list[FieldViolation]:
    """Every problem with one mission (empty list when it is fine)."""
    violations: list[FieldViolation] = []
    for name in ("mission_id", "satellite_id"):
        problem = id_problem(getattr(entry, name))
        if problem is not None:
            violations.append(FieldViolation(f"mission.{name}", problem))
    problem = text_problem(entry.description, MAX_DESCRIPTION_LEN)
    if problem is not None:
        violations.append(FieldViolation("mission.description", problem))
    times_ok = True
    for name, when in (("start_time", entry.start_time), ("end_time", entry.end_time)):
        if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
            violations.append(FieldViolation(f"mission.{name}", "must be a timezone-aware datetime"))
            times_ok = False
        elif when < EARLIEST_TIME:  # a zeroed clock, as snapshots and alerts are refused for
            violations.append(FieldViolation(f"mission.{name}", TOO_EARLY))
            times_ok = False
    if times_ok and entry.end_time <= entry.start_time:
        violations.append(FieldViolation("mission.end_time", "must be after start_time"))
    for i, (resource, amount) in enumerate(entry.resource_impacts.items()):
        if _coerce_resource(resource) is None:
            violations.append(FieldViolation(f"mission.resource_impacts[{i}].resource_type", f"unknown {resource!r}"))
        if not _is_real(amount) or not math.isfinite(float(amount)):
            violations.append(FieldViolation(f"mission.resource_impacts[{i}].amount", "must be finite"))
        elif abs(float(amount)) > MAX_SNAPSHOT_VALUE:  # as a reading would: the forecast adds it up
            violations.append(FieldViolation(f"mission.resource_impacts[{i}].amount", f"{_TOO_LARGE} in magnitude"))
    return violations


def risk_levels(forecasts: Iterable[ExhaustionForecast]) -> dict[tuple[str, ResourceType], RiskLevel]:
    """The (satellite, resource) → risk level map of some forecasts: the state `diff_risk_levels` needs."""
    return {(f.satellite_id, f.resource_type): f.risk_level for f in forecasts}


def diff_risk_levels(
    previous: Mapping[tuple[str, ResourceType], RiskLevel],
    forecasts: Iterable[ExhaustionForecast],
    *,
    unknown_as: RiskLevel | None = RiskLevel.NOMINAL,
) -> list[RiskChange]:
    """The forecasts whose risk level differs from `previous`.

    A (satellite, resource) missing from `previous` is compared as `unknown_as` (NOMINAL by default, so
    a new series reports only if it is at risk; pass None to report every new series). Keys in
    `previous` without a forecast now (no longer forecastable) produce nothing.
    """
    changes: list[RiskChange] = []
    for f in forecasts:
        key = (f.satellite_id, f.resource_type)
        before = previous.get(key, unknown_as)
        if before is not f.risk_level:
            prev_reported = previous.get(key)
            changes.append(RiskChange(f.satellite_id, f.resource_type, prev_reported, f.risk_level, f))
    return changes


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------


class _Series:
    """One (satellite, resource) history: sorted unique int64 µs timestamps and float64 values in
    growable arrays (amortised O(1) append; about 16 bytes per point). `slot` is its row in the
    planner's `_Table`."""

    __slots__ = ("n", "slot", "times", "unit", "values")

    def __init__(self, unit: str, slot: int, capacity: int = 16) -> None:
        self.unit = unit
        self.slot = slot
        self.times: IntArray = np.empty(capacity, dtype=np.int64)
        self.values: FloatArray = np.empty(capacity, dtype=np.float64)
        self.n = 0

    def view(self) -> tuple[IntArray, FloatArray]:
        return self.times[: self.n], self.values[: self.n]

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        if need <= self.times.size:
            return
        cap = max(need, 2 * self.times.size)
        times = np.empty(cap, dtype=np.int64)
        values = np.empty(cap, dtype=np.float64)
        times[: self.n] = self.times[: self.n]
        values[: self.n] = self.values[: self.n]
        self.times, self.values = times, values

    def add(self, t_us: int, value: float) -> bool:
        """Store one point; False if a point with this timestamp exists already (kept as is)."""
        n = self.n
        if n == 0 or t_us > self.times[n - 1]:
            self._reserve(1)
            self.times[n] = t_us
            self.values[n] = value
            self.n = n + 1
            return True
        pos = int(np.searchsorted(self.times[:n], t_us))
        if pos < n and self.times[pos] == t_us:
            return False
        self._reserve(1)
        self.times[pos + 1 : n + 1] = self.times[pos:n]
        self.values[pos + 1 : n + 1] = self.values[pos:n]
        self.times[pos] = t_us
        self.values[pos] = value
        self.n = n + 1
        return True

    def add_many(self, t_us: IntArray, values: FloatArray) -> int:
        """Store sorted, unique-timestamp points; returns how many were new (existing ones kept)."""
        n = self.n
        if n and t_us.size:
            existing = self.times[:n]
            pos = np.searchsorted(existing, t_us)
            dup = existing[np.minimum(pos, n - 1)] == t_us
            if np.any(dup):
                t_us, values = t_us[~dup], values[~dup]
        m = int(t_us.size)
        if m == 0:
            return 0
        self._reserve(m)
        if n == 0 or t_us[0] > self.times[n - 1]:
            self.times[n : n + m] = t_us
            self.values[n : n + m] = values
        else:
            times = np.concatenate([self.times[:n], t_us])
            vals = np.concatenate([self.values[:n], values])
            order = np.argsort(times, kind="stable")
            self.times[: n + m] = times[order]
            self.values[: n + m] = vals[order]
        self.n = n + m
        return m


# --------------------------------------------------------------------------------------------------
# Vectorised fitting
# --------------------------------------------------------------------------------------------------


#: Blocks per series for the robust fit: block means make the per-point work two sums.
_BLOCKS = 24


@dataclass
class _Fit:
    slope: FloatArray
    intercept: FloatArray  # remaining at t = 0 (the newest snapshot)
    se_slope: FloatArray
    se_level: FloatArray
    r2: FloatArray


#: The per-row fit kept in `_Table.fit`, one column each.
_FIT_SLOPE, _FIT_LEVEL, _FIT_SE_SLOPE, _FIT_SE_LEVEL, _FIT_R2 = range(5)


def _fit_columns(fit: _Fit) -> FloatArray:
    """A `_Fit` as (rows, 5) columns in `_FIT_*` order."""
    return np.column_stack((fit.slope, fit.intercept, fit.se_slope, fit.se_level, fit.r2))


class _Table:
    """The fleet's per-series state in fleet-wide arrays, one row ("slot") per series, so that a fleet
    computation is a handful of array operations rather than a pass over per-series objects.

    A row's fit inputs — point count, first fitted point (`start`: the current bandwidth period's
    first point, else 0), first/newest timestamp, newest value and, for the robust fit, its block
    means — are *fresh* when they describe the series' current points. A write clears `fresh`; the
    planner rebuilds the row at the end of a bulk ingest, or at the next computation. `fitted` rows
    also hold their fit in `fit`, which depends on nothing but those points (rows whose points are
    adjusted for recorded past missions are fitted apart and never read from here).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.size = 0
        self.keys: list[tuple[str, ResourceType]] = []
        self.series: list[_Series] = []
        self.units: list[str] = []
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        old = self.size
        self.capacity = capacity

        def grown(arr: npt.NDArray[Any] | None, fill: Any, dtype: Any, width: int = 0) -> npt.NDArray[Any]:
            new = np.full((capacity, width) if width else capacity, fill, dtype=dtype)
            if arr is not None:
                new[:old] = arr[:old]
            return new

        get = self.__dict__.get
        self.sat: IntArray = grown(get("sat"), 0, np.int64)  # index into the planner's satellite list
        self.resource: IntArray = grown(get("resource"), 0, np.int64)
        self.storage: BoolArray = grown(get("storage"), False, np.bool_)  # STORAGE with a known capacity
        self.cap: FloatArray = grown(get("cap"), math.nan, np.float64)  # storage capacity (NaN: none)
        self.no_cap: BoolArray = grown(get("no_cap"), False, np.bool_)  # STORAGE, capacity unknown
        self.bandwidth: BoolArray = grown(get("bandwidth"), False, np.bool_)
        self.fresh: BoolArray = grown(get("fresh"), False, np.bool_)
        self.period: FloatArray = grown(get("period"), math.nan, np.float64)  # bandwidth period start used
        self.n: IntArray = grown(get("n"), 0, np.int64)
        self.start: IntArray = grown(get("start"), 0, np.int64)
        self.count: IntArray = grown(get("count"), 0, np.int64)  # n − start: the points fitted
        self.first_us: IntArray = grown(get("first_us"), 0, np.int64)
        self.last_us: IntArray = grown(get("last_us"), 0, np.int64)
        self.current: FloatArray = grown(get("current"), math.nan, np.float64)
        self.nblk: IntArray = grown(get("nblk"), 0, np.int64)
        # Block means (t in days before the newest point, y) and sizes; row i uses the first nblk[i].
        self.tb: FloatArray = grown(get("tb"), 0.0, np.float64, _BLOCKS)
        self.yb: FloatArray = grown(get("yb"), 0.0, np.float64, _BLOCKS)
        self.nb: FloatArray = grown(get("nb"), 1.0, np.float64, _BLOCKS)
        self.fitted: BoolArray = grown(get("fitted"), False, np.bool_)
        self.fit: FloatArray = grown(get("fit"), math.nan, np.float64, 5)

    def add(self, key: tuple[str, ResourceType], series: _Series, sat: int, cap: float | None) -> None:
        """Register a new series (its slot is the next row)."""
        if self.size == self.capacity:
            self._allocate(2 * self.capacity)
        i = self.size
        self.keys.append(key)
        self.series.append(series)
        self.units.append(series.unit)
        self.sat[i] = sat
        self.resource[i] = int(key[1])
        storage = key[1] is ResourceType.STORAGE
        self.storage[i] = storage and cap is not None
        self.no_cap[i] = storage and cap is None
        self.cap[i] = math.nan if cap is None or not storage else cap
        self.bandwidth[i] = key[1] is ResourceType.BANDWIDTH
        self.size = i + 1


def _row_offsets(counts: IntArray) -> IntArray:
    offsets = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return offsets


def _fit_ols(t: FloatArray, y: FloatArray, counts: IntArray) -> _Fit:
    """Least squares per row of flat concatenated rows (t in days, 0 at each row's newest point)."""
    offsets = _row_offsets(counts)
    nf = counts.astype(np.float64)
    st = np.add.reduceat(t, offsets)
    sy = np.add.reduceat(y, offsets)
    tm = st / nf
    ym = sy / nf
    dt = t - np.repeat(tm, counts)
    dy = y - np.repeat(ym, counts)
    sxx = np.add.reduceat(dt * dt, offsets)
    sxy = np.add.reduceat(dt * dy, offsets)
    syy = np.add.reduceat(dy * dy, offsets)
    slope = sxy / sxx
    intercept = ym - slope * tm
    ssr = np.maximum(syy - slope * sxy, 0.0)
    sigma = np.where(counts > 2, np.sqrt(ssr / np.maximum(nf - 2.0, 1.0)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(syy > 0.0, np.clip(1.0 - ssr / syy, 0.0, 1.0), 1.0)
    return _Fit(slope, intercept, sigma / np.sqrt(sxx), sigma * np.sqrt(1.0 / nf + tm * tm / sxx), r2)


def _block_sums(
    t_abs_us: IntArray, y: FloatArray, counts: IntArray, last_us: IntArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Block means of flat concatenated rows: each row is cut into min(n, 24) blocks of consecutive
    points (block k starts at floor(k·n/blocks)). Returns mean t (days before the row's newest point),
    mean y and size of every block, rows one after the other."""
    offsets = _row_offsets(counts)
    nblk = np.minimum(counts, _BLOCKS)
    row_of = np.repeat(np.arange(counts.size), nblk)
    k = np.arange(row_of.size) - np.repeat(np.cumsum(nblk) - nblk, nblk)
    bounds = offsets[row_of] + (k * counts[row_of]) // nblk[row_of]
    size = np.diff(np.append(bounds, t_abs_us.size))
    # Integer sums of absolute µs are exact and fast; beyond ~4,000 points a block could overflow
    # int64, so very long series take the (slightly slower) float64 path.
    if int(size.max(initial=0)) <= 4000:
        sum_t = np.add.reduceat(t_abs_us, bounds) - size * last_us[row_of]
    else:
        sum_t = np.add.reduceat(t_abs_us - np.repeat(last_us, counts), bounds, dtype=np.float64)
    sizef = size.astype(np.float64)
    return sum_t / sizef / _US_PER_DAY, np.add.reduceat(y, bounds) / sizef, sizef


def _pad_blocks(flat: FloatArray, nblk: IntArray, fill: float) -> FloatArray:
    """Flat per-row block values (rows one after the other, nblk[i] each) as a (rows, 24) array."""
    out = np.full((nblk.size, _BLOCKS), fill)
    row_of = np.repeat(np.arange(nblk.size), nblk)
    out[row_of, np.arange(flat.size) - np.repeat(np.cumsum(nblk) - nblk, nblk)] = flat
    return out


@functools.lru_cache(maxsize=1024)
def _block_layout(count: int) -> tuple[IntArray, FloatArray, bool]:
    """`_block_sums`' blocks of one row of `count` points: block starts, sizes, and whether integer
    sums of its timestamps are safe. Cached: series of a fleet mostly share a few lengths."""
    blocks = min(count, _BLOCKS)
    bounds = (np.arange(blocks, dtype=np.int64) * count) // blocks
    size = np.diff(np.append(bounds, count))
    bounds.setflags(write=False)
    sizef = size.astype(np.float64)
    sizef.setflags(write=False)
    return bounds, sizef, int(size.max()) <= 4000


def _block_times(t_abs_us: IntArray, bounds: IntArray, size: FloatArray, exact: bool) -> FloatArray:
    """Mean time of each block of one row in days before its newest point (as `_block_sums`)."""
    last = int(t_abs_us[-1])
    if exact:
        sum_t = np.add.reduceat(t_abs_us, bounds) - size.astype(np.int64) * last
    else:
        sum_t = np.add.reduceat(t_abs_us - last, bounds, dtype=np.float64)
    result: FloatArray = sum_t / size / _US_PER_DAY
    return result


def _fit_blocks(tb_all: FloatArray, yb_all: FloatArray, nb_all: FloatArray, nblk: IntArray, counts: IntArray) -> _Fit:
    """Robust fit of every row from its block means (see `_block_sums`; row i uses the first nblk[i]
    columns of the (rows, 24) arrays).

    The slope is the median of the slopes between block means ``lag = max(1, blocks // 4)`` apart, the
    level the median of ``mean_y − slope·mean_t`` over the newest quarter of the blocks, σ from the
    median absolute deviation of successive block-residual differences. A step spoils at most
    ``lag + 1`` of the slopes and one difference, so it moves none of the medians much.
    """
    rows = counts.size
    out = _Fit(np.empty(rows), np.empty(rows), np.empty(rows), np.empty(rows), np.empty(rows))
    # Rows with the same number of blocks form rectangular (rows, blocks) matrices: at most 24 groups,
    # and almost always one (every series with >= 24 points), which needs no gathering at all.
    groups = np.unique(nblk).tolist()
    for blocks in groups:
        sel: slice | IntArray = slice(None) if len(groups) == 1 else np.flatnonzero(nblk == blocks)
        tb, yb, nb = tb_all[sel, :blocks], yb_all[sel, :blocks], nb_all[sel, :blocks]
        lag = max(1, blocks // 4)
        slope = np.median((yb[:, lag:] - yb[:, :-lag]) / (tb[:, lag:] - tb[:, :-lag]), axis=1)
        keep = min(blocks, max(2, blocks // 4))
        level = np.median(yb[:, -keep:] - slope[:, None] * tb[:, -keep:], axis=1)
        resid = yb - (level[:, None] + slope[:, None] * tb)
        if blocks > 1:
            diff = resid[:, 1:] - resid[:, :-1]
            mad = np.median(np.abs(diff - np.median(diff, axis=1)[:, None]), axis=1)
        else:  # pragma: no cover - rows have at least two points, hence two blocks
            mad = np.zeros(tb.shape[0])
        n = counts[sel].astype(np.float64)
        # A block mean's residual has variance σ²/size; a difference of two has twice that.
        sigma = _MAD_TO_SIGMA * mad * np.sqrt(n / blocks / 2.0)
        tm = (nb * tb).sum(axis=1) / n
        ym = (nb * yb).sum(axis=1) / n
        sxx = (nb * (tb - tm[:, None]) ** 2).sum(axis=1)
        sst = (nb * (yb - ym[:, None]) ** 2).sum(axis=1)
        ssr = (nb * resid * resid).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.r2[sel] = np.where(sst > 0.0, np.clip(1.0 - ssr / sst, 0.0, 1.0), np.where(ssr == 0.0, 1.0, 0.0))
            out.se_slope[sel] = np.where(sxx > 0.0, sigma / np.sqrt(sxx), 0.0)
            out.se_level[sel] = np.where(sxx > 0.0, sigma * np.sqrt(1.0 / n + tm * tm / sxx), sigma)
        out.slope[sel] = slope
        out.intercept[sel] = level
    return out


def _days_closed_form(level: FloatArray, rate: FloatArray, now_rel: FloatArray) -> FloatArray:
    """Days from now until level − rate·t hits zero (t from the newest snapshot); NaN if never."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_hit = np.where(level <= 0.0, 0.0, np.where(rate > 0.0, level / rate, np.nan))
    days: FloatArray = np.maximum(t_hit - now_rel, 0.0)
    return days


_Ramp = tuple[float, float, float]  # (start day, end day, amount) relative to the newest snapshot


def _solve_piecewise(level: float, rate: float, ramps: Sequence[_Ramp]) -> float | None:
    """First t >= 0 (days after the newest snapshot) at which
    level − rate·t − Σ amount·(done(t) − done(0)) reaches zero; None if never."""
    if level <= 0.0:
        return 0.0

    def done(s: float, e: float, t: float) -> float:
        return _fraction_done(s, e, t)

    def remaining(t: float) -> float:
        return level - rate * t - sum(a * (done(s, e, t) - done(s, e, 0.0)) for s, e, a in ramps)

    points = sorted({0.0, *(p for s, e, _ in ramps for p in (s, e) if p > 0.0)})
    for t0, t1 in zip(points, [*points[1:], math.inf], strict=True):
        r0 = remaining(t0)
        if r0 <= 0.0:
            return t0
        mid = t0 + 1.0 if math.isinf(t1) else 0.5 * (t0 + t1)
        slope = -rate - sum(a / (e - s) for s, e, a in ramps if e > s and s <= mid <= e and mid > 0.0)
        if slope < 0.0:
            t_hit = t0 + r0 / -slope
            if t_hit <= t1:
                return t_hit
    return None


@dataclass
class _Row:
    """What the single-row solves (missions, interventions) need to know about one series."""

    key: tuple[str, ResourceType]
    unit: str
    current: float
    level: float
    rate: float
    now_rel: float
    period_end_rel: float  # days after the newest snapshot when the bandwidth budget resets (inf: never)
    ramps: list[_Ramp]
    ramp_ids: list[str]

    def runs_out(self) -> float:
        """Days after the newest snapshot when the resource runs out, missions included (inf: never)."""
        hit = _solve_piecewise(self.level, self.rate, [g for g in self.ramps if g[1] > 0.0])
        return math.inf if hit is None else hit

    def ahead(self, end: float) -> list[int]:
        """Indices of the missions the forecast counts, for a resource that runs out at `end` (see
        `runs_out`): those with impact still to come before then. What a mission does after that
        changes neither the exhaustion time (the first zero) nor what to do about it, so it is not
        reported either."""
        return [i for i, (s, e, _) in enumerate(self.ramps) if e > 0.0 and max(s, 0.0) < end]

    def impact_ahead(self, i: int, end: float) -> float:
        """Of mission i's impact, the part the forecast counts: what its window (over which the impact
        is spread evenly, as the solve takes it) has between the newest snapshot and `end`. A mission
        under way when the resource runs out counts only up to then: the rest is never used."""
        s, e, amount = self.ramps[i]
        return amount * (_fraction_done(s, e, end) - _fraction_done(s, e, 0.0))


@dataclass
class _BatchOut:
    """Column-oriented results for the forecastable series of one computation (row i is the series
    in `table` slot ``slots[i]``)."""

    table: _Table
    slots: IntArray
    #: The moment the days are counted from (exhaustion dates must use it, not a later clock read).
    now_us: int
    current: FloatArray
    count: IntArray
    span_days: FloatArray
    now_rel: FloatArray
    period_end_rel: FloatArray
    level: FloatArray
    rate: FloatArray
    se_level: FloatArray
    se_rate: FloatArray
    confidence: FloatArray
    days: FloatArray
    p10: FloatArray
    p90: FloatArray
    levels: npt.NDArray[np.int64]
    ramps: dict[int, tuple[list[_Ramp], list[str]]]
    reasons: dict[tuple[str, ResourceType], str]

    def __len__(self) -> int:
        return int(self.slots.size)

    def key(self, i: int) -> tuple[str, ResourceType]:
        return self.table.keys[int(self.slots[i])]

    def unit(self, i: int) -> str:
        return self.table.units[int(self.slots[i])]

    def row(self, i: int) -> _Row:
        ramps, ids = self.ramps.get(i, ([], []))
        return _Row(
            self.key(i),
            self.unit(i),
            float(self.current[i]),
            float(self.level[i]),
            float(self.rate[i]),
            float(self.now_rel[i]),
            float(self.period_end_rel[i]),
            ramps,
            ids,
        )

    def mission_info(self, i: int) -> tuple[tuple[str, ...], float]:
        """Ids of the missions the forecast of row i counts, and their impact up to the exhaustion
        (`_Row.impact_ahead`)."""
        if i not in self.ramps:  # most rows of a fleet: no solve needed
            return (), 0.0
        r = self.row(i)
        end = r.runs_out()
        ahead = r.ahead(end)
        impact = sum(r.impact_ahead(j, end) for j in ahead)
        return tuple(sorted(r.ramp_ids[j] for j in ahead)), float(impact)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------

_ACTIONS: dict[ResourceType, str] = {
    ResourceType.FUEL: "reduce or defer burns",
    ResourceType.POWER: "lower the payload duty cycle",
    ResourceType.STORAGE: "purge data or prioritise downlink",
    ResourceType.BANDWIDTH: "prioritise communication windows",
}


def _recommended_action(resource: ResourceType, level: RiskLevel, mission_ids: Sequence[str]) -> str:
    if level is RiskLevel.NOMINAL:
        return "none"
    text = _ACTIONS[resource]
    if resource is ResourceType.FUEL and mission_ids:
        text += " (" + ", ".join(mission_ids) + ")"
    if level is RiskLevel.WATCH:
        return "monitor; plan to " + text
    return text


class CapacityPlanner:
    """Ingests snapshots and missions; forecasts exhaustion per resource and for the whole fleet.

    Parameters (all keyword except `clock`):

    * ``min_history_points`` (3, at least 2) and ``min_history_days`` (1.0): less history than this
      gives no rate/forecast, with the reason from the ``*_detailed`` methods. A bandwidth series with
      a budget period needs at most a tenth of the period (a daily budget: 2.4 hours of snapshots).
    * ``robust`` (True): robust Sen-type fit; False for ordinary least squares. See the module doc.
    * ``storage_capacity`` / ``default_storage_capacity``: storage capacity per satellite / fallback.
    * ``bandwidth_period_days`` / ``bandwidth_period_anchor``: the bandwidth budget period (None: none).
    * ``horizon_days`` (3650): exhaustion further out counts as not depleting.
    * ``max_future_skew_s`` (300): snapshots further in the future than this are rejected.
    * ``burn_reduction`` (0.2), ``duty_cycle_reduction`` (0.25), ``storage_purge_fraction`` (0.2),
      ``downlink_priority_gain`` (0.25), ``comm_priority_gain`` (0.25): the size of each intervention
      whose days gained `recommend_interventions` computes.
    * ``chunk_size`` (4096): series per array batch when points are read (bounds temporary memory).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        min_history_points: int = 3,
        min_history_days: float = 1.0,
        robust: bool = True,
        storage_capacity: Mapping[str, float] | None = None,
        default_storage_capacity: float | None = None,
        bandwidth_period_days: float | None = None,
        bandwidth_period_anchor: datetime = _EPOCH,
        horizon_days: float = 3650.0,
        max_future_skew_s: float = 300.0,
        burn_reduction: float = 0.2,
        duty_cycle_reduction: float = 0.25,
        storage_purge_fraction: float = 0.2,
        downlink_priority_gain: float = 0.25,
        comm_priority_gain: float = 0.25,
        chunk_size: int = 4096,
    ) -> None:
        if min_history_points < 2:
            raise ConfigError("min_history_points must be at least 2")
        if not (math.isfinite(min_history_days) and min_history_days >= 0.0):
            raise ConfigError("min_history_days must be finite and not negative")
        if not (math.isfinite(horizon_days) and horizon_days > 0.0):
            raise ConfigError("horizon_days must be positive")
        if bandwidth_period_days is not None and not (
            math.isfinite(bandwidth_period_days) and bandwidth_period_days > 0.0
        ):
            raise ConfigError("bandwidth_period_days must be positive")
        if bandwidth_period_anchor.tzinfo is None:
            raise ConfigError("bandwidth_period_anchor must be timezone-aware")
        caps = dict(storage_capacity or {})
        for sat, cap in [*caps.items(), ("default_storage_capacity", default_storage_capacity)]:
            if cap is not None and not (math.isfinite(cap) and cap > 0.0):
                raise ConfigError(f"storage capacity for {sat} must be positive")
        for name, frac in (
            ("burn_reduction", burn_reduction),
            ("duty_cycle_reduction", duty_cycle_reduction),
            ("storage_purge_fraction", storage_purge_fraction),
            ("downlink_priority_gain", downlink_priority_gain),
            ("comm_priority_gain", comm_priority_gain),
        ):
            if not 0.0 < frac < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1")
        if chunk_size < 1:
            raise ConfigError("chunk_size must be positive")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.min_history_points = min_history_points
        self.min_history_days = min_history_days
        self.robust = robust
        self._storage_capacity = caps
        self._default_storage_capacity = default_storage_capacity
        self._bw_period_us = None if bandwidth_period_days is None else bandwidth_period_days * _US_PER_DAY
        self._bw_anchor_us = datetime_to_us(bandwidth_period_anchor)
        self.horizon_days = horizon_days
        self.max_future_skew_s = max_future_skew_s
        self._burn_reduction = burn_reduction
        self._duty_cycle_reduction = duty_cycle_reduction
        self._purge_fraction = storage_purge_fraction
        self._downlink_gain = downlink_priority_gain
        self._comm_gain = comm_priority_gain
        self._chunk = chunk_size
        self._series: dict[tuple[str, ResourceType], _Series] = {}
        self._satellites: dict[str, set[ResourceType]] = {}
        self._table = _Table()
        self._sat_index: dict[str, int] = {}  # satellite id → its index in `_sat_names`
        self._sat_names: list[str] = []
        # Slots sorted by key, and satellite names sorted, for the fleet path; None after a new series.
        self._fleet_order: IntArray | None = None
        self._sat_order: IntArray = np.empty(0, np.int64)
        self._sat_sorted: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self._missions: dict[str, MissionScheduleEntry] = {}
        self._missions_by_sat: dict[str, dict[str, MissionScheduleEntry]] = {}

    # ---- ingestion -------------------------------------------------------------------------------

    def _violations(self, snapshot: ResourceSnapshot, now: datetime) -> list[FieldViolation]:
        violations = validate_snapshot(snapshot, now=now, max_future_skew_s=self.max_future_skew_s)
        resource = _coerce_resource(snapshot.resource_type)
        if resource is not None and isinstance(snapshot.unit, str) and isinstance(snapshot.satellite_id, str):
            series = self._series.get((snapshot.satellite_id, resource))
            unit = snapshot.unit.strip()
            if series is not None and unit and unit != series.unit:
                violations.append(
                    FieldViolation(
                        "snapshot.unit",
                        f"unit {unit!r} differs from {series.unit!r} already recorded for "
                        f"{snapshot.satellite_id}/{resource.name}",
                    )
                )
        return violations

    def _store(self, satellite_id: str, resource: ResourceType, unit: str) -> _Series:
        key = (satellite_id, resource)
        series = self._series.get(key)
        if series is None:
            sat = self._sat_index.setdefault(satellite_id, len(self._sat_names))
            if sat == len(self._sat_names):
                self._sat_names.append(satellite_id)
            series = _Series(unit, self._table.size)
            cap = self._capacity(satellite_id, unit) if resource is ResourceType.STORAGE else None
            self._table.add(key, series, sat, cap)
            self._series[key] = series
            self._satellites.setdefault(satellite_id, set()).add(resource)
            self._fleet_order = None
        return series

    def ingest_snapshot(self, snapshot: ResourceSnapshot) -> bool:
        """Validate and store one snapshot; True if stored, False if the same (satellite, resource,
        timestamp) is stored already (the first value is kept). Raises ValidationError with every
        violation, including a unit that differs from the one recorded for the series."""
        violations = self._violations(snapshot, self._clock.now())
        if violations:
            raise ValidationError(violations)
        resource = _coerce_resource(snapshot.resource_type)
        assert resource is not None  # validated above
        series = self._store(snapshot.satellite_id, resource, snapshot.unit.strip())
        stored = series.add(datetime_to_us(snapshot.timestamp), float(snapshot.value))
        if stored:
            # One point at a time (tests, interactive use): the next computation rebuilds the row.
            self._table.fresh[series.slot] = False
        return stored

    def ingest_snapshots_detailed(self, snapshots: Iterable[ResourceSnapshot]) -> IngestReport:
        """Store many snapshots; invalid ones are skipped and reported as (index, reason)."""
        now = self._clock.now()
        accepted = duplicates = 0
        rejected: list[tuple[int, str]] = []
        touched: set[int] = set()
        for index, snapshot in enumerate(snapshots):
            violations = self._violations(snapshot, now)
            if violations:
                rejected.append((index, "; ".join(f"{v.field}: {v.description}" for v in violations)))
                continue
            resource = _coerce_resource(snapshot.resource_type)
            assert resource is not None
            series = self._store(snapshot.satellite_id, resource, snapshot.unit.strip())
            if series.add(datetime_to_us(snapshot.timestamp), float(snapshot.value)):
                accepted += 1
                touched.add(series.slot)
            else:
                duplicates += 1
        if touched:
            self._refresh(sorted(touched), datetime_to_us(now))
        return IngestReport(accepted, duplicates, rejected)

    def ingest_snapshots(self, snapshots: Iterable[ResourceSnapshot]) -> int:
        """Store many snapshots; returns how many were newly stored (invalid and duplicate ones are
        skipped — `ingest_snapshots_detailed` says which and why)."""
        return self.ingest_snapshots_detailed(snapshots).accepted

    def ingest_series(
        self,
        satellite_id: str,
        resource_type: ResourceType,
        unit: str,
        timestamps_us: npt.ArrayLike,
        values: npt.ArrayLike,
    ) -> IngestReport:
        """Bulk-store one series from arrays (µs since the epoch, or datetime64), validated vectorised.

        The fast path for replaying stored history and for benchmarks; same rules as the snapshot path.
        Rejected indexes refer to the input arrays.
        """
        ts_arr = np.asarray(timestamps_us)
        if np.issubdtype(ts_arr.dtype, np.datetime64):
            ts_arr = ts_arr.astype("datetime64[us]").astype(np.int64)
        t = np.asarray(ts_arr, dtype=np.int64).ravel()
        v = np.asarray(values, dtype=np.float64).ravel()
        if t.shape != v.shape:
            raise ValidationError.single("snapshots", "timestamps and values differ in length")
        probe = ResourceSnapshot(satellite_id, resource_type, self._clock.now(), 0.0, unit)
        violations = self._violations(probe, self._clock.now())
        if violations:
            raise ValidationError(violations)
        limit = datetime_to_us(self._clock.now()) + int(self.max_future_skew_s * 1_000_000)
        future = t > limit
        early = t < _EARLIEST_SNAPSHOT_US
        negative = v < 0.0
        not_finite = ~np.isfinite(v)
        too_large = v > MAX_SNAPSHOT_VALUE
        bad = future | early | negative | not_finite | too_large
        rejected: list[tuple[int, str]] = []
        if bad.any():
            for i in np.flatnonzero(bad).tolist():
                if not_finite[i]:
                    reason = "snapshot.value: must be finite"
                elif negative[i]:
                    reason = "snapshot.value: must not be negative"
                elif too_large[i]:
                    reason = f"snapshot.value: {_TOO_LARGE}"
                elif early[i]:
                    reason = f"snapshot.timestamp: {TOO_EARLY}"
                else:
                    reason = f"snapshot.timestamp: is more than {self.max_future_skew_s:g} s in the future"
                rejected.append((i, reason))
            t, v = t[~bad], v[~bad]
        # Stored history comes back sorted and unique: then there is nothing to sort or drop.
        if t.size > 1 and not bool(np.all(t[1:] > t[:-1])):
            order = np.argsort(t, kind="stable")
            t, v = t[order], v[order]
            first = np.ones(t.size, dtype=bool)
            first[1:] = t[1:] != t[:-1]
            t, v = t[first], v[first]
        in_batch_dups = int(bad.size - bad.sum()) - int(t.size)
        resource = _coerce_resource(resource_type)
        assert resource is not None
        series = self._store(satellite_id, resource, unit.strip())
        stored = series.add_many(t, v)
        if stored:
            self._refresh([series.slot], datetime_to_us(self._clock.now()))
        duplicates = in_batch_dups + int(t.size) - stored
        return IngestReport(stored, duplicates, rejected)

    def add_scheduled_mission(self, entry: MissionScheduleEntry) -> None:
        """Add a mission, or replace the one with the same mission_id. Raises ValidationError."""
        violations = validate_mission(entry)
        if violations:
            raise ValidationError(violations)
        previous = self._missions.get(entry.mission_id)
        if previous is not None:
            self._missions_by_sat.get(previous.satellite_id, {}).pop(entry.mission_id, None)
        self._missions[entry.mission_id] = entry
        self._missions_by_sat.setdefault(entry.satellite_id, {})[entry.mission_id] = entry

    def remove_scheduled_mission(self, mission_id: str) -> MissionScheduleEntry | None:
        """Forget a mission (forecasts no longer count it); the mission it was, or None if unknown."""
        entry = self._missions.pop(mission_id, None)
        if entry is not None:
            by_sat = self._missions_by_sat.get(entry.satellite_id, {})
            by_sat.pop(mission_id, None)
            if not by_sat:
                self._missions_by_sat.pop(entry.satellite_id, None)
        return entry

    def missions(self, satellite_id: str | None = None) -> list[MissionScheduleEntry]:
        """Scheduled missions (of one satellite, or all), by start time."""
        pool = self._missions.values() if satellite_id is None else self._missions_by_sat.get(satellite_id, {}).values()
        return sorted(pool, key=lambda m: (m.start_time, m.mission_id))

    def clear_caches(self, *, block_means: bool = False) -> None:
        """Forget every series' fit, as if each had just received new points: the next computation is
        the first one after an ingest (benchmarks time this "cold" path). With ``block_means`` the
        per-series state kept since ingest goes too, so the next computation rebuilds it from the raw
        points, as after a single-snapshot ingest or a bandwidth period rollover."""
        size = self._table.size
        self._table.fitted[:size] = False
        if block_means:
            self._table.fresh[:size] = False

    def known_satellites(self) -> list[str]:
        """Satellites with at least one stored snapshot, sorted."""
        return sorted(self._satellites)

    def has_satellite(self, satellite_id: str) -> bool:
        """True when the satellite has at least one stored snapshot."""
        return satellite_id in self._satellites

    def history(self, satellite_id: str, resource_type: ResourceType) -> list[ResourceSnapshot]:
        """The stored snapshots of one series, oldest first."""
        series = self._series.get((satellite_id, resource_type))
        if series is None:
            return []
        times, values = series.view()
        return [
            ResourceSnapshot(satellite_id, resource_type, _us_to_datetime(int(t)), float(v), series.unit)
            for t, v in zip(times, values, strict=True)
        ]

    # ---- the batch computation ------------------------------------------------------------------

    def _capacity(self, satellite_id: str, unit: str) -> float | None:
        if unit == "%":
            return 100.0
        return self._storage_capacity.get(satellite_id, self._default_storage_capacity)

    def _period_start(self, now_us: int) -> float | None:
        """Start (µs) of the current bandwidth period, None without periods."""
        if self._bw_period_us is None:
            return None
        period = self._bw_period_us
        return self._bw_anchor_us + math.floor((now_us - self._bw_anchor_us) / period) * period

    def _points(self, slots: IntArray) -> tuple[IntArray, FloatArray]:
        """The fitted points (from each row's `start`) of the given fresh rows, concatenated."""
        tab = self._table
        parts = [(tab.series[i], int(tab.start[i]), int(tab.n[i])) for i in slots.tolist()]
        flat_t = np.concatenate([s.times[lo:hi] for s, lo, hi in parts])
        flat_y = np.concatenate([s.values[lo:hi] for s, lo, hi in parts])
        return flat_t, flat_y

    def _refresh(self, slots: Sequence[int], now_us: int) -> None:
        """Rebuild the `_Table` rows of changed series from their points: counts, newest point and,
        for the robust fit, block means. Called at the end of a bulk ingest (so the summary after new
        telemetry starts from the block means) and for rows still stale at computation time."""
        tab = self._table
        period_start = self._period_start(now_us)
        with_blocks: list[int] = []
        for i in slots:
            s = tab.series[i]
            n = s.n
            start = 0
            if period_start is not None and tab.bandwidth[i]:
                start = int(np.searchsorted(s.times[:n], period_start))
                tab.period[i] = period_start
            tab.n[i] = n
            tab.start[i] = start
            tab.count[i] = n - start
            if n:
                tab.first_us[i] = s.times[min(start, n - 1)]
                tab.last_us[i] = s.times[n - 1]
                tab.current[i] = s.values[n - 1]
            if self.robust and n - start >= 2:  # fewer points are never fitted (min_history_points >= 2)
                with_blocks.append(i)
        rows = np.asarray(slots, np.int64)
        tab.fresh[rows] = True
        tab.fitted[rows] = False
        if len(with_blocks) <= 16:  # the usual ingest: one series at a time, no batching overhead
            for i in with_blocks:
                s = tab.series[i]
                lo, hi = int(tab.start[i]), int(tab.n[i])
                bounds, size, exact = _block_layout(hi - lo)
                blocks = bounds.size
                tab.nblk[i] = blocks
                tab.tb[i, :blocks] = _block_times(s.times[lo:hi], bounds, size, exact)
                tab.yb[i, :blocks] = np.add.reduceat(s.values[lo:hi], bounds) / size
                tab.nb[i, :blocks] = size
            return
        for lo in range(0, len(with_blocks), self._chunk):
            part = np.asarray(with_blocks[lo : lo + self._chunk], np.int64)
            count = tab.count[part]
            flat_t, flat_y = self._points(part)
            tb, yb, size = _block_sums(flat_t, flat_y, count, tab.last_us[part])
            nblk = np.minimum(count, _BLOCKS)
            tab.nblk[part] = nblk
            tab.tb[part] = _pad_blocks(tb, nblk, 0.0)
            tab.yb[part] = _pad_blocks(yb, nblk, 0.0)
            tab.nb[part] = _pad_blocks(size, nblk, 1.0)

    def _compute_keys(self, keys: Sequence[tuple[str, ResourceType]]) -> _BatchOut:
        """`_compute` of the given series (the single-series path passes one key)."""
        reasons: dict[tuple[str, ResourceType], str] = {}
        slots: list[int] = []
        for key in keys:
            series = self._series.get(key)
            if series is None:
                sat, resource = key
                known = sat in self._satellites
                reasons[key] = f"no {resource.name} snapshots for {sat}" if known else f"unknown satellite {sat!r}"
            else:
                slots.append(series.slot)
        return self._compute(np.asarray(slots, np.int64), reasons)

    def _fleet_slots(self) -> IntArray:
        """Every slot, sorted by (satellite, resource); also refreshes the sorted satellite names."""
        if self._fleet_order is None:
            tab = self._table
            names = self._sat_names
            order = np.asarray(sorted(range(len(names)), key=names.__getitem__), np.int64)
            rank = np.empty(len(names), np.int64)
            rank[order] = np.arange(len(names))
            self._fleet_order = np.lexsort((tab.resource[: tab.size], rank[tab.sat[: tab.size]]))
            self._sat_order = order
            self._sat_sorted = np.asarray(names, dtype=object)[order]
        return self._fleet_order

    def _compute_fleet(self) -> _BatchOut:
        return self._compute(self._fleet_slots(), {})

    def _compute(self, slots: IntArray, reasons: dict[tuple[str, ResourceType], str]) -> _BatchOut:
        """Fit and forecast the series in the given `_Table` slots at once. Everything per series is
        array arithmetic over the fleet table; Python loops run only over rows that are stale (changed
        since their last refresh), lack history, or have missions."""
        tab = self._table
        now_us = datetime_to_us(self._clock.now())
        period_start = self._period_start(now_us)
        stale = ~tab.fresh[slots]
        if period_start is not None:  # a new bandwidth period moves those rows' first fitted point
            stale |= tab.bandwidth[slots] & (tab.period[slots] != period_start)
        if stale.any():
            self._refresh(slots[stale].tolist(), now_us)
        n = tab.n[slots]
        count = tab.count[slots]
        span_days = (tab.last_us[slots] - tab.first_us[slots]) / _US_PER_DAY
        need_days, full_days = self._history_days(slots)
        enough = (count >= self.min_history_points) & (span_days >= need_days)
        bad = (n == 0) | tab.no_cap[slots] | ~enough
        for p in np.flatnonzero(bad).tolist():
            i = int(slots[p])
            key = tab.keys[i]
            sat, resource = key
            where = " in the current bandwidth period" if tab.start[i] else ""
            if n[p] == 0:
                reasons[key] = f"no {resource.name} snapshots for {sat}"
            elif tab.no_cap[i]:
                reasons[key] = f"storage capacity of {sat} unknown: configure it or report in '%'"
            elif count[p] < self.min_history_points:
                reasons[key] = (
                    f"insufficient history: {count[p]} snapshot(s){where}, need at least {self.min_history_points}"
                )
            else:
                reasons[key] = (
                    f"insufficient history: {span_days[p]:.3g} day(s) of snapshots{where}, "
                    f"need at least {need_days[p]:.3g}"
                )
        if bad.any():
            keep = ~bad
            slots, count, span_days, full_days = slots[keep], count[keep], span_days[keep], full_days[keep]
        total = int(slots.size)
        last_us = tab.last_us[slots]
        storage = tab.storage[slots]
        ramps = self._ramps(slots, last_us)
        adjust = np.zeros(total)
        fit = self._fit_rows(slots, count, last_us, storage, ramps, adjust)
        # Storage was fitted as used space: remaining = capacity − used mirrors the line.
        level = np.where(storage, tab.cap[slots] - fit[:, _FIT_LEVEL], fit[:, _FIT_LEVEL]) - adjust
        rate = np.where(storage, fit[:, _FIT_SLOPE], -fit[:, _FIT_SLOPE])
        se_level = fit[:, _FIT_SE_LEVEL]
        se_rate = fit[:, _FIT_SE_SLOPE]
        now_rel = (now_us - last_us) / _US_PER_DAY
        if period_start is None or self._bw_period_us is None:
            period_end_rel = np.full(total, math.inf)
        else:
            ends = (period_start + self._bw_period_us - last_us) / _US_PER_DAY
            period_end_rel = np.where(tab.bandwidth[slots], ends, math.inf)

        def closed(lv: FloatArray, rt: FloatArray) -> FloatArray:
            d = _days_closed_form(lv, rt, now_rel)
            d[(d + now_rel > period_end_rel) | (d > self.horizon_days)] = np.nan
            return d

        days = closed(level, rate)
        p10 = closed(level - _Z90 * se_level, rate + _Z90 * se_rate)
        p90 = closed(level + _Z90 * se_level, rate - _Z90 * se_rate)
        out = _BatchOut(
            table=tab,
            slots=slots,
            now_us=now_us,
            current=tab.current[slots],
            count=count,
            span_days=span_days,
            now_rel=now_rel,
            period_end_rel=period_end_rel,
            level=level,
            rate=rate,
            se_level=se_level,
            se_rate=se_rate,
            confidence=fit[:, _FIT_R2] * np.minimum(1.0, span_days / full_days),
            days=days,
            p10=p10,
            p90=p90,
            levels=np.empty(0, np.int64),
            ramps=ramps,
            reasons=reasons,
        )
        # Only series with missions still ahead need the piecewise solve.
        for i, (rps, _) in ramps.items():
            if any(e > 0.0 for _, e, _ in rps):
                row = out.row(i)
                days[i] = self._days_with(row, row.level, row.rate, rps)
                p10[i] = self._days_with(row, row.level - _Z90 * se_level[i], row.rate + _Z90 * se_rate[i], rps)
                p90[i] = self._days_with(row, row.level + _Z90 * se_level[i], row.rate - _Z90 * se_rate[i], rps)
        out.levels = _classify_array(days)
        return out

    def _history_days(self, slots: IntArray) -> tuple[FloatArray, FloatArray]:
        """Per row: the span of snapshots needed for a forecast, and the span that counts as full
        history for the confidence. A budget period bounds what a bandwidth series can have (a daily
        budget never holds a day of snapshots, so it was never forecast, however fast it ran out): its
        rows need a tenth of the period (at most `min_history_days`), and a whole period (at most the
        week other series need) is full history."""
        need = np.full(slots.size, self.min_history_days)
        full = np.full(slots.size, _FULL_HISTORY_DAYS)
        if self._bw_period_us is not None:
            period_days = self._bw_period_us / _US_PER_DAY
            periodic = self._table.bandwidth[slots]
            need[periodic] = min(self.min_history_days, period_days / 10.0)
            full[periodic] = min(_FULL_HISTORY_DAYS, period_days)
        return need, full

    def _fit_rows(
        self,
        slots: IntArray,
        count: IntArray,
        last_us: IntArray,
        storage: BoolArray,
        ramps: Mapping[int, tuple[list[_Ramp], list[str]]],
        adjust: FloatArray,
    ) -> FloatArray:
        """The fit of every row as a (rows, 5) array (columns `_FIT_*`).

        Rows whose history includes recorded past missions are fitted from their points with those
        missions' impact added back (and their adjustment at the newest point goes into `adjust`).
        All others come from `_Table.fit`; the rows not fitted since their last change are fitted
        first, all at once — from the block means for the robust fit, from the points for OLS."""
        tab = self._table
        total = int(slots.size)
        fit = np.empty((total, 5))
        past = [p for p, (rps, _) in ramps.items() if any(s < 0.0 for s, _, _ in rps)]
        direct = np.ones(total, dtype=bool)
        direct[past] = False
        plain = slots[direct]
        todo = np.unique(plain[~tab.fitted[plain]])
        for lo in range(0, todo.size, self._chunk):
            part = todo[lo : lo + self._chunk]
            if self.robust:
                got = _fit_blocks(tab.tb[part], tab.yb[part], tab.nb[part], tab.nblk[part], tab.count[part])
            else:
                flat_t, flat_y = self._points(part)
                t_days = (flat_t - np.repeat(tab.last_us[part], tab.count[part])) / _US_PER_DAY
                got = _fit_ols(t_days, flat_y, tab.count[part])
            tab.fit[part] = _fit_columns(got)
            tab.fitted[part] = True
        fit[direct] = tab.fit[plain]
        for lo in range(0, len(past), self._chunk):
            rows = past[lo : lo + self._chunk]
            flat_t, flat_y = self._adjusted_points(slots, rows, count, last_us, storage, ramps, adjust)
            sel = np.asarray(rows, np.int64)
            if self.robust:
                tb, yb, size = _block_sums(flat_t, flat_y, count[sel], last_us[sel])
                nblk = np.minimum(count[sel], _BLOCKS)
                padded = (_pad_blocks(tb, nblk, 0.0), _pad_blocks(yb, nblk, 0.0), _pad_blocks(size, nblk, 1.0))
                got = _fit_blocks(*padded, nblk, count[sel])
            else:
                t_days = (flat_t - np.repeat(last_us[sel], count[sel])) / _US_PER_DAY
                got = _fit_ols(t_days, flat_y, count[sel])
            fit[sel] = _fit_columns(got)
        return fit

    def _ramps(self, slots: IntArray, last_us: IntArray) -> dict[int, tuple[list[_Ramp], list[str]]]:
        """Mission ramps (days relative to each row's newest snapshot) of the rows that have any."""
        found: dict[int, tuple[list[_Ramp], list[str]]] = {}
        if not self._missions_by_sat:
            return found
        candidates: list[tuple[int, int]]  # (row, slot)
        if slots.size <= len(self._missions_by_sat):
            candidates = list(enumerate(slots.tolist()))
        else:  # the fleet: visit only the rows of satellites with missions
            where = np.full(self._table.size, -1, np.int64)
            where[slots] = np.arange(slots.size)
            candidates = []
            for sat in self._missions_by_sat:
                for resource in self._satellites.get(sat, ()):
                    slot = self._series[(sat, resource)].slot
                    if where[slot] >= 0:
                        candidates.append((int(where[slot]), slot))
            candidates.sort()
        for i, slot in candidates:
            sat, resource = self._table.keys[slot]
            missions = self._missions_by_sat.get(sat)
            if not missions:
                continue
            ramps: list[_Ramp] = []
            ids: list[str] = []
            last = int(last_us[i])
            for mission in missions.values():
                amount = float(mission.resource_impacts.get(resource, 0.0))
                if amount != 0.0:
                    s = (datetime_to_us(mission.start_time) - last) / _US_PER_DAY
                    e = (datetime_to_us(mission.end_time) - last) / _US_PER_DAY
                    ramps.append((s, e, amount))
                    ids.append(mission.mission_id)
            if ramps:
                found[i] = (ramps, ids)
        return found

    def _adjusted_points(
        self,
        slots: IntArray,
        rows: Sequence[int],
        count: IntArray,
        last_us: IntArray,
        storage: BoolArray,
        ramps: Mapping[int, tuple[list[_Ramp], list[str]]],
        adjust: FloatArray,
    ) -> tuple[IntArray, FloatArray]:
        """The given rows' points concatenated row after row, with the realised impact of recorded
        past missions added back; each such row's adjustment at its newest point goes into `adjust`."""
        flat_t, flat_y = self._points(slots[np.asarray(rows, np.int64)])
        offset = 0
        for i in rows:
            n = int(count[i])
            lo, hi = offset, offset + n
            offset = hi
            got = ramps.get(i)
            if got is None:
                continue
            t_rel = (flat_t[lo:hi] - int(last_us[i])) / _US_PER_DAY
            # Storage holds used space, where a use raises the value instead of lowering it.
            sign = -1.0 if storage[i] else 1.0
            for s, e, amount in got[0]:
                if s < 0.0:  # started before the newest snapshot: add its realised impact back
                    flat_y[lo:hi] += sign * amount * np.clip((t_rel - s) / (e - s), 0.0, 1.0)
                    adjust[i] += amount * _fraction_done(s, e, 0.0)
        return flat_t, flat_y

    def _days_with(self, r: _Row, level: float, rate: float, ramps: Sequence[_Ramp]) -> float:
        """Days from now to exhaustion for one row under (level, rate, ramps); NaN if not within horizon."""
        hit = _solve_piecewise(level, rate, [g for g in ramps if g[1] > 0.0])
        if hit is None or hit > r.period_end_rel:
            return math.nan
        days = max(hit - r.now_rel, 0.0)
        return days if days <= self.horizon_days else math.nan

    @staticmethod
    def _opt(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    def _forecast_of(self, out: _BatchOut, i: int) -> ExhaustionForecast:
        level = RiskLevel(int(out.levels[i]))
        days = self._opt(float(out.days[i]))
        date = None
        if days is not None:
            # The computation's own now: a fresh clock read would put every forecast's date a little
            # later than its days_remaining says, and forecasts running out together apart.
            date = _us_to_datetime(out.now_us) + timedelta(days=days)
        satellite_id, resource = out.key(i)
        mission_ids, scheduled = out.mission_info(i)
        return ExhaustionForecast(
            satellite_id=satellite_id,
            resource_type=resource,
            current_value=float(out.current[i]),
            predicted_exhaustion_date=date,
            days_remaining=days,
            risk_level=level,
            confidence=float(out.confidence[i]),
            recommended_action=_recommended_action(resource, level, mission_ids),
            days_remaining_p10=self._opt(float(out.p10[i])),
            days_remaining_p50=days,
            days_remaining_p90=self._opt(float(out.p90[i])),
            unit=out.unit(i),
            rate_per_day=float(out.rate[i]),
            scheduled_impact=scheduled,
            mission_ids=mission_ids,
        )

    # ---- single series --------------------------------------------------------------------------

    def compute_consumption_rate_detailed(self, satellite_id: str, resource_type: ResourceType) -> RateResult:
        """The background consumption rate, or None with the reason."""
        out = self._compute_keys([(satellite_id, resource_type)])
        if not len(out):
            return RateResult(None, out.reasons[(satellite_id, resource_type)])
        rate = ConsumptionRate(
            satellite_id,
            resource_type,
            float(out.rate[0]),
            float(out.confidence[0]),
            float(out.span_days[0]),
            int(out.count[0]),
        )
        return RateResult(rate)

    def compute_consumption_rate(self, satellite_id: str, resource_type: ResourceType) -> ConsumptionRate | None:
        """The background consumption rate (units/day, positive = used up), None without enough history."""
        return self.compute_consumption_rate_detailed(satellite_id, resource_type).rate

    def forecast_exhaustion_detailed(self, satellite_id: str, resource_type: ResourceType) -> ForecastResult:
        """The forecast, or None with the reason (unknown satellite, insufficient history, ...)."""
        out = self._compute_keys([(satellite_id, resource_type)])
        if not len(out):
            return ForecastResult(None, out.reasons[(satellite_id, resource_type)])
        return ForecastResult(self._forecast_of(out, 0))

    def forecast_exhaustion(self, satellite_id: str, resource_type: ResourceType) -> ExhaustionForecast | None:
        """When one resource runs out (None without enough history; never raises)."""
        return self.forecast_exhaustion_detailed(satellite_id, resource_type).forecast

    def satellite_forecasts(self, satellite_id: str) -> list[ExhaustionForecast]:
        """The forecasts of every forecastable resource of one satellite, by resource type."""
        keys = [(satellite_id, r) for r in sorted(self._satellites.get(satellite_id, ()))]
        out = self._compute_keys(keys)
        return [self._forecast_of(out, i) for i in range(len(out))]

    # ---- fleet ----------------------------------------------------------------------------------

    def forecast_fleet(self) -> list[ExhaustionForecast]:
        """Forecasts of every forecastable (satellite, resource), computed vectorised, sorted by key."""
        out = self._compute_fleet()
        return [self._forecast_of(out, i) for i in range(len(out))]

    def fleet_insufficient(self) -> dict[tuple[str, ResourceType], str]:
        """The series that get no forecast, with the reason."""
        return self._compute_fleet().reasons

    def get_fleet_risk_summary(self) -> dict[RiskLevel, list[str]]:
        """Satellites grouped by risk level (every level present, ids sorted). A satellite sits at its
        worst resource's level; satellites with no forecastable resource are not listed (see
        `satellites_without_forecast`)."""
        by_name = self._worst_levels()
        return {level: self._sat_sorted[by_name == int(level)].tolist() for level in RiskLevel}

    def satellites_without_forecast(self) -> list[str]:
        """Known satellites none of whose resources can be forecast yet (too little history), sorted:
        the satellites `get_fleet_risk_summary` cannot place, so that a summary can still name them."""
        ids: list[str] = self._sat_sorted[self._worst_levels() == 0].tolist()
        return ids

    def _worst_levels(self) -> np.ndarray:
        """Each known satellite's worst risk level, in sorted-id order; 0 without a forecast."""
        out = self._compute_fleet()
        worst = np.zeros(len(self._sat_names), np.int64)
        np.maximum.at(worst, self._table.sat[out.slots], out.levels)
        return worst[self._sat_order]

    def get_critical_forecasts(self, max_days: float = CRITICAL_DAYS) -> list[ExhaustionForecast]:
        """Forecasts with days_remaining < max_days, most urgent first (days, then P10, then key).

        Strictly less, so the default 14 returns exactly the CRITICAL forecasts."""
        out = self._compute_fleet()
        idx = np.flatnonzero(~np.isnan(out.days) & (out.days < max_days))
        p10 = np.where(np.isnan(out.p10), np.inf, out.p10)
        chosen = sorted(idx.tolist(), key=lambda i: (out.days[i], p10[i], out.key(i)))
        return [self._forecast_of(out, i) for i in chosen]

    def risk_changes(
        self,
        previous: Mapping[tuple[str, ResourceType], RiskLevel],
        *,
        unknown_as: RiskLevel | None = RiskLevel.NOMINAL,
    ) -> tuple[list[RiskChange], dict[tuple[str, ResourceType], RiskLevel]]:
        """Risk changes of the fleet against `previous`, and the current levels to pass next time.

        The service keeps the returned map (or rebuilds it from storage) and emits one
        `aetherops.capacity.risk_changed` event per change (plus an alert when `entered_critical`).
        """
        forecasts = self.forecast_fleet()
        return diff_risk_levels(previous, forecasts, unknown_as=unknown_as), risk_levels(forecasts)

    # ---- interventions --------------------------------------------------------------------------

    def recommend_interventions(self, satellite_id: str) -> list[dict[str, Any]]:
        """What to do about each at-risk (not NOMINAL) resource of a satellite, with days gained.

        Each dict has ``resource_type``, ``action``, ``description``, ``days_gained`` (computed by
        re-solving the forecast with the intervention applied; capped at the horizon), ``mission_ids``,
        ``risk_level`` and ``days_remaining``. Most urgent resource first, then most days gained.
        Unknown satellites give an empty list.
        """
        keys = [(satellite_id, r) for r in sorted(self._satellites.get(satellite_id, ()))]
        out = self._compute_keys(keys)
        result: list[dict[str, Any]] = []
        for i in range(len(out)):
            r = out.row(i)
            days = float(out.days[i])
            level = RiskLevel(int(out.levels[i]))
            if level is RiskLevel.NOMINAL:
                continue
            for action, description, days_after, ids in self._interventions_for(r):
                gained = (self.horizon_days if math.isnan(days_after) else days_after) - days
                result.append(
                    {
                        "resource_type": r.key[1],
                        "action": action,
                        "description": description,
                        "days_gained": max(0.0, gained),
                        "mission_ids": ids,
                        "risk_level": level,
                        "days_remaining": days,
                    }
                )
        result.sort(key=lambda d: (d["days_remaining"], -d["days_gained"], d["action"]))
        return result

    def _interventions_for(self, r: _Row) -> list[tuple[str, str, float, list[str]]]:
        resource = r.key[1]
        found: list[tuple[str, str, float, list[str]]] = []
        if resource is ResourceType.FUEL:
            # Burns still ahead that start before the forecast exhaustion cause the shortfall.
            culprits = [i for i in r.ahead(r.runs_out()) if r.ramps[i][2] > 0.0]
            culprits.sort(key=lambda i: -r.ramps[i][2])
            for i in culprits:
                others = [g for j, g in enumerate(r.ramps) if j != i]
                after = self._days_with(r, r.level, r.rate, others)
                mid = r.ramp_ids[i]
                found.append(("defer_burn", f"defer burn {mid} beyond the exhaustion date", after, [mid]))
            if culprits:
                cut = self._burn_reduction
                reduced = [(s, e, a * (1.0 - cut) if j in culprits else a) for j, (s, e, a) in enumerate(r.ramps)]
                after = self._days_with(r, r.level, r.rate, reduced)
                ids = [r.ramp_ids[i] for i in culprits]
                found.append(("reduce_burns", f"reduce burns {', '.join(ids)} by {cut:.0%}", after, ids))
            else:
                after = self._days_with(r, r.level, r.rate * (1.0 - self._burn_reduction), r.ramps)
                found.append(
                    (
                        "reduce_fuel_consumption",
                        f"reduce background propellant use by {self._burn_reduction:.0%}",
                        after,
                        [],
                    )
                )
        elif resource is ResourceType.POWER:
            f = self._duty_cycle_reduction
            after = self._days_with(r, r.level, r.rate * (1.0 - f), r.ramps)
            found.append(("lower_payload_duty_cycle", f"lower the payload duty cycle by {f:.0%}", after, []))
        elif resource is ResourceType.STORAGE:
            purge = self._purge_fraction * r.current
            after = self._days_with(r, r.level + purge, r.rate, r.ramps)
            found.append(
                (
                    "purge_storage",
                    f"purge {self._purge_fraction:.0%} of stored data ({purge:.4g} {r.unit})",
                    after,
                    [],
                )
            )
            g = self._downlink_gain
            after = self._days_with(r, r.level, r.rate * (1.0 - g), r.ramps)
            found.append(("prioritise_downlink", f"prioritise downlink to cut net fill by {g:.0%}", after, []))
        else:
            g = self._comm_gain
            after = self._days_with(r, r.level, r.rate * (1.0 - g), r.ramps)
            found.append(
                (
                    "prioritise_communication_windows",
                    f"prioritise communication windows to cut budget use by {g:.0%}",
                    after,
                    [],
                )
            )
        return found
