"""`RateLimiter.admit`: one Lua script counts the request and takes its slot, on the real Redis;
the slot goes back without a wait (carried by the identity's next admission, or a ZREM after
`_RELEASE_DELAY`); the in-process fallback when Redis fails."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import limits
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from app.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.resilience.redis_guard import RedisGuard, create_redis, redis_breaker
from app.security.ratelimit import (
    RateLimiter,
    RateLimitExceeded,
    RateLimitState,
    rate_limit_headers,
)
from tests.conftest import make_settings, running_app, wait_until
from tests.support.fakes import FakeClock, RedisEvents
from tests.support.redisserver import RedisServer

PLENTY = "100000/hour"


def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


def _window_key(prefix: str, rate: str, identity: str, scope: str = "query") -> str:
    """The current window's counter."""
    seconds = limits.parse(rate).get_expiry()
    return f"{prefix}rl:{scope}:{_digest(identity)}:{rate.split('/')[0]}/{seconds}s"


def _slot_key(prefix: str, identity: str, scope: str = "query") -> str:
    return f"{prefix}cc:{scope}:{_digest(identity)}"


def _client(url: str) -> Redis:
    """The app's shared client (`create_redis`): no retries, bounded connects."""
    return create_redis(make_settings(redis_url=url, redis_socket_timeout=0.5))


def _guarded(
    client: Redis,
    observer: RedisEvents,
    *,
    timeout: float = 0.5,
    breaker: CircuitBreaker | None = None,
) -> RedisGuard:
    """`client` under the app's failure policy (by default its breaker, open for 5 s)."""
    return RedisGuard(
        client,
        timeout=timeout,
        breaker=breaker if breaker is not None else redis_breaker(5.0),
        observer=observer,
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test's own, to look at the keys."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[Redis]:
    """The limiter's client, as the app's shared one."""
    client = _client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def observer() -> RedisEvents:
    """What the limiter's guard reports."""
    return RedisEvents()


@pytest.fixture
async def limiter(
    shared: Redis, redis_prefix: str, observer: RedisEvents
) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(redis=_guarded(shared, observer), key_prefix=redis_prefix)
    yield limiter
    await limiter.aclose()


async def _until_zcard(redis: Redis, key: str, expected: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while (count := await redis.zcard(key)) != expected:
        assert time.monotonic() < deadline, f"{key}: {count} slots held, expected {expected}"
        await asyncio.sleep(0.005)


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# --- the window ----------------------------------------------------------------------------


async def test_headers_across_a_window_boundary(
    limiter: RateLimiter, redis: Redis, redis_prefix: str, observer: RedisEvents
) -> None:
    """4 per 2 s window. The numbers are the sliding window counter's: after the boundary the
    previous window's 4 requests weigh 4 x (its remaining TTL / 2 s)."""
    rate = "4/2 seconds"
    started = time.monotonic()
    states = []
    for _ in range(4):
        async with limiter.admit("query", "alice", rate, 10) as state:
            states.append(state)
    # The window opened with the first request: a whole window to go, then a little less.
    assert states[0] == RateLimitState(limit=4, remaining=3, reset_after=2.0)
    assert all(1.5 < s.reset_after <= 2.0 for s in states)
    assert [rate_limit_headers(s) for s in states] == [
        {"RateLimit-Limit": "4", "RateLimit-Remaining": str(left), "RateLimit-Reset": "2"}
        for left in (3, 2, 1, 0)
    ]
    with pytest.raises(RateLimitExceeded) as refused:
        async with limiter.admit("query", "alice", rate, 10):
            pytest.fail("a fifth request was admitted")
    assert refused.value.kind == "rate"
    assert refused.value.retry_after == 2.0
    assert refused.value.state.remaining == 0
    assert 1.5 < refused.value.state.reset_after <= 2.0
    current = _window_key(redis_prefix, rate, "alice")
    assert await redis.get(current) == "4"  # the refusal was not counted

    # A quarter of a window past the boundary: the previous window (4 requests, 1.75 s of TTL
    # left) weighs floor(4 x 1.75 / 2) = 3, so one more request fits; the weight loses one
    # every 0.5 s, next at 1.5 s of TTL: 0.25 s from now.
    await _sleep_until(started + 2.25)
    async with limiter.admit("query", "alice", rate, 10) as state:
        pass
    assert await redis.get(f"{current}:previous") == "4"
    assert await redis.get(current) == "1"
    assert state.limit == 4
    assert state.remaining == 0
    assert 0 < state.reset_after <= 0.3  # (the window opened a little after `started`)
    assert rate_limit_headers(state)["RateLimit-Reset"] == "1"

    with pytest.raises(RateLimitExceeded) as refused:
        async with limiter.admit("query", "alice", rate, 10):
            pytest.fail("the window was full")
    reset_after = refused.value.state.reset_after
    assert refused.value.retry_after == 1.0
    assert 0 < reset_after <= 0.3
    # Reset tells the truth: still refused a little before it, admitted just after it.
    deadline = time.monotonic() + reset_after
    if reset_after > 0.15:
        await _sleep_until(deadline - 0.1)
        with pytest.raises(RateLimitExceeded):
            async with limiter.admit("query", "alice", rate, 10):
                pytest.fail("admitted before Reset")
    await _sleep_until(deadline + 0.05)
    async with limiter.admit("query", "alice", rate, 10) as state:
        assert state.remaining == 0
    assert await redis.get(current) == "2"
    assert observer.errors == []


async def test_redis_counts_as_the_in_process_fallback_does(limiter: RateLimiter) -> None:
    """The script and the in-process limiter (what a replica uses while Redis fails) apply
    the same window: the same remaining counts, then the same refusal."""
    local = RateLimiter(redis=None, key_prefix="")
    try:
        seen: list[tuple[int, int]] = []
        for _ in range(5):
            in_redis = await limiter.hit("query", "alice", "5/minute")
            in_process = await local.hit("query", "alice", "5/minute")
            seen.append((in_redis.remaining, in_process.remaining))
        assert seen == [(4, 4), (3, 3), (2, 2), (1, 1), (0, 0)]
        for backend in (limiter, local):
            with pytest.raises(RateLimitExceeded) as refused:
                await backend.hit("query", "alice", "5/minute")
            assert 0 < refused.value.retry_after <= 60
    finally:
        await local.aclose()


# --- one script, two limits ----------------------------------------------------------------


def _record_commands(client: Redis, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every command `client` sends from now on (its arguments), in order: one at a time,
    and those of its pipelines (each pipeline is one round trip)."""
    sent: list[tuple[Any, ...]] = []
    execute: Callable[..., Awaitable[Any]] = client.execute_command
    pipeline: Callable[..., Pipeline] = client.pipeline

    async def recording(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await execute(*args, **options)

    def recording_pipeline(*args: Any, **options: Any) -> Pipeline:
        pipe = pipeline(*args, **options)
        execute_pipe = pipe.execute

        async def recording_execute(raise_on_error: bool = True) -> list[Any]:
            sent.extend(tuple(command) for command, _ in pipe.command_stack)
            return await execute_pipe(raise_on_error)

        monkeypatch.setattr(pipe, "execute", recording_execute)
        return pipe

    monkeypatch.setattr(client, "execute_command", recording)
    monkeypatch.setattr(client, "pipeline", recording_pipeline)
    return sent


async def test_one_round_trip_admits_and_the_release_is_not_awaited(
    limiter: RateLimiter,
    shared: Redis,
    redis: Redis,
    redis_prefix: str,
    observer: RedisEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await limiter.hit("query", "warm-up", PLENTY)  # the script is in Redis' cache
    calls = _record_commands(shared, monkeypatch)

    def sent() -> list[str]:
        return [str(args[0]) for args in calls]

    slot = _slot_key(redis_prefix, "alice")
    async with limiter.admit("query", "alice", "10/minute", 2) as state:
        assert sent() == ["EVALSHA"]
        assert state == RateLimitState(limit=10, remaining=9, reset_after=60.0)
        assert await redis.zcard(slot) == 1
    # Left without a round trip: with no admission of alice's to carry it, the ZREM goes out
    # on its own after _RELEASE_DELAY.
    assert sent() == ["EVALSHA"]
    await _until_zcard(redis, slot, 0)
    assert sent() == ["EVALSHA", "ZREM"]
    assert not await redis.exists(slot)

    assert (await limiter.hit("query", "alice", "10/minute")).remaining == 8
    assert sent() == ["EVALSHA", "ZREM", "EVALSHA"]
    assert observer.errors == []


async def test_releases_made_together_share_one_zrem(
    limiter: RateLimiter,
    shared: Redis,
    redis: Redis,
    redis_prefix: str,
    observer: RedisEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await limiter.hit("query", "warm-up", PLENTY)
    sent = _record_commands(shared, monkeypatch)
    slot = _slot_key(redis_prefix, "alice")
    leave = asyncio.Event()
    entered = 0

    async def request() -> None:
        nonlocal entered
        async with limiter.admit("query", "alice", PLENTY, 10):
            entered += 1
            await leave.wait()

    tasks = [asyncio.create_task(request()) for _ in range(5)]
    await wait_until(lambda: entered == 5)
    assert await redis.zcard(slot) == 5
    leave.set()  # all five leave within _RELEASE_DELAY
    await asyncio.gather(*tasks)
    await _until_zcard(redis, slot, 0)
    zrems = [args for args in sent if args[0] == "ZREM"]
    assert len(zrems) == 1
    assert len(zrems[0]) == 2 + 5  # ZREM key token x5
    assert observer.errors == []


async def test_each_client_of_a_burst_finds_its_slot_free(
    limiter: RateLimiter, observer: RedisEvents
) -> None:
    """Thirty clients at their limit leave at once and come straight back: each one's next
    admission carries its own release, so every one finds its slot free."""
    await limiter.hit("query", "warm-up", PLENTY)
    names = [f"client-{index}" for index in range(30)]
    leave = asyncio.Event()
    entered = 0

    async def request(name: str) -> None:
        nonlocal entered
        async with limiter.admit("query", name, PLENTY, 1):
            entered += 1
            await leave.wait()

    tasks = [asyncio.create_task(request(name)) for name in names]
    await wait_until(lambda: entered == len(names))
    leave.set()
    await asyncio.gather(*tasks)

    async def follow_up(name: str) -> bool:
        try:
            async with limiter.admit("query", name, PLENTY, 1):
                return True
        except RateLimitExceeded:
            return False

    admitted = await asyncio.gather(*(follow_up(name) for name in names))
    assert all(admitted), f"{admitted.count(False)} of {len(names)} found their slot held"
    assert observer.errors == []


async def test_a_rate_refusal_takes_no_slot(
    limiter: RateLimiter, redis: Redis, redis_prefix: str
) -> None:
    slot = _slot_key(redis_prefix, "alice")
    async with (
        limiter.admit("query", "alice", "2/hour", 5),
        limiter.admit("query", "alice", "2/hour", 5) as state,
    ):
        assert state.remaining == 0
        assert await redis.zcard(slot) == 2
        with pytest.raises(RateLimitExceeded) as refused:
            async with limiter.admit("query", "alice", "2/hour", 5):
                pytest.fail("a third request was admitted")
        assert refused.value.kind == "rate"
        assert refused.value.state.limit == 2
        assert 3590 < refused.value.state.reset_after <= 3600
        assert refused.value.retry_after == 3600
        assert await redis.zcard(slot) == 2
    await _until_zcard(redis, slot, 0)
    assert await redis.get(_window_key(redis_prefix, "2/hour", "alice")) == "2"


async def test_a_concurrency_refusal_is_not_counted(
    limiter: RateLimiter, redis: Redis, redis_prefix: str
) -> None:
    window = _window_key(redis_prefix, "3/hour", "alice")
    slot = _slot_key(redis_prefix, "alice")
    async with limiter.admit("query", "alice", "3/hour", 1) as state:
        assert state.remaining == 2
        for _ in range(5):
            with pytest.raises(RateLimitExceeded) as refused:
                async with limiter.admit("query", "alice", "3/hour", 1):
                    pytest.fail("a second slot was granted")
            assert refused.value.kind == "concurrency"
            assert refused.value.retry_after == 1.0
            assert refused.value.state == RateLimitState(limit=1, remaining=0, reset_after=1.0)
        assert await redis.get(window) == "1"
        assert await redis.zcard(slot) == 1
    await _until_zcard(redis, slot, 0)
    async with limiter.admit("query", "alice", "3/hour", 1) as state:
        assert state.remaining == 1
        # Over both limits: refused for the rate, the longer wait.
        await limiter.hit("query", "alice", "3/hour")
        with pytest.raises(RateLimitExceeded) as refused:
            async with limiter.admit("query", "alice", "3/hour", 1):
                pytest.fail("admitted over both limits")
        assert refused.value.kind == "rate"
        assert refused.value.retry_after > 3500
    assert await redis.get(window) == "3"


@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory"])
async def test_an_admission_is_entered_once_and_left_once(
    limiter: RateLimiter, redis: Redis, redis_prefix: str, memory: bool
) -> None:
    if memory:
        limiter = RateLimiter(redis=None, key_prefix=redis_prefix)
    async with limiter.admit("query", "alice", PLENTY, 2):  # another request's slot
        admission = limiter.admit("query", "alice", PLENTY, 2)
        async with admission:
            with pytest.raises(RuntimeError, match="already held"):
                await admission.__aenter__()
        await admission.__aexit__(None, None, None)  # gives nothing back a second time
        if not memory:
            await _until_zcard(redis, _slot_key(redis_prefix, "alice"), 1)
        async with limiter.admit("query", "alice", PLENTY, 2):
            with pytest.raises(RateLimitExceeded) as refused:
                async with limiter.admit("query", "alice", PLENTY, 2):
                    pytest.fail("a slot was given back twice")
            assert refused.value.kind == "concurrency"
    if memory:
        await limiter.aclose()


# --- releases ------------------------------------------------------------------------------


async def test_slot_released_when_the_request_is_cancelled(
    limiter: RateLimiter, redis: Redis, redis_prefix: str, observer: RedisEvents
) -> None:
    slot = _slot_key(redis_prefix, "alice")
    entered = asyncio.Event()

    async def request() -> None:
        async with limiter.admit("query", "alice", PLENTY, 1):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(request())
    await entered.wait()
    assert await redis.zcard(slot) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until_zcard(redis, slot, 0)

    # anyio (Starlette) cancel scopes cancel every await inside them; leaving awaits nothing.
    with anyio.CancelScope() as scope:
        async with limiter.admit("query", "alice", PLENTY, 1):
            assert await redis.zcard(slot) == 1
            scope.cancel()
            await anyio.sleep(30)
    assert scope.cancelled_caught
    await _until_zcard(redis, slot, 0)

    assert observer.errors == []


def _late_replies(shared: Redis, monkeypatch: pytest.MonkeyPatch, delay: float) -> asyncio.Event:
    """Redis runs each EVALSHA at once, its reply reaches the limiter `delay` s later."""
    execute: Callable[..., Awaitable[Any]] = shared.execute_command
    ran = asyncio.Event()

    async def late(*args: Any, **options: Any) -> Any:
        result = await execute(*args, **options)
        if args[0] == "EVALSHA":
            ran.set()
            await asyncio.sleep(delay)
        return result

    monkeypatch.setattr(shared, "execute_command", late)
    return ran


async def test_cancelled_while_the_script_replies_drops_the_slot(
    limiter: RateLimiter,
    shared: Redis,
    redis: Redis,
    redis_prefix: str,
    observer: RedisEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slot = _slot_key(redis_prefix, "alice")
    ran = _late_replies(shared, monkeypatch, 30)
    entering = asyncio.create_task(limiter.admit("query", "alice", PLENTY, 1).__aenter__())
    await ran.wait()
    assert await redis.zcard(slot) == 1  # taken in Redis, the reply not read yet
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    await _until_zcard(redis, slot, 0)
    assert observer.errors == []  # a cancellation is not a Redis failure


async def test_a_reply_past_the_deadline_falls_back_and_drops_the_slot(
    redis_url: str, redis_prefix: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(redis_url)
    observer = RedisEvents()
    limiter = RateLimiter(redis=_guarded(client, observer, timeout=0.05), key_prefix=redis_prefix)
    slot = _slot_key(redis_prefix, "alice")
    try:
        _late_replies(client, monkeypatch, 1.0)
        started = time.monotonic()
        async with limiter.admit("query", "alice", "5/hour", 1) as state:
            assert time.monotonic() - started < 0.5  # the guard's 0.05 s, not the 1 s reply
            assert observer.errors == ["rate limit"]
            assert state.remaining == 4  # counted in process
            await _until_zcard(redis, slot, 0)  # the slot the script took is dropped
            with pytest.raises(RateLimitExceeded) as refused:  # the in-process slot is held
                async with limiter.admit("query", "alice", "5/hour", 1):
                    pytest.fail("a second slot was granted")
            assert refused.value.kind == "concurrency"
        await _until_zcard(redis, slot, 0)  # the second script's slot is dropped too
        # Each admission's script timed out once; the ZREMs that dropped the slots went through.
        assert observer.errors == ["rate limit", "rate limit"]
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_aclose_finishes_pending_releases(redis_url: str, redis_prefix: str) -> None:
    client = _client(redis_url)
    observer = RedisEvents()
    limiter = RateLimiter(redis=_guarded(client, observer), key_prefix=redis_prefix)
    slot = _slot_key(redis_prefix, "alice")
    try:
        async with limiter.admit("query", "alice", PLENTY, 3):
            pass
        await limiter.aclose()  # right away: the ZREM has not run yet
        assert await client.zcard(slot) == 0
        assert observer.errors == []
    finally:
        await client.aclose()


# --- Redis failures ------------------------------------------------------------------------


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (a call, so mypy does not narrow it across awaits)."""
    return breaker.state


def _patient_breaker() -> CircuitBreaker:
    """A breaker that never opens within a test (100 calls before any rate is computed)."""
    return CircuitBreaker(
        "redis", BreakerConfig(sliding_window_size=100, minimum_number_of_calls=100)
    )


async def test_warnings_are_rate_limited_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failure is reported (a metric), the log gets one warning: the breaker stays
    closed here, so each of the 4 requests tries Redis and fails."""
    url = _dead_url()
    client = _client(url)
    observer = RedisEvents()
    guard = _guarded(client, observer, breaker=_patient_breaker())
    limiter = RateLimiter(redis=guard, key_prefix="unused:")
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(4):
                async with limiter.admit("query", "alice", "10/hour", 1):
                    pass
            await limiter.aclose()  # the token removals the failed admissions spawned
        # Each admission's script, and the removal of the token it may have left.
        assert observer.errors.count("rate limit") == 4
        assert observer.errors.count("concurrency release") == 4
        assert len(observer.errors) == 8
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert warnings[0].name == "app.resilience.redis_guard"
        assert warnings[0].getMessage().startswith("redis rate limit failed")
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_an_outage_falls_back_in_process_and_redis_comes_back() -> None:
    with RedisServer() as server:
        client = _client(server.url)
        observer = RedisEvents()
        clock = FakeClock()
        breaker = CircuitBreaker("redis", redis_breaker(5.0).config, clock=clock)
        guard = _guarded(client, observer, timeout=0.2, breaker=breaker)
        limiter = RateLimiter(redis=guard, key_prefix="t:")
        try:
            async with limiter.admit("query", "alice", "3/hour", 1) as state:
                assert state.remaining == 2
            async with Redis.from_url(server.url) as probe:
                await _until_zcard(probe, _slot_key("t:", "alice"), 0)
            assert observer.errors == []

            server.stop()
            # In process from the first failure on: a window and slots of this replica's own.
            async with limiter.admit("query", "alice", "3/hour", 1) as state:
                assert state.remaining == 2
            assert observer.errors[0] == "rate limit"
            async with limiter.admit("query", "alice", "3/hour", 1) as state:
                assert state.remaining == 1
                with pytest.raises(RateLimitExceeded) as refused:
                    async with limiter.admit("query", "alice", "3/hour", 1):
                        pytest.fail("a second slot was granted")
                assert refused.value.kind == "concurrency"
            async with limiter.admit("query", "alice", "3/hour", 1) as state:
                assert state.remaining == 0
            with pytest.raises(RateLimitExceeded) as refused:
                async with limiter.admit("query", "alice", "3/hour", 1):
                    pytest.fail("over the rate")
            assert refused.value.kind == "rate"
            # Those failures (the scripts, and the token removals they spawned) opened the
            # circuit: half of the calls in its window (the two good ones before included).
            assert state_of(guard.breaker) is BreakerState.OPEN
            assert observer.states == ["ok", "degraded"]
            assert set(observer.errors) <= {"rate limit", "concurrency release"}

            # Open: Redis is left alone (a call would fail, and be reported). Calls that began
            # before it opened may still end (each within the guard's 0.2 s): wait for them.
            await asyncio.sleep(0.5)
            errors = len(observer.errors)
            assert (await limiter.hit("query", "carol", "3/hour")).remaining == 2
            async with limiter.admit("query", "carol", "3/hour", 1) as state:
                assert state.remaining == 1
            await asyncio.sleep(0.25)  # what the skipped admission spawned has run
            assert len(observer.errors) == errors
            assert state_of(guard.breaker) is BreakerState.OPEN

            server.start()  # empty: no keys, no scripts (EVALSHA gets NOSCRIPT once)
            async with limiter.admit("query", "bob", "3/hour", 1):
                pass  # still within the open period: in process
            assert state_of(guard.breaker) is BreakerState.OPEN
            # Once the open period is over, the next admissions probe Redis: two good probes
            # close the circuit, and both are counted in Redis (the first one was not).
            clock.now += 5.0
            for _ in range(2):
                async with limiter.admit("query", "bob", "3/hour", 1):
                    pass
            assert state_of(guard.breaker) is BreakerState.CLOSED
            assert observer.states == ["ok", "degraded", "ok"]
            async with Redis.from_url(server.url, decode_responses=True) as probe:
                assert await probe.get(_window_key("t:", "3/hour", "bob")) == "2"
                await _until_zcard(probe, _slot_key("t:", "bob"), 0)
            assert len(observer.errors) == errors
        finally:
            await limiter.aclose()
            await client.aclose()


# --- through the API -----------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from app.storage.db import upgrade_to_head

    url = f"sqlite+aiosqlite:///{tmp_path / 'ratelimit.db'}"
    upgrade_to_head(url)
    return url


@pytest.mark.integration
async def test_query_holds_its_slot_until_the_response(
    sqlite_url: str, redis_url: str, redis_prefix: str, redis: Redis
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        rate_limit_query="3/minute",
        concurrency_limit_query=1,
        sim_latency_ms=300,
        cache_enabled=False,
    )
    slot_keys = f"{redis_prefix}cc:query:*"
    async with running_app(settings) as (_, client):
        first = asyncio.create_task(client.post("/query", json={"message": "one"}))
        deadline = time.monotonic() + 5
        while not (keys := [key async for key in redis.scan_iter(match=slot_keys, count=1000)]):
            assert time.monotonic() < deadline, "no slot taken"
            await asyncio.sleep(0.01)
        assert len(keys) == 1
        assert await redis.zcard(keys[0]) == 1

        refused = await client.post("/query", json={"message": "two"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["ratelimit-limit"] == "1"  # the concurrency limit
        assert refused.headers["ratelimit-remaining"] == "0"

        answered = await first
        assert answered.status_code == 200
        assert answered.headers["ratelimit-limit"] == "3"
        assert answered.headers["ratelimit-remaining"] == "2"
        assert answered.headers["ratelimit-reset"] == "60"
        await _until_zcard(redis, keys[0], 0)

        # The refusal was not counted.
        again = await client.post("/query", json={"message": "three"})
        assert again.status_code == 200
        assert again.headers["ratelimit-remaining"] == "1"
        await _until_zcard(redis, keys[0], 0)


@pytest.mark.integration
async def test_query_limits_in_process_when_redis_is_down(
    sqlite_url: str, redis_prefix: str
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        redis_url=_dead_url(),
        redis_key_prefix=redis_prefix,
        rate_limit_query="2/minute",
        cache_enabled=False,
    )
    async with running_app(settings) as (app, client):
        remaining = []
        for i in range(2):
            response = await client.post("/query", json={"message": f"m{i}"})
            assert response.status_code == 200, response.text
            remaining.append(response.headers["ratelimit-remaining"])
        assert remaining == ["1", "0"]
        limited = await client.post("/query", json={"message": "m3"})
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["ratelimit-limit"] == "2"
        # Each request tried Redis once, and failed (the breaker needs 5 failures to open).
        failed = app.state.metrics.registry.get_sample_value(
            "agentserve_redis_errors_total", {"operation": "rate limit"}
        )
        assert failed == 3
