"""The shared Redis client's pool (app.redis_client) against the real Redis: bounded, waiting
when every connection is out, and cheap while nobody has to wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from app.redis_client import WaitingConnectionPool, _HiredisPacking, create_redis
from tests.conftest import make_settings


@pytest.fixture
async def make_client(redis_url: str) -> AsyncIterator[Callable[..., Redis]]:
    clients: list[Redis] = []

    def factory(max_connections: int, socket_timeout: float = 2.0) -> Redis:
        settings = make_settings(
            redis_url=redis_url,
            redis_max_connections=max_connections,
            redis_socket_timeout=socket_timeout,
        )
        client = create_redis(settings)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


def pool_of(client: Redis) -> WaitingConnectionPool:
    pool = client.connection_pool
    assert isinstance(pool, WaitingConnectionPool)
    return pool


async def ping(client: Redis) -> bool:
    return bool(await client.ping())


@pytest.fixture
def waited(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the gets that went through BlockingConnectionPool's Condition."""
    calls: list[int] = []
    blocking_get = BlockingConnectionPool.get_connection

    async def counting_get(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await blocking_get(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(BlockingConnectionPool, "get_connection", counting_get)
    return calls


async def test_the_client_uses_the_waiting_pool_with_the_configured_bound(
    make_client: Callable[..., Redis],
) -> None:
    client = make_client(max_connections=7)
    pool = pool_of(client)
    assert pool.max_connections == 7
    assert await client.ping() is True


async def test_uncontended_commands_skip_the_condition(
    make_client: Callable[..., Redis], redis_prefix: str, waited: list[int]
) -> None:
    client = make_client(max_connections=4)
    for value in range(20):
        await client.set(f"{redis_prefix}k", value)
    assert await client.get(f"{redis_prefix}k") == b"19"
    assert waited == []
    assert len(pool_of(client)._in_use_connections) == 0  # every one came back


async def test_a_burst_past_the_bound_waits_and_every_command_lands(
    make_client: Callable[..., Redis], redis_prefix: str, waited: list[int]
) -> None:
    client = make_client(max_connections=2)
    key = f"{redis_prefix}counter"

    async def worker() -> None:
        for _ in range(20):
            await client.incr(key)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(50))), timeout=20)
    assert await client.get(key) == b"1000"
    pool = pool_of(client)
    assert waited, "50 tasks on 2 connections never waited"
    assert len(pool._in_use_connections) + len(pool._available_connections) <= 2
    assert pool._waiting == 0
    await client.set(key, 0)  # and it is back on the fast path
    count = len(waited)
    await client.incr(key)
    assert len(waited) == count


async def test_a_waiter_gets_the_connection_when_it_comes_back(
    make_client: Callable[..., Redis],
) -> None:
    client = make_client(max_connections=1)
    pool = pool_of(client)
    held = await pool.get_connection()
    waiter = asyncio.create_task(ping(client))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # no "Too many connections": it waits
    await pool.release(held)
    assert await asyncio.wait_for(waiter, timeout=2) is True


async def test_waiting_is_bounded_by_the_socket_timeout(
    make_client: Callable[..., Redis],
) -> None:
    client = make_client(max_connections=1, socket_timeout=0.2)
    pool = pool_of(client)
    held = await pool.get_connection()
    try:
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await asyncio.wait_for(client.ping(), timeout=2)
        assert pool._waiting == 0
    finally:
        await pool.release(held)
    assert await client.ping() is True


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "key", b"value", "PX", 60000),
        ("EVALSHA", "0" * 40, 2, "k1", "k2", 3, 60000.0, 0.25, "token"),
        ("CONFIG GET", "maxmemory"),  # redis-py splits a command name holding a space
        ("SET", "clé", "värde ☃"),
        ("SET", "big", b"x" * 100_000),
    ],
)
async def test_commands_are_packed_by_hiredis_into_the_same_bytes(
    make_client: Callable[..., Redis], args: tuple[Any, ...]
) -> None:
    pool = pool_of(make_client(max_connections=1))
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    assert isinstance(connection, _HiredisPacking)
    python_packed = b"".join(Connection().pack_command(*args))
    assert b"".join(connection.pack_command(*args)) == python_packed


@pytest.mark.parametrize("bad", [None, True, object()])
async def test_unpackable_arguments_raise_data_error_as_before(
    make_client: Callable[..., Redis], redis_prefix: str, bad: object
) -> None:
    client = make_client(max_connections=1)
    with pytest.raises(DataError):
        await client.set(f"{redis_prefix}k", bad)  # type: ignore[arg-type]
    assert await client.set(f"{redis_prefix}k", "fine") is True
