"""Alert correlation core: alerts in, incident clusters out, with a probable root cause and no duplicates.

Pure and deterministic: no I/O, time only from the injected `Clock`, cluster ids from the injected
`id_factory`. The service layer (persistence, outbox, gRPC) drives a `CorrelationEngine` and stores
what it returns; after a restart it feeds the persisted open clusters back with `restore_cluster`.

Scoring (`CorrelationEngine.score_components`). For two alerts *a*, *b* with ``dt = |t_a - t_b|``
and window ``W`` (``time_window_s``)::

    time       = 0.3 * (1 - dt / W)                      linear decay, 0 at the window's edge
    satellite  = same_satellite_bonus (0.3) if same satellite else 0
    dependency = 0.4 * graph.strength(sub_a, sub_b)      1 for the same known subsystem, edge/path
                                                         weight in either direction, 0 if unknown
    severity   = 0.1 * (sev_a + sev_b) / 10              in [0.02, 0.1]
    total      = clamp(time + satellite + dependency + severity, 0, 1), and 0 if dt >= W

An alert joins the open cluster in memory with the best score >= ``score_threshold`` (default 0.5),
where a cluster's score is the *maximum* pairwise score against its candidate alerts: one related
alert is enough evidence for a cascade, while sums or means would favour big clusters or penalise
diverse ones. Clusters are never merged: an alert that relates to two clusters joins the better
one. Duplicates (below) are checked first. The default threshold gives:

* power, then thermal/propulsion on one satellite: one cluster anywhere in the window (>= 0.68);
* the same subsystem on several satellites: one cluster within 220 s (260 s at severity 3);
* unrelated subsystems on different satellites: never one cluster, even simultaneously
  (at most 0.3 + 0.1 < 0.5); time alone never correlates, which is why the threshold must be > 0.4;
* unrelated or unknown subsystems on one satellite: one cluster within 120-200 s (by severity);
* related subsystems on different satellites also group when close enough in time (power on
  SAT-1 and payload on SAT-9 within ~3 minutes), as the dependency term does not look at satellites.

Deduplication: an alert with the satellite and subsystem (aliases resolved) of an alert in an
open cluster in memory, within ``dedupe_window_s`` (60 s) of it and of no higher severity, is counted
on that cluster (`duplicate_count`) instead of being added. The reference is the last alert *kept*,
so a steady repeat every 30 s yields one kept alert per minute. An escalation (a higher severity)
is always kept: it raises the cluster's severity, which watchers and runbook triggers match on.
Alert ids are idempotent: a known id returns its first outcome (``replay=True``) and changes
nothing. (Unless built with ``remember_alert_ids=False``, as the service builds it: its store
answers replays first.)

Root cause (`IncidentCluster.root_cause`): among the cluster's subsystems, the one upstream (per
the graph, transitively) of the most *other* subsystems present wins; ties go to the earliest first
alert, then higher severity, then alert id. Its earliest alert is the root cause. So a power alert
that precedes thermal alerts beats an earlier minor alert on an unrelated subsystem. Confidence is
0.5 for a single-subsystem cluster (time order only), else ``0.25 + 0.55 * explained / others +
0.2 * (root is the cluster's earliest alert)``.

Cost per alert is bounded, independent of the number of active clusters: open clusters are indexed
by satellite and by (known) subsystem, each index ordered by last update; a new alert scores only
the most recently updated clusters (at most `MAX_CANDIDATE_CLUSTERS` per index) on its own
satellite and on the subsystems related strongly enough to reach the threshold across satellites.
Within a cluster, the candidates are the latest alert per (satellite, subsystem) and the first and
latest alert per known subsystem (late alerts compare with the nearer of the two). Clusters whose
last alert fell out of the window are dropped from memory by a bucketed sweep during `ingest`
(`expire` does it on demand); they stay OPEN in the database, and their alert ids are forgotten.

Late alerts: a satellite out of contact logs its alerts and downlinks them at the next pass, hours
later. Such a batch correlates among itself as it would have live: the scores compare alert times,
not the clock, and a cluster that takes an alert already older than the window stays in memory
for a window after that arrival (`IncidentCluster.late_arrival_time`, which the service stores so a
restart keeps it), for the rest of its batch. It is not *active* (`get_active_clusters`: last alert
within ``W`` of the clock) for that.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
import math
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, NamedTuple

from aetherops.clock import EARLIEST_TIME, TOO_EARLY, Clock, SystemClock
from aetherops.errors import AlreadyExistsError, ConfigError, FieldViolation, NotFoundError, ValidationError
from aetherops.ids import sortable_id
from aetherops.subsystems import DEFAULT_DEPENDENCY_GRAPH, DependencyGraph, normalize_name
from aetherops.text import chars_problem, id_problem, labels_problems, text_problem

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "DEPENDENCY_WEIGHT",
    "MAX_CANDIDATE_CLUSTERS",
    "SEVERITY_WEIGHT",
    "TIME_WEIGHT",
    "Acknowledgement",
    "Alert",
    "ClusterStatus",
    "CorrelationEngine",
    "EngineStats",
    "IncidentCluster",
    "IngestResult",
    "Labels",
    "ScoreComponents",
    "alert_size",
    "severity_problem",
    "validate_alert",
]

TIME_WEIGHT: Final = 0.3
DEPENDENCY_WEIGHT: Final = 0.4
SEVERITY_WEIGHT: Final = 0.1
DEFAULT_SCORE_THRESHOLD: Final = 0.5
MAX_CANDIDATE_CLUSTERS: Final = 16
"""Per index list (the alert's satellite, each related subsystem), the most recently updated open
clusters scored. Real fleets have a handful; the cap bounds the pathological case."""

_SWEEP_BUCKETS: Final = 4  # expiry granularity: the window is cut into this many time buckets
# Clusters an ingest examines for expiry at most; the rest wait for the next ingests. Alerts that
# arrived together expire together: 100,000 clusters opened in one second were all dropped by the
# one ingest that crossed the window, and it took 169 ms, a stall for every caller queued behind it.
# A cluster past the window is never joined whether or not it was dropped yet, and each ingest
# opens at most one, so the backlog drains.
_SWEEP_BUDGET: Final = 64
_KEY_CACHE_LIMIT: Final = 65_536  # raw subsystem spellings remembered (unknown names are unbounded)

_Key = int | str
"""A subsystem inside the engine: its graph index if known, else its normalised name."""


# ---- records ---------------------------------------------------------------------------------


class Labels(Mapping[str, str]):
    """A read-only, hashable label mapping (what `Alert.labels` holds)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data: dict[str, str] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"

    def as_tuple(self) -> tuple[tuple[str, str], ...]:
        """Sorted (key, value) pairs."""
        return tuple(sorted(self._data.items()))

    def to_dict(self) -> dict[str, str]:
        """A plain copy (without the Mapping protocol's per-key calls that `dict(labels)` makes)."""
        return dict(self._data)


_NO_LABELS: Final = Labels()


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert from one satellite subsystem. Immutable.

    `labels` may be given as any mapping; it is stored as a read-only `Labels`. `epoch` (seconds
    since 1970, derived from `timestamp`) exists so the hot path does not convert datetimes. A naive
    timestamp is read as UTC for `epoch`, but `validate_alert` rejects it.
    """

    alert_id: str
    satellite_id: str
    subsystem: str
    severity: int
    timestamp: datetime
    message: str = ""
    labels: Mapping[str, str] = _NO_LABELS
    tracking_id: str = ""
    epoch: float = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if type(self.labels) is not Labels:  # not isinstance: Labels is an ABC, and that check is slow
            # Most alerts have none: they share one empty mapping instead of two objects each.
            object.__setattr__(self, "labels", Labels(self.labels) if self.labels else _NO_LABELS)
        try:
            ts = self.timestamp
            epoch = (ts if ts.utcoffset() is not None else ts.replace(tzinfo=UTC)).timestamp()
        except (AttributeError, TypeError, ValueError, OverflowError):
            epoch = math.nan  # not a datetime: validate_alert reports it, ingest refuses it
        object.__setattr__(self, "epoch", epoch)

    def labels_dict(self) -> dict[str, str]:
        """The labels as a plain dict of their own (for encoders that need one)."""
        labels = self.labels
        return labels.to_dict() if isinstance(labels, Labels) else dict(labels)

    def with_tracking_id(self, tracking_id: str) -> Alert:
        return replace(self, tracking_id=tracking_id)


_ALERT_FIXED: Final = 400
"""The record with its collector header, its datetime and epoch (176 bytes measured), and its ids at a
typical length: they are bounded (`MAX_ID_LEN`), so counting each would cost more than it tells."""
_LABEL_ENTRY: Final = 40  # a label's entry in its mapping, besides its two strings


def alert_size(alert: Alert) -> int:
    """About how many bytes of memory an alert holds: the record, its message and its labels.

    What the service's ingest queue counts against its byte budget. Strings count as CPython stores
    them, so text outside Latin-1 counts two or four bytes a character: within the validation limits
    a typical alert holds about half a kilobyte, and the largest about 150 kilobytes.
    """
    size = _ALERT_FIXED + sys.getsizeof(alert.message)
    labels = alert.labels
    if labels:
        getsize = sys.getsizeof
        for key, value in labels.items():
            size += getsize(key) + getsize(value) + _LABEL_ENTRY
    return size


def severity_problem(severity: object) -> str | None:
    """Why `severity` is not an alert severity (None when it is): an integer from 1 to 5."""
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        return f"must be an integer between 1 and 5, got {severity!r}"
    return None


def validate_alert(
    alert: Alert,
    *,
    now: datetime,
    max_future_skew_s: float = 300.0,
    max_message_len: int = 4096,
    max_labels: int = 64,
    max_label_len: int = 256,
    field_prefix: str = "alert",
) -> list[FieldViolation]:
    """Every problem with `alert` at once (empty list if it is fine); fields named as in the proto."""
    f = field_prefix + "."
    out: list[FieldViolation] = []
    for name in ("alert_id", "satellite_id", "subsystem"):
        problem = id_problem(getattr(alert, name))
        if problem is not None:
            out.append(FieldViolation(f + name, problem))
    problem = severity_problem(alert.severity)
    if problem is not None:
        out.append(FieldViolation(f + "severity", problem))
    ts = alert.timestamp
    if not isinstance(ts, datetime):
        out.append(FieldViolation(f + "timestamp", "required"))
    elif ts.utcoffset() is None:
        out.append(FieldViolation(f + "timestamp", "must be timezone-aware (UTC)"))
    elif ts < EARLIEST_TIME:
        out.append(FieldViolation(f + "timestamp", TOO_EARLY))
    else:
        ahead = (ts - now).total_seconds()
        if ahead > max_future_skew_s:
            out.append(
                FieldViolation(
                    f + "timestamp", f"is {ahead:.0f} s in the future; at most {max_future_skew_s:g} s of skew allowed"
                )
            )
    problem = text_problem(alert.message, max_message_len)
    if problem is not None:
        out.append(FieldViolation(f + "message", problem))
    # Set by the edge or a NATS header, not by the alert's sender, but stored beside it all the same.
    problem = chars_problem(alert.tracking_id)
    if problem is not None:
        out.append(FieldViolation(f + "tracking_id", problem))
    labels = alert.labels
    if labels:  # most alerts have none: iterating an empty mapping through its ABC costs 0.4 us
        out.extend(labels_problems(labels, f + "labels", max_labels=max_labels, max_len=max_label_len))
    return out


class ClusterStatus(enum.Enum):
    OPEN = "OPEN"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """Someone is working on an incident: who, since when, and what they said they are doing."""

    by: str
    time: datetime
    note: str = ""


@dataclass(frozen=True, slots=True)
class ScoreComponents:
    """The weighted parts of a pairwise score; `total` is their clamped sum (0 outside the window)."""

    time: float
    satellite: float
    dependency: float
    severity: float
    total: float


class IngestResult(NamedTuple):
    """What one `ingest_detailed` did. A named tuple: one is made per alert, and building a frozen
    dataclass costs three times as much.

    `replay` means the alert id was already known: nothing changed and the other fields repeat the
    first outcome (`duplicate`/`duplicate_of` as it was then; `opened`/`root_cause_changed` False).
    `membership_changed`: the cluster's `satellites` or `subsystems` changed (a satellite or
    subsystem it did not have; always on `opened`), so a writer that stores them knows when to.
    `escalated_from`: the cluster's highest severity before the alert, when the alert raised it
    (0 otherwise, and on `opened`): an acknowledged incident that escalates is news again.
    """

    cluster_id: str
    duplicate: bool = False
    opened: bool = False
    root_cause_changed: bool = False
    duplicate_of: str | None = None
    replay: bool = False
    membership_changed: bool = False
    escalated_from: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    clusters_in_memory: int
    opened: int
    duplicates: int
    expired: int


def _epoch_of(alert: Alert) -> float:
    return alert.epoch


def _kept_until(c: IncidentCluster) -> float:
    """What keeps a cluster in memory for another window: its last alert, or the arrival (engine clock)
    of its last late alert, whichever is later."""
    last, late = c._last_epoch, c._late_touch
    return last if last >= late else late


class _Slot:
    """One cluster's alerts on one satellite, as scoring candidates: the latest time and severity per
    subsystem.

    Times and severities sit unboxed in one `array` ([t0, sev0, t1, sev1, ...]) next to a tuple of
    subsystem keys, so scoring a candidate cluster reads two buffers instead of two objects per
    alert. With tens of thousands of active clusters nothing is in the CPU cache, and those reads
    are what an ingest costs.

    `keys` is a tuple, replaced when it changes, not a list: a tuple of strings and ints leaves the
    garbage collector's sight at its first collection, while every list stays in it and is walked by
    every collection of its generation. With an incident per alert (hundreds of thousands in memory),
    a list of keys and three of the cluster's own containers (now absent or immutable until needed)
    cost about a quarter of the collector's time in a server streaming new incidents. `latest`
    changes with nearly every alert, so it stays a list: a new tuple per alert made the young
    collections of the engine benchmark 1.7 times as long.
    """

    __slots__ = ("cluster", "data", "keys", "latest", "older")

    def __init__(self, cluster: IncidentCluster) -> None:
        self.cluster = cluster
        # The slot of the next less recently updated cluster on the same satellite: the engine's
        # satellite index holds the newest slot and the rest hang off it (see `CorrelationEngine._sats`).
        self.older: _Slot | None = None
        self.keys: tuple[_Key, ...] = ()
        self.data: array[float] = array("d")
        # The id of the alert behind each key's time: what a duplicate duplicates, without searching
        # the cluster (which is long, and often full of equal timestamps, in an alert storm).
        self.latest: list[str] = []


@dataclass(eq=False, slots=True)
class IncidentCluster:
    """A group of related alerts. Owned and mutated by the engine; callers should treat it as read-only.

    `alerts` is ordered by timestamp (arrival order among equal timestamps) and holds no duplicates;
    those are only counted in `duplicate_count`. Identity, not value, is equality. A cluster always
    holds at least one alert: `first_alert_time` and `last_alert_time` are read off its ends.
    """

    cluster_id: str
    alerts: list[Alert]
    root_cause: str | None
    status: ClusterStatus
    opened_time: datetime
    closed_time: datetime | None = None
    duplicate_count: int = 0
    root_cause_confidence: float = 0.0
    acknowledgement: Acknowledgement | None = None
    # ---- engine index state (rebuilt by CorrelationEngine.restore_cluster) ----
    _first_epoch: float = field(default=math.inf, repr=False)
    _last_epoch: float = field(default=-math.inf, repr=False)
    _max_sev: int = field(default=0, repr=False)
    _sub_first: dict[_Key, Alert] = field(default_factory=dict, repr=False)  # earliest alert per subsystem
    _sub_last: dict[int, Alert] = field(default_factory=dict, repr=False)  # latest per known subsystem
    _slots: dict[str, _Slot] = field(default_factory=dict, repr=False)  # per satellite
    # Immutable or absent until needed (see `_Slot`): most clusters hold one alert.
    _names: tuple[str, ...] = field(default=(), repr=False)  # canonical subsystem names
    _mask: int = field(default=0, repr=False)  # bit per known subsystem present
    _joinable: bool = field(default=False, repr=False)  # open and in the engine's indexes
    # (duplicate id, id it duplicates), kept only when the engine remembers alert ids (`_replay`).
    _dups: list[tuple[str, str]] | None = field(default=None, repr=False)
    _root_rank: tuple[int, float, int, str] | None = field(default=None, repr=False)
    _root_alert: Alert | None = field(default=None, repr=False)
    _sorted_sats: tuple[str, ...] = field(default=(), repr=False)  # `satellites`, while as long as _slots
    # Engine clock time of the last alert that was already older than the window when it came (a pass
    # downlinking what the satellite logged out of contact): keeps the cluster in memory for its
    # batch-mates (see `CorrelationEngine._sweep`). Untouched (-inf) for alerts that come in time.
    _late_touch: float = field(default=-math.inf, repr=False)

    @classmethod
    def restore(
        cls,
        *,
        cluster_id: str,
        alerts: Iterable[Alert],
        root_cause: str | None = None,
        opened_time: datetime | None = None,
        duplicate_count: int = 0,
        status: ClusterStatus = ClusterStatus.OPEN,
        closed_time: datetime | None = None,
        root_cause_confidence: float = 0.0,
        late_arrival_time: datetime | None = None,
        acknowledgement: Acknowledgement | None = None,
    ) -> IncidentCluster:
        """A cluster rebuilt from its persisted form, ready for `CorrelationEngine.restore_cluster`.

        `late_arrival_time` is its `late_arrival_time` as stored: a cluster that a downlinked batch is
        still joining stays in memory for the rest of the batch, as it would have without the restart.
        """
        ordered = sorted(alerts, key=_epoch_of)
        if not ordered:
            raise ValidationError.single("cluster.alerts", f"cluster {cluster_id!r} has no alerts")
        first, last = ordered[0], ordered[-1]
        return cls(
            cluster_id=cluster_id,
            alerts=ordered,
            root_cause=root_cause,
            status=status,
            opened_time=opened_time or first.timestamp,
            closed_time=closed_time,
            duplicate_count=duplicate_count,
            root_cause_confidence=root_cause_confidence,
            acknowledgement=acknowledgement,
            _first_epoch=first.epoch,
            _last_epoch=last.epoch,
            _max_sev=max(a.severity for a in ordered),
            _late_touch=-math.inf if late_arrival_time is None else late_arrival_time.timestamp(),
        )

    # Read off the alerts, not stored: storing the newest alert's time on every ingest released the
    # previous alert's datetime, a cache miss per alert with tens of thousands of clusters in memory.
    @property
    def first_alert_time(self) -> datetime:
        return self.alerts[0].timestamp

    @property
    def last_alert_time(self) -> datetime:
        return self.alerts[-1].timestamp

    def duration_seconds(self) -> float:
        """Seconds from the earliest to the latest alert (0 for a single alert)."""
        return (self.last_alert_time - self.first_alert_time).total_seconds()

    def is_multi_satellite(self) -> bool:
        return len(self.satellites) > 1

    @property
    def late_arrival_time(self) -> datetime | None:
        """When (engine clock) the last alert that was already older than the window arrived, if one
        did: a downlinked batch is joining the cluster (it stays in memory for a window after this)."""
        late = self._late_touch
        return None if late == -math.inf else datetime.fromtimestamp(late, UTC)

    @property
    def satellites(self) -> list[str]:
        """Distinct satellite ids, sorted (a new list)."""
        slots = self._slots
        if not slots:
            return sorted({a.satellite_id for a in self.alerts})
        # Sorted once per new satellite, not per call: a storm's incident spans hundreds of
        # satellites and is written (and so asked) on every commit that touches it. Satellites are
        # only ever added to `_slots` (it is replaced wholesale on restore and drop), so an equal
        # length means the same set.
        if len(self._sorted_sats) != len(slots):
            self._sorted_sats = tuple(sorted(slots))
        return list(self._sorted_sats)

    @property
    def subsystems(self) -> list[str]:
        """Distinct canonical subsystem names (aliases resolved, lower case), sorted."""
        if self._names:
            return sorted(self._names)
        return sorted({normalize_name(a.subsystem) for a in self.alerts})

    @property
    def max_severity(self) -> int:
        return self._max_sev

    @property
    def alert_count(self) -> int:
        return len(self.alerts)

    def root_cause_alert(self) -> Alert | None:
        root = self._root_alert  # kept by the engine's ranking; a search only for other callers' clusters
        if root is not None and root.alert_id == self.root_cause:
            return root
        return next((a for a in self.alerts if a.alert_id == self.root_cause), None)


_RANK_NONE: Final = 0  # root-cause ranking unaffected
_RANK_UNKNOWN: Final = 1  # a new unknown subsystem: compare it with the current root only
_RANK_FULL: Final = 2  # re-rank every subsystem

_Outcome = tuple[str, bool, str | None, bool, bool, bool, int]
"""(cluster id, opened, duplicate of, root cause changed, replay, membership changed)."""


# ---- engine ----------------------------------------------------------------------------------


class CorrelationEngine:
    """Groups alerts into incident clusters (see the module docstring for the algorithm).

    Not thread-safe: one event loop (or one lock) drives it.
    """

    def __init__(
        self,
        time_window_s: float = 300.0,
        dedupe_window_s: float = 60.0,
        dependency_graph: DependencyGraph | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        same_satellite_bonus: float = 0.3,
        clock: Clock | None = None,
        id_factory: Callable[[], str] | None = None,
        remember_alert_ids: bool = True,
    ) -> None:
        """`remember_alert_ids=False` leaves replays to the caller: a repeated alert id is then
        correlated again like a new alert. The service turns it off because PostgreSQL already answers
        every replay before the engine sees the alert (it looks up each batch's ids, and answers an id
        repeated within a batch itself); remembering them here as well cost a set entry per alert in
        memory and, with 100,000 active clusters, about a tenth of an ingest (a cache miss to look the
        id up, and two more to forget it when its cluster expires)."""
        floor = TIME_WEIGHT + SEVERITY_WEIGHT
        if not (math.isfinite(time_window_s) and time_window_s > 0):
            raise ConfigError(f"time_window_s: must be a positive number of seconds, got {time_window_s!r}")
        if not (math.isfinite(dedupe_window_s) and dedupe_window_s >= 0):
            raise ConfigError(f"dedupe_window_s: must be >= 0 seconds, got {dedupe_window_s!r}")
        if not floor < score_threshold <= 1.0:
            raise ConfigError(
                f"score_threshold: must be in ({floor:g}, 1] so that time alone never correlates, "
                f"got {score_threshold!r}"
            )
        if not 0.0 <= same_satellite_bonus <= 1.0:
            raise ConfigError(f"same_satellite_bonus: must be in [0, 1], got {same_satellite_bonus!r}")
        self.time_window_s = float(time_window_s)
        self.dedupe_window_s = float(dedupe_window_s)
        self.score_threshold = float(score_threshold)
        self.same_satellite_bonus = float(same_satellite_bonus)
        self._graph = dependency_graph or DEFAULT_DEPENDENCY_GRAPH
        self._clock: Clock = clock or SystemClock()
        # Time-ordered by default: cluster ids are PostgreSQL index keys (see `aetherops.ids`).
        self._new_id: Callable[[], str] = id_factory or (lambda: sortable_id(self._clock.now()))
        self._remember_ids = remember_alert_ids
        self._bucket_width = self.time_window_s / _SWEEP_BUCKETS

        n = len(self._graph.names)
        matrix = self._graph.strength_matrix()
        # Weighted strength rows as dicts keyed like cluster subsystems (unknown names never match).
        self._dep_rows: list[dict[_Key, float]] = [
            {j: DEPENDENCY_WEIGHT * matrix[i][j] for j in range(n) if matrix[i][j] > 0.0} for i in range(n)
        ]
        self._no_deps: dict[_Key, float] = {}  # the row of an unknown subsystem (never written)
        # Across satellites the bonus is missing, so only a strong enough dependency can reach the
        # threshold (time and severity together give at most `floor`).
        min_dep = (self.score_threshold - floor) / DEPENDENCY_WEIGHT - 1e-9
        self._related: list[tuple[int, ...]] = [tuple(j for j in range(n) if matrix[i][j] >= min_dep) for i in range(n)]
        self._down_masks = self._graph.downstream_masks()
        self.reset()

    # ---- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets every cluster (the service rebuilds from PostgreSQL after this)."""
        self._clusters: dict[str, IncidentCluster] = {}
        # Ids of the alerts (duplicates included) of the clusters in memory. A set, not a map to the
        # cluster: nearly every lookup misses, and a set answers a miss from one cache line where a
        # dict reads its index and then its entries (about 10% of an ingest at 100,000 clusters, measured
        # in 500,000-alert runs before expired clusters were freed as they go; see `_drop`).
        # The rare replay finds its cluster by a search (`_replay`). Stays empty unless
        # `remember_alert_ids`.
        self._seen: set[str] = set()
        # Satellite -> the slot of its most recently updated cluster; the others follow through
        # `_Slot.older`, newest first (a closed cluster's slot stays until the sweep drops the
        # cluster; the scan skips it). A chain, not a list: nearly every satellite has one
        # cluster, and a list cost two more cache misses per ingest (its object and its items) with
        # tens of thousands of satellites in memory.
        self._sats: dict[str, _Slot] = {}
        self._subs: dict[int, dict[IncidentCluster, None]] = {}  # known subsystem -> clusters, same order
        self._buckets: dict[int, list[IncidentCluster]] = {}
        self._bucket_heap: list[int] = []
        # Bucket -> its clusters a budgeted sweep already found active (see `_sweep`).
        self._kept: dict[int, list[IncidentCluster]] = {}
        self._next_sweep = -math.inf
        self._keys: dict[str, _Key] = {}
        self._opened = self._duplicates = self._expired = 0

    @property
    def dependency_graph(self) -> DependencyGraph:
        return self._graph

    @property
    def stats(self) -> EngineStats:
        """Counters since construction or the last `reset` (for metrics and benchmarks)."""
        return EngineStats(
            clusters_in_memory=len(self._clusters),
            opened=self._opened,
            duplicates=self._duplicates,
            expired=self._expired,
        )

    def _key_of(self, subsystem: str) -> _Key:
        key = self._keys.get(subsystem)
        if key is None:
            idx = self._graph.index(subsystem)
            key = normalize_name(subsystem) if idx is None else idx
            if len(self._keys) >= _KEY_CACHE_LIMIT:
                self._keys.clear()  # unknown names are unbounded; a cache miss only costs a normalise
            self._keys[subsystem] = key
        return key

    # ---- scoring ---------------------------------------------------------------------------

    def score_components(self, a: Alert, b: Alert) -> ScoreComponents:
        """The weighted score parts of two alerts (module docstring has the formula)."""
        dt = abs(a.epoch - b.epoch)
        w = self.time_window_s
        time = TIME_WEIGHT * (1.0 - dt / w) if dt < w else 0.0
        sat = self.same_satellite_bonus if a.satellite_id == b.satellite_id else 0.0
        ka, kb = self._key_of(a.subsystem), self._key_of(b.subsystem)
        dep = self._dep_rows[ka].get(kb, 0.0) if isinstance(ka, int) else 0.0
        sev = SEVERITY_WEIGHT * (a.severity + b.severity) / 10.0
        total = min(1.0, max(0.0, time + sat + dep + sev)) if dt < w else 0.0
        return ScoreComponents(time=time, satellite=sat, dependency=dep, severity=sev, total=total)

    def correlation_score(self, a: Alert, b: Alert) -> float:
        """Pairwise correlation score in [0, 1]; >= `score_threshold` means "same incident"."""
        return self.score_components(a, b).total

    # ---- ingestion -------------------------------------------------------------------------

    def ingest(self, alert: Alert) -> str:
        """Correlates one alert and returns the id of the cluster it belongs to (or duplicates into)."""
        return self._ingest(alert)[0]

    def ingest_detailed(self, alert: Alert) -> IngestResult:
        """Like `ingest`, saying also whether it opened a cluster, was a duplicate, moved the root cause."""
        cid, opened, dup_of, root_changed, replay, grew, escalated_from = self._ingest(alert)
        return IngestResult(cid, dup_of is not None, opened, root_changed, dup_of, replay, grew, escalated_from)

    def _ingest(self, alert: Alert) -> _Outcome:
        # The hot path: locals instead of attribute lookups, a tuple instead of a record, and the
        # cluster's candidates read from its slot arrays.
        aid = alert.alert_id
        if aid in self._seen:
            return self._replay(alert)
        t = alert.epoch
        if t != t:  # NaN: no usable timestamp
            raise ValidationError.single("alert.timestamp", "required")
        now_dt = self._clock.now()
        now = now_dt.timestamp()
        if now >= self._next_sweep:
            self._sweep(now, _SWEEP_BUDGET)
        w = self.time_window_s
        horizon = now - w  # an alert older than this came late (see `IncidentCluster._late_touch`)
        raw = alert.subsystem
        key = self._keys.get(raw)
        if key is None:
            key = self._key_of(raw)
        kidx = key if isinstance(key, int) else -1
        dep_row = self._dep_rows[kidx] if kidx >= 0 else self._no_deps
        sat = alert.satellite_id
        inv_w = 1.0 / w
        sev_w = SEVERITY_WEIGHT / 10.0
        best: IncidentCluster | None = None
        best_slot: _Slot | None = None
        best_score = self.score_threshold - 1e-12

        head = self._sats.get(sat)
        if head is not None:
            dedupe = self.dedupe_window_s
            base = TIME_WEIGHT + self.same_satellite_bonus + sev_w * alert.severity
            n = 0
            older: _Slot | None = head
            while older is not None and n < MAX_CANDIDATE_CLUSTERS:
                slot = older
                older = slot.older
                n += 1
                c = slot.cluster
                # Not "last alert within the window of the clock": a late alert (a batch downlinked
                # after a pass) belongs with its contemporaries. Each candidate's own time decides.
                if not c._joinable:
                    continue
                it = iter(slot.data)
                for kb, tb, sb in zip(slot.keys, it, it, strict=False):
                    dt = t - tb
                    if kb == key:
                        # Same satellite and subsystem: deduplicate before anything else. A higher
                        # severity is news (an escalation), never a duplicate.
                        if -dedupe <= dt <= dedupe and alert.severity <= sb:
                            return self._duplicate(alert, c, slot.latest[slot.keys.index(key)])
                        if dt < 0:  # late: maybe within the dedupe window of an earlier alert
                            orig = self._late_duplicate_of(c, alert, key)
                            if orig is not None:
                                return self._duplicate(alert, c, orig.alert_id)
                    if dt < 0:
                        dt = -dt
                    if dt >= w:
                        continue
                    s = base - TIME_WEIGHT * dt * inv_w + sev_w * sb + dep_row.get(kb, 0.0)
                    if s > best_score:
                        best_score, best, best_slot = s, c, slot
        if kidx >= 0:
            bonus = self.same_satellite_bonus
            base = TIME_WEIGHT + sev_w * alert.severity
            for j in self._related[kidx]:
                idx = self._subs.get(j)
                if not idx:
                    continue
                dep = dep_row[j]
                n = 0
                for c in reversed(idx):
                    if n >= MAX_CANDIDATE_CLUSTERS:
                        break
                    n += 1
                    if not c._joinable:
                        continue
                    b = c._sub_last[j]
                    dt = t - b.epoch
                    if dt < 0:  # late alert: the subsystem's first alert may be closer
                        first = c._sub_first[j]
                        if first.epoch > t or t - first.epoch < -dt:
                            b = first
                        dt = abs(t - b.epoch)
                    if dt >= w:
                        continue
                    s = base - TIME_WEIGHT * dt * inv_w + sev_w * b.severity + dep
                    if b.satellite_id == sat:
                        s += bonus
                    if s > best_score:
                        best_score, best, best_slot = s, c, None

        if best is None:
            late_touch = now if t < horizon else -math.inf
            return self._open(alert, key, now_dt, head, late_touch), True, None, False, False, True, 0
        if t < horizon:
            best._late_touch = now
        if best_slot is None:
            best_slot = best._slots.get(sat)
        # A satellite or a subsystem new to the cluster (the slot and the first-alert map say so).
        # The slot's keys are in cache (just scored); the cluster's map is one more miss at scale.
        grew = best_slot is None or (key not in best_slot.keys and key not in best._sub_first)
        before = best._max_sev  # in cache: just scored
        changed = self._add(best, best_slot, alert, key, head)
        return best.cluster_id, False, None, changed, False, grew, before if alert.severity > before else 0

    def _replay(self, alert: Alert) -> _Outcome:
        """The first outcome of a known alert id: its cluster and what it duplicated.

        Searched, not looked up (see `_seen`): first the clusters on the alert's own satellite, where a
        resent alert is, then every cluster in memory (an id reused for another satellite). The
        service never gets here for committed alerts (PostgreSQL answers those first), nor for an id
        repeated within one batch (it answers the repeat itself).
        """
        aid = alert.alert_id
        near = [slot.cluster for slot in self._chain(alert.satellite_id)]
        for c in itertools.chain(near, self._clusters.values()):
            for dup, orig in c._dups or ():
                if dup == aid:
                    return c.cluster_id, False, orig, False, True, False, 0
            for a in c.alerts:
                if a.alert_id == aid:
                    return c.cluster_id, False, None, False, True, False, 0
        raise AssertionError(f"alert id {aid!r} is remembered but in no cluster")  # pragma: no cover

    def _chain(self, sat: str) -> Iterator[_Slot]:
        """The slots on satellite `sat`, most recently updated first."""
        slot = self._sats.get(sat)
        while slot is not None:
            yield slot
            slot = slot.older

    def _unlink(self, sat: str, head: _Slot, slot: _Slot) -> None:
        """Takes `slot` out of the chain of satellite `sat` (whose head is `head`), if it is in it."""
        if head is slot:
            if slot.older is None:
                del self._sats[sat]
            else:
                self._sats[sat] = slot.older
            return
        prev = head
        while prev.older is not None:
            if prev.older is slot:
                prev.older = slot.older
                return
            prev = prev.older

    def _duplicate(self, alert: Alert, cluster: IncidentCluster, orig: str) -> _Outcome:
        """Counts `alert` as a duplicate of alert `orig`, the cluster's alert of the same satellite and
        subsystem."""
        self._duplicates += 1
        cluster.duplicate_count += 1
        # Only an engine that answers replays itself needs to know which duplicate was which. The
        # service's engine (`remember_alert_ids=False`) kept a pair per duplicate for as long as the
        # incident stayed in memory, nobody reading it: 145 bytes each, so an alert storm repeating
        # 20,000 alerts a second into incidents that stay active grew the server by 10 GB an hour.
        if self._remember_ids:
            dups = cluster._dups
            if dups is None:
                dups = cluster._dups = []
            dups.append((alert.alert_id, orig))
            self._seen.add(alert.alert_id)
        return cluster.cluster_id, False, orig, False, False, False, 0

    def _late_duplicate_of(self, cluster: IncidentCluster, alert: Alert, key: _Key) -> Alert | None:
        """An alert of the same satellite and subsystem in `cluster` within the dedupe window of a late
        alert (the slot only remembers the latest one)."""
        t, d, sat, sev = alert.epoch, self.dedupe_window_s, alert.satellite_id, alert.severity
        alerts = cluster.alerts
        lo = bisect.bisect_left(alerts, t - d, key=_epoch_of)
        hi = bisect.bisect_right(alerts, t + d, key=_epoch_of)
        best: Alert | None = None
        for a in alerts[lo:hi]:
            if a.satellite_id == sat and a.severity >= sev and self._key_of(a.subsystem) == key:
                if best is None or abs(a.epoch - t) < abs(best.epoch - t):
                    best = a
        return best

    def _open(self, alert: Alert, key: _Key, now: datetime, head: _Slot | None, late_touch: float) -> str:
        cid = self._new_id()
        if cid in self._clusters:
            raise AlreadyExistsError(f"id_factory returned cluster id {cid!r} twice")
        c = IncidentCluster(
            cluster_id=cid,
            alerts=[],
            root_cause=None,
            status=ClusterStatus.OPEN,
            opened_time=now,
        )
        self._clusters[cid] = c
        self._opened += 1
        c._joinable = True
        c._late_touch = late_touch
        self._add(c, None, alert, key, head)
        self._register_bucket(c)
        return cid

    def _add(self, c: IncidentCluster, slot: _Slot | None, alert: Alert, key: _Key, head: _Slot | None = None) -> bool:
        """Puts a (non-duplicate) alert into a cluster and the indexes; True if the root cause changed.

        `slot` and `head` are the cluster's slot for the alert's satellite and the head of that
        satellite's chain in `_sats`, when the caller already has them (each lookup is a cache miss
        at scale; `head` None means "look it up")."""
        t = alert.epoch
        sev = alert.severity
        sat = alert.satellite_id
        if slot is None:
            slot = c._slots.get(sat)
            if slot is None:
                slot = c._slots[sat] = _Slot(c)
                if c._joinable:
                    slot.older = self._sats.get(sat) if head is None else head
                    self._sats[sat] = head = slot
        in_order = t >= c._last_epoch
        keys, data = slot.keys, slot.data
        # The cluster's subsystems and their first alerts only change if the key is new to this
        # satellite's slot or the alert is not the newest: skip that dict work otherwise.
        rerank = _RANK_NONE
        if key in keys:
            j = keys.index(key)
            i = 2 * j
            if t >= data[i]:
                data[i] = t
                data[i + 1] = sev
                slot.latest[j] = alert.alert_id
            if not in_order:
                rerank = self._note_subsystem(c, alert, key)
        else:
            slot.keys = (*keys, key)
            data.append(t)
            data.append(sev)
            slot.latest.append(alert.alert_id)
            rerank = self._note_subsystem(c, alert, key)
        if isinstance(key, int):
            last = c._sub_last.get(key)
            if last is None or t >= last.epoch:
                c._sub_last[key] = alert
        if in_order:
            c.alerts.append(alert)
            c._last_epoch = t
        else:
            bisect.insort_right(c.alerts, alert, key=_epoch_of)
        if t < c._first_epoch:
            c._first_epoch = t
            rerank = _RANK_FULL  # the root's "earliest alert" part of the confidence may change
        if sev > c._max_sev:
            c._max_sev = sev
        if self._remember_ids:
            self._seen.add(alert.alert_id)
        if c._joinable:
            if head is None:
                head = self._sats[sat]
            if head is not slot:  # most recently updated first: candidates are scanned newest first
                prev = head
                while (after := prev.older) is not slot:
                    assert after is not None, "a joinable cluster's slot is in its satellite's chain"
                    prev = after
                prev.older = slot.older
                slot.older = head
                self._sats[sat] = slot
            if isinstance(key, int):
                idx = self._subs.get(key)
                if idx is None:
                    idx = self._subs[key] = {}
                idx.pop(c, None)
                idx[c] = None
        if rerank == _RANK_NONE:
            return False
        if rerank == _RANK_UNKNOWN:
            return self._rank_unknown(c, alert)
        return self._update_root(c)

    def _note_subsystem(self, c: IncidentCluster, alert: Alert, key: _Key) -> int:
        """Records a subsystem's first alert in the cluster; says how much root-cause ranking it needs."""
        first = c._sub_first.get(key)
        if first is None:
            c._sub_first[key] = alert
            if isinstance(key, str):
                c._names += (key,)
                return _RANK_UNKNOWN
            c._names += (self._graph.names[key],)
            c._mask |= 1 << key
            return _RANK_FULL
        if alert.epoch < first.epoch:
            c._sub_first[key] = alert
            return _RANK_FULL
        return _RANK_NONE

    def _register_bucket(self, c: IncidentCluster) -> None:
        """Files the cluster under the expiry bucket of its last alert, or of its last late alert's
        arrival when that is later (see `_sweep`)."""
        bucket = int(_kept_until(c) // self._bucket_width)
        lst = self._buckets.get(bucket)
        if lst is None:
            lst = self._buckets[bucket] = []
            heapq.heappush(self._bucket_heap, bucket)
        lst.append(c)

    def _update_root(self, c: IncidentCluster) -> bool:
        """Re-ranks all of the cluster's subsystems; True if the root-cause alert changed."""
        masks, mask = self._down_masks, c._mask
        best: Alert | None = None
        best_rank: tuple[int, float, int, str] | None = None
        for key, first in c._sub_first.items():
            explained = (masks[key] & mask).bit_count() if isinstance(key, int) else 0
            rank = (-explained, first.epoch, -first.severity, first.alert_id)
            if best_rank is None or rank < best_rank:
                best, best_rank = first, rank
        assert best is not None and best_rank is not None
        return self._set_root(c, best, best_rank)

    def _rank_unknown(self, c: IncidentCluster, first: Alert) -> bool:
        """A new unknown subsystem explains nothing and changes no other subsystem's count, so it only
        competes with the current root (and adds one to the confidence's "others")."""
        rank = (0, first.epoch, -first.severity, first.alert_id)
        if c._root_rank is None or rank < c._root_rank:
            return self._set_root(c, first, rank)
        root = c._root_alert
        assert root is not None
        return self._set_root(c, root, c._root_rank)

    def _set_root(self, c: IncidentCluster, best: Alert, rank: tuple[int, float, int, str]) -> bool:
        others = len(c._sub_first) - 1
        if others == 0:
            confidence = 0.5
        else:
            earliest = 0.2 if best.epoch <= c._first_epoch else 0.0
            confidence = 0.25 + 0.55 * -rank[0] / others + earliest
        c.root_cause_confidence = round(min(1.0, confidence), 4)
        c._root_rank = rank
        c._root_alert = best
        changed = c.root_cause != best.alert_id
        c.root_cause = best.alert_id
        return changed

    # ---- queries and commands ----------------------------------------------------------------

    def get_cluster(self, cluster_id: str) -> IncidentCluster | None:
        """The in-memory cluster (open, or closed and not yet expired), else None."""
        return self._clusters.get(cluster_id)

    def require_cluster(self, cluster_id: str) -> IncidentCluster:
        """Like `get_cluster`, but NotFoundError instead of None."""
        c = self._clusters.get(cluster_id)
        if c is None:
            raise NotFoundError(f"cluster {cluster_id!r} not found")
        return c

    def get_active_clusters(self) -> list[IncidentCluster]:
        """Open clusters whose last alert is within the time window of the clock, oldest first."""
        horizon = self._clock.now().timestamp() - self.time_window_s
        active = [c for c in self._clusters.values() if c._joinable and c._last_epoch >= horizon]
        active.sort(key=lambda c: (c._first_epoch, c.cluster_id))
        return active

    def active_count(self) -> int:
        """How many clusters `get_active_clusters` would return (counted, not listed: for metrics)."""
        horizon = self._clock.now().timestamp() - self.time_window_s
        return sum(1 for c in self._clusters.values() if c._joinable and c._last_epoch >= horizon)

    def close_cluster(self, cluster_id: str) -> bool:
        """Closes an open cluster; False if it is unknown or already closed. No alert joins it again."""
        c = self._clusters.get(cluster_id)
        if c is None or c.status is ClusterStatus.CLOSED:
            return False
        c.status = ClusterStatus.CLOSED
        c.closed_time = self._clock.now()
        c._joinable = False  # the indexes skip it from now on; the sweep frees the memory
        return True

    def acknowledge_cluster(
        self, cluster_id: str, acknowledgement: Acknowledgement, *, take_over: bool = False
    ) -> bool:
        """Records that someone works on an open cluster; False if it is unknown, closed or acknowledged
        already (unless `take_over`: a shift handover replaces the acknowledgement). Alerts keep joining
        it: an acknowledgement changes who is paged, not the correlation."""
        c = self._clusters.get(cluster_id)
        if c is None or c.status is ClusterStatus.CLOSED or (c.acknowledgement is not None and not take_over):
            return False
        c.acknowledgement = acknowledgement
        return True

    def merged(self, into: IncidentCluster, sources: Sequence[IncidentCluster]) -> IncidentCluster:
        """What `into` becomes when an operator says the `sources` are the same incident: a new cluster,
        unknown to this engine until `replace_merged`, and nothing given is changed.

        It keeps `into`'s id, opening and status, and holds every alert of them all: none is
        deduplicated again (each incident kept it), the duplicates dropped into each add up, and the
        root cause is ranked anew over all of them, as a restart would rank it. Its acknowledgement is
        `into`'s or, when nobody acknowledged `into`, the earliest of the sources': someone already
        works on the fault, and the merged incident must not look unattended (and page again)."""
        every = (into, *sources)
        acks = [c.acknowledgement for c in sources if c.acknowledgement is not None]
        late = [c.late_arrival_time for c in every]
        dups = [pair for c in every for pair in c._dups or ()]
        combined = IncidentCluster.restore(
            cluster_id=into.cluster_id,
            alerts=[a for c in every for a in c.alerts],
            opened_time=into.opened_time,
            duplicate_count=sum(c.duplicate_count for c in every),
            status=into.status,
            closed_time=into.closed_time,
            late_arrival_time=max((t for t in late if t is not None), default=None),
            acknowledgement=into.acknowledgement or min(acks, key=lambda ack: ack.time, default=None),
        )
        # Ranked by an engine of this one's settings that holds nothing else: the same answer
        # `restore_cluster` gives, without touching this engine's indexes before the change is stored.
        scratch = CorrelationEngine(
            self.time_window_s,
            self.dedupe_window_s,
            self._graph,
            self.score_threshold,
            self.same_satellite_bonus,
            clock=self._clock,
            remember_alert_ids=False,
        )
        scratch.restore_cluster(combined)
        combined._dups = dups or None
        return combined

    def replace_merged(self, merged: IncidentCluster, source_ids: Iterable[str]) -> None:
        """Puts a cluster from `merged` in place of its former self and forgets the sources merged into
        it: later alerts join it as they would have joined any of them."""
        for cid in (merged.cluster_id, *source_ids):
            c = self._clusters.get(cid)
            if c is not None:
                self._forget(c)
        dups = merged._dups
        self.restore_cluster(merged)
        merged._dups = dups
        if self._remember_ids and dups:
            self._seen.update(dup for dup, _ in dups)

    def identify_root_cause(self, cluster_id: str) -> str | None:
        """The root-cause alert id of a cluster in memory (None if unknown)."""
        c = self._clusters.get(cluster_id)
        return None if c is None else c.root_cause

    def root_cause_confidence(self, cluster_id: str) -> float:
        """Confidence in [0, 1] of `identify_root_cause` (0 if unknown)."""
        c = self._clusters.get(cluster_id)
        return 0.0 if c is None else c.root_cause_confidence

    def deduplicate_alerts(self, alerts: Iterable[Alert]) -> list[Alert]:
        """The alerts without duplicates, in timestamp order.

        A duplicate repeats an alert id, or has the satellite and subsystem of the last *kept*
        alert within `dedupe_window_s` of it and no higher severity (the same rule `ingest` applies).
        """
        kept: list[Alert] = []
        last: dict[tuple[str, _Key], Alert] = {}
        ids: set[str] = set()
        for a in sorted(alerts, key=_epoch_of):
            if a.alert_id in ids:
                continue
            ids.add(a.alert_id)
            k = (a.satellite_id, self._key_of(a.subsystem))
            prev = last.get(k)
            if prev is not None and a.epoch - prev.epoch <= self.dedupe_window_s and a.severity <= prev.severity:
                continue
            last[k] = a
            kept.append(a)
        return kept

    # ---- restart and memory ------------------------------------------------------------------

    def restore_cluster(self, cluster: IncidentCluster) -> None:
        """Re-inserts a persisted cluster (see `IncidentCluster.restore`) so new alerts join it as before.

        The root cause is recomputed from the alerts (same algorithm, same answer, but it follows a
        changed dependency graph). Closed clusters are kept for `get_cluster` but never joined.
        """
        if cluster.cluster_id in self._clusters:
            raise AlreadyExistsError(f"cluster {cluster.cluster_id!r} is already in the engine")
        if not cluster.alerts:
            raise ValidationError.single("cluster.alerts", f"cluster {cluster.cluster_id!r} has no alerts")
        for a in cluster.alerts:
            if a.alert_id in self._seen:
                raise AlreadyExistsError(f"alert {a.alert_id!r} of cluster {cluster.cluster_id!r} is already known")
        alerts = sorted(cluster.alerts, key=_epoch_of)
        c = cluster
        late = c._late_touch  # as restored: `_add` below does not set it
        c.alerts = []
        c._first_epoch, c._last_epoch, c._max_sev, c._mask = math.inf, -math.inf, 0, 0
        c._sub_first, c._sub_last, c._slots, c._names, c._dups, c._sorted_sats = {}, {}, {}, (), None, ()
        c._root_rank = c._root_alert = None
        c._late_touch = late
        c._joinable = c.status is ClusterStatus.OPEN
        self._clusters[c.cluster_id] = c
        for a in alerts:
            self._add(c, None, a, self._key_of(a.subsystem))
        self._register_bucket(c)  # closed ones too: the sweep frees them
        self._update_root(c)

    def expire(self, now: datetime | None = None) -> list[str]:
        """Drops clusters whose last alert is older than the window (and that took no late alert within
        it) from memory; returns their ids.

        They are not closed (the database keeps them OPEN until someone closes them); they only stop
        being joinable. `ingest` runs this itself as time passes, so memory stays bounded.
        """
        when = (now or self._clock.now()).timestamp()
        return self._sweep(when)

    def _sweep(self, now: float, budget: float = math.inf) -> list[str]:
        """Drops the clusters whose last alert is older than the window, bucket by bucket, examining
        at most `budget` clusters; the rest wait for the next sweep (the next ingest).

        A cluster is filed once, under the bucket its last alert was in at the time; a sweep that finds
        it there still active files it again, under its latest alert's bucket. So a long incident is
        visited about once per window, not once per bucket its alerts cross: filing it again as its
        alerts came left a stale filing per bucket, and every visit is a cache miss when tens of
        thousands of clusters are in memory (about a tenth of an ingest at 10,000 clusters). Those
        still in the bucket the horizon cuts are set aside, so a sweep that ran out of budget does not
        examine them again.
        """
        horizon = now - self.time_window_s
        width = self._bucket_width
        limit = math.floor(horizon / width)
        heap, buckets = self._bucket_heap, self._buckets
        dropped: list[str] = []
        examined = 0
        while heap and heap[0] <= limit:
            b = heap[0]
            filed = buckets[b]
            keep = self._kept.pop(b, [])
            # Each cluster in memory is filed in exactly one bucket (or set aside in `_kept`), so
            # each is met once here.
            while filed:
                if examined >= budget:
                    if keep:
                        self._kept[b] = keep
                    return dropped  # `_next_sweep` is still due: the next ingest goes on
                examined += 1
                c = filed.pop()
                alive = _kept_until(c)
                if alive < horizon:
                    if self._drop(c):
                        dropped.append(c.cluster_id)
                elif int(alive // width) == b:  # b is the bucket the horizon cuts: still in memory
                    keep.append(c)
                else:
                    self._register_bucket(c)  # a later bucket (pushed on the heap if it is new)
            if keep:
                buckets[b] = keep
                break
            heapq.heappop(heap)
            del buckets[b]
        self._next_sweep = now + self._bucket_width
        return dropped

    def _drop(self, c: IncidentCluster) -> bool:
        """Frees an expired cluster; False if it was forgotten already (merged into another, whose id
        may be its own: see `replace_merged`), which the sweep meets where it was filed."""
        if self._clusters.get(c.cluster_id) is not c:
            return False
        self._expired += 1
        self._forget(c)
        return True

    def _forget(self, c: IncidentCluster) -> None:
        """Takes a cluster out of memory and every index (its filing in a sweep bucket stays: see `_drop`)."""
        c._joinable = False
        del self._clusters[c.cluster_id]
        if self._remember_ids:
            discard = self._seen.discard
            for a in c.alerts:
                discard(a.alert_id)
            for aid, _ in c._dups or ():
                discard(aid)
        for sat, slot in c._slots.items():
            head = self._sats.get(sat)
            if head is not None:
                self._unlink(sat, head, slot)
            slot.older = None
        for key in c._sub_last:
            idx = self._subs.get(key)
            if idx is not None:
                idx.pop(c, None)
                if not idx:
                    del self._subs[key]
        # A slot points back at its cluster: without this the dropped cluster is a reference cycle,
        # freed only by a full collection (which then had hundreds of thousands of such objects to
        # find). `satellites` reads the alerts once the slots are gone.
        c._slots = {}
