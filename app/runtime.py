"""Runtime: the components the lifespan builds from Settings, kept on app.state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.agents.agent import Agent
from app.agents.pool import AgentPool
from app.agents.spec import AgentSpec, load_agent_specs
from app.agents.tools import ToolRegistry, builtin_registry
from app.cache import ResponseCache, create_redis
from app.config import Settings
from app.llm.gateway import LLMGateway
from app.observability.metrics import Metrics
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
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def model_id(self, spec: AgentSpec) -> str:
        return spec.model or self.settings.llm_model

    async def aclose(self) -> None:
        for pool in self.pools.values():
            pool.close()
        await self.verifier.aclose()
        await self.limiter.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.gateway.aclose()
        await self.engine.dispose()


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
        model_id = spec.model or settings.llm_model
        chain = gateway.chain_for((model_id, *spec.fallback_models))
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
    engine = db.create_engine(settings)
    gateway = LLMGateway(settings, observer=metrics, on_breaker_change=metrics.on_breaker_change)
    redis = create_redis(settings) if settings.redis_url else None
    verifier = JWTVerifier(settings)
    limiter = RateLimiter(
        redis=redis,
        redis_url=settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        socket_timeout=settings.redis_socket_timeout,
        lease_seconds=2 * settings.request_timeout,
    )
    try:
        for breaker in gateway.breakers:
            metrics.breaker_state.labels(breaker.name).set(int(breaker.state))
        tools = builtin_registry()
        pools = build_pools(settings, specs, tools, gateway, metrics)
        store = SessionStore(engine, history_limit=settings.history_max_messages)

        cache = (
            ResponseCache.from_settings(settings, redis=redis, observer=metrics)
            if settings.cache_enabled
            else None
        )
        service = QueryService(
            store=store,
            specs=specs,
            pools=pools,
            cache=cache,
            default_agent=settings.default_agent,
            default_model=settings.llm_model,
            default_cache_ttl=settings.cache_ttl_seconds,
            session_max_messages=settings.session_max_messages,
            on_turn_saved=metrics.on_turn_saved,
        )
        return Runtime(
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
        )
    except BaseException:
        await verifier.aclose()
        await limiter.aclose()
        if redis is not None:
            await redis.aclose()
        await gateway.aclose()
        await engine.dispose()
        raise
