"""RedisGuard: the one failure policy for Redis, shared by the response cache and the limiter.

Redis is an optimisation here, never a dependency of a request: every caller can go on
without it (compute the answer, count in process). So every Redis round trip goes through
`RedisGuard.call`, which

* asks a circuit breaker (`redis_breaker`) first: while Redis keeps failing the call is
  skipped at once (`RedisUnavailableError`, no I/O), so an outage costs a request nothing;
* bounds the whole call with one `asyncio.timeout` (a wait for a pooled connection, a
  connect, the command, and a script's reload after a Redis restart);
* counts a connection or timeout failure against the breaker, logs it (at most one warning
  per `WARN_INTERVAL`), reports it to the observer and raises `RedisUnavailableError`;
  any other Redis error (a script error, OOM) is reported too but says nothing about
  reachability, so the breaker's permit is given back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.config import Settings
from app.resilience.breaker import BreakerConfig, BreakerOpenError, BreakerState, CircuitBreaker

logger = logging.getLogger(__name__)

T = TypeVar("T")

WARN_INTERVAL = 10.0
"""At most one warning per this many seconds while Redis keeps failing."""

UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)
"""Errors that say Redis is unreachable or slow: they count against the breaker."""

FAILURES: tuple[type[BaseException], ...] = (RedisError, *UNREACHABLE)
"""Everything a Redis call may fail with (anything else is a bug, or cancellation)."""

RedisState = Literal["ok", "degraded"]


HEALTH_CHECK_INTERVAL = 5
"""Seconds a pooled Redis connection may idle before it is PINGed ahead of its next use."""


def create_redis(settings: Settings) -> Redis:
    """The one Redis client of the app (cache and rate limits).

    Connecting and waiting for a pooled connection are bounded by ``redis_socket_timeout``
    and nothing is retried: a caller that falls back at once beats one that waits. The
    BlockingConnectionPool waits for a free connection where the plain pool raises "Too many
    connections" under a burst, which the failure policy would mistake for an outage. Reads
    and writes have no socket timeout: `RedisGuard` bounds the whole call (a cancelled
    command disconnects its connection, so no stale reply reaches the next one), and a
    second bound would cost a timer per command. The caller closes the client.
    """
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    timeout = settings.redis_socket_timeout
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    return Redis.from_pool(pool)


class RedisUnavailableError(Exception):
    """The call was skipped (circuit open: `attempted` is False, nothing reached Redis) or
    failed (already counted and logged)."""

    def __init__(self, operation: str, *, attempted: bool) -> None:
        super().__init__(operation)
        self.attempted = attempted


class RedisObserver(Protocol):
    """Metrics hooks (the app implements them with Prometheus)."""

    def on_redis_error(self, operation: str) -> None: ...

    def on_redis_state(self, state: RedisState) -> None: ...


def redis_breaker(open_seconds: float) -> CircuitBreaker:
    """Slow calls do not count: every call is already cut at the guard's timeout (then a
    failure), and a call that merely waited for a busy event loop says nothing about
    Redis (counting those would turn Redis off under load)."""
    return CircuitBreaker(
        "redis",
        BreakerConfig(
            failure_rate_threshold=50.0,
            slow_call_rate_threshold=100.0,
            slow_call_duration_threshold=3600.0,
            sliding_window_size=10,
            minimum_number_of_calls=5,
            wait_duration_in_open_state=open_seconds,
            permitted_number_of_calls_in_half_open_state=2,
        ),
    )


class RedisGuard:
    """One Redis client and the policy around it. Use from one event loop only."""

    def __init__(
        self,
        client: Redis,
        *,
        timeout: float,
        breaker: CircuitBreaker,
        observer: RedisObserver | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self.client = client
        self.timeout = timeout
        self.breaker = breaker
        self._observer = observer
        self._state: RedisState = "ok"
        self._last_warning = -math.inf
        self._suppressed = 0
        if observer is not None:
            observer.on_redis_state(self._state)

    @property
    def state(self) -> RedisState:
        return "ok" if self.breaker.state is BreakerState.CLOSED else "degraded"

    def detail(self) -> str:
        """For /ready: what the circuit says, in words."""
        state = self.breaker.state
        if state is BreakerState.CLOSED:
            return "redis in use"
        if state is BreakerState.OPEN:
            return f"redis failing: circuit open, next probe in {self.breaker.retry_after():.1f}s"
        return "redis recovering: circuit half-open, probing"

    async def call(
        self,
        operation: str,
        fn: Callable[[Redis], Awaitable[T]],
        *,
        bypass_breaker: bool = False,
    ) -> T:
        """`fn(client)` under the policy above. `bypass_breaker` runs it even while the
        circuit is open (a lock that must not outlive its owner), still bounded and reported,
        but never counted. Cancellation gives the permit back and propagates."""
        if bypass_breaker:
            try:
                async with asyncio.timeout(self.timeout):
                    return await fn(self.client)
            except FAILURES as exc:
                self._failed(operation, exc)
                raise RedisUnavailableError(operation, attempted=True) from exc
        try:
            self.breaker.try_acquire()
        except BreakerOpenError:
            raise RedisUnavailableError(operation, attempted=False) from None
        finally:
            self._sync_state()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn(self.client)
        except UNREACHABLE as exc:
            self.breaker.record_failure(time.monotonic() - started)
            self._sync_state()
            self._failed(operation, exc)
            raise RedisUnavailableError(operation, attempted=True) from exc
        except RedisError as exc:
            self.breaker.release()
            self._failed(operation, exc)
            raise RedisUnavailableError(operation, attempted=True) from exc
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success(time.monotonic() - started)
        self._sync_state()
        return result

    def _sync_state(self) -> None:
        state = self.state
        if state == self._state:
            return
        self._state = state
        if state == "degraded":
            logger.warning("redis degraded: skipped until it answers again")
        else:
            logger.info("redis ok again")
        if self._observer is not None:
            self._observer.on_redis_state(state)

    def _failed(self, operation: str, exc: BaseException) -> None:
        if self._observer is not None:
            self._observer.on_redis_error(operation)
        now = time.monotonic()
        if now - self._last_warning < WARN_INTERVAL:
            self._suppressed += 1
            return
        logger.warning(
            "redis %s failed (%r); %d similar errors not logged", operation, exc, self._suppressed
        )
        self._last_warning = now
        self._suppressed = 0
