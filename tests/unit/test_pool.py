"""Unit tests for app.agents.pool: bounded waiting, FIFO hand-over, cancellation, close."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.agents.pool import AgentPool
from app.errors import PoolExhaustedError


def make_pool(
    size: int = 1,
    *,
    acquire_timeout: float = 1.0,
    max_waiting: int = 10,
    waits: list[float] | None = None,
    rejects: list[str] | None = None,
) -> AgentPool[str]:
    return AgentPool(
        "p",
        [f"agent-{i}" for i in range(size)],
        acquire_timeout=acquire_timeout,
        max_waiting=max_waiting,
        on_wait=waits.append if waits is not None else None,
        on_reject=rejects.append if rejects is not None else None,
    )


def assert_conserved(pool: AgentPool[str], held: int) -> None:
    """Nothing leaked: every instance is either free or held by a caller."""
    assert pool.available + held == pool.size
    assert pool.in_use == held


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        AgentPool[str]("p", [], acquire_timeout=1.0, max_waiting=1)


async def test_acquire_release_round_trip_and_counters() -> None:
    pool = make_pool(2)
    assert (pool.size, pool.in_use, pool.available, pool.waiting) == (2, 0, 2, 0)

    first = await pool.acquire()
    assert (pool.in_use, pool.available) == (1, 1)
    second = await pool.acquire()
    assert {first, second} == {"agent-0", "agent-1"}
    assert (pool.in_use, pool.available, pool.waiting) == (2, 0, 0)

    waiter = asyncio.create_task(pool.acquire())
    await settle()
    assert pool.waiting == 1
    assert not waiter.done()

    pool.release(first)
    assert await waiter == first
    assert (pool.in_use, pool.available, pool.waiting) == (2, 0, 0)

    pool.release(first)
    pool.release(second)
    assert (pool.in_use, pool.available, pool.waiting) == (0, 2, 0)
    # The same instances come back out.
    assert {await pool.acquire(), await pool.acquire()} == {"agent-0", "agent-1"}


async def test_waiter_gets_the_instance_another_task_releases() -> None:
    pool = make_pool(1)
    held = await pool.acquire()

    async def holder() -> None:
        await asyncio.sleep(0.02)
        pool.release(held)

    releaser = asyncio.create_task(holder())
    started = time.perf_counter()
    got = await pool.acquire()
    waited = time.perf_counter() - started
    await releaser
    assert got == held
    assert waited >= 0.015
    assert_conserved(pool, held=1)


async def test_waiters_are_served_in_fifo_order() -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    served: list[int] = []

    async def waiter(index: int) -> None:
        instance = await pool.acquire()
        served.append(index)
        await asyncio.sleep(0)
        pool.release(instance)

    tasks = []
    for index in range(5):
        tasks.append(asyncio.create_task(waiter(index)))
        await settle()  # make the arrival order explicit
    assert pool.waiting == 5

    pool.release(held)
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3, 4]
    assert_conserved(pool, held=0)


async def test_wait_beyond_acquire_timeout_is_rejected_with_timeout() -> None:
    rejects: list[str] = []
    pool = make_pool(1, acquire_timeout=0.05, rejects=rejects)
    await pool.acquire()

    started = time.perf_counter()
    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    elapsed = time.perf_counter() - started

    assert info.value.reason == "timeout"
    assert info.value.pool == "p"
    assert (info.value.retry_after or 0) >= 1
    assert 0.04 <= elapsed < 0.3
    assert rejects == ["timeout"]
    assert pool.waiting == 0  # the timed-out waiter is gone
    assert_conserved(pool, held=1)


async def test_retry_after_is_at_least_the_acquire_timeout() -> None:
    pool = make_pool(1, acquire_timeout=2.5, max_waiting=0)
    await pool.acquire()
    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    assert info.value.retry_after == 2.5


async def test_full_queue_rejects_immediately() -> None:
    rejects: list[str] = []
    pool = make_pool(1, acquire_timeout=5.0, max_waiting=2, rejects=rejects)
    held = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(2)]
    await settle()
    assert pool.waiting == 2

    started = time.perf_counter()
    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    elapsed = time.perf_counter() - started

    assert info.value.reason == "queue_full"
    assert (info.value.retry_after or 0) >= 1
    assert elapsed < 0.05  # did not wait for the 5 s acquire timeout
    assert rejects == ["queue_full"]
    assert pool.waiting == 2  # the rejected caller did not join the queue

    pool.release(held)
    first = await waiters[0]
    pool.release(first)
    assert await waiters[1] == first
    pool.release(first)
    assert_conserved(pool, held=0)


async def test_max_waiting_zero_rejects_as_soon_as_the_pool_is_empty() -> None:
    rejects: list[str] = []
    pool = make_pool(2, acquire_timeout=5.0, max_waiting=0, rejects=rejects)
    a = await pool.acquire()
    await pool.acquire()  # still served: the pool was not empty

    started = time.perf_counter()
    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    assert time.perf_counter() - started < 0.05
    assert info.value.reason == "queue_full"
    assert rejects == ["queue_full"]

    pool.release(a)
    assert await pool.acquire() == a


async def test_cancelled_waiter_does_not_leak_and_next_release_goes_to_live_waiter() -> None:
    pool = make_pool(1, acquire_timeout=5.0)
    held = await pool.acquire()
    doomed = asyncio.create_task(pool.acquire())
    await settle()
    survivor = asyncio.create_task(pool.acquire())
    await settle()
    assert pool.waiting == 2

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert pool.waiting == 1
    assert_conserved(pool, held=1)

    pool.release(held)
    assert await survivor == held  # skipped the cancelled waiter
    assert pool.waiting == 0
    assert_conserved(pool, held=1)


async def test_release_after_only_waiter_cancelled_returns_to_free_list() -> None:
    pool = make_pool(1, acquire_timeout=5.0)
    held = await pool.acquire()
    doomed = asyncio.create_task(pool.acquire())
    await settle()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed

    pool.release(held)
    assert pool.waiting == 0
    assert_conserved(pool, held=0)
    assert await asyncio.wait_for(pool.acquire(), 0.1) == held


async def test_cancel_in_the_same_tick_as_release_passes_the_instance_on() -> None:
    pool = make_pool(1, acquire_timeout=5.0)
    held = await pool.acquire()
    doomed = asyncio.create_task(pool.acquire())
    await settle()
    survivor = asyncio.create_task(pool.acquire())
    await settle()

    pool.release(held)  # hands the instance to `doomed`'s future...
    doomed.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await doomed

    assert await asyncio.wait_for(survivor, 0.1) == held
    assert_conserved(pool, held=1)


async def test_cancel_in_the_same_tick_as_release_without_other_waiter_frees_it() -> None:
    pool = make_pool(1, acquire_timeout=5.0)
    held = await pool.acquire()
    doomed = asyncio.create_task(pool.acquire())
    await settle()

    pool.release(held)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed

    assert_conserved(pool, held=0)
    assert pool.waiting == 0


async def test_timeout_in_the_same_tick_as_release_does_not_lose_the_instance() -> None:
    """Regression: `except TimeoutError` used to reject without passing the handed-over
    instance on, so the pool lost it for good (in_use stuck at 1)."""
    pool = make_pool(1, acquire_timeout=0.05)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await settle()
    assert pool.waiting == 1

    time.sleep(0.07)  # block the loop past the waiter's deadline
    # On resuming, the loop runs this task first, then the expired timeout callback.
    await asyncio.sleep(0)
    pool.release(held)  # the waiter's future gets the instance; then its timeout fires

    try:
        got = await waiter
    except PoolExhaustedError:
        # Rejected: then the instance must have gone back to the pool.
        assert_conserved(pool, held=0)
    else:
        assert got == held
        assert_conserved(pool, held=1)


async def test_on_wait_reports_zero_uncontended_and_positive_when_contended() -> None:
    waits: list[float] = []
    pool = make_pool(1, waits=waits)
    held = await pool.acquire()
    assert waits == [0.0]

    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.02)
    pool.release(held)
    await waiter
    assert len(waits) == 2
    assert waits[1] >= 0.015


async def test_on_wait_not_called_for_rejected_callers() -> None:
    waits: list[float] = []
    rejects: list[str] = []
    pool = make_pool(1, acquire_timeout=0.02, max_waiting=1, waits=waits, rejects=rejects)
    await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await settle()
    with pytest.raises(PoolExhaustedError):
        await pool.acquire()
    with pytest.raises(PoolExhaustedError):
        await waiter
    assert waits == [0.0]
    assert rejects == ["queue_full", "timeout"]


async def test_close_rejects_new_acquires_and_wakes_waiters() -> None:
    rejects: list[str] = []
    pool = make_pool(1, acquire_timeout=5.0, rejects=rejects)
    held = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
    await settle()
    assert pool.waiting == 3

    started = time.perf_counter()
    pool.close()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert time.perf_counter() - started < 0.1  # woken, not timed out
    for result in results:
        assert isinstance(result, PoolExhaustedError)
        assert result.reason == "closed"
    assert pool.waiting == 0

    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    assert info.value.reason == "closed"
    assert rejects == ["closed"]

    pool.release(held)  # a lease ending after close still returns its instance
    assert_conserved(pool, held=0)


async def test_close_refuses_even_when_instances_are_free() -> None:
    pool = make_pool(2)
    pool.close()
    with pytest.raises(PoolExhaustedError) as info:
        await pool.acquire()
    assert info.value.reason == "closed"
    assert pool.available == 2


async def test_lease_releases_on_normal_exit_and_on_exception() -> None:
    pool = make_pool(1)
    async with pool.lease() as instance:
        assert instance == "agent-0"
        assert pool.in_use == 1
    assert_conserved(pool, held=0)

    seen: list[int] = []

    async def fail_inside() -> None:
        async with pool.lease():
            seen.append(pool.available)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert seen == [0]
    assert_conserved(pool, held=0)


async def test_lease_exception_hands_instance_to_waiter() -> None:
    pool = make_pool(1, acquire_timeout=5.0)
    leased: list[str] = []
    waiters: list[asyncio.Task[str]] = []

    async def fail_inside() -> None:
        async with pool.lease() as instance:
            leased.append(instance)
            waiters.append(asyncio.create_task(pool.acquire()))
            await settle()
            assert pool.waiting == 1
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert await asyncio.wait_for(waiters[0], 0.1) == leased[0]
