"""The delay before a message that failed (a full ingest queue, an unreachable database) is redelivered."""

from __future__ import annotations

from aetherops.bus import redelivery_delay


def test_each_refusal_doubles_the_delay_up_to_30_s() -> None:
    assert [redelivery_delay(0.5, n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert redelivery_delay(0.5, 0) == 0.5  # NATS said nothing: as for a first delivery


def test_twenty_deliveries_outlast_minutes_of_overload() -> None:
    assert 400 < sum(redelivery_delay(0.5, n) for n in range(1, 21)) < 480
