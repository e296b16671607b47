"""The capacity application service: the planner, PostgreSQL, the outbox and telemetry reduction.

Every snapshot — IngestSnapshot, IngestSnapshots, or NATS telemetry after reduction — takes one
path: `check` (the core's `validate_snapshot` plus unit consistency with the stored series) →
the group committer, which writes a whole batch with one binary COPY in one transaction →
the planner learns the new points only after that commit, so memory never runs ahead of
PostgreSQL. A failed commit leaves the planner untouched.

After every committed batch (and every mission change) the forecasts of the touched series are
recomputed and diffed against the stored risk levels. Each change is written — risk row, an
``aetherops.capacity.risk_changed`` event and, on entering CRITICAL, an alert for the Correlation
service on ``aetherops.alerts.ingest`` — in one transaction of its own. If that transaction
fails the series stay marked dirty and are retried with the next batch; a periodic fleet sweep
(which also catches changes caused by time passing, with no new data) and the reconciliation at
start-up close any remaining gap, e.g. a crash between the two transactions.

Telemetry reduction: high-rate telemetry is reduced per (satellite, resource) by a
`StreamingAggregator` with 60 s buckets, and each closed bucket is stored as ONE snapshot: the
bucket's *last* value at its *last* timestamp. The last rather than the mean because a level
(fuel left, storage used) is a state, not a rate: the last reading is a real observation at a real
time, so the stored history keeps exact values and times, and a redelivered point maps to the same
(satellite, resource, timestamp) key and is deduplicated by the primary key. (The mean at the mean
time would be as good for the linear fit but is a synthetic point that changes whenever the set of
points in the bucket does.) A bucket closes when a point of a later bucket arrives, or when its
series has been idle for ``telemetry_idle_flush_s``; `stop` flushes every open bucket, so a graceful
restart loses nothing. A crash loses at most the open (not yet stored) bucket of each series: the
raw points were already acknowledged on NATS.

The planner is not thread-safe; everything here runs on the event loop and no call into it spans
an ``await``, which serialises its use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from aetherops.bus import OutboxRelay, Subjects
from aetherops.capacity import (
    CRITICAL_DAYS,
    CapacityPlanner,
    ExhaustionForecast,
    ForecastResult,
    MissionScheduleEntry,
    RateResult,
    ResourceSnapshot,
    ResourceType,
    RiskChange,
    RiskLevel,
    datetime_to_us,
    diff_risk_levels,
    validate_mission,
    validate_snapshot,
)
from aetherops.clock import Clock
from aetherops.db import Database, idempotency, outbox
from aetherops.db import capacity as repo
from aetherops.db.capacity import RiskRow, SeriesBlock
from aetherops.errors import FieldViolation, NotFoundError, UnavailableError, ValidationError
from aetherops.paging import cut_page, filters_key, page_limit, position_text, read_page_token
from aetherops.services.batching import GroupCommitter
from aetherops.tasks import cancel_and_wait, periodically
from aetherops.telemetry import StreamingAggregator
from aetherops.text import id_problem
from aetherops.tracking import current_tracking_id

__all__ = [
    "ALERT_SUBSYSTEMS",
    "AlertEncoder",
    "CapacityAlert",
    "CapacityService",
    "RiskEventEncoder",
    "SnapshotOutcome",
    "capacity_alert",
]

log = logging.getLogger("aetherops.capacity")

Key = tuple[str, ResourceType]

#: The Correlation service's subsystem for an alert about each resource.
ALERT_SUBSYSTEMS: dict[ResourceType, str] = {
    ResourceType.FUEL: "propulsion",
    ResourceType.POWER: "power",
    ResourceType.STORAGE: "obc",  # on-board computer: data handling
    ResourceType.BANDWIDTH: "comms",
}

_SCOPE_SNAPSHOT = "capacity.ingest_snapshot"
_SCOPE_MISSION = "capacity.add_mission"
_SCOPE_DELETE_MISSION = "capacity.delete_mission"


# Idempotency records are scoped by what the request acts on (as the runbook service scopes its
# own): the same request id sent for another snapshot or mission is another request, where a global
# scope answered it as a retry of the first and dropped it.
def _snapshot_scope(snapshot: ResourceSnapshot) -> str:
    when = snapshot.timestamp.isoformat()
    return f"{_SCOPE_SNAPSHOT}.{snapshot.satellite_id}.{int(snapshot.resource_type)}.{when}"


def _mission_scope(entry: MissionScheduleEntry) -> str:
    return f"{_SCOPE_MISSION}.{entry.mission_id}"


# Above this many touched series one vectorised fleet pass is cheaper than per-series solves.
_FLEET_THRESHOLD = 256


@dataclass(frozen=True)
class SnapshotOutcome:
    """What happened to one submitted snapshot: stored, duplicate, or rejected by the batch (a unit
    conflicting with another snapshot of a new series in the same batch, or another value than the one
    stored for its time)."""

    duplicate: bool = False
    violations: tuple[FieldViolation, ...] = ()

    @property
    def rejected(self) -> bool:
        return bool(self.violations)


@dataclass(frozen=True)
class CapacityAlert:
    """An alert for the Correlation service, encoded as aetherops.correlation.v1.Alert by the server."""

    alert_id: str
    satellite_id: str
    subsystem: str
    severity: int
    timestamp: datetime
    message: str
    labels: dict[str, str] = field(default_factory=dict)


RiskEventEncoder = Callable[[RiskChange, str, str, datetime, str], bytes]
"""(change, event_id, event type, occurred_time, tracking_id) -> encoded events.v1.Event envelope."""

AlertEncoder = Callable[[CapacityAlert], bytes]
"""alert -> encoded aetherops.correlation.v1.Alert."""


def capacity_alert(change: RiskChange, now: datetime) -> CapacityAlert:
    """The alert raised when a series enters CRITICAL. The id is deterministic per series and day,
    so a flapping series re-raising the same day is a replay for Correlation, not a new alert."""
    f = change.forecast
    resource = change.resource_type.name.lower()
    days = f.days_remaining
    when = f"in {days:.1f} days" if days is not None else "soon"
    interval = ""
    if f.days_remaining_p10 is not None:
        high = f"{f.days_remaining_p90:.1f}" if f.days_remaining_p90 is not None else "beyond the horizon"
        interval = f" (P10 {f.days_remaining_p10:.1f}, P90 {high} days)"
    message = (
        f"{resource} of {change.satellite_id} runs out {when}{interval}: "
        f"{f.current_value:g} {f.unit} left, using {f.rate_per_day:.4g} {f.unit}/day; "
        f"recommended: {f.recommended_action}"
    )
    labels = {"source": "capacity", "resource": resource, "risk_level": change.risk_level.name}
    if days is not None:
        labels["days_remaining"] = f"{days:.3f}"
    return CapacityAlert(
        alert_id=f"capacity:{change.satellite_id}:{resource}:{now:%Y-%m-%d}",
        satellite_id=change.satellite_id,
        subsystem=ALERT_SUBSYSTEMS[change.resource_type],
        severity=5,
        timestamp=now,
        message=message[:4096],
        labels=labels,
    )


@dataclass(frozen=True)
class _Item:
    snapshot: ResourceSnapshot
    request_id: str = ""


@dataclass
class _Stream:
    """Telemetry reduction state of one (satellite, resource)."""

    unit: str
    aggregator: StreamingAggregator
    last_seen: float  # time.monotonic() of the newest point
    open: bool = True  # an open bucket may hold points not stored yet


async def _as_prepared(items: list[_Item]) -> list[_Item]:
    """The committer's prepare stage: a snapshot batch is decided and written in one go."""
    return items


def _mission_json(entry: MissionScheduleEntry) -> dict[str, Any]:
    return {
        "mission_id": entry.mission_id,
        "satellite_id": entry.satellite_id,
        "start_time": entry.start_time.isoformat(),
        "end_time": entry.end_time.isoformat(),
        "resource_impacts": {str(int(r)): float(a) for r, a in entry.resource_impacts.items()},
        "description": entry.description,
    }


def _mission_from_json(data: dict[str, Any]) -> MissionScheduleEntry:
    return MissionScheduleEntry(
        mission_id=data["mission_id"],
        satellite_id=data["satellite_id"],
        start_time=datetime.fromisoformat(data["start_time"]),
        end_time=datetime.fromisoformat(data["end_time"]),
        resource_impacts={ResourceType(int(k)): float(v) for k, v in data["resource_impacts"].items()},
        description=data["description"],
    )


# Page-key stand-ins: an exhausted resource sorts first whatever the clock says, and a missing
# P10 (not within the horizon even pessimistically) last.
_KEY_FIRST = -(2**62)
_KEY_LAST = 2**62
_US_PER_DAY = 86_400_000_000


def _sort_key(f: ExhaustionForecast) -> tuple[int, int, str, int]:
    """The urgency order of `CapacityPlanner.get_critical_forecasts` (days, P10, key) as a page key
    that holds still while the clock runs: days_remaining shrinks between two page requests, so a
    key of days would put the next page's items before the last one's and skip them. Instead: the
    exhaustion time (µs; exhausted first), then how much earlier P10 runs out (µs; already out
    pessimistically first), then the series."""
    days, p10, date = f.days_remaining, f.days_remaining_p10, f.predicted_exhaustion_date
    if days is None or date is None:
        when = _KEY_LAST
    elif days <= 0.0:
        when = _KEY_FIRST
    else:
        when = datetime_to_us(date)
    if p10 is None or days is None:
        earlier = _KEY_LAST
    elif p10 <= 0.0:
        earlier = _KEY_FIRST
    else:
        earlier = round((p10 - days) * _US_PER_DAY)
    return when, earlier, f.satellite_id, int(f.resource_type)


class CapacityService:
    """Snapshots and missions in; forecasts, risk events and alerts out. Every answer is committed."""

    def __init__(
        self,
        db: Database,
        relay: OutboxRelay,
        subjects: Subjects,
        planner: CapacityPlanner,
        encode_event: RiskEventEncoder,
        encode_alert: AlertEncoder,
        clock: Clock,
        *,
        max_future_skew_s: float = 300.0,
        max_batch: int = 2000,
        telemetry_bucket_s: float = 60.0,
        telemetry_idle_flush_s: float = 2.0,
        telemetry_flush_interval_s: float = 0.25,
        sweep_interval_s: float = 300.0,
    ) -> None:
        self._db = db
        self._relay = relay
        self._subjects = subjects
        self._planner = planner
        self._encode_event = encode_event
        self._encode_alert = encode_alert
        self._clock = clock
        self._max_future_skew_s = max_future_skew_s
        self._committer: GroupCommitter[_Item, list[_Item], SnapshotOutcome] = GroupCommitter(
            _as_prepared, self._commit_batch, max_batch=max_batch, name="capacity-ingest"
        )
        # Unit of every stored series: the planner's, mirrored so validation needs no planner internals.
        self._units: dict[Key, str] = {}
        self._risk: dict[Key, RiskRow] = {}
        self._dirty: set[Key] = set()
        self._risk_lock = asyncio.Lock()
        self._bucket_s = telemetry_bucket_s
        self._idle_flush_s = telemetry_idle_flush_s
        self._flush_interval_s = telemetry_flush_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._streams: dict[Key, _Stream] = {}
        self._telemetry_pending: list[ResourceSnapshot] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.telemetry_points = 0
        self.telemetry_rejected = 0
        self.telemetry_stored = 0
        self.telemetry_dropped = 0  # buckets the database refused even alone
        self.risk_events = 0

    @property
    def planner(self) -> CapacityPlanner:
        return self._planner

    @property
    def queue_utilisation(self) -> float:
        return self._committer.utilisation

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._restore()
        self._committer.start()
        await self.reconcile()
        self._tasks.append(asyncio.create_task(self._telemetry_flusher(), name="capacity-telemetry-flush"))
        if self._sweep_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(
                    periodically(self._sweep_interval_s, self.reconcile, "capacity risk sweep"),
                    name="capacity-risk-sweep",
                )
            )

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        # Graceful stop stores every open telemetry bucket, so a restart loses nothing.
        try:
            await self.flush_telemetry(everything=True)
        except Exception:
            log.exception("capacity: storing the last telemetry buckets failed")
        await self._committer.stop()

    async def _restore(self) -> None:
        """Loads every snapshot, mission and stored risk level into a fresh planner."""
        started = time.perf_counter()
        async with self._db.connection() as conn:
            blocks = await repo.load_snapshots(conn)
            missions = await repo.load_missions(conn)
            risk = await repo.load_risk_levels(conn)
        points = 0
        for block in blocks:
            # History in PostgreSQL was validated on the way in; ingest_series re-checks it vectorised.
            try:
                report = self._planner.ingest_series(
                    block.satellite_id, block.resource_type, block.unit, block.times_us, block.values
                )
            except ValidationError as exc:
                # A series whose id or unit today's checks refuse (e.g. whitespace at an end, refused
                # since): kept in PostgreSQL, not forecast, and it must not stop the start.
                log.warning(
                    "capacity: stored series %r/%s fails today's checks and is not forecast from: %s",
                    block.satellite_id,
                    block.resource_type.name.lower(),
                    exc,
                )
                continue
            points += report.accepted
            if report.rejected:
                # Stored before today's checks (the value bound, the time floor): kept in PostgreSQL,
                # left out of the forecasts, and said once per series rather than dropped unseen.
                index, reason = report.rejected[0]
                log.warning(
                    "capacity: %d stored snapshot(s) of %s/%s fail today's checks and are not forecast from"
                    " (the first, #%d: %s)",
                    len(report.rejected),
                    block.satellite_id,
                    block.resource_type.name.lower(),
                    index,
                    reason,
                )
            self._units[(block.satellite_id, block.resource_type)] = block.unit
        for mission in missions:
            try:
                self._planner.add_scheduled_mission(mission)
            except ValidationError as exc:  # stored before today's checks: must not stop the start
                log.warning("capacity: stored mission %s is left out of the forecasts: %s", mission.mission_id, exc)
        self._risk = risk
        log.info(
            "capacity planner restored %d snapshots of %d series, %d missions, %d risk levels in %.2f s",
            points,
            len(blocks),
            len(missions),
            len(risk),
            time.perf_counter() - started,
        )

    # ---- validation and ingestion ---------------------------------------------------------------

    def check(self, snapshot: ResourceSnapshot) -> list[FieldViolation]:
        """Every problem with a snapshot: the core's rules and unit consistency with the stored series."""
        violations = validate_snapshot(snapshot, now=self._clock.now(), max_future_skew_s=self._max_future_skew_s)
        if isinstance(snapshot.resource_type, ResourceType) and isinstance(snapshot.unit, str):
            known = self._units.get((snapshot.satellite_id, snapshot.resource_type))
            unit = snapshot.unit.strip()
            if known is not None and unit and unit != known:
                violations.append(
                    FieldViolation(
                        "snapshot.unit",
                        f"unit {unit!r} differs from {known!r} already recorded for "
                        f"{snapshot.satellite_id}/{snapshot.resource_type.name}",
                    )
                )
        return violations

    async def ingest(self, snapshot: ResourceSnapshot, request_id: str = "") -> bool:
        """Stores one snapshot; returns True when it was a duplicate. A retried request_id answers as
        the first request did."""
        violations = self.check(snapshot)
        if violations:
            raise ValidationError(violations)
        if request_id:
            async with self._db.connection() as conn:
                earlier = await idempotency.recall(conn, _snapshot_scope(snapshot), request_id)
            if earlier is not None:
                return bool(earlier["duplicate"])
        outcome = await self._committer.submit(_Item(snapshot, request_id))
        if outcome.violations:
            raise ValidationError(outcome.violations)
        return outcome.duplicate

    async def ingest_many(self, snapshots: Sequence[ResourceSnapshot]) -> list[SnapshotOutcome]:
        """Already-checked snapshots, committed in one or more batches, outcomes in order."""
        return await self._committer.submit_many([_Item(s) for s in snapshots])

    async def _commit_batch(self, items: list[_Item]) -> list[SnapshotOutcome]:
        outcomes: list[SnapshotOutcome | None] = [None] * len(items)
        units = dict(self._units)
        grouped: dict[Key, tuple[list[int], list[float], list[int]]] = {}
        for i, item in enumerate(items):
            s = item.snapshot
            key = (s.satellite_id, ResourceType(s.resource_type))
            unit = s.unit.strip()
            # Two snapshots of a new series with different units can pass `check` concurrently: the
            # first in the batch wins, the other is rejected here.
            if units.setdefault(key, unit) != unit:
                outcomes[i] = SnapshotOutcome(
                    violations=(
                        FieldViolation(
                            "snapshot.unit",
                            f"unit {unit!r} differs from {units[key]!r} recorded for the series",
                        ),
                    )
                )
                continue
            times, values, members = grouped.setdefault(key, ([], [], []))
            times.append(datetime_to_us(s.timestamp))
            values.append(float(s.value))
            members.append(i)
        blocks = [
            SeriesBlock(sat, res, units[(sat, res)], np.asarray(t, np.int64), np.asarray(v, np.float64))
            for (sat, res), (t, v, _) in grouped.items()
        ]
        async with self._db.transaction() as conn:
            new_keys = await repo.insert_snapshots(conn, blocks)
            # A resend is a duplicate; another value for a stored time is not (it would be dropped
            # without a word). Looked up only when the batch had keys stored already.
            stored = await repo.conflicting_values(conn) if len(new_keys) < sum(map(len, blocks)) else {}
            seen: set[tuple[str, int, int]] = set()
            answered: dict[tuple[str, str], bool] = {}  # (scope, request id) -> duplicate, this batch
            for (sat, res), (times, values, members) in grouped.items():
                for t_us, value, i in zip(times, values, members, strict=True):
                    k = (sat, int(res), t_us)
                    fresh = k in new_keys and k not in seen
                    seen.add(k)
                    other = stored.get(k)
                    if not fresh and other is not None and other != value:
                        problem = f"{other:g} is stored for this satellite, resource and time; a resend repeats it"
                        outcomes[i] = SnapshotOutcome(violations=(FieldViolation("snapshot.value", problem),))
                        continue
                    duplicate = not fresh
                    request_id = items[i].request_id
                    if request_id:
                        scope = _snapshot_scope(items[i].snapshot)
                        if duplicate:
                            # A retry racing its first call (both passed the recall in `ingest`): it
                            # answers as that call did, in this batch or an earlier one, not "duplicate".
                            first = answered.get((scope, request_id))
                            if first is None:
                                earlier = await idempotency.recall(conn, scope, request_id)
                                first = None if earlier is None else bool(earlier["duplicate"])
                            duplicate = duplicate if first is None else first
                        answered.setdefault((scope, request_id), duplicate)
                    outcomes[i] = SnapshotOutcome(duplicate=duplicate)
            for i, item in enumerate(items):
                result = outcomes[i]
                if item.request_id and result is not None and not result.violations:
                    await idempotency.remember(
                        conn, _snapshot_scope(item.snapshot), item.request_id, {"duplicate": result.duplicate}
                    )
        # Committed: now, and only now, the planner learns the new points.
        touched: set[Key] = set()
        for block in blocks:
            key = (block.satellite_id, block.resource_type)
            keep = np.fromiter(
                ((block.satellite_id, int(block.resource_type), int(t)) in new_keys for t in block.times_us.tolist()),
                bool,
                len(block),
            )
            if not keep.any():
                continue
            self._planner.ingest_series(
                block.satellite_id, block.resource_type, block.unit, block.times_us[keep], block.values[keep]
            )
            self._units[key] = block.unit
            touched.add(key)
        if touched:
            await self._update_risk_safely(touched)
        return [o if o is not None else SnapshotOutcome(duplicate=True) for o in outcomes]

    # ---- missions -------------------------------------------------------------------------------

    async def add_mission(self, entry: MissionScheduleEntry, request_id: str = "") -> MissionScheduleEntry:
        """Adds or replaces (same mission_id) a mission; idempotent on request_id."""
        violations = validate_mission(entry)
        if violations:
            raise ValidationError(violations)
        async with self._db.transaction() as conn:
            await idempotency.lock(conn, _mission_scope(entry), request_id)
            earlier = await idempotency.recall(conn, _mission_scope(entry), request_id)
            if earlier is not None:
                return _mission_from_json(earlier)
            previous = await repo.upsert_mission(conn, entry)
            await idempotency.remember(conn, _mission_scope(entry), request_id, _mission_json(entry))
        self._planner.add_scheduled_mission(entry)
        sats = {entry.satellite_id} | ({previous.satellite_id} if previous is not None else set())
        await self._update_risk_safely({(sat, r) for sat in sats for r in ResourceType})
        return entry

    async def delete_mission(self, mission_id: str, request_id: str = "") -> MissionScheduleEntry:
        """Removes a mission (NotFoundError if unknown); returns it as it was. Idempotent on request_id."""
        problem = id_problem(mission_id)
        if problem is not None:
            raise ValidationError.single("mission_id", problem)
        scope = f"{_SCOPE_DELETE_MISSION}.{mission_id}"
        async with self._db.transaction() as conn:
            await idempotency.lock(conn, scope, request_id)
            earlier = await idempotency.recall(conn, scope, request_id)
            if earlier is not None:
                return _mission_from_json(earlier)
            deleted = await repo.delete_mission(conn, mission_id)
            if deleted is None:
                raise NotFoundError(f"mission {mission_id!r} not found")
            await idempotency.remember(conn, scope, request_id, _mission_json(deleted))
        self._planner.remove_scheduled_mission(mission_id)
        await self._update_risk_safely({(deleted.satellite_id, r) for r in ResourceType})
        return deleted

    # ---- risk levels, events and alerts ---------------------------------------------------------

    def _forecasts_for(self, keys: Iterable[Key]) -> list[ExhaustionForecast]:
        wanted = set(keys)
        if len(wanted) > _FLEET_THRESHOLD:
            return [f for f in self._planner.forecast_fleet() if (f.satellite_id, f.resource_type) in wanted]
        found = []
        for sat, res in sorted(wanted):
            forecast = self._planner.forecast_exhaustion(sat, res)
            if forecast is not None:
                found.append(forecast)
        return found

    async def _update_risk_safely(self, keys: set[Key]) -> None:
        """`_update_risk`, but a failure only marks the series dirty: the snapshots or mission that
        triggered it are committed already and the caller must hear so."""
        try:
            await self._update_risk(keys)
        except Exception:
            self._dirty |= keys
            log.exception("capacity: recording risk changes failed; %d series retried later", len(keys))

    async def _update_risk(self, keys: set[Key]) -> None:
        async with self._risk_lock:
            keys = keys | self._dirty
            self._dirty = set()
            try:
                forecasts = self._forecasts_for(keys)
                previous = {k: row.risk_level for k, row in self._risk.items()}
                await self._record(diff_risk_levels(previous, forecasts))
            except BaseException:
                self._dirty |= keys
                raise

    async def reconcile(self) -> int:
        """Diffs the whole fleet against the stored risk levels and records every change; returns how
        many there were. Runs at start and periodically (time passing moves forecasts too)."""
        async with self._risk_lock:
            previous = {k: row.risk_level for k, row in self._risk.items()}
            changes, _ = self._planner.risk_changes(previous)
            await self._record(changes)
            self._dirty = set()
            return len(changes)

    async def _record(self, changes: Sequence[RiskChange]) -> None:
        """Risk rows, risk_changed events and (entering CRITICAL) alerts of changes, in one transaction."""
        if not changes:
            return
        now = self._clock.now()
        tracking_id = current_tracking_id()
        rows: list[RiskRow] = []
        events: list[outbox.OutboxEvent] = []
        subject = self._subjects.capacity("risk_changed")
        event_type = self._subjects.event_type(subject)
        for change in changes:
            rows.append(
                RiskRow(
                    change.satellite_id,
                    change.resource_type,
                    change.risk_level,
                    change.forecast.days_remaining,
                    now,
                )
            )
            draft = outbox.OutboxEvent(
                subject=subject,
                aggregate_id=f"{change.satellite_id}/{change.resource_type.name.lower()}",
                payload=b"",
                tracking_id=tracking_id,
            )
            events.append(
                outbox.OutboxEvent(
                    subject=draft.subject,
                    aggregate_id=draft.aggregate_id,
                    payload=self._encode_event(change, draft.event_id, event_type, now, tracking_id),
                    tracking_id=tracking_id,
                    event_id=draft.event_id,
                )
            )
            if change.entered_critical:
                alert = capacity_alert(change, now)
                events.append(
                    outbox.OutboxEvent(
                        subject=self._subjects.alerts_ingest,
                        aggregate_id=alert.alert_id,
                        payload=self._encode_alert(alert),
                        tracking_id=tracking_id,
                    )
                )
        async with self._db.transaction() as conn:
            await repo.upsert_risk_levels(conn, rows)
            await outbox.append(conn, events)
        for row in rows:
            self._risk[(row.satellite_id, row.resource_type)] = row
        self.risk_events += len(rows)
        self._relay.wake()

    def risk_counts(self) -> dict[RiskLevel, int]:
        """Satellites per risk level, each at its worst stored resource level (metrics)."""
        worst: dict[str, RiskLevel] = {}
        for (satellite_id, _resource), row in self._risk.items():
            worst[satellite_id] = max(worst.get(satellite_id, RiskLevel.NOMINAL), row.risk_level)
        counts = dict.fromkeys(RiskLevel, 0)
        for level in worst.values():
            counts[level] += 1
        return counts

    def stored_risk_level(self, satellite_id: str, resource_type: ResourceType) -> RiskLevel:
        """The risk level last recorded for a series (NOMINAL when none was)."""
        row = self._risk.get((satellite_id, resource_type))
        return row.risk_level if row is not None else RiskLevel.NOMINAL

    # ---- queries --------------------------------------------------------------------------------

    def _require_satellite(self, satellite_id: str) -> None:
        # An id no satellite can have is named as such, and is not echoed in a NOT_FOUND message.
        if (problem := id_problem(satellite_id)) is not None:
            raise ValidationError.single("satellite_id", problem)
        if not self._planner.has_satellite(satellite_id):
            raise NotFoundError(f"unknown satellite {satellite_id!r}: no snapshots stored")

    def consumption_rate(self, satellite_id: str, resource_type: ResourceType) -> RateResult:
        self._require_satellite(satellite_id)
        return self._planner.compute_consumption_rate_detailed(satellite_id, resource_type)

    def forecast(self, satellite_id: str, resource_type: ResourceType) -> ForecastResult:
        self._require_satellite(satellite_id)
        return self._planner.forecast_exhaustion_detailed(satellite_id, resource_type)

    def fleet_summary(self) -> tuple[dict[RiskLevel, list[str]], list[str]]:
        """Satellites by risk level, and those without a forecast yet."""
        return self._planner.get_fleet_risk_summary(), self._planner.satellites_without_forecast()

    def interventions(self, satellite_id: str) -> list[dict[str, Any]]:
        self._require_satellite(satellite_id)
        return self._planner.recommend_interventions(satellite_id)

    async def list_snapshots(
        self,
        satellite_id: str,
        resource_type: ResourceType,
        *,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[ResourceSnapshot], str]:
        """One page of a stored series, oldest first, within [start, end). Read from PostgreSQL, so every
        replica answers the same; the token is the last timestamp (µs), bound to the series and range."""
        problems: list[FieldViolation] = []
        if (problem := id_problem(satellite_id)) is not None:
            problems.append(FieldViolation("satellite_id", problem))
        if start is not None and end is not None and end <= start:
            problems.append(FieldViolation("end_time", "must be after start_time"))
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        bounds = [datetime_to_us(t) if t is not None else None for t in (start, end)]
        filters = filters_key(satellite_id, int(resource_type), *bounds)
        after = read_page_token(page_token, filters, lambda p: _from_us(p["t"]), problems)
        if problems:
            raise ValidationError(problems)
        self._require_satellite(satellite_id)
        limit = page_limit(page_size, 1000, 10_000)
        async with self._db.connection() as conn:
            page = await repo.list_snapshots(
                conn, satellite_id, resource_type, start=start, end=end, after=after, limit=limit + 1
            )
        return cut_page(page, limit, lambda s: {"t": datetime_to_us(s.timestamp)}, filters)

    async def list_missions(
        self,
        satellite_id: str,
        resource_type: ResourceType | None,
        *,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[MissionScheduleEntry], str]:
        """One page of a satellite's scheduled missions, earliest start first, from PostgreSQL. The
        token is the last (start time, id), bound to the filters it was issued for."""
        problems: list[FieldViolation] = []
        if (problem := id_problem(satellite_id)) is not None:
            problems.append(FieldViolation("satellite_id", problem))
        if start is not None and end is not None and end <= start:
            problems.append(FieldViolation("end_time", "must be after start_time"))
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        bounds = [datetime_to_us(t) if t is not None else None for t in (start, end)]
        resource = int(resource_type) if resource_type is not None else 0
        filters = filters_key(satellite_id, resource, *bounds)
        after = read_page_token(page_token, filters, lambda p: (_from_us(p["t"]), position_text(p["m"])), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size, 100, 1000)
        async with self._db.connection() as conn:
            page = await repo.list_missions(
                conn, satellite_id, resource_type=resource_type, start=start, end=end, after=after, limit=limit + 1
            )
        return cut_page(page, limit, lambda m: {"t": datetime_to_us(m.start_time), "m": m.mission_id}, filters)

    def critical_forecasts(
        self, *, horizon_days: float | None, page_size: int, page_token: str
    ) -> tuple[list[ExhaustionForecast], str]:
        """One page of the forecasts running out within the horizon (default 14 days), most urgent
        first. The token is the sort key of the page's last item, so pages stay consistent while
        forecasts move (nothing is skipped or repeated because an earlier item left)."""
        problems: list[FieldViolation] = []
        horizon = CRITICAL_DAYS if horizon_days is None else horizon_days
        if not (math.isfinite(horizon) and horizon > 0.0):
            problems.append(FieldViolation("horizon", "must be positive"))
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        filters = filters_key(horizon)
        after = read_page_token(page_token, filters, _after_forecast, problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        # Sorted by the page key itself (it differs from the planner's order only below a µs).
        found = sorted(self._planner.get_critical_forecasts(horizon), key=_sort_key)
        if after is not None:
            found = [f for f in found if _sort_key(f) > after]
        return cut_page(found, limit, lambda f: dict(zip("wesr", _sort_key(f), strict=True)), filters)

    # ---- telemetry ------------------------------------------------------------------------------

    def add_telemetry(
        self, satellite_id: str, resource_type: ResourceType, timestamp: datetime, value: float, unit: str
    ) -> None:
        """One raw telemetry point into its series' aggregator (raises ValidationError when invalid).
        Closed buckets queue for storage; the flusher stores them."""
        snapshot = ResourceSnapshot(satellite_id, resource_type, timestamp, value, unit)
        violations = self.check(snapshot)
        key = (satellite_id, resource_type)
        stream = self._streams.get(key)
        unit = unit.strip()
        if stream is not None and not violations and unit != stream.unit:
            violations.append(FieldViolation("snapshot.unit", f"unit {unit!r} differs from {stream.unit!r}"))
        if violations:
            self.telemetry_rejected += 1
            raise ValidationError(violations)
        if stream is None:
            stream = _Stream(unit, StreamingAggregator(bucket_width_s=self._bucket_s), time.monotonic())
            self._streams[key] = stream
        late = stream.aggregator.late_count
        stream.aggregator.add(timestamp, value)
        stream.last_seen = time.monotonic()
        self.telemetry_points += 1
        if stream.aggregator.late_count == late:
            stream.open = True
        self._collect(key, stream, stream.aggregator.completed_buckets())

    def _collect(self, key: Key, stream: _Stream, buckets: Sequence[Any]) -> None:
        for bucket in buckets:
            when = datetime.fromtimestamp(bucket.last_timestamp, UTC)
            self._telemetry_pending.append(ResourceSnapshot(key[0], key[1], when, bucket.last, stream.unit))

    async def flush_telemetry(self, *, everything: bool = False) -> int:
        """Closes idle (or, with `everything`, all) open buckets and stores every queued bucket;
        returns how many snapshots were stored. Queued snapshots stay queued when the commit fails."""
        now = time.monotonic()
        for key, stream in self._streams.items():
            if stream.open and (everything or now - stream.last_seen >= self._idle_flush_s):
                stream.open = False
                self._collect(key, stream, stream.aggregator.flush())
        if not self._telemetry_pending:
            return 0
        pending, self._telemetry_pending = self._telemetry_pending, []
        try:
            outcomes = await self.ingest_many(pending)
        except Exception as exc:
            if isinstance(exc, UnavailableError):
                self._telemetry_pending = pending + self._telemetry_pending
                raise
            # Not an outage: something in the batch was refused, and retrying the same batch would
            # fail forever and hold back all telemetry. Each gets one more try on its own instead.
            log.warning("capacity: a telemetry batch of %d failed (%s); storing them one by one", len(pending), exc)
            outcomes = await self._ingest_each(pending)
        except BaseException:
            self._telemetry_pending = pending + self._telemetry_pending
            raise
        for snapshot, outcome in zip(pending, outcomes, strict=True):
            if outcome.violations:
                log.warning(
                    "telemetry bucket of %s/%s rejected: %s",
                    snapshot.satellite_id,
                    snapshot.resource_type.name,
                    outcome.violations,
                )
        stored = sum(1 for o in outcomes if not o.duplicate and not o.violations)
        self.telemetry_stored += stored
        return stored

    async def _ingest_each(self, snapshots: list[ResourceSnapshot]) -> list[SnapshotOutcome]:
        """One commit per snapshot. One that fails alone is dropped (logged and counted); an outage
        puts everything not yet stored back in the queue."""
        outcomes: list[SnapshotOutcome] = []
        for i, snapshot in enumerate(snapshots):
            try:
                outcomes.extend(await self.ingest_many([snapshot]))
            except UnavailableError:
                self._telemetry_pending = snapshots[i:] + self._telemetry_pending
                raise
            except Exception as exc:
                self.telemetry_dropped += 1
                log.error(
                    "capacity: dropped the telemetry bucket of %s/%s at %s: %s",
                    snapshot.satellite_id,
                    snapshot.resource_type.name,
                    snapshot.timestamp.isoformat(),
                    exc,
                )
                refused = FieldViolation("snapshot", f"refused when stored: {exc}")
                outcomes.append(SnapshotOutcome(violations=(refused,)))
        return outcomes

    async def _telemetry_flusher(self) -> None:
        delay = self._flush_interval_s
        while True:
            await asyncio.sleep(delay)  # a periodic timer, not synchronisation
            try:
                await self.flush_telemetry()
                delay = self._flush_interval_s
            except Exception as exc:
                delay = min(delay * 2, 5.0)
                log.warning("capacity: storing telemetry failed (%s); retrying in %.1fs", exc, delay)


def _from_us(value: Any) -> datetime:
    """A page position's time (µs since the epoch); TypeError, ValueError or OverflowError if it is none
    (a forged "5", 1.5 or true included: `int()` took them, and the listing went on from there)."""
    return datetime.fromtimestamp(0, UTC) + timedelta(microseconds=_key_int(value))


def _after_forecast(position: dict[str, Any]) -> tuple[int, int, str, int]:
    """The `_sort_key` of the last forecast on a page. A token of the old days-based form lacks "w"
    (KeyError): refused as not ours rather than misread."""
    return _key_int(position["w"]), _key_int(position["e"]), position_text(position["s"]), _key_int(position["r"])


def _key_int(value: Any) -> int:
    """An integer part of a page position; TypeError for anything else (a forged 1.5 or "1")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a page position's number must be an integer, got {type(value).__name__}")
    return value
