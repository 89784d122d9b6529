"""The shared Redis client: fail fast, never retry, a bounded pool that waits cheaply."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import MaxConnectionsError
from redis.utils import HIREDIS_AVAILABLE

from app.config import Settings

HEALTH_CHECK_INTERVAL = 5
"""Seconds a pooled Redis connection may idle before it is PINGed ahead of its next use."""


_HIREDIS_PACKER = HiredisRespSerializer()


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's own sync client packs them.

    Why: the asyncio client packs in Python (`pack_command`, one `Encoder.encode` per
    argument): ~19,000 instructions a command, 2.4 % of a /query turn (`bench/turn_cost.py
    --http`). For the str, bytes, int and float arguments this app sends, the bytes are the
    same (a test compares them), and so are the errors for None and bool (DataError); a
    value over 6,000 bytes is copied into the one buffer rather than sent as a chunk of its
    own, and an enum is refused (DataError) where the Python packer sent its repr."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return _HIREDIS_PACKER.pack(*args)  # type: ignore[no-any-return]


class _HiredisConnection(_HiredisPacking, Connection):
    pass


class _HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_HIREDIS_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _HiredisConnection,
    SSLConnection: _HiredisSSLConnection,
    UnixDomainSocketConnection: _HiredisUnixConnection,
}


class WaitingConnectionPool(BlockingConnectionPool):
    """redis-py's BlockingConnectionPool, with its uncontended path as cheap as the plain pool's.

    Why: redis-py 8's BlockingConnectionPool takes an asyncio.Condition, arms a timeout and
    enters an async context manager for every connection it hands out, and takes the
    Condition again for every one it gets back: ~56,000 instructions a command, and a /query
    turn sends four (6.5 % of the turn, `bench/turn_cost.py --http`).

    A get goes the plain ConnectionPool's way (its lock, its health check, no Condition, no
    timer) when nobody waits, the pool's lock is free, no maintenance is under way and a
    connection is free or may be opened; should the lock queue it until the last connection
    is gone ("Too many connections"), it waits after all. A release goes the plain way under
    the same conditions and when the connection needs no reconnect (so no await splits
    taking it out of use from putting it back); if someone began to wait meanwhile, it
    notifies. Everything else goes through BlockingConnectionPool, which waits at most
    `timeout`. Relies on redis-py 8's `_lock` and `_in_maintenance` (pinned below 9 in
    pyproject.toml; tests/unit/test_redis_pool.py exercises the races). redis-py's optional
    OpenTelemetry metrics see no wait time for the gets that did not wait.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._waiting = 0

    def _uncontended(self) -> bool:
        return not (self._waiting or self._in_maintenance or self._lock.locked())

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        if self._uncontended() and self.can_get_connection():
            try:
                return await ConnectionPool.get_connection(self)  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                pass  # queued on the lock while others took the last connections: wait
        self._waiting += 1
        try:
            return await BlockingConnectionPool.get_connection(self)  # type: ignore[no-untyped-call]
        finally:
            self._waiting -= 1

    async def release(self, connection: AbstractConnection) -> None:
        if not self._uncontended() or connection.should_reconnect():  # type: ignore[no-untyped-call]
            await super().release(connection)  # under the Condition, waking a waiter
            return
        await ConnectionPool.release(self, connection)
        if self._waiting:  # someone began to wait while this release was suspended
            async with self._condition:
                self._condition.notify()


def create_redis(settings: Settings) -> Redis:
    """The shared Redis client: fail fast, never retry, bounded pool.

    Connect timeout = ``redis_socket_timeout``, ``Retry(NoBackoff(), 0)``. The pool holds at
    most ``redis_max_connections`` and waits at most the socket timeout for a free connection
    (`WaitingConnectionPool`): the plain pool raises "Too many connections" at once under a
    burst, which the cache's breaker would mistake for an outage.

    No socket (read/write) timeout inside redis-py: every caller bounds each whole operation
    with ``asyncio.timeout`` instead (the cache's ``_call``, the limiter). redis-py's own
    timeout wraps every write in ``asyncio.wait_for`` - a task per command on Python 3.11 -
    and every read in another timeout: a measurable share of a request's CPU for a bound the
    callers already set. A cancelled read disconnects the connection, so no stale reply is
    read by the next command.
    Commands are packed by hiredis when it is installed and the URL keeps the default
    strict UTF-8 encoding (`_HiredisPacking`).
    The caller owns the client and closes it (``await client.aclose()`` closes the pool).
    """
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    timeout = settings.redis_socket_timeout
    pool = WaitingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    kwargs = pool.connection_kwargs
    encoding = kwargs.get("encoding", "utf-8").lower().replace("_", "-")
    strict = kwargs.get("encoding_errors", "strict") == "strict"
    if HIREDIS_AVAILABLE and encoding in ("utf-8", "utf8") and strict:  # as hiredis encodes
        pool.connection_class = _HIREDIS_CONNECTIONS.get(
            pool.connection_class, pool.connection_class
        )
    return Redis.from_pool(pool)
