"""Unit tests of aetherops.ratelimit: both strategies, adaptation, serialisation and the Redis helpers."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from aetherops.clock import ManualClock
from aetherops.errors import ConfigError, FieldViolation, ValidationError
from aetherops.ratelimit import (
    REDIS_KEY_PREFIX,
    REDIS_TOKEN_BUCKET_LUA,
    AdaptiveLimiter,
    Decision,
    RateLimiter,
    SlidingWindow,
    TokenBucket,
    decode_redis_reply,
    limit_key,
    redis_token_bucket_call,
)

KEY = "alice|ingest"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- keys ---------------------------------------------------------------------------------------


def test_limit_key_joins_principal_and_service() -> None:
    assert limit_key("alice", "ingest") == "alice|ingest"


def test_limit_key_reports_every_bad_part_at_once() -> None:
    with pytest.raises(ValidationError) as err:
        limit_key("", "a|b")
    assert err.value.violations == [
        FieldViolation("principal", "must not be empty"),
        FieldViolation("service", "must not contain '|'"),
    ]


def test_limit_key_rejects_separator_in_principal() -> None:
    with pytest.raises(ValidationError) as err:
        limit_key("a|b", "ingest")
    assert [v.field for v in err.value.violations] == ["principal"]


# --- token bucket ---------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_denies_with_retry_after(clock: ManualClock) -> None:
    bucket = TokenBucket(burst_capacity=3, refill_rate_per_s=0.5, clock=clock)
    decisions = [bucket.try_acquire(KEY) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2.0, 1.0, 0.0, 0.0]
    assert decisions[-1] == Decision(allowed=False, retry_after_s=2.0, remaining=0.0, limit=3.0)


def test_token_bucket_refills_at_its_rate_up_to_capacity(clock: ManualClock) -> None:
    bucket = TokenBucket(burst_capacity=2, refill_rate_per_s=0.1, clock=clock)
    bucket.try_acquire(KEY, cost=2)
    clock.advance(5)
    assert bucket.tokens(KEY) == pytest.approx(0.5)
    assert bucket.try_acquire(KEY).retry_after_s == pytest.approx(5.0)
    clock.advance(5)
    # 10 s at 0.1/s is a whole token despite float rounding.
    assert bucket.try_acquire(KEY).allowed
    clock.advance(3600)
    assert bucket.tokens(KEY) == 2.0


def test_token_bucket_tolerates_float_rounding_in_refills(clock: ManualClock) -> None:
    bucket = TokenBucket(1, 0.1, clock)
    bucket.try_acquire(KEY)
    # Ten refills of 0.1 add up to 0.9999999999999999, which must still buy a whole token.
    outcomes = []
    for _ in range(10):
        clock.advance(1)
        outcomes.append(bucket.try_acquire(KEY).allowed)
    assert outcomes == [False] * 9 + [True]


def test_token_bucket_keys_are_independent(clock: ManualClock) -> None:
    bucket = TokenBucket(1, 1, clock)
    assert bucket.try_acquire("alice|ingest").allowed
    assert not bucket.try_acquire("alice|ingest").allowed
    assert bucket.try_acquire("bob|ingest").allowed
    assert bucket.tokens("carol|ingest") == 1.0


def test_token_bucket_cost_above_capacity_never_fits(clock: ManualClock) -> None:
    bucket = TokenBucket(2, 1, clock)
    decision = bucket.try_acquire(KEY, cost=3)
    assert not decision.allowed
    assert decision.retry_after_s == math.inf
    assert bucket.tokens(KEY) == 2.0


def test_token_bucket_tokens_does_not_consume(clock: ManualClock) -> None:
    bucket = TokenBucket(5, 1, clock)
    bucket.try_acquire(KEY, cost=2.5)
    assert bucket.tokens(KEY) == 2.5
    assert bucket.tokens(KEY) == 2.5


def test_token_bucket_clock_stepping_back_does_not_drain_or_refill(clock: ManualClock) -> None:
    bucket = TokenBucket(5, 1, clock)
    bucket.try_acquire(KEY, cost=3)
    clock.advance(-10)
    assert bucket.tokens(KEY) == 2.0


def test_token_bucket_prune_forgets_only_full_buckets(clock: ManualClock) -> None:
    bucket = TokenBucket(4, 1, clock)
    bucket.try_acquire("a|s", cost=1)
    bucket.try_acquire("b|s", cost=4)
    clock.advance(1)
    assert bucket.prune() == 1
    assert list(bucket.to_dict()["buckets"]) == ["b|s"]
    assert bucket.tokens("b|s") == 1.0


def test_token_bucket_round_trips_through_a_json_dict(clock: ManualClock) -> None:
    bucket = TokenBucket(10, 2, clock)
    bucket.try_acquire("a|s", cost=7)
    bucket.try_acquire("b|s", cost=1.5)
    state = json.loads(json.dumps(bucket.to_dict()))
    restored = TokenBucket.from_dict(state, clock)
    assert restored.to_dict() == bucket.to_dict()
    clock.advance(1)
    assert restored.tokens("a|s") == bucket.tokens("a|s") == 5.0
    assert restored.try_acquire("b|s", cost=9) == bucket.try_acquire("b|s", cost=9)


@pytest.mark.parametrize(
    "buckets",
    [
        {},
        {"buckets": []},
        {"buckets": {"k": {"tokens": 1}}},
        {"buckets": {"k": 3}},
        {"buckets": {"k": {"tokens": "x"}}},
    ],
)
def test_token_bucket_from_dict_rejects_malformed_state(buckets: dict[str, Any], clock: ManualClock) -> None:
    state = {"kind": "token_bucket", "burst_capacity": 1, "refill_rate_per_s": 1, **buckets}
    with pytest.raises(ValueError, match="malformed token bucket state"):
        TokenBucket.from_dict(state, clock)


@pytest.mark.parametrize("state", [{"kind": "sliding_window"}, {}, ["token_bucket"]])
def test_token_bucket_from_dict_rejects_other_kinds(state: Any) -> None:
    with pytest.raises(ValueError, match="not a serialised token_bucket limiter"):
        TokenBucket.from_dict(state)


def test_token_bucket_from_dict_validates_settings() -> None:
    with pytest.raises(ConfigError, match="burst_capacity"):
        TokenBucket.from_dict({"kind": "token_bucket", "refill_rate_per_s": 1, "buckets": {}})


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "3", None])
def test_token_bucket_rejects_non_positive_settings_naming_each(bad: Any) -> None:
    with pytest.raises(ConfigError) as err:
        TokenBucket(bad, bad)
    assert "burst_capacity must be a positive finite number" in str(err.value)
    assert "refill_rate_per_s must be a positive finite number" in str(err.value)


@pytest.mark.parametrize("cost", [0, -1, math.nan, math.inf])
def test_try_acquire_rejects_bad_costs(cost: float, clock: ManualClock) -> None:
    limiters: list[RateLimiter] = [
        TokenBucket(1, 1, clock),
        SlidingWindow(1, 1, 1, clock),
        AdaptiveLimiter(TokenBucket(1, 1, clock)),
    ]
    for limiter in limiters:
        with pytest.raises(ValueError, match="cost must be a positive finite number"):
            limiter.try_acquire(KEY, cost)


def test_default_clock_is_the_system_clock() -> None:
    assert TokenBucket(1, 1).try_acquire(KEY).allowed
    assert SlidingWindow(1, 60).try_acquire(KEY).allowed


# --- sliding window -------------------------------------------------------------------------------


def test_sliding_window_allows_up_to_the_limit_then_waits_for_oldest_sub_window(clock: ManualClock) -> None:
    window = SlidingWindow(limit=3, window_s=10, window_count=5, clock=clock)  # 2 s sub-windows
    assert window.try_acquire(KEY).allowed
    clock.advance(3)
    assert window.try_acquire(KEY).allowed
    assert window.try_acquire(KEY) == Decision(allowed=True, retry_after_s=0.0, remaining=0.0, limit=3.0)
    denied = window.try_acquire(KEY)
    # The first request's sub-window [0 s, 2 s) leaves the window at 10 s; we are at 3 s.
    assert denied == Decision(allowed=False, retry_after_s=7.0, remaining=0.0, limit=3.0)
    clock.advance(6.5)
    assert not window.try_acquire(KEY).allowed
    clock.advance(0.5)
    assert window.try_acquire(KEY).allowed
    assert window.count(KEY) == 3.0


def test_sliding_window_retry_after_frees_enough_sub_windows_for_the_cost(clock: ManualClock) -> None:
    window = SlidingWindow(limit=4, window_s=4, window_count=4, clock=clock)  # 1 s sub-windows
    for _ in range(4):
        assert window.try_acquire(KEY).allowed
        clock.advance(1)
    clock.advance(-1)  # at 3 s; sub-windows 0, 1, 2 and 3 each hold one unit
    decision = window.try_acquire(KEY, cost=3)
    # Three units must leave: sub-window 2 leaves at 6 s.
    assert decision.retry_after_s == 3.0
    clock.advance(3)
    assert window.try_acquire(KEY, cost=3).allowed


def test_sliding_window_tolerates_float_rounding_in_costs(clock: ManualClock) -> None:
    window = SlidingWindow(0.3, 10, 10, clock)
    assert window.try_acquire(KEY, cost=0.1).allowed
    assert window.try_acquire(KEY, cost=0.2).allowed  # 0.1 + 0.2 = 0.30000000000000004
    assert not window.try_acquire(KEY, cost=0.1).allowed


def test_sliding_window_cost_above_limit_never_fits(clock: ManualClock) -> None:
    window = SlidingWindow(2, 10, 10, clock)
    assert window.try_acquire(KEY, cost=2.5).retry_after_s == math.inf
    assert window.count(KEY) == 0.0


def test_sliding_window_count_drops_expired_sub_windows(clock: ManualClock) -> None:
    window = SlidingWindow(10, 10, 10, clock)
    window.try_acquire(KEY, cost=2)
    clock.advance(5)
    window.try_acquire(KEY, cost=3)
    assert window.count(KEY) == 5.0
    clock.advance(5)
    assert window.count(KEY) == 3.0
    assert window.count("nobody|ingest") == 0.0


def test_sliding_window_prune_forgets_idle_keys(clock: ManualClock) -> None:
    window = SlidingWindow(10, 10, 10, clock)
    window.try_acquire("a|s")
    clock.advance(5)
    window.try_acquire("b|s")
    clock.advance(6)
    assert window.prune() == 1
    assert list(window.to_dict()["windows"]) == ["b|s"]
    assert window.count("b|s") == 1.0


def test_sliding_window_round_trips_through_a_json_dict(clock: ManualClock) -> None:
    window = SlidingWindow(5, 6, 3, clock)
    window.try_acquire("a|s", cost=2)
    clock.advance(2)
    window.try_acquire("a|s", cost=1.5)
    window.try_acquire("b|s")
    state = json.loads(json.dumps(window.to_dict()))
    restored = SlidingWindow.from_dict(state, clock)
    assert restored.to_dict() == window.to_dict()
    assert restored.count("a|s") == 3.5
    assert restored.try_acquire("a|s", cost=2) == window.try_acquire("a|s", cost=2)


@pytest.mark.parametrize(
    "windows",
    [None, {"k": [[1]]}, {"k": [["x", 1]]}, {"k": 5}],
)
def test_sliding_window_from_dict_rejects_malformed_state(windows: Any, clock: ManualClock) -> None:
    state = {"kind": "sliding_window", "limit": 1, "window_s": 1, "window_count": 1, "windows": windows}
    with pytest.raises(ValueError, match="malformed sliding window state"):
        SlidingWindow.from_dict(state, clock)


def test_sliding_window_from_dict_rejects_other_kinds() -> None:
    with pytest.raises(ValueError, match="not a serialised sliding_window limiter"):
        SlidingWindow.from_dict({"kind": "token_bucket"})


@pytest.mark.parametrize("count", [0, -2, 2.5, None])
def test_sliding_window_rejects_bad_window_count_with_other_problems(count: Any) -> None:
    with pytest.raises(ConfigError) as err:
        SlidingWindow(0, 10, count)
    assert "limit must be a positive finite number" in str(err.value)
    assert "window_count must be a positive integer" in str(err.value)


def test_sliding_window_reports_a_single_bad_setting() -> None:
    with pytest.raises(ConfigError, match=r"^window_s must be a positive finite number, got -1$"):
        SlidingWindow(1, -1)


# --- adaptive ------------------------------------------------------------------------------------


def test_adaptive_tightens_above_80_percent_and_relaxes_below_40_with_hysteresis() -> None:
    adaptive = AdaptiveLimiter(TokenBucket(10, 1, ManualClock()))
    assert (adaptive.tightened, adaptive.current_factor) == (False, 1.0)
    # (utilisation, setting changed, tightened afterwards)
    steps = [(0.8, False, False), (0.81, True, True), (0.6, False, True), (0.4, False, True)]
    steps += [(0.95, False, True), (0.39, True, False), (0.6, False, False)]
    steps += [(1.5, True, True), (0.0, True, False)]
    for utilisation, changed, tightened in steps:
        assert adaptive.observe_utilisation(utilisation) is changed, utilisation
        assert adaptive.tightened is tightened, utilisation
        assert adaptive.current_factor == (0.5 if tightened else 1.0)


def test_adaptive_halves_token_bucket_limits_while_tightened(clock: ManualClock) -> None:
    adaptive = AdaptiveLimiter(TokenBucket(10, 2, clock))
    adaptive.observe_utilisation(0.9)
    decisions = [adaptive.try_acquire(KEY) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[0] == Decision(allowed=True, retry_after_s=0.0, remaining=4.0, limit=5.0)
    # Refill is halved as well: one request needs 2 inner tokens = 1 s at 2/s.
    assert decisions[-1].retry_after_s == 1.0
    adaptive.observe_utilisation(0.1)
    clock.advance(1)
    assert adaptive.try_acquire(KEY) == Decision(allowed=True, retry_after_s=0.0, remaining=1.0, limit=10.0)


def test_adaptive_halves_sliding_window_limits_while_tightened(clock: ManualClock) -> None:
    adaptive = AdaptiveLimiter(SlidingWindow(4, 60, 6, clock), tighten_at=0.5, relax_at=0.2, factor=0.25)
    adaptive.observe_utilisation(0.6)
    assert adaptive.try_acquire(KEY) == Decision(allowed=True, retry_after_s=0.0, remaining=0.0, limit=1.0)
    assert not adaptive.try_acquire(KEY).allowed
    adaptive.observe_utilisation(0.0)
    assert adaptive.try_acquire(KEY).remaining == 0.0  # 4 inner units used of 4


def test_adaptive_cost_beyond_tightened_capacity_never_fits(clock: ManualClock) -> None:
    adaptive = AdaptiveLimiter(TokenBucket(1, 1, clock))
    adaptive.observe_utilisation(1.0)
    assert adaptive.try_acquire(KEY).retry_after_s == math.inf


@pytest.mark.parametrize("utilisation", [-0.1, math.nan, math.inf, "0.5"])
def test_adaptive_rejects_bad_utilisation(utilisation: Any) -> None:
    adaptive = AdaptiveLimiter(TokenBucket(1, 1))
    with pytest.raises(ValueError, match="utilisation must be a finite number"):
        adaptive.observe_utilisation(utilisation)


@pytest.mark.parametrize(
    ("tighten_at", "relax_at", "factor", "messages"),
    [
        (0.4, 0.8, 0.5, ["relax_at < tighten_at"]),
        (0.5, 0.5, 0.5, ["relax_at < tighten_at"]),
        (1.2, 0.4, 0.5, ["relax_at < tighten_at"]),
        (0.8, -0.1, 0.5, ["relax_at < tighten_at"]),
        (0.8, 0.4, 0.0, ["factor must be in (0, 1]"]),
        (0.8, 0.4, 1.5, ["factor must be in (0, 1]"]),
        (math.nan, 0.4, math.nan, ["relax_at < tighten_at", "factor must be in (0, 1]"]),
    ],
)
def test_adaptive_validates_its_settings(
    tighten_at: float, relax_at: float, factor: float, messages: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        AdaptiveLimiter(TokenBucket(1, 1), tighten_at=tighten_at, relax_at=relax_at, factor=factor)
    for message in messages:
        assert message in str(err.value)


# --- Redis helpers --------------------------------------------------------------------------------


def test_redis_call_layout_with_client_time() -> None:
    keys, args = redis_token_bucket_call(KEY, 20, 0.1, cost=2, now_s=1767225600.25)
    assert keys == [REDIS_KEY_PREFIX + "alice|ingest"]
    assert args == ["20.0", "0.1", "2.0", "1767225600.25"]


def test_redis_call_layout_with_server_time() -> None:
    assert redis_token_bucket_call(KEY, 1, 1e-5)[1] == ["1.0", "1e-05", "1.0", ""]


def test_redis_call_validates_like_the_in_process_bucket() -> None:
    with pytest.raises(ConfigError, match="burst_capacity"):
        redis_token_bucket_call(KEY, 0, 1)
    with pytest.raises(ValueError, match="cost"):
        redis_token_bucket_call(KEY, 1, 1, cost=-1)


def test_redis_script_reads_the_documented_layout() -> None:
    # The wrapper elsewhere relies on this layout; a renumbering here must break a test.
    for token in ("KEYS[1]", "ARGV[1]", "ARGV[2]", "ARGV[3]", "ARGV[4]", "redis.call('TIME')", "PEXPIRE"):
        assert token in REDIS_TOKEN_BUCKET_LUA
    assert "ARGV[5]" not in REDIS_TOKEN_BUCKET_LUA


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([1, b"2", b"0", b"3"], Decision(True, 0.0, 2.0, 3.0)),
        ([0, b"0.25", b"1.5", b"3"], Decision(False, 1.5, 0.25, 3.0)),
        ([0, "0", "-1", "3"], Decision(False, math.inf, 0.0, 3.0)),
        ((1, "4.5", "0", "10"), Decision(True, 0.0, 4.5, 10.0)),
    ],
)
def test_decode_redis_reply(reply: Any, expected: Decision) -> None:
    assert decode_redis_reply(reply) == expected


@pytest.mark.parametrize(
    "reply", [None, [1, b"2", b"0"], [1, b"2", b"0", b"3", b"4"], [1, b"x", b"0", b"3"], [1, b"\xff", 0, 3]]
)
def test_decode_redis_reply_rejects_malformed_replies(reply: Any) -> None:
    with pytest.raises(ValueError, match="malformed rate limit reply"):
        decode_redis_reply(reply)
