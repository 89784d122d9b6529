"""Per-caller limits that hold across replicas (OWASP API4: unrestricted resource consumption).

Each identity (a client IP on /query, a JWT subject on /secure-query) has two limits, in a
`scope` per endpoint so endpoints never share buckets: requests per window (a sliding window
counter, see `RateLimiter`) and requests in flight (in Redis, a sorted set of request tokens
scored by the end of their lease, so a dead replica's slots come back after `lease_seconds`).

With Redis, admission is one round trip: one Lua script (`_ADMIT_LUA`) checks the window,
takes a slot, counts the request and returns what the RateLimit-* headers need (`limits`'
Redis storage has no concurrency limit and takes two scripts per request). Without Redis, or
when a Redis call fails (`RedisGuard`: bounded, skipped while the circuit is open), `limits`
counts in process beside an in-process count of requests in flight: per-replica limits beat
none.

Leaving never waits for Redis: the release rides on the identity's next admission on this
replica, or goes out after `_RELEASE_DELAY` in one pipeline with the other waiting releases.
Until then other replicas see the slot held, so a client at its limit that switches replica
may get a 429 (Retry-After: 1) for a slot that is free.

Only admitted requests count, so a client retrying after a refusal does not spend its budget
on answers it never got; a request over both limits is refused as `rate` (the longer wait).
Identities enter Redis keys only as SHA-256 digests, so caller input cannot reach into
another key or make keys unbounded. The script's keys hash to different slots: fine on one
Redis, not on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from app.errors import RateLimitedError
from app.resilience.redis_guard import RedisGuard, RedisUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["RateLimitExceeded", "RateLimitState", "RateLimiter", "rate_limit_headers"]

_SCOPE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_CONCURRENCY_RETRY_AFTER = 1.0
_RELEASE_DELAY = 0.05
"""Seconds a slot release waits for an admission to carry it before it is sent on its own."""
_MAX_CARRIED = 256
"""Released tokens one admission carries at most (the rest wait for the next one, or the
timer); an identity has at most as many as its slots, unless those are set very high."""

_RATE_REFUSED, _CONCURRENCY_REFUSED = 1, 2  # the script's status; 0: admitted

# KEYS[1], KEYS[2]: the previous and the current window's counters; KEYS[3] (absent: no
# concurrency limit): the identity's slot set.
# ARGV: limit, window (ms), max in flight, lease (ms), token, then released tokens to remove
# from KEYS[3] before the slots are counted.
# Returns {status, remaining, ms until the window frees capacity}; status 0: admitted,
# 1: refused by the window, 2: refused by the slots. A refusal writes only the carried
# releases, the window shift and the dropped leases.
#
# The current counter lives two windows (PX): once its TTL is under one window it holds the
# previous window, so it is renamed to KEYS[1] and a fresh current one starts. The previous
# count is weighted by its remaining TTL. TTLs and lease scores come from Redis (PTTL, TIME),
# so replicas with skewed clocks agree. Reset is the time until the weighted count drops by
# one (or the window shifts); a window opened by this request reports a whole window to go.
_ADMIT_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])

if KEYS[3] and #ARGV > 5 then
    redis.call('ZREM', KEYS[3], unpack(ARGV, 6))
end

local current_ttl = redis.call('PTTL', KEYS[2])
if current_ttl > 0 and current_ttl < window then
    redis.call('RENAME', KEYS[2], KEYS[1])
    current_ttl = current_ttl + window
    redis.call('SET', KEYS[2], 0, 'PX', current_ttl)
end
local previous_count = tonumber(redis.call('GET', KEYS[1])) or 0
local previous_ttl = 0
if previous_count > 0 then
    previous_ttl = math.max(0, redis.call('PTTL', KEYS[1]))
end
local current = redis.call('GET', KEYS[2])
local current_count = tonumber(current) or 0
local previous_weight = previous_count * previous_ttl / window

local function reply(status, count)
    local reset = nil
    if previous_count > 0 then
        reset = previous_ttl % (window / previous_count)
    end
    if count > 0 then
        local shift = math.max(0, current_ttl - window)
        if reset == nil or shift < reset then
            reset = shift
        end
    end
    local remaining = math.max(0, limit - math.floor(previous_weight + count))
    return {status, remaining, math.ceil(reset or 0)}
end

if math.floor(previous_weight) + current_count + 1 > limit then
    return reply(1, current_count)
end
if KEYS[3] then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local lease = tonumber(ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. now)
    if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then
        return reply(2, current_count)
    end
    redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], lease)
end
if current then
    redis.call('INCR', KEYS[2])
else
    current_ttl = 2 * window
    redis.call('SET', KEYS[2], 1, 'PX', current_ttl)
end
return reply(0, current_count + 1)
"""


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """Where a caller stands after a hit (what the RateLimit-* headers report)."""

    limit: int
    remaining: int
    reset_after: float
    """Seconds until the window frees capacity (>= 0)."""


class RateLimitExceeded(RateLimitedError):  # noqa: N818 - the API's name, like limits' own
    """Refused: too many requests in the window (`rate`) or in flight (`concurrency`);
    carries the RateLimit-* headers beside Retry-After."""

    def __init__(
        self,
        kind: Literal["rate", "concurrency"],
        state: RateLimitState,
        retry_after: float,
    ) -> None:
        what = "requests" if kind == "rate" else "concurrent requests"
        super().__init__(
            f"too many {what}; retry after {max(1, math.ceil(retry_after))}s",
            retry_after=retry_after,
            headers=rate_limit_headers(state),
        )
        self.kind: Literal["rate", "concurrency"] = kind
        self.state = state
        self.retry_after: float = retry_after


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


def window_counter_key(prefix: str, item: limits.RateLimitItem, scope: str, digest: str) -> str:
    """The current window's counter key, `<prefix><scope>:<digest>:<amount>/<seconds>s`;
    the previous window's key appends `:previous`."""
    return f"{prefix}{scope}:{digest}:{item.amount}/{item.get_expiry()}s"


def _check_scope(scope: str) -> str:
    if not _SCOPE.match(scope):
        raise ValueError(f"invalid rate limit scope {scope!r}")
    return scope


def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


def _rate_exceeded(limit: int, reset_after: float) -> RateLimitExceeded:
    state = RateLimitState(limit=limit, remaining=0, reset_after=reset_after)
    return RateLimitExceeded("rate", state, float(max(1, math.ceil(reset_after))))


def _concurrency_exceeded(max_in_flight: int) -> RateLimitExceeded:
    state = RateLimitState(limit=max_in_flight, remaining=0, reset_after=_CONCURRENCY_RETRY_AFTER)
    return RateLimitExceeded("concurrency", state, _CONCURRENCY_RETRY_AFTER)


class RateLimiter:
    """Rate and concurrency limits per (scope, identity); `backend` is "redis" when given
    the app's guarded client, else "memory".

    A sliding window counter rather than a moving window: two counters per identity instead
    of a timestamp per request (O(1) memory whatever the limit), and window boundaries from
    TTLs that Redis measures, so replicas' clocks need not agree. The price is an
    approximation (the previous window weighted by its overlap), which never lets a burst of
    twice the limit through as a fixed window does.
    """

    backend: Literal["redis", "memory"]

    def __init__(
        self,
        *,
        redis: RedisGuard | None,
        key_prefix: str,
        lease_seconds: float = 240.0,
    ) -> None:
        """
        :param redis: the app's guarded Redis client (not closed here); None: in process.
        :param key_prefix: the app's Redis key prefix (`REDIS_KEY_PREFIX`).
        :param lease_seconds: how long a concurrency slot survives without being released
            (a crashed replica's slots come back after this); about 2x the request timeout.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._tasks: set[asyncio.Task[None]] = set()
        self._releases: dict[str, list[str]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closed = False

        self._local_storage = MemoryStorage()
        self._local = SlidingWindowCounterRateLimiter(self._local_storage)
        self._in_flight: dict[str, int] = {}

        self._guard = redis
        self._window_prefix = f"{key_prefix}rl:"
        self._concurrency_prefix = f"{key_prefix}cc:"
        self.backend = "memory" if redis is None else "redis"
        if redis is not None:
            self._admit_script = redis.client.register_script(_ADMIT_LUA)

    # --- the API -------------------------------------------------------------------------

    def admit(
        self, scope: str, identity: str, rate: str, max_in_flight: int
    ) -> AbstractAsyncContextManager[RateLimitState]:
        """Count one request against `rate` and hold one of `max_in_flight` slots for the body
        of `async with ... as state` (`state`: for the RateLimit-* headers).

        Entering raises RateLimitExceeded(kind="rate" or "concurrency"); a refused request is
        not counted. Leaving gives the slot back without waiting for Redis, also when the
        caller is cancelled (`_release`). Bad arguments raise ValueError here.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        item = _parse_limit(rate)
        return _Admission(self, item, _check_scope(scope), _digest(identity), max_in_flight)

    async def hit(self, scope: str, identity: str, limit: str) -> RateLimitState:
        """Count one request against `limit`, with no concurrency limit (one round trip);
        raise RateLimitExceeded(kind="rate") when over it."""
        item = _parse_limit(limit)
        state, _ = await self._enter(item, _check_scope(scope), _digest(identity), 0)
        return state

    # --- admission -----------------------------------------------------------------------

    async def _enter(
        self, item: limits.RateLimitItem, scope: str, digest: str, max_in_flight: int
    ) -> tuple[RateLimitState, str | None]:
        """Count the request and (max_in_flight > 0) take a slot; return the state and the
        slot's Redis token (None: no slot, or one taken in process)."""
        if self._guard is not None:
            window_key = window_counter_key(self._window_prefix, item, scope, digest)
            keys = [f"{window_key}:previous", window_key]
            token = slots = ""
            carried: list[str] = []
            if max_in_flight:
                token = secrets.token_hex(16)
                slots = f"{self._concurrency_prefix}{scope}:{digest}"
                keys.append(slots)
                carried = self._carry_releases(slots)
            args = (item.amount, item.get_expiry() * 1000, max_in_flight, self._lease_ms, token)
            script = self._admit_script

            async def admission(client: Redis) -> Any:
                return await script(keys=keys, args=(*args, *carried), client=client)

            try:
                reply = await self._guard.call("rate limit", admission)
            except BaseException as exc:
                skipped = isinstance(exc, RedisUnavailableError) and not exc.attempted
                if token:
                    # The script may have run before the failure or the cancellation: drop
                    # the token in case it did (the count, if any, stays: one request too
                    # many at worst), and let the releases it carried wait again.
                    self._put_back(slots, carried)
                    if not skipped:
                        self._spawn(self._remove_token(slots, token))
                if not isinstance(exc, RedisUnavailableError):
                    raise  # cancelled, or a bug
            else:
                status, remaining, reset_ms = (int(value) for value in reply)
                reset_after = reset_ms / 1000
                if status == _RATE_REFUSED:
                    raise _rate_exceeded(item.amount, reset_after)
                if status == _CONCURRENCY_REFUSED:
                    raise _concurrency_exceeded(max_in_flight)
                state = RateLimitState(item.amount, remaining, reset_after)
                return state, token or None
        return await self._enter_locally(item, scope, digest, max_in_flight), None

    async def _enter_locally(
        self, item: limits.RateLimitItem, scope: str, digest: str, max_in_flight: int
    ) -> RateLimitState:
        """The in-process twin of the script: same order, same refusals, nothing counted."""
        slot = f"{scope}:{digest}"
        if max_in_flight:
            held = self._in_flight.get(slot, 0)
            if held >= max_in_flight:
                if await self._local.test(item, scope, digest):
                    raise _concurrency_exceeded(max_in_flight)
                stats = await self._local.get_window_stats(item, scope, digest)
                raise _rate_exceeded(item.amount, self._local_reset_after(item, stats))
            # Taken before the awaits below (the memory storage may yield), given back if the
            # window refuses.
            self._in_flight[slot] = held + 1
        try:
            allowed = await self._local.hit(item, scope, digest)
            stats = await self._local.get_window_stats(item, scope, digest)
        except BaseException:
            if max_in_flight:
                self._release_locally(slot)
            raise
        reset_after = self._local_reset_after(item, stats)
        if not allowed:
            if max_in_flight:
                self._release_locally(slot)
            raise _rate_exceeded(item.amount, reset_after)
        return RateLimitState(item.amount, max(0, stats.remaining), reset_after)

    @staticmethod
    def _local_reset_after(item: limits.RateLimitItem, stats: limits.WindowStats) -> float:
        reset_after = max(0.0, stats.reset_time - time.time())
        if reset_after == 0.0 and stats.remaining < item.amount:
            # `limits` reports a window that was just opened (TTL exactly 2 windows) as
            # resetting now; it has a whole window to run.
            reset_after = float(item.get_expiry())
        return reset_after

    # --- release -------------------------------------------------------------------------

    def _release(self, scope: str, digest: str, token: str | None) -> None:
        """Give a slot back without awaiting. In Redis the token waits for the identity's
        next admission, whose script removes it, or for `_RELEASE_DELAY`, whichever comes
        first (after `aclose`, at once). A client that keeps sending comes back within the
        delay, so carrying its release saves a round trip per request; the other releases
        go out together, one pipeline per delay."""
        if token is None:
            self._release_locally(f"{scope}:{digest}")
            return
        redis_key = f"{self._concurrency_prefix}{scope}:{digest}"
        self._releases.setdefault(redis_key, []).append(token)
        self._schedule_flush()

    def _carry_releases(self, redis_key: str) -> list[str]:
        """Take up to `_MAX_CARRIED` of an identity's waiting release tokens, for its
        admission's script to remove (put back if the call fails)."""
        tokens = self._releases.pop(redis_key, None)
        if not tokens:
            return []
        if len(tokens) > _MAX_CARRIED:
            self._releases[redis_key] = tokens[_MAX_CARRIED:]
            tokens = tokens[:_MAX_CARRIED]
        elif not self._releases and self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        return tokens

    def _put_back(self, redis_key: str, carried: list[str]) -> None:
        """Release tokens a failed or cancelled script call may not have removed: they wait
        again (removing a token twice is harmless)."""
        if carried:
            self._releases.setdefault(redis_key, []).extend(carried)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._closed:
            self._spawn(self._flush_releases())
        elif self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(_RELEASE_DELAY, self._flush_due)

    def _flush_due(self) -> None:
        """No admission came within `_RELEASE_DELAY`: send the waiting releases on their own."""
        self._flush_timer = None
        if self._releases:
            self._spawn(self._flush_releases())

    async def _flush_releases(self) -> None:
        """Send the waiting releases, one ZREM per identity in one pipeline, even while the
        circuit is open (a slot left behind locks its client out until its lease ends). A
        failure is not retried: the leases free the slots."""
        batch, self._releases = self._releases, {}
        if not batch or self._guard is None:
            return

        async def release(client: Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for redis_key, tokens in batch.items():
                    pipe.zrem(redis_key, *tokens)
                await pipe.execute()

        with contextlib.suppress(RedisUnavailableError):
            await self._guard.call("concurrency release", release, bypass_breaker=True)

    def _release_locally(self, slot: str) -> None:
        left = self._in_flight.get(slot, 0) - 1
        if left > 0:
            self._in_flight[slot] = left
        else:
            self._in_flight.pop(slot, None)

    async def _remove_token(self, redis_key: str, token: str) -> None:
        """Drop a token the script may or may not have added (its call failed or was
        cancelled)."""
        if self._guard is None:
            return

        async def remove(client: Redis) -> None:
            await client.zrem(redis_key, token)

        with contextlib.suppress(RedisUnavailableError):
            await self._guard.call("concurrency release", remove, bypass_breaker=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` to completion even if the caller is cancelled; aclose() awaits it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- failures and shutdown -----------------------------------------------------------

    async def aclose(self) -> None:
        """Finish pending slot releases (the shared client is the app's to close)."""
        if self._closed:
            return
        self._closed = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._releases:
            self._spawn(self._flush_releases())
        if self._tasks:
            timeout = 2 * self._guard.timeout if self._guard is not None else 1.0
            await asyncio.wait(set(self._tasks), timeout=timeout)
        timer = self._local_storage.timer
        if timer is not None and not timer.done():
            timer.cancel()


class _Admission(AbstractAsyncContextManager[RateLimitState]):
    """One admitted request. A class rather than an async generator, so an admission entered
    and never exited (a simulated crash) is not released behind the caller's back."""

    __slots__ = ("_digest", "_held", "_item", "_limiter", "_max", "_scope", "_token")

    def __init__(
        self,
        limiter: RateLimiter,
        item: limits.RateLimitItem,
        scope: str,
        digest: str,
        max_in_flight: int,
    ) -> None:
        self._limiter = limiter
        self._item = item
        self._scope = scope
        self._digest = digest
        self._max = max_in_flight
        self._held = False
        self._token: str | None = None

    async def __aenter__(self) -> RateLimitState:
        if self._held:
            raise RuntimeError("this admission is already held")
        state, self._token = await self._limiter._enter(
            self._item, self._scope, self._digest, self._max
        )
        self._held = True
        return state

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._held:
            return
        self._held = False
        self._limiter._release(self._scope, self._digest, self._token)
