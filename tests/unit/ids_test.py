"""Time-ordered ids: their shape, their order, and who makes them (the engine's clusters, the
server's tracking ids, the SDK's tracking ids)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from aetherops.clock import ManualClock
from aetherops.correlation import Alert, CorrelationEngine
from aetherops.ids import sortable_id
from aetherops.tracking import new_tracking_id
from clients.sdk._config import new_tracking_id as sdk_tracking_id

HEX32 = re.compile(r"^[0-9a-f]{32}$")
T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


def test_ids_are_32_hex_digits_that_sort_by_their_time() -> None:
    times = [T0 + timedelta(milliseconds=ms) for ms in (0, 1, 2, 1000, 86_400_000)]
    ids = [sortable_id(t) for t in times]
    assert all(HEX32.match(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0][:12] == f"{int(T0.timestamp() * 1000):012x}"
    assert sortable_id(T0.timestamp())[:12] == ids[0][:12]  # seconds since 1970 work too
    same = {sortable_id(T0) for _ in range(1000)}
    assert len(same) == 1000  # the random part keeps ids of one millisecond apart


def test_the_engine_names_clusters_in_the_order_of_its_clock() -> None:
    clock = ManualClock(T0)
    engine = CorrelationEngine(clock=clock)
    made = []
    for n in range(3):
        clock.set(T0 + timedelta(seconds=n))
        made.append(engine.ingest(Alert(f"a{n}", f"SAT-{n}", f"unit-{n}", 3, clock.now())))
    assert made == sorted(made) and all(HEX32.match(c) for c in made)
    assert made[2][:12] == f"{int((T0 + timedelta(seconds=2)).timestamp() * 1000):012x}"


def test_server_and_sdk_tracking_ids_are_time_ordered() -> None:
    for make in (new_tracking_id, sdk_tracking_id):
        first = make()
        later = [make() for _ in range(100)]
        assert HEX32.match(first) and all(first[:12] <= i[:12] for i in later)
        assert abs(int(first[:12], 16) / 1000 - datetime.now(UTC).timestamp()) < 60
