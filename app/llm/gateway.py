"""LLMGateway: the upstreams configured in Settings, their breakers, and the chains.

Built once in the app's lifespan. One httpx.AsyncClient per upstream, shared by every
agent; one breaker per upstream, shared by every chain that goes through it.
"""

from __future__ import annotations

import httpx

from app.config import Settings, UpstreamConfig
from app.llm.openai_compat import OpenAICompatibleModel, build_http_client
from app.llm.resilient import FallbackChain, LLMObserver, ResilientUpstream, RetryPolicy
from app.llm.simulator import Simulator, SimulatorChatModel, SimulatorKnobs
from app.llm.types import ChatModel
from app.resilience.breaker import BreakerConfig, CircuitBreaker, StateListener


def breaker_config(settings: Settings) -> BreakerConfig:
    return BreakerConfig(
        failure_rate_threshold=settings.breaker_failure_rate,
        slow_call_rate_threshold=settings.breaker_slow_call_rate,
        slow_call_duration_threshold=settings.breaker_slow_call_seconds,
        sliding_window_size=settings.breaker_window_size,
        minimum_number_of_calls=settings.breaker_min_calls,
        wait_duration_in_open_state=settings.breaker_open_seconds,
        permitted_number_of_calls_in_half_open_state=settings.breaker_half_open_calls,
    )


def simulator_knobs(settings: Settings) -> SimulatorKnobs:
    return SimulatorKnobs(
        latency_ms=settings.sim_latency_ms,
        per_token_latency_ms=settings.sim_per_token_latency_ms,
        error_rate=settings.sim_error_rate,
        error_status=settings.sim_error_status,
        retry_after=settings.sim_retry_after,
        hang=settings.sim_hang,
    )


class LLMGateway:
    def __init__(
        self,
        settings: Settings,
        *,
        observer: LLMObserver | None = None,
        on_breaker_change: StateListener | None = None,
    ) -> None:
        self._settings = settings
        self.clients: list[httpx.AsyncClient] = []
        self.simulator: Simulator | None = None
        policy = RetryPolicy(
            max_attempts=settings.llm_max_attempts,
            backoff_initial=settings.llm_backoff_initial,
            backoff_max=settings.llm_backoff_max,
            attempt_timeout=settings.llm_timeout,
            deadline=settings.llm_deadline,
        )
        self.upstreams: list[tuple[UpstreamConfig, ResilientUpstream]] = []
        for config in settings.upstreams:
            breaker = CircuitBreaker(
                config.name, breaker_config(settings), on_state_change=on_breaker_change
            )
            upstream = ResilientUpstream(
                config.name, self._model_for(config), breaker, policy, observer
            )
            self.upstreams.append((config, upstream))
        self._chains: dict[tuple[str, ...], FallbackChain] = {}

    def _model_for(self, config: UpstreamConfig) -> ChatModel:
        if config.kind == "simulator":
            if self.simulator is None:
                self.simulator = Simulator(simulator_knobs(self._settings))
            return SimulatorChatModel(self.simulator, name=config.name)
        client = build_http_client(self._settings, config)
        self.clients.append(client)
        return OpenAICompatibleModel(config.name, client)

    @property
    def breakers(self) -> list[CircuitBreaker]:
        return [upstream.breaker for _, upstream in self.upstreams]

    def chain_for(self, models: tuple[str, ...]) -> FallbackChain:
        """Links for each model id in order, through every upstream that serves it."""
        chain = self._chains.get(models)
        if chain is None:
            links = [
                (upstream, model)
                for model in models
                for config, upstream in self.upstreams
                if config.serves(model)
            ]
            if not links:
                raise ValueError(f"no configured LLM upstream serves any of {list(models)}")
            chain = FallbackChain(
                links, unavailable_retry_after=self._settings.llm_unavailable_retry_after
            )
            self._chains[models] = chain
        return chain

    def describe_chain(self, models: tuple[str, ...]) -> list[str]:
        """Who would answer, in order: part of the cache key, so that answers from another
        upstream (say, the simulator's, once a real model is configured) are never reused."""
        return [
            f"{config.name}|{config.kind}|{config.base_url or ''}|{model}"
            for model in models
            for config, _ in self.upstreams
            if config.serves(model)
        ]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
