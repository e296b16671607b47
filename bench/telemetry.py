"""Benchmark: the streaming telemetry aggregator against the two-pass reference implementation.

Windows of 100,000 points (10 Hz for ~2.8 h, 60 s buckets, a few spikes). Times the aggregator fed in
bulk (`add_many` over the whole window and in 1,000-point batches), fed point by point (`add`), and
`reference_aggregate`; checks the outputs are equal; reports the peak traced memory (tracemalloc) of
each. Target: the aggregator at least 3× faster than the reference.

    python bench/telemetry.py            # 100,000-point windows
    python bench/telemetry.py --quick    # 5,000 points, for smoke tests
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aetherops.telemetry import BucketStats, StreamingAggregator, reference_aggregate

FloatArray = npt.NDArray[np.float64]


def make_window(n_points: int, seed: int) -> tuple[FloatArray, FloatArray]:
    """10 Hz timestamps with jitter and a slowly varying signal with noise and rare spikes."""
    rng = np.random.default_rng(seed)
    t = 1_767_225_600.0 + np.arange(n_points) / 10.0 + rng.uniform(0.0, 0.05, n_points)
    v = 20.0 + 2.0 * np.sin(t / 600.0) + rng.normal(0.0, 0.3, n_points)
    spikes = rng.choice(n_points, size=max(1, n_points // 1000), replace=False)
    v[spikes] += 5.0
    return t, v


def run_bulk(t: FloatArray, v: FloatArray) -> list[BucketStats]:
    agg = StreamingAggregator()
    agg.add_many(t, v)
    return agg.flush()


def run_batches(t: FloatArray, v: FloatArray, size: int = 1000) -> list[BucketStats]:
    agg = StreamingAggregator()
    out: list[BucketStats] = []
    for lo in range(0, t.size, size):
        agg.add_many(t[lo : lo + size], v[lo : lo + size])
        out.extend(agg.completed_buckets())
    return out + agg.flush()


def run_points(t: FloatArray, v: FloatArray) -> list[BucketStats]:
    agg = StreamingAggregator()
    for x, y in zip(t.tolist(), v.tolist(), strict=True):
        agg.add(x, y)
    return agg.flush()


def run_reference(t: FloatArray, v: FloatArray) -> list[BucketStats]:
    return reference_aggregate(t.tolist(), v.tolist())


def _measure(fn: Callable[[], list[BucketStats]], runs: int) -> tuple[float, int, list[BucketStats]]:
    """Median seconds over `runs`, then peak traced bytes of one more run (tracing slows it down)."""
    times: list[float] = []
    result: list[BucketStats] = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak, result


def _same(a: list[BucketStats], b: list[BucketStats]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x.key, x.count, x.min, x.max, x.last, x.anomaly_timestamps) != (
            y.key,
            y.count,
            y.min,
            y.max,
            y.last,
            y.anomaly_timestamps,
        ):
            return False
        if not math.isclose(x.mean, y.mean, rel_tol=1e-12) or not math.isclose(
            x.variance, y.variance, rel_tol=1e-8, abs_tol=1e-12
        ):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="streaming aggregator vs reference")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--points", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    n = args.points or (5_000 if args.quick else 100_000)
    runs = args.runs or (3 if args.quick else 5)
    t, v = make_window(n, args.seed)
    print(f"window: {n:,} points, 60 s buckets; median of {runs} runs; peak = tracemalloc peak of one run")
    ref_s, ref_peak, ref_out = _measure(lambda: run_reference(t, v), runs)
    ok = True
    for label, fn in (
        ("aggregator add_many (one batch)", lambda: run_bulk(t, v)),
        ("aggregator add_many (1,000-point batches)", lambda: run_batches(t, v)),
        ("aggregator add (point by point)", lambda: run_points(t, v)),
    ):
        secs, peak, out = _measure(fn, runs)
        same = _same(out, ref_out)
        ok = ok and same
        print(
            f"{label:44s} {secs * 1e3:9.2f} ms  peak {peak / 1e6:7.2f} MB  "
            f"{ref_s / secs:6.1f}× vs reference  equal: {same}"
        )
    print(f"{'reference_aggregate (two-pass)':44s} {ref_s * 1e3:9.2f} ms  peak {ref_peak / 1e6:7.2f} MB")
    anomalies = sum(b.anomalies for b in ref_out)
    print(f"buckets: {len(ref_out)}, anomalies flagged: {anomalies}; target: >= 3× faster")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
