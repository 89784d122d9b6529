"""Runtime: the components the lifespan builds from Settings, kept on app.state."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.agents.agent import Agent
from app.agents.pool import AgentPool
from app.agents.spec import AgentSpec, load_agent_specs
from app.agents.tools import ToolRegistry, builtin_registry
from app.cache import ResponseCache
from app.config import Settings
from app.llm.gateway import LLMGateway
from app.observability.metrics import Metrics
from app.redis_client import create_redis
from app.security.jwt import JWTVerifier
from app.security.ratelimit import RateLimiter
from app.service import QueryService
from app.storage import db
from app.storage.sessions import SessionStore

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Lifecycle:
    """Set by the server on SIGTERM so /ready turns 503 before the drain starts."""

    draining: bool = False


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    store: SessionStore
    specs: dict[str, AgentSpec]
    tools: ToolRegistry
    gateway: LLMGateway
    pools: dict[str, AgentPool[Agent]]
    service: QueryService
    cache: ResponseCache | None
    limiter: RateLimiter
    verifier: JWTVerifier
    redis: Redis | None
    head_revision: str | None
    known_revisions: frozenset[str]
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def model_id(self, spec: AgentSpec) -> str:
        return spec.model or self.settings.llm_model

    resources: AsyncExitStack = field(default_factory=AsyncExitStack)
    """Closes, in reverse order of opening, everything build_runtime opened."""

    async def aclose(self) -> None:
        for pool in self.pools.values():
            pool.close()
        await self.resources.aclose()


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
        model_id = models[0]
        chain = gateway.chain_for(models)
        schemas = tools.schemas(spec.tools)
        agents = [
            Agent(spec, chain, tools, model_id=model_id, tool_schemas=schemas)
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


async def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Assemble every component; on failure, close what was already opened."""
    specs = load_agent_specs(settings.agents_file)
    if settings.default_agent not in specs:
        raise ValueError(
            f"DEFAULT_AGENT {settings.default_agent!r} is not in {settings.agents_file}"
        )
    if settings.should_auto_migrate:
        await db.migrate(settings.database_url)
    async with AsyncExitStack() as resources:
        engine = db.create_engine(settings)
        resources.push_async_callback(engine.dispose)
        gateway = LLMGateway(
            settings, observer=metrics, on_breaker_change=metrics.on_breaker_change
        )
        resources.push_async_callback(gateway.aclose)
        redis = create_redis(settings) if settings.redis_url else None
        if redis is not None:
            resources.push_async_callback(redis.aclose)
        verifier = JWTVerifier(settings)
        resources.push_async_callback(verifier.aclose)
        limiter = RateLimiter(
            redis=redis,
            redis_url=settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            socket_timeout=settings.redis_socket_timeout,
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
        store = SessionStore(engine, history_limit=settings.history_max_messages)
        fingerprints = {
            name: spec.fingerprint(
                settings.llm_model, upstreams=gateway.describe_chain(chain_models(spec, settings))
            )
            for name, spec in specs.items()
        }
        service = QueryService(
            store=store,
            specs=specs,
            pools=pools,
            cache=cache,
            default_agent=settings.default_agent,
            fingerprints=fingerprints,
            default_cache_ttl=settings.cache_ttl_seconds,
            session_max_messages=settings.session_max_messages,
            on_turn_saved=metrics.on_turn_saved,
        )
        runtime = Runtime(
            settings=settings,
            engine=engine,
            store=store,
            specs=specs,
            tools=tools,
            gateway=gateway,
            pools=pools,
            service=service,
            cache=cache,
            limiter=limiter,
            verifier=verifier,
            redis=redis,
            head_revision=db.head_revision(),
            known_revisions=db.known_revisions(),
            resources=resources.pop_all(),
        )
    return runtime


def chain_models(spec: AgentSpec, settings: Settings) -> tuple[str, ...]:
    """The model ids an agent's fallback chain tries, in order."""
    return (spec.model or settings.llm_model, *spec.fallback_models)
