"""PostgreSQL repository for incident clusters and alerts."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

import asyncpg

from aetherops.correlation import Acknowledgement, Alert
from aetherops.db import outbox

__all__ = [
    "ALERT_BYTES_FLOOR",
    "STATEMENT_ROWS",
    "AlertRow",
    "ClusterRecord",
    "KnownAlert",
    "StoredAlert",
    "acknowledge_cluster",
    "close_cluster",
    "get_alerts",
    "get_cluster",
    "known_alerts",
    "list_active",
    "list_alerts",
    "list_clusters",
    "load_active",
    "quiet_open_clusters",
    "root_alert",
    "write_batch",
]


@dataclass(frozen=True)
class ClusterRecord:
    """A cluster as stored: what GetCluster, ListActiveClusters and the events show."""

    cluster_id: str
    status: str  # "OPEN" | "CLOSED"
    root_cause_alert_id: str | None
    root_cause_confidence: float
    satellites: list[str]
    subsystems: list[str]
    max_severity: int
    first_alert_time: datetime
    last_alert_time: datetime
    opened_time: datetime
    alert_count: int
    duplicate_count: int
    tracking_id: str = ""
    closed_time: datetime | None = None
    close_reason: str = ""
    closed_by: str = ""
    # Arrival of the last alert that joined already older than the correlation window (a downlinked
    # batch; `IncidentCluster.late_arrival_time`); None when none did since it was opened.
    late_arrival_time: datetime | None = None
    # The alert that opened it (None for clusters stored before migration 0012 recorded it).
    opened_by_alert_id: str | None = None
    acknowledgement: Acknowledgement | None = None
    # The cluster its alerts moved to, when it was closed by a merge (migration 0014).
    merged_into: str | None = None
    alerts: list[Alert] = field(default_factory=list)

    @property
    def multi_satellite(self) -> bool:
        return len(self.satellites) > 1

    @property
    def duration_seconds(self) -> float:
        return (self.last_alert_time - self.first_alert_time).total_seconds()


class AlertRow(NamedTuple):
    """One alert to store: the alert, its cluster, and what it duplicates (if it does); or, for an
    alert a silence covered, no cluster and the silence. A named tuple: one is made per alert."""

    alert: Alert
    cluster_id: str | None
    duplicate_of: str | None
    tracking_id: str
    silence_id: str | None = None


@dataclass(frozen=True)
class StoredAlert:
    """An alert as stored: the cluster it went to, what it duplicates (if it does), when it was stored."""

    alert: Alert
    cluster_id: str | None  # None when a silence covered it
    duplicate_of: str | None
    ingested_time: datetime
    silence_id: str | None = None


_CLUSTER_COLUMN_NAMES = [
    "cluster_id",
    "status",
    "root_cause_alert_id",
    "root_cause_confidence",
    "satellites",
    "subsystems",
    "max_severity",
    "first_alert_time",
    "last_alert_time",
    "opened_time",
    "closed_time",
    "close_reason",
    "closed_by",
    "alert_count",
    "duplicate_count",
    "tracking_id",
    "opened_by_alert_id",
]
# Written by updates only (`_UPDATE_CLUSTER`, `acknowledge_cluster`, `merge_clusters`); read with the rest.
_CLUSTER_COLUMNS = ", ".join(
    [
        *_CLUSTER_COLUMN_NAMES,
        "late_arrival_time",
        "acknowledge_time",
        "acknowledged_by",
        "acknowledge_note",
        "merged_into",
    ]
)


def _record(row: asyncpg.Record, alerts: list[Alert] | None = None) -> ClusterRecord:
    return ClusterRecord(
        cluster_id=row["cluster_id"],
        status=row["status"],
        root_cause_alert_id=row["root_cause_alert_id"],
        root_cause_confidence=row["root_cause_confidence"],
        satellites=list(row["satellites"]),
        subsystems=list(row["subsystems"]),
        max_severity=row["max_severity"],
        first_alert_time=row["first_alert_time"],
        last_alert_time=row["last_alert_time"],
        opened_time=row["opened_time"],
        closed_time=row["closed_time"],
        close_reason=row["close_reason"],
        closed_by=row["closed_by"],
        alert_count=row["alert_count"],
        duplicate_count=row["duplicate_count"],
        tracking_id=row["tracking_id"],
        late_arrival_time=row["late_arrival_time"],
        opened_by_alert_id=row["opened_by_alert_id"],
        acknowledgement=None
        if row["acknowledge_time"] is None
        else Acknowledgement(row["acknowledged_by"], row["acknowledge_time"], row["acknowledge_note"]),
        merged_into=row["merged_into"],
        alerts=alerts or [],
    )


def _alert(row: asyncpg.Record) -> Alert:
    return Alert(
        alert_id=row["alert_id"],
        satellite_id=row["satellite_id"],
        subsystem=row["subsystem"],
        severity=row["severity"],
        timestamp=row["alert_time"],
        message=row["message"],
        labels=dict(row["labels"]),
        tracking_id=row["tracking_id"],
    )


class KnownAlert(NamedTuple):
    """A stored alert, as much of it as a resend is answered and checked with."""

    cluster_id: str | None
    duplicate_of: str | None
    satellite_id: str
    subsystem: str
    severity: int
    alert_time: datetime
    silence_id: str | None
    opened: bool  # it opened its cluster (IngestAlert's cluster_opened)


async def quiet_open_clusters(conn: asyncpg.Connection, before: datetime, limit: int) -> list[str]:
    """Ids of open clusters whose last alert is older than `before` and that were opened before it,
    quietest first (at most `limit`). An incident of alerts downlinked hours late is old by its
    alerts from the start: it counts as quiet only once it has been open that long, and no late
    alert has joined it since."""
    rows = await conn.fetch(
        """SELECT cluster_id FROM clusters WHERE status = 'OPEN' AND last_alert_time < $1 AND opened_time < $1
             AND (late_arrival_time IS NULL OR late_arrival_time < $1)
           ORDER BY last_alert_time, cluster_id LIMIT $2""",
        before,
        limit,
    )
    return [r["cluster_id"] for r in rows]


async def known_alerts(conn: asyncpg.Connection, alert_ids: Sequence[str]) -> dict[str, KnownAlert]:
    """alert_id -> the stored alert, for the ids already stored."""
    # One primary-key probe per id, whatever the planner knows. `alert_id = ANY($1)` lets it pick a
    # sequential scan when the table has no statistics (a fresh or never-analysed table: it then
    # assumes each id matches 0.5% of the rows), and every batch then reads the whole table.
    rows = await conn.fetch(
        """SELECT k.alert_id, a.cluster_id, a.duplicate_of, a.satellite_id, a.subsystem, a.severity, a.alert_time,
                  a.silence_id, COALESCE(c.opened_by_alert_id = k.alert_id, false)
           FROM unnest($1::text[]) AS k(alert_id)
           CROSS JOIN LATERAL (
               SELECT cluster_id, duplicate_of, satellite_id, subsystem, severity, alert_time, silence_id
               FROM alerts WHERE alerts.alert_id = k.alert_id LIMIT 1
           ) AS a
           LEFT JOIN clusters AS c ON c.cluster_id = a.cluster_id""",
        list(alert_ids),
    )
    return {r["alert_id"]: KnownAlert(*list(r.values())[1:]) for r in rows}


_INSERT_CLUSTERS = """
    INSERT INTO clusters (cluster_id, status, root_cause_alert_id, root_cause_confidence, satellites, subsystems,
                          max_severity, first_alert_time, last_alert_time, opened_time, closed_time, close_reason,
                          closed_by, alert_count, duplicate_count, tracking_id, opened_by_alert_id)
    SELECT v.cluster_id, v.status, v.root_cause_alert_id, v.root_cause_confidence,
           ARRAY(SELECT jsonb_array_elements_text(v.lists -> 'satellites')),
           ARRAY(SELECT jsonb_array_elements_text(v.lists -> 'subsystems')),
           v.max_severity, v.first_alert_time, v.last_alert_time, v.opened_time, v.closed_time, v.close_reason,
           v.closed_by, v.alert_count, v.duplicate_count, v.tracking_id, v.opened_by_alert_id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::jsonb[], $6::int[], $7::timestamptz[],
                $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[], $13::int[],
                $14::int[], $15::text[], $16::text[])
      AS v(cluster_id, status, root_cause_alert_id, root_cause_confidence, lists, max_severity, first_alert_time,
           last_alert_time, opened_time, closed_time, close_reason, closed_by, alert_count, duplicate_count,
           tracking_id, opened_by_alert_id)"""

# The status and the close fields of an existing cluster are not written here: `close_cluster` owns
# them. A batch prepared before a close commits may still carry the cluster as open, and must not
# reopen it. One statement per cluster, by its key: joined to an array parameter instead, the planner
# hashed the whole table for a few hundred clusters whenever it took the table for small.
_UPDATE_CLUSTER = """
    UPDATE clusters SET
        root_cause_alert_id = $2, root_cause_confidence = $3,
        satellites = CASE WHEN $11 THEN $4::text[] ELSE satellites END,
        subsystems = CASE WHEN $11 THEN $5::text[] ELSE subsystems END,
        max_severity = $6, first_alert_time = $7, last_alert_time = $8,
        alert_count = $9, duplicate_count = $10, late_arrival_time = $12
    WHERE cluster_id = $1"""

_INSERT_ALERTS = """
    INSERT INTO alerts (alert_id, cluster_id, satellite_id, subsystem, severity, alert_time, message, labels,
                        duplicate_of, tracking_id, silence_id)
    SELECT * FROM unnest($17::text[], $18::text[], $19::text[], $20::text[], $21::int[], $22::timestamptz[],
                         $23::text[], $24::jsonb[], $25::text[], $26::text[], $27::text[])"""

STATEMENT_ROWS: Final = 100
"""Largest batch (in alerts) that `write_batch` inserts with one statement rather than with COPY."""

_INSERT_BATCH = f"""
    WITH new_clusters AS ({_INSERT_CLUSTERS}),
         new_alerts AS ({_INSERT_ALERTS})
    {outbox.insert_from_arrays(28)}"""


async def write_batch(
    conn: asyncpg.Connection,
    clusters: Sequence[ClusterRecord],
    new_ids: Collection[str],
    grown_ids: Collection[str],
    rows: Sequence[AlertRow],
    events: Sequence[outbox.OutboxEvent],
) -> None:
    """Writes what one ingest batch decided: the clusters in `new_ids` (opened by the batch) inserted,
    the other `clusters` updated, the alerts and their events inserted; all or nothing.

    A batch of at most `STATEMENT_ROWS` alerts is inserted with one statement (data-modifying CTEs
    over parameter arrays): one round trip. One that opens every incident it touches (new faults,
    one IngestAlert call each) needs nothing else, so no BEGIN and COMMIT either. Written as a
    transaction of three COPYs, such a batch took five round trips, and the server spent about 40 us
    more CPU per IngestAlert call (7 alternated pairs at 96 callers, medians 386 against 344 us;
    fewer in 6 of them). Larger batches (bulk streams) go by COPY: per row it costs less, in the
    server and in PostgreSQL, than the arrays do (an alert storm streamed 5-10% slower through the
    statement, with more CPU per alert in both).

    Existing clusters are updated first, one pipelined statement each (see `_UPDATE_CLUSTER`), in
    the same transaction. Their `satellites` and `subsystems` are rewritten only if they are in
    `grown_ids`: a storm's incident spans hundreds of satellites and changes with nearly every
    commit, but its lists seldom do.
    """
    new = [c for c in clusters if c.cluster_id in new_ids]
    changed = [c for c in clusters if c.cluster_id not in new_ids]
    if len(rows) > STATEMENT_ROWS:
        async with conn.transaction():
            if new:
                # Clusters first: the alerts' check (migration 0006) looks for theirs.
                records = [_cluster_values(c) for c in new]
                await conn.copy_records_to_table("clusters", records=records, columns=_CLUSTER_COLUMN_NAMES)
            await _update_changed(conn, changed, grown_ids)
            await conn.copy_records_to_table("alerts", records=[_alert_values(r) for r in rows], columns=_ALERT_COLUMNS)
            await outbox.append(conn, events)
        return
    clusters_in = _columns(map(_cluster_values, new), len(_CLUSTER_COLUMN_NAMES))
    # The lists as one JSON object per cluster: a list inside an array parameter would be one more
    # dimension to asyncpg, and the lists differ in length.
    lists = [{"satellites": c.satellites, "subsystems": c.subsystems} for c in new]
    inserts = [
        *clusters_in[:4],  # _INSERT_CLUSTERS' order: `_CLUSTER_COLUMN_NAMES` with the two lists as one
        lists,
        *clusters_in[6:],
        *_columns(map(_alert_values, rows), len(_ALERT_COLUMNS)),
        *outbox.event_arrays(events),
    ]
    if not changed:
        await conn.execute(_INSERT_BATCH, *inserts)
        return
    async with conn.transaction():
        await _update_changed(conn, changed, grown_ids)
        await conn.execute(_INSERT_BATCH, *inserts)


async def _update_changed(
    conn: asyncpg.Connection, changed: Sequence[ClusterRecord], grown_ids: Collection[str]
) -> None:
    if changed:
        await conn.executemany(_UPDATE_CLUSTER, [_update_values(c, c.cluster_id in grown_ids) for c in changed])


_ALERT_COLUMNS = [
    "alert_id",
    "cluster_id",
    "satellite_id",
    "subsystem",
    "severity",
    "alert_time",
    "message",
    "labels",
    "duplicate_of",
    "tracking_id",
    "silence_id",
]


def _columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into one list per column (`width` empty ones when there are no rows)."""
    return [list(column) for column in zip(*rows, strict=True)] or [[] for _ in range(width)]


def _alert_values(r: AlertRow) -> tuple[Any, ...]:
    """An alert's row, in `_ALERT_COLUMNS` order (also that of `_INSERT_ALERTS`' arrays)."""
    a = r.alert
    return (
        a.alert_id,
        r.cluster_id,
        a.satellite_id,
        a.subsystem,
        a.severity,
        a.timestamp,
        a.message,
        a.labels_dict(),
        r.duplicate_of,
        r.tracking_id,
        r.silence_id,
    )


def _cluster_values(c: ClusterRecord) -> tuple[Any, ...]:
    """A new cluster's row, in `_CLUSTER_COLUMN_NAMES` order."""
    return (
        c.cluster_id,
        c.status,
        c.root_cause_alert_id,
        c.root_cause_confidence,
        c.satellites,
        c.subsystems,
        c.max_severity,
        c.first_alert_time,
        c.last_alert_time,
        c.opened_time,
        c.closed_time,
        c.close_reason,
        c.closed_by,
        c.alert_count,
        c.duplicate_count,
        c.tracking_id,
        c.opened_by_alert_id,
    )


def _update_values(c: ClusterRecord, grown: bool) -> tuple[Any, ...]:
    """Parameters of `_UPDATE_CLUSTER`; the lists go empty (and unused) unless `grown`."""
    return (
        c.cluster_id,
        c.root_cause_alert_id,
        c.root_cause_confidence,
        c.satellites if grown else [],
        c.subsystems if grown else [],
        c.max_severity,
        c.first_alert_time,
        c.last_alert_time,
        c.alert_count,
        c.duplicate_count,
        grown,
        c.late_arrival_time,
    )


ALERT_BYTES_FLOOR: Final = 16
"""What an alert adds to an encoded response beyond the bytes of its id, satellite id, subsystem and
message, at least: each of the three ids is non-empty, so costs a tag and a length byte besides its
text, and the severity and the timestamp two bytes each; the response layer counts 8 more per alert
(`servers.correlation.cluster_to_proto`). So `_ALERT_BYTES` below never exceeds what an alert costs."""

_ALERT_BYTES = (
    "octet_length(alert_id) + octet_length(satellite_id) + octet_length(subsystem) + octet_length(message)"
    f" + {ALERT_BYTES_FLOOR}"
)


async def get_alerts(
    conn: asyncpg.Connection, cluster_ids: Sequence[str], *, within_bytes: int | None = None
) -> dict[str, list[Alert]]:
    """Non-duplicate alerts of the clusters, oldest first: all of them, or, with `within_bytes`, those
    a response with that many bytes for alerts can show, the clusters taking their turn in the given
    order (an alert storm's incident holds hundreds of thousands, more than any answer shows).

    The cut is made in PostgreSQL, by a lower bound of each alert's encoded size (`_ALERT_BYTES`), so
    the rows read are a few more than the response shows, never fewer. Read whole and cut by the
    response, a page of 50 storm incidents of 2,000 alerts each decoded all 100,000 rows to show
    6,745: 1.2 s of server CPU per ListActiveClusters call."""
    if within_bytes is None:
        # One index range per cluster (alerts_by_cluster), whatever the planner knows: with
        # `cluster_id = ANY($1)` a planner without statistics takes a page of 500 clusters for the
        # whole table and reads all of it. OFFSET 0 keeps it from flattening the lateral subquery
        # back into that join. Nothing is sorted per cluster: a restart reads every active cluster's
        # alerts this way.
        rows = await conn.fetch(
            """SELECT a.* FROM unnest($1::text[]) AS k(cluster_id)
               CROSS JOIN LATERAL (
                   SELECT * FROM alerts
                   WHERE alerts.cluster_id = k.cluster_id AND alerts.duplicate_of IS NULL OFFSET 0
               ) AS a
               ORDER BY a.alert_time, a.alert_id""",
            list(cluster_ids),
        )
    elif within_bytes <= 0:
        rows = []
    else:
        # No alert costs less than ALERT_BYTES_FLOOR + 3 (three one-character ids), so the page shows at
        # most $3 alerts; a cluster's turn comes with fewer left when the clusters before it hold some
        # (by their alert_count), so a page of storm incidents reads that many rows in all, not each.
        rows = await conn.fetch(
            f"""SELECT * FROM (
                    SELECT a.*, sum(a.size) OVER (ORDER BY k.turn, a.alert_time, a.alert_id ROWS UNBOUNDED PRECEDING)
                               AS spent
                    FROM (
                        SELECT u.cluster_id, u.turn, greatest(0, $3 - coalesce(sum(c.alert_count) OVER (
                                   ORDER BY u.turn ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS most
                        FROM unnest($1::text[]) WITH ORDINALITY AS u(cluster_id, turn)
                        CROSS JOIN LATERAL (SELECT alert_count FROM clusters WHERE cluster_id = u.cluster_id) AS c
                    ) AS k
                    CROSS JOIN LATERAL (
                        SELECT *, {_ALERT_BYTES} AS size FROM alerts
                        WHERE alerts.cluster_id = k.cluster_id AND alerts.duplicate_of IS NULL
                        ORDER BY alert_time, alert_id LIMIT k.most
                    ) AS a
                ) AS s
                WHERE spent <= $2
                ORDER BY alert_time, alert_id""",
            list(cluster_ids),
            within_bytes,
            within_bytes // (ALERT_BYTES_FLOOR + 3) + 1,
        )
    out: dict[str, list[Alert]] = {cid: [] for cid in cluster_ids}
    for row in rows:
        out[row["cluster_id"]].append(_alert(row))
    return out


async def get_cluster(
    conn: asyncpg.Connection, cluster_id: str, *, alert_bytes: int | None = None
) -> ClusterRecord | None:
    """The cluster with its oldest alerts, as many as `alert_bytes` holds (None: all; 0: none; see
    `get_alerts`)."""
    row = await conn.fetchrow(f"SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE cluster_id = $1", cluster_id)
    if row is None:
        return None
    alerts = (await get_alerts(conn, [cluster_id], within_bytes=alert_bytes))[cluster_id]
    return _record(row, alerts)


async def root_alert(conn: asyncpg.Connection, record: ClusterRecord) -> Alert | None:
    """The cluster's root-cause alert: among the record's alerts, or read (when only the oldest were)."""
    root = record.root_cause_alert_id
    if not root:
        return None
    found = next((a for a in record.alerts if a.alert_id == root), None)
    if found is not None:
        return found
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", root)
    return None if row is None else _alert(row)


async def load_active(conn: asyncpg.Connection, since: datetime) -> list[ClusterRecord]:
    """Open clusters with activity since `since`, with their alerts (restart recovery): a last alert
    since then, or an arrival since then of an alert older than that (a downlinked batch)."""
    rows = await conn.fetch(
        f"""SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE status = 'OPEN'
              AND (last_alert_time >= $1 OR opened_time >= $1 OR late_arrival_time >= $1)""",
        since,
    )
    alerts = await get_alerts(conn, [r["cluster_id"] for r in rows])
    return [_record(r, alerts[r["cluster_id"]]) for r in rows]


_ACKNOWLEDGED = {True: "acknowledge_time IS NOT NULL", False: "acknowledge_time IS NULL"}
"""The listing clause for `acknowledged`: True, only acknowledged clusters; False, only the others."""


async def list_active(
    conn: asyncpg.Connection,
    *,
    since: datetime,
    satellite_id: str,
    min_severity: int,
    limit: int,
    after: tuple[datetime, str] | None,
    acknowledged: bool | None = None,
    alert_bytes: int | None = None,
) -> list[ClusterRecord]:
    """One page of open clusters active since `since`, newest activity first (keyset pagination),
    each with its oldest alerts, as many as `alert_bytes` holds for the page (None: all; see `get_alerts`)."""
    clauses = ["status = 'OPEN'", "last_alert_time >= $1"]
    args: list[Any] = [since]
    if satellite_id:
        args.append(satellite_id)
        clauses.append(f"${len(args)} = ANY(satellites)")
    if min_severity:
        args.append(min_severity)
        clauses.append(f"max_severity >= ${len(args)}")
    if acknowledged is not None:
        clauses.append(_ACKNOWLEDGED[acknowledged])
    if after is not None:
        args.extend(after)
        clauses.append(f"(last_alert_time, cluster_id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    rows = await conn.fetch(
        f"""SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE {" AND ".join(clauses)}
            ORDER BY last_alert_time DESC, cluster_id DESC LIMIT ${len(args)}""",
        *args,
    )
    alerts = await get_alerts(conn, [r["cluster_id"] for r in rows], within_bytes=alert_bytes)
    return [_record(r, alerts[r["cluster_id"]]) for r in rows]


async def list_clusters(
    conn: asyncpg.Connection,
    *,
    status: str | None,
    satellite_id: str,
    min_severity: int,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    after: str | None,
    acknowledged: bool | None = None,
    alert_bytes: int | None = None,
) -> list[ClusterRecord]:
    """One page of stored clusters, most recently opened first (keyset pagination by id), each with
    its oldest alerts, as many as `alert_bytes` holds for the page (None: all; see `get_alerts`).

    Cluster ids start with the time they were made (`aetherops.ids`), so the primary key serves the
    order and nothing on the ingest path maintains another index for it. The filters are checked
    while walking back from the newest: a rare satellite over a long history reads that history.
    """
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("status = ${}", status),
        ("${} = ANY(satellites)", satellite_id or None),
        ("max_severity >= ${}", min_severity or None),
        ("last_alert_time >= ${}", start),
        ("first_alert_time < ${}", end),
        ("cluster_id < ${}", after),
    ):
        if value is not None:
            args.append(value)
            clauses.append(clause.format(len(args)))
    if acknowledged is not None:
        clauses.append(_ACKNOWLEDGED[acknowledged])
    args.append(limit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(
        f"SELECT {_CLUSTER_COLUMNS} FROM clusters {where} ORDER BY cluster_id DESC LIMIT ${len(args)}", *args
    )
    alerts = await get_alerts(conn, [r["cluster_id"] for r in rows], within_bytes=alert_bytes)
    return [_record(r, alerts[r["cluster_id"]]) for r in rows]


async def list_alerts(
    conn: asyncpg.Connection,
    *,
    tracking_id: str,
    cluster_id: str,
    satellite_id: str,
    after: tuple[datetime, str] | None,
    limit: int,
    silence_id: str = "",
) -> list[StoredAlert]:
    """One page of stored alerts (duplicates included), oldest alert time first (keyset pagination).
    The caller filters by tracking id, cluster or silence: those are what the indexes serve."""
    if not (tracking_id or cluster_id or silence_id):
        raise ValueError("list_alerts needs a tracking id, a cluster id or a silence id")
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("tracking_id", tracking_id),
        ("cluster_id", cluster_id),
        ("silence_id", silence_id),
        ("satellite_id", satellite_id),
    ):
        if value:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    if after is not None:
        args.extend(after)
        clauses.append(f"(alert_time, alert_id) > (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    where, n = " AND ".join(clauses), len(args)
    if cluster_id:
        # Two partial indexes hold a cluster's alerts (non-duplicates, duplicates), so the hot ingest
        # path keeps one cluster index per row: merge one page of each.
        page = f"ORDER BY alert_time, alert_id LIMIT ${n}"
        query = f"""(SELECT * FROM alerts WHERE {where} AND duplicate_of IS NULL {page})
            UNION ALL (SELECT * FROM alerts WHERE {where} AND duplicate_of IS NOT NULL {page}) {page}"""
    else:
        query = f"SELECT * FROM alerts WHERE {where} ORDER BY alert_time, alert_id LIMIT ${n}"
    rows = await conn.fetch(query, *args)
    return [
        StoredAlert(_alert(r), r["cluster_id"], r["duplicate_of"], r["ingested_time"], r["silence_id"]) for r in rows
    ]


async def close_cluster(
    conn: asyncpg.Connection, cluster_id: str, *, closed_time: datetime, reason: str, closed_by: str
) -> None:
    await conn.execute(
        """UPDATE clusters SET status = 'CLOSED', closed_time = $2, close_reason = $3, closed_by = $4
           WHERE cluster_id = $1""",
        cluster_id,
        closed_time,
        reason,
        closed_by,
    )


async def acknowledge_cluster(conn: asyncpg.Connection, cluster_id: str, acknowledgement: Acknowledgement) -> None:
    await conn.execute(
        """UPDATE clusters SET acknowledge_time = $2, acknowledged_by = $3, acknowledge_note = $4
           WHERE cluster_id = $1""",
        cluster_id,
        acknowledgement.time,
        acknowledgement.by,
        acknowledgement.note,
    )


async def merge_clusters(
    conn: asyncpg.Connection,
    merged: ClusterRecord,
    source_ids: Sequence[str],
    *,
    closed_time: datetime,
    reason: str,
    closed_by: str,
) -> None:
    """Stores a merge: the sources' alerts (duplicates too) move to `merged`, whose row takes its merged
    state, and each source closes, pointing at it. The caller holds the rows' locks."""
    # One statement per partial index of a cluster's alerts (see `list_alerts`): the planner uses
    # them only when the statement carries their condition.
    for kept in ("IS NULL", "IS NOT NULL"):
        await conn.execute(
            f"UPDATE alerts SET cluster_id = $1 WHERE cluster_id = ANY($2::text[]) AND duplicate_of {kept}",
            merged.cluster_id,
            list(source_ids),
        )
    await conn.execute(_UPDATE_CLUSTER, *_update_values(merged, True))
    await conn.execute(
        """UPDATE clusters SET status = 'CLOSED', closed_time = $2, close_reason = $3, closed_by = $4, merged_into = $5
           WHERE cluster_id = ANY($1::text[])""",
        list(source_ids),
        closed_time,
        reason,
        closed_by,
        merged.cluster_id,
    )
