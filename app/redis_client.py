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
from redis.utils import HIREDIS_AVAILABLE

from app.config import Settings

HEALTH_CHECK_INTERVAL = 5
"""Seconds a pooled Redis connection may idle before it is PINGed ahead of its next use."""


_HIREDIS_PACKER = HiredisRespSerializer()


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's own sync client packs them.

    Why: the asyncio client packs in Python (`pack_command`, one `Encoder.encode` per
    argument): ~19,000 instructions a command, 2.4 % of a /query turn (`bench/turn_cost.py
    --http`). The bytes are the same (a test compares them), and
    so are the errors (DataError for None, bool and the like)."""

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
    turn sends four (6.5 % of the turn, `bench/turn_cost.py --http`). While a connection is free
    or may be opened and nobody is waiting for one, none of that can change what happens, so
    this pool then hands out and takes back connections as the plain ConnectionPool does
    (same lock, same health check, same counts). As soon as one caller has to wait, every
    get and release goes through the Condition (blocking, bounded by `timeout`, first come
    first served), until nobody waits any more.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._waiting = 0

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        if self._waiting or self._in_maintenance or self._lock.locked():
            return await self._get_connection_waiting()
        if not self.can_get_connection():
            return await self._get_connection_waiting()
        return await ConnectionPool.get_connection(self)  # type: ignore[no-untyped-call]

    async def _get_connection_waiting(self) -> Any:
        self._waiting += 1
        try:
            return await BlockingConnectionPool.get_connection(self)  # type: ignore[no-untyped-call]
        finally:
            self._waiting -= 1

    async def release(self, connection: AbstractConnection) -> None:
        if self._waiting:
            await super().release(connection)  # under the Condition, waking a waiter
        else:
            await ConnectionPool.release(self, connection)


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
    encoding = pool.connection_kwargs.get("encoding", "utf-8").lower().replace("_", "-")
    if HIREDIS_AVAILABLE and encoding in ("utf-8", "utf8"):  # hiredis encodes text as UTF-8
        pool.connection_class = _HIREDIS_CONNECTIONS.get(
            pool.connection_class, pool.connection_class
        )
    return Redis.from_pool(pool)
