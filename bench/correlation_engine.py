"""Benchmark: in-process `CorrelationEngine.ingest` throughput at 100, 10,000 and 100,000 active clusters.

Targets (issue 3): at least 100,000 alerts/s, and at most 1.5× slower with 100,000 concurrently
active clusters than with 100 — the cost per alert must not grow with the number of clusters.

Workload. ``slots`` satellites report round-robin, one alert every 50 simulated seconds each, so the
alert rate scales with the number of clusters and the window always holds the same number of
alerts *per cluster*. Each satellite's incident lasts 20 alerts; then the slot moves to a fresh
satellite id (staggered across slots), so incidents open, grow, go quiet and expire continuously.
An incident stays active for the 300 s window after its last alert, so ``slots = target / 1.3``
gives ``target`` concurrently active clusters; the figure printed is measured from the engine at the
end of each run. Subsystems are satellite units unknown to the dependency graph ("unit-0".."unit-7"),
so different satellites never merge (unrelated faults stay separate) while alerts on one satellite
do; every 10th alert repeats the previous unit 50 s later and is deduplicated.

Alerts are generated outside the timed region (in chunks, so memory stays bounded); the timed loop
is ``clock.current = alert.timestamp; engine.ingest(alert)`` — the engine reads the clock on every
ingest, exactly as it would in the service. The engine is configured as the service configures it:
replayed alert ids are the store's to answer, so it does not remember them (`--remember-alert-ids`
measures the standalone default). The window is filled (untimed) before timing starts.
The headline rate includes the cyclic garbage collector's pauses that fall into the timed loop, under
the collector settings `aetherops serve` uses (`aetherops.gctune`: the filled window is frozen like a
server's restored state, young collections every 50,000 allocations); the share of time they took and
the rate without them are printed alongside.

    python bench/correlation_engine.py            # 1,000,000 alerts per scenario, median of 3 runs
    python bench/correlation_engine.py --quick    # 20,000 alerts, window not pre-filled: smoke test only
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aetherops.correlation import Alert, CorrelationEngine
from aetherops.gctune import release_long_lived_state, settle_long_lived_state

__all__ = ["FollowClock", "Workload", "main", "run_once"]

WINDOW_S = 300.0
PERIOD_S = 50.0  # seconds between two alerts of one satellite
INCIDENT_LEN = 20  # alerts per incident before the slot moves to a fresh satellite
UNITS = tuple(f"unit-{k}" for k in range(8))
CHUNK = 50_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TARGET_RATE = 100_000.0
TARGET_RATIO = 1.5


class FollowClock:
    """A clock the benchmark moves with the alert stream (one attribute store per alert)."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = T0

    def now(self) -> datetime:
        return self.current


@dataclass(frozen=True)
class Workload:
    target_clusters: int

    @property
    def slots(self) -> int:
        return max(1, round(self.target_clusters / (1.0 + WINDOW_S / (INCIDENT_LEN * PERIOD_S))))

    def alerts(self, start: int, count: int) -> Iterator[Alert]:
        """Alerts number start .. start+count-1 of the endless stream."""
        slots = self.slots
        dt = PERIOD_S / slots
        for i in range(start, start + count):
            rnd, slot = divmod(i, slots)
            gen = (rnd + slot % INCIDENT_LEN) // INCIDENT_LEN
            # every 10th alert of a satellite repeats the previous unit at its severity: a duplicate
            # 50 s later (at a higher severity it would be an escalation, and kept)
            repeat = rnd % 10 == 9
            unit = UNITS[(rnd - 1) % len(UNITS)] if repeat else UNITS[rnd % len(UNITS)]
            yield Alert(
                alert_id=f"a{i}",
                satellite_id=f"SAT-{slot}-{gen}",
                subsystem=unit,
                severity=1 + ((i - slots if repeat else i) % 5),
                timestamp=T0 + timedelta(seconds=i * dt),
            )


@dataclass(frozen=True)
class RunResult:
    rate: float
    active: int
    opened: int
    duplicates: int
    gc_share: float  # fraction of the timed region spent in the cyclic garbage collector


class _GcTimer:
    """Adds up time spent in garbage collection while `timing` is set."""

    def __init__(self) -> None:
        self.timing = False
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self.timing:
            self.total += time.perf_counter() - self._start


def run_once(work: Workload, n_alerts: int, warm_up: bool = True, remember_alert_ids: bool = False) -> RunResult:
    clock = FollowClock()
    counter = itertools.count()
    engine = CorrelationEngine(
        time_window_s=WINDOW_S,
        clock=clock,
        id_factory=lambda: f"c{next(counter)}",
        remember_alert_ids=remember_alert_ids,
    )
    ingest = engine.ingest
    # Fill the window first (untimed) so the timed part runs at the steady-state cluster count.
    warm = work.slots * (int(WINDOW_S / PERIOD_S) + 2) if warm_up else 0
    for a in work.alerts(0, warm):
        clock.current = a.timestamp
        ingest(a)
    # The server settles its GC once its state is restored; the filled window is that state here.
    settle_long_lived_state()
    before = engine.stats
    elapsed = 0.0
    done = 0
    gc_timer = _GcTimer()
    gc.callbacks.append(gc_timer)
    try:
        while done < n_alerts:
            chunk = list(work.alerts(warm + done, min(CHUNK, n_alerts - done)))
            gc_timer.timing = True
            t0 = time.perf_counter()
            for a in chunk:
                clock.current = a.timestamp
                ingest(a)
            elapsed += time.perf_counter() - t0
            gc_timer.timing = False
            done += len(chunk)
    finally:
        gc.callbacks.remove(gc_timer)
        release_long_lived_state()
    active = len(engine.get_active_clusters())
    after = engine.stats
    return RunResult(
        n_alerts / elapsed,
        active,
        after.opened - before.opened,
        after.duplicates - before.duplicates,
        gc_timer.total / elapsed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="20,000 alerts per scenario, one run, no window fill (smoke test)"
    )
    parser.add_argument("--alerts", type=int, default=None, help="alerts per run (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=None, help="runs per scenario; the median is reported")
    parser.add_argument("--clusters", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument(
        "--remember-alert-ids",
        action="store_true",
        help="the engine remembers alert ids itself (its standalone default; the service leaves that to PostgreSQL)",
    )
    args = parser.parse_args(argv)
    n_alerts = args.alerts or (20_000 if args.quick else 1_000_000)
    runs = args.runs or (1 if args.quick else 3)

    print(
        f"correlation engine: {n_alerts:,} alerts per run, median of {runs} run(s), window {WINDOW_S:g} s,"
        f" alert ids remembered by {'the engine' if args.remember_alert_ids else 'the store (as the service runs it)'}"
    )
    # Runs are interleaved across scenarios so that drift in machine speed hits all of them alike.
    results: dict[int, list[RunResult]] = {target: [] for target in args.clusters}
    for _ in range(runs):
        for target in args.clusters:
            result = run_once(
                Workload(target), n_alerts, warm_up=not args.quick, remember_alert_ids=args.remember_alert_ids
            )
            results[target].append(result)
    rates: dict[int, float] = {}
    for target, runs_of in results.items():
        rate = statistics.median(r.rate for r in runs_of)
        rates[target] = rate
        last = runs_of[-1]
        print(
            f"  {target:>7,} target clusters ({Workload(target).slots:,} satellites reporting): {rate:>9,.0f} alerts/s"
            f"  [active at end {last.active:,}; opened {last.opened:,}; duplicates {last.duplicates:,};"
            f" gc {statistics.median(r.gc_share for r in runs_of):.0%} of the time"
            f" ({statistics.median(r.rate / (1 - r.gc_share) for r in runs_of):,.0f}/s without it);"
            f" runs {', '.join(f'{r.rate:,.0f}' for r in runs_of)}]"
        )
    slowest, fastest = min(rates.values()), max(rates.values())
    ratio = fastest / slowest
    print(f"  slowest: {slowest:,.0f} alerts/s (target >= {TARGET_RATE:,.0f})")
    print(f"  ratio fastest/slowest: {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    if len(rates) > 1:
        lo, hi = min(rates), max(rates)
        print(f"  {hi:,} vs {lo:,} clusters: {rates[lo] / rates[hi]:.2f}x slower")
    ok = slowest >= TARGET_RATE and ratio <= TARGET_RATIO
    print("  targets met" if ok else "  TARGETS NOT MET")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
