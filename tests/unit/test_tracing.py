"""Unit tests for app.observability.tracing and the spans of Agent and ResilientUpstream.

The agent runs on the gateway's real chain (FallbackChain → ResilientUpstream → simulator),
with a tracer made current by `activate`, the way the app's middleware does per request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer

from app.agents.agent import Agent, AgentEvent, AgentResult, collect
from app.agents.spec import AgentSpec
from app.agents.tools import builtin_registry
from app.config import Settings
from app.llm.gateway import LLMGateway
from app.llm.types import ChatRequest, Completion, LLMUnavailableError
from app.observability.logging import TraceContextFilter
from app.observability.tracing import (
    TracerScope,
    Tracing,
    activate,
    current_tracer,
    otlp_traces_endpoint,
)

WHAT_IS = "What is 2+3?"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "llm_backoff_initial": 0.001,
        "llm_backoff_max": 0.01,
        "llm_max_attempts": 2,
        "otel_exporter_otlp_endpoint": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


@pytest.fixture
def traced(tracer: Tracer) -> Iterator[Tracer]:
    with activate(tracer):
        yield tracer


def make_agent(**overrides: Any) -> Agent:
    gateway = LLMGateway(settings(**overrides))
    spec = AgentSpec(
        name="tools", instructions="Use tools.", tools=("calculator", "current_time"), max_steps=4
    )
    tools = builtin_registry()
    return Agent(
        spec,
        gateway.chain_for(("m",)),
        tools,
        model_id="m",
        tool_schemas=tools.schemas(spec.tools),
    )


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    spans = [span for span in exporter.get_finished_spans() if span.name == name]
    return sorted(spans, key=lambda span: span.start_time or 0)


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = by_name(exporter, name)
    return span


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    spans = [
        span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]
    return [span.name for span in sorted(spans, key=lambda span: span.start_time or 0)]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- off ---------------------------------------------------------------------------------


async def test_off_the_agent_and_the_upstream_hand_back_their_own_generators(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """A tracer exists but is not current (no request scope): no spans, no wrappers."""
    agent = make_agent()
    assert current_tracer() is None
    events = agent.run([], WHAT_IS)
    assert events.ag_code.co_name == "_events"  # type: ignore[attr-defined]
    result = await collect(events)
    assert result.finish_reason == "stop"
    chain = LLMGateway(settings()).chain_for(("m",))
    [(resilient, _)] = chain.links
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="m")
    items = resilient.stream(request)
    assert items.ag_code.co_name == "_stream"  # type: ignore[attr-defined]
    assert isinstance([item async for item in items][-1], Completion)
    assert exporter.get_finished_spans() == ()


def test_unconfigured_settings_mean_no_tracing() -> None:
    assert Tracing.from_settings(settings()) is None
    assert Tracing.from_settings(settings(otel_exporter_otlp_endpoint="")) is None


def test_an_endpoint_or_an_exporter_turns_tracing_on() -> None:
    tracing = Tracing.from_settings(
        settings(
            otel_exporter_otlp_endpoint="http://collector:4318/",
            otel_service_name="svc",
            instance_name="pod-1",
        )
    )
    assert tracing is not None
    assert tracing.otlp_endpoint == "http://collector:4318/"
    resource = tracing.provider.resource.attributes
    assert resource["service.name"] == "svc"
    assert resource["service.instance.id"] == "pod-1"
    assert Tracing.from_settings(settings(), span_exporter=InMemorySpanExporter()) is not None


def test_otlp_http_path_is_appended_to_the_endpoint() -> None:
    assert otlp_traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert otlp_traces_endpoint("http://collector:4318/") == "http://collector:4318/v1/traces"


# --- spans of a run ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_run_is_a_span_with_llm_and_tool_children(
    traced: Tracer, exporter: InMemorySpanExporter, stream: bool
) -> None:
    result = await collect(make_agent().run([], WHAT_IS, stream=stream))

    run = only(exporter, "agent.run")
    assert run.parent is None
    assert children(exporter, run) == ["llm.call", "tool.call", "llm.call"]
    assert attrs(run) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "tools",
        "gen_ai.request.model": "m",
        "agent.max_steps": 4,
        "agent.stream": stream,
        "agent.finish_reason": "stop",
        "agent.steps": 2,
        "agent.tool_calls": 1,
        "gen_ai.response.model": "simulator",
        "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": result.usage.completion_tokens,
    }
    first, second = by_name(exporter, "llm.call")
    assert attrs(first)["llm.upstream"] == "simulator"
    assert attrs(first)["gen_ai.request.model"] == "m"
    assert attrs(first)["llm.breaker.state"] == "closed"
    assert attrs(first)["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert attrs(second)["gen_ai.response.finish_reasons"] == ("stop",)
    assert (
        attrs(first)["gen_ai.usage.input_tokens"] + attrs(second)["gen_ai.usage.input_tokens"]
        == result.usage.prompt_tokens
    )
    tool = only(exporter, "tool.call")
    assert attrs(tool)["gen_ai.tool.name"] == "calculator"
    assert attrs(tool)["tool.is_error"] is False
    assert tool.status.status_code is StatusCode.UNSET


async def test_the_span_is_current_for_the_run_but_never_for_the_consumer(
    traced: Tracer, exporter: InMemorySpanExporter
) -> None:
    seen: list[trace.Span] = []
    with traced.start_as_current_span("request") as outer:
        async for _event in make_agent().run([], WHAT_IS, stream=True):
            seen.append(trace.get_current_span())
    assert seen
    assert all(span is outer for span in seen)
    assert trace.get_current_span() is trace.INVALID_SPAN
    run = only(exporter, "agent.run")
    assert run.parent is not None
    assert run.parent.span_id == outer.get_span_context().span_id


async def test_the_run_span_ends_with_the_result_even_if_nobody_reads_further(
    traced: Tracer, exporter: InMemorySpanExporter
) -> None:
    events = make_agent().run([], WHAT_IS)
    async for event in events:
        if isinstance(event, AgentResult):
            assert by_name(exporter, "agent.run")  # ended before the result was handed on
            break
    await events.aclose()  # type: ignore[attr-defined]
    assert len(by_name(exporter, "agent.run")) == 1


async def test_an_abandoned_run_ends_its_span_without_an_error(
    traced: Tracer, exporter: InMemorySpanExporter
) -> None:
    events = make_agent().run([], WHAT_IS, stream=True)
    first: AgentEvent = await anext(events)
    assert first is not None
    await events.aclose()  # type: ignore[attr-defined]
    run = only(exporter, "agent.run")
    assert run.status.status_code is StatusCode.UNSET
    assert "agent.finish_reason" not in attrs(run)
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_llm_call_is_an_error_with_its_retries(
    traced: Tracer, exporter: InMemorySpanExporter, stream: bool
) -> None:
    agent = make_agent(sim_error_rate=1.0, sim_error_status=503)
    with pytest.raises(LLMUnavailableError):
        await collect(agent.run([], WHAT_IS, stream=stream))

    call = only(exporter, "llm.call")
    assert call.status.status_code is StatusCode.ERROR
    assert attrs(call)["llm.outcome"] == "http_503"
    assert attrs(call)["error.type"] == "http_503"
    assert attrs(call)["llm.retries"] == 1
    assert [event.name for event in call.events] == ["llm.retry", "exception"]
    retry = dict(call.events[0].attributes or {})
    assert retry["llm.attempt"] == 1
    assert retry["llm.outcome"] == "http_503"
    assert "gen_ai.usage.input_tokens" not in attrs(call)

    run = only(exporter, "agent.run")
    assert run.status.status_code is StatusCode.ERROR
    assert attrs(run)["error.type"] == "LLMUnavailableError"
    assert children(exporter, run) == ["llm.call"]


async def test_a_tool_error_marks_the_tool_span(
    traced: Tracer, exporter: InMemorySpanExporter
) -> None:
    result = await collect(make_agent().run([], "what is 1/0"))
    assert result.steps[0].is_error
    tool = only(exporter, "tool.call")
    assert tool.status.status_code is StatusCode.ERROR
    assert attrs(tool)["tool.is_error"] is True
    assert only(exporter, "agent.run").status.status_code is StatusCode.UNSET


# --- the request scope and the log filter ------------------------------------------------


async def test_tracer_scope_sets_the_tracer_for_http_requests_only(tracer: Tracer) -> None:
    seen: list[Tracer | None] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_tracer())

    async def nothing() -> Any:
        return {}

    async def ignore(message: Any) -> None:
        return None

    scope_app = TracerScope(inner, tracer=tracer)
    await scope_app({"type": "http", "path": "/"}, nothing, ignore)
    await scope_app({"type": "lifespan"}, nothing, ignore)
    assert seen == [tracer, None]
    assert current_tracer() is None


def record() -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)


def test_log_records_get_the_ids_of_the_current_span(tracer: Tracer) -> None:
    log_filter = TraceContextFilter()
    outside = record()
    assert log_filter.filter(outside)
    assert not hasattr(outside, "trace_id")
    assert not hasattr(outside, "span_id")

    with tracer.start_as_current_span("work") as span:
        inside = record()
        assert log_filter.filter(inside)
    context = span.get_span_context()
    assert getattr(inside, "trace_id", None) == f"{context.trace_id:032x}"
    assert getattr(inside, "span_id", None) == f"{context.span_id:016x}"
