"""Response cache: Redis when configured, else a bounded in-process LRU with per-entry TTLs.

Values are opaque bytes. The cache is an optimisation, never a dependency: public methods
swallow Redis errors (`RedisGuard` logs, counts and feeds them to its breaker), so a slow or
dead Redis costs a request only bounded waits, and nothing once the circuit is open.

Redis keys (``P`` is ``key_prefix``)::

    P cache:<key>            the value, SET ... PX <ttl>
    P cache-session:<sid>    a SET of the <key>s written for a session (erasure index); its
                             expiry is raised to the longest TTL written into it
    P lock:<key>             cross-replica single-flight lock, SET NX PX, deleted by
                             compare-and-delete

The session index uses ``PEXPIRE ... NX`` / ``PEXPIRE ... GT``, which need Redis >= 7.0.

Single flight: ``get_or_compute`` runs one ``compute()`` per key at a time in this process.
The first caller to miss starts a *flight* (a task that computes and stores the value);
later callers await the same task and report ``hit=True``. The task outlives the caller
that started it while anyone still waits, and is cancelled when the last waiter leaves.
With Redis, the flight also takes a lock so replicas do not compute the same answer at
once; a replica that finds the lock taken polls for the value.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import secrets
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple, Protocol, TypeVar, cast

import orjson
from cachetools import TLRUCache
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.config import Settings
from app.domain import Message
from app.resilience.redis_guard import RedisGuard, RedisUnavailableError

__all__ = [
    "KEY_VERSION",
    "CacheObserver",
    "ResponseCache",
    "cache_key",
    "history_digest",
    "normalize_message",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_VERSION = "agentserve-cache-v1"
"""Part of every key: bump it when the key derivation or the value encoding changes."""

POLL_INTERVAL = (0.025, 0.05)
"""Seconds between polls (uniformly random in this range) while another replica computes."""

_HISTORY_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")

_UNLOCK_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

_PEEK_OR_LOCK_SCRIPT = """
local value = redis.call('get', KEYS[1])
if value then
    return {value, 0}
end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {false, 1}
end
return {false, 0}
"""
"""The value if there is one, else the lock if it is free: one round trip for a hit or a
miss, and the GET closes the race with a replica that has just stored the value."""

_STORE_SCRIPT = """
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' then
    redis.call('sadd', KEYS[2], ARGV[3])
    redis.call('pexpire', KEYS[2], ARGV[2], 'NX')
    redis.call('pexpire', KEYS[2], ARGV[2], 'GT')
end
if ARGV[4] ~= '' and redis.call('get', KEYS[3]) == ARGV[4] then
    redis.call('del', KEYS[3])
end
return 1
"""
"""Store a value in one call: SET ... PX; with a member (ARGV[3]) index it under the
session (a new index gets the expiry, NX; an old one only lengthens, GT); with a token
(ARGV[4]) release our lock after the value is written, so waiting replicas find it."""

_FORGET_BATCH = 512


# ---------------------------------------------------------------------------------------
# Keys


def normalize_message(text: str) -> str:
    """NFC, strip, and collapse every run of whitespace to one space; case is kept."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def history_digest(history: Sequence[Message]) -> str:
    """sha256 hex of the canonical JSON of the answer-shaping fields of each message, in order.

    Only role, content, tool_calls, tool_call_id and name count; a missing field and an
    explicit ``None`` are the same. Content is hashed exactly as stored (not normalized).
    """
    canonical = [{field: message.get(field) for field in _HISTORY_FIELDS} for message in history]
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _check_scope(scope: str) -> None:
    if scope in ("anon", "shared") or (scope.startswith("sub:") and len(scope) > len("sub:")):
        return
    raise ValueError(f"cache scope must be 'anon', 'shared' or 'sub:<subject>', got {scope!r}")


def cache_key(
    *,
    fingerprint: str,
    message: str,
    scope: str,
    history: Sequence[Message] | None = None,
    history_digest: str | None = None,
) -> str:
    """sha256 hex naming one cacheable answer.

    The conversation so far is given either as `history` (digested with `history_digest()`)
    or as a precomputed `history_digest` (e.g. the chained digest the session store keeps);
    exactly one of the two, and always the same form: the two never produce the same key.
    The fields are framed as a JSON array with a version tag, so no two different field
    tuples serialize to the same bytes.
    """
    _check_scope(scope)
    if (history is None) == (history_digest is None):
        raise TypeError("cache_key() needs exactly one of `history` and `history_digest`")
    digest = _history_digest(history) if history is not None else history_digest
    framed = orjson.dumps([KEY_VERSION, fingerprint, digest, normalize_message(message), scope])
    return hashlib.sha256(framed).hexdigest()


_history_digest = history_digest  # `cache_key` has a parameter of that name


# ---------------------------------------------------------------------------------------
# Wiring helpers


class CacheObserver(Protocol):
    """Metrics hook (the app implements it with Prometheus); Redis' own failures and state
    are reported by its guard."""

    def on_lookup(self, hit: bool) -> None: ...


# ---------------------------------------------------------------------------------------
# The cache


class _Entry(NamedTuple):
    value: bytes
    ttl: float


@dataclass(slots=True)
class _SessionIndex:
    keys: set[str]
    expires_at: float


@dataclass(eq=False, slots=True)
class _Flight:
    key: str
    task: asyncio.Task[tuple[bytes, bool]]
    waiters: int = 0


def _entry_expiry(_key: str, entry: _Entry, now: float) -> float:
    return now + entry.ttl


def _index_expiry(_key: str, index: _SessionIndex, _now: float) -> float:
    return index.expires_at


class ResponseCache:
    """See the module docstring. Use from one event loop only."""

    backend: Literal["redis", "memory"]

    def __init__(
        self,
        *,
        redis: RedisGuard | None,
        key_prefix: str,
        max_entries: int,
        lock_seconds: float,
        observer: CacheObserver | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        if not lock_seconds > 0:
            raise ValueError("lock_seconds must be > 0")
        self.redis = redis
        """The guarded Redis client (None: in process only)."""
        self._redis = redis.client if redis is not None else None
        self._prefix = key_prefix
        self._max_entries = max_entries
        self._lock_seconds = lock_seconds
        self._observer = observer
        self._flights: dict[str, _Flight] = {}
        self._scripts: dict[str, AsyncScript] = {}
        self._timer = time.monotonic
        self._memory: TLRUCache[str, _Entry] = TLRUCache(
            maxsize=max_entries, ttu=_entry_expiry, timer=self._timer
        )
        self._memory_sessions: TLRUCache[str, _SessionIndex] = TLRUCache(
            maxsize=max_entries, ttu=_index_expiry, timer=self._timer
        )
        if redis is None:
            self.backend = "memory"
        else:
            if redis.client.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("the cache needs a Redis client with decode_responses=False")
            self.backend = "redis"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        redis: RedisGuard | None,
        observer: CacheObserver | None = None,
    ) -> ResponseCache:
        """Wire a cache from Settings, on the app's guarded Redis client (None: in process)."""
        return cls(
            redis=redis,
            key_prefix=settings.redis_key_prefix,
            max_entries=settings.cache_max_entries,
            lock_seconds=settings.cache_lock_seconds,
            observer=observer,
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Keys being computed by this process right now."""
        return len(self._flights)

    async def get(self, key: str) -> bytes | None:
        """The value, or None on a miss, an error, or while the breaker is open. Never raises."""
        value, _ = await self._lookup(key)
        self._observed(value is not None)
        return value

    async def set(
        self, key: str, value: bytes, ttl: float, *, session_id: str | None = None
    ) -> None:
        """Store `value` for `ttl` seconds (ignored unless > 0), and index it under the
        session so `forget_session` can erase it. Never raises."""
        await self._store(key, value, ttl, session_id, unlock_token=None)

    async def _store(
        self,
        key: str,
        value: bytes,
        ttl: float,
        session_id: str | None,
        *,
        unlock_token: str | None,
    ) -> bool:
        """`set`, and with `unlock_token` also release our lock in the same round trip (the
        value is written first, so waiting replicas find it). True when the lock went."""
        if not ttl > 0:
            return False
        redis = self._redis
        if redis is None:
            self._memory_set(key, value, ttl, session_id)
            return False
        ttl_ms = max(1, math.ceil(ttl * 1000))
        value_key = self._value_key(key)

        async def store(client: Redis) -> None:
            if session_id is None and unlock_token is None:
                await client.set(value_key, value, px=ttl_ms)
                return
            # Without a session the index key is a placeholder the script does not touch.
            index_key = value_key if session_id is None else self._session_key(session_id)
            store_script = self._script("store", _STORE_SCRIPT)
            await store_script(
                keys=[value_key, index_key, self._lock_key(key)],
                args=[
                    value,
                    ttl_ms,
                    "" if session_id is None else key,
                    "" if unlock_token is None else unlock_token,
                ],
            )

        try:
            await self._call("set", store)
        except RedisUnavailableError:
            return False
        return unlock_token is not None

    async def forget_session(self, session_id: str) -> int:
        """Delete every entry indexed under the session, and the index; return how many
        entries were deleted. Best effort: on error (or with the breaker open) 0, counted.

        With the memory backend only this process's entries exist, so only they go.
        """
        if self._redis is None:
            index = self._memory_sessions.pop(session_id, None)
            if index is None:
                return 0
            return sum(self._memory.pop(key, None) is not None for key in index.keys)
        index_key = self._session_key(session_id)

        async def members(client: Redis) -> list[bytes]:
            found = cast("set[bytes]", await client.smembers(index_key))
            return sorted(found)

        async def erase(client: Redis, batch: list[bytes]) -> int:
            async with client.pipeline(transaction=False) as pipe:
                pipe.unlink(*(self._value_key(member.decode()) for member in batch))
                pipe.srem(index_key, *batch)  # an emptied set disappears by itself
                deleted, _ = await pipe.execute()
            return int(deleted)

        # SREM rather than DEL of the index: a key indexed concurrently stays indexed, and
        # after a failure half-way the rest is still there for the next attempt.
        deleted = 0
        try:
            found = await self._call("forget_session", members)
            for start in range(0, len(found), _FORGET_BATCH):
                batch = found[start : start + _FORGET_BATCH]
                deleted += await self._call("forget_session", partial(erase, batch=batch))
        except RedisUnavailableError:
            logger.warning("cache: could not erase the entries of a session (best effort)")
            return 0
        return deleted

    async def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        *,
        ttl: float,
        read: bool = True,
        write: bool = True,
        session_id: str | None = None,
    ) -> tuple[bytes, bool]:
        """Return ``(value, hit)``: the cached value, else the one `compute()` returns.

        * ``read=False`` (Cache-Control: no-cache): no lookup and no joining of a flight;
          computes privately and still stores the value when ``write``.
        * ``write=False`` (no-store): may use a cached value or join a flight, but its own
          result is computed privately (never shared with concurrent callers) and not stored.
        * Otherwise single flight (see the module docstring); followers get ``hit=True``.
          An exception from compute reaches every waiter and nothing is stored. With Redis,
          one script returns the value or takes the cross-replica lock; when it fails,
          compute runs unlocked rather than wait on a Redis that is likely down.

        The observer sees one lookup per call with ``read=True``, with the returned `hit`
        (a miss if compute raised).
        """
        hit = False
        redis_ok = True
        try:
            if read:
                flight = self._live_flight(key)
                if flight is None and write and self._redis is not None:
                    # Lead a flight at once: its first round trip looks up and locks together.
                    flight = self._start_flight(key, compute, ttl, session_id, lock=True)
                    value, hit = await self._follow(flight)
                    return value, hit
                if flight is None:
                    cached, redis_ok = await self._lookup(key)
                    if cached is not None:
                        hit = True
                        return cached, True
                    flight = self._live_flight(key)  # started while we were looking
                if flight is not None:
                    value, _ = await self._follow(flight)
                    hit = True
                    return value, True
            if not (read and write):
                value = await compute()
                if write:
                    await self.set(key, value, ttl, session_id=session_id)
                return value, False
            flight = self._start_flight(key, compute, ttl, session_id, lock=redis_ok)
            value, hit = await self._follow(flight)
            return value, hit
        finally:
            if read:
                self._observed(hit)

    def status(self) -> dict[str, object]:
        """For /ready: backend, "ok" or "degraded", and a human-readable detail."""
        if self.redis is None:
            detail = f"in-process LRU, {self._memory.currsize} of {self._max_entries} entries"
            return {"backend": self.backend, "state": "ok", "detail": detail}
        return {"backend": self.backend, "state": self.redis.state, "detail": self.redis.detail()}

    async def aclose(self) -> None:
        """Cancel flights still running and drop in-process entries. The Redis client is
        shared and owned by the app: it is not closed here."""
        tasks = [flight.task for flight in self._flights.values()]
        self._flights.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._memory.clear()
        self._memory_sessions.clear()

    # -- single flight ----------------------------------------------------------------------

    def _live_flight(self, key: str) -> _Flight | None:
        flight = self._flights.get(key)
        if flight is None or flight.task.done():
            return None
        return flight

    def _start_flight(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        ttl: float,
        session_id: str | None,
        *,
        lock: bool,
    ) -> _Flight:
        task = asyncio.create_task(
            self._lead(key, compute, ttl, session_id, lock=lock), name=f"cache-flight:{key[:16]}"
        )
        flight = _Flight(key, task)
        self._flights[key] = flight
        task.add_done_callback(lambda done: self._flight_done(flight, done))
        return flight

    def _flight_done(self, flight: _Flight, task: asyncio.Task[tuple[bytes, bool]]) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it, or nobody is left to care

    async def _follow(self, flight: _Flight) -> tuple[bytes, bool]:
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Nobody waits: stop the work, and let the next caller start afresh rather
                # than join a flight that is being cancelled.
                flight.task.cancel()
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]

    async def _lead(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        ttl: float,
        session_id: str | None,
        *,
        lock: bool,
    ) -> tuple[bytes, bool]:
        token: str | None = None
        if lock and self._redis is not None:
            found, token = await self._lock_or_wait(key)
            if found is not None:
                return found, True
        try:
            value = await compute()
        except BaseException:
            if token is not None:
                await self._unlock(key, token)
            raise
        try:
            released = await self._store(key, value, ttl, session_id, unlock_token=token)
        except BaseException:  # cancelled mid-write: the lock must not outlive us
            if token is not None:
                await asyncio.shield(self._unlock(key, token))
            raise
        if token is not None and not released:
            await self._unlock(key, token)
        return value, False

    async def _lock_or_wait(self, key: str) -> tuple[bytes | None, str | None]:
        """Cross-replica part of a flight: ``(value, None)`` when another replica supplied the
        value, ``(None, token)`` when we hold the lock, ``(None, None)`` to compute unlocked
        (wait timed out, or Redis failed)."""
        token = secrets.token_hex(16)
        lock_key = self._lock_key(key)
        value_key = self._value_key(key)
        lock_ms = max(1, math.ceil(self._lock_seconds * 1000))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_seconds

        peek_or_lock = self._script("peek_or_lock", _PEEK_OR_LOCK_SCRIPT)

        async def lock_and_peek(client: Redis) -> tuple[bool, bytes | None]:
            value, acquired = await peek_or_lock(keys=[value_key, lock_key], args=[token, lock_ms])
            return bool(acquired), value

        async def peek(client: Redis) -> tuple[bytes | None, bool]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.get(value_key)
                pipe.exists(lock_key)
                value, locked = await pipe.execute()
            return value, bool(locked)

        try:
            while True:
                acquired, value = await self._call("lock", lock_and_peek)
                if value is not None:
                    return value, None
                if acquired:
                    return None, token
                while True:  # another replica computes: wait for its value
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return None, None
                    await asyncio.sleep(min(remaining, random.uniform(*POLL_INTERVAL)))
                    value, locked = await self._call("poll", peek)
                    if value is not None:
                        return value, None
                    if not locked:
                        break  # it gave up without a value: try to take over
        except RedisUnavailableError:
            return None, None

    def _script(self, name: str, text: str) -> AsyncScript:
        """A Lua script, registered once (EVALSHA, not the text each time)."""
        script = self._scripts.get(name)
        if script is None:
            assert self._redis is not None
            script = self._scripts[name] = self._redis.register_script(text)
        return script

    async def _unlock(self, key: str, token: str) -> None:
        """Release our lock even while the circuit is open: a lock left behind would make
        every other request for this key wait for it to expire. Bounded, best effort."""
        unlock = self._script("unlock", _UNLOCK_SCRIPT)

        async def release(client: Redis) -> None:
            await unlock(keys=[self._lock_key(key)], args=[token], client=client)

        with contextlib.suppress(RedisUnavailableError):
            await self._call("unlock", release, bypass_breaker=True)

    # -- backends ---------------------------------------------------------------------------

    async def _lookup(self, key: str) -> tuple[bytes | None, bool]:
        """``(value or None, whether Redis answered)``."""
        if self._redis is None:
            entry = self._memory.get(key)
            return (None if entry is None else entry.value), True
        value_key = self._value_key(key)

        async def fetch(client: Redis) -> bytes | None:
            return cast("bytes | None", await client.get(value_key))

        try:
            return await self._call("get", fetch), True
        except RedisUnavailableError:
            return None, False

    def _memory_set(self, key: str, value: bytes, ttl: float, session_id: str | None) -> None:
        self._memory[key] = _Entry(value, ttl)
        if session_id is None:
            return
        expires_at = self._timer() + ttl
        index = self._memory_sessions.get(session_id)
        if index is None:
            index = _SessionIndex(set(), expires_at)
        else:
            index.expires_at = max(index.expires_at, expires_at)
        index.keys.add(key)
        if len(index.keys) > self._max_entries:  # drop keys already evicted or expired
            index.keys = {k for k in index.keys if k in self._memory}
        self._memory_sessions[session_id] = index  # (re)computes the index's expiry

    async def _call(
        self,
        operation: str,
        call: Callable[[Redis], Awaitable[T]],
        *,
        bypass_breaker: bool = False,
    ) -> T:
        """One Redis round trip under the guard's policy (`RedisUnavailableError` when
        skipped or failed, already logged and counted)."""
        assert self.redis is not None
        return await self.redis.call(f"cache {operation}", call, bypass_breaker=bypass_breaker)

    def _observed(self, hit: bool) -> None:
        if self._observer is not None:
            self._observer.on_lookup(hit)

    # -- key names ----------------------------------------------------------------------------

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}cache:{key}"

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}cache-session:{session_id}"

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"
