"""Unit tests of the streaming telemetry aggregator (aetherops/telemetry.py)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pytest

from aetherops.errors import ConfigError
from aetherops.telemetry import BucketStats, FixedWidthBuckets, StreamingAggregator, reference_aggregate


def assert_same(got: list[BucketStats], want: list[BucketStats]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.key == w.key
        assert g.count == w.count
        assert g.mean == pytest.approx(w.mean, rel=1e-12, abs=1e-12)
        assert g.variance == pytest.approx(w.variance, rel=1e-8, abs=1e-12)
        assert (g.min, g.max, g.last) == (w.min, w.max, w.last)
        assert (g.first_timestamp, g.last_timestamp) == (w.first_timestamp, w.last_timestamp)
        assert g.anomaly_timestamps == w.anomaly_timestamps


def noisy_stream(n: int, seed: int = 1) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    t = 1_767_225_600.0 + np.sort(rng.uniform(0.0, n / 10.0, n))
    v = 50.0 + np.sin(t / 300.0) + rng.normal(0.0, 0.5, n)
    spikes = rng.choice(n, size=max(1, n // 200), replace=False)
    v[spikes] += rng.choice([-1.0, 1.0], spikes.size) * 6.0
    return t, v


@pytest.mark.parametrize("batch", [1, 7, 1000, 100_000])
def test_bulk_and_single_paths_equal_reference(batch: int) -> None:
    t, v = noisy_stream(5000)
    want = reference_aggregate(t, v)
    assert sum(b.anomalies for b in want) > 10
    agg = StreamingAggregator()
    flags: list[bool] = []
    for lo in range(0, t.size, batch):
        if batch == 1:
            flags.append(agg.add(float(t[lo]), float(v[lo])))
        else:
            flags.extend(agg.add_many(t[lo : lo + batch], v[lo : lo + batch]).tolist())
    done = agg.completed_buckets()
    assert_same(done + agg.flush(), want)
    flagged = {float(x) for x, f in zip(t, flags, strict=True) if f}
    assert flagged == {x for b in want for x in b.anomaly_timestamps}
    assert agg.count == t.size
    assert agg.running_mean == pytest.approx(float(np.mean(v)), rel=1e-12)
    assert agg.running_variance == pytest.approx(float(np.var(v)), rel=1e-9)


def test_statistics_exact_on_small_input() -> None:
    agg = StreamingAggregator(bucket_width_s=10.0, warmup=3, z_threshold=2.0)
    assert agg.running_variance == 0.0
    flags = agg.add_many([0, 1, 2, 3, 11, 12, 25], [1.0, 2.0, 3.0, 4.0, 100.0, 5.0, 2.0])
    # 4 is more than 2 std (0.816) above the mean 2 of 1..3; 100 far above 1..4 (mean 2.5, std 1.118);
    # 5 is not (the std is large now).
    assert flags.tolist() == [False, False, False, True, True, False, False]
    buckets = agg.completed_buckets()
    assert [b.key for b in buckets] == [0.0, 10.0]
    first, second = buckets
    assert (first.count, first.mean, first.variance, first.min, first.max, first.last) == (
        4,
        2.5,
        1.25,
        1.0,
        4.0,
        4.0,
    )
    assert first.std == pytest.approx(math.sqrt(1.25))
    assert first.anomaly_timestamps == (3.0,)
    assert (second.count, second.mean, second.anomalies, second.anomaly_timestamps) == (2, 52.5, 1, (11.0,))
    assert agg.completed_buckets() == []
    (last,) = agg.flush()
    assert (last.key, last.count, last.last) == (20.0, 1, 2.0)
    assert agg.flush() == []


def test_constant_history_flags_any_change() -> None:
    agg = StreamingAggregator(warmup=3)
    flags = [agg.add(float(i), 5.0) for i in range(5)] + [agg.add(5.0, 5.5), agg.add(6.0, 5.5)]
    assert flags == [False] * 5 + [True, False]


def test_late_and_non_finite_points_are_dropped_and_counted() -> None:
    t = [0.0, 61.0, 30.0, 62.0, math.nan, 63.0, 121.0, 5.0]
    v = [1.0, 2.0, 3.0, math.inf, 4.0, 5.0, 6.0, 7.0]
    want = reference_aggregate(t, v)
    agg = StreamingAggregator()
    flags = agg.add_many(t, v)
    assert flags.tolist() == [False] * 8
    assert (agg.late_count, agg.rejected_count) == (2, 2)
    assert_same(agg.flush(), want)
    assert [b.count for b in want] == [1, 2, 1]
    single = StreamingAggregator()
    for x, y in zip(t, v, strict=True):
        single.add(x, y)
    assert (single.late_count, single.rejected_count) == (2, 2)
    assert_same(single.flush(), want)
    # A batch made only of dropped points changes nothing.
    assert agg.add_many([1.0, 121.5, math.nan], [1.0, 1.0, 1.0]).tolist() == [False, False, False]
    assert agg.add_many([], []).tolist() == []
    assert agg.count == 4 and agg.late_count == 4
    assert single.add(130.0, 1.0) is False and single.late_count == 3  # flushed bucket: late
    assert single.add(180.0, 1.0) is False and single.count == 5


def test_custom_bucket_function_and_datetimes() -> None:
    def hourly_parity(ts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.floor(ts / 3600.0)

    t, v = noisy_stream(3000, seed=9)
    want = reference_aggregate(t, v, hourly_parity, z_threshold=2.5, warmup=20)
    agg = StreamingAggregator(hourly_parity, z_threshold=2.5, warmup=20)
    agg.add_many(t[:1000], v[:1000])
    for x, y in zip(t[1000:1010], v[1000:1010], strict=True):
        agg.add(float(x), float(y))
    agg.add_many(t[1010:], v[1010:])
    assert_same(agg.flush(), want)
    stamps = np.array(["2026-01-01T00:00:00", "2026-01-01T00:00:30", "2026-01-01T00:01:10"], dtype="datetime64[ms]")
    dt_agg = StreamingAggregator()
    dt_agg.add_many(stamps, [1.0, 2.0, 3.0])
    dt_agg.add(datetime(2026, 1, 1, 0, 1, 20, tzinfo=UTC), 4.0)
    got = dt_agg.flush()
    assert [b.count for b in got] == [2, 2]
    assert got[1].key == datetime(2026, 1, 1, 0, 1, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError):
        dt_agg.add(datetime(2026, 1, 1), 1.0)
    with pytest.raises(ValueError):
        dt_agg.add_many([1.0, 2.0], [1.0])


def test_numerically_stable_with_large_offset() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(10_000, dtype=np.float64)
    v = 1e9 + rng.normal(0.0, 1e-3, t.size)
    agg = StreamingAggregator(bucket_width_s=1000.0)
    agg.add_many(t[:5000], v[:5000])
    agg.add_many(t[5000:], v[5000:])
    for got in agg.flush():
        chunk = v[int(got.key) : int(got.key) + 1000]
        assert got.variance == pytest.approx(float(np.var(chunk)), rel=1e-6)


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigError):
        FixedWidthBuckets(0.0)
    with pytest.raises(ConfigError):
        FixedWidthBuckets(60.0, math.nan)
    with pytest.raises(ConfigError):
        StreamingAggregator(z_threshold=0.0)
    with pytest.raises(ConfigError):
        StreamingAggregator(warmup=1)
    buckets = FixedWidthBuckets(60.0, origin_s=30.0)
    assert buckets.scalar(29.0) == -30.0 and buckets.scalar(30.0) == 30.0
    assert buckets(np.array([29.0, 30.0, 95.0])).tolist() == [-30.0, 30.0, 90.0]
