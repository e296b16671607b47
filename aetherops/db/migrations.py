"""Versioned SQL migrations, applied at start.

Files `sql/NNNN_name.sql` are applied in order, each in its own transaction,
and recorded in `schema_migrations`. A session advisory lock keyed on the
schema makes two processes starting at once take turns; re-running applies
nothing new.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from aetherops.db.pool import Database

__all__ = ["Migration", "apply_migrations", "load_migrations"]

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged migrations, in version order."""
    found = []
    for entry in resources.files("aetherops.db").joinpath("sql").iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def apply_migrations(db: Database) -> list[int]:
    """Applies the missing migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    # A dedicated connection: the session lock ends with it, whatever happens on the way.
    async with db.dedicated() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"aetherops.migrations.{db.schema}")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_time timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.version)
    return applied_now
