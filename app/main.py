"""The app factory. Every component is built in the lifespan from Settings, never at import.

`create_app(Settings(...))` is what tests call; `agentserve serve` and uvicorn's
`--factory app.main:create_app` call it with the environment's settings.
"""

from __future__ import annotations

import gc
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy.engine import make_url
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import __version__
from app.api import openai, ops, query, sessions
from app.api.deps import AppState
from app.api.errors import install_error_handlers
from app.api.middleware import DocsContentPolicy, RequestEnvelope
from app.config import Settings
from app.observability.logging import configure_logging
from app.observability.metrics import Metrics
from app.observability.tracing import Tracing
from app.runtime import build_runtime
from app.services.health import Lifecycle
from app.storage import PostgresTurnRepository, SqlTurnRepository

logger = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def valid_request_id(value: str) -> bool:
    """Accept caller ids that are safe to log and echo; others are replaced by a new one."""
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def tune_garbage_collector() -> None:
    """Keep full garbage collections from stalling the event loop.

    * `gc.freeze()` moves everything built at start-up (modules, routes, pydantic's
      validators, SQLAlchemy's metadata, the agent pools) out of the collector's reach, so
      full collections stop walking it again and again.
    * Higher thresholds: with many requests in flight, each waiting seconds on the LLM,
      their objects outlive the young generations, and frequent full collections over those
      live objects stall every request; fewer collections keep the stalls rare.

    A long stall fires Redis timeouts and sets the tail latency (see docs/performance.md).
    A server process runs one app, so the process-wide setting is this app's to make.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
    """Build every component, hand them to the requests as typed state, close them after."""
    settings: Settings = app.state.settings
    configure_logging(settings.log_level, json_lines=settings.log_json)
    runtime = await build_runtime(settings, app.state.metrics, app.state.lifecycle)
    app.state.runtime = runtime  # for tests and debugging; routes read the typed state only
    tune_garbage_collector()
    tracing: Tracing | None = app.state.tracing
    try:
        if tracing is not None:
            turns = runtime.turns
            tracing.start(
                engine=turns.engine if isinstance(turns, SqlTurnRepository) else None,
                asyncpg=isinstance(turns, PostgresTurnRepository),
                http_clients=runtime.gateway.clients,
            )
        logger.info(
            "agentserve ready",
            extra={
                "agents": sorted(runtime.pools),
                "database": make_url(settings.database_url).render_as_string(hide_password=True),
                "tracing": tracing is not None,
            },
        )
        yield runtime.state
    finally:
        app.state.lifecycle.draining = True
        await runtime.aclose()
        gc.unfreeze()  # what this app built may be collected once it is gone (tests, reloads)
        if tracing is not None:
            await tracing.shutdown()
        logger.info("agentserve stopped")


def operation_id(route: APIRoute) -> str:
    """Client generators turn operation ids into method names: keep them short."""
    return route.name


def create_app(
    settings: Settings | None = None, *, span_exporter: SpanExporter | None = None
) -> FastAPI:
    """The app for `settings` (default: from the environment).

    `span_exporter` (tests) turns tracing on and receives every span, synchronously;
    otherwise tracing is on only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    """
    settings = settings or Settings()
    # Swagger UI and ReDoc from the assets fastapi-offline ships (/static-offline-docs): no CDN.
    app = FastAPIOffline(
        title="agentserve",
        version=__version__,
        summary="Pooled LLM agents over HTTP, with persistent sessions.",
        lifespan=lifespan,
        # operation ids are the route functions' names: `query`, `secure_query`, ...
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.lifecycle = Lifecycle()
    app.state.metrics = Metrics(CollectorRegistry(auto_describe=True))
    app.state.tracing = Tracing.from_settings(settings, span_exporter=span_exporter)
    if app.state.tracing is not None:
        # First, so its tracer-scope middleware is the innermost; the server span wraps all.
        app.state.tracing.instrument_app(app)

    install_error_handlers(app)
    openai.install_error_handlers(app)  # /v1 answers errors in OpenAI's shape
    if settings.anonymous_query_enabled:
        app.include_router(query.router)
    app.include_router(query.secure_router)
    app.include_router(sessions.router)
    app.include_router(openai.router)
    app.include_router(ops.router)

    # Inside the metrics and request-id middleware, so 413s and 500s are counted and carry
    # X-Request-ID.
    app.add_middleware(
        RequestEnvelope,
        instance=settings.instance_name or socket.gethostname(),
        max_body_bytes=settings.max_body_bytes,
    )
    app.add_middleware(DocsContentPolicy, paths=("/docs", "/redoc"))
    registry = app.state.metrics.registry
    Instrumentator(
        registry=registry,
        excluded_handlers=["/metrics", "/health", "/ready"],
    ).instrument(app, metric_namespace="agentserve").expose(
        app, endpoint="/metrics", include_in_schema=True, tags=["operations"]
    )
    app.add_middleware(
        CorrelationIdMiddleware,
        header_name="X-Request-ID",
        validator=valid_request_id,
    )
    # Outermost: the client address is settled before anything reads it.
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app`: the app for the environment's settings, made on first access
    so that importing this module builds nothing (its components wait for the lifespan)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    application = create_app()
    globals()["app"] = application
    return application
