"""OpenTelemetry tracing: off unless configured, app-scoped when on.

**When.** On when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP/HTTP to `<endpoint>/v1/traces`,
batched) or when a test hands `create_app` a `span_exporter`. Otherwise
`Tracing.from_settings` returns None: nothing is built or instrumented, and every span site
finds `current_tracer() is None` at the cost of one ContextVar read.

**Whose provider.** Each app has its own TracerProvider, never installed as the global one,
so two apps in one process (tests) never share spans. `create_app` instruments FastAPI (its
middleware must exist before startup); the lifespan starts and stops the span processors
(`Tracing.start`, `Tracing.shutdown`).

**How the code finds the tracer.** `Agent` and `ResilientUpstream` know nothing of tracing:
the `TracerScope` middleware puts the tracer in a ContextVar for each request, and tasks
started inside the request copy it. Not a module global, which two apps would share; not set
in the lifespan, which runs in a task whose context requests never see.

**Libraries.** `Tracing.start` instruments httpx, Redis and the database driver (asyncpg,
or SQLAlchemy). Their patches are process-wide (so they reach clients built inside
components, like the JWKS fetcher's), and
`Tracing.shutdown` removes those this app applied. One traced app per process is the design:
a second one leaves the first one's patches alone, so its httpx and Redis spans go to the
first app's provider and its SQL is not traced.

**Async generators.** `traced_iteration` makes a span current only during each `anext`,
never across a `yield`: a context attached across a yield would leak into the consumer and
fail to detach when the generator is closed from another task (as the garbage collector
closes an abandoned stream).

At load this module imports only the OpenTelemetry API and SDK, so `agents/` and `llm/` use
it without pulling in FastAPI or the instrumentors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from app import __version__
from app.config import Settings

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI
    from sqlalchemy.ext.asyncio import AsyncEngine
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRACER_NAME = "agentserve"
EXCLUDED_URLS = "/health$,/ready$,/metrics$"
"""Probes and scrapes: a span each every few seconds would drown the traces that matter."""


class Instrumentor(Protocol):
    """What this module uses of OpenTelemetry's BaseInstrumentor (an untyped module)."""

    @property
    def is_instrumented_by_opentelemetry(self) -> bool: ...

    def instrument(self, **kwargs: Any) -> Any: ...

    def uninstrument(self, **kwargs: Any) -> Any: ...


_current_tracer: ContextVar[Tracer | None] = ContextVar("agentserve_tracer", default=None)


def current_tracer() -> Tracer | None:
    """The tracer of the app serving this request; None when tracing is off (the fast path)."""
    return _current_tracer.get()


@contextmanager
def activate(tracer: Tracer | None) -> Iterator[None]:
    """Make `tracer` the current one in this context (the middleware's job; also for tests)."""
    token = _current_tracer.set(tracer)
    try:
        yield
    finally:
        _current_tracer.reset(token)


def record_error(span: Span, error: BaseException) -> None:
    """ERROR status plus the exception as an event; `error.type` as OpenTelemetry names it."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.set_attribute("error.type", type(error).__qualname__)


async def traced_iteration(
    tracer: Tracer,
    name: str,
    attributes: Mapping[str, AttributeValue],
    items: AsyncIterator[T],
    *,
    is_last: Callable[[Span, T], bool],
    on_error: Callable[[Span, Exception], None] | None = None,
) -> AsyncIterator[T]:
    """Yield `items` inside a span that is current only while `items` runs.

    The span starts at the first `anext`. `is_last(span, item)` may annotate the span and
    says whether `item` is the final one: then the span ends before the item is handed on,
    since consumers (`collect`) stop reading at the final item. An exception from `items`
    marks the span ERROR (then `on_error` may add attributes of its own) and propagates.
    """
    span = tracer.start_span(name, attributes=attributes)
    span_context = trace.set_span_in_context(span)
    ended = False
    try:
        while True:
            token = otel_context.attach(span_context)
            try:
                item = await anext(items, _DONE)
            finally:
                otel_context.detach(token)
            if isinstance(item, _Done):
                return
            if is_last(span, item):
                ended = True
                span.end()
            yield item
    except Exception as exc:
        if not ended:
            record_error(span, exc)
            if on_error is not None:
                on_error(span, exc)
        raise
    finally:
        if not ended:
            span.end()
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


class _Done:
    """End-of-iteration sentinel (an item of its own type, so `anext` never confuses it)."""


_DONE = _Done()


class TracerScope:
    """ASGI middleware: the app's tracer is current while a request is served.

    Also puts the request id (X-Request-ID, from asgi-correlation-id, which runs outside
    this middleware) on the server span, so a trace leads to the request's log lines.
    """

    def __init__(
        self,
        app: ASGIApp,
        tracer: Tracer,
        request_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.request_id()
        if request_id:
            trace.get_current_span().set_attribute("request.id", request_id)
        token = _current_tracer.set(self.tracer)
        try:
            await self.app(scope, receive, send)
        finally:
            _current_tracer.reset(token)


def otlp_traces_endpoint(base: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; OTLP/HTTP adds the path."""
    return base.rstrip("/") + "/v1/traces"


class Tracing:
    """One app's tracing: its provider, its tracer, and what it instrumented."""

    def __init__(
        self,
        provider: TracerProvider,
        *,
        otlp_endpoint: str | None = None,
        span_exporter: SpanExporter | None = None,
        redis: bool = False,
    ) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(TRACER_NAME, __version__)
        self.otlp_endpoint = otlp_endpoint
        self._span_exporter = span_exporter
        self._redis = redis
        self._processors: list[SpanProcessor] = []
        self._instrumented: list[Instrumentor] = []
        self._clients: list[httpx.AsyncClient] = []

    @classmethod
    def from_settings(
        cls, settings: Settings, *, span_exporter: SpanExporter | None = None
    ) -> Tracing | None:
        """None (tracing off) unless an OTLP endpoint is configured or an exporter given."""
        endpoint = settings.otel_exporter_otlp_endpoint or None
        if endpoint is None and span_exporter is None:
            return None
        attributes: dict[str, AttributeValue] = {
            "service.name": settings.otel_service_name,
            "service.version": __version__,
        }
        if settings.instance_name:
            attributes["service.instance.id"] = settings.instance_name
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        return cls(
            provider,
            otlp_endpoint=endpoint,
            span_exporter=span_exporter,
            redis=bool(settings.redis_url),
        )

    def instrument_app(self, app: FastAPI) -> None:
        """In create_app, before startup: the server span and the tracer scope middleware."""
        from asgi_correlation_id import correlation_id
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        app.add_middleware(TracerScope, tracer=self.tracer, request_id=correlation_id.get)
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=EXCLUDED_URLS,
            exclude_spans=["receive", "send"],
        )

    def start(
        self,
        *,
        engine: AsyncEngine | None = None,
        asyncpg: bool = False,
        http_clients: Sequence[httpx.AsyncClient] = (),
    ) -> None:
        """In the lifespan: span processors, then httpx (the upstream clients, whose
        transport is the app's own, and every stock httpx client), the database driver the
        storage runs on (SQLAlchemy's `engine`, or asyncpg) and Redis."""
        if self._span_exporter is not None:
            self._add_processor(SimpleSpanProcessor(self._span_exporter))
        if self.otlp_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=otlp_traces_endpoint(self.otlp_endpoint))
            self._add_processor(BatchSpanProcessor(exporter))

        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        self._instrument(HTTPXClientInstrumentor())
        for client in http_clients:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)
            self._clients.append(client)
        if engine is not None:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            # The instrumentor pins sqlalchemy < 2.1 but works with 2.1 (the integration
            # test checks its spans), so its version check is skipped.
            self._instrument(
                SQLAlchemyInstrumentor(), engine=engine.sync_engine, skip_dep_check=True
            )
        if asyncpg:
            from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

            self._instrument(AsyncPGInstrumentor())  # type: ignore[no-untyped-call]
        if self._redis:
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            self._instrument(RedisInstrumentor())

    def _add_processor(self, processor: SpanProcessor) -> None:
        self.provider.add_span_processor(processor)
        self._processors.append(processor)

    def _instrument(self, instrumentor: Instrumentor, **options: Any) -> None:
        if instrumentor.is_instrumented_by_opentelemetry:
            logger.info(
                "tracing: %s already applied elsewhere in this process; left as it is",
                type(instrumentor).__name__,
            )
            return
        instrumentor.instrument(tracer_provider=self.provider, **options)
        self._instrumented.append(instrumentor)

    async def shutdown(self) -> None:
        """In the lifespan's exit: undo the patches, then flush and stop the exporters."""
        if self._clients:
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            while self._clients:
                HTTPXClientInstrumentor.uninstrument_client(self._clients.pop())
        while self._instrumented:
            instrumentor = self._instrumented.pop()
            if instrumentor.is_instrumented_by_opentelemetry:  # False if its version check failed
                instrumentor.uninstrument()
        if self._processors:
            self._processors.clear()
            # A batch flush is blocking network I/O: keep it off the event loop.
            await asyncio.to_thread(self.provider.shutdown)
