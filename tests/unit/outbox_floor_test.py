"""The relay's scan floor: it passes only ids taken long enough ago, never an unpublished row it
found, and lets a search from the lowest id through every `full_scan_s`."""

from __future__ import annotations

from aetherops.db.outbox import ScanFloor


def test_the_floor_passes_only_ids_taken_more_than_the_lag_ago() -> None:
    floor = ScanFloor(lag_s=10.0, full_scan_s=60.0)
    assert floor.start(0.0) == 0  # a search from the lowest id first
    floor.mark(0.0, 100)  # ids up to 100 taken by t=0
    floor.claimed(None)
    assert floor.value == 1  # nothing is old enough yet: ids from 1 may still commit
    floor.mark(5.0, 250)
    floor.claimed(None)
    assert floor.value == 1
    floor.mark(10.0, 400)  # t=0 is now 10 s ago: ids up to 100 are settled
    floor.claimed(None)
    assert floor.value == 101
    floor.mark(16.0, 500)  # t=5 too: up to 250
    floor.claimed(None)
    assert (floor.start(16.0), floor.value) == (251, 251)


def test_the_floor_stops_at_the_lowest_unpublished_row_a_claim_found() -> None:
    floor = ScanFloor(lag_s=0.0, full_scan_s=60.0)
    floor.start(0.0)
    floor.mark(0.0, 1000)
    floor.claimed(420)  # row 420 is still to be published: the next claim must find it again
    assert floor.start(1.0) == 420
    floor.claimed(None)
    assert floor.value == 1001


def test_every_full_scan_interval_a_claim_searches_from_the_lowest_id() -> None:
    floor = ScanFloor(lag_s=0.0, full_scan_s=60.0)
    assert floor.start(0.0) == 0
    floor.mark(0.0, 50)
    floor.claimed(None)
    assert [floor.start(t) for t in (1.0, 59.0, 60.0, 61.0, 119.0, 120.0)] == [51, 51, 0, 51, 51, 0]


def test_the_sequence_is_read_about_once_a_second() -> None:
    floor = ScanFloor()
    assert floor.mark_due(0.0)
    floor.mark(0.0, 1)
    assert not floor.mark_due(0.5) and floor.mark_due(1.0)
