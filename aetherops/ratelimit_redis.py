"""Token buckets shared by every replica through Redis, with an in-process fallback.

Each decision is one EVALSHA of `REDIS_TOKEN_BUCKET_LUA` (atomic on the Redis server, so concurrent
callers on any number of replicas never take more than the burst). The arithmetic, keys and reply
format are the pure module's (`aetherops.ratelimit`); this module only does the I/O.

When Redis cannot be reached the limiter decides with an in-process `TokenBucket` of the same size
(each replica then limits on its own: looser across the fleet, but never unlimited), sets `degraded`
and logs one line per change of state, not one per call. While degraded it tries Redis again at most
every `retry_interval_s`, so an absent Redis does not add a connect timeout to every call.
`probe()` (a PING, off the calls' path) lets the server notice a loss or a recovery without traffic,
and report it in health.

Adaptive tightening works as in `AdaptiveLimiter`: the cost charged is `cost / factor()`, and the
decision is reported in the caller's units against the tightened limit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aetherops.clock import Clock
from aetherops.ratelimit import (
    REDIS_TOKEN_BUCKET_LUA,
    Decision,
    TokenBucket,
    decode_redis_reply,
    redis_token_bucket_call,
)

__all__ = ["RedisTokenBucket"]

log = logging.getLogger("aetherops.ratelimit")

_SCRIPT_SHA = hashlib.sha1(REDIS_TOKEN_BUCKET_LUA.encode()).hexdigest()
# Failures that mean "Redis is away" (fall back); anything else is a bug and propagates.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisTokenBucket:
    """An async token bucket per key, kept in Redis; falls back to an in-process bucket.

    `key_prefix` is put in front of every key (after the module's own Redis prefix), to keep tests or
    tenants apart. `clock`: None uses the Redis server's clock (one clock for all replicas); a clock
    makes decisions deterministic (tests, simulations) and also drives the fallback bucket.
    """

    def __init__(
        self,
        client: redis.Redis,
        burst_capacity: float,
        refill_rate_per_s: float,
        *,
        factor: Callable[[], float] = lambda: 1.0,
        key_prefix: str = "",
        clock: Clock | None = None,
        retry_interval_s: float = 5.0,
    ) -> None:
        # The fallback validates the sizes (ConfigError) before anything talks to Redis.
        self._fallback = TokenBucket(burst_capacity, refill_rate_per_s, clock)
        self._client = client
        self.burst_capacity = float(burst_capacity)
        self.refill_rate_per_s = float(refill_rate_per_s)
        self._factor = factor
        self.key_prefix = key_prefix
        self._clock = clock
        self.retry_interval_s = retry_interval_s
        self._degraded = False
        self._retry_at = 0.0

    @classmethod
    def from_url(
        cls,
        url: str,
        burst_capacity: float,
        refill_rate_per_s: float,
        *,
        factor: Callable[[], float] = lambda: 1.0,
        key_prefix: str = "",
        clock: Clock | None = None,
        retry_interval_s: float = 5.0,
        timeout_s: float = 0.5,
        max_connections: int = 16,
    ) -> RedisTokenBucket:
        """A limiter with its own connection pool; short timeouts, since a decision sits on every RPC's path.

        The pool is bounded: a burst of concurrent calls queues (for at most `timeout_s`) for one of
        `max_connections` connections instead of opening one each. Unbounded, 200 simultaneous decisions
        on a loaded machine opened 200 connections, ran past the timeout and made a healthy Redis look
        unreachable (the limits fell back to per-process ones, i.e. loosened, under load).
        """
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )
        client = redis.Redis.from_pool(pool)  # the client owns the pool: close() releases it
        return cls(
            client,
            burst_capacity,
            refill_rate_per_s,
            factor=factor,
            key_prefix=key_prefix,
            clock=clock,
            retry_interval_s=retry_interval_s,
        )

    @property
    def degraded(self) -> bool:
        """True while decisions come from the in-process fallback because Redis is unreachable."""
        return self._degraded

    @property
    def fallback(self) -> TokenBucket:
        return self._fallback

    async def try_acquire(self, key: str, cost: float = 1.0) -> Decision:
        factor = self._factor()
        charged = cost / factor
        decision = await self._decide(self.key_prefix + key, charged)
        return Decision(decision.allowed, decision.retry_after_s, decision.remaining * factor, decision.limit * factor)

    async def _decide(self, key: str, cost: float) -> Decision:
        if self._degraded and time.monotonic() < self._retry_at:
            return self._fallback.try_acquire(key, cost)
        now_s = None if self._clock is None else self._clock.now().timestamp()
        keys, args = redis_token_bucket_call(key, self.burst_capacity, self.refill_rate_per_s, cost, now_s)
        try:
            reply = await self._evalsha(keys, args)
        except _UNREACHABLE as exc:
            self._set_degraded(True, exc)
            self._retry_at = time.monotonic() + self.retry_interval_s
            return self._fallback.try_acquire(key, cost)
        self._set_degraded(False)
        return decode_redis_reply(reply)

    async def probe(self) -> bool:
        """PINGs Redis and updates `degraded` (logging a change of state); True while limits are shared.

        The server calls it periodically, so health follows Redis without waiting for a call, and a
        recovered Redis is used again at once instead of after `retry_interval_s`.
        """
        try:
            await self._client.ping()
        except _UNREACHABLE as exc:
            self._set_degraded(True, exc)
            self._retry_at = time.monotonic() + self.retry_interval_s
            return False
        self._set_degraded(False)
        return True

    async def _evalsha(self, keys: list[str], args: list[str]) -> object:
        try:
            return await self._client.evalsha(_SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            # First call against this Redis (or after SCRIPT FLUSH / a restart): load it once, retry.
            await self._client.script_load(REDIS_TOKEN_BUCKET_LUA)
            return await self._client.evalsha(_SCRIPT_SHA, len(keys), *keys, *args)

    def _set_degraded(self, degraded: bool, exc: BaseException | None = None) -> None:
        if degraded == self._degraded:
            return
        self._degraded = degraded
        if degraded:
            # The exception type only: a Redis URL in a message could carry a password.
            log.warning(
                "Redis unreachable (%s): rate limits fall back to this process's own buckets",
                type(exc).__name__,
                extra={"ratelimit_degraded": True},
            )
        else:
            log.warning(
                "Redis reachable again: rate limits are shared across replicas", extra={"ratelimit_degraded": False}
            )

    async def close(self) -> None:
        await self._client.aclose()
