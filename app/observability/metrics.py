"""The project's own Prometheus metrics, on a registry made per app (not at import)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.domain import Usage


class StepLike(Protocol):
    tool: str
    is_error: bool


class PoolStats(Protocol):
    name: str
    size: int

    @property
    def in_use(self) -> int: ...
    @property
    def waiting(self) -> int: ...


LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10)


_LLMChildren = tuple[Callable[[float], None], Callable[[float], None], Callable[[float], None]]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.llm_calls = Counter(
            "agentserve_llm_calls_total",
            "LLM call attempts by upstream, model and outcome.",
            ["upstream", "model", "outcome"],
            registry=registry,
        )
        self.llm_latency = Histogram(
            "agentserve_llm_call_duration_seconds",
            "Duration of LLM call attempts.",
            ["upstream", "model"],
            buckets=LLM_BUCKETS,
            registry=registry,
        )
        self.llm_tokens = Counter(
            "agentserve_llm_tokens_total",
            "Tokens used, by upstream, model and kind (prompt or completion).",
            ["upstream", "model", "kind"],
            registry=registry,
        )
        self.llm_retries = Counter(
            "agentserve_llm_retries_total",
            "LLM call retries by upstream.",
            ["upstream"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "agentserve_circuit_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open.",
            ["upstream"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "agentserve_circuit_breaker_transitions_total",
            "Circuit breaker state changes per upstream and new state.",
            ["upstream", "state"],
            registry=registry,
        )
        self.stream_disconnects = Counter(
            "agentserve_stream_disconnects_total",
            "Streams whose client went away before the end (the turn was cancelled), by route.",
            ["route"],
            registry=registry,
        )
        self.pool_size = Gauge(
            "agentserve_agent_pool_size", "Agents built per pool.", ["agent"], registry=registry
        )
        self.pool_in_use = Gauge(
            "agentserve_agent_pool_in_use", "Agents currently leased.", ["agent"], registry=registry
        )
        self.pool_waiting = Gauge(
            "agentserve_agent_pool_waiting",
            "Requests waiting for an agent.",
            ["agent"],
            registry=registry,
        )
        self.pool_wait = Histogram(
            "agentserve_agent_pool_wait_seconds",
            "Time spent waiting for a pooled agent.",
            ["agent"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.pool_rejections = Counter(
            "agentserve_agent_pool_rejections_total",
            "Requests refused by a saturated pool, by reason (timeout, queue_full, closed).",
            ["agent", "reason"],
            registry=registry,
        )
        self.turns = Counter(
            "agentserve_turns_persisted_total",
            "Conversation turns written to the database.",
            ["agent"],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "agentserve_cache_lookups_total",
            "Response cache lookups by result (hit or miss).",
            ["result"],
            registry=registry,
        )
        # labelled children of the hot-path metrics, cached per label set
        self._turns: dict[str, Callable[[float], None]] = {}
        self._llm_calls: dict[tuple[str, str, str], Callable[[float], None]] = {}
        self._llm: dict[tuple[str, str], _LLMChildren] = {}
        self._cache_hits = self.cache_lookups.labels("hit")
        self._cache_misses = self.cache_lookups.labels("miss")
        self.redis_errors = Counter(
            "agentserve_redis_errors_total",
            "Failed Redis calls (cache and rate limits) by operation.",
            ["operation"],
            registry=registry,
        )
        self.redis_degraded = Gauge(
            "agentserve_redis_degraded",
            "1 while Redis is skipped (circuit open or half-open), else 0.",
            registry=registry,
        )
        self.rate_limited = Counter(
            "agentserve_rate_limited_total",
            "Requests refused with 429, by route and kind (rate or concurrency).",
            ["route", "kind"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "agentserve_tool_calls_total",
            "Tool calls by tool and outcome (ok or error).",
            ["tool", "outcome"],
            registry=registry,
        )

    # --- turns, cache, limits -------------------------------------------------------------
    def on_turn_saved(self, agent: str, steps: Sequence[StepLike], cached: bool) -> None:
        turns = self._turns.get(agent)
        if turns is None:
            turns = self._turns[agent] = self.turns.labels(agent).inc
        turns(1)
        if cached:  # the tools ran when the entry was made, not now
            return
        for step in steps:
            self.tool_calls.labels(step.tool, "error" if step.is_error else "ok").inc()

    def on_lookup(self, hit: bool) -> None:
        (self._cache_hits if hit else self._cache_misses).inc()

    def on_redis_error(self, operation: str) -> None:
        self.redis_errors.labels(operation).inc()

    def on_redis_state(self, state: str) -> None:
        self.redis_degraded.set(0 if state == "ok" else 1)

    # --- LLMObserver ----------------------------------------------------------------------
    def on_attempt(self, upstream: str, model: str, outcome: str, duration: float) -> None:
        key = (upstream, model, outcome)
        calls = self._llm_calls.get(key)
        if calls is None:
            calls = self._llm_calls[key] = self.llm_calls.labels(upstream, model, outcome).inc
        calls(1)
        self._llm_children(upstream, model)[0](duration)

    def on_usage(self, upstream: str, model: str, usage: Usage) -> None:
        _, prompt, completion = self._llm_children(upstream, model)
        prompt(usage.prompt_tokens)
        completion(usage.completion_tokens)

    def _llm_children(self, upstream: str, model: str) -> _LLMChildren:
        """(latency observe, prompt-token inc, completion-token inc) for an upstream and model,
        looked up once rather than through `labels()` on every turn."""
        key = (upstream, model)
        children = self._llm.get(key)
        if children is None:
            children = self._llm[key] = (
                self.llm_latency.labels(upstream, model).observe,
                self.llm_tokens.labels(upstream, model, "prompt").inc,
                self.llm_tokens.labels(upstream, model, "completion").inc,
            )
        return children

    def on_retry(self, upstream: str) -> None:
        self.llm_retries.labels(upstream).inc()

    # --- breaker listener -----------------------------------------------------------------
    def on_breaker_change(self, name: str, _old: IntEnum, new: IntEnum) -> None:
        self.breaker_state.labels(name).set(int(new))
        self.breaker_transitions.labels(name, new.name.lower()).inc()

    # --- pools ----------------------------------------------------------------------------
    def pool_observers(self, agent: str) -> tuple[Callable[[float], None], Callable[[str], None]]:
        """(on_wait, on_reject) hooks for one pool, with the label lookup done once."""
        wait = self.pool_wait.labels(agent)
        rejections = self.pool_rejections

        def on_reject(reason: str) -> None:
            rejections.labels(agent, reason).inc()

        return wait.observe, on_reject

    def watch_pool(self, pool: PoolStats) -> None:
        """Gauges read the pool when scraped: nothing is updated on the request path."""
        self.pool_size.labels(pool.name).set(pool.size)
        self.pool_in_use.labels(pool.name).set_function(lambda: float(pool.in_use))
        self.pool_waiting.labels(pool.name).set_function(lambda: float(pool.waiting))
