"""WaitingConnectionPool's races, with stand-in connections (no Redis): whatever the pool's
lock does, a waiter is woken, nobody gets "Too many connections", and the bound holds."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool

from app.redis_client import WaitingConnectionPool


class StandIn:
    """What the pool asks of a connection, with no socket."""

    def __init__(self, **_: Any) -> None:
        self.reconnect = False

    def should_reconnect(self) -> bool:
        return self.reconnect

    async def connect(self) -> None:
        return None

    async def can_read(self) -> bool:
        return False

    async def disconnect(self, *_: Any, **__: Any) -> None:
        await asyncio.sleep(0.02)  # a real disconnect awaits the socket's close
        self.reconnect = False

    async def re_auth(self) -> None:
        return None


def pool(max_connections: int, timeout: float) -> WaitingConnectionPool:
    return WaitingConnectionPool(
        connection_class=StandIn, max_connections=max_connections, timeout=timeout
    )


def connections(pool: BlockingConnectionPool) -> int:
    return len(pool._available_connections) + len(pool._in_use_connections)


async def hold_lock(pool: BlockingConnectionPool, held: asyncio.Event, go: asyncio.Event) -> None:
    """What redis-py does under the pool's lock in maintenance or a reconnecting release."""
    async with pool._lock:
        held.set()
        await go.wait()


async def test_a_release_queued_on_the_lock_still_wakes_a_waiter() -> None:
    subject = pool(1, timeout=2.0)
    only = await subject.get_connection()
    held, go = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_lock(subject, held, go))
    await held.wait()
    release = asyncio.create_task(subject.release(only))  # finds the lock taken
    await asyncio.sleep(0)
    waiter = asyncio.create_task(subject.get_connection())  # lock taken: waits
    await asyncio.sleep(0.05)
    assert not waiter.done()
    go.set()
    assert await asyncio.wait_for(waiter, timeout=1.0) is only  # long before the 2 s timeout
    await release
    await holder


async def test_getters_queued_on_the_lock_wait_rather_than_fail() -> None:
    subject = pool(2, timeout=2.0)
    first = await subject.get_connection()
    held, go = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_lock(subject, held, go))
    await held.wait()
    release = asyncio.create_task(subject.release(first))

    async def get() -> Any:
        await go.wait()  # all three find the lock just released, with others queued on it
        return await subject.get_connection()

    getters = [asyncio.create_task(get()) for _ in range(3)]
    await asyncio.sleep(0)
    go.set()
    await asyncio.sleep(0.05)
    done = [task for task in getters if task.done()]
    assert all(task.exception() is None for task in done)  # no "Too many connections"
    assert len(done) == 2  # the bound: the third waits
    await subject.release(done[0].result())
    got = await asyncio.wait_for(asyncio.gather(*getters), timeout=1.0)
    assert len(got) == 3
    assert connections(subject) <= 2
    await release
    await holder


async def test_a_connection_that_reconnects_on_release_keeps_the_bound() -> None:
    subject = pool(1, timeout=1.0)
    only = await subject.get_connection()
    only.reconnect = True  # disconnected, then put back, on release
    release = asyncio.create_task(subject.release(only))
    await asyncio.sleep(0)
    again = await asyncio.wait_for(subject.get_connection(), timeout=1.0)
    await release
    assert again is only
    assert connections(subject) == 1
