"""Garbage-collector settings for a process that holds large long-lived state (the correlation
engine's active clusters, forecasts, executions).

CPython's cyclic collector runs a young collection every 700 net allocations and a full one when a
quarter of the heap is new; with millions of long-lived alerts in memory, those collections took 13-26%
of ingest time. `aetherops serve` calls `settle_long_lived_state` once its state is loaded, and
`bench/correlation_engine.py` calls it after filling the window, so the benchmark measures the
engine as the server runs it.

Reference counting still frees everything that is not part of a cycle; only cyclic garbage waits
longer (or, for objects frozen at start-up, until `release_long_lived_state`).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "release_long_lived_state", "settle_long_lived_state"]

YOUNG_THRESHOLD = 50_000
"""Net allocations between young collections (CPython's default is 700)."""

_OLDER_THRESHOLDS = (20, 20)


def settle_long_lived_state() -> None:
    """Moves every object alive now out of the collector's sight and collects young objects less often."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *_OLDER_THRESHOLDS)


def release_long_lived_state() -> None:
    """Undoes `settle_long_lived_state` (for a process that drops its state and loads another)."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    gc.collect()
