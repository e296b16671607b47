"""The store's lower bound of what an alert costs a response never exceeds what the response counts.

`repo.get_alerts` cuts the rows it reads by that bound (`ALERT_BYTES_FLOOR` plus the bytes of the
ids, subsystem and message); `servers.correlation.cluster_to_proto` spends the response's budget by
the encoded size. A bound above the cost would read fewer alerts than a response can show.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aetherops.correlation import Alert
from aetherops.db.correlation import ALERT_BYTES_FLOOR, ClusterRecord
from aetherops.text import utf8_len
from servers.correlation import AlertBudget, cluster_to_proto

T = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _bound(a: Alert) -> int:
    return sum(map(utf8_len, (a.alert_id, a.satellite_id, a.subsystem, a.message))) + ALERT_BYTES_FLOOR


@pytest.mark.parametrize(
    "alert",
    [
        Alert("a", "s", "p", 1, datetime(1970, 1, 1, tzinfo=UTC)),  # the smallest there is
        Alert("a1", "SAT-1", "power", 5, T, message="bus undervoltage", labels={"k": "v"}, tracking_id="t"),
        Alert("ä" * 40, "衛星-7", "熱", 3, T, message="温度が高い" * 20),
    ],
)
def test_the_stores_bound_is_never_above_what_a_response_counts(alert: Alert) -> None:
    record = ClusterRecord("c", "OPEN", None, 0.0, [], [], 1, T, T, T, 1, 0, alerts=[alert])
    budget = AlertBudget(1 << 20)
    before = budget.remaining
    shown = cluster_to_proto(record, budget)
    assert len(shown.alerts) == 1
    assert before - budget.remaining >= _bound(alert)
