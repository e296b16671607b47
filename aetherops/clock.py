"""Clocks, the only way core code learns the time (so tests stay deterministic), and the earliest time
the fleet's records may carry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
"""Earliest time an alert or a snapshot may carry. Nothing in the fleet's records predates it, and a
zeroed clock (1970, or year 1) is how a time that was never set usually arrives: it stretched a
capacity series over centuries, and it filed an alert as a long-expired incident of its own."""

TOO_EARLY = f"must not be before {EARLIEST_TIME:%Y-%m-%d} (a clock that was never set?)"
"""The field violation for a time before `EARLIEST_TIME`."""


class Clock(Protocol):
    """Anything with `now()` returning a timezone-aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start time")

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when

    def advance(self, seconds: float = 0.0, **kwargs: float) -> datetime:
        self._now = self._now + timedelta(seconds=seconds, **kwargs)
        return self._now
