"""Unit tests of the correlation core (aetherops/correlation.py) and the dependency graph (aetherops/subsystems.py)."""

from __future__ import annotations

import gc
import itertools
import json
import math
import pickle
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from aetherops.clock import ManualClock
from aetherops.correlation import (
    _SWEEP_BUDGET,
    DEPENDENCY_WEIGHT,
    SEVERITY_WEIGHT,
    TIME_WEIGHT,
    Acknowledgement,
    Alert,
    ClusterStatus,
    CorrelationEngine,
    IncidentCluster,
    IngestResult,
    Labels,
    alert_size,
    validate_alert,
)
from aetherops.errors import AlreadyExistsError, ConfigError, NotFoundError, ValidationError
from aetherops.subsystems import (
    DEFAULT_DEPENDENCY_GRAPH,
    DependencyGraph,
    Edge,
    load_dependency_graph,
    parse_dependency_graph,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


_ids = itertools.count()


def alert(sat: str, subsystem: str, t: float, severity: int = 3, alert_id: str | None = None, **kw: object) -> Alert:
    return Alert(
        alert_id=alert_id or f"a{next(_ids)}",
        satellite_id=sat,
        subsystem=subsystem,
        severity=severity,
        timestamp=at(t),
        **kw,  # type: ignore[arg-type]
    )


def make_engine(now: float = 0.0, first_id: int = 1, **kw: object) -> tuple[CorrelationEngine, ManualClock]:
    clock = ManualClock(at(now))
    counter = itertools.count(first_id)
    engine = CorrelationEngine(clock=clock, id_factory=lambda: f"C{next(counter)}", **kw)  # type: ignore[arg-type]
    return engine, clock


def feed(engine: CorrelationEngine, clock: ManualClock, *alerts: Alert) -> list[str]:
    """Ingests in order, moving the clock to each alert's time (never backwards)."""
    out = []
    for a in alerts:
        if a.timestamp > clock.now():
            clock.set(a.timestamp)
        out.append(engine.ingest(a))
    return out


# ---- grouping ------------------------------------------------------------------------------


def test_related_alerts_within_the_window_group() -> None:
    engine, clock = make_engine()
    ids = feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 200))
    assert ids == ["C1", "C1"]
    assert [a.subsystem for a in engine.require_cluster("C1").alerts] == ["power", "thermal"]


def test_alerts_outside_the_window_start_a_new_cluster() -> None:
    engine, clock = make_engine()
    ids = feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 301))
    assert ids == ["C1", "C2"]
    # the gap is measured to the cluster's alerts, so a third alert near the second joins the second
    assert feed(engine, clock, alert("SAT-1", "propulsion", 350)) == ["C2"]


def test_a_batch_downlinked_after_a_pass_correlates_as_it_would_have_live() -> None:
    # SAT-1 was out of contact for two hours: its power fault and the fallout come down together at
    # the next pass, long after the window. They are one incident, with the power alert the root, as
    # they would have been live (each used to open an incident of its own).
    engine, clock = make_engine(now=7200)
    batch = [alert("SAT-1", "thermal", 0), alert("SAT-1", "power", 5, severity=5), alert("SAT-1", "propulsion", 20)]
    ids = [engine.ingest(batch[0]), engine.ingest(batch[1])]
    clock.advance(250)  # the pass goes on past sweeps: the batch's incident stays for the rest of it
    engine.ingest(alert("SAT-9", "comms", 7450))  # a live alert elsewhere moves the sweep on
    ids.append(engine.ingest(batch[2]))
    assert ids == ["C1", "C1", "C1"]
    assert engine.identify_root_cause("C1") == batch[1].alert_id
    # Not active (its alerts are two hours old), and never joined by what happens now.
    assert [c.cluster_id for c in engine.get_active_clusters()] == ["C2"]
    assert engine.ingest(alert("SAT-1", "thermal", 7455)) == "C3"
    # A window after the batch's last arrival it leaves memory like any other.
    clock.advance(301)
    assert "C1" in engine.expire()


def test_window_is_configurable() -> None:
    engine, clock = make_engine(time_window_s=60)
    assert feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 61)) == ["C1", "C2"]


def test_power_cascade_on_one_satellite_is_one_cluster_with_power_as_root() -> None:
    engine, clock = make_engine()
    power = alert("SAT-1", "power", 0, severity=4)
    thermal = alert("SAT-1", "thermal", 90)
    propulsion = alert("SAT-1", "propulsion", 240)
    assert set(feed(engine, clock, power, thermal, propulsion)) == {"C1"}
    assert engine.identify_root_cause("C1") == power.alert_id
    cluster = engine.require_cluster("C1")
    assert cluster.subsystems == ["power", "propulsion", "thermal"]
    assert cluster.max_severity == 4
    assert engine.root_cause_confidence("C1") == pytest.approx(1.0)


def test_unrelated_faults_on_different_satellites_stay_separate_even_simultaneously() -> None:
    engine, clock = make_engine()
    ids = feed(engine, clock, alert("SAT-1", "payload", 0, severity=5), alert("SAT-7", "comms", 0, severity=5))
    assert ids == ["C1", "C2"]
    assert len(engine.get_active_clusters()) == 2


def test_same_subsystem_on_several_satellites_is_one_multi_satellite_cluster() -> None:
    engine, clock = make_engine()
    ids = feed(
        engine,
        clock,
        alert("SAT-3", "power", 0),
        alert("SAT-1", "power", 60),
        alert("SAT-2", "EPS", 150),  # alias of power
    )
    assert set(ids) == {"C1"}
    cluster = engine.require_cluster("C1")
    assert cluster.is_multi_satellite()
    assert cluster.satellites == ["SAT-1", "SAT-2", "SAT-3"]
    assert cluster.subsystems == ["power"]


def test_power_failure_cascading_over_three_satellites() -> None:
    engine, clock = make_engine()
    alerts = []
    for k, sat in enumerate(("SAT-1", "SAT-2", "SAT-3")):
        alerts += [alert(sat, "power", 10 * k, severity=4), alert(sat, "thermal", 60 + 10 * k)]
    alerts.append(alert("SAT-2", "propulsion", 120))
    ids = feed(engine, clock, *alerts)
    assert set(ids) == {"C1"}
    assert engine.identify_root_cause("C1") == alerts[0].alert_id


def test_single_satellite_cluster_is_not_multi_satellite() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 10))
    assert not engine.require_cluster("C1").is_multi_satellite()


def test_related_subsystem_on_another_satellite_joins() -> None:
    engine, clock = make_engine()
    assert feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-2", "thermal", 30)) == ["C1", "C1"]


def test_weakly_related_subsystems_on_different_satellites_do_not_join() -> None:
    # thermal -> adcs is 0.4: across satellites 0.16 + time + severity stays below 0.5
    engine, clock = make_engine()
    ids = feed(engine, clock, alert("SAT-1", "thermal", 0, severity=1), alert("SAT-2", "adcs", 0, severity=1))
    assert ids == ["C1", "C2"]


def test_unknown_subsystems_correlate_only_by_time_and_satellite() -> None:
    engine, clock = make_engine()
    ids = feed(
        engine,
        clock,
        alert("SAT-1", "star_tracker", 0),
        alert("SAT-1", "gyro", 30),  # same satellite, close in time: joins
        alert("SAT-2", "star_tracker", 30),  # another satellite: time alone is not enough
        alert("SAT-1", "magnetometer", 290),  # same satellite but too far from the others
    )
    assert ids == ["C1", "C1", "C2", "C3"]
    assert engine.require_cluster("C1").subsystems == ["gyro", "star_tracker"]


def test_satellite_with_two_open_clusters_routes_late_alerts_to_the_nearer_one() -> None:
    engine, clock = make_engine()
    # unrelated units 200 s apart on one satellite: too far for time + satellite alone
    assert feed(engine, clock, alert("SAT-1", "gyro", 0), alert("SAT-1", "wheel", 200)) == ["C1", "C2"]
    assert engine.ingest(alert("SAT-1", "sun_sensor", 20)) == "C1"  # late, close to the gyro
    assert engine.ingest(alert("SAT-1", "magnetometer", 210)) == "C2"
    assert engine.ingest(alert("SAT-1", "sun_sensor", 215)) == "C2"  # 195 s after the C1 one: not a dup


def test_candidate_alerts_outside_the_window_do_not_count() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 250))
    clock.set(at(320))
    # comms@310 is 310 s from power@0 (ignored) but 60 s from thermal@250: it joins through that
    assert engine.ingest(alert("SAT-1", "comms", 310)) == "C1"
    assert engine.score_components(alert("SAT-1", "comms", 310), alert("SAT-1", "power", 0)).total == 0.0


def test_candidate_choice_prefers_best_scoring_cluster() -> None:
    engine, clock = make_engine()
    assert feed(engine, clock, alert("SAT-1", "payload", 0), alert("SAT-7", "comms", 0)) == ["C1", "C2"]
    # obc relates to both (obc -> payload, obc -> comms) enough to join either; on SAT-7 the
    # same-satellite bonus makes the comms cluster the better one
    assert feed(engine, clock, alert("SAT-7", "obc", 10)) == ["C2"]
    assert (
        engine.correlation_score(engine.require_cluster("C1").alerts[0], engine.require_cluster("C2").alerts[1]) >= 0.5
    )


# ---- scoring -------------------------------------------------------------------------------


def test_score_components_follow_the_documented_formula() -> None:
    engine, _ = make_engine()
    a, b = alert("SAT-1", "power", 0, severity=4), alert("SAT-1", "thermal", 120, severity=2)
    c = engine.score_components(a, b)
    assert c.time == pytest.approx(TIME_WEIGHT * (1 - 120 / 300))
    assert c.satellite == pytest.approx(0.3)
    assert c.dependency == pytest.approx(DEPENDENCY_WEIGHT * 0.9)
    assert c.severity == pytest.approx(SEVERITY_WEIGHT * 6 / 10)
    assert c.total == pytest.approx(c.time + c.satellite + c.dependency + c.severity)
    assert engine.correlation_score(a, b) == c.total
    assert engine.correlation_score(b, a) == pytest.approx(c.total)  # symmetric


def test_same_satellite_adds_exactly_the_bonus() -> None:
    engine, _ = make_engine()
    a = alert("SAT-1", "payload", 0)
    same, other = alert("SAT-1", "comms", 60), alert("SAT-2", "comms", 60)
    assert engine.correlation_score(a, same) - engine.correlation_score(a, other) == pytest.approx(0.3)
    engine2, _ = make_engine(same_satellite_bonus=0.1)
    assert engine2.correlation_score(a, same) - engine2.correlation_score(a, other) == pytest.approx(0.1)


def test_score_is_zero_outside_the_window_and_clamped_to_one() -> None:
    engine, _ = make_engine()
    a = alert("SAT-1", "power", 0, severity=5)
    far = engine.score_components(a, alert("SAT-1", "power", 300, severity=5))
    assert far.time == 0.0 and far.total == 0.0 and far.satellite == pytest.approx(0.3)
    close = engine.score_components(a, alert("SAT-1", "power", 0, severity=5))
    assert close.total == 1.0  # 0.3 + 0.3 + 0.4 + 0.1 clamped


def test_time_component_decays_linearly() -> None:
    engine, _ = make_engine()
    a = alert("SAT-1", "x", 0)
    times = [engine.score_components(a, alert("SAT-1", "x", t)).time for t in (0, 75, 150, 225)]
    assert times == pytest.approx([0.3, 0.225, 0.15, 0.075])


def test_dependency_component_is_symmetric_and_zero_for_unknown_subsystems() -> None:
    engine, _ = make_engine()
    power, thermal = alert("SAT-1", "Power", 0), alert("SAT-2", "THERMAL", 0)
    assert engine.score_components(power, thermal).dependency == pytest.approx(0.36)
    assert engine.score_components(thermal, power).dependency == pytest.approx(0.36)
    assert engine.score_components(power, alert("SAT-2", "eps", 0)).dependency == pytest.approx(0.4)
    mystery = alert("SAT-2", "mystery", 0)
    assert engine.score_components(power, mystery).dependency == 0.0
    assert engine.score_components(mystery, alert("SAT-3", "mystery", 0)).dependency == 0.0
    # payload and comms are unrelated in the default graph
    assert engine.score_components(alert("SAT-1", "payload", 0), alert("SAT-7", "comms", 0)).dependency == 0.0


# ---- root cause ----------------------------------------------------------------------------


def test_root_cause_is_upstream_power_not_an_earlier_minor_unrelated_alert() -> None:
    engine, clock = make_engine()
    minor = alert("SAT-1", "star_tracker", 0, severity=1)
    power = alert("SAT-1", "power", 20, severity=4)
    thermal1 = alert("SAT-1", "thermal", 50)
    thermal2 = alert("SAT-1", "propulsion", 80)
    assert set(feed(engine, clock, minor, power, thermal1, thermal2)) == {"C1"}
    assert engine.identify_root_cause("C1") == power.alert_id
    cluster = engine.require_cluster("C1")
    assert cluster.root_cause_alert() == power
    # power explains 2 of the 3 other subsystems and is not the earliest alert
    assert cluster.root_cause_confidence == pytest.approx(0.25 + 0.55 * 2 / 3, abs=1e-4)


def test_root_cause_of_a_cluster_without_causal_links_is_the_earliest_alert() -> None:
    engine, clock = make_engine()
    first = alert("SAT-1", "thermal", 0)
    feed(engine, clock, first, alert("SAT-2", "thermal", 30), alert("SAT-3", "thermal", 60))
    assert engine.identify_root_cause("C1") == first.alert_id
    assert engine.root_cause_confidence("C1") == 0.5


def test_root_cause_ties_go_to_the_earlier_then_more_severe_alert() -> None:
    engine, clock = make_engine()
    a = alert("SAT-1", "gyro", 10, severity=2, alert_id="a-late")
    b = alert("SAT-1", "wheel", 10, severity=4, alert_id="b-severe")
    c = alert("SAT-1", "sun_sensor", 5, severity=1, alert_id="c-early")
    feed(engine, clock, a, b)
    assert engine.identify_root_cause("C1") == "b-severe"
    feed(engine, clock, c)
    assert engine.identify_root_cause("C1") == "c-early"
    assert engine.root_cause_confidence("C1") == pytest.approx(0.45)


def test_ingest_reports_root_cause_changes() -> None:
    engine, clock = make_engine()
    clock.set(at(100))
    r1 = engine.ingest_detailed(alert("SAT-1", "thermal", 10))
    r2 = engine.ingest_detailed(alert("SAT-1", "propulsion", 20))
    power = alert("SAT-1", "power", 30)
    r3 = engine.ingest_detailed(power)
    r4 = engine.ingest_detailed(alert("SAT-1", "obc", 40))
    assert r1.opened and not r1.root_cause_changed
    assert not r2.opened and not r2.root_cause_changed  # thermal is upstream of propulsion
    assert r3.root_cause_changed and engine.identify_root_cause("C1") == power.alert_id
    assert not r4.root_cause_changed


def test_ingest_says_when_the_incident_gains_a_satellite_or_subsystem() -> None:
    engine, clock = make_engine()
    clock.set(at(200))
    opened = engine.ingest_detailed(alert("SAT-2", "power", 0))
    again = engine.ingest_detailed(alert("SAT-2", "EPS", 90))  # the same subsystem, past the dedupe window
    new_subsystem = engine.ingest_detailed(alert("SAT-2", "thermal", 100))
    new_satellite = engine.ingest_detailed(alert("SAT-1", "thermal", 110))
    known_pair = engine.ingest_detailed(alert("SAT-1", "power", 120))  # both already in the incident
    dup = engine.ingest_detailed(alert("SAT-1", "power", 130))
    assert {r.cluster_id for r in (opened, again, new_subsystem, new_satellite, known_pair, dup)} == {"C1"}
    assert opened.membership_changed and new_subsystem.membership_changed and new_satellite.membership_changed
    assert not again.membership_changed and not known_pair.membership_changed
    assert dup.duplicate and not dup.membership_changed
    cluster = engine.require_cluster("C1")
    assert cluster.satellites == ["SAT-1", "SAT-2"] and cluster.subsystems == ["power", "thermal"]


def test_satellites_stay_sorted_as_they_grow_and_callers_get_their_own_list() -> None:
    engine, clock = make_engine(now=100)
    feed(engine, clock, alert("SAT-5", "power", 0))
    listed = engine.require_cluster("C1").satellites
    listed.append("not a satellite")
    feed(engine, clock, alert("SAT-9", "thermal", 10), alert("SAT-0", "propulsion", 20))
    assert engine.require_cluster("C1").satellites == ["SAT-0", "SAT-5", "SAT-9"]


def test_late_power_alert_takes_over_the_root_cause() -> None:
    engine, clock = make_engine(now=200)
    feed(engine, clock, alert("SAT-1", "thermal", 100), alert("SAT-1", "payload", 120))
    late_power = alert("SAT-1", "power", 50)
    result = engine.ingest_detailed(late_power)
    assert result.cluster_id == "C1" and result.root_cause_changed
    assert engine.identify_root_cause("C1") == late_power.alert_id
    assert engine.root_cause_confidence("C1") == pytest.approx(1.0)


def test_root_cause_of_unknown_cluster_is_none() -> None:
    engine, _ = make_engine()
    assert engine.identify_root_cause("nope") is None
    assert engine.root_cause_confidence("nope") == 0.0


# ---- deduplication -------------------------------------------------------------------------


def test_same_satellite_and_subsystem_within_a_minute_is_a_duplicate() -> None:
    engine, clock = make_engine()
    first = alert("SAT-1", "power", 0)
    feed(engine, clock, first)
    clock.set(at(45))
    dup = engine.ingest_detailed(alert("SAT-1", "EPS", 45))
    assert dup == IngestResult("C1", duplicate=True, duplicate_of=first.alert_id)
    cluster = engine.require_cluster("C1")
    assert cluster.alerts == [first] and cluster.duplicate_count == 1
    assert engine.stats.duplicates == 1


def test_dedupe_window_is_measured_from_the_last_kept_alert() -> None:
    engine, clock = make_engine()
    results = []
    for t in (0, 50, 61, 100, 122):
        clock.set(at(t))
        results.append(engine.ingest_detailed(alert("SAT-1", "thermal", t)).duplicate)
    assert results == [False, True, False, True, False]
    assert len(engine.require_cluster("C1").alerts) == 3


def test_an_escalation_within_the_dedupe_window_is_kept_and_raises_the_severity() -> None:
    engine, clock = make_engine()
    first = alert("SAT-1", "power", 0, severity=4)
    feed(engine, clock, first)
    clock.set(at(10))
    worse = alert("SAT-1", "EPS", 10, severity=5)
    escalated = engine.ingest_detailed(worse)
    assert escalated == IngestResult("C1", escalated_from=4)  # kept in the incident, not counted as a duplicate
    cluster = engine.require_cluster("C1")
    assert cluster.alerts == [first, worse] and cluster.max_severity == 5 and cluster.duplicate_count == 0
    # The escalated alert is the reference now: a repeat at its severity, or lower, is a duplicate.
    clock.set(at(20))
    assert engine.ingest_detailed(alert("SAT-1", "power", 20, severity=5)).duplicate_of == worse.alert_id
    assert engine.ingest_detailed(alert("SAT-1", "power", 25, severity=3)).duplicate_of == worse.alert_id


def test_a_late_escalation_is_kept_and_a_late_repeat_of_no_higher_severity_is_not() -> None:
    engine, clock = make_engine(now=300)
    first = alert("SAT-1", "power", 0, severity=3)
    feed(engine, clock, first, alert("SAT-1", "power", 100, severity=3), alert("SAT-1", "thermal", 110))
    assert engine.ingest_detailed(alert("SAT-1", "power", 20, severity=2)).duplicate_of == first.alert_id
    late = engine.ingest_detailed(alert("SAT-1", "power", 20, severity=4))
    assert not late.duplicate and late.cluster_id == "C1"
    assert engine.require_cluster("C1").max_severity == 4


def test_other_satellite_or_subsystem_is_not_a_duplicate() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    assert not engine.ingest_detailed(alert("SAT-2", "power", 10)).duplicate
    assert not engine.ingest_detailed(alert("SAT-1", "thermal", 10)).duplicate


def test_late_alert_within_the_dedupe_window_of_an_earlier_one_is_a_duplicate() -> None:
    engine, clock = make_engine(now=300)
    first = alert("SAT-1", "power", 0)
    feed(engine, clock, first, alert("SAT-1", "power", 100), alert("SAT-1", "thermal", 110))
    late = engine.ingest_detailed(alert("SAT-1", "power", 20))
    assert late.duplicate and late.duplicate_of == first.alert_id


def test_deduplicate_alerts() -> None:
    engine, _ = make_engine()
    a = alert("SAT-1", "power", 0)
    b = alert("SAT-1", "power", 59)  # dup of a
    c = alert("SAT-1", "power", 61)  # kept: 61 s after the last kept one
    d = alert("SAT-2", "power", 10)
    e = alert("SAT-1", "eps", 90)  # alias, dup of c
    f = alert("SAT-1", "power", 100, severity=5)  # an escalation within c's minute: kept
    g = alert("SAT-1", "power", 110, severity=4)  # dup of f
    kept = engine.deduplicate_alerts([c, e, g, b, f, d, a, a])
    assert kept == [a, d, c, f]


def test_duplicate_names_the_right_alert_among_simultaneous_ones() -> None:
    engine, clock = make_engine()
    power, thermal = alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 0)
    feed(engine, clock, power, thermal)
    assert engine.ingest_detailed(alert("SAT-1", "thermal", 10)).duplicate_of == thermal.alert_id


def test_a_storm_of_duplicates_costs_the_service_engine_no_memory() -> None:
    # The service leaves replays to PostgreSQL (remember_alert_ids=False); its engine kept a pair per
    # duplicate anyway, 145 bytes each, for as long as the incident stayed active.
    engine, clock = make_engine(remember_alert_ids=False)
    feed(engine, clock, alert("SAT-1", "power", 0))
    storm = [alert("SAT-1", "power", 1 + i / 1000, alert_id=f"{i:032x}") for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for a in storm:
            engine.ingest(a)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert engine.require_cluster("C1").duplicate_count == 20_000
    assert kept / 20_000 < 16, f"{kept / 20_000:.0f} bytes kept per duplicate"


def test_expiry_forgets_duplicates_too() -> None:
    engine, clock = make_engine()
    dup = alert("SAT-1", "power", 10)
    feed(engine, clock, alert("SAT-1", "power", 0), dup)
    assert engine.expire(at(400)) == ["C1"]
    clock.set(at(400))
    assert engine.ingest_detailed(dup).opened


# ---- late arrival, closing, idempotency ----------------------------------------------------


def test_late_out_of_order_alert_lands_in_the_right_cluster() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-7", "gyro", 100), alert("SAT-1", "propulsion", 200))
    clock.set(at(260))
    late = alert("SAT-1", "thermal", 30)
    assert engine.ingest(late) == "C1"
    cluster = engine.require_cluster("C1")
    assert [a.subsystem for a in cluster.alerts] == ["power", "thermal", "propulsion"]
    assert engine.ingest(alert("SAT-7", "wheel", 90)) == "C2"


def test_late_alert_earlier_than_everything_moves_first_alert_time() -> None:
    engine, clock = make_engine(now=300)
    feed(engine, clock, alert("SAT-1", "thermal", 200))
    engine.ingest(alert("SAT-1", "thermal", 100))
    cluster = engine.require_cluster("C1")
    assert cluster.first_alert_time == at(100) and cluster.last_alert_time == at(200)
    assert cluster.duration_seconds() == 100.0


def test_late_alert_scores_against_a_subsystems_first_alert() -> None:
    engine, clock = make_engine()
    # SAT-2 power spans 0..250; a late thermal alert at 10 on SAT-3 is close to the first one only
    feed(engine, clock, alert("SAT-2", "power", 0), alert("SAT-2", "power", 250))
    clock.set(at(260))
    assert engine.ingest(alert("SAT-3", "thermal", 10)) == "C1"


def test_duration_is_from_earliest_to_latest_alert() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 75.5), alert("SAT-1", "comms", 180))
    cluster = engine.require_cluster("C1")
    assert cluster.duration_seconds() == 180.0
    single, _ = make_engine()
    single.ingest(alert("SAT-9", "power", 0))
    assert single.require_cluster("C1").duration_seconds() == 0.0


def test_an_alert_never_joins_a_closed_cluster() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    clock.set(at(10))
    assert engine.close_cluster("C1") is True
    assert engine.close_cluster("C1") is False
    assert engine.close_cluster("missing") is False
    closed = engine.require_cluster("C1")
    assert closed.status is ClusterStatus.CLOSED and closed.closed_time == at(10)
    # related, and even a would-be duplicate of the closed cluster's alert: a new cluster opens
    result = engine.ingest_detailed(alert("SAT-1", "power", 20))
    assert result.cluster_id == "C2" and result.opened and not result.duplicate
    assert engine.ingest(alert("SAT-1", "thermal", 30)) == "C2"
    assert [c.cluster_id for c in engine.get_active_clusters()] == ["C2"]
    assert engine.active_count() == 1 and engine.stats.clusters_in_memory == 2  # C1 is closed


def test_an_acknowledged_cluster_keeps_correlating_and_is_acknowledged_once() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    ack = Acknowledgement(by="ops-jane", time=at(5), note="switching to the backup bus")
    assert engine.acknowledge_cluster("C1", ack) is True
    assert engine.acknowledge_cluster("C1", Acknowledgement(by="ops-joe", time=at(6))) is False
    assert engine.acknowledge_cluster("missing", ack) is False
    assert engine.require_cluster("C1").acknowledgement == ack
    # A shift handover replaces it.
    handover = Acknowledgement(by="ops-kim", time=at(7), note="night shift has it")
    assert engine.acknowledge_cluster("C1", handover, take_over=True) is True
    assert engine.require_cluster("C1").acknowledgement == handover
    # Still the incident its related alerts join; the acknowledgement stays.
    feed(engine, clock, alert("SAT-1", "thermal", 30))
    cluster = engine.require_cluster("C1")
    assert cluster.alert_count == 2 and cluster.acknowledgement == handover
    single, _ = make_engine()
    single.ingest(alert("SAT-9", "power", 0))
    single.close_cluster("C1")
    assert single.acknowledge_cluster("C1", ack) is False  # closed: nobody needs to work on it


def test_re_ingesting_an_alert_id_is_idempotent() -> None:
    engine, clock = make_engine()
    a = alert("SAT-1", "power", 0)
    feed(engine, clock, a, alert("SAT-1", "thermal", 10))
    before = list(engine.require_cluster("C1").alerts)
    clock.advance(100)
    again = engine.ingest_detailed(a)
    assert again == IngestResult("C1", replay=True)
    # even with different content: the alert id decides
    assert engine.ingest(alert("SAT-5", "payload", 200, alert_id=a.alert_id)) == "C1"
    assert engine.require_cluster("C1").alerts == before
    assert engine.stats.opened == 1


def test_replayed_duplicate_repeats_its_first_outcome() -> None:
    engine, clock = make_engine()
    first = alert("SAT-1", "power", 0)
    dup = alert("SAT-1", "power", 5)
    feed(engine, clock, first, dup)
    assert engine.ingest_detailed(dup) == IngestResult("C1", duplicate=True, duplicate_of=first.alert_id, replay=True)
    assert engine.require_cluster("C1").duplicate_count == 1


def test_an_engine_that_leaves_replays_to_its_store_correlates_a_repeated_id_again() -> None:
    # The service's configuration: PostgreSQL answers replays before the engine sees them.
    engine, clock = make_engine(remember_alert_ids=False)
    a = alert("SAT-1", "power", 0)
    feed(engine, clock, a, alert("SAT-1", "thermal", 10))
    clock.advance(100)
    again = engine.ingest_detailed(a)
    assert not again.replay and again.duplicate and again.cluster_id == "C1"
    # a reused id with other content is correlated as the alert it is
    assert engine.ingest_detailed(alert("SAT-5", "payload", 200, alert_id=a.alert_id)).opened
    clock.advance(1000)
    assert engine.expire() == ["C1", "C2"]


# ---- queries -------------------------------------------------------------------------------


def test_active_clusters_are_those_within_the_window_of_the_clock() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "payload", 0), alert("SAT-7", "comms", 100))
    assert [c.cluster_id for c in engine.get_active_clusters()] == ["C1", "C2"]
    clock.set(at(350))
    assert [c.cluster_id for c in engine.get_active_clusters()] == ["C2"]
    assert engine.active_count() == 1  # C1 is past the window, though still in memory
    clock.set(at(401))
    assert engine.get_active_clusters() == []


def test_get_and_require_cluster() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    assert engine.get_cluster("C1") is engine.require_cluster("C1")
    assert engine.get_cluster("nope") is None
    with pytest.raises(NotFoundError):
        engine.require_cluster("nope")


def test_cluster_times() -> None:
    engine, clock = make_engine(now=5)
    feed(engine, clock, alert("SAT-1", "power", 0))
    clock.set(at(42))
    engine.ingest(alert("SAT-1", "thermal", 40))
    c = engine.require_cluster("C1")
    assert c.opened_time == at(5)
    assert (c.first_alert_time, c.last_alert_time) == (at(0), at(40))
    assert c.status is ClusterStatus.OPEN and c.closed_time is None
    assert c.alert_count == 2


# ---- restart -------------------------------------------------------------------------------


def _persisted(cluster: IncidentCluster) -> IncidentCluster:
    """What the service would load back from PostgreSQL: a fresh object built from stored fields."""
    return IncidentCluster.restore(
        cluster_id=cluster.cluster_id,
        alerts=list(reversed(cluster.alerts)),
        root_cause=cluster.root_cause,
        opened_time=cluster.opened_time,
        duplicate_count=cluster.duplicate_count,
        status=cluster.status,
        closed_time=cluster.closed_time,
        root_cause_confidence=cluster.root_cause_confidence,
        late_arrival_time=cluster.late_arrival_time,
    )


def test_a_downlinked_batch_cut_by_a_restart_rejoins_its_cluster() -> None:
    engine, clock = make_engine(now=7200)
    batch = [alert("SAT-1", "power", 0, severity=5), alert("SAT-1", "thermal", 10), alert("SAT-1", "propulsion", 20)]
    engine.ingest(batch[0])
    clock.advance(200)
    engine.ingest(batch[1])
    cluster = engine.require_cluster("C1")
    assert cluster.late_arrival_time == at(7400)  # the arrival of the batch's latest alert
    assert engine.get_active_clusters() == []  # two hours old: in memory for its batch only

    restarted, clock2 = make_engine(now=7450, first_id=100)
    restarted.restore_cluster(_persisted(cluster))
    clock2.advance(200)  # past sweeps: it stays for a window after that arrival, as before the restart
    restarted.ingest(alert("SAT-9", "comms", 7650))
    assert restarted.ingest(batch[2]) == "C1"
    assert restarted.require_cluster("C1").late_arrival_time == at(7650)
    clock2.advance(301)
    assert "C1" in restarted.expire()
    live = make_engine()[0]  # an alert that comes in time is no late arrival
    live.ingest(alert("SAT-1", "power", 0))
    assert live.require_cluster("C1").late_arrival_time is None


def test_restore_after_restart_joins_the_same_cluster() -> None:
    engine, clock = make_engine()
    power = alert("SAT-1", "power", 0, severity=4)
    feed(engine, clock, power, alert("SAT-2", "power", 20), alert("SAT-1", "thermal", 40))
    engine.ingest(alert("SAT-1", "thermal", 60))  # a duplicate
    feed(engine, clock, alert("SAT-9", "star_tracker", 50))
    saved = [_persisted(c) for c in engine.get_active_clusters()]
    original = engine.require_cluster("C1")

    restarted, clock2 = make_engine(now=60, first_id=100)
    for c in saved:
        restarted.restore_cluster(c)
    again = restarted.require_cluster("C1")
    assert again.root_cause == power.alert_id and again.root_cause_confidence == original.root_cause_confidence
    assert again.satellites == ["SAT-1", "SAT-2"] and again.duplicate_count == 1
    assert again.opened_time == original.opened_time
    clock2.set(at(100))
    # the next alerts behave exactly as they would have without the restart
    assert restarted.ingest(alert("SAT-3", "power", 100)) == "C1"
    assert restarted.ingest_detailed(alert("SAT-1", "thermal", 90)).duplicate
    assert restarted.ingest(power) == "C1"  # replay of a restored alert
    assert restarted.ingest(alert("SAT-9", "gyro", 150)) == "C2"
    assert restarted.ingest(alert("SAT-4", "comms", 400)) == "C100"


def test_restored_closed_cluster_is_kept_but_never_joined() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    engine.close_cluster("C1")
    saved = _persisted(engine.require_cluster("C1"))
    restarted, clock2 = make_engine(now=10, first_id=100)
    restarted.restore_cluster(saved)
    assert restarted.require_cluster("C1").status is ClusterStatus.CLOSED
    assert restarted.close_cluster("C1") is False
    assert restarted.ingest(alert("SAT-1", "thermal", 10)) == "C100"
    clock2.set(at(1000))
    assert sorted(restarted.expire()) == ["C1", "C100"]
    assert restarted.get_cluster("C1") is None


def test_restore_rejects_conflicts_and_empty_clusters() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0, alert_id="p"))
    saved = _persisted(engine.require_cluster("C1"))
    with pytest.raises(AlreadyExistsError):
        engine.restore_cluster(saved)
    clone = IncidentCluster.restore(cluster_id="other", alerts=saved.alerts)
    with pytest.raises(AlreadyExistsError):
        engine.restore_cluster(clone)  # its alert id is already known
    with pytest.raises(ValidationError):
        IncidentCluster.restore(cluster_id="empty", alerts=[])
    hollow = IncidentCluster.restore(cluster_id="hollow", alerts=saved.alerts)
    hollow.alerts = []
    with pytest.raises(ValidationError):
        engine.restore_cluster(hollow)


def test_restore_defaults_and_bare_cluster_properties() -> None:
    a = alert("SAT-2", "EPS", 10, severity=2)
    b = alert("SAT-1", "Thermal", 0, severity=5)
    c = IncidentCluster.restore(cluster_id="X", alerts=[a, b])
    assert c.alerts == [b, a]
    assert c.opened_time == b.timestamp
    assert c.satellites == ["SAT-1", "SAT-2"] and c.subsystems == ["eps", "thermal"]
    assert c.max_severity == 5 and c.duration_seconds() == 10.0 and c.is_multi_satellite()


def test_reset_forgets_everything() -> None:
    engine, clock = make_engine()
    a = alert("SAT-1", "power", 0)
    feed(engine, clock, a)
    engine.reset()
    assert engine.get_cluster("C1") is None
    assert engine.ingest(a) == "C2"


# ---- expiry --------------------------------------------------------------------------------


def test_a_long_incident_stays_in_memory_while_active_and_goes_exactly_a_window_after_its_last_alert() -> None:
    # Sweeps run as time passes; the incident outlives many of their buckets (75 s each by default).
    engine, clock = make_engine()
    for t in range(0, 1200, 50):
        feed(engine, clock, alert("SAT-1", "power" if t % 100 else "thermal", t))
        assert [c.cluster_id for c in engine.get_active_clusters()] == ["C1"]
        assert engine.stats.clusters_in_memory == 1
    feed(engine, clock, alert("SAT-2", "payload", 1400))  # another incident: ingest sweeps as well
    assert engine.expire(at(1150 + 299)) == []
    assert engine.get_cluster("C1") is not None
    assert engine.expire(at(1150 + 301)) == ["C1"]
    assert engine.stats.clusters_in_memory == 1 and engine.stats.expired == 1
    assert engine.expire(at(1400 + 301)) == ["C2"]
    assert engine.stats.clusters_in_memory == 0


def test_an_alert_that_raises_a_clusters_severity_says_from_what() -> None:
    engine, clock = make_engine()
    clock.set(at(30))
    opened = engine.ingest_detailed(alert("SAT-1", "thermal", 0, severity=2))
    assert opened.opened and opened.escalated_from == 0
    assert engine.ingest_detailed(alert("SAT-1", "power", 10, severity=2)).escalated_from == 0  # not higher
    assert engine.ingest_detailed(alert("SAT-1", "propulsion", 20, severity=4)).escalated_from == 2
    assert engine.ingest_detailed(alert("SAT-1", "adcs", 25, severity=3)).escalated_from == 0  # below the max
    escalation = engine.ingest_detailed(alert("SAT-1", "thermal", 30, severity=5))  # a repeat, but more severe
    assert not escalation.duplicate and escalation.escalated_from == 4


# ---- merging (an operator says two incidents are one) -------------------------------------


def _two_incidents() -> tuple[CorrelationEngine, ManualClock, Alert, Alert, Alert]:
    """C1: power on SAT-2 at 0 s and its duplicate at 30 s; C2: an unknown unit on SAT-1 at 100 s
    (time alone never correlates: the engine cannot know the power fault tripped it)."""
    engine, clock = make_engine()
    power, repeat, unit = alert("SAT-2", "power", 0), alert("SAT-2", "power", 30), alert("SAT-1", "star-tracker", 100)
    assert feed(engine, clock, power, repeat, unit) == ["C1", "C1", "C2"]
    return engine, clock, power, repeat, unit


def test_merged_holds_every_alert_and_ranks_the_root_cause_anew_without_changing_the_engine() -> None:
    engine, _, power, _, unit = _two_incidents()
    into, source = engine.require_cluster("C2"), engine.require_cluster("C1")
    merged = engine.merged(into, [source])
    assert merged.cluster_id == "C2" and merged.opened_time == into.opened_time
    assert [a.alert_id for a in merged.alerts] == [power.alert_id, unit.alert_id]
    assert merged.duplicate_count == 1 and merged.status is ClusterStatus.OPEN
    assert merged.satellites == ["SAT-1", "SAT-2"]
    assert merged.root_cause == power.alert_id  # earlier, and explained by nothing: C2's root was the unit
    # Nothing changed yet: the change is the store's to commit first.
    assert engine.require_cluster("C2").root_cause == unit.alert_id
    assert [a.alert_id for a in engine.require_cluster("C2").alerts] == [unit.alert_id]
    assert engine.get_cluster("C1") is source


def test_merged_keeps_the_targets_acknowledgement_or_else_takes_the_earliest_of_its_sources() -> None:
    engine, clock, *_ = _two_incidents()
    feed(engine, clock, alert("SAT-3", "star-tracker", 110))  # C3, another unknown unit
    into, sources = engine.require_cluster("C2"), [engine.require_cluster("C1"), engine.require_cluster("C3")]
    assert engine.merged(into, sources).acknowledgement is None  # nobody acknowledged any
    later, earlier = Acknowledgement(by="ops-kim", time=at(150)), Acknowledgement(by="ops-joe", time=at(120))
    assert engine.acknowledge_cluster("C1", later) and engine.acknowledge_cluster("C3", earlier)
    assert engine.merged(into, sources).acknowledgement == earlier  # someone already works on it
    own = Acknowledgement(by="ops-ann", time=at(200), note="the target's own")
    assert engine.acknowledge_cluster("C2", own)
    assert engine.merged(into, sources).acknowledgement == own


def test_a_merged_cluster_takes_its_sources_place_and_later_alerts_join_it() -> None:
    engine, clock, power, repeat, _ = _two_incidents()
    merged = engine.merged(engine.require_cluster("C2"), [engine.require_cluster("C1")])
    engine.replace_merged(merged, ["C1"])
    assert engine.get_cluster("C1") is None and engine.require_cluster("C2") is merged
    # Resends of the source's alerts (and of its duplicate) answer with the cluster they are in now.
    assert engine.ingest(power) == "C2" and engine.ingest(repeat) == "C2"
    # A cascade on the source's satellite joins the merged incident.
    assert feed(engine, clock, alert("SAT-2", "thermal", 120)) == ["C2"]
    assert len(merged.alerts) == 3 and engine.identify_root_cause("C2") == power.alert_id


def test_the_sweep_passes_over_the_clusters_a_merge_replaced() -> None:
    engine, clock, *_ = _two_incidents()
    merged = engine.merged(engine.require_cluster("C2"), [engine.require_cluster("C1")])
    engine.replace_merged(merged, ["C1"])
    feed(engine, clock, alert("SAT-2", "thermal", 120))
    # The replaced objects stay filed under their old expiry; meeting them there frees nothing.
    assert engine.expire(at(401)) == []
    assert engine.require_cluster("C2") is merged
    assert engine.expire(at(421)) == ["C2"]
    assert engine.stats.clusters_in_memory == 0 and engine.stats.expired == 1


def test_expire_drops_clusters_that_fell_out_of_the_window() -> None:
    engine, clock = make_engine()
    old = alert("SAT-1", "payload", 0)
    feed(engine, clock, old, alert("SAT-7", "comms", 200))
    assert engine.expire(at(299)) == []
    assert engine.expire(at(301)) == ["C1"]
    assert engine.get_cluster("C1") is None and engine.get_cluster("C2") is not None
    assert engine.stats.clusters_in_memory == 1 and engine.stats.expired == 1
    # its alert ids are forgotten too (memory stays bounded); the service's store catches replays
    clock.set(at(320))
    assert engine.ingest(old) == "C3"


def test_an_expired_cluster_is_freed_without_the_cycle_collector_and_still_reads_whole() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0), alert("SAT-2", "power", 30), alert("SAT-1", "thermal", 40))
    held = engine.require_cluster("C1")
    gc.disable()  # reference counting alone must free it: no cycle through the engine's slots
    try:
        gc.collect()
        assert engine.expire(at(400)) == ["C1"]
        # what a caller holds still answers (from its alerts once the engine's indexes are gone)
        assert held.satellites == ["SAT-1", "SAT-2"] and held.subsystems == ["power", "thermal"]
        assert held.is_multi_satellite() and held.alert_count == 3
        del held
        assert gc.collect() == 0  # nothing was left for the cycle collector
    finally:
        gc.enable()


def test_an_incident_of_one_alert_leaves_few_objects_for_the_cycle_collector() -> None:
    # Every collection of the old generation walks every tracked object; a server that opens an
    # incident per alert holds hundreds of thousands of them. Nine per incident: the cluster, its
    # alert list, first-alert and slot dicts, the slot with its time array and latest-id list, the
    # alert, the satellite's slot list. A list where a tuple would do (or an eager empty one) makes ten.
    engine, clock = make_engine()
    n = 2000
    alerts = [alert(f"SAT-{i}", f"unit-{i}", 0) for i in range(n)]
    gc.collect()
    before = len(gc.get_objects())
    feed(engine, clock, *alerts)
    del alerts
    gc.collect()
    assert engine.stats.clusters_in_memory == n
    assert (len(gc.get_objects()) - before) / n < 9.1


def test_ingest_expires_old_clusters_as_time_passes() -> None:
    engine, clock = make_engine()
    for k in range(50):
        feed(engine, clock, alert(f"SAT-{k}", "gyro", k * 100))
    # every cluster older than the window has been swept away, whatever else happened
    assert engine.stats.clusters_in_memory <= 5
    assert engine.stats.opened == 50
    assert {c.cluster_id for c in engine.get_active_clusters()} <= {f"C{k}" for k in range(46, 51)}


def test_expired_cluster_is_not_joined_even_before_the_sweep() -> None:
    engine, clock = make_engine()
    feed(engine, clock, alert("SAT-1", "power", 0))
    clock.set(at(305))
    # the alert is close to the old one, but the old cluster is no longer active on the clock
    assert engine.ingest(alert("SAT-1", "thermal", 10)) == "C2"


def test_expire_keeps_clusters_that_are_still_growing() -> None:
    engine, clock = make_engine()
    for t in range(0, 1000, 100):
        feed(engine, clock, alert("SAT-1", ["power", "thermal"][t // 100 % 2], t))
    assert engine.stats.opened == 1
    assert engine.expire(at(1000)) == []
    assert engine.expire(at(1300)) == ["C1"]


# ---- engine configuration and bad input ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"time_window_s": 0}, "time_window_s"),
        ({"time_window_s": math.inf}, "time_window_s"),
        ({"dedupe_window_s": -1}, "dedupe_window_s"),
        ({"score_threshold": 0.4}, "score_threshold"),
        ({"score_threshold": 1.1}, "score_threshold"),
        ({"same_satellite_bonus": 1.5}, "same_satellite_bonus"),
    ],
)
def test_bad_engine_settings_are_config_errors(kwargs: dict[str, float], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        CorrelationEngine(**kwargs)  # type: ignore[arg-type]


def test_default_engine_uses_system_clock_and_uuid_ids() -> None:
    engine = CorrelationEngine()
    now = datetime.now(UTC)
    cid = engine.ingest(Alert("x", "SAT-1", "power", 3, now))
    assert len(cid) == 32 and int(cid, 16) >= 0
    assert engine.dependency_graph is DEFAULT_DEPENDENCY_GRAPH
    assert [c.cluster_id for c in engine.get_active_clusters()] == [cid]


def test_higher_threshold_groups_less() -> None:
    strict, clock = make_engine(score_threshold=0.9)
    assert feed(strict, clock, alert("SAT-1", "power", 0), alert("SAT-1", "thermal", 200)) == ["C1", "C2"]


def test_id_factory_repeating_an_id_is_refused() -> None:
    engine = CorrelationEngine(clock=ManualClock(T0), id_factory=lambda: "same")
    engine.ingest(alert("SAT-1", "payload", 0))
    with pytest.raises(AlreadyExistsError):
        engine.ingest(alert("SAT-9", "comms", 0))


def test_ingest_refuses_an_alert_without_a_timestamp() -> None:
    engine, _ = make_engine()
    bad = Alert("x", "SAT-1", "power", 3, None)  # type: ignore[arg-type]
    assert math.isnan(bad.epoch)
    with pytest.raises(ValidationError) as err:
        engine.ingest(bad)
    assert err.value.violations[0].field == "alert.timestamp"


# ---- validation ----------------------------------------------------------------------------


def test_valid_alert_has_no_violations() -> None:
    assert validate_alert(alert("SAT-1", "power", 0, labels={"k": "v"}), now=at(0)) == []
    # a little clock skew is fine
    assert validate_alert(alert("SAT-1", "power", 299), now=at(0)) == []


def test_validation_reports_every_problem_at_once() -> None:
    bad = Alert(
        alert_id="",
        satellite_id=" ",
        subsystem="",
        severity=0,
        timestamp=at(1000),
        message="x" * 5000,
        labels={f"k{i}": "v" for i in range(65)},
    )
    fields = [v.field for v in validate_alert(bad, now=at(0))]
    assert fields == [
        "alert.alert_id",
        "alert.satellite_id",
        "alert.subsystem",
        "alert.severity",
        "alert.timestamp",
        "alert.message",
        "alert.labels",
    ]


def test_validation_of_timestamps_severity_and_labels() -> None:
    naive = Alert("a", "SAT-1", "power", 3, datetime(2026, 3, 1, 12))
    assert [v.description for v in validate_alert(naive, now=at(0))] == ["must be timezone-aware (UTC)"]
    assert naive.epoch == at(0).timestamp()  # read as UTC
    zeroed = Alert("a", "SAT-1", "power", 3, datetime(1970, 1, 1, tzinfo=UTC))
    assert [(v.field, v.description) for v in validate_alert(zeroed, now=at(0))] == [
        ("alert.timestamp", "must not be before 2000-01-01 (a clock that was never set?)")
    ]
    spaced = Alert(" a", "SAT-1\n", "power ", 3, at(0))
    assert [(v.field, v.description) for v in validate_alert(spaced, now=at(0))] == [
        (f"alert.{name}", "must not start or end with whitespace") for name in ("alert_id", "satellite_id", "subsystem")
    ]
    inner = Alert("a 1", "SAT 1", "solar array", 3, at(0))  # whitespace inside an id is the sender's business
    assert validate_alert(inner, now=at(0)) == []
    missing = Alert("a", "SAT-1", "power", 3, None)  # type: ignore[arg-type]
    assert [(v.field, v.description) for v in validate_alert(missing, now=at(0))] == [("alert.timestamp", "required")]
    for sev in (True, 6, 2.5):
        problems = validate_alert(Alert("a", "SAT-1", "power", sev, at(0)), now=at(0))  # type: ignore[arg-type]
        assert [v.field for v in problems] == ["alert.severity"]
    labels = {"": "v", "k" * 300: "v", "ok": "v" * 300}
    problems = validate_alert(Alert("a", "SAT-1", "power", 3, at(0), labels=labels), now=at(0))
    assert len(problems) == 3 and {v.field for v in problems} == {"alert.labels"}
    tight = validate_alert(
        Alert("a", "SAT-1", "power", 3, at(20), message="abc", labels={"a": "b", "c": "d"}),
        now=at(0),
        max_future_skew_s=10,
        max_message_len=2,
        max_labels=1,
        field_prefix="alerts[3]",
    )
    assert [v.field for v in tight] == ["alerts[3].timestamp", "alerts[3].message", "alerts[3].labels"]


def test_validation_refuses_text_postgresql_cannot_store() -> None:
    # NUL in any stored string would fail the whole group commit in PostgreSQL; ids are index keys.
    nul = Alert(
        alert_id="a\x00",
        satellite_id="SAT\x00",
        subsystem="power\x00",
        severity=3,
        timestamp=at(0),
        message="bus \x00 undervoltage",
        labels={"k\x00": "v", "ok": "v\x00"},
        tracking_id="t\x00",
    )
    problems = validate_alert(nul, now=at(0))
    assert [v.field for v in problems] == [
        "alert.alert_id",
        "alert.satellite_id",
        "alert.subsystem",
        "alert.message",
        "alert.tracking_id",
        "alert.labels",
        "alert.labels",
    ]
    assert all("NUL" in v.description for v in problems)
    long_ids = Alert("a" * 257, "S" * 257, "p" * 257, 3, at(0))
    assert [v.description for v in validate_alert(long_ids, now=at(0))] == [
        "at most 256 characters allowed, got 257"
    ] * 3
    assert validate_alert(Alert("a" * 256, "S" * 256, "p" * 256, 3, at(0)), now=at(0)) == []
    # An unpaired surrogate (from a JSON escape) cannot be encoded at all; other non-ASCII text is fine.
    odd = validate_alert(Alert("a\ud800", "SAT-é", "power", 3, at(0), labels={"k": "\udfff"}), now=at(0))
    assert [(v.field, "surrogate" in v.description) for v in odd] == [("alert.alert_id", True), ("alert.labels", True)]


# ---- records -------------------------------------------------------------------------------


def test_alert_is_immutable_hashable_and_picklable_with_read_only_labels() -> None:
    a = alert("SAT-1", "power", 0, labels={"b": "2", "a": "1"}, alert_id="x")
    assert isinstance(a.labels, Labels) and dict(a.labels) == {"a": "1", "b": "2"}
    assert a.labels.as_tuple() == (("a", "1"), ("b", "2"))
    with pytest.raises(TypeError):
        a.labels["c"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        a.severity = 5  # type: ignore[misc]
    same = Alert("x", "SAT-1", "power", 3, at(0), labels=Labels([("a", "1"), ("b", "2")]))
    assert a == same and hash(a) == hash(same) and len({a, same}) == 1
    assert a.labels == {"a": "1", "b": "2"} and a.labels != {"a": "1"} and a.labels != 5
    assert "Labels" in repr(a.labels)
    assert pickle.loads(pickle.dumps(a)) == a
    tracked = a.with_tracking_id("trk-1")
    assert tracked.tracking_id == "trk-1" and tracked.epoch == a.epoch and a.tracking_id == ""
    assert Alert("y", "S", "p", 1, at(0)).labels == {}


# ---- dependency graph ----------------------------------------------------------------------


def test_default_graph_relations_and_aliases() -> None:
    g = DEFAULT_DEPENDENCY_GRAPH
    assert set(g.names) == {"power", "thermal", "propulsion", "adcs", "comms", "payload", "obc"}
    assert g.strength("power", "thermal") == 0.9 == g.strength("Thermal", "EPS")
    assert g.strength("power", "power") == 1.0
    assert g.strength("payload", "comms") == 0.0
    assert g.strength("power", "star_tracker") == 0.0 and g.strength("x", "x") == 0.0
    assert g.is_upstream("power", "comms") and not g.is_upstream("comms", "power")
    assert g.is_upstream("thermal", "adcs") and not g.is_upstream("power", "power")
    assert g.path_strength("obc", "comms") == 0.6
    assert g.path_strength("comms", "obc") == 0.0 and g.path_strength("x", "power") == 0.0
    assert g.downstream("power") == frozenset(set(g.names) - {"power"})
    assert g.downstream("comms") == frozenset() and g.downstream("unknown") == frozenset()
    for alias, canonical in [
        ("EPS", "power"),
        ("electrical_power", "power"),
        ("Attitude", "adcs"),
        ("AOCS", "adcs"),
        ("communications", "comms"),
        ("TTC", "comms"),
        ("cdh", "obc"),
        ("Data Handling", "obc"),
        ("OBDH", "obc"),
        ("star-tracker", "star_tracker"),
    ]:
        assert g.canonical(alias) == canonical
    assert g.is_known("ADCS") and not g.is_known("star_tracker")
    assert "7 subsystems" in repr(g) and len(g.edges) == 16
    assert parse_dependency_graph(g.to_dict()).strength_matrix() == g.strength_matrix()


def test_transitive_strength_is_the_best_path_product() -> None:
    g = DependencyGraph([("a", "b", 0.5), ("b", "c", 0.5), ("a", "c", 0.2), ("c", "d", 1.0)])
    assert g.path_strength("a", "c") == 0.25  # via b beats the direct 0.2 edge
    assert g.strength("d", "a") == 0.25
    assert g.is_upstream("a", "d") and not g.is_upstream("d", "a")


def test_cycles_are_allowed_but_nothing_is_its_own_downstream() -> None:
    g = DependencyGraph([Edge("a", "b", 0.5), Edge("b", "a", 0.5)], subsystems=["lonely"])
    assert g.is_upstream("a", "b") and g.is_upstream("b", "a")
    assert g.downstream("a") == {"b"}
    assert g.is_known("lonely") and g.strength("lonely", "a") == 0.0


def test_load_dependency_graph_from_json_and_yaml(tmp_path: pytest.TempPathFactory) -> None:
    spec = {
        "edges": [{"from": "Bus", "to": "heater", "weight": 0.9}, {"from": "heater", "to": "camera", "weight": 1}],
        "aliases": {"EPS": "bus"},
    }
    json_file = tmp_path / "graph.json"  # type: ignore[operator]
    json_file.write_text(json.dumps(spec))
    yaml_file = tmp_path / "graph.yaml"  # type: ignore[operator]
    yaml_file.write_text(
        "edges:\n  - {from: bus, to: heater, weight: 0.9}\n  - {from: heater, to: camera, weight: 1}\n"
        "aliases:\n  eps: bus\n"
    )
    for path in (json_file, str(yaml_file)):
        g = load_dependency_graph(path)
        assert g.names == ("bus", "heater", "camera")
        assert g.strength("eps", "HEATER") == 0.9 and g.is_upstream("bus", "camera")
        assert g.aliases == {"eps": "bus"}
    # an engine with that graph: the default subsystems are now unknown
    engine = CorrelationEngine(dependency_graph=load_dependency_graph(json_file), clock=ManualClock(T0))
    assert engine.score_components(alert("S1", "eps", 0), alert("S2", "camera", 0)).dependency == pytest.approx(0.36)
    assert engine.score_components(alert("S1", "power", 0), alert("S2", "thermal", 0)).dependency == 0.0


def test_graph_validation_reports_every_problem(tmp_path: pytest.TempPathFactory) -> None:
    bad = {
        "edges": [
            {"from": "power", "to": "thermal", "weight": 1.5},
            {"from": "power", "to": "power", "weight": 0.5},
            {"from": "power", "to": "thermal", "weight": 0.5},
            {"from": "power", "to": "comms", "weight": 0},
        ],
        "aliases": {"eps": "nuclear"},
    }
    with pytest.raises(ValidationError) as err:
        parse_dependency_graph(bad)
    fields = [v.field for v in err.value.violations]
    assert fields == ["edges[0].weight", "edges[1]", "edges[2]", "edges[3].weight", "aliases.eps"]
    with pytest.raises(ValidationError) as err:
        DependencyGraph([("a", "b", 0.5)], aliases={"b": "a"})
    assert [v.field for v in err.value.violations] == ["edges[0]", "aliases.b"]  # b became a: a -> a

    structural = {
        "edges": [{"from": "a", "to": "", "weight": "high", "color": "red"}, "nope"],
        "aliases": {"x": 3},
        "subsystems": [""],
        "version": 2,
    }
    with pytest.raises(ValidationError) as err:
        parse_dependency_graph(structural)
    fields = [v.field for v in err.value.violations]
    assert fields == [
        "version",
        "edges[0].color",
        "edges[0].to",
        "edges[0].weight",
        "edges[1]",
        "aliases.x",
        "subsystems",
    ]
    shapes: list[object] = [[], {"edges": "x"}, {"edges": [], "aliases": []}]
    for data in shapes:
        with pytest.raises(ValidationError):
            parse_dependency_graph(data)
    with pytest.raises(ValidationError) as err:
        DependencyGraph([("", "b", 0.5), ("a", " ", 0.5)])
    assert [v.field for v in err.value.violations] == ["edges[0].from", "edges[1].to"]
    with pytest.raises(ValidationError) as err:
        DependencyGraph([("a", "b", 0.5)], aliases={" ": "a"})
    assert [v.field for v in err.value.violations] == ["aliases"]

    path = tmp_path / "bad.yaml"  # type: ignore[operator]
    path.write_text("edges: [{from: a, to: b, weight: -1}]\n")
    with pytest.raises(ValidationError):
        load_dependency_graph(path)
    broken = tmp_path / "broken.json"  # type: ignore[operator]
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="dependency_graph_file"):
        load_dependency_graph(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_dependency_graph(tmp_path / "missing.yaml")  # type: ignore[operator]


# ---- bounded cost --------------------------------------------------------------------------


def test_each_alert_scores_a_bounded_number_of_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of clusters in memory, yet one alert looks at a bounded handful of them."""
    engine, clock = make_engine()
    for k in range(2000):  # unknown subsystem on distinct satellites: 2000 separate active clusters
        feed(engine, clock, alert(f"SAT-{k}", "gyro", k * 0.01))
    for k in range(500):  # 500 power clusters, each closed at once so the next opens a new one
        cid = engine.ingest(alert(f"PWR-{k}", "power", 20 + k * 0.01))
        engine.close_cluster(cid)
    assert len(engine.get_active_clusters()) == 2000 and engine.stats.clusters_in_memory == 2500

    touched = 0
    original = IncidentCluster.__dict__["_joinable"]

    class Counting:
        def __get__(self, obj: object, objtype: object = None) -> object:
            nonlocal touched
            touched += 1
            return original.__get__(obj, objtype)

        def __set__(self, obj: object, value: object) -> None:
            original.__set__(obj, value)

    monkeypatch.setattr(IncidentCluster, "_joinable", Counting())
    assert engine.ingest(alert("SAT-5000", "gyro", 30)) == "C2501"  # nothing to compare with
    assert touched <= 8
    touched = 0
    assert engine.ingest(alert("SAT-1", "wheel", 30)) == "C2"  # its satellite's one cluster
    assert touched <= 8
    touched = 0
    assert engine.ingest(alert("SAT-6000", "thermal", 30)) == "C2502"  # 500 power clusters: scans 16
    assert touched <= 16 + 8

    for _ in range(40):  # 40 closed clusters on one satellite: its list is scanned only so far
        engine.close_cluster(engine.ingest(alert("SAT-42", "camera", 30)))
    touched = 0
    engine.ingest(alert("SAT-42", "camera", 31))
    assert touched <= 16 + 8


def test_subsystem_name_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import aetherops.correlation as correlation

    monkeypatch.setattr(correlation, "_KEY_CACHE_LIMIT", 3)
    engine, clock = make_engine()
    names = [f"unit-{k}" for k in range(10)]
    for k, name in enumerate(names):
        feed(engine, clock, alert("SAT-1", name, k))
    assert len(engine._keys) <= 3
    assert engine.require_cluster("C1").subsystems == sorted(n.replace("-", "_") for n in names)


def test_the_most_recently_updated_cluster_of_a_satellite_stays_a_candidate() -> None:
    """Only the 16 most recently updated clusters of a satellite are scored, so an update must bring
    its cluster to the front: here the power incident was updated after 15 others opened, then two
    more opened, and its thermal repeat is still found (a duplicate, not a new incident)."""
    engine, clock = make_engine(score_threshold=0.95)  # unrelated subsystems never group
    (incident,) = feed(engine, clock, alert("SAT-1", "power", 0))
    others = feed(engine, clock, *(alert("SAT-1", f"unit-{k}", 1 + k) for k in range(15)))
    assert incident not in others and len(set(others)) == 15
    thermal = alert("SAT-1", "thermal", 16)
    assert feed(engine, clock, thermal) == [incident]  # the 16th most recent cluster: still scored
    assert len(set(feed(engine, clock, alert("SAT-1", "unit-a", 17), alert("SAT-1", "unit-b", 18)))) == 2
    result = engine.ingest_detailed(alert("SAT-1", "thermal", 19))
    assert (result.cluster_id, result.duplicate_of) == (incident, thermal.alert_id)


def test_clusters_that_expire_together_are_dropped_a_few_per_ingest() -> None:
    """Alerts that arrived together expire together. No single ingest pays for dropping them all,
    none of them is joined meanwhile, and all are dropped within a few ingests."""
    engine, clock = make_engine()
    n = 1000
    for k in range(n):
        engine.ingest(alert(f"SAT-{k}", "gyro", 0))
    clock.set(at(301))
    again = engine.ingest_detailed(alert("SAT-0", "gyro", 301))
    assert again.opened  # SAT-0's cluster is past the window, dropped or not
    assert 0 < engine.stats.expired <= _SWEEP_BUDGET
    assert [c.cluster_id for c in engine.get_active_clusters()] == [again.cluster_id]
    for k in range(n // _SWEEP_BUDGET + 1):
        clock.set(at(302 + k))
        engine.ingest(alert(f"SAT-{k}", "gyro", 302 + k))
    assert engine.stats.expired == n


def test_every_cluster_in_memory_is_filed_for_expiry_exactly_once() -> None:
    """Bursts of clusters that expire together, swept a budget at a time: each cluster in memory is
    filed under one bucket (or set aside as still active), and nothing dropped stays filed."""
    import random

    rng = random.Random(11)
    engine, clock = make_engine()
    t = 0.0
    for step in range(6000):
        t += rng.choice([310.0]) if rng.random() < 0.002 else rng.choice([0.0] * 8 + [1.0, 2.0])
        clock.set(at(t))
        engine.ingest(alert(f"SAT-{rng.randrange(2000)}", rng.choice(["gyro", "unit-x", "power", "thermal"]), t))
        if step % 10 == 0:
            filed = [c.cluster_id for bucket in (*engine._buckets.values(), *engine._kept.values()) for c in bucket]
            assert sorted(filed) == sorted(engine._clusters), step
    assert engine.stats.expired > 1000
    engine.expire(at(t + 1000))
    assert engine.stats.clusters_in_memory == 0 and not engine._buckets and not engine._kept


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_satellite_index_follows_updates_closes_and_expiry(threshold: float) -> None:
    """The per-satellite candidate chains against a model of them: every in-memory cluster with an
    alert on the satellite, most recently updated there first, and nothing dropped left behind."""
    import random

    rng = random.Random(5)
    engine, clock = make_engine(score_threshold=threshold)
    sats = [f"SAT-{k}" for k in range(4)]
    subsystems = ["power", "thermal", "propulsion", "comms", "unit-x", "unit-y", "unit-z"]
    order: dict[str, list[str]] = {s: [] for s in sats}  # cluster ids, most recently updated first
    t = 0.0
    for step in range(1500):
        t += rng.choice([0.0, 1.0, 5.0, 20.0, 90.0])
        sat = rng.choice(sats)
        clock.set(at(t))
        result = engine.ingest_detailed(alert(sat, rng.choice(subsystems), t - rng.choice([0.0, 0.0, 30.0])))
        if not result.duplicate and not result.replay:
            chain = order[sat]
            if result.cluster_id in chain:
                chain.remove(result.cluster_id)
            chain.insert(0, result.cluster_id)
        if step % 37 == 0:
            engine.close_cluster(result.cluster_id)
        for s in sats:
            expected = [cid for cid in order[s] if engine.get_cluster(cid) is not None]
            assert [slot.cluster.cluster_id for slot in engine._chain(s)] == expected, (step, s)
            assert (s in engine._sats) == bool(expected)
    assert engine.stats.expired > 50  # the sweep dropped clusters from the middle of chains, too


def test_alert_size_counts_the_message_and_labels_as_stored() -> None:
    plain = alert("SAT-1", "power", 0, message="bus A undervoltage")
    assert 400 < alert_size(plain) < 1000  # a typical alert: about half a kilobyte
    # Four bytes a character outside the Basic Multilingual Plane, one in ASCII.
    wide = alert("SAT-1", "power", 0, message="\U0001f6f0" * 1000)
    narrow = alert("SAT-1", "power", 0, message="x" * 1000)
    assert alert_size(wide) - alert_size(narrow) >= 3000
    labelled = alert("SAT-1", "power", 0, message="bus A undervoltage", labels={"bus": "A", "orbit": "LEO"})
    assert alert_size(labelled) > alert_size(plain) + 4 * sys.getsizeof("")
    largest = alert(
        "SAT-1",
        "power",
        0,
        message="\U0001f6f0" * 4096,
        labels={f"{k:02d}" + "\U0001f6f0" * 254: "\U0001f6f0" * 256 for k in range(64)},
    )
    assert 140_000 < alert_size(largest) < 170_000
