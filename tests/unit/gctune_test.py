"""The collector settings `aetherops serve` and the engine benchmark share."""

from __future__ import annotations

import gc

from aetherops.gctune import MIDDLE_THRESHOLD, YOUNG_THRESHOLD, release_long_lived_state, settle_long_lived_state


def test_settle_freezes_what_is_alive_and_release_undoes_it() -> None:
    before = gc.get_threshold()
    try:
        settle_long_lived_state()
        assert gc.get_threshold()[:2] == (YOUNG_THRESHOLD, MIDDLE_THRESHOLD)
        # A middle-generation collection walks the young survivors of up to this many allocations: its
        # pause. At 20 x 50,000 it stopped the server for 246 ms.
        assert YOUNG_THRESHOLD * MIDDLE_THRESHOLD <= 100_000
        # ... while full collections, which walk the whole heap, stay at most one per 400 young ones.
        assert gc.get_threshold()[1] * gc.get_threshold()[2] >= 400
        assert gc.get_freeze_count() > 0
        release_long_lived_state()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
