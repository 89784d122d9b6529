"""AgentPool: a fixed set of pre-built agents per spec, handed out with bounded waiting.

Hand-written rather than an asyncio.Queue, which cannot say how many wait without touching
its privates nor refuse a caller when the line is too long; the uncontended path here is a
list pop and a list append.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Generic, TypeVar

from app.errors import PoolExhaustedError

T = TypeVar("T")


class AgentPool(Generic[T]):
    def __init__(
        self,
        name: str,
        instances: Sequence[T],
        *,
        acquire_timeout: float,
        max_waiting: int,
        on_wait: Callable[[float], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a pool needs at least one instance")
        self.name = name
        self.size = len(instances)
        self._free: list[T] = list(instances)
        self._waiters: deque[asyncio.Future[T]] = deque()
        self._acquire_timeout = acquire_timeout
        self._max_waiting = max_waiting
        self._on_wait = on_wait
        self._on_reject = on_reject
        self._closed = False

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def available(self) -> int:
        return len(self._free)

    def _retry_after(self) -> float:
        return max(1.0, self._acquire_timeout)

    def _reject(self, reason: str) -> PoolExhaustedError:
        if self._on_reject is not None:
            self._on_reject(reason)
        return PoolExhaustedError(self.name, reason, self._retry_after())

    async def acquire(self) -> T:
        if self._closed:
            raise self._reject("closed")
        if self._free and not self._waiters:
            if self._on_wait is not None:
                self._on_wait(0.0)
            return self._free.pop()
        if len(self._waiters) >= self._max_waiting:
            raise self._reject("queue_full")
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._acquire_timeout):
                instance = await waiter
        except TimeoutError:
            if not waiter.done() or waiter.cancelled():
                raise self._reject("timeout") from None
            # release() handed us an instance in the same tick the deadline passed: keep it.
            instance = waiter.result()
        except BaseException:
            # Cancelled after release() handed us an instance: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            raise
        finally:
            if not waiter.done() or waiter.cancelled():
                self._discard(waiter)
        if self._on_wait is not None:
            self._on_wait(time.perf_counter() - started)
        return instance

    def _discard(self, waiter: asyncio.Future[T]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)

    def release(self, instance: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._free.append(instance)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[T]:
        instance = await self.acquire()
        try:
            yield instance
        finally:
            self.release(instance)

    def close(self) -> None:
        """Refuse new acquisitions and wake every waiter with a rejection."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolExhaustedError(self.name, "closed", 1.0))
