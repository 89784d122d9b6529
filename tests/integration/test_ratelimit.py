"""Per-caller rate and concurrency limits, on the real Redis and in process."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.resilience.redis_guard import RedisGuard, create_redis, redis_breaker
from app.security import ratelimit
from app.security.ratelimit import (
    RateLimiter,
    RateLimitExceeded,
    RateLimitState,
    rate_limit_headers,
)
from tests.conftest import make_settings
from tests.support.fakes import FakeClock, RedisEvents

LimiterFactory = Callable[..., RateLimiter]
UntilHeld = Callable[..., Awaitable[None]]
SlotCount = Callable[[], Awaitable[int]]
PLENTY = "100000/hour"
"""A rate no test reaches, for the tests of the concurrency limit."""


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (a call, so mypy does not narrow it across awaits)."""
    return breaker.state


def patient_breaker() -> CircuitBreaker:
    """A breaker that never opens within a test (100 calls before any rate is computed), for
    the tests of what one failing request does."""
    return CircuitBreaker(
        "redis",
        BreakerConfig(sliding_window_size=100, minimum_number_of_calls=100),
    )


@pytest.fixture
async def make_limiter(redis_url: str, redis_prefix: str) -> AsyncIterator[LimiterFactory]:
    """`make_limiter()` on the real Redis under this test's prefix; `make_limiter(memory=True)`
    in process. Each call is another replica: its own client (built as the app builds its
    one), its own guard, the same keys. `timeout` bounds a Redis call; `breaker` defaults to
    the app's (`redis_breaker`); `observer` records what the guard reports."""
    limiters: list[RateLimiter] = []
    clients: list[Redis] = []

    def factory(
        *,
        memory: bool = False,
        url: str | None = None,
        timeout: float = 0.5,
        breaker: CircuitBreaker | None = None,
        observer: RedisEvents | None = None,
        **kwargs: Any,
    ) -> RateLimiter:
        kwargs.setdefault("key_prefix", redis_prefix)
        guard: RedisGuard | None = None
        if not memory:
            client = create_redis(make_settings(redis_url=url or redis_url))
            clients.append(client)
            guard = RedisGuard(
                client,
                timeout=timeout,
                breaker=breaker if breaker is not None else redis_breaker(5.0),
                observer=observer,
            )
        limiter = RateLimiter(redis=guard, **kwargs)
        limiters.append(limiter)
        return limiter

    yield factory
    for limiter in limiters:
        await limiter.aclose()
    for client in clients:
        await client.aclose()


@pytest.fixture
async def until_held(redis_url: str, redis_prefix: str) -> AsyncIterator[UntilHeld]:
    """`await until_held(limiter, n)`: wait until n slots of ("query", "alice") are held.

    Leaving an admission gives its Redis slot back without waiting: the identity's next
    admission carries the release, or it goes out on its own after `_RELEASE_DELAY`. In
    process the release is immediate."""
    client = Redis.from_url(redis_url)

    async def wait(
        limiter: RateLimiter, held: int, *, scope: str = "query", identity: str = "alice"
    ) -> None:
        if limiter.backend == "memory":
            return
        key = f"{redis_prefix}cc:{scope}:{hashlib.sha256(identity.encode()).hexdigest()}"
        deadline = time.monotonic() + 1
        while (count := await client.zcard(key)) != held:
            assert time.monotonic() < deadline, f"{count} slots held, expected {held}"
            await asyncio.sleep(0.005)

    yield wait
    await client.aclose()


async def _start_of_window(seconds: float) -> None:
    """In process the windows are aligned to the clock: start a test just after a boundary,
    so its burst does not straddle two windows."""
    await asyncio.sleep(seconds - time.time() % seconds + 0.02)


async def _assert_rate_limit(limiter: RateLimiter, identity: str) -> None:
    states = [await limiter.hit("query", identity, "3/second") for _ in range(3)]
    assert [s.remaining for s in states] == [2, 1, 0]
    assert all(s.limit == 3 and 0 <= s.reset_after <= 1 for s in states)
    with pytest.raises(RateLimitExceeded) as refused:
        await limiter.hit("query", identity, "3/second")
    assert refused.value.kind == "rate"
    assert refused.value.retry_after >= 1
    assert refused.value.state.remaining == 0
    assert refused.value.state.limit == 3
    assert 0 < refused.value.state.reset_after <= 1

    await asyncio.sleep(refused.value.state.reset_after + 0.05)
    state = await limiter.hit("query", identity, "3/second")
    assert state.limit == 3


# --- requests per window -----------------------------------------------------------------


async def test_rate_limit_in_redis_refuses_then_resets(make_limiter: LimiterFactory) -> None:
    observer = RedisEvents()
    limiter = make_limiter(observer=observer)
    assert limiter.backend == "redis"
    await _assert_rate_limit(limiter, "203.0.113.7")
    assert observer.errors == []
    assert observer.states == ["ok"]


async def test_rate_limit_in_memory_refuses_then_resets(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(memory=True)
    assert limiter.backend == "memory"
    await _start_of_window(1)
    await _assert_rate_limit(limiter, "203.0.113.7")


async def test_rate_limit_holds_across_replicas(
    make_limiter: LimiterFactory, redis_url: str, redis_prefix: str
) -> None:
    first, second = make_limiter(), make_limiter()
    assert (await first.hit("query", "10.0.0.1", "4/minute")).remaining == 3
    assert (await second.hit("query", "10.0.0.1", "4/minute")).remaining == 2
    assert (await first.hit("query", "10.0.0.1", "4/minute")).remaining == 1
    assert (await second.hit("query", "10.0.0.1", "4/minute")).remaining == 0
    for limiter in (first, second):
        with pytest.raises(RateLimitExceeded):
            await limiter.hit("query", "10.0.0.1", "4/minute")

    # A third replica starting later sees the same bucket.
    with pytest.raises(RateLimitExceeded):
        await make_limiter().hit("query", "10.0.0.1", "4/minute")
    # Keys live under the configured prefix, as `<prefix>rl:...`.
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
    finally:
        await client.aclose()
    assert keys
    assert all(key.decode().startswith(f"{redis_prefix}rl:") for key in keys)


@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory"])
async def test_identities_and_scopes_do_not_share_buckets(
    make_limiter: LimiterFactory, memory: bool
) -> None:
    limiter = make_limiter(memory=memory)
    await limiter.hit("query", "alice", "1/hour")
    with pytest.raises(RateLimitExceeded):
        await limiter.hit("query", "alice", "1/hour")
    # Same identity, other endpoint; other identities, including ones built to collide.
    await limiter.hit("secure-query", "alice", "1/hour")
    for other in ("bob", "alice ", "ALICE", "alice:*", "query:alice", "*", "a" * 100_000):
        state = await limiter.hit("query", other, "1/hour")
        assert state.remaining == 0


async def test_hostile_identities_stay_out_of_keys(
    make_limiter: LimiterFactory, redis_url: str, redis_prefix: str
) -> None:
    observer = RedisEvents()
    limiter = make_limiter(observer=observer)
    hostile = ["*", "user:*", "{tag}", "x" * 100_000, "line\nbreak", "\udcff", ""]
    for identity in hostile:
        assert (await limiter.hit("query", identity, "3/hour")).remaining == 2
        async with limiter.admit("query", identity, "3/hour", 1) as state:
            assert state.remaining == 1
    for identity in hostile:
        assert (await limiter.hit("query", identity, "3/hour")).remaining == 0
    assert observer.errors == []

    client = Redis.from_url(redis_url)
    try:
        await _until_no_slot_keys(client, redis_prefix)
        keys = [key.decode() async for key in client.scan_iter(match=f"{redis_prefix}*")]
    finally:
        await client.aclose()
    assert len(keys) == len(hostile)
    assert all(len(key) < len(redis_prefix) + 120 for key in keys)
    assert not any("user" in key or "tag" in key or "\n" in key for key in keys)


@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory"])
async def test_bad_arguments_are_refused(make_limiter: LimiterFactory, memory: bool) -> None:
    limiter = make_limiter(memory=memory)
    with pytest.raises(ValueError, match="scope"):
        await limiter.hit("query:*", "alice", "1/hour")
    with pytest.raises(ValueError, match="parse"):
        await limiter.hit("query", "alice", "lots per fortnight")
    with pytest.raises(ValueError, match="max_in_flight"):
        limiter.admit("query", "alice", "1/hour", 0)
    with pytest.raises(ValueError, match="scope"):
        limiter.admit("Query", "alice", "1/hour", 1)
    with pytest.raises(ValueError, match="parse"):
        limiter.admit("query", "alice", "lots per fortnight", 1)
    with pytest.raises(ValueError, match="lease_seconds"):
        make_limiter(memory=memory, lease_seconds=0)


# --- requests in flight ------------------------------------------------------------------


@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory"])
async def test_concurrency_caps_in_flight_requests(
    make_limiter: LimiterFactory, until_held: UntilHeld, memory: bool
) -> None:
    observer = RedisEvents()
    limiter = make_limiter(memory=memory, observer=observer)
    async with limiter.admit("query", "alice", PLENTY, 2):
        async with limiter.admit("query", "alice", PLENTY, 2):
            with pytest.raises(RateLimitExceeded) as refused:
                async with limiter.admit("query", "alice", PLENTY, 2):
                    pytest.fail("a third slot was granted")
            assert refused.value.kind == "concurrency"
            assert refused.value.retry_after == pytest.approx(1)
            assert refused.value.state == RateLimitState(limit=2, remaining=0, reset_after=1.0)
            # Other identities and other scopes have slots of their own.
            async with limiter.admit("query", "bob", PLENTY, 2):
                pass
            async with limiter.admit("secure-query", "alice", PLENTY, 2):
                pass
        # One left: a new request gets its slot.
        await until_held(limiter, 1)
        async with limiter.admit("query", "alice", PLENTY, 2):
            pass

    # An exception inside the block still gives the slot back.
    for _ in range(3):
        await until_held(limiter, 0)
        with pytest.raises(RuntimeError):
            async with limiter.admit("query", "alice", PLENTY, 1):
                raise RuntimeError("handler failed")
    await until_held(limiter, 0)
    async with limiter.admit("query", "alice", PLENTY, 1):
        pass
    assert observer.errors == []


async def test_concurrency_holds_across_replicas(
    make_limiter: LimiterFactory, until_held: UntilHeld
) -> None:
    first, second = make_limiter(), make_limiter()
    async with first.admit("query", "alice", PLENTY, 2):
        async with second.admit("query", "alice", PLENTY, 2):
            for limiter in (first, second):
                with pytest.raises(RateLimitExceeded):
                    async with limiter.admit("query", "alice", PLENTY, 2):
                        pass
        await until_held(first, 1)  # second's release, seen by the other replica
        async with first.admit("query", "alice", PLENTY, 2):
            pass


async def test_slots_of_a_crashed_replica_come_back_after_the_lease(
    make_limiter: LimiterFactory,
) -> None:
    # Leases of 0.6 s, slots taken at 0 s and 0.3 s: each check that a slot is still held
    # comes 0.25 s or more before its lease ends, so a stall of the event loop (which can only
    # make a check later) does not turn it over.
    crashed = make_limiter(lease_seconds=0.6)
    alive = make_limiter(lease_seconds=0.6)
    # Entered and never exited, like a replica killed mid-request: one slot now, one later.
    await crashed.admit("query", "alice", PLENTY, 2).__aenter__()
    await asyncio.sleep(0.3)
    await crashed.admit("query", "alice", PLENTY, 2).__aenter__()
    with pytest.raises(RateLimitExceeded):
        await alive.admit("query", "alice", PLENTY, 2).__aenter__()

    # The first lease is over (the key itself lives on, refreshed by the second one).
    await asyncio.sleep(0.35)
    async with alive.admit("query", "alice", PLENTY, 2):
        with pytest.raises(RateLimitExceeded):
            await alive.admit("query", "alice", PLENTY, 2).__aenter__()

    await asyncio.sleep(0.3)  # and now the second
    async with alive.admit("query", "alice", PLENTY, 2), alive.admit("query", "alice", PLENTY, 2):
        pass


@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory"])
async def test_cancelled_requests_give_their_slot_back(
    make_limiter: LimiterFactory, memory: bool
) -> None:
    observer = RedisEvents()
    limiter = make_limiter(memory=memory, observer=observer)
    entered = asyncio.Event()

    async def request() -> None:
        async with limiter.admit("query", "alice", PLENTY, 1):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(request())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # anyio (Starlette) cancel scopes cancel every await inside them; the release awaits none.
    with anyio.CancelScope() as scope:
        async with limiter.admit("query", "alice", PLENTY, 1):
            scope.cancel()
            await anyio.sleep(30)
    assert scope.cancelled_caught

    await _wait_for_slot(limiter)
    assert observer.errors == []


def _slots_of(redis_prefix: str, identity: str) -> str:
    return f"{redis_prefix}cc:query:{hashlib.sha256(identity.encode()).hexdigest()}"


@pytest.fixture
async def alice_holds(redis_url: str, redis_prefix: str) -> AsyncIterator[SlotCount]:
    """`await alice_holds()`: how many slots of ("query", "alice") Redis holds right now."""
    client = Redis.from_url(redis_url)
    key = _slots_of(redis_prefix, "alice")

    async def count() -> int:
        return int(await client.zcard(key))

    yield count
    await client.aclose()


async def _leave_together(limiter: RateLimiter, admissions: int, max_in_flight: int) -> None:
    """Alice enters `admissions` times at once, then leaves them all."""
    async with AsyncExitStack() as held:
        for _ in range(admissions):
            await held.enter_async_context(limiter.admit("query", "alice", PLENTY, max_in_flight))


async def test_a_release_rides_on_the_identitys_next_admission(
    make_limiter: LimiterFactory, alice_holds: SlotCount, monkeypatch: Any
) -> None:
    """A client that comes back before the release timer: its admission's script removes its
    waiting tokens, and no ZREM of their own is needed."""
    monkeypatch.setattr(ratelimit, "_RELEASE_DELAY", 60.0)  # only an admission can carry them
    observer = RedisEvents()
    limiter = make_limiter(observer=observer)
    await _leave_together(limiter, 3, 3)
    assert await alice_holds() == 3  # the releases wait
    async with limiter.admit("query", "bob", PLENTY, 3):
        assert await alice_holds() == 3  # someone else's admission leaves them
    async with limiter.admit("query", "alice", PLENTY, 3):
        assert await alice_holds() == 1  # this one's slot; the three were carried
    assert observer.errors == []


async def test_an_admission_carries_a_bounded_number_of_releases(
    make_limiter: LimiterFactory, alice_holds: SlotCount, monkeypatch: Any
) -> None:
    monkeypatch.setattr(ratelimit, "_RELEASE_DELAY", 60.0)
    monkeypatch.setattr(ratelimit, "_MAX_CARRIED", 2)
    limiter = make_limiter()
    await _leave_together(limiter, 3, 5)
    async with limiter.admit("query", "alice", PLENTY, 5):
        assert await alice_holds() == 2  # one still waiting, plus this one's
    async with limiter.admit("query", "alice", PLENTY, 5):
        assert await alice_holds() == 1


async def test_releases_go_out_on_their_own_when_no_admission_comes(
    make_limiter: LimiterFactory, until_held: UntilHeld, alice_holds: SlotCount, monkeypatch: Any
) -> None:
    monkeypatch.setattr(ratelimit, "_RELEASE_DELAY", 0.3)
    observer = RedisEvents()
    limiter = make_limiter(observer=observer)
    async with limiter.admit("query", "alice", PLENTY, 1):
        pass
    assert await alice_holds() == 1  # waiting
    await until_held(limiter, 0)  # the timer's ZREM
    assert observer.errors == []


async def test_releases_carried_by_a_failed_admission_wait_again(
    make_limiter: LimiterFactory, until_held: UntilHeld, redis_prefix: str, monkeypatch: Any
) -> None:
    """The script may not have run: the tokens it carried go out with the timer."""
    observer = RedisEvents()
    limiter = make_limiter(observer=observer)
    async with limiter.admit("query", "alice", PLENTY, 2):
        pass
    calls: list[tuple[list[str], tuple[Any, ...]]] = []

    async def refused(*, keys: list[str], args: tuple[Any, ...], client: Redis) -> Any:
        calls.append((keys, args))
        raise RedisConnectionError("connection refused")

    monkeypatch.setattr(limiter, "_admit_script", refused)
    async with limiter.admit("query", "alice", PLENTY, 2):  # falls back to process limits
        pass
    [(keys, args)] = calls
    assert keys[2] == _slots_of(redis_prefix, "alice")
    assert len(args) == 6  # the five arguments and the carried token
    await until_held(limiter, 0)
    # Reported once, as the admission's failure; the ZREMs that followed went through.
    assert observer.errors == ["rate limit"]


async def test_releases_after_close_go_out_at_once(
    make_limiter: LimiterFactory, until_held: UntilHeld, monkeypatch: Any
) -> None:
    monkeypatch.setattr(ratelimit, "_RELEASE_DELAY", 60.0)
    limiter = make_limiter()
    admission = limiter.admit("query", "alice", PLENTY, 1)
    await admission.__aenter__()
    await limiter.aclose()  # a request still running while the app shuts down
    await admission.__aexit__(None, None, None)
    await until_held(limiter, 0)


async def _wait_for_slot(limiter: RateLimiter) -> None:
    deadline = time.monotonic() + 1
    while True:
        try:
            async with limiter.admit("query", "alice", PLENTY, 1):
                return
        except RateLimitExceeded:
            assert time.monotonic() < deadline, "the slot was not given back"
            await asyncio.sleep(0.01)


async def _until_no_slot_keys(client: Redis, prefix: str) -> None:
    """Slot releases go out after `_RELEASE_DELAY` when no admission carries them: wait until
    every slot set is gone (the last ZREM deletes the key)."""
    deadline = time.monotonic() + 1
    while [key async for key in client.scan_iter(match=f"{prefix}cc:*")]:
        assert time.monotonic() < deadline, "a slot was not given back"
        await asyncio.sleep(0.01)


async def test_release_survives_cancellation_while_waiting_for_a_connection(
    redis_url: str, redis_prefix: str
) -> None:
    """The app's pool is busy and the client goes away: the slot must still come back."""
    client = create_redis(
        make_settings(redis_url=redis_url, redis_max_connections=1, redis_socket_timeout=2)
    )
    observer = RedisEvents()
    guard = RedisGuard(client, timeout=1.0, breaker=redis_breaker(5.0), observer=observer)
    limiter = RateLimiter(redis=guard, key_prefix=redis_prefix)

    async def hold_the_connection() -> None:
        await client.blpop([f"{redis_prefix}none"], timeout=0.1)

    try:
        blocker: asyncio.Task[None] | None = None
        with anyio.CancelScope() as scope:
            async with limiter.admit("query", "alice", PLENTY, 1):
                # Another request holds the only connection for a moment.
                blocker = asyncio.create_task(hold_the_connection())
                await asyncio.sleep(0.02)
                scope.cancel()
                await anyio.sleep(30)
        assert blocker is not None
        await blocker
        await _wait_for_slot(limiter)
        assert observer.errors == []
    finally:
        await limiter.aclose()
        await client.aclose()


# --- Redis failures ----------------------------------------------------------------------


@pytest.fixture
def dead_redis_url() -> str:
    """A port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def silent_redis_url() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def _assert_fails_open(limiter: RateLimiter, observer: RedisEvents) -> None:
    """Every request tries Redis once (the breaker stays closed), fails within the bound and
    is answered by the in-process limits."""
    for tried in (1, 2, 3):
        started = time.monotonic()
        async with limiter.admit("query", "alice", "3/hour", 1) as state:
            assert (state.limit, state.remaining) == (3, 3 - tried)
            assert 0 < state.reset_after <= 3600
        assert time.monotonic() - started < 0.5
        assert observer.errors.count("rate limit") == tried  # one Redis call per request
    # The in-process fallback still limits: the window...
    with pytest.raises(RateLimitExceeded) as refused:
        async with limiter.admit("query", "alice", "3/hour", 1):
            pytest.fail("a fourth request was admitted")
    assert refused.value.kind == "rate"
    assert 1 <= refused.value.retry_after <= 3600
    # ... and the slots; as in Redis, a refused request is not counted.
    async with limiter.admit("query", "bob", "3/hour", 1):
        with pytest.raises(RateLimitExceeded) as refused:
            async with limiter.admit("query", "bob", "3/hour", 1):
                pytest.fail("a second slot was granted")
        assert refused.value.kind == "concurrency"
    async with limiter.admit("query", "bob", "3/hour", 1) as state:
        assert state.remaining == 1
    assert (await limiter.hit("query", "carol", "3/hour")).remaining == 2
    # Each of the 8 requests above tried Redis (and failed) exactly once.
    assert observer.errors.count("rate limit") == 8
    assert observer.states == ["ok"]


async def test_redis_down_falls_back_to_in_process_limits(
    make_limiter: LimiterFactory, dead_redis_url: str
) -> None:
    observer = RedisEvents()
    limiter = make_limiter(url=dead_redis_url, breaker=patient_breaker(), observer=observer)
    assert limiter.backend == "redis"
    await _assert_fails_open(limiter, observer)


async def test_hung_redis_is_bounded_by_the_guard_timeout(silent_redis_url: str) -> None:
    # A client with redis-py's default retries and socket timeouts far beyond the test: only
    # the guard's asyncio.timeout (0.05 s) can bound a call.
    client = Redis.from_url(silent_redis_url, socket_timeout=10, socket_connect_timeout=10)
    observer = RedisEvents()
    guard = RedisGuard(client, timeout=0.05, breaker=patient_breaker(), observer=observer)
    limiter = RateLimiter(redis=guard, key_prefix="unused:")
    try:
        await _assert_fails_open(limiter, observer)
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_once_the_circuit_opens_redis_is_skipped_until_a_probe(
    redis_url: str, redis_prefix: str, dead_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five failed calls open the circuit (the app's breaker): from then on every admission is
    answered in process without a single Redis command, even with Redis healthy again; once
    the open period is over the next admission probes Redis, and two good probes close it."""
    client = create_redis(make_settings(redis_url=redis_url))
    dead = create_redis(make_settings(redis_url=dead_redis_url))
    inspect = Redis.from_url(redis_url)
    clock = FakeClock()
    breaker = CircuitBreaker("redis", redis_breaker(5.0).config, clock=clock)
    observer = RedisEvents()
    guard = RedisGuard(client, timeout=0.5, breaker=breaker, observer=observer)
    limiter = RateLimiter(redis=guard, key_prefix=redis_prefix)

    # Every command the limiter sends, in order; while `down`, it goes to a dead port.
    sent: list[str] = []
    down = True
    live: Callable[..., Awaitable[Any]] = client.execute_command

    async def switchable(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await (dead.execute_command if down else live)(*args, **options)

    monkeypatch.setattr(client, "execute_command", switchable)

    async def keys() -> list[bytes]:
        return [key async for key in inspect.scan_iter(match=f"{redis_prefix}*")]

    try:
        # Closed: each request tries Redis, fails, and is counted in process.
        for tried in range(1, 6):
            assert state_of(breaker) is BreakerState.CLOSED
            state = await limiter.hit("query", "alice", "8/hour")
            assert state.remaining == 8 - tried
            assert sent == ["EVALSHA"] * tried
        assert observer.errors == ["rate limit"] * 5
        assert state_of(breaker) is BreakerState.OPEN  # at the 5th failure
        assert observer.states == ["ok", "degraded"]

        # Open: Redis is healthy again, and still nothing goes to it; the limits hold in
        # process (the window, then the slots).
        down = False
        started = time.monotonic()
        for left in (2, 1, 0):
            assert (await limiter.hit("query", "alice", "8/hour")).remaining == left
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.hit("query", "alice", "8/hour")
        assert refused.value.kind == "rate"
        async with limiter.admit("query", "bob", PLENTY, 1):
            with pytest.raises(RateLimitExceeded) as refused:
                async with limiter.admit("query", "bob", PLENTY, 1):
                    pytest.fail("a second slot was granted")
            assert refused.value.kind == "concurrency"
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(ratelimit._RELEASE_DELAY * 2)  # anything spawned has run
        assert sent == ["EVALSHA"] * 5
        assert observer.errors == ["rate limit"] * 5
        assert await keys() == []
        assert state_of(breaker) is BreakerState.OPEN

        # The open period is over: the next admission is a probe and reaches Redis.
        clock.now += 5.0
        assert (await limiter.hit("query", "carol", "8/hour")).remaining == 7
        assert len(sent) > 5
        assert state_of(breaker) is BreakerState.HALF_OPEN
        assert observer.states == ["ok", "degraded"]
        assert (await limiter.hit("query", "carol", "8/hour")).remaining == 6
        assert state_of(breaker) is BreakerState.CLOSED  # two good probes
        assert observer.states == ["ok", "degraded", "ok"]
        [window] = await keys()
        assert await inspect.get(window) == b"2"  # both probes counted in Redis
        assert observer.errors == ["rate limit"] * 5
    finally:
        await limiter.aclose()
        for each in (client, dead, inspect):
            await each.aclose()


# --- headers -----------------------------------------------------------------------------


def test_rate_limit_headers() -> None:
    assert rate_limit_headers(RateLimitState(limit=60, remaining=12, reset_after=7.2)) == {
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "12",
        "RateLimit-Reset": "8",
    }
    assert rate_limit_headers(RateLimitState(limit=5, remaining=0, reset_after=0.0)) == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "0",
    }
    headers = rate_limit_headers(RateLimitState(limit=5, remaining=0, reset_after=59.0001))
    assert headers["RateLimit-Reset"] == "60"
