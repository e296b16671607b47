"""Retention rounds: what has been kept long enough is deleted, a bounded chunk per transaction.

`aetherops serve` runs a round at start and then every `INTERVAL_S`. What goes (see
`aetherops.db.retention`):

* incidents closed more than `incident_retention_s` ago, with their alerts (duplicates included), and
  silences that ended that long ago, with the alerts they kept out of incidents: only where the
  correlation service runs, and never with `incident_retention_s` 0;
* stored answers of mutating requests older than `idempotency_retention_s` (0: kept for ever).

Once deleted, an incident is NOT_FOUND, and an alert re-sent with a deleted alert's id is ingested as
new: the retention is also how long a retry is recognised. Times are the injected clock's, so a test
can move past a retention instead of waiting for it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Final

from aetherops.clock import Clock
from aetherops.db import Database
from aetherops.db import retention as repo

__all__ = ["KINDS", "Retention"]

log = logging.getLogger(__name__)

KINDS: Final = ("incidents", "alerts", "silences", "idempotency")
"""What `Retention.deleted_total` counts (rows deleted); the `kind` label of the metric."""


class Retention:
    """Deletes, round by round, what is older than its retention."""

    INTERVAL_S: Final = 600.0
    """Between rounds: rows go at most this long after their retention has passed."""
    CHUNK_ALERTS: Final = 20_000
    """Alerts a chunk of incidents may hold together (an incident holding more still goes, alone); alerts
    of silences a chunk deletes (a silence's go over as many chunks as they need)."""
    CHUNK_ROWS: Final = 1_000
    """Silences, or idempotency records, per chunk."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        incident_retention_s: float,
        idempotency_retention_s: float,
        incidents: bool,
    ) -> None:
        """`incidents`: this process runs the correlation service, whose incidents and silences it purges."""
        self._db = db
        self._clock = clock
        self._incident_s = incident_retention_s if incidents else 0.0
        self._idempotency_s = idempotency_retention_s
        self.deleted_total: dict[str, int] = dict.fromkeys(KINDS, 0)

    @property
    def enabled(self) -> bool:
        return self._incident_s > 0 or self._idempotency_s > 0

    async def run_once(self) -> dict[str, int]:
        """One round: deletes chunk after chunk until nothing is old enough; returns the rows deleted."""
        now = self._clock.now()
        deleted = dict.fromkeys(KINDS, 0)
        if self._incident_s > 0:
            cutoff = now - timedelta(seconds=self._incident_s)
            while True:
                async with self._db.transaction() as conn:
                    incidents, alerts = await repo.purge_closed_incidents(conn, cutoff, self.CHUNK_ALERTS)
                self._count(deleted, incidents=incidents, alerts=alerts)
                if incidents == 0:
                    break
            while True:
                async with self._db.transaction() as conn:
                    silences, alerts = await repo.purge_ended_silences(conn, cutoff, self.CHUNK_ROWS, self.CHUNK_ALERTS)
                self._count(deleted, silences=silences, alerts=alerts)
                if silences < self.CHUNK_ROWS and alerts < self.CHUNK_ALERTS:
                    break
        if self._idempotency_s > 0:
            cutoff = now - timedelta(seconds=self._idempotency_s)
            while True:
                async with self._db.transaction() as conn:
                    records = await repo.purge_idempotency(conn, cutoff, self.CHUNK_ROWS)
                self._count(deleted, idempotency=records)
                if records < self.CHUNK_ROWS:
                    break
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {kind}" for kind, n in deleted.items() if n))
        return deleted

    def _count(self, deleted: dict[str, int], **counts: int) -> None:
        for kind, n in counts.items():
            deleted[kind] += n
            self.deleted_total[kind] += n
