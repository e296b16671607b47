"""Benchmark: capacity snapshots into PostgreSQL (the repository's binary COPY path) and the fleet
risk summary of the planner restored from PostgreSQL, against the straightforward per-satellite
pure-Python loop, in the same run.

Default workload (from bench/capacity_compute.py's `make_fleet`): 10,000 satellites × 4 resources ×
720 hourly snapshots = 28.8 M rows. Figures printed:

* bulk ingest: binary COPY into a session temp table + ``INSERT … ON CONFLICT DO NOTHING`` (the
  idempotent path the service uses), rows/s, in transactions of ``--chunk-rows`` rows;
* re-ingest of a slice that is stored already (every row a conflict), rows/s;
* plain binary COPY of the same slice into an empty table (not idempotent), rows/s, for comparison;
* restart recovery: binary COPY out of the whole table + `CapacityPlanner.ingest_series` (which
  also brings the planner's per-series block means up to date), seconds;
* fleet risk summary: vectorised vs the per-satellite loop, and whether they agree. The vectorised
  summary is timed cold (the first summary after an ingest: every series re-fitted from the block
  means kept on ingest), warm (nothing changed) and from raw points (that per-series state dropped
  too, everything rebuilt from the points, as after a bandwidth period rollover).

Uses AETHEROPS_TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) with a
throwaway schema dropped at the end.

    python bench/capacity.py            # full size
    python bench/capacity.py --quick    # 100 satellites
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cleanup import cancel_on_sigterm  # type: ignore[import-not-found]  # sibling module
from capacity_compute import (  # type: ignore[import-not-found]  # sibling script, not a package
    RESOURCES,
    STORAGE_CAPACITY_GB,
    UNITS,
    Fleet,
    make_fleet,
    straightforward_fleet_summary,
)

from aetherops.capacity import CapacityPlanner, ResourceType, RiskLevel
from aetherops.clock import ManualClock
from aetherops.db import Database, apply_migrations
from aetherops.db import capacity as repo
from aetherops.db.capacity import SeriesBlock

__all__ = ["main"]

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _blocks(fleet: Fleet) -> list[SeriesBlock]:
    return [
        SeriesBlock(sat, resource, UNITS[resource], fleet.times_us, fleet.values[i, j])
        for i, sat in enumerate(fleet.satellite_ids)
        for j, resource in enumerate(RESOURCES)
    ]


def _chunks(blocks: Sequence[SeriesBlock], rows: int) -> list[list[SeriesBlock]]:
    out: list[list[SeriesBlock]] = [[]]
    size = 0
    for block in blocks:
        if size >= rows:
            out.append([])
            size = 0
        out[-1].append(block)
        size += len(block)
    return out


def _baseline_input(fleet: Fleet) -> dict[str, list[tuple[list[int], list[float]]]]:
    """What the loop baseline reads: per satellite, per resource (µs, remaining) lists."""
    t = fleet.times_us.tolist()
    remaining = fleet.values.copy()
    remaining[:, 2, :] = STORAGE_CAPACITY_GB - remaining[:, 2, :]
    return {
        sat: [(t, remaining[i, j].tolist()) for j in range(len(RESOURCES))] for i, sat in enumerate(fleet.satellite_ids)
    }


def _timed(fn: Callable[[], T], runs: int) -> tuple[float, T]:
    times: list[float] = []
    result: T | None = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


async def _run(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    n_sat = args.satellites or (100 if args.quick else 10_000)
    n_snap = args.snapshots or 720
    url = os.environ.get("AETHEROPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = "bench_" + uuid.uuid4().hex[:10]
    fleet = make_fleet(n_sat, n_snap, args.seed)
    blocks = _blocks(fleet)
    rows = sum(len(b) for b in blocks)
    print(f"fleet: {n_sat} satellites × {len(RESOURCES)} resources × {n_snap} snapshots = {rows:,} rows")
    db = await Database.connect(url, schema)
    try:
        await apply_migrations(db)

        # 1. The idempotent bulk path, into an empty table.
        started = time.perf_counter()
        stored = 0
        for chunk in _chunks(blocks, args.chunk_rows):
            async with db.transaction() as conn:
                stored += await repo.bulk_load(conn, chunk)
        ingest_s = time.perf_counter() - started
        assert stored == rows, f"stored {stored} of {rows}"
        print(
            f"bulk ingest (COPY → temp table → INSERT … ON CONFLICT DO NOTHING): {ingest_s:.2f} s, "
            f"{rows / ingest_s:,.0f} rows/s"
        )

        # 2. The same path when everything is a duplicate (a re-sent batch), on a 10 % slice.
        slice_blocks = blocks[: max(1, len(blocks) // 10)]
        slice_rows = sum(len(b) for b in slice_blocks)
        started = time.perf_counter()
        again = 0
        for chunk in _chunks(slice_blocks, args.chunk_rows):
            async with db.transaction() as conn:
                again += await repo.bulk_load(conn, chunk)
        dup_s = time.perf_counter() - started
        assert again == 0
        print(f"re-ingest of {slice_rows:,} stored rows (all conflicts): {slice_rows / dup_s:,.0f} rows/s")

        # 3. Plain COPY straight into an empty table with the same key, for comparison.
        await db.execute("CREATE TABLE snapshots_direct (LIKE capacity_snapshots INCLUDING ALL)")
        started = time.perf_counter()
        for chunk in _chunks(slice_blocks, args.chunk_rows):
            async with db.transaction() as conn:
                await repo.copy_direct(conn, chunk, table="snapshots_direct")
        direct_s = time.perf_counter() - started
        print(f"plain binary COPY of {slice_rows:,} rows (not idempotent): {slice_rows / direct_s:,.0f} rows/s")

        # 4. Restart recovery: everything back into a planner.
        started = time.perf_counter()
        async with db.connection() as conn:
            loaded = await repo.load_snapshots(conn)
        read_s = time.perf_counter() - started
        planner = CapacityPlanner(ManualClock(fleet.now), default_storage_capacity=STORAGE_CAPACITY_GB)
        for block in loaded:
            planner.ingest_series(block.satellite_id, block.resource_type, block.unit, block.times_us, block.values)
        restore_s = time.perf_counter() - started
        print(
            f"restart recovery: binary COPY out {read_s:.2f} s, into the planner {restore_s:.2f} s in all "
            f"({rows / restore_s:,.0f} rows/s)"
        )
    finally:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await db.close()

    # 5. Fleet risk summary of the restored planner vs the per-satellite loop.
    def cold() -> dict[RiskLevel, list[str]]:
        planner.clear_caches()  # every series re-fitted, as after new points for all of them
        return planner.get_fleet_risk_summary()

    def raw() -> dict[RiskLevel, list[str]]:
        planner.clear_caches(block_means=True)  # and every block mean rebuilt from the raw points
        return planner.get_fleet_risk_summary()

    cold_s, vec = _timed(cold, args.runs)
    warm_s, warm = _timed(planner.get_fleet_risk_summary, args.runs)
    raw_s, from_raw = _timed(raw, args.runs)
    assert warm == vec == from_raw
    series = _baseline_input(fleet)
    now_us = (fleet.now - _EPOCH) // timedelta(microseconds=1)
    loop_s, loop = _timed(lambda: straightforward_fleet_summary(series, now_us), args.loop_runs)
    mismatched = sum(len(set(vec[level]) ^ set(loop[level])) for level in RiskLevel)
    counts = ", ".join(f"{level.name} {len(vec[level])}" for level in RiskLevel)
    print(f"fleet summary: {counts}")
    print(
        f"vectorised fleet summary: cold (first after ingest) {cold_s:.3f} s, warm {warm_s:.3f} s, "
        f"from raw points {raw_s:.3f} s (median of {args.runs})"
    )
    print(f"per-satellite Python loop: {loop_s:.3f} s (median of {args.loop_runs})")
    for label, secs in (("cold", cold_s), ("warm", warm_s), ("from raw points", raw_s)):
        ratio = loop_s / secs if secs > 0 else math.inf
        print(f"speed-up {label}: {ratio:.1f}×  (targets: <= 2 s and >= 20×)")
    print(f"summaries identical: {mismatched == 0} ({mismatched} satellite(s) differ)")
    assert len(loaded) == n_sat * len(RESOURCES) and all(isinstance(b.resource_type, ResourceType) for b in loaded)
    return 0 if mismatched == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 satellites, for a smoke test")
    parser.add_argument("--satellites", type=int, default=None)
    parser.add_argument("--snapshots", type=int, default=None, help="per series (default 720)")
    parser.add_argument("--chunk-rows", type=int, default=500_000, help="rows per ingest transaction")
    parser.add_argument("--runs", type=int, default=3, help="runs of the vectorised summary (median)")
    parser.add_argument("--loop-runs", type=int, default=1, help="runs of the loop baseline (median)")
    parser.add_argument("--seed", type=int, default=7)
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
