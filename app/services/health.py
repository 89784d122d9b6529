"""ReadinessService: whether this replica should get traffic, and what each part says.

Ready means: the database answers and is migrated to this code's head (or past it, by a
newer release during a rolling upgrade), and the process is not draining. LLM circuits and
the cache only inform (`degraded`): a replica with an open circuit still answers from the
fallback chain or fails fast with 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.cache import ResponseCache
from app.observability.metrics import PoolStats
from app.resilience.breaker import BreakerState, CircuitBreaker
from app.storage import TurnRepository

CheckStatus = Literal["ok", "fail", "degraded", "info"]

DATABASE_TIMEOUT = 2.0
"""Seconds the database check may take before the replica is reported not ready."""


@dataclass(slots=True)
class Lifecycle:
    """Set by the server on SIGTERM, so /ready turns 503 before the drain starts."""

    draining: bool = False


@dataclass(slots=True)
class Check:
    status: CheckStatus
    detail: str | None = None
    latency_ms: float | None = None


@dataclass(slots=True)
class Readiness:
    ready: bool
    checks: dict[str, Check] = field(default_factory=dict)


class ReadinessService:
    def __init__(
        self,
        *,
        turns: TurnRepository,
        head_revision: str | None,
        known_revisions: frozenset[str],
        pools: Iterable[PoolStats],
        breakers: Sequence[CircuitBreaker],
        cache: ResponseCache | None,
        lifecycle: Lifecycle,
    ) -> None:
        self._turns = turns
        self._head = head_revision
        self._known = known_revisions
        self._pools = list(pools)
        self._breakers = breakers
        self._cache = cache
        self._lifecycle = lifecycle

    async def check(self) -> Readiness:
        checks = await self._database()
        for pool in self._pools:
            checks[f"pool:{pool.name}"] = Check(
                "ok", f"{pool.in_use}/{pool.size} in use, {pool.waiting} waiting"
            )
        for breaker in self._breakers:
            state = breaker.state
            checks[f"llm:{breaker.name}"] = Check(
                "info" if state is BreakerState.CLOSED else "degraded",
                f"circuit {state.name.lower().replace('_', '-')}",
            )
        if self._cache is not None:
            cache: dict[str, Any] = self._cache.status()
            checks["cache"] = Check(
                "ok" if cache.get("state") == "ok" else "degraded",
                f"{cache.get('backend')}: {cache.get('detail') or cache.get('state')}",
            )
        if self._lifecycle.draining:
            checks["lifecycle"] = Check("fail", "shutting down")
        return Readiness(all(c.status != "fail" for c in checks.values()), checks)

    async def _database(self) -> dict[str, Check]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                revision = await self._turns.schema_revision()
        except Exception as exc:  # any failure to reach the database means not ready
            latency = round((time.perf_counter() - started) * 1000, 2)
            return {
                "database": Check("fail", repr(exc)[:200], latency),
                "migrations": Check("fail", "database unreachable"),
            }
        latency = round((time.perf_counter() - started) * 1000, 2)
        if revision == self._head:
            status: CheckStatus = "ok"
        elif revision is not None and revision not in self._known:
            status = "degraded"  # a newer release migrated ahead of this one: keep serving
        else:
            status = "fail"  # migrations pending
        return {
            "database": Check("ok", latency_ms=latency),
            "migrations": Check(status, f"at {revision}, head is {self._head}"),
        }
