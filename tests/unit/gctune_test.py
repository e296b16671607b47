"""The collector settings `aetherops serve` and the engine benchmark share."""

from __future__ import annotations

import gc

from aetherops.gctune import YOUNG_THRESHOLD, release_long_lived_state, settle_long_lived_state


def test_settle_freezes_what_is_alive_and_release_undoes_it() -> None:
    before = gc.get_threshold()
    try:
        settle_long_lived_state()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
        release_long_lived_state()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
