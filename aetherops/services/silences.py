"""Silences against PostgreSQL: create, list, expire, and the index the ingest path consults.

The index (`aetherops.silences.SilenceIndex`) is loaded at start and reloaded every `refresh_s`,
so a silence created through another replica reaches this one's ingestion within that time; one
created or expired here is in the index as soon as its transaction commits. An alert ingested
while a silence is being created may be correlated as before: a silence covers alerts from its
reply on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

from aetherops.clock import Clock
from aetherops.db import Database, idempotency
from aetherops.db import silences as repo
from aetherops.errors import FailedPreconditionError, FieldViolation, NotFoundError, ValidationError
from aetherops.ids import sortable_id
from aetherops.paging import cut_page, filters_key, page_limit, position_text, read_page_token
from aetherops.silences import Silence, SilenceIndex, end_problems, silence_problems
from aetherops.tasks import cancel_and_wait, periodically
from aetherops.text import filter_problems, id_problem

__all__ = ["SilenceService"]

log = logging.getLogger(__name__)

_REFRESH_S: Final = 10.0


class SilenceService:
    """Silences, stored; `match` is what ingestion asks."""

    def __init__(
        self, db: Database, clock: Clock, canonical: Callable[[str], str], *, refresh_s: float = _REFRESH_S
    ) -> None:
        """`canonical`: the dependency graph's subsystem names (aliases resolved), as the engine uses."""
        self._db = db
        self._clock = clock
        self._canonical = canonical
        self._index = SilenceIndex(canonical)
        self._refresh_s = refresh_s
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload()
        self._refresher = asyncio.create_task(
            periodically(self._refresh_s, self.reload, "reloading silences"), name="silences-refresh"
        )

    async def stop(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)

    async def reload(self) -> None:
        """Reads every silence that can still cover an alert into the index."""
        now = self._clock.now()
        async with self._db.connection() as conn:
            found = await repo.within_reach(conn, now - timedelta(seconds=SilenceIndex.KEEP_AFTER_END_S))
        self._index.replace_all(found, now)

    def match(self, satellite_id: str, subsystem: str, labels: Mapping[str, str], when: datetime) -> Silence | None:
        """The silence that covers an alert, if any (one truth test while there are none)."""
        index = self._index
        return index.match(satellite_id, subsystem, labels, when) if index else None

    async def create(
        self,
        *,
        satellite_ids: Iterable[str],
        subsystems: Iterable[str],
        labels: Mapping[str, str],
        start: datetime | None,
        end: datetime | None,
        comment: str,
        request_id: str,
        by: str,
    ) -> Silence:
        """Stores a new silence (idempotent on request_id): from `start` (None: now) until `end`."""
        now = self._clock.now()
        begins = start or now
        given = Silence(
            silence_id="",
            start_time=begins,
            end_time=end or begins + timedelta(seconds=1),  # a stand-in, to check the rest
            comment=comment,
            satellite_ids=frozenset(satellite_ids),
            subsystems=frozenset(subsystems),
            labels=dict(labels),
        )
        problems = silence_problems(given, start_given=start is not None)
        if end is None:
            problems.append(FieldViolation("silence.end_time", "required"))
        if problems:
            raise ValidationError(problems)
        made = replace(
            given,
            silence_id=sortable_id(now),
            subsystems=frozenset(map(self._canonical, given.subsystems)),
            created_by=by,
            create_time=now,
        )
        async with self._db.transaction() as conn:
            await idempotency.lock(conn, "correlation.silence", request_id)
            before = await idempotency.recall(conn, "correlation.silence", request_id)
            if before is not None:
                stored = await repo.get(conn, before["silence_id"])
                if stored is None:
                    # Retention deleted it, ended long ago; its answer may be kept longer (or for ever).
                    raise NotFoundError(
                        f"silence {before['silence_id']!r}, created under request_id {request_id!r}, was deleted"
                        " (retention)"
                    )
                return stored
            # Only now: a retry after its end answers with the silence its first call created.
            late = end_problems(made, now, start_given=start is not None)
            if late:
                raise ValidationError(late)
            await repo.insert(conn, made)
            await idempotency.remember(conn, "correlation.silence", request_id, {"silence_id": made.silence_id})
        self._index.put(made, now)
        log.info(
            "silence %s created by %s until %s: %s", made.silence_id, by or "-", made.end_time.isoformat(), made.comment
        )
        return made

    async def expire(self, silence_id: str, *, request_id: str, by: str) -> Silence:
        """Ends a silence now (idempotent on request_id, per silence)."""
        problem = id_problem(silence_id)
        if problem is not None:
            raise ValidationError.single("silence_id", problem)
        now = self._clock.now()
        scope = f"correlation.silence.expire.{silence_id}"
        async with self._db.transaction() as conn:
            current = await repo.get(conn, silence_id, for_update=True)
            if current is None:
                # Also for a retry: retention deletes a silence long ended, and may keep the answer longer.
                raise NotFoundError(f"silence {silence_id!r} not found")
            if await idempotency.recall(conn, scope, request_id) is not None:
                return current
            if current.is_over(now):
                raise FailedPreconditionError(f"silence {silence_id!r} ended at {current.end_time.isoformat()}")
            ended = current.expired(now, by)
            await repo.expire(conn, ended)
            await idempotency.remember(conn, scope, request_id, {"silence_id": silence_id})
        self._index.put(ended, now)
        log.info("silence %s expired by %s", silence_id, by or "-")
        return ended

    async def list_page(
        self, *, page_size: int, page_token: str, include_ended: bool, satellite_id: str
    ) -> tuple[list[Silence], str]:
        """One page of silences, most recently created first; those not yet ended unless `include_ended`;
        with `satellite_id`, those that apply to its alerts (naming it, or naming no satellite)."""
        problems: list[FieldViolation] = []
        if page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        problems += filter_problems(satellite_id=satellite_id)
        filters = filters_key(include_ended, satellite_id)
        after = read_page_token(page_token, filters, lambda p: position_text(p["s"]), problems)
        if problems:
            raise ValidationError(problems)
        limit = page_limit(page_size)
        async with self._db.connection() as conn:
            page = await repo.list_page(
                conn,
                ended_after=None if include_ended else self._clock.now(),
                satellite_id=satellite_id,
                after=after,
                limit=limit + 1,
            )
        return cut_page(page, limit, lambda s: {"s": s.silence_id}, filters)
