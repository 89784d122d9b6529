"""ResponseCache against the real Redis (and the in-process backend where it applies)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from app.cache import ResponseCache
from app.resilience.breaker import BreakerState, CircuitBreaker
from app.resilience.redis_guard import RedisGuard, create_redis, redis_breaker
from tests.conftest import make_settings, wait_until
from tests.support.redisserver import RedisServer
from tests.support.simserver import unused_port


@dataclass
class RecordingObserver:
    lookups: list[bool] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    def on_lookup(self, hit: bool) -> None:
        self.lookups.append(hit)

    def on_redis_error(self, operation: str) -> None:
        self.errors.append(operation.removeprefix("cache "))

    def on_redis_state(self, state: str) -> None:
        self.states.append(state)


class CountingConnection(Connection):
    """Counts socket connection attempts (to prove an open breaker does no network I/O)."""

    attempts = 0

    async def _connect(self) -> None:
        type(self).attempts += 1
        await super()._connect()  # type: ignore[no-untyped-call]


@dataclass
class Counter:
    """A compute function that counts its calls, sleeps, then answers (or raises)."""

    value: bytes = b"answer"
    delay: float = 0.0
    error: Exception | None = None
    calls: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    async def __call__(self) -> bytes:
        self.calls += 1
        self.started.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return self.value


CacheFactory = Callable[..., Awaitable[ResponseCache]]


@pytest.fixture
async def make_cache(redis_url: str, redis_prefix: str) -> AsyncIterator[CacheFactory]:
    """`await make_cache(backend, **options)`: a ResponseCache with its own Redis client
    (under this test's key prefix) or in memory; everything is closed afterwards."""
    caches: list[ResponseCache] = []
    clients: list[Redis] = []

    async def factory(
        backend: str = "redis",
        *,
        url: str | None = None,
        socket_timeout: float = 0.5,
        open_seconds: float = 5.0,
        max_entries: int = 100,
        lock_seconds: float = 2.0,
        observer: RecordingObserver | None = None,
        counting: bool = False,
    ) -> ResponseCache:
        guard: RedisGuard | None = None
        if backend == "redis":
            settings = make_settings(
                redis_url=url or redis_url, redis_socket_timeout=socket_timeout
            )
            client = create_redis(settings)
            if counting:
                client.connection_pool.connection_class = CountingConnection
            clients.append(client)
            guard = RedisGuard(
                client,
                timeout=socket_timeout,
                breaker=redis_breaker(open_seconds),
                observer=observer,
            )
        cache = ResponseCache(
            redis=guard,
            key_prefix=redis_prefix,
            max_entries=max_entries,
            lock_seconds=lock_seconds,
            observer=observer,
        )
        caches.append(cache)
        return cache

    yield factory
    for cache in caches:
        await cache.aclose()
    for client in clients:
        await client.aclose()


def breaker_of(cache: ResponseCache) -> CircuitBreaker:
    assert cache.redis is not None
    return cache.redis.breaker


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


# --- get / set ---------------------------------------------------------------------------


async def test_get_after_set(make_cache: CacheFactory, backend: str) -> None:
    observer = RecordingObserver()
    cache = await make_cache(backend, observer=observer)
    assert cache.backend == backend
    assert await cache.get("k1") is None
    await cache.set("k1", b"\x00value\xff", 60)
    assert await cache.get("k1") == b"\x00value\xff"
    assert observer.lookups == [False, True]
    assert observer.errors == []
    assert observer.states == (["ok"] if backend == "redis" else [])
    assert cache.status()["state"] == "ok"
    assert cache.status()["backend"] == backend


async def test_redis_key_layout(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis")
    await cache.set("k1", b"v", 60, session_id="s1")
    assert await raw_redis.get(f"{redis_prefix}cache:k1") == b"v"
    assert await raw_redis.smembers(f"{redis_prefix}cache-session:s1") == {b"k1"}
    assert 59_000 < await raw_redis.pttl(f"{redis_prefix}cache:k1") <= 60_000


async def test_ttl_expiry_per_entry(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    await cache.set("short", b"s", 0.3)
    await cache.set("long", b"l", 30)
    assert await cache.get("short") == b"s"
    await asyncio.sleep(0.5)
    assert await cache.get("short") is None
    assert await cache.get("long") == b"l"


async def test_non_positive_ttl_stores_nothing(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    await cache.set("k", b"v", 0)
    assert await cache.get("k") is None


async def test_memory_backend_is_a_bounded_lru(make_cache: CacheFactory) -> None:
    cache = await make_cache("memory", max_entries=3)
    for name in ("a", "b", "c"):
        await cache.set(name, name.encode(), 60)
    assert await cache.get("a") == b"a"  # now "b" is the least recently used
    await cache.set("d", b"d", 60)
    assert await cache.get("b") is None
    assert [await cache.get(name) for name in ("a", "c", "d")] == [b"a", b"c", b"d"]
    assert "3 of 3" in str(cache.status()["detail"])


# --- get_or_compute ----------------------------------------------------------------------


async def test_get_or_compute_miss_then_hit(make_cache: CacheFactory, backend: str) -> None:
    observer = RecordingObserver()
    cache = await make_cache(backend, observer=observer)
    compute = Counter(b"v1")
    assert await cache.get_or_compute("k", compute, ttl=60) == (b"v1", False)
    assert await cache.get_or_compute("k", compute, ttl=60) == (b"v1", True)
    assert compute.calls == 1
    assert observer.lookups == [False, True]


async def test_read_false_recomputes_and_stores(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    await cache.get_or_compute("k", Counter(b"old"), ttl=60)
    fresh = Counter(b"new")
    assert await cache.get_or_compute("k", fresh, ttl=60, read=False) == (b"new", False)
    assert fresh.calls == 1
    assert await cache.get("k") == b"new"


async def test_write_false_does_not_store(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    compute = Counter(b"private")
    assert await cache.get_or_compute("k", compute, ttl=60, write=False) == (b"private", False)
    assert await cache.get("k") is None
    await cache.set("k", b"cached", 60)
    # no-store still may read what is cached
    assert await cache.get_or_compute("k", compute, ttl=60, write=False) == (b"cached", True)
    assert compute.calls == 1


async def test_single_flight(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    compute = Counter(b"shared", delay=0.1)
    results = await asyncio.gather(*(cache.get_or_compute("k", compute, ttl=60) for _ in range(20)))
    assert compute.calls == 1
    assert all(value == b"shared" for value, _ in results)
    assert sorted(hit for _, hit in results) == [False] + [True] * 19
    assert cache.in_flight == 0
    assert await cache.get("k") == b"shared"


async def test_single_flight_error_reaches_everyone(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    boom = RuntimeError("upstream failed")
    compute = Counter(delay=0.1, error=boom)
    results = await asyncio.gather(
        *(cache.get_or_compute("k", compute, ttl=60) for _ in range(20)), return_exceptions=True
    )
    assert compute.calls == 1
    assert all(result is boom for result in results)
    await asyncio.sleep(0)  # let the flight's done-callback run
    assert cache.in_flight == 0
    assert await cache.get("k") is None
    retry = Counter(b"second try")
    assert await cache.get_or_compute("k", retry, ttl=60) == (b"second try", False)


async def test_cancelled_leader_does_not_strand_followers(
    make_cache: CacheFactory, backend: str
) -> None:
    cache = await make_cache(backend)
    compute = Counter(b"v", delay=0.2)
    leader = asyncio.create_task(cache.get_or_compute("k", compute, ttl=60))
    await asyncio.wait_for(compute.started.wait(), 2)
    followers = [asyncio.create_task(cache.get_or_compute("k", compute, ttl=60)) for _ in range(5)]
    await asyncio.sleep(0.02)  # the followers have joined the flight
    leader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*followers), 2)
    assert results == [(b"v", True)] * 5
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert compute.calls == 1
    assert not compute.cancelled
    assert await cache.get("k") == b"v"


async def test_abandoned_flight_is_cancelled(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    compute = Counter(b"v", delay=5)
    waiters = [asyncio.create_task(cache.get_or_compute("k", compute, ttl=60)) for _ in range(3)]
    await asyncio.wait_for(compute.started.wait(), 2)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await wait_until(lambda: compute.cancelled, timeout=2)
    assert cache.in_flight == 0
    again = Counter(b"again")
    assert await cache.get_or_compute("k", again, ttl=60) == (b"again", False)
    assert await cache.get("k") == b"again"


# --- across replicas (Redis only) ---------------------------------------------------------


async def test_single_flight_across_replicas(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    one, two = await make_cache("redis"), await make_cache("redis")
    compute = Counter(b"v", delay=0.2)
    results = await asyncio.gather(
        *(cache.get_or_compute("k", compute, ttl=60) for cache in (one, two, one, two))
    )
    assert compute.calls == 1
    assert sorted(results) == [(b"v", False)] + [(b"v", True)] * 3
    assert await raw_redis.exists(f"{redis_prefix}lock:k") == 0  # released


async def test_one_round_trip_looks_up_and_locks(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit is one script call and takes no lock; a miss holds the lock while it computes."""
    cache = await make_cache("redis")
    # Load both scripts into Redis first (a fresh Redis answers the first EVALSHA with
    # NOSCRIPT, and redis-py then sends SCRIPT LOAD): this test counts the steady state.
    await cache.get_or_compute("warm-up", Counter(b"w"), ttl=60, session_id="s")
    await raw_redis.set(f"{redis_prefix}cache:hit", b"stored")
    commands: list[str] = []
    client = cast(Redis, cache._redis)
    original: Callable[..., Awaitable[Any]] = client.execute_command

    async def recording(*args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return await original(*args, **options)

    monkeypatch.setattr(client, "execute_command", recording)
    compute = Counter(b"unused")
    assert await cache.get_or_compute("hit", compute, ttl=60) == (b"stored", True)
    assert compute.calls == 0
    assert commands == ["EVALSHA"]
    assert await raw_redis.exists(f"{redis_prefix}lock:hit") == 0

    locked_during_compute: list[int] = []

    async def observe_lock() -> bytes:
        locked_during_compute.append(await raw_redis.exists(f"{redis_prefix}lock:miss"))
        return b"fresh"

    commands.clear()
    assert await cache.get_or_compute("miss", observe_lock, ttl=60) == (b"fresh", False)
    assert locked_during_compute == [1]
    assert commands == ["EVALSHA", "EVALSHA"]  # look up + lock; store + unlock
    assert await raw_redis.exists(f"{redis_prefix}lock:miss") == 0
    assert await raw_redis.get(f"{redis_prefix}cache:miss") == b"fresh"


async def test_replica_computes_when_the_lock_holder_fails(make_cache: CacheFactory) -> None:
    one, two = await make_cache("redis"), await make_cache("redis")
    failing = Counter(delay=0.1, error=RuntimeError("boom"))
    working = Counter(b"v")
    first = asyncio.create_task(one.get_or_compute("k", failing, ttl=60))
    await asyncio.wait_for(failing.started.wait(), 2)
    started = time.monotonic()
    assert await two.get_or_compute("k", working, ttl=60) == (b"v", False)
    assert time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError, match="boom"):
        await first
    assert working.calls == 1


async def test_the_lock_goes_with_the_value(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis")
    assert await cache.get_or_compute("k", Counter(b"v"), ttl=60, session_id="s") == (
        b"v",
        False,
    )
    assert await raw_redis.get(f"{redis_prefix}lock:k") is None
    assert await raw_redis.get(f"{redis_prefix}cache:k") == b"v"


async def test_lock_is_released_even_when_the_breaker_opened_meanwhile(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    """A lock left behind would stall every later request for the key until it expired."""
    cache = await make_cache("redis", lock_seconds=30)
    breaker = breaker_of(cache)

    async def compute_while_redis_flaps() -> bytes:
        for _ in range(10):  # the breaker sees failures from other requests and opens
            breaker.record_failure(0.0)
        return b"v"

    assert await cache.get_or_compute("k", compute_while_redis_flaps, ttl=60) == (b"v", False)
    assert await raw_redis.get(f"{redis_prefix}lock:k") is None


async def test_foreign_lock_is_waited_for_at_most_lock_seconds(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis", lock_seconds=0.3)
    lock_key = f"{redis_prefix}lock:k"
    await raw_redis.set(lock_key, "another-replica", px=10_000)  # a replica that hangs
    compute = Counter(b"v")
    started = time.monotonic()
    assert await cache.get_or_compute("k", compute, ttl=60) == (b"v", False)
    assert 0.25 < time.monotonic() - started < 1.5
    assert await raw_redis.get(lock_key) == b"another-replica"
    assert await cache.get("k") == b"v"


async def test_expired_lock_taken_over_is_not_deleted(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis", lock_seconds=0.2)
    lock_key = f"{redis_prefix}lock:k"
    compute = Counter(b"slow", delay=0.4)
    task = asyncio.create_task(cache.get_or_compute("k", compute, ttl=60))
    await asyncio.wait_for(compute.started.wait(), 2)
    assert await raw_redis.exists(lock_key) == 1  # ours
    await asyncio.sleep(0.25)  # ours expired; another replica takes the lock
    assert await raw_redis.set(lock_key, "another-replica", px=10_000, nx=True)
    assert await asyncio.wait_for(task, 2) == (b"slow", False)
    assert await raw_redis.get(lock_key) == b"another-replica"  # compare-and-delete


async def test_waiting_replica_takes_the_value_written_meanwhile(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis", lock_seconds=2.0)
    await raw_redis.set(f"{redis_prefix}lock:k", "another-replica", px=10_000)
    compute = Counter(b"mine")
    task = asyncio.create_task(cache.get_or_compute("k", compute, ttl=60))
    await asyncio.sleep(0.1)
    await raw_redis.set(f"{redis_prefix}cache:k", b"theirs", px=60_000)
    assert await asyncio.wait_for(task, 1) == (b"theirs", True)
    assert compute.calls == 0


# --- sessions ----------------------------------------------------------------------------


async def test_forget_session(make_cache: CacheFactory, backend: str) -> None:
    cache = await make_cache(backend)
    await cache.set("a1", b"1", 60, session_id="alice")
    await cache.get_or_compute("a2", Counter(b"2"), ttl=60, session_id="alice")
    await cache.set("b1", b"3", 60, session_id="bob")
    await cache.set("n1", b"4", 60)
    assert await cache.forget_session("alice") == 2
    assert await cache.get("a1") is None
    assert await cache.get("a2") is None
    assert await cache.get("b1") == b"3"
    assert await cache.get("n1") == b"4"
    assert await cache.forget_session("alice") == 0
    assert await cache.forget_session("nobody") == 0


async def test_session_index_outlives_its_longest_entry(
    make_cache: CacheFactory, raw_redis: Redis, redis_prefix: str
) -> None:
    cache = await make_cache("redis")
    index = f"{redis_prefix}cache-session:s"
    await cache.set("k1", b"1", 10, session_id="s")
    assert 9_000 < await raw_redis.pttl(index) <= 10_000
    await cache.set("k2", b"2", 100, session_id="s")
    assert 99_000 < await raw_redis.pttl(index) <= 100_000
    await cache.set("k3", b"3", 1, session_id="s")  # never shortened
    assert 99_000 < await raw_redis.pttl(index) <= 100_000
    assert await cache.forget_session("s") == 3
    assert await raw_redis.exists(index) == 0


# --- Redis unavailable -------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never answers (a hung Redis)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("failure", ["refused", "silent"])
async def test_redis_unavailable(
    make_cache: CacheFactory, failure: str, request: pytest.FixtureRequest
) -> None:
    port = unused_port() if failure == "refused" else request.getfixturevalue("silent_port")
    observer = RecordingObserver()
    cache = await make_cache(
        "redis",
        url=f"redis://127.0.0.1:{port}/0",
        socket_timeout=0.1,
        open_seconds=30,
        observer=observer,
        counting=True,
    )
    CountingConnection.attempts = 0

    async def timed(operation: Awaitable[Any]) -> tuple[Any, float]:
        started = time.monotonic()
        result = await operation
        return result, time.monotonic() - started

    # Window 10, at least 5 calls, 50 %: the fifth failure will open the breaker.
    outcomes = [
        await timed(cache.get("k")),
        await timed(cache.set("k", b"v", 60, session_id="s")),
        await timed(cache.get_or_compute("k", Counter(b"computed"), ttl=60)),
    ]
    assert [result for result, _ in outcomes] == [None, None, (b"computed", False)]
    assert all(elapsed < 0.3 for _, elapsed in outcomes), outcomes
    # get_or_compute: its lookup-and-lock failed; it computes unlocked and tries to store
    assert observer.errors == ["get", "set", "lock", "set"]
    assert observer.states == ["ok"]
    result, elapsed = await timed(cache.get("k"))  # the fifth failure opens the breaker
    assert result is None
    assert elapsed < 0.3
    assert observer.errors == ["get", "set", "lock", "set", "get"]
    assert observer.states == ["ok", "degraded"]
    status = cache.status()
    assert status["state"] == "degraded"
    assert "open" in str(status["detail"])
    attempts = CountingConnection.attempts
    assert attempts >= 5

    # Open: immediate answers, no network I/O, no more errors.
    compute = Counter(b"again")
    for _ in range(10):
        started = time.monotonic()
        assert await cache.get("k") is None
        await cache.set("k", b"v", 60, session_id="s")
        assert await cache.get_or_compute("k", compute, ttl=60) == (b"again", False)
        assert await cache.forget_session("s") == 0
        assert time.monotonic() - started < 0.05
    assert compute.calls == 10
    assert CountingConnection.attempts == attempts
    assert observer.errors == ["get", "set", "lock", "set", "get"]


async def test_outage_and_recovery(make_cache: CacheFactory) -> None:
    observer = RecordingObserver()
    with RedisServer() as server:
        cache = await make_cache(
            "redis", url=server.url, socket_timeout=0.1, open_seconds=0.3, observer=observer
        )
        await cache.set("k", b"before", 60)
        assert await cache.get("k") == b"before"

        server.stop()
        for _ in range(8):
            started = time.monotonic()
            assert await cache.get("k") is None
            await cache.set("k", b"during", 60)
            assert time.monotonic() - started < 0.3
        assert observer.states == ["ok", "degraded"]
        assert cache.status()["state"] == "degraded"
        assert 0 < len(observer.errors) <= 5

        server.start()
        assert await cache.get("k") is None  # still open: no probe yet
        await asyncio.sleep(0.35)
        await cache.set("k", b"after", 60)  # half-open probe 1
        assert await cache.get("k") == b"after"  # probe 2 closes the breaker
        assert observer.states == ["ok", "degraded", "ok"]
        assert cache.status() == {"backend": "redis", "state": "ok", "detail": "redis in use"}
        assert await cache.get_or_compute("k2", Counter(b"x"), ttl=60) == (b"x", False)
        assert await cache.get_or_compute("k2", Counter(b"y"), ttl=60) == (b"x", True)


async def test_half_open_failure_reopens(make_cache: CacheFactory) -> None:
    observer = RecordingObserver()
    cache = await make_cache(
        "redis",
        url=f"redis://127.0.0.1:{unused_port()}/0",
        socket_timeout=0.1,
        open_seconds=0.2,
        observer=observer,
    )
    for _ in range(5):
        await cache.get("k")
    assert breaker_of(cache).state is BreakerState.OPEN
    await asyncio.sleep(0.25)
    await cache.get("k")  # probe fails
    await cache.get("k")  # second probe fails: opens again
    assert breaker_of(cache).state is BreakerState.OPEN
    assert observer.states == ["ok", "degraded"]  # half-open is still "degraded"
