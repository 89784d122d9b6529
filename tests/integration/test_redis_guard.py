"""app.resilience.redis_guard against the real Redis.

The shared client (`create_redis`): bounded, waiting when every connection is out, and
failing fast once its wait is over. The failure policy (`RedisGuard`): a dead or hung Redis
costs a call at most its timeout and is reported; the circuit opens at the 5th failure of 10
and then skips calls without I/O until its probes; `bypass_breaker` runs anyway; errors that
say nothing about reachability are reported but not counted; cancellation propagates and
gives the permit back; warnings are rate-limited."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.resilience import redis_guard
from app.resilience.breaker import BreakerState, CircuitBreaker
from app.resilience.redis_guard import (
    RedisGuard,
    RedisUnavailableError,
    create_redis,
    redis_breaker,
)
from tests.conftest import make_settings, wait_until
from tests.support.fakes import FakeClock, RedisEvents

ClientFactory = Callable[..., Redis]


@pytest.fixture
async def make_client(redis_url: str) -> AsyncIterator[ClientFactory]:
    """`make_client(max_connections)`: the app's client (`create_redis`) on the real Redis,
    or on `url`; closed afterwards."""
    clients: list[Redis] = []

    def factory(
        max_connections: int = 10, socket_timeout: float = 2.0, url: str | None = None
    ) -> Redis:
        settings = make_settings(
            redis_url=url or redis_url,
            redis_max_connections=max_connections,
            redis_socket_timeout=socket_timeout,
        )
        client = create_redis(settings)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


def pool_of(client: Redis) -> BlockingConnectionPool:
    pool = client.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    return pool


async def test_the_client_uses_a_blocking_pool_with_the_configured_bound(
    make_client: ClientFactory,
) -> None:
    client = make_client(max_connections=7)
    assert pool_of(client).max_connections == 7
    assert await client.ping() is True


async def test_a_burst_past_the_bound_waits_and_every_command_lands(
    make_client: ClientFactory, redis_prefix: str
) -> None:
    client = make_client(max_connections=2)
    key = f"{redis_prefix}counter"

    async def worker() -> None:
        for _ in range(20):
            await client.incr(key)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(50))), timeout=20)
    assert await client.get(key) == b"1000"
    info = await client.client_list()
    assert info  # the server still answers on the same, bounded pool


async def test_a_waiter_gets_the_connection_when_it_comes_back(
    make_client: ClientFactory,
) -> None:
    client = make_client(max_connections=1)
    pool = pool_of(client)
    held = await pool.get_connection()  # type: ignore[no-untyped-call]
    waiter = asyncio.ensure_future(client.ping())
    await asyncio.sleep(0.05)
    assert not waiter.done()  # no "Too many connections": it waits
    await pool.release(held)
    assert await asyncio.wait_for(waiter, timeout=2) is True


async def test_waiting_is_bounded_by_the_socket_timeout(
    make_client: ClientFactory,
) -> None:
    client = make_client(max_connections=1, socket_timeout=0.2)
    pool = pool_of(client)
    held = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await asyncio.wait_for(client.ping(), timeout=2)
    finally:
        await pool.release(held)
    assert await client.ping() is True


async def test_a_dead_server_fails_within_the_socket_timeout() -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", redis_socket_timeout=0.2)
    client = create_redis(settings)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()
    assert loop.time() - started < 1.0


# --- RedisGuard ----------------------------------------------------------------------------


class CountingConnection(Connection):
    """Counts connection attempts: a skipped call must not even try to connect."""

    attempts = 0

    async def _connect(self) -> None:
        type(self).attempts += 1
        await super()._connect()  # type: ignore[no-untyped-call]


@dataclass
class Ping:
    """A call for the guard that PINGs `target` (default: the guard's client) and counts its
    runs: the guard does I/O only through the function it is given."""

    target: Redis | None = None
    runs: int = 0

    async def __call__(self, client: Redis) -> bool:
        self.runs += 1
        return bool(await (self.target or client).ping())


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (a call, so mypy does not narrow it across awaits)."""
    return breaker.state


OPEN_SECONDS = 5.0


def _guard(
    client: Redis,
    observer: RedisEvents,
    *,
    clock: FakeClock | None = None,
    timeout: float = 0.5,
) -> RedisGuard:
    """The app's policy around `client`: its breaker (`redis_breaker`), on `clock` if given."""
    breaker = redis_breaker(OPEN_SECONDS)
    if clock is not None:
        breaker = CircuitBreaker("redis", breaker.config, clock=clock)
    return RedisGuard(client, timeout=timeout, breaker=breaker, observer=observer)


@pytest.fixture
def dead_url() -> str:
    """A port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


@pytest.fixture
def dead_ping(make_client: ClientFactory, dead_url: str, monkeypatch: pytest.MonkeyPatch) -> Ping:
    """A call that fails with a real refused connection, counting connect attempts."""
    client = make_client(url=dead_url, socket_timeout=0.5)
    client.connection_pool.connection_class = CountingConnection
    monkeypatch.setattr(CountingConnection, "attempts", 0)
    return Ping(client)


async def _fail(guard: RedisGuard, call: Ping, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(RedisUnavailableError):
            await guard.call("ping", call)


def test_the_guard_wants_a_timeout(make_client: ClientFactory) -> None:
    with pytest.raises(ValueError, match="timeout"):
        RedisGuard(make_client(), timeout=0, breaker=redis_breaker(OPEN_SECONDS))


async def test_a_dead_redis_fails_fast_and_is_reported(
    make_client: ClientFactory, dead_url: str
) -> None:
    observer = RedisEvents()
    guard = _guard(make_client(url=dead_url, socket_timeout=0.5), observer, timeout=2.0)
    assert observer.states == ["ok"]  # reported when the guard is made
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisUnavailableError, match="ping") as failed:
        await guard.call("ping", Ping())
    assert loop.time() - started < 0.5  # refused at once, not cut at the timeout
    assert isinstance(failed.value.__cause__, RedisConnectionError)
    assert observer.errors == ["ping"]
    snapshot = guard.breaker.snapshot()
    assert (snapshot.buffered_calls, snapshot.failed_calls) == (1, 1)
    assert observer.states == ["ok"]  # one failure is not an outage
    assert guard.state == "ok"
    assert guard.detail() == "redis in use"


async def test_a_hung_redis_is_cut_at_the_timeout(
    make_client: ClientFactory, silent_url: str
) -> None:
    observer = RedisEvents()
    # The client's own bounds (2 s) are far off: only the guard's timeout can end the call.
    guard = _guard(make_client(url=silent_url, socket_timeout=2.0), observer, timeout=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisUnavailableError) as failed:
        await guard.call("ping", Ping())
    assert 0.09 < loop.time() - started < 0.5  # cut at the guard's 0.1 s
    assert isinstance(failed.value.__cause__, TimeoutError)
    assert observer.errors == ["ping"]
    assert guard.breaker.snapshot().failed_calls == 1  # slow to answer counts as a failure


async def test_the_circuit_opens_at_the_5th_failure_of_10_and_then_skips_without_io(
    make_client: ClientFactory, dead_ping: Ping
) -> None:
    observer = RedisEvents()
    guard = _guard(make_client(), observer, clock=FakeClock())
    ping = Ping()
    for _ in range(5):
        assert await guard.call("ping", ping) is True
    for failures in range(1, 5):
        await _fail(guard, dead_ping)
        assert guard.breaker.snapshot().failed_calls == failures
        assert state_of(guard.breaker) is BreakerState.CLOSED  # at most 4 of 9: under 50 %
        assert observer.states == ["ok"]
    await _fail(guard, dead_ping)  # 5 of 10
    assert state_of(guard.breaker) is BreakerState.OPEN
    assert observer.states == ["ok", "degraded"]
    assert guard.state == "degraded"
    assert guard.detail() == "redis failing: circuit open, next probe in 5.0s"
    assert observer.errors == ["ping"] * 5
    assert (dead_ping.runs, CountingConnection.attempts) == (5, 5)  # one connect each

    # Open: every call is skipped at once, with no I/O, and nothing new is reported.
    for _ in range(3):
        for call in (dead_ping, ping):
            with pytest.raises(RedisUnavailableError) as skipped:
                await guard.call("ping", call)
            assert skipped.value.__cause__ is None
    assert (dead_ping.runs, CountingConnection.attempts, ping.runs) == (5, 5, 5)
    assert observer.errors == ["ping"] * 5
    assert guard.breaker.snapshot().not_permitted_calls == 6
    assert observer.states == ["ok", "degraded"]


async def test_the_circuit_waits_for_5_calls_before_it_judges(
    make_client: ClientFactory, dead_ping: Ping
) -> None:
    observer = RedisEvents()
    guard = _guard(make_client(), observer, clock=FakeClock())
    await _fail(guard, dead_ping, times=4)
    assert state_of(guard.breaker) is BreakerState.CLOSED  # 100 % of 4: too few calls
    await _fail(guard, dead_ping)
    assert state_of(guard.breaker) is BreakerState.OPEN
    assert observer.states == ["ok", "degraded"]


async def test_after_the_open_period_probes_go_to_redis(
    make_client: ClientFactory, dead_ping: Ping
) -> None:
    observer = RedisEvents()
    clock = FakeClock()
    guard = _guard(make_client(), observer, clock=clock)
    ping = Ping()
    await _fail(guard, dead_ping, times=5)
    assert state_of(guard.breaker) is BreakerState.OPEN

    clock.now += OPEN_SECONDS - 0.01
    with pytest.raises(RedisUnavailableError):
        await guard.call("ping", ping)
    assert ping.runs == 0

    # Over: two probes go out; both fail, and the circuit opens again for a new period.
    clock.now += 0.02
    await _fail(guard, dead_ping)
    assert state_of(guard.breaker) is BreakerState.HALF_OPEN
    assert guard.detail() == "redis recovering: circuit half-open, probing"
    await _fail(guard, dead_ping)
    assert dead_ping.runs == 7
    assert state_of(guard.breaker) is BreakerState.OPEN
    with pytest.raises(RedisUnavailableError):
        await guard.call("ping", ping)
    assert ping.runs == 0

    # Over again: two good probes close it.
    clock.now += OPEN_SECONDS
    assert await guard.call("ping", ping) is True
    assert state_of(guard.breaker) is BreakerState.HALF_OPEN
    assert observer.states == ["ok", "degraded"]  # half-open is still degraded
    assert await guard.call("ping", ping) is True
    assert state_of(guard.breaker) is BreakerState.CLOSED
    assert observer.states == ["ok", "degraded", "ok"]
    assert observer.errors == ["ping"] * 7
    assert ping.runs == 2


async def test_bypass_breaker_runs_while_open_and_is_never_counted(
    make_client: ClientFactory, dead_ping: Ping
) -> None:
    observer = RedisEvents()
    guard = _guard(make_client(), observer, clock=FakeClock())
    # Closed: failures that bypass the breaker are reported, and not counted.
    for _ in range(10):
        with pytest.raises(RedisUnavailableError) as failed:
            await guard.call("lock", dead_ping, bypass_breaker=True)
        assert isinstance(failed.value.__cause__, RedisConnectionError)
    assert observer.errors == ["lock"] * 10
    assert guard.breaker.snapshot().buffered_calls == 0
    assert state_of(guard.breaker) is BreakerState.CLOSED

    await _fail(guard, dead_ping, times=5)
    assert state_of(guard.breaker) is BreakerState.OPEN
    ping = Ping()
    with pytest.raises(RedisUnavailableError):
        await guard.call("ping", ping)
    assert ping.runs == 0
    # Open: a bypassing call still runs (and its failure is still reported).
    assert await guard.call("lock", ping, bypass_breaker=True) is True
    assert ping.runs == 1
    with pytest.raises(RedisUnavailableError):
        await guard.call("lock", dead_ping, bypass_breaker=True)
    assert observer.errors == ["lock"] * 10 + ["ping"] * 5 + ["lock"]
    assert state_of(guard.breaker) is BreakerState.OPEN
    assert guard.breaker.snapshot().not_permitted_calls == 1


async def _script_error(client: Redis) -> object:
    return await client.eval("return redis.error_reply('ERR boom')", 0)


async def test_a_script_error_is_reported_but_not_counted(
    make_client: ClientFactory, dead_ping: Ping
) -> None:
    observer = RedisEvents()
    clock = FakeClock()
    guard = _guard(make_client(), observer, clock=clock)
    for _ in range(10):
        with pytest.raises(RedisUnavailableError) as failed:
            await guard.call("script", _script_error)
        assert isinstance(failed.value.__cause__, ResponseError)
        assert "boom" in str(failed.value.__cause__)
    assert observer.errors == ["script"] * 10
    assert guard.breaker.snapshot().buffered_calls == 0  # Redis answered: it is reachable
    assert state_of(guard.breaker) is BreakerState.CLOSED
    assert observer.states == ["ok"]

    # Half-open: a script error gives its probe permit back (else the third call below
    # would be refused, both permits taken), and two good probes still close the circuit.
    await _fail(guard, dead_ping, times=5)
    clock.now += OPEN_SECONDS
    for _ in range(3):
        with pytest.raises(RedisUnavailableError) as failed:
            await guard.call("script", _script_error)
        assert isinstance(failed.value.__cause__, ResponseError)
    assert state_of(guard.breaker) is BreakerState.HALF_OPEN
    assert guard.breaker.snapshot().not_permitted_calls == 0
    ping = Ping()
    assert await guard.call("ping", ping) is True
    assert await guard.call("ping", ping) is True
    assert state_of(guard.breaker) is BreakerState.CLOSED
    assert observer.errors == ["script"] * 10 + ["ping"] * 5 + ["script"] * 3


@dataclass
class Blocked:
    """A call that blocks in Redis (BLPOP on an empty list) until it is cancelled."""

    key: str
    entered: int = 0

    async def __call__(self, client: Redis) -> object:
        self.entered += 1
        return await client.blpop([self.key], timeout=30)


async def test_cancellation_propagates_and_gives_the_permit_back(
    make_client: ClientFactory, dead_ping: Ping, redis_prefix: str
) -> None:
    observer = RedisEvents()
    clock = FakeClock()
    guard = _guard(make_client(), observer, clock=clock, timeout=60)
    blocked = Blocked(f"{redis_prefix}empty")

    # Closed: a cancelled call is neither a failure nor a success.
    call = asyncio.create_task(guard.call("pop", blocked))
    await wait_until(lambda: blocked.entered == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert guard.breaker.snapshot().buffered_calls == 0
    assert observer.errors == []

    # Half-open: two probes are out, blocked; a third call is refused.
    await _fail(guard, dead_ping, times=5)
    clock.now += OPEN_SECONDS
    first = asyncio.create_task(guard.call("pop", blocked))
    second = asyncio.create_task(guard.call("pop", blocked))
    await wait_until(lambda: blocked.entered == 3)
    assert state_of(guard.breaker) is BreakerState.HALF_OPEN
    ping = Ping()
    with pytest.raises(RedisUnavailableError):
        await guard.call("ping", ping)
    assert ping.runs == 0
    # Cancelling a probe propagates (no RedisUnavailableError) and frees its permit.
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await guard.call("ping", ping) is True
    assert state_of(guard.breaker) is BreakerState.HALF_OPEN  # one good probe of two
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await guard.call("ping", ping) is True
    assert state_of(guard.breaker) is BreakerState.CLOSED
    assert observer.errors == ["ping"] * 5  # the cancellations were not reported
    assert observer.states == ["ok", "degraded", "ok"]


async def test_warnings_are_rate_limited(
    make_client: ClientFactory,
    dead_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One warning per WARN_INTERVAL however many calls fail; the next says how many were
    not logged. Every failure is reported to the observer all the same."""
    now = FakeClock()
    monkeypatch.setattr(redis_guard, "time", SimpleNamespace(monotonic=now))
    observer = RedisEvents()
    guard = _guard(make_client(url=dead_url, socket_timeout=0.5), observer, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="app.resilience.redis_guard"):
        await _fail(guard, Ping(), times=3)
        now.now += redis_guard.WARN_INTERVAL - 0.5
        await _fail(guard, Ping())
        now.now += 1.0  # past the interval since the first warning
        await _fail(guard, Ping())  # the 5th: the circuit opens too
    messages = [r.getMessage() for r in caplog.records if r.name == "app.resilience.redis_guard"]
    assert len(messages) == 3, messages
    assert messages[0].startswith("redis ping failed (")
    assert messages[0].endswith("); 0 similar errors not logged")
    assert messages[1] == "redis degraded: skipped until it answers again"
    assert messages[2].startswith("redis ping failed (")
    assert messages[2].endswith("); 3 similar errors not logged")
    assert observer.errors == ["ping"] * 5
