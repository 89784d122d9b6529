"""The LLM client stack against the simulator's HTTP server over a real loopback socket.

Built the way the app builds it: build_http_client -> OpenAICompatibleModel ->
ResilientUpstream(CircuitBreaker, RetryPolicy) -> FallbackChain / LLMGateway. The simulator
runs in a uvicorn server on another thread (tests/support/simserver.py), so timeouts, connection
handling, Retry-After headers and SSE streaming are the real thing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, cast

import httpx
import orjson
import pytest

from app.agents.tools import builtin_registry
from app.config import Settings, UpstreamConfig
from app.domain import Usage
from app.llm.gateway import LLMGateway
from app.llm.openai_compat import OpenAICompatibleModel, build_http_client
from app.llm.resilient import FallbackChain, ResilientUpstream, RetryPolicy
from app.llm.simulator import Simulator, SimulatorKnobs
from app.llm.types import (
    CallNotPermittedError,
    ChatRequest,
    Completion,
    CompletionDelta,
    LLMError,
    LLMUnavailableError,
)
from app.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from tests.support.simserver import SimServer, running_simulator, unused_port

MAX_ATTEMPTS = 3
FAST_POLICY = RetryPolicy(
    max_attempts=MAX_ATTEMPTS,
    backoff_initial=0.001,
    backoff_max=0.01,
    attempt_timeout=2.0,
    deadline=5.0,
)
LENIENT_BREAKER = BreakerConfig(sliding_window_size=100, minimum_number_of_calls=100)


def ask(text: str = "hello over a socket", **extra: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], model="gpt-x", **extra)


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read through a call so mypy does not narrow it between reads."""
    return breaker.state


class RecordingObserver:
    """LLMObserver that remembers every attempt outcome and retry."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []
        self.retries: list[str] = []
        self.usage: list[Usage] = []

    def on_attempt(self, upstream: str, model: str, outcome: str, duration: float) -> None:
        self.attempts.append((upstream, outcome))

    def on_usage(self, upstream: str, model: str, usage: Usage) -> None:
        self.usage.append(usage)

    def on_retry(self, upstream: str) -> None:
        self.retries.append(upstream)


# ---------------------------------------------------------------------------------------
# Servers (one per module, reset for every test) and the client factory


@pytest.fixture(scope="module")
def _primary_server() -> Iterator[SimServer]:
    with running_simulator() as server:
        yield server


@pytest.fixture(scope="module")
def _fallback_server() -> Iterator[SimServer]:
    with running_simulator() as server:
        yield server


def _fresh(server: SimServer) -> SimServer:
    server.simulator.knobs = SimulatorKnobs()
    server.simulator.reset()
    return server


@pytest.fixture
def sim(_primary_server: SimServer) -> SimServer:
    return _fresh(_primary_server)


@pytest.fixture
def sim2(_fallback_server: SimServer) -> SimServer:
    return _fresh(_fallback_server)


MakeUpstream = Callable[..., ResilientUpstream]


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    """Factory for ResilientUpstreams over real httpx clients; closes every client after."""
    clients: list[httpx.AsyncClient] = []

    def make(
        base_url: str,
        *,
        name: str = "primary",
        llm_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        policy: RetryPolicy = FAST_POLICY,
        breaker: BreakerConfig = LENIENT_BREAKER,
        observer: RecordingObserver | None = None,
    ) -> ResilientUpstream:
        settings = Settings(llm_timeout=llm_timeout, llm_connect_timeout=connect_timeout)
        client = build_http_client(settings, UpstreamConfig(name=name, base_url=base_url))
        clients.append(client)
        model = OpenAICompatibleModel(name, client)
        return ResilientUpstream(name, model, CircuitBreaker(name, breaker), policy, observer)

    yield make
    for client in clients:
        await client.aclose()
    assert all(client.is_closed for client in clients)


@pytest.fixture
async def raw_model(sim: SimServer) -> AsyncIterator[OpenAICompatibleModel]:
    """OpenAICompatibleModel alone (no retries, no breaker) on the primary server."""
    client = build_http_client(Settings(), UpstreamConfig(name="primary", base_url=sim.base_url))
    try:
        yield OpenAICompatibleModel("primary", client)
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------
# The helper itself


def test_simserver_serves_the_control_routes(sim: SimServer) -> None:
    assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
    models = httpx.get(f"{sim.base_url}/models", timeout=5.0).json()
    assert [model["id"] for model in models["data"]] == ["simulator"]

    assert sim.put_knobs(error_rate=0.5, latency_ms=1)["error_rate"] == 0.5
    assert sim.simulator.knobs == SimulatorKnobs(error_rate=0.5, latency_ms=1.0)
    assert sim.stats() == {"calls": 0, "streams_open": 0, "knobs": sim.simulator.knobs.as_dict()}

    bad = httpx.put(f"{sim.root_url}/sim/knobs", json={"error_rate": 2}, timeout=5.0)
    assert bad.status_code == 422
    assert sim.simulator.knobs.error_rate == 0.5  # unchanged

    sim.simulator.calls = 7
    assert sim.reset()["calls"] == 0
    assert sim.calls == 0


def test_simserver_runs_a_given_simulator_and_stops() -> None:
    simulator = Simulator()
    with running_simulator(SimulatorKnobs(latency_ms=2), simulator=simulator) as server:
        assert server.simulator is simulator
        assert simulator.knobs.latency_ms == 2.0
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=5.0,
        )
        assert response.status_code == 200
        assert simulator.calls == 1
        url = server.root_url
    assert server.server.should_exit
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/sim/stats", timeout=1.0)


# ---------------------------------------------------------------------------------------
# Happy path


async def test_completion_over_the_socket(sim: SimServer, make_upstream: MakeUpstream) -> None:
    observer = RecordingObserver()
    upstream = make_upstream(sim.base_url, observer=observer)

    completion = await upstream.complete(ask("hello over a socket"))

    assert completion.model == "simulator"
    assert completion.upstream == "primary"
    assert completion.content == (
        '[simulator] You said: "hello over a socket". This is a simulated answer, not a real model.'
    )
    assert completion.tool_calls == []
    assert completion.finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert sim.calls == 1
    assert observer.attempts == [("primary", "success")]
    assert observer.usage == [completion.usage]
    assert upstream.breaker.snapshot().buffered_calls == 1


async def test_tool_call_round_trip(sim: SimServer, make_upstream: MakeUpstream) -> None:
    upstream = make_upstream(sim.base_url)
    tools = builtin_registry().schemas(["calculator"])
    messages: list[dict[str, Any]] = [{"role": "user", "content": "what is 6*7"}]

    first = await upstream.complete(ChatRequest(messages=messages, model="gpt-x", tools=tools))

    assert first.content is None
    assert first.finish_reason == "tool_calls"
    assert [call.name for call in first.tool_calls] == ["calculator"]
    call = first.tool_calls[0]
    assert orjson.loads(call.arguments) == {"expression": "6*7"}
    assert call.id.startswith("call_")
    assert first.usage.completion_tokens > 0

    messages.append(first.to_message())
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "42"})
    final = await upstream.complete(ChatRequest(messages=messages, model="gpt-x", tools=tools))

    assert final.tool_calls == []
    assert final.content == "[simulator] calculator returned 42."
    assert sim.calls == 2


async def test_stream_deltas_concatenate_to_the_completion(
    sim: SimServer, raw_model: OpenAICompatibleModel
) -> None:
    items = [item async for item in raw_model.stream(ask("stream me a few words please"))]

    *deltas, final = items
    assert isinstance(final, Completion)
    assert len(deltas) > 1
    assert all(isinstance(delta, CompletionDelta) for delta in deltas)
    text = "".join(delta.content for delta in deltas if isinstance(delta, CompletionDelta))
    assert final.content is not None
    assert text == final.content
    assert final.content.startswith("[simulator] You said:")
    assert final.model == "simulator"
    assert final.upstream == "primary"
    assert final.usage.completion_tokens > 0  # stream_options.include_usage honoured
    assert sim.calls == 1

    # Same answer as the non-streamed call.
    assert (await raw_model.complete(ask("stream me a few words please"))).content == text


async def test_stream_of_tool_calls(sim: SimServer, raw_model: OpenAICompatibleModel) -> None:
    tools = builtin_registry().schemas(["calculator"])
    items = [item async for item in raw_model.stream(ask("what is (2+3)*4", tools=tools))]

    assert len(items) == 1  # no text deltas, just the final completion
    final = items[0]
    assert isinstance(final, Completion)
    assert final.content is None
    assert [(c.name, orjson.loads(c.arguments)) for c in final.tool_calls] == [
        ("calculator", {"expression": "(2+3)*4"})
    ]


async def test_resilient_stream_records_success(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    observer = RecordingObserver()
    upstream = make_upstream(sim.base_url, observer=observer)

    items = [item async for item in upstream.stream(ask("streamed through the breaker"))]

    final = items[-1]
    assert isinstance(final, Completion)
    assert "".join(i.content for i in items if isinstance(i, CompletionDelta)) == final.content
    assert observer.attempts == [("primary", "success")]
    assert upstream.breaker.snapshot().buffered_calls == 1


# ---------------------------------------------------------------------------------------
# Failures: status codes, timeouts, deadline, connect errors


async def test_500_is_retried_max_attempts_then_raised(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0, error_status=500)
    observer = RecordingObserver()
    upstream = make_upstream(sim.base_url, observer=observer)

    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())

    error = caught.value
    assert error.kind == "status"
    assert error.status_code == 500
    assert error.upstream == "primary"
    assert error.retryable
    assert "simulated failure" in str(error)
    assert sim.calls == MAX_ATTEMPTS
    assert observer.attempts == [("primary", "http_500")] * MAX_ATTEMPTS
    assert len(observer.retries) == MAX_ATTEMPTS - 1
    assert upstream.breaker.snapshot().failed_calls == MAX_ATTEMPTS


async def test_streamed_500_is_retried_then_raised(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0, error_status=503)
    upstream = make_upstream(sim.base_url)

    with pytest.raises(LLMError) as caught:
        async for _ in upstream.stream(ask()):
            pass

    assert caught.value.kind == "status"
    assert caught.value.status_code == 503
    assert sim.calls == MAX_ATTEMPTS


async def test_429_retry_after_is_parsed_and_honoured(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0, error_status=429, retry_after=0.2)
    upstream = make_upstream(sim.base_url)

    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())
    elapsed = time.perf_counter() - started

    error = caught.value
    assert error.kind == "status"
    assert error.status_code == 429
    assert error.retry_after == pytest.approx(0.2)
    assert error.retryable
    assert sim.calls == MAX_ATTEMPTS
    assert elapsed >= 0.2 * (MAX_ATTEMPTS - 1)
    assert elapsed < 2.0


async def test_hanging_upstream_times_out_after_retries(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(hang=True)
    policy = RetryPolicy(
        max_attempts=MAX_ATTEMPTS,
        backoff_initial=0.001,
        backoff_max=0.01,
        attempt_timeout=0.2,
        deadline=5.0,
    )
    observer = RecordingObserver()
    upstream = make_upstream(sim.base_url, llm_timeout=0.2, policy=policy, observer=observer)

    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())
    elapsed = time.perf_counter() - started

    assert caught.value.kind == "timeout"
    assert caught.value.retryable
    assert sim.calls == MAX_ATTEMPTS  # every attempt reached the server
    assert observer.attempts == [("primary", "timeout")] * MAX_ATTEMPTS
    assert 0.2 * MAX_ATTEMPTS * 0.9 <= elapsed < 2.0


async def test_hanging_stream_times_out_after_retries(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(hang=True)
    policy = RetryPolicy(
        max_attempts=MAX_ATTEMPTS,
        backoff_initial=0.001,
        backoff_max=0.01,
        attempt_timeout=0.1,
        deadline=5.0,
    )
    upstream = make_upstream(sim.base_url, llm_timeout=0.1, policy=policy)

    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        async for _ in upstream.stream(ask()):
            pass

    assert caught.value.kind == "timeout"
    assert sim.calls == MAX_ATTEMPTS
    assert time.perf_counter() - started < 2.0


async def test_hanging_upstream_hits_the_per_call_deadline(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(hang=True)
    policy = RetryPolicy(
        max_attempts=MAX_ATTEMPTS,
        backoff_initial=0.001,
        backoff_max=0.01,
        attempt_timeout=0.2,
        deadline=0.35,  # < attempts * attempt_timeout = 0.6
    )
    upstream = make_upstream(sim.base_url, llm_timeout=5.0, policy=policy)

    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())
    elapsed = time.perf_counter() - started

    assert caught.value.kind == "deadline"
    assert caught.value.upstream == "primary"
    assert sim.calls == 2  # the second attempt was cut short by the deadline
    assert 0.35 <= elapsed < 0.6
    # The cancelled attempt gave its permit back and recorded nothing; the first timed out.
    assert upstream.breaker.snapshot().failed_calls == 1


async def test_connect_error_is_retryable_and_retried(make_upstream: MakeUpstream) -> None:
    observer = RecordingObserver()
    upstream = make_upstream(f"http://127.0.0.1:{unused_port()}/v1", observer=observer)

    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())

    assert caught.value.kind == "connect"
    assert caught.value.retryable
    assert observer.attempts == [("primary", "connect")] * MAX_ATTEMPTS
    assert upstream.breaker.snapshot().failed_calls == MAX_ATTEMPTS
    assert time.perf_counter() - started < 2.0


async def test_400_is_not_retried_and_not_a_breaker_failure(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0, error_status=400)
    observer = RecordingObserver()
    strict = BreakerConfig(sliding_window_size=2, minimum_number_of_calls=2)
    upstream = make_upstream(sim.base_url, breaker=strict, observer=observer)

    for expected_calls in range(1, 5):
        with pytest.raises(LLMError) as caught:
            await upstream.complete(ask())
        assert caught.value.kind == "status"
        assert caught.value.status_code == 400
        assert not caught.value.retryable
        assert sim.calls == expected_calls  # one call each, no retries

    assert observer.retries == []
    assert observer.attempts == [("primary", "http_400")] * 4
    snapshot = upstream.breaker.snapshot()
    assert snapshot.state is BreakerState.CLOSED
    assert snapshot.buffered_calls == 0
    assert snapshot.failed_calls == 0


async def test_invalid_request_is_rejected_without_counting(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    raw = httpx.post(
        f"{sim.base_url}/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=5.0,
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"

    observer = RecordingObserver()
    upstream = make_upstream(sim.base_url, observer=observer)
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ChatRequest(messages=[], model="gpt-x"))
    assert caught.value.status_code == 400
    assert "non-empty" in str(caught.value)

    assert observer.attempts == [("primary", "http_400")]  # not retried
    assert sim.calls == 0  # rejected requests are not counted by the simulator
    assert upstream.breaker.snapshot().buffered_calls == 0


# ---------------------------------------------------------------------------------------
# Circuit breaker and fallback


async def test_breaker_opens_stops_io_and_recovers(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0)
    config = BreakerConfig(
        sliding_window_size=4,
        minimum_number_of_calls=4,
        wait_duration_in_open_state=0.3,
        permitted_number_of_calls_in_half_open_state=2,
    )
    upstream = make_upstream(sim.base_url, breaker=config)
    breaker = upstream.breaker

    # First call: three failed attempts, window not full yet.
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())
    assert caught.value.status_code == 500
    assert state(breaker) is BreakerState.CLOSED
    assert sim.calls == 3

    # Second call: the 4th failure opens the breaker; the next attempt is refused at once.
    with pytest.raises(CallNotPermittedError):
        await upstream.complete(ask())
    assert state(breaker) is BreakerState.OPEN
    assert sim.calls == 4
    assert 0.0 < breaker.retry_after() <= 0.3

    # While open: refused immediately, no I/O.
    started = time.perf_counter()
    for _ in range(3):
        with pytest.raises(CallNotPermittedError) as refused:
            await upstream.complete(ask())
        assert refused.value.kind == "open"
        assert refused.value.retry_after is not None
        assert refused.value.retry_after > 0
    assert time.perf_counter() - started < 0.1
    assert sim.calls == 4
    assert sim.stats()["calls"] == 4
    assert breaker.snapshot().not_permitted_calls == 4

    # The upstream heals (over HTTP) but the breaker still refuses until the wait is over.
    assert sim.put_knobs(error_rate=0)["error_rate"] == 0
    with pytest.raises(CallNotPermittedError):
        await upstream.complete(ask())
    assert sim.calls == 4

    await asyncio.sleep(breaker.retry_after() + 0.02)
    assert state(breaker) is BreakerState.OPEN  # reading never transitions

    probe = await upstream.complete(ask("probe 1"))
    assert probe.upstream == "primary"
    assert state(breaker) is BreakerState.HALF_OPEN
    assert sim.calls == 5

    await upstream.complete(ask("probe 2"))
    assert state(breaker) is BreakerState.CLOSED
    assert sim.calls == 6

    for _ in range(3):
        assert (await upstream.complete(ask())).model == "simulator"
    assert sim.calls == 9
    assert state(breaker) is BreakerState.CLOSED


async def test_failed_half_open_probe_reopens(sim: SimServer, make_upstream: MakeUpstream) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0)
    config = BreakerConfig(
        sliding_window_size=2,
        minimum_number_of_calls=2,
        wait_duration_in_open_state=0.1,
        permitted_number_of_calls_in_half_open_state=1,
    )
    policy = RetryPolicy(max_attempts=1, attempt_timeout=2.0, deadline=5.0)
    upstream = make_upstream(sim.base_url, breaker=config, policy=policy)
    for _ in range(2):
        with pytest.raises(LLMError):
            await upstream.complete(ask())
    assert state(upstream.breaker) is BreakerState.OPEN

    await asyncio.sleep(upstream.breaker.retry_after() + 0.02)
    with pytest.raises(LLMError) as caught:
        await upstream.complete(ask())  # the probe reaches the server and fails
    assert caught.value.status_code == 500
    assert sim.calls == 3
    assert state(upstream.breaker) is BreakerState.OPEN
    assert upstream.breaker.retry_after() > 0.05


async def test_stream_closed_early_gives_the_half_open_permit_back(
    sim: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0)
    config = BreakerConfig(
        sliding_window_size=1,
        minimum_number_of_calls=1,
        wait_duration_in_open_state=0.05,
        permitted_number_of_calls_in_half_open_state=1,
    )
    policy = RetryPolicy(max_attempts=1, attempt_timeout=2.0, deadline=5.0)
    upstream = make_upstream(sim.base_url, breaker=config, policy=policy)
    with pytest.raises(LLMError):
        await upstream.complete(ask())
    assert state(upstream.breaker) is BreakerState.OPEN
    sim.simulator.knobs = SimulatorKnobs()
    await asyncio.sleep(upstream.breaker.retry_after() + 0.02)

    # The half-open probe is a stream whose consumer goes away after the first delta
    # (e.g. the HTTP client of an SSE endpoint disconnected).
    stream = cast(
        AsyncGenerator[CompletionDelta | Completion, None],
        upstream.stream(ask("a probe that is abandoned half way")),
    )
    first = await anext(stream)
    assert isinstance(first, CompletionDelta)
    assert state(upstream.breaker) is BreakerState.HALF_OPEN
    await stream.aclose()

    # The abandoned probe must not hold the only permit forever.
    completion = await upstream.complete(ask())
    assert completion.upstream == "primary"


async def test_fallback_answers_while_primary_is_open(
    sim: SimServer, sim2: SimServer, make_upstream: MakeUpstream
) -> None:
    sim.simulator.knobs = SimulatorKnobs(error_rate=1.0)
    primary_breaker = BreakerConfig(
        sliding_window_size=2, minimum_number_of_calls=2, wait_duration_in_open_state=30.0
    )
    primary = make_upstream(sim.base_url, name="primary", breaker=primary_breaker)
    fallback = make_upstream(sim2.base_url, name="fallback")
    chain = FallbackChain([(primary, "gpt-x"), (fallback, "gpt-x")], unavailable_retry_after=7.0)

    first = await chain.complete(ask())
    assert first.upstream == "fallback"
    assert state(primary.breaker) is BreakerState.OPEN
    opened_at_calls = sim.calls
    assert opened_at_calls == 2  # the 3rd attempt was refused by the open breaker

    for _ in range(3):
        completion = await chain.complete(ask())
        assert completion.upstream == "fallback"
        assert completion.model == "simulator"
    streamed = [item async for item in chain.stream(ask("streamed fallback"))]
    final = streamed[-1]
    assert isinstance(final, Completion)
    assert final.upstream == "fallback"

    assert sim.calls == opened_at_calls  # no more I/O to the open primary
    assert sim2.calls == 5
    assert 29.0 < chain.retry_after() <= 30.0

    # Nothing can answer: 503-style error carrying the primary's time until half-open.
    sim2.simulator.knobs = SimulatorKnobs(error_rate=1.0, error_status=400)
    with pytest.raises(LLMUnavailableError) as caught:
        await chain.complete(ask())
    assert caught.value.retry_after is not None
    assert 29.0 < caught.value.retry_after <= 30.0
    assert "primary" in str(caught.value)
    assert "fallback" in str(caught.value)
    assert sim.calls == opened_at_calls


# ---------------------------------------------------------------------------------------
# The gateway, configured like LLM_UPSTREAMS


async def test_gateway_builds_chains_from_settings(sim: SimServer, sim2: SimServer) -> None:
    settings = Settings(
        llm_upstreams=[
            {"name": "primary", "kind": "openai", "base_url": sim.base_url, "models": ["gpt-x"]},
            {"name": "fallback", "kind": "openai", "base_url": sim2.base_url, "api_key": "k"},
        ],
        llm_max_attempts=2,
        llm_backoff_initial=0.001,
        llm_backoff_max=0.01,
        llm_timeout=2.0,
        llm_deadline=5.0,
    )
    gateway = LLMGateway(settings)
    try:
        assert gateway.simulator is None
        assert [b.name for b in gateway.breakers] == ["primary", "fallback"]

        chain = gateway.chain_for(("gpt-x",))
        assert [(u.name, m) for u, m in chain.links] == [
            ("primary", "gpt-x"),
            ("fallback", "gpt-x"),
        ]
        assert gateway.chain_for(("gpt-x",)) is chain  # cached

        only_fallback = gateway.chain_for(("gpt-y",))
        assert [(u.name, m) for u, m in only_fallback.links] == [("fallback", "gpt-y")]

        both = gateway.chain_for(("gpt-x", "gpt-y"))
        assert [(u.name, m) for u, m in both.links] == [
            ("primary", "gpt-x"),
            ("fallback", "gpt-x"),
            ("fallback", "gpt-y"),
        ]
        # One breaker per upstream, shared by every chain through it.
        assert both.links[0][0] is chain.links[0][0]
        assert both.links[1][0] is only_fallback.links[0][0]

        answer = await chain.complete(ask())
        assert answer.upstream == "primary"
        assert (sim.calls, sim2.calls) == (1, 0)

        answer = await only_fallback.complete(ask())
        assert answer.upstream == "fallback"
        assert (sim.calls, sim2.calls) == (1, 1)

        # Primary failing -> retried llm_max_attempts times, then the fallback answers.
        sim.simulator.knobs = SimulatorKnobs(error_rate=1.0)
        answer = await chain.complete(ask())
        assert answer.upstream == "fallback"
        assert (sim.calls, sim2.calls) == (3, 2)
    finally:
        await gateway.aclose()
    clients = list(gateway.clients)
    assert len(clients) == 2
    assert all(client.is_closed for client in clients)
    with pytest.raises(LLMUnavailableError, match="closed"):
        await chain.complete(ask())  # closed clients cannot send


async def test_gateway_refuses_a_model_nobody_serves(sim: SimServer) -> None:
    settings = Settings(
        llm_upstreams=[{"name": "primary", "base_url": sim.base_url, "models": ["gpt-x"]}]
    )
    gateway = LLMGateway(settings)
    try:
        with pytest.raises(ValueError, match="gpt-z"):
            gateway.chain_for(("gpt-z",))
    finally:
        await gateway.aclose()
