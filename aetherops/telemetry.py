"""Single-pass streaming aggregation of high-rate telemetry before it is stored.

`StreamingAggregator` reduces a stream of (timestamp, value) points to one `BucketStats` per bucket
(default: fixed 60 s windows): count, mean and variance (Welford / Chan et al., numerically stable),
min, max, last, and anomaly flags. A point is anomalous when its z-score against the running
statistics of every earlier accepted point of the stream exceeds ``z_threshold`` (after ``warmup``
points; with zero running variance any value different from the mean is anomalous). Anomalous points
still count in the statistics. Each point is looked at once: `add` updates with Welford's recurrence,
`add_many` updates a whole numpy batch with cumulative sums and merges it into the running and bucket
state (the parallel form of the same recurrence), so the result equals feeding the points one by one
up to floating-point rounding.

Ordering rule: the stream has one open bucket, the newest. A point for an older bucket (already
closed) is *late*: dropped and counted in `late_count`. Non-finite timestamps or values are dropped
and counted in `rejected_count`. Closed buckets are handed out by `completed_buckets()`; `flush()`
also closes the open one, for good: later points for it are late too.

`reference_aggregate` is the deliberately plain two-pass implementation the tests and the benchmark
compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from aetherops.errors import ConfigError

__all__ = [
    "BucketFn",
    "BucketStats",
    "FixedWidthBuckets",
    "StreamingAggregator",
    "reference_aggregate",
]

FloatArray = npt.NDArray[np.float64]

#: Maps timestamps (seconds since the epoch) to bucket keys (e.g. the bucket start), vectorised.
BucketFn = Callable[[FloatArray], FloatArray]


class FixedWidthBuckets:
    """Fixed-width time buckets: key = origin + floor((t − origin) / width) · width."""

    def __init__(self, width_s: float = 60.0, origin_s: float = 0.0) -> None:
        if not (math.isfinite(width_s) and width_s > 0.0):
            raise ConfigError("bucket width must be positive")
        if not math.isfinite(origin_s):
            raise ConfigError("bucket origin must be finite")
        self.width_s = width_s
        self.origin_s = origin_s

    def __call__(self, timestamps: FloatArray) -> FloatArray:
        keys: FloatArray = self.origin_s + np.floor((timestamps - self.origin_s) / self.width_s) * self.width_s
        return keys

    def scalar(self, timestamp: float) -> float:
        """The key of one timestamp without building an array (the per-point fast path)."""
        return self.origin_s + math.floor((timestamp - self.origin_s) / self.width_s) * self.width_s


@dataclass(frozen=True)
class BucketStats:
    """Statistics of one closed bucket; `variance` is the population variance (divide by count)."""

    key: float
    count: int
    mean: float
    variance: float
    min: float
    max: float
    last: float
    first_timestamp: float
    last_timestamp: float
    anomaly_timestamps: tuple[float, ...] = ()

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def anomalies(self) -> int:
        return len(self.anomaly_timestamps)


@dataclass
class _Acc:
    """The open bucket's running state."""

    key: float
    n: int
    mean: float
    m2: float
    lo: float
    hi: float
    last: float
    first_t: float
    last_t: float
    anomalies: list[float] = field(default_factory=list)

    def merge(self, n: int, mean: float, m2: float, lo: float, hi: float, last: float, last_t: float) -> None:
        """Chan et al.'s combination of two (count, mean, M2) summaries."""
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.last = last
        self.last_t = last_t

    def close(self) -> BucketStats:
        return BucketStats(
            key=self.key,
            count=self.n,
            mean=self.mean,
            variance=self.m2 / self.n,
            min=self.lo,
            max=self.hi,
            last=self.last,
            first_timestamp=self.first_t,
            last_timestamp=self.last_t,
            anomaly_timestamps=tuple(self.anomalies),
        )


def _to_seconds(timestamp: float | datetime) -> float:
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return timestamp.timestamp()
    return float(timestamp)


def _array_seconds(timestamps: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(timestamps)
    if np.issubdtype(arr.dtype, np.datetime64):
        return arr.astype("datetime64[ns]").astype(np.int64) / 1e9
    return np.asarray(arr, dtype=np.float64).ravel()


class StreamingAggregator:
    """Single-pass per-bucket statistics with z-score anomaly flags (see the module doc)."""

    def __init__(
        self,
        bucket_fn: BucketFn | None = None,
        *,
        bucket_width_s: float = 60.0,
        z_threshold: float = 3.0,
        warmup: int = 10,
    ) -> None:
        if not (math.isfinite(z_threshold) and z_threshold > 0.0):
            raise ConfigError("z_threshold must be positive")
        if warmup < 2:
            raise ConfigError("warmup must be at least 2 points")
        self._bucket_fn: BucketFn = bucket_fn if bucket_fn is not None else FixedWidthBuckets(bucket_width_s)
        self.z_threshold = z_threshold
        self.warmup = warmup
        # Running statistics of the whole stream (Welford state).
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._open: _Acc | None = None
        # Key of the newest closed bucket: points for it or older ones are late, even after flush().
        self._closed_upto = -math.inf
        self._done: list[BucketStats] = []
        self.late_count = 0
        self.rejected_count = 0

    # ---- state ----------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Accepted points so far."""
        return self._n

    @property
    def running_mean(self) -> float:
        return self._mean

    @property
    def running_variance(self) -> float:
        """Population variance of every accepted point so far (0 before two points)."""
        return self._m2 / self._n if self._n else 0.0

    def _key(self, timestamp: float) -> float:
        fn = self._bucket_fn
        if isinstance(fn, FixedWidthBuckets):
            return fn.scalar(timestamp)
        return float(fn(np.asarray([timestamp], dtype=np.float64))[0])

    # ---- single points --------------------------------------------------------------------------

    def add(self, timestamp: float | datetime, value: float) -> bool:
        """Add one point; True when it is flagged anomalous (False also for dropped points)."""
        t = _to_seconds(timestamp)
        value = float(value)
        if not (math.isfinite(t) and math.isfinite(value)):
            self.rejected_count += 1
            return False
        key = self._key(t)
        acc = self._open
        if key <= self._closed_upto or (acc is not None and key < acc.key):
            self.late_count += 1
            return False
        anomalous = False
        if self._n >= self.warmup:
            deviation = abs(value - self._mean)
            anomalous = deviation > self.z_threshold * math.sqrt(self._m2 / self._n)
        # Welford's update of the stream statistics.
        self._n += 1
        delta = value - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (value - self._mean)
        if acc is None or key > acc.key:
            if acc is not None:
                self._close(acc)
            acc = self._open = _Acc(key, 1, value, 0.0, value, value, value, t, t)
        else:
            acc.n += 1
            d = value - acc.mean
            acc.mean += d / acc.n
            acc.m2 += d * (value - acc.mean)
            acc.lo = min(acc.lo, value)
            acc.hi = max(acc.hi, value)
            acc.last = value
            acc.last_t = t
        if anomalous:
            acc.anomalies.append(t)
        return anomalous

    # ---- batches --------------------------------------------------------------------------------

    def add_many(self, timestamps: npt.ArrayLike, values: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Add a batch (seconds since the epoch or datetime64, and values). Returns the anomaly flag
        of every input point (False for dropped ones)."""
        t_all = _array_seconds(timestamps)
        v_all = np.asarray(values, dtype=np.float64).ravel()
        if t_all.shape != v_all.shape:
            raise ValueError("timestamps and values differ in length")
        flags = np.zeros(t_all.size, dtype=bool)
        ok = np.isfinite(t_all) & np.isfinite(v_all)
        self.rejected_count += int(t_all.size - ok.sum())
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return flags
        t = t_all[idx]
        v = v_all[idx]
        keys = np.asarray(self._bucket_fn(t), dtype=np.float64)
        # Late: the key is older than the newest key seen before it (the open bucket included).
        start_key = self._open.key if self._open is not None else -np.inf
        seen = np.maximum.accumulate(np.concatenate([[start_key], keys]))[:-1]
        late = (keys < seen) | (keys <= self._closed_upto)
        if np.any(late):
            self.late_count += int(late.sum())
            keep = ~late
            idx, t, v, keys = idx[keep], t[keep], v[keep], keys[keep]
            if idx.size == 0:
                return flags
        k = v.size
        # Running statistics before each point, from cumulative sums of deviations from a shift
        # (the prior mean): prior points contribute Σd = 0 and Σd² = M2.
        n0 = self._n
        shift = self._mean if n0 else float(v[0])
        d = v - shift
        s1 = np.cumsum(d)
        s2 = np.cumsum(d * d)
        n_prev = n0 + np.arange(k, dtype=np.float64)
        s1_prev = np.concatenate([[0.0], s1[:-1]])
        s2_prev = np.concatenate([[0.0], s2[:-1]])
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_prev = shift + s1_prev / n_prev
            var_prev = np.maximum(self._m2 + s2_prev - s1_prev * s1_prev / n_prev, 0.0) / n_prev
            anomalous = (n_prev >= self.warmup) & (np.abs(v - mean_prev) > self.z_threshold * np.sqrt(var_prev))
        flags[idx] = anomalous
        n_new = n0 + k
        self._mean = shift + float(s1[-1]) / n_new
        self._m2 = max(self._m2 + float(s2[-1]) - float(s1[-1]) ** 2 / n_new, 0.0)
        self._n = n_new
        # Per-bucket statistics of the batch's runs of equal keys (keys are non-decreasing now).
        starts = np.concatenate([[0], np.flatnonzero(np.diff(keys) != 0.0) + 1])
        ends = np.append(starts[1:], k)
        counts = ends - starts
        means = np.add.reduceat(v, starts) / counts
        m2s = np.add.reduceat((v - np.repeat(means, counts)) ** 2, starts)
        mins = np.minimum.reduceat(v, starts)
        maxs = np.maximum.reduceat(v, starts)
        anomaly_pos = np.flatnonzero(anomalous)
        cut = [*np.searchsorted(anomaly_pos, starts).tolist(), anomaly_pos.size]
        anomaly_t = t[anomaly_pos].tolist()
        for j in range(starts.size):
            lo, hi = int(starts[j]), int(ends[j])
            key = float(keys[lo])
            acc = self._open
            if acc is None or key > acc.key:
                if acc is not None:
                    self._close(acc)
                acc = self._open = _Acc(
                    key,
                    int(counts[j]),
                    float(means[j]),
                    float(m2s[j]),
                    float(mins[j]),
                    float(maxs[j]),
                    float(v[hi - 1]),
                    float(t[lo]),
                    float(t[hi - 1]),
                )
            else:
                acc.merge(
                    int(counts[j]),
                    float(means[j]),
                    float(m2s[j]),
                    float(mins[j]),
                    float(maxs[j]),
                    float(v[hi - 1]),
                    float(t[hi - 1]),
                )
            acc.anomalies.extend(anomaly_t[cut[j] : cut[j + 1]])
        return flags

    # ---- output ---------------------------------------------------------------------------------

    def _close(self, acc: _Acc) -> None:
        self._done.append(acc.close())
        self._closed_upto = acc.key

    def completed_buckets(self) -> list[BucketStats]:
        """Hand out (and forget) the buckets closed so far, oldest first."""
        done, self._done = self._done, []
        return done

    def flush(self) -> list[BucketStats]:
        """Close the open bucket too and hand out every closed bucket; the running statistics stay."""
        if self._open is not None:
            self._close(self._open)
            self._open = None
        return self.completed_buckets()


def reference_aggregate(
    timestamps: Sequence[float] | FloatArray,
    values: Sequence[float] | FloatArray,
    bucket_fn: BucketFn | None = None,
    *,
    bucket_width_s: float = 60.0,
    z_threshold: float = 3.0,
    warmup: int = 10,
) -> list[BucketStats]:
    """The plain two-pass implementation of what `StreamingAggregator` computes (same rules).

    Pass one drops non-finite and late points, flags anomalies from running sums (shifted by the first
    value) and groups the values by bucket; pass two computes each bucket's mean and then its variance
    around that mean.
    """
    fn = bucket_fn if bucket_fn is not None else FixedWidthBuckets(bucket_width_s)
    groups: dict[float, list[tuple[float, float, bool]]] = {}
    order: list[float] = []
    newest = -math.inf
    n = 0
    shift = 0.0
    s1 = 0.0
    s2 = 0.0
    for raw_t, raw_v in zip(timestamps, values, strict=True):
        t = float(raw_t)
        x = float(raw_v)
        if not (math.isfinite(t) and math.isfinite(x)):
            continue
        if isinstance(fn, FixedWidthBuckets):
            key = fn.scalar(t)
        else:
            key = float(fn(np.asarray([t], dtype=np.float64))[0])
        if key < newest:
            continue  # late
        newest = key
        flagged = False
        if n >= warmup:
            mean = shift + s1 / n
            var = max(s2 / n - (s1 / n) ** 2, 0.0)
            flagged = abs(x - mean) > z_threshold * math.sqrt(var)
        if n == 0:
            shift = x
        n += 1
        s1 += x - shift
        s2 += (x - shift) ** 2
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((t, x, flagged))
    result: list[BucketStats] = []
    for key in order:
        points = groups[key]
        xs = [x for _, x, _ in points]
        mean = sum(xs) / len(xs)
        variance = sum((x - mean) ** 2 for x in xs) / len(xs)
        result.append(
            BucketStats(
                key=key,
                count=len(xs),
                mean=mean,
                variance=variance,
                min=min(xs),
                max=max(xs),
                last=xs[-1],
                first_timestamp=points[0][0],
                last_timestamp=points[-1][0],
                anomaly_timestamps=tuple(t for t, _, f in points if f),
            )
        )
    return result
