"""Unit tests of aetherops.circuit: every transition, probe limits, the classifier and cancellation."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest

from aetherops.circuit import (
    BreakerRegistry,
    BreakerSettings,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    TransitionEvent,
    default_classifier,
)
from aetherops.clock import ManualClock
from aetherops.errors import (
    ConfigError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    ValidationError,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
Events = list[TransitionEvent]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def events() -> Events:
    return []


def make(clock: ManualClock, events: Events, **kwargs: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {"failure_threshold": 3, "success_threshold": 2, "reset_timeout_s": 10.0}
    return CircuitBreaker("agent.sat-1", clock=clock, on_transition=events.append, **(settings | kwargs))


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.settings.failure_threshold):
        breaker.record_failure(UnavailableError("agent down"))
    assert breaker.state is OPEN


def transitions(events: Events) -> list[tuple[CircuitState, CircuitState]]:
    return [(e.from_state, e.to_state) for e in events]


class Boom(Exception):
    pass


async def ok(value: int) -> int:
    return value


async def fail() -> None:
    raise Boom("no")


# --- CLOSED -> OPEN ---------------------------------------------------------------------------------


def test_consecutive_failures_open_the_breaker(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    breaker.record_failure(Boom())
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.allow()
    breaker.record_failure(TimeoutError())
    assert breaker.state is OPEN
    reason = "3 consecutive failures, last: TimeoutError"
    assert events == [TransitionEvent("agent.sat-1", CLOSED, OPEN, clock.now(), reason)]


def test_a_success_resets_the_consecutive_failure_count(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 2
    assert events == []


# --- OPEN -> HALF_OPEN ----------------------------------------------------------------------------


def test_open_refuses_until_the_reset_timeout_then_goes_half_open(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    opened = clock.now()
    assert breaker.retry_at == opened + timedelta(seconds=10)
    clock.advance(9.999)
    assert not breaker.allow()
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.allow()
    assert breaker.state is HALF_OPEN
    assert breaker.retry_at is None
    assert breaker.snapshot()["opened_at"] == opened.isoformat()  # still when it opened, for dashboards
    assert events[-1] == TransitionEvent("agent.sat-1", OPEN, HALF_OPEN, clock.now(), "reset timeout elapsed")


def test_late_results_while_open_change_nothing(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(5)
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state is OPEN
    assert breaker.retry_at == clock.now() + timedelta(seconds=5)  # not pushed back by the late failure
    assert len(events) == 1


# --- HALF_OPEN -> CLOSED / OPEN -------------------------------------------------------------------


def test_enough_successful_probes_close_the_breaker(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert transitions(events) == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert events[-1].reason == "2 successful probe(s)"
    # Closed again with a clean slate: it takes a full run of failures to reopen.
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED


def test_a_failed_probe_reopens_for_another_timeout(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow()
    breaker.record_failure(Boom())
    assert breaker.state is OPEN
    assert events[-1].reason == "probe failed: Boom"
    assert breaker.retry_at == clock.now() + timedelta(seconds=10)
    assert not breaker.allow()
    assert transitions(events) == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_half_open_admits_at_most_probe_count_concurrent_probes(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events, probe_count=2, success_threshold=3)
    trip(breaker)
    clock.advance(10)
    assert [breaker.allow() for _ in range(3)] == [True, True, False]
    assert breaker.snapshot()["probes_in_flight"] == 2
    breaker.record_success()  # frees one slot
    assert [breaker.allow() for _ in range(2)] == [True, False]


def test_probes_that_never_report_are_given_up_after_a_timeout(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()  # this caller never reports back
    clock.advance(9)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert breaker.state is HALF_OPEN


# --- classifier -----------------------------------------------------------------------------------


def test_default_classifier_spares_the_callers_own_errors() -> None:
    assert not default_classifier(ValidationError.single("satellite_id", "unknown"))
    assert not default_classifier(NotFoundError("no such runbook"))
    assert default_classifier(UnavailableError("agent down"))
    assert default_classifier(ResourceExhaustedError("slow down"))
    assert default_classifier(RuntimeError("bug"))


def test_errors_the_classifier_excuses_count_for_nothing(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    for _ in range(5):
        breaker.record_failure(ValidationError.single("command", "unknown command"))
    assert breaker.state is CLOSED
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_failure(NotFoundError("x"))
    breaker.record_failure()
    assert breaker.state is OPEN  # the excused error did not reset the run either


def test_an_excused_error_gives_the_probe_slot_back(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.record_failure(ValidationError.single("command", "bad"))
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


def test_a_custom_classifier_decides_what_fails(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events, failure_threshold=1, classifier=lambda exc: isinstance(exc, TimeoutError))
    breaker.record_failure(Boom())
    breaker.record_failure(UnavailableError("x"))
    assert breaker.state is CLOSED
    breaker.record_failure(TimeoutError())
    assert breaker.state is OPEN


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)])
def test_a_reported_cancellation_is_not_a_failure_even_for_a_catch_all_classifier(
    exc: BaseException, clock: ManualClock, events: Events
) -> None:
    breaker = make(clock, events, failure_threshold=1, classifier=lambda exc: True)
    breaker.record_failure(exc)
    assert breaker.state is CLOSED
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_failure(exc)
    assert breaker.state is HALF_OPEN
    assert breaker.allow()  # the slot came back


# --- call() ---------------------------------------------------------------------------------------


async def test_call_returns_the_result_and_records_success(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    breaker.record_failure()
    assert await breaker.call(ok, 7) == 7
    assert breaker.snapshot()["consecutive_failures"] == 0


async def test_call_reraises_and_records_failures_until_refusing(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(fail)
    with pytest.raises(CircuitOpenError) as err:
        await breaker.call(ok, 1)
    assert isinstance(err.value, UnavailableError)
    assert err.value.retry_after_s == 10.0
    assert err.value.retry_at == clock.now() + timedelta(seconds=10)
    message = str(err.value)
    assert message.startswith("circuit breaker 'agent.sat-1' is open; it will let a probe through at ")
    assert message.endswith(" at 2026-01-01T00:00:10+00:00 (in 10.0s)")


async def test_call_refuses_while_the_probe_slots_are_taken(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    with pytest.raises(CircuitOpenError, match="when a probe in flight finishes") as err:
        await breaker.call(ok, 1)
    assert err.value.retry_at is None
    assert err.value.retry_after_s == 0.0


async def test_call_closes_a_half_open_breaker_after_good_probes(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    assert [await breaker.call(ok, 1), await breaker.call(ok, 2)] == [1, 2]
    assert breaker.state is CLOSED


async def test_cancelled_call_propagates_and_frees_the_probe(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    trip(breaker)
    clock.advance(10)
    started, never = asyncio.Event(), asyncio.Event()

    async def hang() -> None:
        started.set()
        await never.wait()

    task = asyncio.create_task(breaker.call(hang))
    await asyncio.wait_for(started.wait(), timeout=5)
    assert breaker.snapshot()["probes_in_flight"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["probes_in_flight"] == 0
    assert await breaker.call(ok, 3) == 3


async def test_cancelled_calls_never_open_a_closed_breaker(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events, failure_threshold=1)

    async def cancelled() -> None:
        raise asyncio.CancelledError

    for _ in range(3):
        with pytest.raises(asyncio.CancelledError):
            await breaker.call(cancelled)
    assert breaker.state is CLOSED
    assert events == []


# --- hooks, snapshot, settings --------------------------------------------------------------------


def test_a_failing_transition_hook_is_logged_not_raised(clock: ManualClock, caplog: Any) -> None:
    def broken(event: TransitionEvent) -> None:
        raise RuntimeError("metrics down")

    breaker = CircuitBreaker("agent.sat-2", failure_threshold=1, clock=clock, on_transition=broken)
    with caplog.at_level(logging.ERROR, logger="aetherops.circuit"):
        breaker.record_failure()
    assert breaker.state is OPEN
    assert "on_transition hook failed for circuit breaker 'agent.sat-2'" in caplog.text


def test_snapshot_reports_state_for_health(clock: ManualClock, events: Events) -> None:
    breaker = make(clock, events)
    assert breaker.snapshot() == {
        "name": "agent.sat-1",
        "state": "closed",
        "consecutive_failures": 0,
        "probe_successes": 0,
        "probes_in_flight": 0,
        "opened_at": None,
        "retry_at": None,
        "failure_threshold": 3,
        "success_threshold": 2,
        "reset_timeout_s": 10.0,
        "probe_count": 1,
    }
    trip(breaker)
    snap = breaker.snapshot()
    assert (snap["state"], snap["opened_at"], snap["retry_at"]) == (
        "open",
        "2026-01-01T00:00:00+00:00",
        "2026-01-01T00:00:10+00:00",
    )


def test_defaults_match_the_runbook_issue() -> None:
    breaker = CircuitBreaker("agent")
    assert breaker.settings == BreakerSettings(
        failure_threshold=5, success_threshold=2, reset_timeout_s=30.0, probe_count=1
    )
    assert breaker.allow()


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        bad: dict[str, Any] = {"failure_threshold": 0, "success_threshold": 1.5, "reset_timeout_s": 0}
        CircuitBreaker("agent", probe_count=-1, **bad)
    message = str(err.value)
    for part in (
        "failure_threshold must be an integer >= 1, got 0",
        "success_threshold must be an integer >= 1, got 1.5",
        "probe_count must be an integer >= 1, got -1",
        "reset_timeout_s must be a positive finite number, got 0",
    ):
        assert part in message


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, "30"])
def test_reset_timeout_must_be_positive_and_finite(timeout: Any) -> None:
    with pytest.raises(ConfigError, match="reset_timeout_s"):
        BreakerSettings(reset_timeout_s=timeout)


def test_a_breaker_needs_a_name() -> None:
    with pytest.raises(ConfigError, match="non-empty name"):
        CircuitBreaker("")


# --- registry -------------------------------------------------------------------------------------


def test_registry_creates_one_breaker_per_name_with_shared_settings(clock: ManualClock) -> None:
    events: Events = []
    settings: dict[str, Any] = {"failure_threshold": 1, "reset_timeout_s": 5}
    registry = BreakerRegistry(clock=clock, on_transition=events.append, **settings)
    assert "agent.sat-1" not in registry
    first = registry.get("agent.sat-1")
    assert registry.get("agent.sat-1") is first
    second = registry.get("agent.sat-2")
    assert second is not first
    assert second.settings == first.settings == registry.settings
    assert (len(registry), registry.names()) == (2, ["agent.sat-1", "agent.sat-2"])
    assert "agent.sat-1" in registry

    second.record_failure()
    assert (first.state, second.state) == (CLOSED, OPEN)
    assert [e.name for e in events] == ["agent.sat-2"]
    snapshot = registry.snapshot()
    assert list(snapshot) == ["agent.sat-1", "agent.sat-2"]
    assert snapshot["agent.sat-2"]["state"] == "open"
    assert snapshot["agent.sat-2"]["reset_timeout_s"] == 5


def test_a_breaker_without_a_hook_still_transitions(clock: ManualClock) -> None:
    breaker = CircuitBreaker("agent", failure_threshold=1, clock=clock)
    breaker.record_failure()
    assert breaker.state is OPEN


def test_registry_shares_the_classifier(clock: ManualClock) -> None:
    registry = BreakerRegistry(failure_threshold=1, classifier=lambda exc: False, clock=clock)
    registry.get("a").record_failure(Boom())
    assert registry.get("a").state is CLOSED


def test_registry_validates_its_settings_up_front() -> None:
    with pytest.raises(ConfigError, match="probe_count"):
        BreakerRegistry(probe_count=0)
