"""The forecast chart's series (`clients.cli.plot_series`), apart from matplotlib, and the PNG it draws."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clients.cli import _plot_forecast, plot_series
from gen.aetherops.capacity.v1 import capacity_pb2 as pb

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _forecast(**changes: object) -> pb.ExhaustionForecast:
    forecast = pb.ExhaustionForecast(
        satellite_id="SAT-9",
        resource_type=pb.RESOURCE_TYPE_FUEL,
        current_value=30.0,
        unit="kg",
        days_remaining=10.0,
        days_remaining_p10=8.0,
        days_remaining_p50=10.0,
        days_remaining_p90=13.0,
        risk_level=pb.RISK_LEVEL_CRITICAL,
        confidence=0.9,
        rate_per_day=2.5,
        scheduled_impact=5.0,
    )
    forecast.predicted_exhaustion_time.FromDatetime(NOW + timedelta(days=10))
    for name, value in changes.items():
        if value is None:
            forecast.ClearField(name)
        else:
            setattr(forecast, name, value)
    return forecast


def _history(days: int = 30) -> list[tuple[datetime, float]]:
    """Daily readings ending an hour before NOW, 2.5 kg a day down to the current 30 kg."""
    last = NOW - timedelta(hours=1)
    return [(last - timedelta(days=days - 1 - i), 30.0 + 2.5 * (days - 1 - i)) for i in range(days)]


def test_history_fitted_trend_missions_band_and_exhaustion() -> None:
    history = _history()
    series = plot_series(_forecast(), history, local_now=NOW + timedelta(minutes=3))
    assert series.history == history
    # The current value is the latest snapshot; "now" is the server's (exhaustion - days remaining).
    assert series.current == (history[-1][0], 30.0)
    assert series.now == NOW
    # The fitted trend spans the history and runs through the current value at the fitted rate.
    (t0, v0), (t1, v1) = series.trend
    assert t0 == history[0][0]
    assert v0 == pytest.approx(history[0][1])
    assert (v1 - v0) / ((t1 - t0).total_seconds() / 86400) == pytest.approx(-2.5)
    assert v1 == pytest.approx(0.0), "the trend stops where the resource runs out"
    # Missions bring exhaustion forward: the line from the current value reaches empty at the prediction.
    assert series.with_missions == [(history[-1][0], 30.0), (NOW + timedelta(days=10), 0.0)]
    assert series.exhaustion == NOW + timedelta(days=10) and series.level == 0.0
    assert series.band == (NOW + timedelta(days=8), NOW + timedelta(days=13))
    assert series.end > NOW + timedelta(days=13)


def test_without_history_the_current_value_sits_on_the_trend() -> None:
    series = plot_series(_forecast(), [], local_now=NOW)
    assert series.history == []
    current_at, value = series.current
    assert value == 30.0 and current_at <= NOW
    # (30 - 5 of missions) / 2.5 a day = 10 days before exhaustion: at NOW.
    assert current_at == NOW
    assert series.trend[0] == (current_at, 30.0)


def test_not_depleting_and_filling_resources() -> None:
    flat = plot_series(
        _forecast(
            days_remaining=None,
            days_remaining_p10=None,
            days_remaining_p50=None,
            days_remaining_p90=None,
            predicted_exhaustion_time=None,
            rate_per_day=0.0,
        ),
        _history(5),
        local_now=NOW,
    )
    assert flat.exhaustion is None and flat.band is None and flat.with_missions == []
    assert flat.now == NOW and flat.end == NOW + timedelta(days=30)
    storage = plot_series(_forecast(resource_type=pb.RESOURCE_TYPE_STORAGE, unit="%"), _history(3), local_now=NOW)
    (_, v0), (_, v1) = storage.trend
    assert storage.level == 100.0 and v1 > v0, "storage fills up towards its capacity"


def test_the_chart_is_a_png(tmp_path: Path) -> None:
    forecast = _forecast()
    out = tmp_path / "charts" / "fuel.png"
    _plot_forecast(plot_series(forecast, _history(), local_now=NOW), forecast, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") >= 600


def test_missions_are_drawn_where_they_happen(tmp_path: Path) -> None:
    from clients.cli import MissionSpan

    burn = MissionSpan("BURN-1", NOW + timedelta(days=3), NOW + timedelta(days=3, hours=12), 5.0)
    past = MissionSpan("OLD", NOW - timedelta(days=400), NOW - timedelta(days=399), 9.0)  # before the chart
    series = plot_series(_forecast(), _history(), local_now=NOW, missions=[burn, past])
    assert series.missions == [burn], "missions outside the chart's range are left out"
    # The line with missions follows the trend until the burn, takes its 5 kg during the burn's window,
    # then goes on to the predicted exhaustion.
    current_at = _history()[-1][0]
    before = 30.0 - 2.5 * (burn.start - current_at).total_seconds() / 86400
    after = 30.0 - 2.5 * (burn.end - current_at).total_seconds() / 86400 - 5.0
    assert series.with_missions[0] == (current_at, 30.0)
    assert series.with_missions[1][0] == burn.start and series.with_missions[1][1] == pytest.approx(before)
    assert series.with_missions[2][0] == burn.end and series.with_missions[2][1] == pytest.approx(after)
    assert series.with_missions[-1] == (NOW + timedelta(days=10), 0.0)
    out = tmp_path / "burn.png"
    _plot_forecast(series, _forecast(), out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") >= 600
