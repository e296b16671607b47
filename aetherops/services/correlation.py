"""The correlation application service: the engine, PostgreSQL and the outbox, together.

Ingestion goes through a group committer: concurrent alerts are correlated in
memory in arrival order, then the alerts, the changed clusters and their
events are written in one transaction before any caller is answered. Under bulk
load the next batch is correlated while the previous one is written. If a write
fails, the engine is rebuilt from PostgreSQL before the next batch, so memory
never runs ahead of what is committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

from aetherops.bus import OutboxRelay, Subjects
from aetherops.clock import Clock
from aetherops.config import INGEST_QUEUE_BYTES
from aetherops.correlation import (
    Acknowledgement,
    Alert,
    ClusterStatus,
    CorrelationEngine,
    IncidentCluster,
    ScoreComponents,
    alert_size,
    severity_problem,
    validate_alert,
)
from aetherops.db import Database, idempotency, outbox
from aetherops.db import correlation as repo
from aetherops.db import silences as silence_repo
from aetherops.db.correlation import AlertRow, ClusterRecord, KnownAlert, StoredAlert
from aetherops.db.pool import Connection
from aetherops.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    NotFoundError,
    ValidationError,
)
from aetherops.paging import cut_page, filters_key, page_limit, position_text, read_page_token, time_and_id
from aetherops.services.batching import GroupCommitter
from aetherops.silences import Silence
from aetherops.tasks import cancel_and_wait, periodically
from aetherops.text import filter_problems, id_problem, text_problem, utf8_len
from aetherops.tracking import current_tracking_id

__all__ = ["INGEST_BATCH", "CorrelationService", "IncidentEvent", "IngestOutcome"]

log = logging.getLogger("aetherops.correlation")

LISTED_CLUSTER_BYTES = 2 * 1024 * 1024
"""Most bytes of satellite and subsystem names one page of clusters lists (their alerts have a budget
of their own, `servers.correlation.AlertBudget`): 500 storm incidents over hundreds of satellites
each would outgrow the 4 MiB message limit, on every call for that page."""


def _listed_bytes(record: ClusterRecord) -> int:
    """About what a cluster's names and fixed fields take in a listing."""
    return 256 + sum(utf8_len(name) + 3 for name in (*record.satellites, *record.subsystems))


def _active_position(record: ClusterRecord) -> dict[str, str]:
    return {"t": record.last_alert_time.isoformat(), "c": record.cluster_id}


_MAX_REASON_LEN = 4096
MAX_MERGED: Final = 100
"""Most clusters one MergeClusters call merges into another: each is read whole under the ingest
pause, and a merge of more is a sign the correlation settings need changing instead."""
"""Longest close reason in characters (an alert's message has the same limit)."""


class IngestOutcome(NamedTuple):
    """What ingesting one alert did, as its caller is answered (a named tuple: one per alert)."""

    cluster_id: str  # empty when a silence covered the alert
    duplicate: bool = False
    duplicate_of: str | None = None
    opened: bool = False
    replay: bool = False
    conflict: str | None = None
    """Set when the alert id was already taken by a different alert: what that alert is. Nothing was
    stored; `cluster_id` is the other alert's."""
    silence_id: str | None = None
    """Set when a silence covered the alert: stored, in no cluster."""


Silencer = Callable[[str, str, Mapping[str, str], datetime], Silence | None]
"""(satellite id, subsystem, labels, observed time) -> the silence covering such an alert, if any
(`aetherops.services.silences.SilenceService.match`)."""


def _conflict(alert: Alert, stored: Alert | KnownAlert) -> str | None:
    """What the alert stored under `alert`'s id is, when it is not the same alert (None when it is).

    A resend (a client retry, a NATS redelivery, a file loaded twice) is the same alert. The same id
    with another satellite, subsystem or severity is not: an id collision between senders, or an
    escalation sent under the old id; answering it as a resend dropped it without a word. Time,
    message and labels may differ in a resend (a sender that stamps each attempt) and are not compared.
    """
    if (stored.satellite_id, stored.subsystem, stored.severity) == (
        alert.satellite_id,
        alert.subsystem,
        alert.severity,
    ):
        return None
    when = stored.alert_time if isinstance(stored, KnownAlert) else stored.timestamp
    return (
        f"satellite {stored.satellite_id!r}, subsystem {stored.subsystem!r}, severity {stored.severity},"
        f" at {when.isoformat()}"
    )


@dataclass(frozen=True)
class IncidentEvent:
    """What the outbox carries for a cluster change; encoded by the server layer."""

    kind: str  # "opened" | "updated" | "acknowledged" | "closed"
    cluster: ClusterRecord
    root_cause: Alert | None
    added_alert_ids: list[str] = field(default_factory=list)
    root_cause_changed: bool = False
    reason: str = ""
    closed_by: str = ""
    tracking_id: str = ""
    """Of the request that caused the change: the opening alert's for "opened", the last added
    alert's for "updated", the call's for "acknowledged" and "closed" (sent in the envelope and the header)."""
    merged_cluster_ids: list[str] = field(default_factory=list)
    """For "updated": the clusters a merge moved into this one (their alerts are `added_alert_ids`)."""
    escalated_from: int = 0
    """For "updated": the incident's highest severity before the change, when the change raised it."""
    taken_over_from: str = ""
    """For "acknowledged": who held the acknowledgement it took over (empty: nobody)."""


def _acknowledged_key(acknowledged: bool | None) -> tuple[str, ...]:
    """The acknowledgement filter's part of a page token's filters: none when it is not set, so
    tokens issued before the filter existed still page on."""
    return () if acknowledged is None else (f"acknowledged={acknowledged}",)


def _late_arrival(rec: ClusterRecord, since: datetime) -> datetime | None:
    """When the last late alert reached a stored cluster: a cluster whose last alert is older than
    the window is in memory for a downlinked batch, and the alert that opened it arrived late too
    (at opened_time, which the column does not repeat)."""
    late = rec.late_arrival_time
    if rec.last_alert_time < since and (late is None or late < rec.opened_time):
        return rec.opened_time
    return late


def _cluster_of(rec: ClusterRecord, late_arrival_time: datetime | None) -> IncidentCluster:
    """An open stored cluster (with all its alerts) as the engine holds it."""
    return IncidentCluster.restore(
        cluster_id=rec.cluster_id,
        alerts=rec.alerts,
        root_cause=rec.root_cause_alert_id,
        opened_time=rec.opened_time,
        duplicate_count=rec.duplicate_count,
        late_arrival_time=late_arrival_time,
        acknowledgement=rec.acknowledgement,
    )


def _closed_problem(rec: ClusterRecord) -> str:
    if rec.merged_into:
        return f"cluster {rec.cluster_id!r} was merged into {rec.merged_into!r}"
    return f"cluster {rec.cluster_id!r} is closed"


def _answered(event: IncidentEvent) -> dict[str, Any]:
    """What an operator's change remembers for its retries (`_as_answered`): the cluster, and the
    acknowledgement an acknowledgement made."""
    out: dict[str, Any] = {"cluster_id": event.cluster.cluster_id}
    ack = event.cluster.acknowledgement
    if event.kind == "acknowledged" and ack is not None:
        out["acknowledgement"] = {"by": ack.by, "time": ack.time.isoformat(), "note": ack.note}
    return out


def _as_answered(record: ClusterRecord, remembered: Mapping[str, Any]) -> ClusterRecord:
    """The stored cluster as a retry of an operator's change answers it: as it is now, but with the
    acknowledgement the first call made: the incident may have changed hands since (take_over), and a
    retry of the day shift's acknowledgement answered with the night shift's. A close (or an
    acknowledgement whose record predates this) answers the cluster as it is."""
    ack = remembered.get("acknowledgement")
    if ack is None:
        return record
    made = Acknowledgement(ack["by"], datetime.fromisoformat(ack["time"]), ack["note"])
    return replace(record, acknowledgement=made)


EventEncoder = Callable[[IncidentEvent, str, datetime], bytes]
"""(event, event_id, occurred_time) -> encoded events.v1.Event envelope."""


def record_of(cluster: IncidentCluster, *, with_alerts: bool = True, opened_by: str | None = None) -> ClusterRecord:
    """The stored form of an engine cluster (without its alerts for writes: they are stored as rows);
    `opened_by` is the alert that opened it, for a cluster about to be inserted."""
    return ClusterRecord(
        cluster_id=cluster.cluster_id,
        status=cluster.status.name,
        root_cause_alert_id=cluster.root_cause,
        root_cause_confidence=cluster.root_cause_confidence,
        satellites=cluster.satellites,  # new lists each
        subsystems=cluster.subsystems,
        max_severity=cluster.max_severity,
        first_alert_time=cluster.first_alert_time,
        last_alert_time=cluster.last_alert_time,
        opened_time=cluster.opened_time,
        closed_time=cluster.closed_time,
        alert_count=len(cluster.alerts),
        duplicate_count=cluster.duplicate_count,
        tracking_id=cluster.alerts[0].tracking_id if cluster.alerts else "",
        late_arrival_time=cluster.late_arrival_time,
        opened_by_alert_id=opened_by,
        acknowledgement=cluster.acknowledgement,
        alerts=list(cluster.alerts) if with_alerts else [],
    )


@dataclass(frozen=True)
class _Batch:
    """A prepared batch: the outcomes to answer with once the rest is committed."""

    outcomes: list[IngestOutcome]
    rows: list[AlertRow]
    opened: set[str]  # clusters opened by the batch (inserted)
    grown: set[str]  # clusters whose satellites or subsystems changed
    records: list[ClusterRecord]
    events: list[outbox.OutboxEvent]


_EVENT_IDS_BYTES: Final = 256 * 1024
"""Most bytes of alert ids one "updated" event lists (see `_id_chunks`)."""


def _id_chunks(ids: list[str]) -> list[list[str]]:
    """The alert ids a batch added to an incident, split so each "updated" event stays well within
    NATS's max_payload (1 MB by default): a batch adds up to `INGEST_BATCH` alerts to a storm's
    incident, and ids of up to 256 characters of up to 4 bytes each made one event of several MB,
    which the relay could never publish. At least one chunk (a root-cause change adds no id)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for alert_id in ids:
        n = utf8_len(alert_id)
        if size + n > _EVENT_IDS_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(alert_id)
        size += n + 3  # the field's tag and length
    return chunks


INGEST_BATCH = 4000
"""Alerts per ingest transaction at most (see `CorrelationService`)."""


class CorrelationService:
    """Alerts in, incidents out; every answer is committed."""

    def __init__(
        self,
        db: Database,
        relay: OutboxRelay,
        subjects: Subjects,
        engine: CorrelationEngine,
        encode: EventEncoder,
        clock: Clock,
        *,
        max_future_skew_s: float = 300.0,
        max_batch: int = INGEST_BATCH,
        max_queue: int = 100_000,
        max_queue_bytes: int = INGEST_QUEUE_BYTES,
        resolve_after_s: float = 0.0,
        silenced: Silencer | None = None,
    ) -> None:
        """`max_batch`: alerts per transaction at most. Under bulk load every batch costs a few fixed
        round trips and one update per incident it touched, so larger batches cost less per alert: an
        alert storm streamed through four IngestAlerts streams spent 33 us of write time per alert in
        batches of 4,000 against 43 us in batches of 2,000 (one storm incident row updated per 15
        alerts instead of per 11). Over the same 12 s stretch of the benchmark it committed 24,300
        against 17,100 alerts/s (one instrumented run each, pauses between runs included).
        `max_queue`: alerts waiting at most; twelve streams, each with its chunks in flight (see
        `servers.correlation`), fit. `max_queue_bytes`: their memory at most (see `alert_size`).
        100,000 alerts at the size limits would otherwise hold about 15 GB.
        `resolve_after_s`: open incidents without an alert for this long are closed by the system,
        checked at start and then periodically (0: never; see `resolve_quiet`).
        `silenced`: which silence covers an alert (None: no silences); a covered alert is stored and
        answered, but the engine never sees it."""
        self._db = db
        self._relay = relay
        self._subjects = subjects
        self._engine = engine
        self._encode = encode
        self._clock = clock
        self._max_future_skew_s = max_future_skew_s
        self._stale = False  # the engine may hold decisions that were never committed
        self._resolve_after_s = resolve_after_s
        self._silenced = silenced
        self._resolver: asyncio.Task[None] | None = None
        self._committer: GroupCommitter[Alert, _Batch, IngestOutcome] = GroupCommitter(
            self._prepare_batch,
            self._write_batch,
            max_batch=max_batch,
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
            size_of=alert_size,
            name="correlation-ingest",
        )

    @property
    def engine(self) -> CorrelationEngine:
        return self._engine

    @property
    def queue_utilisation(self) -> float:
        return self._committer.utilisation

    async def start(self) -> None:
        await self._restore()
        self._committer.start()
        if self._resolve_after_s > 0:
            # A tenth of the quiet time, at most a minute: incidents close at most that late.
            interval = min(60.0, self._resolve_after_s / 10)
            resolving = periodically(interval, self.resolve_quiet, "resolving quiet incidents", at_once=True)
            self._resolver = asyncio.create_task(resolving, name="correlation-resolver")

    async def stop(self) -> None:
        if self._resolver is not None:
            await cancel_and_wait(self._resolver)
        await self._committer.stop()

    async def resolve_quiet(self, limit: int = 100) -> int:
        """Closes open incidents whose last alert is older than `resolve_after_s`, and that have been open
        that long (a batch downlinked hours late is not closed as it arrives), as CloseCluster does
        (with their "closed" events, by "system"); returns how many. At most `limit` a round, so a
        backlog after downtime goes out over a few rounds instead of in one long pause of ingestion."""
        quiet_for = self._resolve_after_s
        before = self._clock.now() - timedelta(seconds=quiet_for)
        async with self._db.connection() as conn:
            ids = await repo.quiet_open_clusters(conn, before, limit)
        closed = 0
        for cluster_id in ids:
            try:
                await self.close(
                    cluster_id, reason=f"no alert for {quiet_for:g} s", closed_by="system", request_id="", alert_bytes=0
                )
            except FailedPreconditionError:
                continue  # closed by someone meanwhile
            closed += 1
        if closed:
            log.info("closed %d incident(s) quiet for %g s", closed, quiet_for)
        return closed

    async def _restore(self) -> None:
        """Rebuilds the engine's active clusters from PostgreSQL (start-up, or after a failed commit)."""
        since = self._clock.now() - timedelta(seconds=self._engine.time_window_s)
        async with self._db.connection() as conn:
            records = await repo.load_active(conn, since)
        self._engine.reset()
        self._stale = False
        for rec in records:
            self._engine.restore_cluster(_cluster_of(rec, _late_arrival(rec, since)))
        log.info("correlation engine restored %d active clusters", len(records))

    # ---- ingestion -------------------------------------------------------------------------

    def validate(self, alert: Alert) -> None:
        problems = validate_alert(alert, now=self._clock.now(), max_future_skew_s=self._max_future_skew_s)
        if problems:
            raise ValidationError(problems)

    async def ingest(self, alert: Alert) -> IngestOutcome:
        """Validated, correlated and committed; AlreadyExistsError when its id is another alert's."""
        self.validate(alert)
        outcome = await self._committer.submit(self._tracked(alert, current_tracking_id()))
        if outcome.conflict is not None:
            raise AlreadyExistsError(
                f"alert_id {alert.alert_id!r} is already taken by another alert ({outcome.conflict}); "
                "a resend must repeat the alert exactly"
            )
        return outcome

    async def ingest_many(self, alerts: Sequence[Alert]) -> list[IngestOutcome]:
        """Already-validated alerts, committed in one or more batches. An alert whose id is another
        alert's is not stored: its outcome says so (`IngestOutcome.conflict`)."""
        tracking = current_tracking_id()
        return await self._committer.submit_many([self._tracked(a, tracking) for a in alerts])

    @staticmethod
    def _tracked(alert: Alert, tracking_id: str) -> Alert:
        # The servicer builds alerts with the request's tracking id; only other paths need the copy.
        return alert if alert.tracking_id or not tracking_id else alert.with_tracking_id(tracking_id)

    async def _prepare_batch(self, alerts: list[Alert]) -> _Batch:
        """The engine's decisions for a batch (in memory only), after the replay lookup. Runs while the
        previous batch is being written (see `GroupCommitter`): its decisions build on that batch's."""
        try:
            if self._stale:
                # A batch did not commit (or the restore after it failed): memory may hold decisions
                # PostgreSQL does not. Start again from what is committed.
                await self._restore()
            async with self._db.connection() as conn:
                known = await repo.known_alerts(conn, [a.alert_id for a in alerts])
            return self._correlate(alerts, known)
        except BaseException:
            self._stale = True  # the engine may have taken part of the batch
            raise

    async def _write_batch(self, batch: _Batch) -> list[IngestOutcome]:
        """The clusters, the alerts and their events, all or nothing; the outcomes once committed."""
        try:
            if batch.rows:
                async with self._db.connection() as conn:
                    await repo.write_batch(conn, batch.records, batch.opened, batch.grown, batch.rows, batch.events)
        except BaseException:
            # Memory must not run ahead of what is committed: the next batch is prepared on a
            # restored engine (this batch's decisions, and any taken on top of them, are dropped).
            self._stale = True
            raise
        if batch.rows:
            self._relay.wake()
        return batch.outcomes

    def _correlate(self, alerts: list[Alert], known: dict[str, KnownAlert]) -> _Batch:
        """The engine's decisions for a batch, and what to write for them."""
        outcomes: list[IngestOutcome] = []
        rows: list[AlertRow] = []
        # cluster -> (the alert that opened it, if this batch did; added ids, root changed, membership
        # changed, tracking id of the last added)
        touched: dict[str, tuple[str | None, list[str], bool, bool, str, int]] = {}
        # The same alert id twice in one batch (a retry racing its original): the repeat gets the
        # first one's outcome here, so the engine's replay search (meant to be rare) is never needed.
        in_batch: dict[str, tuple[Alert, IngestOutcome]] = {}
        ingest = self._engine.ingest_detailed
        silenced = self._silenced
        for alert in alerts:
            aid = alert.alert_id
            stored = known.get(aid)
            if stored is not None:
                conflict = _conflict(alert, stored)
                dup_of, cid = stored.duplicate_of, stored.cluster_id or ""
                outcomes.append(
                    IngestOutcome(
                        cid, dup_of is not None, dup_of, stored.opened, replay=True, silence_id=stored.silence_id
                    )
                    if conflict is None
                    else IngestOutcome(cid, conflict=conflict)
                )
                continue
            earlier = in_batch.get(aid)
            if earlier is not None:
                first_alert, first = earlier
                conflict = _conflict(alert, first_alert)
                outcomes.append(
                    first._replace(replay=True)
                    if conflict is None
                    else IngestOutcome(first.cluster_id, conflict=conflict)
                )
                continue
            if silenced is not None:
                silence = silenced(alert.satellite_id, alert.subsystem, alert.labels, alert.timestamp)
                if silence is not None:
                    rows.append(AlertRow(alert, None, None, alert.tracking_id, silence.silence_id))
                    outcome = IngestOutcome("", silence_id=silence.silence_id)
                    in_batch[aid] = (alert, outcome)
                    outcomes.append(outcome)
                    continue
            result = ingest(alert)
            if result.replay:  # known to the engine but not to PostgreSQL: cannot happen after a restore
                outcomes.append(IngestOutcome(result.cluster_id, result.duplicate, result.duplicate_of, replay=True))
                continue
            cid = result.cluster_id
            rows.append(AlertRow(alert, cid, result.duplicate_of, alert.tracking_id))
            entry = touched.get(cid)
            if result.duplicate:
                # Most alerts of a storm: the cluster only counts one more duplicate.
                if entry is None:
                    touched[cid] = (None, [], False, False, "", 0)
                outcome = IngestOutcome(cid, True, result.duplicate_of)
            else:
                opener, added, root_changed, grew, _, escalated_from = entry or (None, [], False, False, "", 0)
                added.append(aid)
                touched[cid] = (
                    aid if result.opened else opener,
                    added,
                    root_changed or result.root_cause_changed,
                    grew or result.membership_changed,
                    # The committer runs under no request's tracking id: the alert carries its own.
                    alert.tracking_id,
                    escalated_from or result.escalated_from,  # the first: the severity before the batch
                )
                outcome = IngestOutcome(cid, False, None, result.opened)  # positional: one per alert
            in_batch[aid] = (alert, outcome)
            outcomes.append(outcome)
        now = self._clock.now()
        records: list[ClusterRecord] = []
        events: list[outbox.OutboxEvent] = []
        opened_ids: set[str] = set()
        grown_ids: set[str] = set()
        for cid, (opener, added, root_changed, grew, cause, escalated_from) in touched.items():
            cluster = self._engine.require_cluster(cid)
            record = record_of(cluster, with_alerts=False, opened_by=opener)
            records.append(record)
            root = cluster.root_cause_alert()
            if grew:
                grown_ids.add(cid)
            if opener is not None:
                opened_ids.add(cid)
                event = IncidentEvent("opened", record, root, added, True, tracking_id=record.tracking_id)
                events.append(self._event(event, now))
            elif added or root_changed:
                for i, ids in enumerate(_id_chunks(added)):
                    leading = i == 0  # what changed is said once, by the first event
                    event = IncidentEvent(
                        "updated",
                        record,
                        root,
                        ids,
                        root_changed and leading,
                        tracking_id=cause,
                        escalated_from=escalated_from if leading else 0,
                    )
                    events.append(self._event(event, now))
        return _Batch(outcomes, rows, opened_ids, grown_ids, records, events)

    def _event(self, event: IncidentEvent, now: datetime) -> outbox.OutboxEvent:
        event_id = outbox.new_event_id()
        return outbox.OutboxEvent(
            subject=self._subjects.incidents(event.kind),
            aggregate_id=event.cluster.cluster_id,
            payload=self._encode(event, str(event_id), now),
            tracking_id=event.tracking_id,
            event_id=event_id,
        )

    # ---- queries and commands ---------------------------------------------------------------

    async def get_cluster(self, cluster_id: str, *, alert_bytes: int | None = None) -> ClusterRecord:
        """The stored cluster with its oldest alerts, as many as `alert_bytes` holds (None: all; see
        `repo.get_alerts`)."""
        async with self._db.connection() as conn:
            record = await repo.get_cluster(conn, cluster_id, alert_bytes=alert_bytes)
        if record is None:
            raise NotFoundError(f"cluster {cluster_id!r} not found")
        return record

    async def list_active(
        self,
        *,
        page_size: int,
        page_token: str,
        satellite_id: str,
        min_severity: int,
        acknowledged: bool | None = None,
        alert_bytes: int | None = None,
    ) -> tuple[list[ClusterRecord], str]:
        """One page of active clusters, newest activity first; `acknowledged` True or False takes only
        the acknowledged ones or only the others."""
        problems: list[FieldViolation] = []
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        if not 0 <= min_severity <= 5:
            problems.append(FieldViolation("min_severity", "must be between 1 and 5 (0 = any)"))
        problems += filter_problems(satellite_id=satellite_id)
        filters = filters_key(satellite_id, min_severity, *_acknowledged_key(acknowledged))
        after = read_page_token(page_token, filters, time_and_id("c"), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        since = self._clock.now() - timedelta(seconds=self._engine.time_window_s)
        async with self._db.connection() as conn:
            page = await repo.list_active(
                conn,
                since=since,
                satellite_id=satellite_id,
                min_severity=min_severity,
                limit=limit + 1,
                after=after,
                acknowledged=acknowledged,
                alert_bytes=alert_bytes,
            )
        return cut_page(page, limit, _active_position, filters, size=_listed_bytes, budget=LISTED_CLUSTER_BYTES)

    async def list_clusters(
        self,
        *,
        page_size: int,
        page_token: str,
        status: ClusterStatus | None,
        satellite_id: str,
        min_severity: int,
        start: datetime | None,
        end: datetime | None,
        acknowledged: bool | None = None,
        alert_bytes: int | None = None,
    ) -> tuple[list[ClusterRecord], str]:
        """One page of stored clusters (open, closed or both), most recently opened first; `acknowledged`
        as for `list_active`."""
        problems: list[FieldViolation] = []
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        if not 0 <= min_severity <= 5:
            problems.append(FieldViolation("min_severity", "must be between 1 and 5 (0 = any)"))
        problems += filter_problems(satellite_id=satellite_id)
        if start is not None and end is not None and end <= start:
            problems.append(FieldViolation("end_time", "must be after start_time"))
        state = None if status is None else status.name
        bounds = (None if t is None else t.isoformat() for t in (start, end))
        filters = filters_key(state, satellite_id, min_severity, *bounds, *_acknowledged_key(acknowledged))
        after = read_page_token(page_token, filters, lambda p: position_text(p["c"]), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        async with self._db.connection() as conn:
            page = await repo.list_clusters(
                conn,
                status=state,
                satellite_id=satellite_id,
                min_severity=min_severity,
                start=start,
                end=end,
                limit=limit + 1,
                after=after,
                acknowledged=acknowledged,
                alert_bytes=alert_bytes,
            )
        return cut_page(
            page, limit, lambda c: {"c": c.cluster_id}, filters, size=_listed_bytes, budget=LISTED_CLUSTER_BYTES
        )

    @staticmethod
    def watch_filter_problems(satellite_ids: Sequence[str], min_severity: int) -> list[FieldViolation]:
        """What is wrong with a watch's filters (as ListActiveClusters would say), else nothing: a
        watch with a filter no cluster can match would wait for ever without a word."""
        problems: list[FieldViolation] = []
        if not 0 <= min_severity <= 5:
            problems.append(FieldViolation("min_severity", "must be between 1 and 5 (0 = any)"))
        for i, satellite_id in enumerate(satellite_ids):
            problem = id_problem(satellite_id)
            if problem is not None:
                problems.append(FieldViolation(f"satellite_ids[{i}]", problem))
        return problems

    async def list_alerts(
        self,
        *,
        page_size: int,
        page_token: str,
        tracking_id: str,
        cluster_id: str,
        satellite_id: str,
        silence_id: str = "",
    ) -> tuple[list[StoredAlert], str]:
        """One page of stored alerts (duplicates included), oldest alert time first. A tracking id, a
        cluster id or a silence id is required: an unfiltered listing of every alert ever ingested is
        not a query anyone should run through an RPC (and no index would serve it)."""
        problems: list[FieldViolation] = []
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        if not (tracking_id or cluster_id or silence_id):
            problems.append(FieldViolation("tracking_id", "set tracking_id, cluster_id or silence_id"))
        problems += filter_problems(
            tracking_id=tracking_id, cluster_id=cluster_id, satellite_id=satellite_id, silence_id=silence_id
        )
        # The silence joins the key only when set: tokens issued before it existed stay valid.
        filters = filters_key(tracking_id, cluster_id, satellite_id, *([silence_id] if silence_id else []))
        after = read_page_token(page_token, filters, time_and_id("a"), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        async with self._db.connection() as conn:
            page = await repo.list_alerts(
                conn,
                tracking_id=tracking_id,
                cluster_id=cluster_id,
                satellite_id=satellite_id,
                silence_id=silence_id,
                after=after,
                limit=limit + 1,
            )
            if not page and after is None:
                # An empty first page for a cluster or silence that does not exist is a mistyped id,
                # not "no alerts": say so (checked only then, so listings cost no extra query).
                if cluster_id and await repo.get_cluster(conn, cluster_id, alert_bytes=0) is None:
                    raise NotFoundError(f"cluster {cluster_id!r} not found")
                if silence_id and await silence_repo.get(conn, silence_id) is None:
                    raise NotFoundError(f"silence {silence_id!r} not found")
        return cut_page(page, limit, lambda a: {"t": a.alert.timestamp.isoformat(), "a": a.alert.alert_id}, filters)

    async def close(
        self, cluster_id: str, *, reason: str, closed_by: str, request_id: str, alert_bytes: int | None = None
    ) -> ClusterRecord:
        """Closes a cluster (idempotent on request_id); its events leave with the commit. The answer
        holds its oldest alerts, as many as `alert_bytes` holds (None: all).

        Ingestion pauses meanwhile (`GroupCommitter.exclusive`): a batch that already put an alert
        into this cluster commits first, so its alert and its "updated" event come before the close;
        the next batch is correlated by an engine that knows the cluster is closed, so nothing joins it.
        """
        problem = text_problem(reason, _MAX_REASON_LEN)
        if problem is not None:
            # Unbounded, it would make the "closed" event too large for NATS, and nobody would hear of it.
            raise ValidationError.single("reason", problem)

        def closing(record: ClusterRecord, now: datetime) -> IncidentEvent:
            if record.status == "CLOSED":
                # A merged one names the incident its alerts went to: closing that one is what was meant.
                raise FailedPreconditionError(
                    _closed_problem(record) if record.merged_into else f"cluster {cluster_id!r} is already closed"
                )
            closed = replace(record, status="CLOSED", closed_time=now, close_reason=reason, closed_by=closed_by)
            return IncidentEvent("closed", closed, None, reason=reason, closed_by=closed_by)

        closed = await self._change(cluster_id, "close", request_id, alert_bytes, closing)
        self._relay.wake()
        return closed

    async def acknowledge(
        self,
        cluster_id: str,
        *,
        note: str,
        by: str,
        request_id: str,
        alert_bytes: int | None = None,
        take_over: bool = False,
    ) -> ClusterRecord:
        """Records that `by` works on an open cluster (idempotent on request_id); its "acknowledged"
        event leaves with the commit. The answer holds its oldest alerts, as many as `alert_bytes` holds.
        `take_over`: an acknowledgement someone holds becomes `by`'s (a shift handover), and the event
        says whose it was (nobody's when it was `by`'s own: the note is renewed); without it, that is
        FAILED_PRECONDITION.

        Ingestion pauses meanwhile, as for `close`: every event of the incident committed after this
        one carries the acknowledgement, and none committed before it does."""
        problem = text_problem(note, _MAX_REASON_LEN)
        if problem is not None:
            raise ValidationError.single("note", problem)

        def acknowledging(record: ClusterRecord, now: datetime) -> IncidentEvent:
            if record.status == "CLOSED":
                # A merged one names the incident its alerts went to: that is the one to acknowledge.
                raise FailedPreconditionError(_closed_problem(record) + ": only open clusters are acknowledged")
            held = record.acknowledgement
            if held is not None and not take_over:
                raise FailedPreconditionError(
                    f"cluster {cluster_id!r} was acknowledged by {held.by!r} at {held.time.isoformat()}"
                    " (take_over hands it over)"
                )
            acknowledged = replace(record, acknowledgement=Acknowledgement(by, now, note))
            # One's own acknowledgement renewed (a new note) is taken from nobody: named, a pager
            # announced a handover from the caller to the caller.
            taken_from = held.by if held is not None and held.by != by else ""
            return IncidentEvent("acknowledged", acknowledged, None, taken_over_from=taken_from)

        acknowledged = await self._change(cluster_id, "acknowledge", request_id, alert_bytes, acknowledging)
        self._relay.wake()
        return acknowledged

    async def merge(
        self,
        cluster_id: str,
        source_ids: Sequence[str],
        *,
        note: str,
        by: str,
        request_id: str,
        alert_bytes: int | None = None,
    ) -> ClusterRecord:
        """Merges open clusters into the open `cluster_id` (idempotent on request_id): their alerts move
        to it, its root cause is ranked anew over all of them, and each source closes, pointing at it.
        Its "updated" event and the sources' "closed" events leave with the commit. The answer holds
        its oldest alerts, as many as `alert_bytes` holds (None: all).

        Ingestion pauses meanwhile, as for `close`: no batch holds an alert for a source when it closes,
        and the next batch is correlated by an engine holding the merged cluster in the sources' place."""
        problems = self._merge_problems(cluster_id, source_ids, note)
        if problems:
            raise ValidationError(problems)
        reason = f"merged into {cluster_id}" + (f": {note}" if note.strip() else "")
        async with self._committer.exclusive():
            now = self._clock.now()
            async with self._db.transaction() as conn:
                # Every row locked, in one order: two merges over the same clusters wait for each other
                # instead of deadlocking, and a retry racing its original sees the outcome.
                found = await conn.fetch(
                    "SELECT cluster_id FROM clusters WHERE cluster_id = ANY($1::text[]) ORDER BY cluster_id FOR UPDATE",
                    sorted({cluster_id, *source_ids}),
                )
                scope = f"correlation.merge.{cluster_id}"
                replayed = await idempotency.recall(conn, scope, request_id) is not None
                stored = {r["cluster_id"] for r in found}
                missing = next((i for i in (cluster_id, *source_ids) if i not in stored), None)
                if missing is not None:
                    raise NotFoundError(f"cluster {missing!r} not found")
                if not replayed:
                    merged = await self._merge_stored(conn, cluster_id, source_ids, reason, by, now)
                    await idempotency.remember(conn, scope, request_id, {"cluster_id": cluster_id})
                answer = await repo.get_cluster(conn, cluster_id, alert_bytes=alert_bytes)
                assert answer is not None
            if not replayed:
                # The engine learns only after the commit, so it never holds an uncommitted change.
                self._engine.replace_merged(merged, source_ids)
        self._relay.wake()
        return answer

    @staticmethod
    def _merge_problems(cluster_id: str, source_ids: Sequence[str], note: str) -> list[FieldViolation]:
        problems: list[FieldViolation] = []
        if not 1 <= len(source_ids) <= MAX_MERGED:
            problems.append(
                FieldViolation("source_cluster_ids", f"name 1 to {MAX_MERGED} clusters, got {len(source_ids)}")
            )
        for i, sid in enumerate(source_ids[:MAX_MERGED]):
            problem = id_problem(sid)
            if problem is None and sid == cluster_id:
                problem = "is cluster_id: a cluster is not merged into itself"
            elif problem is None and sid in source_ids[:i]:
                problem = f"{sid!r} is named twice"
            if problem is not None:
                problems.append(FieldViolation(f"source_cluster_ids[{i}]", problem))
        problem = text_problem(note, _MAX_REASON_LEN)
        if problem is not None:
            problems.append(FieldViolation("note", problem))
        return problems

    async def _merge_stored(
        self, conn: Connection, cluster_id: str, source_ids: Sequence[str], reason: str, by: str, now: datetime
    ) -> IncidentCluster:
        """Writes a merge of locked clusters with its events; returns the merged cluster for the engine."""
        records: list[ClusterRecord] = []
        for cid in (cluster_id, *source_ids):
            rec = await repo.get_cluster(conn, cid)
            assert rec is not None  # locked after the NOT_FOUND check: retention cannot delete it now
            if rec.status == "CLOSED":
                raise FailedPreconditionError(_closed_problem(rec) + ": only open clusters are merged")
            records.append(rec)
        into, *sources = records
        merged = self._engine.merged(
            _cluster_of(into, into.late_arrival_time), [_cluster_of(s, s.late_arrival_time) for s in sources]
        )
        # It stays the cluster it was: opened by the same alert, under the same tracking id.
        record = replace(
            record_of(merged, with_alerts=False),
            tracking_id=into.tracking_id,
            opened_by_alert_id=into.opened_by_alert_id,
        )
        tracking_id = current_tracking_id()
        moved = [a.alert_id for s in sources for a in s.alerts]
        root, root_changed = merged.root_cause_alert(), merged.root_cause != into.root_cause_alert_id
        escalated_from = into.max_severity if record.max_severity > into.max_severity else 0
        events = [
            IncidentEvent(
                "updated",
                record,
                root,
                ids,
                root_changed and i == 0,
                tracking_id=tracking_id,
                merged_cluster_ids=list(source_ids),
                escalated_from=escalated_from if i == 0 else 0,
            )
            for i, ids in enumerate(_id_chunks(moved))
        ]
        for s in sources:
            closed = replace(
                s, status="CLOSED", closed_time=now, close_reason=reason, closed_by=by, merged_into=cluster_id
            )
            source_root = await repo.root_alert(conn, s)
            events.append(
                IncidentEvent("closed", closed, source_root, reason=reason, closed_by=by, tracking_id=tracking_id)
            )
        await repo.merge_clusters(conn, record, source_ids, closed_time=now, reason=reason, closed_by=by)
        if into.acknowledgement is None and merged.acknowledgement is not None:  # a source's, taken over
            await repo.acknowledge_cluster(conn, cluster_id, merged.acknowledgement)
        await outbox.append(conn, [self._event(e, now) for e in events])
        return merged

    async def _change(
        self,
        cluster_id: str,
        verb: str,
        request_id: str,
        alert_bytes: int | None,
        change: Callable[[ClusterRecord, datetime], IncidentEvent],
    ) -> ClusterRecord:
        """Commits an operator's change to a stored cluster with its event, then tells the engine.

        `change` gets the cluster as stored (locked) and the time, and returns the event whose cluster
        is the changed one; that is stored, and answered. A retried `request_id` answers the cluster as
        it is, with the acknowledgement its first call made (`_as_answered`). Ingestion waits for this
        (see `close`): reading a storm incident's every alert here held it up for as long as that took,
        so only what the answer shows is read."""
        async with self._committer.exclusive():
            now = self._clock.now()
            async with self._db.transaction() as conn:
                # The row lock first: a concurrent change of this cluster (a retry racing its original,
                # or another operator) waits here and then sees the outcome, instead of making it twice.
                found = await conn.fetchval("SELECT true FROM clusters WHERE cluster_id = $1 FOR UPDATE", cluster_id)
                # Scoped by cluster: the same request id sent for another cluster is another request,
                # not a retry whose answer (this cluster) would be the wrong one.
                scope = f"correlation.{verb}.{cluster_id}"
                before = await idempotency.recall(conn, scope, request_id)
                if not found:
                    raise NotFoundError(f"cluster {cluster_id!r} not found")
                record = await repo.get_cluster(conn, cluster_id, alert_bytes=alert_bytes)
                assert record is not None
                if before is not None:
                    return _as_answered(record, before)
                event = change(record, now)
                changed = event.cluster
                if event.kind == "closed":
                    await repo.close_cluster(
                        conn, cluster_id, closed_time=now, reason=event.reason, closed_by=event.closed_by
                    )
                else:
                    assert event.kind == "acknowledged" and changed.acknowledgement is not None
                    await repo.acknowledge_cluster(conn, cluster_id, changed.acknowledgement)
                root = await repo.root_alert(conn, changed)
                event = replace(event, root_cause=root, tracking_id=current_tracking_id())
                await outbox.append(conn, [self._event(event, now)])
                await idempotency.remember(conn, scope, request_id, _answered(event))
            # The engine learns only after the commit, so it never holds an uncommitted change.
            if event.kind == "closed":
                self._engine.close_cluster(cluster_id)
            elif changed.acknowledgement is not None:
                # What was committed, a take-over included.
                self._engine.acknowledge_cluster(cluster_id, changed.acknowledgement, take_over=True)
        return changed

    async def root_cause(self, cluster_id: str) -> tuple[Alert | None, float]:
        async with self._db.connection() as conn:
            record = await repo.get_cluster(conn, cluster_id, alert_bytes=0)
            if record is None:
                raise NotFoundError(f"cluster {cluster_id!r} not found")
            return await repo.root_alert(conn, record), record.root_cause_confidence

    @staticmethod
    def score_problems(alert: Alert, field: str) -> list[FieldViolation]:
        """What makes an alert unfit for scoring (ids are not needed): what the score reads must be
        what ingestion accepts. A severity of 99 made a severity component of 1.04 and "would
        correlate" for alerts IngestAlert refuses."""
        problems: list[FieldViolation] = []
        severity = severity_problem(alert.severity)
        if severity is not None:
            problems.append(FieldViolation(f"{field}.severity", severity))
        if alert.timestamp is None:
            problems.append(FieldViolation(f"{field}.timestamp", "required"))
        return problems

    def score(self, first: Alert, second: Alert) -> tuple[ScoreComponents, bool]:
        components = self._engine.score_components(first, second)
        return components, components.total >= self._engine.score_threshold
