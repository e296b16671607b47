"""Adaptive rate limiting per "principal|service": token bucket and sliding window strategies.

Both strategies sit behind one protocol, `RateLimiter.try_acquire(key, cost) -> Decision`, keep their
state per key in process, expose their current level for dashboards (`TokenBucket.tokens`,
`SlidingWindow.count`) and serialise it to and from a plain, JSON-friendly dict.

`AdaptiveLimiter` wraps either one and tightens every limit by `factor` while the ingest queue is
busy (utilisation above `tighten_at`), relaxing back to normal only once it drops below `relax_at`;
in between it keeps its current setting (hysteresis), so the limit does not flap around one threshold.

Replicas share token buckets through Redis: `REDIS_TOKEN_BUCKET_LUA` is the one atomic script run
per decision, `redis_token_bucket_call` builds its KEYS/ARGV and `decode_redis_reply` turns its reply
into a `Decision`. The Redis I/O itself lives outside this pure module.

A `Decision.retry_after_s` of `math.inf` means the cost can never fit under the current limit (it
exceeds the burst capacity or the window limit); callers should not ask the client to retry then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol

from aetherops.clock import Clock, SystemClock
from aetherops.errors import ConfigError, FieldViolation, ValidationError

__all__ = [
    "KEY_SEPARATOR",
    "REDIS_KEY_PREFIX",
    "REDIS_TOKEN_BUCKET_LUA",
    "AdaptiveLimiter",
    "Decision",
    "RateLimiter",
    "SlidingWindow",
    "TokenBucket",
    "decode_redis_reply",
    "limit_key",
    "redis_token_bucket_call",
]

KEY_SEPARATOR = "|"

# Slack for float comparisons, so that e.g. 10 s of refill at 0.1 token/s buys a whole token.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Decision:
    """The outcome of one `try_acquire`: `remaining` and `limit` are in the caller's cost units."""

    allowed: bool
    retry_after_s: float
    remaining: float
    limit: float


class RateLimiter(Protocol):
    """Anything that decides, per key, whether a request of `cost` units may go ahead now."""

    def try_acquire(self, key: str, cost: float = 1.0) -> Decision: ...


def limit_key(principal: str, service: str) -> str:
    """The limiter key of a principal calling a service: "principal|service"."""
    violations = []
    for field, value in (("principal", principal), ("service", service)):
        if not value:
            violations.append(FieldViolation(field, "must not be empty"))
        elif KEY_SEPARATOR in value:
            # Otherwise ("a|b", "c") and ("a", "b|c") would share one limit.
            violations.append(FieldViolation(field, f"must not contain {KEY_SEPARATOR!r}"))
    if violations:
        raise ValidationError(violations)
    return f"{principal}{KEY_SEPARATOR}{service}"


def _is_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _require_positive(**settings: object) -> None:
    """Raise one ConfigError naming every setting that is not a positive finite number."""
    bad = [name for name, value in settings.items() if not _is_positive(value)]
    if bad:
        problems = (f"{n} must be a positive finite number, got {settings[n]!r}" for n in bad)
        raise ConfigError("; ".join(problems))


def _check_cost(cost: float) -> None:
    if not _is_positive(cost):
        raise ValueError(f"cost must be a positive finite number, got {cost!r}")


def _check_kind(state: Mapping[str, Any], kind: str) -> None:
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        raise ValueError(f"not a serialised {kind} limiter: {state!r:.200}")


def _setting(state: Mapping[str, Any], name: str) -> Any:
    return state.get(name)


def _timestamp(clock: Clock) -> float:
    return clock.now().timestamp()


class TokenBucket:
    """Per key, `burst_capacity` tokens refilled at `refill_rate_per_s`; a request takes `cost` tokens."""

    def __init__(self, burst_capacity: float, refill_rate_per_s: float, clock: Clock | None = None) -> None:
        _require_positive(burst_capacity=burst_capacity, refill_rate_per_s=refill_rate_per_s)
        self.burst_capacity = float(burst_capacity)
        self.refill_rate_per_s = float(refill_rate_per_s)
        self._clock: Clock = clock or SystemClock()
        # key -> (tokens, epoch seconds they were counted at); an absent key has a full bucket.
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, updated = self._buckets.get(key, (self.burst_capacity, now))
        # max(): a clock stepping backwards must not drain the bucket.
        return min(self.burst_capacity, tokens + max(0.0, now - updated) * self.refill_rate_per_s)

    def tokens(self, key: str) -> float:
        """The tokens `key` has right now (for dashboards); does not change any state."""
        return self._level(key, _timestamp(self._clock))

    def try_acquire(self, key: str, cost: float = 1.0) -> Decision:
        _check_cost(cost)
        now = _timestamp(self._clock)
        tokens = self._level(key, now)
        allowed = tokens + _EPSILON >= cost
        if allowed:
            tokens = max(0.0, tokens - cost)
            retry_after = 0.0
        elif cost > self.burst_capacity:
            retry_after = math.inf
        else:
            retry_after = (cost - tokens) / self.refill_rate_per_s
        self._buckets[key] = (tokens, now)
        return Decision(allowed, retry_after, tokens, self.burst_capacity)

    def prune(self) -> int:
        """Forget keys whose bucket has refilled (same as never seen); returns how many were dropped."""
        now = _timestamp(self._clock)
        before = len(self._buckets)
        self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst_capacity}
        return before - len(self._buckets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "token_bucket",
            "burst_capacity": self.burst_capacity,
            "refill_rate_per_s": self.refill_rate_per_s,
            "buckets": {k: {"tokens": t, "updated": u} for k, (t, u) in self._buckets.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], clock: Clock | None = None) -> TokenBucket:
        _check_kind(state, "token_bucket")
        # A missing setting reaches the constructor as None, which names it in its ConfigError.
        limiter = cls(_setting(state, "burst_capacity"), _setting(state, "refill_rate_per_s"), clock)
        try:
            buckets = state["buckets"].items()
            limiter._buckets = {str(k): (float(v["tokens"]), float(v["updated"])) for k, v in buckets}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed token bucket state: {exc!r}") from exc
        return limiter


class SlidingWindow:
    """Per key, at most `limit` cost units in any `window_s`, counted in `window_count` sub-windows.

    A sub-window of `window_s / window_count` seconds leaves the window all at once, so more
    sub-windows mean a smoother limit at the price of a little more state per key.
    """

    def __init__(
        self,
        limit: float,
        window_s: float,
        window_count: int = 10,
        clock: Clock | None = None,
    ) -> None:
        problems = []
        try:
            _require_positive(limit=limit, window_s=window_s)
        except ConfigError as exc:
            problems.append(str(exc))
        if not (isinstance(window_count, int) and window_count >= 1):
            problems.append(f"window_count must be a positive integer, got {window_count!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.limit = float(limit)
        self.window_s = float(window_s)
        self.window_count = window_count
        self._slot_s = self.window_s / window_count
        self._clock: Clock = clock or SystemClock()
        # key -> {sub-window index (epoch seconds // slot length): cost counted in it}
        self._windows: dict[str, dict[int, float]] = {}

    def _live(self, key: str, now: float) -> tuple[int, dict[int, float]]:
        current = math.floor(now / self._slot_s)
        slots = self._windows.get(key, {})
        return current, {i: n for i, n in slots.items() if i > current - self.window_count}

    def count(self, key: str) -> float:
        """The cost `key` has used in the current window (for dashboards); does not change any state."""
        return sum(self._live(key, _timestamp(self._clock))[1].values())

    def try_acquire(self, key: str, cost: float = 1.0) -> Decision:
        _check_cost(cost)
        now = _timestamp(self._clock)
        current, slots = self._live(key, now)
        used = sum(slots.values())
        allowed = used + cost <= self.limit + _EPSILON
        if allowed:
            slots[current] = slots.get(current, 0.0) + cost
            used += cost
            retry_after = 0.0
        elif cost > self.limit:
            retry_after = math.inf
        else:
            retry_after = self._retry_after(slots, used + cost - self.limit, now)
        self._windows[key] = slots  # also drops the sub-windows that have left the window
        return Decision(allowed, retry_after, max(0.0, self.limit - used), self.limit)

    def _retry_after(self, slots: dict[int, float], excess: float, now: float) -> float:
        """Seconds until enough of the oldest sub-windows leave the window to free `excess` units."""
        order = sorted(slots)
        leaves_at = [(i + self.window_count) * self._slot_s for i in order]
        freed = accumulate(slots[i] for i in order)
        # Once every sub-window has left, the request fits (its cost is within the limit).
        enough = (t for t, f in zip(leaves_at, freed, strict=True) if f + _EPSILON >= excess)
        return max(0.0, next(enough, leaves_at[-1]) - now)

    def prune(self) -> int:
        """Forget keys with nothing left in their window; returns how many were dropped."""
        now = _timestamp(self._clock)
        before = len(self._windows)
        live = {k: self._live(k, now)[1] for k in self._windows}
        self._windows = {k: slots for k, slots in live.items() if slots}
        return before - len(self._windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "sliding_window",
            "limit": self.limit,
            "window_s": self.window_s,
            "window_count": self.window_count,
            # Lists of [index, cost] pairs rather than dicts: JSON object keys would turn into strings.
            "windows": {k: [[i, n] for i, n in sorted(slots.items())] for k, slots in self._windows.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], clock: Clock | None = None) -> SlidingWindow:
        _check_kind(state, "sliding_window")
        limit, window_s = _setting(state, "limit"), _setting(state, "window_s")
        limiter = cls(limit, window_s, _setting(state, "window_count"), clock)
        try:
            windows = state["windows"].items()
            limiter._windows = {str(k): {int(i): float(n) for i, n in pairs} for k, pairs in windows}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed sliding window state: {exc!r}") from exc
        return limiter


class AdaptiveLimiter:
    """Wraps a limiter and scales its limits by `factor` while the ingest queue is under pressure.

    Tightening works by charging `cost / factor` to the inner limiter, which shrinks burst, refill rate
    and window limit alike for every key at once, and takes effect (and is undone) immediately.
    Decisions are reported back in the caller's units, i.e. against the tightened limit.
    """

    def __init__(
        self,
        inner: RateLimiter,
        tighten_at: float = 0.8,
        relax_at: float = 0.4,
        factor: float = 0.5,
    ) -> None:
        problems = []
        if not 0 <= relax_at < tighten_at <= 1:
            problems.append(
                f"need 0 <= relax_at < tighten_at <= 1, got relax_at={relax_at!r}, tighten_at={tighten_at!r}"
            )
        if not 0 < factor <= 1:
            problems.append(f"factor must be in (0, 1], got {factor!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.inner = inner
        self.tighten_at = tighten_at
        self.relax_at = relax_at
        self.factor = factor
        self._tightened = False

    @property
    def tightened(self) -> bool:
        return self._tightened

    @property
    def current_factor(self) -> float:
        """The multiplier applied to every limit right now: `factor` when tightened, else 1.0."""
        return self.factor if self._tightened else 1.0

    def observe_utilisation(self, utilisation: float) -> bool:
        """Feed the ingest queue utilisation (0..1; above 1 counts as over); True when the setting changed."""
        if not (isinstance(utilisation, int | float) and math.isfinite(utilisation) and utilisation >= 0):
            raise ValueError(f"utilisation must be a finite number >= 0, got {utilisation!r}")
        before = self._tightened
        if utilisation > self.tighten_at:
            self._tightened = True
        elif utilisation < self.relax_at:
            self._tightened = False
        return self._tightened != before

    def try_acquire(self, key: str, cost: float = 1.0) -> Decision:
        _check_cost(cost)
        factor = self.current_factor
        inner = self.inner.try_acquire(key, cost / factor)
        return Decision(inner.allowed, inner.retry_after_s, inner.remaining * factor, inner.limit * factor)


REDIS_KEY_PREFIX = "aetherops:ratelimit:tb:"

# One atomic decision for a token bucket kept in a Redis hash {tokens, ts}; same arithmetic as TokenBucket.
# KEYS[1] = REDIS_KEY_PREFIX .. "principal|service"
# ARGV[1] = burst capacity, ARGV[2] = refill rate per second, ARGV[3] = cost,
# ARGV[4] = now in epoch seconds, or "" to use the Redis server's clock (one clock for every replica).
# Returns {allowed (1/0), tokens left, retry_after_s (-1: never fits), capacity}; the numbers are strings
# because Redis truncates Lua numbers in replies to integers. The key expires once the bucket would be
# full again, which is the same as an absent key.
REDIS_TOKEN_BUCKET_LUA = """
local function num(x) return string.format('%.17g', x) end
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local retry_after = 0
if tokens + 1e-9 >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
elseif cost > capacity then
  retry_after = -1
else
  retry_after = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', num(tokens), 'ts', num(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {allowed, num(tokens), num(retry_after), num(capacity)}
"""


def redis_token_bucket_call(
    key: str, burst_capacity: float, refill_rate_per_s: float, cost: float = 1.0, now_s: float | None = None
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV for one `REDIS_TOKEN_BUCKET_LUA` decision (`now_s=None`: Redis server time)."""
    _require_positive(burst_capacity=burst_capacity, refill_rate_per_s=refill_rate_per_s)
    _check_cost(cost)
    # repr() of a float round-trips exactly and Lua's tonumber reads it ("1e-05", "0.1", ...).
    args = [repr(float(burst_capacity)), repr(float(refill_rate_per_s)), repr(float(cost))]
    return [REDIS_KEY_PREFIX + key], [*args, "" if now_s is None else repr(float(now_s))]


def _reply_number(item: object) -> float:
    text = item.decode() if isinstance(item, bytes) else item
    return float(text)  # type: ignore[arg-type]


def decode_redis_reply(reply: object) -> Decision:
    """The `Decision` in a `REDIS_TOKEN_BUCKET_LUA` reply (items as int, bytes or str)."""
    try:
        items: Any = reply
        allowed, tokens, retry_after, capacity = (_reply_number(item) for item in items)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed rate limit reply from Redis: {reply!r:.200}") from exc
    return Decision(allowed == 1, math.inf if retry_after < 0 else retry_after, tokens, capacity)
