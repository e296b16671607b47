"""Benchmark: vectorised fleet risk summary vs a straightforward per-satellite pure-Python loop.

This is the compute half of the capacity benchmark (the PostgreSQL bulk-ingest half lives in
bench/capacity.py and may import `make_fleet`, `iter_snapshot_rows` and `load_planner` from here).
Default workload: 10,000 satellites × 4 resources × 720 hourly snapshots (28.8 M points). Targets:
fleet summary <= 2 s and >= 20× faster than the loop. Both are timed in the same run (median of
``--runs``) and their summaries are checked to be identical.

The vectorised summary is timed three ways: *cold*, the first summary after an ingest (every series
re-fitted from the block means the planner keeps up to date on ingest — what an operator sees after
new telemetry); *warm*, nothing changed since the last summary; and *from raw points*, with the
per-series state kept since ingest dropped too, so everything is rebuilt from the 28.8 M points (as
after a bandwidth period rollover). The bulk load line includes keeping that state on ingest.

    python bench/capacity_compute.py            # full size
    python bench/capacity_compute.py --quick    # 200 satellites × 96 snapshots, for smoke tests
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aetherops.capacity import (
    CRITICAL_DAYS,
    WARNING_DAYS,
    WATCH_DAYS,
    CapacityPlanner,
    ResourceType,
    RiskLevel,
)
from aetherops.clock import ManualClock

__all__ = [
    "STORAGE_CAPACITY_GB",
    "UNITS",
    "Fleet",
    "iter_snapshot_rows",
    "load_planner",
    "main",
    "make_fleet",
    "straightforward_fleet_summary",
]

RESOURCES = (ResourceType.FUEL, ResourceType.POWER, ResourceType.STORAGE, ResourceType.BANDWIDTH)
UNITS = {
    ResourceType.FUEL: "kg",
    ResourceType.POWER: "Wh",
    ResourceType.STORAGE: "GB",
    ResourceType.BANDWIDTH: "MB",
}
STORAGE_CAPACITY_GB = 1000.0
_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class Fleet:
    """A synthetic fleet: hourly snapshots shared by every series, values per (satellite, resource)."""

    satellite_ids: list[str]
    times_us: npt.NDArray[np.int64]  # (n_snapshots,) µs since the epoch
    values: npt.NDArray[np.float64]  # (n_satellites, 4, n_snapshots), resources in RESOURCES order
    now: datetime  # one hour after the newest snapshot


def make_fleet(n_satellites: int, n_snapshots: int, seed: int) -> Fleet:
    """Deterministic synthetic telemetry with noise, and for some series an unrecorded step (a burn).

    Depletion rates are drawn so the fleet spreads over all four risk levels (some resources are not
    depleting at all). Values are clipped at zero, so every snapshot is valid.
    """
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    start_us = (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    times_us = start_us + np.arange(n_snapshots, dtype=np.int64) * _US_PER_HOUR
    days = np.arange(n_snapshots) / 24.0
    shape = (n_satellites, 4)
    level0 = rng.uniform(200.0, 1000.0, shape)
    # Days until exhaustion from the end of the window, log-uniform 5..2000, 15 % not depleting.
    target_days = np.exp(rng.uniform(math.log(5.0), math.log(2000.0), shape))
    span = days[-1] if n_snapshots > 1 else 1.0
    rate = level0 / (span + target_days)
    rate[rng.random(shape) < 0.15] = 0.0
    noise = rng.normal(0.0, 1.0, (n_satellites, 4, n_snapshots)) * (0.01 * level0)[..., None]
    remaining = level0[..., None] - rate[..., None] * days[None, None, :] + noise
    # 10 % of the series had an unrecorded step change somewhere in the window.
    step_at = rng.integers(0, n_snapshots, shape)
    has_step = rng.random(shape) < 0.10
    step = np.where(has_step, rng.uniform(0.02, 0.1, shape) * level0, 0.0)
    remaining -= step[..., None] * (np.arange(n_snapshots)[None, None, :] >= step_at[..., None])
    remaining = np.maximum(remaining, 0.0)
    values = remaining
    # Storage reports used space, filling towards the capacity.
    values[:, 2, :] = np.clip(STORAGE_CAPACITY_GB - remaining[:, 2, :], 0.0, STORAGE_CAPACITY_GB)
    now = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(times_us[-1]) + _US_PER_HOUR)
    return Fleet([f"sat-{i:05d}" for i in range(n_satellites)], times_us, values, now)


def iter_snapshot_rows(fleet: Fleet) -> Iterator[tuple[str, ResourceType, datetime, float, str]]:
    """(satellite_id, resource_type, timestamp, value, unit) rows, e.g. for a COPY into PostgreSQL."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    stamps = [epoch + timedelta(microseconds=int(t)) for t in fleet.times_us]
    for i, sat in enumerate(fleet.satellite_ids):
        for j, resource in enumerate(RESOURCES):
            unit = UNITS[resource]
            for stamp, value in zip(stamps, fleet.values[i, j].tolist(), strict=True):
                yield sat, resource, stamp, value, unit


def load_planner(fleet: Fleet, **planner_kwargs: object) -> CapacityPlanner:
    """A planner (ManualClock at `fleet.now`) holding the whole fleet, via the bulk array path."""
    kwargs: dict[str, object] = {"default_storage_capacity": STORAGE_CAPACITY_GB}
    kwargs.update(planner_kwargs)
    planner = CapacityPlanner(ManualClock(fleet.now), **kwargs)  # type: ignore[arg-type]
    for i, sat in enumerate(fleet.satellite_ids):
        for j, resource in enumerate(RESOURCES):
            planner.ingest_series(sat, resource, UNITS[resource], fleet.times_us, fleet.values[i, j])
    return planner


# --------------------------------------------------------------------------------------------------
# The straightforward baseline: per satellite, per resource, plain Python lists and sorted().
# --------------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _risk(days: float | None) -> RiskLevel:
    if days is None:
        return RiskLevel.NOMINAL
    if days < CRITICAL_DAYS:
        return RiskLevel.CRITICAL
    if days < WARNING_DAYS:
        return RiskLevel.WARNING
    if days < WATCH_DAYS:
        return RiskLevel.WATCH
    return RiskLevel.NOMINAL


def _days_remaining(t_us: list[int], y: list[float], now_us: int, robust: bool) -> float | None:
    """Same model as the planner (robust block-mean Sen-type line, or least squares), one series,
    written the obvious way: one pass over the points accumulating sums, then the small medians."""
    n = len(t_us)
    last = t_us[-1]
    if robust:
        blocks = min(n, 24)
        sum_t = [0.0] * blocks
        sum_y = [0.0] * blocks
        size = [0] * blocks
        for b in range(blocks):
            for i in range((b * n) // blocks, ((b + 1) * n) // blocks):
                sum_t[b] += t_us[i]
                sum_y[b] += y[i]
                size[b] += 1
        tb = [(sum_t[b] / size[b] - last) / _US_PER_DAY for b in range(blocks)]
        yb = [sum_y[b] / size[b] for b in range(blocks)]
        lag = max(1, blocks // 4)
        slope = _median([(yb[k + lag] - yb[k]) / (tb[k + lag] - tb[k]) for k in range(blocks - lag)])
        keep = min(blocks, max(2, blocks // 4))
        level = _median([yb[k] - slope * tb[k] for k in range(blocks - keep, blocks)])
    else:
        t = [(a - last) / _US_PER_DAY for a in t_us]
        tm = sum(t) / n
        ym = sum(y) / n
        sxx = sum((a - tm) ** 2 for a in t)
        sxy = sum((a - tm) * (b - ym) for a, b in zip(t, y, strict=True))
        slope = sxy / sxx
        level = ym - slope * tm
    rate = -slope
    if level <= 0.0:
        hit = 0.0
    elif rate > 0.0:
        hit = level / rate
    else:
        return None
    days = max(hit - (now_us - last) / _US_PER_DAY, 0.0)
    return days if days <= 3650.0 else None


def straightforward_fleet_summary(
    series: dict[str, list[tuple[list[int], list[float]]]], now_us: int, robust: bool = True
) -> dict[RiskLevel, list[str]]:
    """Fleet summary by a per-satellite pure-Python loop. `series[sat]` holds per resource
    (timestamps in µs, remaining) lists — the stored data, already turned into remaining."""
    summary: dict[RiskLevel, list[str]] = {level: [] for level in RiskLevel}
    for sat in sorted(series):
        worst = RiskLevel.NOMINAL
        for t, y in series[sat]:
            worst = max(worst, _risk(_days_remaining(t, y, now_us, robust)))
        summary[worst].append(sat)
    return summary


def _baseline_input(fleet: Fleet) -> tuple[dict[str, list[tuple[list[int], list[float]]]], int]:
    t = fleet.times_us.tolist()
    remaining = fleet.values.copy()
    remaining[:, 2, :] = STORAGE_CAPACITY_GB - remaining[:, 2, :]
    series = {
        sat: [(t, remaining[i, j].tolist()) for j in range(len(RESOURCES))] for i, sat in enumerate(fleet.satellite_ids)
    }
    return series, (fleet.now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _timed(fn: object, runs: int) -> tuple[float, object]:
    times: list[float] = []
    result: object = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--satellites", type=int, default=None)
    parser.add_argument("--snapshots", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="runs of the vectorised summary (median)")
    parser.add_argument("--loop-runs", type=int, default=None, help="runs of the loop baseline (median)")
    parser.add_argument("--ols", action="store_true", help="least squares instead of the robust fit")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    n_sat = args.satellites or (200 if args.quick else 10_000)
    n_snap = args.snapshots or (96 if args.quick else 720)
    runs = args.runs or (3 if args.quick else 5)
    loop_runs = args.loop_runs or (1 if args.quick else 3)
    robust = not args.ols

    t0 = time.perf_counter()
    fleet = make_fleet(n_sat, n_snap, args.seed)
    planner = load_planner(fleet, robust=robust)
    load_s = time.perf_counter() - t0
    points = n_sat * len(RESOURCES) * n_snap
    print(f"fleet: {n_sat} satellites × {len(RESOURCES)} resources × {n_snap} snapshots = {points:,} points")
    print(f"generate + bulk load into the planner: {load_s:.2f} s")

    def cold() -> object:
        planner.clear_caches()  # every series re-fitted, as after new points for all of them
        return planner.get_fleet_risk_summary()

    def raw() -> object:
        planner.clear_caches(block_means=True)  # and every block mean rebuilt from the raw points
        return planner.get_fleet_risk_summary()

    cold_s, vec_summary = _timed(cold, runs)
    vec_s, warm_summary = _timed(planner.get_fleet_risk_summary, runs)
    raw_s, raw_summary = _timed(raw, runs)
    assert warm_summary == vec_summary == raw_summary
    series, now_us = _baseline_input(fleet)
    loop_s, loop_summary = _timed(lambda: straightforward_fleet_summary(series, now_us, robust), loop_runs)

    assert isinstance(vec_summary, dict) and isinstance(loop_summary, dict)
    mismatched = sum(len(set(vec_summary[level]) ^ set(loop_summary[level])) for level in RiskLevel)
    counts = ", ".join(f"{level.name} {len(vec_summary[level])}" for level in RiskLevel)
    print(f"fit: {'robust (Sen-type)' if robust else 'least squares'}; summary: {counts}")
    print(f"vectorised fleet summary, cold (first after ingest): {cold_s:.3f} s (median of {runs})")
    print(f"vectorised fleet summary, warm (nothing changed): {vec_s:.3f} s (median of {runs})")
    print(f"vectorised fleet summary, from raw points: {raw_s:.3f} s (median of {runs})")
    print(f"per-satellite Python loop: {loop_s:.3f} s (median of {loop_runs})")
    for label, secs in (("cold", cold_s), ("warm", vec_s), ("from raw points", raw_s)):
        ratio = loop_s / secs if secs > 0 else math.inf
        print(f"speed-up {label}: {ratio:.1f}×  (targets: <= 2 s and >= 20×)")
    print(f"summaries identical: {mismatched == 0} ({mismatched} satellite(s) differ)")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
