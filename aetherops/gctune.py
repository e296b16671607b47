"""Garbage-collector settings for a process that holds large long-lived state (the correlation
engine's active clusters, forecasts, executions).

CPython's cyclic collector runs a young collection every 700 net allocations and a full one when a
quarter of the heap is new; with millions of long-lived alerts in memory, those collections took 13-26%
of ingest time. `aetherops serve` calls `settle_long_lived_state` once its state is loaded, and
`bench/correlation_engine.py` calls it after filling the window, so the benchmark measures the
engine as the server runs it.

The middle generation is collected after every second young collection (CPython's default is the
tenth): a collection of it walks every young survivor since the last one, so that bounds its pause.
At every twentieth, with the young threshold raised, such a pause reached 630 ms in the engine
benchmark (100,000 active incidents) and 246 ms in the server, where alerts wait for it. The total
work is about the same: each survivor is walked once on its way to the old generation. Full
collections stay as rare as before (at most one per 400 young collections, and only once the heap
grew by a quarter): allowing them every 40 made four full collections in the server where there
were two (one bench run each), and each walks the whole heap (2 s with a few hundred thousand
active incidents in memory).

Reference counting still frees everything that is not part of a cycle; only cyclic garbage waits
longer (or, for objects frozen at start-up, until `release_long_lived_state`).
"""

from __future__ import annotations

import gc

__all__ = ["MIDDLE_THRESHOLD", "YOUNG_THRESHOLD", "release_long_lived_state", "settle_long_lived_state"]

YOUNG_THRESHOLD = 50_000
"""Net allocations between young collections (CPython's default is 700)."""

MIDDLE_THRESHOLD = 2
"""Young collections between collections of the middle generation."""

_OLD_THRESHOLD = 200  # middle collections between full ones: 2 x 200 = 20 x 20, as before


def settle_long_lived_state() -> None:
    """Moves every object alive now out of the collector's sight and collects young objects less often."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, _OLD_THRESHOLD)


def release_long_lived_state() -> None:
    """Undoes `settle_long_lived_state` (for a process that drops its state and loads another)."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    gc.collect()
