"""The composition root: every component, built from Settings when the app starts.

`build_runtime` opens what the app needs, in dependency order, and returns it with one exit
stack that closes it all in reverse; the lifespan hands `Runtime.state` to the requests.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from app.agents.agent import Agent
from app.agents.pool import AgentPool
from app.agents.spec import AgentSpec, load_agent_specs
from app.agents.tools import ToolRegistry, builtin_registry
from app.api.deps import AppState
from app.cache import ResponseCache
from app.config import Settings
from app.llm.gateway import LLMGateway
from app.observability.metrics import Metrics
from app.resilience.redis_guard import RedisGuard, create_redis, redis_breaker
from app.security.jwt import JWTVerifier
from app.security.ratelimit import RateLimiter
from app.services.health import Lifecycle, ReadinessService
from app.services.query import ActiveTurns, QueryService
from app.services.sessions import SessionService
from app.storage import PostgresTurnRepository, SqlTurnRepository, db, open_repository

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Everything built; routes see only `state`, the rest is for start-up and tests."""

    state: AppState
    turns: PostgresTurnRepository | SqlTurnRepository
    gateway: LLMGateway
    pools: dict[str, AgentPool[Agent]]
    cache: ResponseCache | None
    limiter: RateLimiter
    resources: AsyncExitStack
    """Closes, in reverse order of opening, everything build_runtime opened."""

    async def aclose(self) -> None:
        for pool in self.pools.values():
            pool.close()
        await self.resources.aclose()


def chain_models(spec: AgentSpec, settings: Settings) -> tuple[str, ...]:
    """The model ids an agent's fallback chain tries, in order."""
    return (spec.model or settings.llm_model, *spec.fallback_models)


def build_pools(
    settings: Settings,
    specs: dict[str, AgentSpec],
    tools: ToolRegistry,
    gateway: LLMGateway,
    metrics: Metrics,
) -> dict[str, AgentPool[Agent]]:
    pools: dict[str, AgentPool[Agent]] = {}
    for spec in specs.values():
        unknown = [name for name in spec.tools if name not in tools]
        if unknown:
            raise ValueError(f"agent {spec.name!r} names unknown tools: {unknown}")
        models = chain_models(spec, settings)
        chain = gateway.chain_for(models)
        schemas = tools.schemas(spec.tools)
        agents = [
            Agent(spec, chain, tools, model_id=models[0], tool_schemas=schemas)
            for _ in range(spec.pool_size)
        ]
        on_wait, on_reject = metrics.pool_observers(spec.name)
        pool: AgentPool[Agent] = AgentPool(
            spec.name,
            agents,
            acquire_timeout=settings.pool_acquire_timeout,
            max_waiting=settings.pool_max_waiting,
            on_wait=on_wait,
            on_reject=on_reject,
        )
        metrics.watch_pool(pool)
        pools[spec.name] = pool
    return pools


async def build_runtime(settings: Settings, metrics: Metrics, lifecycle: Lifecycle) -> Runtime:
    """Assemble every component; on failure, close what was already opened."""
    specs = load_agent_specs(settings.agents_file)
    if settings.default_agent not in specs:
        raise ValueError(
            f"DEFAULT_AGENT {settings.default_agent!r} is not in {settings.agents_file}"
        )
    if settings.should_auto_migrate:
        await db.migrate(settings.database_url)
    async with AsyncExitStack() as resources:
        turns = await open_repository(settings)
        resources.push_async_callback(turns.aclose)
        gateway = LLMGateway(
            settings, observer=metrics, on_breaker_change=metrics.on_breaker_change
        )
        resources.push_async_callback(gateway.aclose)
        redis: RedisGuard | None = None
        if settings.redis_url:
            client = create_redis(settings)
            resources.push_async_callback(client.aclose)
            redis = RedisGuard(
                client,
                timeout=3 * settings.redis_socket_timeout,
                breaker=redis_breaker(settings.redis_breaker_open_seconds),
                observer=metrics,
            )
        verifier = JWTVerifier(settings)
        resources.push_async_callback(verifier.aclose)
        limiter = RateLimiter(
            redis=redis,
            key_prefix=settings.redis_key_prefix,
            lease_seconds=2 * settings.request_timeout,
        )
        resources.push_async_callback(limiter.aclose)
        cache = (
            ResponseCache.from_settings(settings, redis=redis, observer=metrics)
            if settings.cache_enabled
            else None
        )
        if cache is not None:
            resources.push_async_callback(cache.aclose)

        for breaker in gateway.breakers:
            metrics.breaker_state.labels(breaker.name).set(int(breaker.state))
        tools = builtin_registry()
        pools = build_pools(settings, specs, tools, gateway, metrics)
        fingerprints = {
            name: spec.fingerprint(
                settings.llm_model, upstreams=gateway.describe_chain(chain_models(spec, settings))
            )
            for name, spec in specs.items()
        }
        active = ActiveTurns()
        query_service = QueryService(
            turns=turns,
            specs=specs,
            pools=pools,
            cache=cache,
            active=active,
            default_agent=settings.default_agent,
            default_model=settings.llm_model,
            fingerprints=fingerprints,
            default_cache_ttl=settings.cache_ttl_seconds,
            session_max_messages=settings.session_max_messages,
            max_message_chars=settings.max_message_chars,
            max_metadata_bytes=settings.max_metadata_bytes,
            deadline=settings.request_timeout,
            on_turn_saved=metrics.on_turn_saved,
        )
        readiness = ReadinessService(
            turns=turns,
            head_revision=db.head_revision(),
            known_revisions=db.known_revisions(),
            pools=pools.values(),
            breakers=gateway.breakers,
            cache=cache,
            lifecycle=lifecycle,
        )
        state = AppState(
            settings=settings,
            metrics=metrics,
            query_service=query_service,
            session_service=SessionService(turns=turns, cache=cache, active=active),
            readiness=readiness,
            limiter=limiter,
            verifier=verifier,
        )
        return Runtime(
            state=state,
            turns=turns,
            gateway=gateway,
            pools=pools,
            cache=cache,
            limiter=limiter,
            resources=resources.pop_all(),
        )
