"""PostgreSQL repository for capacity snapshots, scheduled missions and stored risk levels.

Snapshots move in and out with binary COPY built and parsed by numpy, never row by row in
Python: a batch is grouped into per-series `SeriesBlock`s (one satellite, one resource, arrays
of µs timestamps and values), encoded as one PGCOPY binary stream into a session temp table,
then moved with ``INSERT … ON CONFLICT DO NOTHING`` so a re-sent snapshot is stored once and the
caller learns which rows were new. Restart recovery reads the whole table back with one binary
``COPY … TO STDOUT`` in primary-key order and cuts it into per-series arrays, ready for
`CapacityPlanner.ingest_series`.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import numpy as np
import numpy.typing as npt

from aetherops.capacity import MissionScheduleEntry, ResourceSnapshot, ResourceType, RiskLevel, datetime_to_us

__all__ = [
    "RiskRow",
    "SeriesBlock",
    "bulk_load",
    "conflicting_values",
    "copy_direct",
    "count_snapshots",
    "delete_mission",
    "encode_copy_binary",
    "get_mission",
    "insert_snapshots",
    "list_missions",
    "list_snapshots",
    "load_missions",
    "load_risk_levels",
    "load_snapshots",
    "upsert_mission",
    "upsert_risk_levels",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_TABLE = "capacity_snapshots"
_LOAD_TABLE = "capacity_snapshots_load"
_COLUMNS = ["satellite_id", "resource_type", "snapshot_time", "value", "unit"]
# PostgreSQL's binary timestamptz counts µs from 2000-01-01 UTC, not from the Unix epoch.
_PG_EPOCH_US = 946_684_800_000_000
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


@dataclass(frozen=True)
class SeriesBlock:
    """Snapshots of one (satellite, resource) series: µs since the Unix epoch and values, same length."""

    satellite_id: str
    resource_type: ResourceType
    unit: str
    times_us: IntArray
    values: FloatArray

    def __len__(self) -> int:
        return int(self.times_us.size)


@dataclass(frozen=True)
class RiskRow:
    """A series' current risk level as stored."""

    satellite_id: str
    resource_type: ResourceType
    risk_level: RiskLevel
    days_remaining: float | None
    changed_time: datetime


# ---- binary COPY ----------------------------------------------------------------------------------


def _block_bytes(block: SeriesBlock) -> bytes:
    """The PGCOPY tuples of one block. Every row of a series has the same length (same satellite id
    and unit), so the whole block is one numpy structured array written in a single copy."""
    sat = block.satellite_id.encode()
    unit = block.unit.encode()
    dtype = np.dtype(
        [
            ("nfields", ">i2"),
            ("len_sat", ">i4"),
            ("sat", f"S{len(sat)}"),
            ("len_res", ">i4"),
            ("res", ">i2"),
            ("len_t", ">i4"),
            ("t", ">i8"),
            ("len_v", ">i4"),
            ("v", ">f8"),
            ("len_unit", ">i4"),
            ("unit", f"S{len(unit)}"),
        ]
    )
    rows = np.empty(len(block), dtype=dtype)
    rows["nfields"] = 5
    rows["len_sat"] = len(sat)
    rows["sat"] = sat
    rows["len_res"] = 2
    rows["res"] = int(block.resource_type)
    rows["len_t"] = 8
    rows["t"] = block.times_us - _PG_EPOCH_US
    rows["len_v"] = 8
    rows["v"] = block.values
    rows["len_unit"] = len(unit)
    rows["unit"] = unit
    return rows.tobytes()


def encode_copy_binary(blocks: Iterable[SeriesBlock]) -> bytes:
    """One PGCOPY binary stream of the blocks' rows, in `_COLUMNS` order."""
    return b"".join([_COPY_HEADER, *(_block_bytes(b) for b in blocks if len(b)), _COPY_TRAILER])


async def _copy_source(blocks: Sequence[SeriesBlock]) -> AsyncIterator[bytes]:
    """The PGCOPY stream in pieces of about 4 MiB, so a bulk load never holds it whole."""
    yield _COPY_HEADER
    pending: list[bytes] = []
    size = 0
    for block in blocks:
        if not len(block):
            continue
        data = _block_bytes(block)
        pending.append(data)
        size += len(data)
        if size >= 4 << 20:
            yield b"".join(pending)
            pending, size = [], 0
    pending.append(_COPY_TRAILER)
    yield b"".join(pending)


async def _fill_load_table(conn: asyncpg.Connection, blocks: Sequence[SeriesBlock]) -> None:
    # A temp table per session, emptied at every commit: no catalog churn per batch, and
    # concurrent batches on other connections never see each other's rows.
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_LOAD_TABLE} (LIKE {_TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await conn.copy_to_table(_LOAD_TABLE, source=_copy_source(blocks), columns=_COLUMNS, format="binary")


async def insert_snapshots(conn: asyncpg.Connection, blocks: Sequence[SeriesBlock]) -> set[tuple[str, int, int]]:
    """Stores the blocks inside the caller's transaction; returns the (satellite_id, resource, µs)
    keys that were new. Keys already stored (and repeats within the input) are left as they were."""
    if not any(len(b) for b in blocks):
        return set()
    await _fill_load_table(conn, blocks)
    rows = await conn.fetch(
        f"""INSERT INTO {_TABLE} ({", ".join(_COLUMNS)})
            SELECT {", ".join(_COLUMNS)} FROM {_LOAD_TABLE}
            ON CONFLICT DO NOTHING
            RETURNING satellite_id, resource_type, snapshot_time"""
    )
    return {(r["satellite_id"], int(r["resource_type"]), datetime_to_us(r["snapshot_time"])) for r in rows}


async def conflicting_values(conn: asyncpg.Connection) -> dict[tuple[str, int, int], float]:
    """After `insert_snapshots`, in the same transaction: the keys that one of its rows gave another
    value than the one stored (before, or by an earlier row of the same input), with the stored value."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT s.satellite_id, s.resource_type, s.snapshot_time, s.value
            FROM {_LOAD_TABLE} AS l
            JOIN {_TABLE} AS s USING (satellite_id, resource_type, snapshot_time)
            WHERE s.value <> l.value"""
    )
    return {
        (r["satellite_id"], int(r["resource_type"]), datetime_to_us(r["snapshot_time"])): float(r["value"])
        for r in rows
    }


async def bulk_load(conn: asyncpg.Connection, blocks: Sequence[SeriesBlock]) -> int:
    """Like `insert_snapshots` without reporting keys (bulk loads): returns how many rows were new."""
    if not any(len(b) for b in blocks):
        return 0
    await _fill_load_table(conn, blocks)
    status = await conn.execute(
        f"""INSERT INTO {_TABLE} ({", ".join(_COLUMNS)})
            SELECT {", ".join(_COLUMNS)} FROM {_LOAD_TABLE} ON CONFLICT DO NOTHING"""
    )
    return int(str(status).rsplit(" ", 1)[-1])


async def copy_direct(conn: asyncpg.Connection, blocks: Sequence[SeriesBlock], table: str = _TABLE) -> int:
    """COPY straight into `table`: fastest, but a re-sent row fails the whole COPY. For the benchmark's
    comparison and for loading into an empty table only."""
    if not any(len(b) for b in blocks):
        return 0
    status = await conn.copy_to_table(table, source=_copy_source(blocks), columns=_COLUMNS, format="binary")
    return int(str(status).rsplit(" ", 1)[-1])


async def load_snapshots(conn: asyncpg.Connection) -> list[SeriesBlock]:
    """Every stored snapshot as per-series blocks (restart recovery). Runs its two statements in one
    REPEATABLE READ snapshot, so the counts and the rows agree even while others write."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        keys = await conn.fetch(
            f"""SELECT satellite_id, resource_type, min(unit) AS unit, count(*) AS n FROM {_TABLE}
                GROUP BY satellite_id, resource_type ORDER BY satellite_id, resource_type"""
        )
        if not keys:
            return []
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(bytes(data))

        # Same ORDER BY as the GROUP BY above (the primary key's order), so row runs match the counts.
        await conn.copy_from_query(
            f"""SELECT snapshot_time, value FROM {_TABLE}
                ORDER BY satellite_id, resource_type, snapshot_time""",
            output=sink,
            format="binary",
        )
    raw = b"".join(chunks)
    header_len = len(_COPY_HEADER)
    ext = int.from_bytes(raw[15:19], "big")  # header extension area length (0 today)
    body = raw[header_len + ext : len(raw) - len(_COPY_TRAILER)]
    dtype = np.dtype([("nfields", ">i2"), ("len_t", ">i4"), ("t", ">i8"), ("len_v", ">i4"), ("v", ">f8")])
    rows = np.frombuffer(body, dtype=dtype)
    times = rows["t"].astype(np.int64) + _PG_EPOCH_US
    values = rows["v"].astype(np.float64)
    blocks: list[SeriesBlock] = []
    offset = 0
    for key in keys:
        n = int(key["n"])
        blocks.append(
            SeriesBlock(
                key["satellite_id"],
                ResourceType(int(key["resource_type"])),
                key["unit"],
                times[offset : offset + n],
                values[offset : offset + n],
            )
        )
        offset += n
    if offset != rows.size:
        raise RuntimeError(f"snapshot load: {rows.size} rows but counts add up to {offset}")
    return blocks


async def list_snapshots(
    conn: asyncpg.Connection,
    satellite_id: str,
    resource_type: ResourceType,
    *,
    start: datetime | None,
    end: datetime | None,
    after: datetime | None,
    limit: int,
) -> list[ResourceSnapshot]:
    """One page of a series in time order, within [start, end), after `after` (keyset pagination on the
    primary key, which is exactly this index)."""
    clauses = ["satellite_id = $1", "resource_type = $2"]
    args: list[object] = [satellite_id, int(resource_type)]
    for clause, value in (("snapshot_time >= ", start), ("snapshot_time < ", end), ("snapshot_time > ", after)):
        if value is not None:
            args.append(value)
            clauses.append(f"{clause}${len(args)}")
    args.append(limit)
    rows = await conn.fetch(
        f"""SELECT snapshot_time, value, unit FROM {_TABLE} WHERE {" AND ".join(clauses)}
            ORDER BY snapshot_time LIMIT ${len(args)}""",
        *args,
    )
    return [ResourceSnapshot(satellite_id, resource_type, r["snapshot_time"], r["value"], r["unit"]) for r in rows]


async def count_snapshots(conn: asyncpg.Connection, satellite_id: str | None = None) -> int:
    if satellite_id is None:
        return int(await conn.fetchval(f"SELECT count(*) FROM {_TABLE}"))
    return int(await conn.fetchval(f"SELECT count(*) FROM {_TABLE} WHERE satellite_id = $1", satellite_id))


# ---- missions -------------------------------------------------------------------------------------


def _impacts_json(entry: MissionScheduleEntry) -> dict[str, float]:
    return {str(int(r)): float(a) for r, a in entry.resource_impacts.items()}


def _mission(row: asyncpg.Record) -> MissionScheduleEntry:
    impacts = row["resource_impacts"]
    if isinstance(impacts, str):  # a connection without the json codec
        impacts = json.loads(impacts)
    return MissionScheduleEntry(
        mission_id=row["mission_id"],
        satellite_id=row["satellite_id"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        resource_impacts={ResourceType(int(k)): float(v) for k, v in impacts.items()},
        description=row["description"],
    )


async def upsert_mission(conn: asyncpg.Connection, entry: MissionScheduleEntry) -> MissionScheduleEntry | None:
    """Stores the mission (replacing one with the same id); returns the version it replaced, if any."""
    previous = await conn.fetchrow("SELECT * FROM capacity_missions WHERE mission_id = $1 FOR UPDATE", entry.mission_id)
    await conn.execute(
        """INSERT INTO capacity_missions
               (mission_id, satellite_id, start_time, end_time, resource_impacts, description, updated_time)
           VALUES ($1, $2, $3, $4, $5, $6, now())
           ON CONFLICT (mission_id) DO UPDATE SET
               satellite_id = EXCLUDED.satellite_id, start_time = EXCLUDED.start_time,
               end_time = EXCLUDED.end_time, resource_impacts = EXCLUDED.resource_impacts,
               description = EXCLUDED.description, updated_time = now()""",
        entry.mission_id,
        entry.satellite_id,
        entry.start_time,
        entry.end_time,
        _impacts_json(entry),
        entry.description,
    )
    return _mission(previous) if previous is not None else None


async def delete_mission(conn: asyncpg.Connection, mission_id: str) -> MissionScheduleEntry | None:
    """Deletes the mission; returns it as it was, or None if there was none."""
    row = await conn.fetchrow("DELETE FROM capacity_missions WHERE mission_id = $1 RETURNING *", mission_id)
    return _mission(row) if row is not None else None


async def get_mission(conn: asyncpg.Connection, mission_id: str) -> MissionScheduleEntry | None:
    row = await conn.fetchrow("SELECT * FROM capacity_missions WHERE mission_id = $1", mission_id)
    return _mission(row) if row is not None else None


async def list_missions(
    conn: asyncpg.Connection,
    satellite_id: str,
    *,
    resource_type: ResourceType | None,
    start: datetime | None,
    end: datetime | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[MissionScheduleEntry]:
    """One page of a satellite's missions, earliest start first (keyset on start time and id): those
    impacting `resource_type` and overlapping [start, end) when given."""
    clauses = ["satellite_id = $1"]
    args: list[object] = [satellite_id]
    if resource_type is not None:
        args.append(str(int(resource_type)))
        # An impact of 0 is listed in the mission but changes nothing: forecasts ignore it too.
        clauses.append(f"(resource_impacts ->> ${len(args)})::float8 <> 0")
    if start is not None:
        args.append(start)
        clauses.append(f"end_time > ${len(args)}")
    if end is not None:
        args.append(end)
        clauses.append(f"start_time < ${len(args)}")
    if after is not None:
        args.extend(after)
        clauses.append(f"(start_time, mission_id) > (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    rows = await conn.fetch(
        f"""SELECT * FROM capacity_missions WHERE {" AND ".join(clauses)}
            ORDER BY start_time, mission_id LIMIT ${len(args)}""",
        *args,
    )
    return [_mission(r) for r in rows]


async def load_missions(conn: asyncpg.Connection) -> list[MissionScheduleEntry]:
    rows = await conn.fetch("SELECT * FROM capacity_missions ORDER BY start_time, mission_id")
    return [_mission(r) for r in rows]


# ---- risk levels ----------------------------------------------------------------------------------


async def load_risk_levels(conn: asyncpg.Connection) -> dict[tuple[str, ResourceType], RiskRow]:
    rows = await conn.fetch("SELECT * FROM capacity_risk_levels")
    return {
        (r["satellite_id"], ResourceType(int(r["resource_type"]))): RiskRow(
            r["satellite_id"],
            ResourceType(int(r["resource_type"])),
            RiskLevel(int(r["risk_level"])),
            r["days_remaining"],
            r["changed_time"],
        )
        for r in rows
    }


async def upsert_risk_levels(conn: asyncpg.Connection, rows: Sequence[RiskRow]) -> None:
    if not rows:
        return
    await conn.executemany(
        """INSERT INTO capacity_risk_levels
               (satellite_id, resource_type, risk_level, days_remaining, changed_time)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (satellite_id, resource_type) DO UPDATE SET
               risk_level = EXCLUDED.risk_level, days_remaining = EXCLUDED.days_remaining,
               changed_time = EXCLUDED.changed_time""",
        [
            (
                r.satellite_id,
                int(r.resource_type),
                int(r.risk_level),
                r.days_remaining if r.days_remaining is not None and math.isfinite(r.days_remaining) else None,
                r.changed_time,
            )
            for r in rows
        ],
    )
