"""Silences: alerts an operator expects, kept out of incidents for a time.

A planned burn raises propulsion and attitude alerts; a payload test, a safe-mode exercise or a
fault already being worked raises more. Without a way to say "expected", each of them opens or
grows an incident, pages someone and may start a runbook. A silence names what it covers (matchers:
satellites, subsystems, labels; every one that is set must match, and at least one must be set) and
a window. An alert that matches is still stored, and listed with the silence that covered it, but
opens and joins no incident.

The window is compared with the alert's own timestamp (when the satellite observed it), not with
its arrival: a satellite out of contact during its manoeuvre downlinks the alerts at the next pass,
hours after the window, and they are silenced all the same. So a silence stays in the index for
`SilenceIndex.KEEP_AFTER_END_S` after it ends, for such batches. Ending a silence early
(`Silence.expired`) moves its end to that moment: alerts observed from then on correlate again; one
that had not started yet starts and ends then, covering nothing.

Pure: no I/O; the service loads silences from PostgreSQL and keeps an index up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from aetherops.clock import EARLIEST_TIME, TOO_EARLY
from aetherops.errors import FieldViolation
from aetherops.text import id_problem, labels_problems, text_problem

__all__ = ["MAX_SILENCE", "Silence", "SilenceIndex", "end_problems", "silence_problems"]

MAX_SILENCE = timedelta(days=31)
"""Longest window of one silence: one that never ends would hide a real fault for ever."""

MAX_MATCHERS = 256
"""Most satellites, and most subsystems, one silence may name."""

MAX_COMMENT_LEN = 4096


@dataclass(frozen=True, slots=True)
class Silence:
    """A window in which alerts that match are kept out of incidents.

    `subsystems` holds canonical names (aliases resolved by the dependency graph) once the service
    has stored it; `labels` must all equal the alert's. Empty matchers match anything.
    """

    silence_id: str
    start_time: datetime
    end_time: datetime
    comment: str
    satellite_ids: frozenset[str] = frozenset()
    subsystems: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    created_by: str = ""
    create_time: datetime | None = None
    expired_by: str = ""
    expire_time: datetime | None = None

    def covers(self, satellite_id: str, subsystem: str, labels: Mapping[str, str], when: datetime) -> bool:
        """Whether an alert (its canonical subsystem, observed at `when`) is silenced by this."""
        if not self.start_time <= when < self.end_time:
            return False
        if self.satellite_ids and satellite_id not in self.satellite_ids:
            return False
        if self.subsystems and subsystem not in self.subsystems:
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())

    def is_over(self, now: datetime) -> bool:
        return self.end_time <= now

    def expired(self, now: datetime, by: str) -> Silence:
        """This silence ended at `now` (no later than it would have ended anyway).

        One that has not started yet never starts: its window becomes `[now, now)`, covering nothing
        (as Alertmanager expires a pending silence). Moving only its end would leave the end before
        the start, listed as such, and kept as "not yet ended" until its start passed.
        """
        if now < self.start_time:
            return replace(self, start_time=now, end_time=now, expired_by=by, expire_time=now)
        return replace(self, end_time=min(self.end_time, now), expired_by=by, expire_time=now)


def silence_problems(
    silence: Silence, *, field_prefix: str = "silence", start_given: bool = True
) -> list[FieldViolation]:
    """Every problem with a silence to create (empty if it is fine); fields named as in the proto.

    Whether it can still cover an alert is `end_problems`' to say. `start_given` False: the start is a
    stand-in for the creation time (now; for a retry, its first call's, known only once the request
    is looked up), so an end not after it is left to `end_problems` too.
    """
    f = field_prefix + "."
    out: list[FieldViolation] = []
    if not (silence.satellite_ids or silence.subsystems or silence.labels):
        out.append(
            FieldViolation(
                f + "satellite_ids",
                "set at least one matcher (satellite_ids, subsystems or labels): a silence of every alert"
                " would hide every fault",
            )
        )
    for name in ("satellite_ids", "subsystems"):
        values: frozenset[str] = getattr(silence, name)
        if len(values) > MAX_MATCHERS:
            out.append(FieldViolation(f + name, f"at most {MAX_MATCHERS} entries, got {len(values)}"))
            continue
        for value in sorted(values):
            problem = id_problem(value)
            if problem is not None:
                out.append(FieldViolation(f + name, f"{value[:32]!r} {problem}"))
    out.extend(labels_problems(silence.labels, f + "labels"))
    problem = text_problem(silence.comment, MAX_COMMENT_LEN)
    if problem is not None:
        out.append(FieldViolation(f + "comment", problem))
    elif not silence.comment.strip():
        out.append(FieldViolation(f + "comment", "required: say why (the manoeuvre, the test, the ticket)"))
    start, end = silence.start_time, silence.end_time
    if start < EARLIEST_TIME:
        out.append(FieldViolation(f + "start_time", TOO_EARLY))
    if end <= start:
        if start_given:
            out.append(FieldViolation(f + "end_time", "must be after start_time"))
    elif end - start > MAX_SILENCE:
        out.append(FieldViolation(f + "end_time", f"at most {MAX_SILENCE.days} days after start_time"))
    return out


def end_problems(
    silence: Silence, now: datetime, *, field_prefix: str = "silence", start_given: bool = True
) -> list[FieldViolation]:
    """The problem with creating, at `now`, a silence that can cover no alert any more (empty if it can).

    A window that ended still covers alerts observed in it and downlinked later, for
    `SilenceIndex.KEEP_AFTER_END_S`: silencing a past manoeuvre's alerts before the next pass brings
    them down is what it is for. One that ended longer ago than that covers nothing: a wrong date,
    said so rather than answered with a silence that silences nothing. Apart from `silence_problems`
    because it depends on when it is asked: a retry of a silence created in time must still answer
    with it later (the service checks this after the idempotency look-up). `start_given` False: the
    window starts at `now`, so it must end after it (see `silence_problems`).
    """
    field = field_prefix + ".end_time"
    reach = timedelta(seconds=SilenceIndex.KEEP_AFTER_END_S)
    if silence.end_time <= now - reach:
        return [
            FieldViolation(
                field,
                f"ended more than {reach.days} days before now ({now.isoformat()}): alerts observed in its window"
                f" and downlinked up to {reach.days} days after its end are covered, so this one could cover none",
            )
        ]
    if not start_given and silence.end_time <= now:
        return [FieldViolation(field, "must be after start_time (now, when start_time is not given)")]
    return []


class SilenceIndex:
    """The silences that can still match an alert, by satellite, for the ingest path.

    `match` costs one truth test while there are none. `canonical` maps an alert's subsystem to the
    name silences store (the dependency graph's `canonical`).
    """

    KEEP_AFTER_END_S = 7 * 86_400.0
    """How long after its end a silence still matches alerts observed in its window (a downlinked
    batch arrives at the next pass, seldom days later)."""

    def __init__(self, canonical: Callable[[str], str]) -> None:
        self._canonical = canonical
        self._all: dict[str, Silence] = {}
        self._by_satellite: dict[str, list[Silence]] = {}
        self._any_satellite: list[Silence] = []

    def __bool__(self) -> bool:
        return bool(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def replace_all(self, silences: Iterable[Silence], now: datetime) -> None:
        """Holds exactly these (those still within reach of late alerts)."""
        self._all = {s.silence_id: s for s in silences if not self._gone(s, now)}
        self._rebuild()

    def put(self, silence: Silence, now: datetime) -> None:
        """Adds or replaces one silence (created or expired here, before the next reload)."""
        self._all.pop(silence.silence_id, None)
        if not self._gone(silence, now):
            self._all[silence.silence_id] = silence
        self._rebuild()

    def match(self, satellite_id: str, subsystem: str, labels: Mapping[str, str], when: datetime) -> Silence | None:
        """The silence covering an alert, if any (the one created first, when several do)."""
        candidates = self._by_satellite.get(satellite_id, ())
        if not (candidates or self._any_satellite):
            return None
        canonical = self._canonical(subsystem)
        found = [s for s in (*candidates, *self._any_satellite) if s.covers(satellite_id, canonical, labels, when)]
        return min(found, key=lambda s: s.silence_id) if found else None

    def _gone(self, silence: Silence, now: datetime) -> bool:
        # An empty window (expired before it started) covers nothing, late alerts included.
        empty = silence.end_time <= silence.start_time
        return empty or (now - silence.end_time).total_seconds() > self.KEEP_AFTER_END_S

    def _rebuild(self) -> None:
        by_satellite: dict[str, list[Silence]] = {}
        anywhere: list[Silence] = []
        for s in self._all.values():
            if not s.satellite_ids:
                anywhere.append(s)
            for sat in s.satellite_ids:
                by_satellite.setdefault(sat, []).append(s)
        self._by_satellite, self._any_satellite = by_satellite, anywhere
