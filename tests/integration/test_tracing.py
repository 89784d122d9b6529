"""Tracing end to end: one /query, its span tree, the log lines inside it, and tracing off.

The app gets an InMemorySpanExporter (`create_app(settings, span_exporter=...)`, so spans
are exported synchronously as they end) and runs with its lifespan, through httpx's
ASGITransport, like every integration test.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from app.config import Settings
from app.main import create_app
from app.observability.tracing import TracerScope
from tests.conftest import make_settings
from tests.support.simserver import running_simulator

pytestmark = pytest.mark.integration

WHAT_IS = {"agent": "tools", "message": "What is 2+3?"}


@asynccontextmanager
async def traced_app(
    settings: Settings, exporter: InMemorySpanExporter | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, span_exporter=exporter)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def tracing_settings(**overrides: Any) -> Settings:
    overrides.setdefault("otel_exporter_otlp_endpoint", None)
    return make_settings(**overrides)


class Tree:
    """The finished spans of one trace, indexed for parent/child questions."""

    def __init__(self, spans: tuple[ReadableSpan, ...]) -> None:
        self.spans = spans
        self.by_id = {span.context.span_id: span for span in spans if span.context is not None}

    def named(self, name: str) -> list[ReadableSpan]:
        return sorted(
            (span for span in self.spans if span.name == name),
            key=lambda span: span.start_time or 0,
        )

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [span.name for span in self.spans]
        return found[0]

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return None if span.parent is None else self.by_id.get(span.parent.span_id)

    def children(self, span: ReadableSpan) -> list[ReadableSpan]:
        assert span.context is not None
        return sorted(
            (s for s in self.spans if s.parent is not None and s.parent.span_id == span_id(span)),
            key=lambda s: s.start_time or 0,
        )

    def ancestors(self, span: ReadableSpan) -> list[str]:
        names = []
        parent = self.parent(span)
        while parent is not None:
            names.append(parent.name)
            parent = self.parent(parent)
        return names


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_one_query_yields_the_span_tree(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    exporter = InMemorySpanExporter()
    settings = tracing_settings(
        database_url=database_url, redis_url=redis_url, redis_key_prefix=redis_prefix
    )
    async with traced_app(settings, exporter) as (_, client):
        exporter.clear()  # startup (migrations check, pings) is not this test's business
        response = await client.post("/query", json=WHAT_IS)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [step["tool"] for step in body["steps"]] == ["calculator"]
        assert (await client.get("/health")).status_code == 200
        tree = Tree(exporter.get_finished_spans())

    # One trace, rooted at the server span (probes are not traced).
    server = tree.one("POST /query")
    assert server.kind is SpanKind.SERVER
    assert server.parent is None
    assert [span.name for span in tree.spans if span.parent is None] == ["POST /query"]
    assert {trace_id(span) for span in tree.spans} == {trace_id(server)}
    assert attrs(server)["http.route"] == "/query"
    assert attrs(server)["request.id"] == body["request_id"]

    # POST /query → agent.run → llm.call, tool.call, llm.call
    run = tree.one("agent.run")
    assert tree.parent(run) is server
    assert [span.name for span in tree.children(run)] == ["llm.call", "tool.call", "llm.call"]
    run_attrs = attrs(run)
    assert run_attrs["gen_ai.agent.name"] == "tools"
    assert run_attrs["agent.max_steps"] == 4
    assert run_attrs["agent.steps"] == 2
    assert run_attrs["agent.tool_calls"] == 1
    assert run_attrs["agent.finish_reason"] == "stop"
    assert run_attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert run_attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] > 0

    calls = tree.named("llm.call")
    assert len(calls) == 2
    for call in calls:
        call_attrs = attrs(call)
        assert call_attrs["llm.upstream"] == "simulator"
        assert call_attrs["gen_ai.response.model"] == "simulator"
        assert call_attrs["llm.breaker.state"] == "closed"
        assert call_attrs["llm.retries"] == 0
        assert call_attrs["llm.outcome"] == "success"
        assert call_attrs["gen_ai.usage.input_tokens"] > 0
        assert call_attrs["gen_ai.usage.output_tokens"] > 0
        assert call.status.status_code is StatusCode.UNSET
    input_tokens = sum(attrs(call)["gen_ai.usage.input_tokens"] for call in calls)
    assert input_tokens == body["usage"]["prompt_tokens"]
    assert attrs(calls[0])["gen_ai.response.finish_reasons"] == ("tool_calls",)

    tool = tree.one("tool.call")
    assert attrs(tool)["gen_ai.tool.name"] == "calculator"
    assert attrs(tool)["tool.is_error"] is False
    assert attrs(tool)["tool.duration_ms"] >= 0

    # The turn's statements (SQLAlchemy, on either repository) and the cache and limits (Redis),
    # all inside the server span.
    system = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    sql = [span for span in tree.spans if attrs(span).get("db.system") == system]
    statements = [str(attrs(span).get("db.statement", "")) for span in sql]
    assert any("INSERT INTO messages" in statement for statement in statements), statements
    redis = [span for span in tree.spans if attrs(span).get("db.system") == "redis"]
    assert redis
    for span in [*sql, *redis]:
        assert "POST /query" in tree.ancestors(span), span.name
        assert "agent.run" not in tree.ancestors(span), span.name


async def test_llm_http_requests_are_children_of_the_llm_call(tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    with running_simulator() as server:
        settings = tracing_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}",
            db_auto_migrate=True,
            llm_upstreams=[{"name": "sim-http", "kind": "openai", "base_url": server.base_url}],
        )
        async with traced_app(settings, exporter) as (_, client):
            exporter.clear()
            response = await client.post("/query", json=WHAT_IS)
            assert response.status_code == 200, response.text
            tree = Tree(exporter.get_finished_spans())

    calls = tree.named("llm.call")
    assert [attrs(call)["llm.upstream"] for call in calls] == ["sim-http", "sim-http"]
    for call in calls:
        [request] = tree.children(call)
        assert request.kind is SpanKind.CLIENT
        assert request.name == "POST"
        assert str(attrs(request)["http.url"]).endswith("/v1/chat/completions")
        assert attrs(request)["http.status_code"] == 200
        assert trace_id(request) == trace_id(tree.one("POST /query"))


@contextmanager
def json_log_lines() -> Iterator[list[dict[str, Any]]]:
    """The lines the app's own JSON handler writes while the block runs (parsed at exit)."""
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "agentserve")
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        handler.setStream(previous)
        lines.extend(json.loads(line) for line in buffer.getvalue().splitlines() if line)


async def test_log_lines_carry_the_trace_and_span_ids(tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    settings = tracing_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}",
        db_auto_migrate=True,
        log_level="INFO",
        # the simulator fails every second call: the agent's second model call is retried
        sim_error_rate=0.5,
    )
    async with traced_app(settings, exporter) as (_, client):
        exporter.clear()
        with json_log_lines() as lines:
            response = await client.post("/query", json=WHAT_IS)
            assert response.status_code == 200, response.text
        tree = Tree(exporter.get_finished_spans())

    retried = tree.named("llm.call")[1]
    assert attrs(retried)["llm.retries"] == 1
    [event] = retried.events
    assert event.name == "llm.retry"
    assert dict(event.attributes or {}).keys() == {"llm.attempt", "llm.outcome", "llm.wait_s"}
    assert event.attributes is not None
    assert event.attributes["llm.attempt"] == 1
    assert event.attributes["llm.outcome"] == "http_500"

    [retry_line] = [line for line in lines if line["message"] == "retrying LLM call"]
    assert retry_line["trace_id"] == format_trace_id(trace_id(retried))
    assert retry_line["span_id"] == format_span_id(span_id(retried))
    assert retry_line["request_id"] == response.json()["request_id"]
    assert len(retry_line["trace_id"]) == 32
    assert len(retry_line["span_id"]) == 16


async def test_lines_outside_a_span_have_no_trace_ids(tmp_path: Any) -> None:
    settings = tracing_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}",
        db_auto_migrate=True,
        log_level="INFO",
    )
    async with traced_app(settings, InMemorySpanExporter()):
        with json_log_lines() as lines:
            logging.getLogger("tests.tracing").info("outside any request")
    assert lines
    assert lines[0]["message"] == "outside any request"
    assert "trace_id" not in lines[0]
    assert "span_id" not in lines[0]


def otel_middleware_in(app: FastAPI) -> list[str]:
    """Class names of the ASGI middleware chain the app built (it is built at startup)."""
    names = []
    layer: Any = app.middleware_stack
    while layer is not None:
        names.append(type(layer).__name__)
        layer = getattr(layer, "app", None)
    return [name for name in names if "OpenTelemetry" in name or name == "TracerScope"]


def library_patches() -> dict[str, bool]:
    return {
        "httpx": HTTPXClientInstrumentor().is_instrumented_by_opentelemetry,
        "sqlalchemy": SQLAlchemyInstrumentor().is_instrumented_by_opentelemetry,
        "redis": RedisInstrumentor().is_instrumented_by_opentelemetry,
        "httpx_transport": hasattr(httpx.AsyncHTTPTransport.handle_async_request, "__wrapped__"),
    }


NOTHING_PATCHED = dict.fromkeys(("httpx", "sqlalchemy", "redis", "httpx_transport"), False)


async def test_without_endpoint_nothing_is_instrumented(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    settings = tracing_settings(
        database_url=database_url, redis_url=redis_url, redis_key_prefix=redis_prefix
    )
    async with traced_app(settings) as (app, client):
        assert app.state.tracing is None
        assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
        middleware = [getattr(m.cls, "__name__", "") for m in app.user_middleware]
        assert TracerScope.__name__ not in middleware
        assert otel_middleware_in(app) == []
        assert library_patches() == NOTHING_PATCHED
        response = await client.post("/query", json=WHAT_IS)
        assert response.status_code == 200, response.text


async def test_tracing_patches_are_removed_at_shutdown(
    tmp_path: Any, redis_url: str, redis_prefix: str
) -> None:
    settings = tracing_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}",
        db_auto_migrate=True,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
    )
    assert library_patches() == NOTHING_PATCHED
    async with traced_app(settings, InMemorySpanExporter()) as (app, _):
        assert app.state.tracing is not None
        assert otel_middleware_in(app) == ["OpenTelemetryMiddleware", "TracerScope"]
        assert library_patches() == dict.fromkeys(NOTHING_PATCHED, True)
    assert library_patches() == NOTHING_PATCHED


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps what it is sent."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.received.append((self.path, self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def otlp_collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_otlp_endpoint_exports_spans_over_http(tmp_path: Any) -> None:
    with otlp_collector() as (endpoint, received):
        settings = tracing_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}",
            db_auto_migrate=True,
            otel_exporter_otlp_endpoint=endpoint + "/",
            otel_service_name="agentserve-test",
        )
        async with traced_app(settings) as (app, client):
            assert app.state.tracing is not None
            response = await client.post("/query", json=WHAT_IS)
            assert response.status_code == 200, response.text
        # the lifespan's exit flushed the batch processor

    assert received
    assert {(path, content_type) for path, content_type, _ in received} == {
        ("/v1/traces", "application/x-protobuf")
    }
    names: set[str] = set()
    services: set[str] = set()
    for _, _, body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.update(span.name for span in scope_spans.spans)
    assert services == {"agentserve-test"}
    assert {"POST /query", "agent.run", "llm.call", "tool.call"} <= names
