"""Agent actions over NATS request/reply, each agent subject guarded by a circuit breaker.

A runbook step `agent:<name>` becomes a request on `aetherops.actions.<name>` (under the namespace
prefix) carrying an `events.v1.AgentActionRequest` in protobuf JSON; the agent answers with an
`AgentActionReply` in protobuf JSON. The JSON is written and read here by hand (lowerCamelCase field
names, RFC 3339 timestamps, as protobuf's JSON mapping prescribes) because nothing under aetherops/
imports the generated code; any protobuf JSON parser reads it, and snake_case replies are accepted too.

Outcomes, and what the breaker (one per subject, from `aetherops.circuit.BreakerRegistry`) learns:

* `ok: true` - the step completes with `output` (merged into the execution's variables): success.
* `ok: false` - the step fails with the agent's `error`. The agent answered, so it is up: success.
* no responders, no answer before the step's deadline, a malformed reply: the step fails, and the
  breaker counts a failure. The request's own timeout is a little shorter than the step's, so that a
  silent agent is seen as a timeout (a breaker failure) rather than as a cancellation (excused).
* breaker OPEN: the step fails at once with "circuit breaker ... is open ...", nothing is sent.

Breaker transitions are kept in `pending_transitions` until the runbook service drains them into the
outbox of its next commit (so they reach NATS as `aetherops.runbook.circuit_state_changed` events with
the same delivery guarantee as execution transitions); they are also logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from aetherops.bus import Subjects
from aetherops.circuit import BreakerRegistry, CircuitOpenError, TransitionEvent
from aetherops.clock import Clock, SystemClock
from aetherops.errors import UnavailableError

__all__ = ["AgentActionError", "AgentCall", "AgentInvoker", "AgentReplyError", "Requester"]

log = logging.getLogger("aetherops.agents")

# Leave the agent's reply this much of the step's time budget before the engine's own deadline fires.
_REQUEST_MARGIN_S = 0.05


class AgentActionError(Exception):
    """The agent answered ok=false: the step fails with its error; the agent itself is healthy."""


class AgentReplyError(UnavailableError):
    """The agent's reply could not be read: counts against the breaker."""


class Requester(Protocol):
    """The part of nats.aio.client.Client the invoker uses (so tests can fake it)."""

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any: ...  # noqa: ASYNC109


@dataclass(frozen=True)
class AgentCall:
    """Who asks: the execution and step the request is for (sent to the agent, for its logs)."""

    execution_id: str = ""
    step_id: str = ""
    tracking_id: str = ""


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AgentInvoker:
    """Sends agent requests through per-subject circuit breakers."""

    def __init__(
        self,
        requester: Requester,
        subjects: Subjects,
        *,
        clock: Clock | None = None,
        failure_threshold: int = 5,
        success_threshold: int = 1,
        reset_timeout_s: float = 30.0,
        probe_count: int = 1,
    ) -> None:
        self._requester = requester
        self._subjects = subjects
        self._clock: Clock = clock or SystemClock()
        self.breakers = BreakerRegistry(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            reset_timeout_s=reset_timeout_s,
            probe_count=probe_count,
            clock=self._clock,
            on_transition=self._on_transition,
        )
        self.pending_transitions: list[TransitionEvent] = []

    def _on_transition(self, event: TransitionEvent) -> None:
        log.warning(
            "circuit breaker %s: %s -> %s (%s)", event.name, event.from_state.value, event.to_state.value, event.reason
        )
        self.pending_transitions.append(event)

    def drain_transitions(self) -> list[TransitionEvent]:
        taken, self.pending_transitions = self.pending_transitions, []
        return taken

    def requeue_transitions(self, events: list[TransitionEvent]) -> None:
        """Give back transitions whose commit failed, so the next commit carries them."""
        self.pending_transitions[:0] = events

    def encode_request(self, name: str, params: Mapping[str, Any], timeout_s: float, call: AgentCall) -> bytes:
        deadline = self._clock.now() + timedelta(seconds=timeout_s)
        body = {
            "executionId": call.execution_id,
            "stepId": call.step_id,
            "action": f"agent:{name}",
            "parameters": dict(params),
            "trackingId": call.tracking_id,
            "deadlineTime": _rfc3339(deadline),
        }
        return json.dumps(body, default=str).encode()

    async def invoke(
        self, name: str, params: Mapping[str, Any], timeout_s: float, call: AgentCall | None = None
    ) -> dict[str, Any]:
        """The agent's output; raises (failing the step) when it fails, is silent, or its breaker is open."""
        subject = self._subjects.action(name)
        breaker = self.breakers.get(subject)
        if not breaker.allow():
            raise CircuitOpenError(subject, breaker.retry_at, self._clock.now())
        payload = self.encode_request(name, params, timeout_s, call or AgentCall())
        request_timeout = max(timeout_s - _REQUEST_MARGIN_S, timeout_s * 0.9)
        try:
            msg = await self._requester.request(subject, payload, timeout=request_timeout)
        except NoRespondersError as exc:
            breaker.record_failure(exc)
            raise UnavailableError(f"no agent is listening on {subject}") from exc
        except NatsTimeoutError as exc:
            breaker.record_failure(exc)
            raise UnavailableError(f"agent on {subject} did not answer within {request_timeout:.2f}s") from exc
        except BaseException as exc:
            # Cancellation is excused by the breaker (it only frees a probe slot); anything else counts.
            breaker.record_failure(exc)
            raise
        try:
            ok, error, output = _parse_reply(msg.data)
        except AgentReplyError as exc:
            breaker.record_failure(exc)
            raise
        breaker.record_success()
        if not ok:
            raise AgentActionError(f"agent {name} failed: {error or 'no reason given'}")
        return output


def _parse_reply(data: bytes) -> tuple[bool, str, dict[str, Any]]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentReplyError(f"agent reply is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise AgentReplyError("agent reply must be a JSON object (AgentActionReply)")
    ok = body.get("ok", False)  # proto3 JSON omits false
    error = body.get("error", "")
    output = body.get("output") or {}
    if not isinstance(ok, bool) or not isinstance(error, str) or not isinstance(output, dict):
        raise AgentReplyError("agent reply must have ok: bool, error: string, output: object")
    return ok, error, output
