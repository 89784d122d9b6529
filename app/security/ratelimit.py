"""Per-caller limits that hold across replicas (OWASP API4: unrestricted resource consumption).

Two limits guard each identity (a client IP on /query, a JWT subject on /secure-query), each
in its own `scope` so the endpoints never share buckets:

* **requests per window** - the `limits` library's sliding window counter, stored in Redis
  when one is configured (so every replica counts into the same bucket) and in process
  otherwise;
* **requests in flight** - a semaphore. `limits` has none, so in Redis it is a sorted set per
  identity driven by one Lua script: members are request tokens scored by the end of their
  lease, expired leases are dropped before counting, so a replica that dies holding slots
  gives them back after `lease_seconds`.

Failure policy: Redis is a shared optimisation, never a dependency of a request. Every Redis
call is bounded by the socket timeout (and `asyncio.timeout` as a safety net against retries
and pool waits); any Redis error is logged (at most one warning per interval), counted in
`RateLimiter.errors`, and the call falls back to the in-process limiter: per-replica limits
are better than none. After an error Redis is left alone for `fallback_seconds`, so an outage
does not add a timeout to every request.

Identities go into Redis keys only as SHA-256 hex digests, so nothing a caller sends (`:`,
`*`, `{`, megabytes of text) can reach into another key or make keys unbounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any, Literal

import limits
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

__all__ = ["RateLimitExceeded", "RateLimitState", "RateLimiter", "rate_limit_headers"]

_BACKEND_ERRORS: tuple[type[Exception], ...] = (RedisError, StorageError, OSError)
"""What a Redis call may raise: redis-py errors (connection, timeout, READONLY, OOM...),
`limits`' wrapped storage errors, and socket/SSL/`asyncio.timeout` errors (TimeoutError is an
OSError). Never RateLimitExceeded, never programming errors."""

_SCOPE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_WARN_INTERVAL = 10.0
"""At most one warning per this many seconds while Redis keeps failing."""
_CONCURRENCY_RETRY_AFTER = 1.0

# KEYS[1] the identity's set; ARGV: max in flight, lease (ms), token. Redis' own clock scores
# the leases, so replicas with skewed clocks agree on when one has expired.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
if redis.call('ZCARD', KEYS[1]) < max then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], lease)
    return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """Where a caller stands after a hit (what the RateLimit-* headers report)."""

    limit: int
    remaining: int
    reset_after: float
    """Seconds until the window frees capacity (>= 0)."""


class RateLimitExceeded(Exception):  # noqa: N818 - the API's name, like limits' own
    """Refused: too many requests in the window (`rate`) or too many in flight."""

    def __init__(
        self,
        kind: Literal["rate", "concurrency"],
        state: RateLimitState,
        retry_after: float,
    ) -> None:
        super().__init__(f"{kind} limit of {state.limit} exceeded; retry after {retry_after:g}s")
        self.kind: Literal["rate", "concurrency"] = kind
        self.state = state
        self.retry_after = retry_after


def rate_limit_headers(state: RateLimitState) -> dict[str, str]:
    """RateLimit-Limit/-Remaining/-Reset (draft-ietf-httpapi-ratelimit-headers).

    Reset is delta-seconds, rounded up. On 429 the caller adds `Retry-After` from
    `RateLimitExceeded.retry_after`.
    """
    return {
        "RateLimit-Limit": str(state.limit),
        "RateLimit-Remaining": str(max(0, state.remaining)),
        "RateLimit-Reset": str(max(0, math.ceil(state.reset_after))),
    }


@lru_cache(maxsize=64)
def _parse_limit(limit: str) -> limits.RateLimitItem:
    """`limits.parse`, cached (settings hold a handful of strings); ValueError if malformed."""
    return limits.parse(limit)


def _check_scope(scope: str) -> str:
    if not _SCOPE.match(scope):
        raise ValueError(f"invalid rate limit scope {scope!r}")
    return scope


def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


def _limits_uri(url: str) -> str:
    """`limits` picks its client from the scheme; make `unix://` URLs mean Redis, not Valkey."""
    if url.startswith("unix://"):
        return "redis+unix://" + url.removeprefix("unix://")
    return url


class RateLimiter:
    """Rate and concurrency limits per (scope, identity), in Redis or in process.

    The window is `limits`' **sliding window counter** rather than the moving window: it keeps
    two counters per identity instead of one timestamp per request (O(1) memory however large
    the limit), and in Redis its window boundaries come from key TTLs measured by Redis itself,
    so replicas with skewed clocks still agree (the moving window stamps entries with each
    replica's `time.time()`). The price is an approximation - the previous window's count is
    weighted by how much of it still overlaps - which is the usual trade for abuse limits and
    never lets a burst of twice the limit through, unlike a fixed window.

    Backend: `redis_url` set -> "redis" (the `limits` storage opens its own pool from the URL;
    concurrency uses `redis`, the app's shared client, or a client of our own when `redis` is
    None); both None -> "memory".
    """

    backend: Literal["redis", "memory"]
    errors: int
    """Redis failures seen (each one fell back to the in-process limiter)."""

    def __init__(
        self,
        *,
        redis: Redis | None,
        redis_url: str | None,
        key_prefix: str,
        socket_timeout: float,
        lease_seconds: float = 240.0,
        fallback_seconds: float = 1.0,
    ) -> None:
        """
        :param redis: shared asyncio client for the concurrency semaphore (not closed here).
        :param redis_url: the Redis URL for the `limits` storage; None means in process.
        :param key_prefix: the app's Redis key prefix (`REDIS_KEY_PREFIX`).
        :param socket_timeout: seconds per Redis operation (`REDIS_SOCKET_TIMEOUT`).
        :param lease_seconds: how long a concurrency slot survives without being released
            (a crashed replica's slots come back after this); about 2x the request timeout.
        :param fallback_seconds: after a Redis error, use the in-process limiter this long
            before trying Redis again (0: try Redis on every call).
        """
        if socket_timeout <= 0:
            raise ValueError("socket_timeout must be > 0")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        if fallback_seconds < 0:
            raise ValueError("fallback_seconds must be >= 0")
        if redis is not None and redis_url is None:
            raise ValueError("a Redis client needs redis_url too (the rate limit storage)")
        self.errors = 0
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._fallback_seconds = fallback_seconds
        # Safety net over the socket timeouts: connect + two commands, plus a little slack.
        self._deadline = 3 * socket_timeout + 0.05
        self._skip_redis_until = 0.0
        self._last_warning = -math.inf
        self._suppressed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

        self._local_storage = MemoryStorage()
        self._local = SlidingWindowCounterRateLimiter(self._local_storage)
        self._in_flight: dict[str, int] = {}

        self._redis: Redis | None = None
        self._owns_redis = False
        self._remote_storage: RedisStorage | None = None
        self._remote: SlidingWindowCounterRateLimiter | None = None
        self._concurrency_prefix = f"{key_prefix}cc:"
        if redis_url is None:
            self.backend = "memory"
            return

        self.backend = "redis"
        no_retry: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
        self._remote_storage = RedisStorage(
            _limits_uri(redis_url),
            implementation="redispy",
            key_prefix=f"{key_prefix}rl",
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            **no_retry,
        )
        self._remote = SlidingWindowCounterRateLimiter(self._remote_storage)
        if redis is None:
            redis = Redis.from_url(
                redis_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                **no_retry,
            )
            self._owns_redis = True
        self._redis = redis
        self._acquire_script = redis.register_script(_ACQUIRE_LUA)

    # --- requests per window -------------------------------------------------------------

    async def hit(self, scope: str, identity: str, limit: str) -> RateLimitState:
        """Count one request; raise RateLimitExceeded(kind="rate") when over `limit`."""
        item = _parse_limit(limit)
        keys = (_check_scope(scope), _digest(identity))
        outcome: tuple[bool, limits.WindowStats] | None = None
        if self._remote is not None and self._redis_usable():
            try:
                async with asyncio.timeout(self._deadline):
                    outcome = await self._consume(self._remote, item, keys)
            except _BACKEND_ERRORS as exc:
                self._redis_failed("rate limit", exc)
        if outcome is None:
            outcome = await self._consume(self._local, item, keys)
        allowed, stats = outcome
        reset_after = max(0.0, stats.reset_time - time.time())
        if reset_after == 0.0 and stats.remaining < item.amount:
            # `limits` reports a window that was just opened (TTL exactly 2 windows) as
            # resetting now; it has a whole window to run.
            reset_after = float(item.get_expiry())
        if not allowed:
            state = RateLimitState(limit=item.amount, remaining=0, reset_after=reset_after)
            raise RateLimitExceeded("rate", state, float(max(1, math.ceil(reset_after))))
        return RateLimitState(
            limit=item.amount, remaining=max(0, stats.remaining), reset_after=reset_after
        )

    @staticmethod
    async def _consume(
        limiter: SlidingWindowCounterRateLimiter,
        item: limits.RateLimitItem,
        keys: tuple[str, str],
    ) -> tuple[bool, limits.WindowStats]:
        allowed = await limiter.hit(item, *keys)
        return allowed, await limiter.get_window_stats(item, *keys)

    # --- requests in flight --------------------------------------------------------------

    def concurrency(
        self, scope: str, identity: str, max_in_flight: int
    ) -> AbstractAsyncContextManager[None]:
        """Hold one of `max_in_flight` slots for the body of `async with`.

        Entering raises RateLimitExceeded(kind="concurrency") when all slots are taken;
        leaving always gives the slot back (even when cancelled).
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        return _Slot(self, f"{_check_scope(scope)}:{_digest(identity)}", max_in_flight)

    async def _acquire(self, key: str, max_in_flight: int) -> str | None:
        """Take a slot: return its Redis token, or None when it was taken in process."""
        if self._redis is not None and self._redis_usable():
            redis_key = self._concurrency_prefix + key
            token = secrets.token_hex(16)
            try:
                async with asyncio.timeout(self._deadline):
                    granted = await self._acquire_script(
                        keys=[redis_key], args=[max_in_flight, self._lease_ms, token]
                    )
            except _BACKEND_ERRORS as exc:
                self._redis_failed("concurrency acquire", exc)
                # The script may have run before the timeout: drop the token in case it did.
                self._spawn(self._remove_token(redis_key, token, quiet=True))
            except asyncio.CancelledError:
                self._spawn(self._remove_token(redis_key, token, quiet=True))
                raise
            else:
                if not granted:
                    raise self._concurrency_exceeded(max_in_flight)
                return token

        held = self._in_flight.get(key, 0)
        if held >= max_in_flight:
            raise self._concurrency_exceeded(max_in_flight)
        self._in_flight[key] = held + 1
        return None

    async def _release(self, key: str, token: str | None) -> None:
        if token is None:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            return
        # Shielded in a task of its own: a request cancelled on its way out (client gone,
        # anyio cancel scopes that cancel every await) must still give its slot back rather
        # than hold it for a whole lease.
        task = self._spawn(self._remove_token(self._concurrency_prefix + key, token, quiet=False))
        await asyncio.shield(task)

    async def _remove_token(self, redis_key: str, token: str, *, quiet: bool) -> None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self._deadline):
                await self._redis.zrem(redis_key, token)
        except _BACKEND_ERRORS as exc:
            if quiet:
                logger.debug("dropping a concurrency token failed: %r", exc)
            else:
                # The lease frees the slot later; no need to fall back for this.
                self._redis_failed("concurrency release", exc)

    @staticmethod
    def _concurrency_exceeded(max_in_flight: int) -> RateLimitExceeded:
        state = RateLimitState(
            limit=max_in_flight, remaining=0, reset_after=_CONCURRENCY_RETRY_AFTER
        )
        return RateLimitExceeded("concurrency", state, _CONCURRENCY_RETRY_AFTER)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` to completion even if the caller is cancelled; aclose() awaits it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- failures and shutdown -----------------------------------------------------------

    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._skip_redis_until

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self._skip_redis_until = now + self._fallback_seconds
        if now - self._last_warning >= _WARN_INTERVAL:
            logger.warning(
                "Redis %s failed (%r); using in-process limits (%d similar errors not logged)",
                what,
                exc,
                self._suppressed,
            )
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    async def aclose(self) -> None:
        """Finish pending slot releases, close what this limiter opened (not the shared client)."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._deadline * 2)
        timer = self._local_storage.timer
        if timer is not None and not timer.done():
            timer.cancel()
        if self._remote_storage is not None:
            bridge = self._remote_storage.bridge
            if isinstance(bridge, RedispyBridge):
                client: object = bridge.get_connection()  # a redis.asyncio.Redis
                if isinstance(client, Redis):
                    await client.aclose()
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()


class _Slot(AbstractAsyncContextManager[None]):
    """One concurrency slot. A class rather than an async generator, so a slot that is entered
    and never exited (a simulated crash) is not released behind the caller's back."""

    __slots__ = ("_held", "_key", "_limiter", "_max", "_token")

    def __init__(self, limiter: RateLimiter, key: str, max_in_flight: int) -> None:
        self._limiter = limiter
        self._key = key
        self._max = max_in_flight
        self._held = False
        self._token: str | None = None

    async def __aenter__(self) -> None:
        if self._held:
            raise RuntimeError("this concurrency slot is already held")
        self._token = await self._limiter._acquire(self._key, self._max)
        self._held = True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._held:
            return
        self._held = False
        await self._limiter._release(self._key, self._token)
