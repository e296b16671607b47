"""The circuit breaker: stop calling a dependency (e.g. one agent) that keeps failing, then probe it.

One state machine, `CircuitBreaker`:

* CLOSED: every call goes through; `failure_threshold` consecutive failures open the breaker.
* OPEN: nothing goes through until `reset_timeout_s` has passed since it opened; the next `allow()`
  then moves to HALF_OPEN.
* HALF_OPEN: at most `probe_count` probe calls at a time; `success_threshold` successful probes close
  the breaker, one failed probe opens it again for another `reset_timeout_s`.

A `classifier` decides which exceptions count as failures: by default every exception does except the
"your request was wrong" errors of aetherops.errors (ValidationError, NotFoundError, ...), which prove
that the dependency is up and answering. Results that are not failures, and cancellations (any
BaseException that is not an Exception), count for nothing: they only give a probe slot back.
Every transition is reported to `on_transition`.

The breaker is meant for one asyncio event loop: it takes no locks and never awaits while changing
state. Time comes from the injected `Clock`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, ParamSpec, TypeVar

from aetherops.clock import Clock, SystemClock
from aetherops.errors import (
    AlreadyExistsError,
    ConfigError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

__all__ = [
    "BreakerRegistry",
    "BreakerSettings",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Classifier",
    "TransitionEvent",
    "TransitionListener",
    "default_classifier",
]

_log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class TransitionEvent:
    """One state change of the breaker called `name`, at `time`, and why."""

    name: str
    from_state: CircuitState
    to_state: CircuitState
    time: datetime
    reason: str


Classifier = Callable[[BaseException], bool]
TransitionListener = Callable[[TransitionEvent], None]

# The dependency answered, so it is up: the caller's request was at fault, not the dependency.
_CALLER_ERRORS = (
    ValidationError,
    NotFoundError,
    AlreadyExistsError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnauthenticatedError,
)


def default_classifier(exc: BaseException) -> bool:
    """True when `exc` counts as a breaker failure: everything except the caller's own errors."""
    return not isinstance(exc, _CALLER_ERRORS)


class CircuitOpenError(UnavailableError):
    """The breaker refused the call; `retry_at` says when it will let a probe through (None: unknown)."""

    def __init__(self, name: str, retry_at: datetime | None, now: datetime) -> None:
        self.name = name
        self.retry_at = retry_at
        self.retry_after_s = max(0.0, (retry_at - now).total_seconds()) if retry_at else 0.0
        if retry_at is None:
            when = "when a probe in flight finishes"
        else:
            when = f"at {retry_at.isoformat()} (in {self.retry_after_s:.1f}s)"
        super().__init__(f"circuit breaker {name!r} is open; it will let a probe through {when}")


@dataclass(frozen=True)
class BreakerSettings:
    """The tunables shared by every breaker of a registry; validated once, all problems at once."""

    failure_threshold: int = 5
    success_threshold: int = 2
    reset_timeout_s: float = 30.0
    probe_count: int = 1

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be an integer >= 1, got {value!r}"
            for name, value in (
                ("failure_threshold", self.failure_threshold),
                ("success_threshold", self.success_threshold),
                ("probe_count", self.probe_count),
            )
            if not (isinstance(value, int) and value >= 1)
        ]
        timeout = self.reset_timeout_s
        if not (isinstance(timeout, int | float) and 0 < timeout < float("inf")):
            problems.append(f"reset_timeout_s must be a positive finite number, got {timeout!r}")
        if problems:
            raise ConfigError("; ".join(problems))


class CircuitBreaker:
    """A circuit breaker guarding one dependency; see the module docstring for the state machine."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        success_threshold: int = 2,
        reset_timeout_s: float = 30.0,
        probe_count: int = 1,
        classifier: Classifier = default_classifier,
        clock: Clock | None = None,
        on_transition: TransitionListener | None = None,
    ) -> None:
        if not name:
            raise ConfigError("a circuit breaker needs a non-empty name")
        self.name = name
        self.settings = BreakerSettings(failure_threshold, success_threshold, reset_timeout_s, probe_count)
        self._classifier = classifier
        self._clock: Clock = clock or SystemClock()
        self._on_transition = on_transition
        self._state = CircuitState.CLOSED
        self._failures = 0  # consecutive, while CLOSED
        self._successes = 0  # successful probes, while HALF_OPEN
        self._probes = 0  # probes in flight, while HALF_OPEN
        self._opened_at: datetime | None = None
        self._last_probe_at: datetime | None = None

    @property
    def state(self) -> CircuitState:
        """The current state; OPEN turns into HALF_OPEN only on the next `allow()`."""
        return self._state

    @property
    def retry_at(self) -> datetime | None:
        """When an OPEN breaker will let the first probe through; None in the other states."""
        if self._state is not CircuitState.OPEN or self._opened_at is None:
            return None
        return self._opened_at + timedelta(seconds=self.settings.reset_timeout_s)

    def allow(self) -> bool:
        """May a call go ahead now? In HALF_OPEN a True takes a probe slot: report its outcome."""
        now = self._clock.now()
        retry_at = self.retry_at
        if retry_at is not None and now >= retry_at:
            self._transition(CircuitState.HALF_OPEN, now, "reset timeout elapsed")
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.OPEN:
            return False
        if self._probes >= self.settings.probe_count and self._probes_lost(now):
            # A caller that took a slot and never reported must not wedge the breaker half-open.
            self._probes = 0
        if self._probes >= self.settings.probe_count:
            return False
        self._probes += 1
        self._last_probe_at = now
        return True

    def _probes_lost(self, now: datetime) -> bool:
        started = self._last_probe_at or now
        return (now - started).total_seconds() >= self.settings.reset_timeout_s

    def record_success(self) -> None:
        now = self._clock.now()
        if self._state is CircuitState.CLOSED:
            self._failures = 0
        elif self._state is CircuitState.HALF_OPEN:
            self._release_probe()
            self._successes += 1
            if self._successes >= self.settings.success_threshold:
                self._transition(CircuitState.CLOSED, now, f"{self._successes} successful probe(s)")
        # OPEN: a late result of a call admitted before the breaker opened; it proves nothing new.

    def record_failure(self, exc: BaseException | None = None) -> None:
        """Report a failed call; `exc` goes through the classifier (None always counts as a failure).

        An `exc` that does not count (excused by the classifier, or not an Exception at all, such as
        asyncio.CancelledError) changes nothing except giving a HALF_OPEN probe slot back.
        """
        if exc is not None and not self._is_failure(exc):
            self._release_probe()
            return
        now = self._clock.now()
        what = "failure" if exc is None else type(exc).__name__
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.settings.failure_threshold:
                reason = f"{self._failures} consecutive failures, last: {what}"
                self._transition(CircuitState.OPEN, now, reason)
        elif self._state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.OPEN, now, f"probe failed: {what}")

    def _is_failure(self, exc: BaseException) -> bool:
        # Cancellation and the other BaseExceptions (KeyboardInterrupt, SystemExit) come from our side
        # and say nothing about the dependency, whatever the classifier thinks.
        return isinstance(exc, Exception) and self._classifier(exc)

    def _release_probe(self) -> None:
        if self._state is CircuitState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await `fn(*args, **kwargs)` through the breaker; CircuitOpenError when it is not allowed.

        Exceptions are recorded and re-raised unchanged. Cancellation (and other BaseExceptions such
        as KeyboardInterrupt) is never swallowed and never counts as a failure.
        """
        if not self.allow():
            raise CircuitOpenError(self.name, self.retry_at, self._clock.now())
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self.record_failure(exc)  # cancellation included: record_failure excuses it
            raise
        self.record_success()
        return result

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state as plain data, for health checks and metrics."""
        retry_at = self.retry_at
        return {
            "name": self.name,
            "state": self._state.value,
            "consecutive_failures": self._failures,
            "probe_successes": self._successes,
            "probes_in_flight": self._probes,
            "opened_at": self._opened_at.isoformat() if self._opened_at else None,
            "retry_at": retry_at.isoformat() if retry_at else None,
            "failure_threshold": self.settings.failure_threshold,
            "success_threshold": self.settings.success_threshold,
            "reset_timeout_s": self.settings.reset_timeout_s,
            "probe_count": self.settings.probe_count,
        }

    def _transition(self, to_state: CircuitState, now: datetime, reason: str) -> None:
        event = TransitionEvent(self.name, self._state, to_state, now, reason)
        self._state = to_state
        self._failures = self._successes = self._probes = 0
        if to_state is CircuitState.OPEN:
            self._opened_at = now
        if self._on_transition is not None:
            try:
                self._on_transition(event)
            except Exception:
                # A broken metrics hook must not turn the caller's result into a different error.
                _log.exception("on_transition hook failed for circuit breaker %r", self.name)


class BreakerRegistry:
    """One breaker per name (e.g. per agent subject), created on first use with shared settings."""

    def __init__(
        self,
        failure_threshold: int = 5,
        success_threshold: int = 2,
        reset_timeout_s: float = 30.0,
        probe_count: int = 1,
        classifier: Classifier = default_classifier,
        clock: Clock | None = None,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.settings = BreakerSettings(failure_threshold, success_threshold, reset_timeout_s, probe_count)
        self._classifier = classifier
        self._clock: Clock = clock or SystemClock()
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            s = self.settings
            breaker = CircuitBreaker(
                name,
                s.failure_threshold,
                s.success_threshold,
                s.reset_timeout_s,
                s.probe_count,
                self._classifier,
                self._clock,
                self._on_transition,
            )
            self._breakers[name] = breaker
        return breaker

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    def names(self) -> list[str]:
        return sorted(self._breakers)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every breaker's snapshot by name, for health checks and metrics."""
        return {name: self._breakers[name].snapshot() for name in self.names()}
