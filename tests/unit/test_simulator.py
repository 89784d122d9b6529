"""Tests of the deterministic simulator: answer rule, knobs, chat model and HTTP app."""

from __future__ import annotations

import asyncio
import random
import re
import string
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from app.llm.simulator import (
    SimulatedError,
    Simulator,
    SimulatorChatModel,
    SimulatorKnobs,
    _truncate,
    count_tokens,
    create_app,
    prompt_tokens,
)
from app.llm.types import ChatRequest, Completion, CompletionDelta, LLMError
from app.llm.wire import StreamAccumulator, parse_completion

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
CURRENT_TIME = {
    "type": "function",
    "function": {
        "name": "current_time",
        "description": "Current time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    },
}
TOOLS = [CALCULATOR, CURRENT_TIME]


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


async def complete(sim: Simulator, payload: dict[str, Any]) -> Completion:
    return parse_completion(await sim.respond(payload), upstream="simulator")


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk async for chunk in chunks]


def arguments(completion: Completion) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, orjson.loads(call.arguments)) for call in completion.tool_calls]


# ---------------------------------------------------------------------------------------
# Answer rule


async def test_same_payload_same_answer() -> None:
    for payload in (user("Hello there, how are you?"), user("what is 2+2?", tools=TOOLS)):
        first, second = await complete(Simulator(), payload), await complete(Simulator(), payload)
        assert first.content == second.content
        assert first.tool_calls == second.tool_calls
        assert first.usage == second.usage
        assert first.finish_reason == second.finish_reason
        # the same simulator answers the same way on a later call too
        sim = Simulator()
        a, b = await complete(sim, payload), await complete(sim, payload)
        assert (a.content, a.tool_calls, a.usage) == (b.content, b.tool_calls, b.usage)


async def test_text_answer_is_honest() -> None:
    data = await Simulator().respond(user("Tell me a joke about databases"))
    assert data["model"] == "simulator"
    assert data["object"] == "chat.completion"
    assert data["id"] == "chatcmpl-sim-1"
    message = data["choices"][0]["message"]
    assert message["content"].startswith("[simulator] ")
    assert 'You said: "Tell me a joke about databases"' in message["content"]
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_long_user_message_is_echoed_bounded() -> None:
    completion = await complete(Simulator(), user("word " * 500))
    assert completion.content is not None
    assert completion.content.startswith("[simulator]")
    assert len(completion.content) < 200


async def test_calculator_rule() -> None:
    completion = await complete(Simulator(), user("what is (2+3)*4?", tools=[CALCULATOR]))
    assert completion.content is None
    assert completion.finish_reason == "tool_calls"
    assert completion.model == "simulator"
    assert arguments(completion) == [("calculator", {"expression": "(2+3)*4"})]
    assert completion.tool_calls[0].id.startswith("call_")


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("compute 12 * 7 please", "12 * 7"),
        ("2**10", "2**10"),
        ("what's 10 % 3", "10 % 3"),
        ("and 2 ^ 8?", "2 ^ 8"),
        ("what is 7 / 2)", "7 / 2"),
    ],
)
async def test_calculator_expressions(text: str, expression: str) -> None:
    completion = await complete(Simulator(), user(text, tools=[CALCULATOR]))
    assert arguments(completion) == [("calculator", {"expression": expression})]


async def test_single_number_is_not_an_expression() -> None:
    completion = await complete(Simulator(), user("I have 3 apples", tools=[CALCULATOR]))
    assert completion.tool_calls == []
    assert completion.content is not None
    assert completion.content.startswith("[simulator]")


@pytest.mark.parametrize(
    ("text", "zone"),
    [
        ("What time is it?", "UTC"),
        ("Check the clock in Europe/Paris please", "Europe/Paris"),
        ("what TIME is it in America/New_York or Asia/Tokyo", "America/New_York"),
    ],
)
async def test_time_rule(text: str, zone: str) -> None:
    completion = await complete(Simulator(), user(text, tools=[CURRENT_TIME]))
    assert completion.finish_reason == "tool_calls"
    assert arguments(completion) == [("current_time", {"timezone": zone})]


async def test_both_rules_give_two_tool_calls() -> None:
    completion = await complete(
        Simulator(), user("What is 6*7 and what time is it in Europe/Berlin?", tools=TOOLS)
    )
    assert arguments(completion) == [
        ("calculator", {"expression": "6*7"}),
        ("current_time", {"timezone": "Europe/Berlin"}),
    ]
    ids = [call.id for call in completion.tool_calls]
    assert len(set(ids)) == 2


async def test_no_tools_offered_gives_text() -> None:
    for payload in (user("2+2"), user("2+2", tools=TOOLS, tool_choice="none")):
        completion = await complete(Simulator(), payload)
        assert completion.tool_calls == []
        assert completion.content is not None
        assert completion.content.startswith("[simulator]")
    # a tool offered but not the relevant one
    completion = await complete(Simulator(), user("what time is it", tools=[CALCULATOR]))
    assert completion.tool_calls == []


async def test_tool_result_turn_reports_results() -> None:
    sim = Simulator()
    question = user("What is 6*7 and what time is it in Europe/Paris?", tools=TOOLS)
    first = await complete(sim, question)
    calculator_call, time_call = first.tool_calls
    messages = [
        *question["messages"],
        first.to_message(),
        {"role": "tool", "tool_call_id": time_call.id, "content": "2026-01-01T12:00:00+01:00"},
        {"role": "tool", "tool_call_id": calculator_call.id, "content": "42"},
    ]
    final = await complete(sim, {"messages": messages, "tools": TOOLS})
    assert final.tool_calls == []
    assert final.finish_reason == "stop"
    assert final.content == (
        "[simulator] current_time returned 2026-01-01T12:00:00+01:00; calculator returned 42."
    )


async def test_max_tokens_truncates() -> None:
    full = await complete(Simulator(), user("Please summarise the plot of Hamlet"))
    cut = await complete(Simulator(), user("Please summarise the plot of Hamlet", max_tokens=5))
    assert full.finish_reason == "stop"
    assert cut.finish_reason == "length"
    assert cut.content == "[simulator] You said"
    assert cut.usage.completion_tokens == 5
    assert full.content is not None
    assert full.content.startswith(cut.content)
    # the honesty marker survives even a tiny budget
    tiny = await complete(Simulator(), user("hello", max_tokens=1))
    assert tiny.content == "[simulator]"
    assert tiny.finish_reason == "length"
    # tool call arguments are cut too
    call = await complete(Simulator(), user("2+2", tools=TOOLS, max_tokens=4))
    assert call.finish_reason == "length"
    assert call.usage.completion_tokens == 4
    # a budget large enough changes nothing
    roomy = await complete(
        Simulator(), user("Please summarise the plot of Hamlet", max_tokens=1000)
    )
    assert (roomy.content, roomy.finish_reason) == (full.content, "stop")


def test_truncate_without_the_regex_cuts_exactly_as_the_regex_does() -> None:
    """Text under the limit skips the regex; at or over it, the cut is the regex's own."""
    token = re.compile(r"\w+|[^\w\s]")

    def by_regex(text: str, limit: int) -> tuple[str, bool]:
        for index, match in enumerate(token.finditer(text), start=1):
            if index == limit:
                return text[: match.end()], bool(token.search(text, match.end()))
        return text, False

    rng = random.Random(5)
    alphabet = "ab_9 .,!?\t\n\x1fé天"
    for _ in range(5_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        limit = rng.randint(1, 12)
        cut, truncated, tokens = _truncate(text, limit)
        assert (cut, truncated) == by_regex(text, limit), (text, limit)
        assert tokens == count_tokens(cut), (text, limit)
    # exactly at the limit, trailing space goes as the regex has always cut it
    assert _truncate("one two ", 2) == ("one two", False, 2)


async def test_usage_matches_tokenizer() -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hello, world!"},
        ]
    }
    completion = await complete(Simulator(), payload)
    assert completion.usage.prompt_tokens == count_tokens("You are helpful.") + count_tokens(
        "Hello, world!"
    )
    assert completion.usage.prompt_tokens == 8
    assert completion.content is not None
    assert completion.usage.completion_tokens == count_tokens(completion.content) > 0

    calls = await complete(Simulator(), user("what is 1+1", tools=TOOLS))
    assert calls.usage.completion_tokens == sum(
        count_tokens(call.arguments) for call in calls.tool_calls
    )
    # tool call arguments in the history count as prompt tokens
    history = {
        "messages": [
            *user("what is 1+1")["messages"],
            calls.to_message(),
            {"role": "tool", "tool_call_id": calls.tool_calls[0].id, "content": "2"},
        ]
    }
    final = await complete(Simulator(), history)
    assert final.usage.prompt_tokens == (
        count_tokens("what is 1+1") + calls.usage.completion_tokens + 1
    )


async def test_invalid_payload_is_400_and_not_counted() -> None:
    sim = Simulator()
    payloads: list[dict[str, Any]] = [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": ["hi"]},
        user("hi", max_tokens=0),
        user("hi", max_tokens="10"),
    ]
    for payload in payloads:
        with pytest.raises(SimulatedError) as info:
            await sim.respond(payload)
        assert info.value.status_code == 400
        assert info.value.body["error"]["type"] == "invalid_request_error"
    assert sim.calls == 0


# ---------------------------------------------------------------------------------------
# Knobs


async def test_error_rate_sequence_is_exact() -> None:
    sim = Simulator(SimulatorKnobs(error_rate=0.25))
    failed = []
    for n in range(1, 9):
        try:
            await sim.respond(user("hi"))
        except SimulatedError:
            failed.append(n)
    assert failed == [4, 8]
    assert sim.calls == 8
    sim.reset()
    assert sim.calls == 0
    outcomes = []
    for _ in range(4):
        try:
            await sim.respond(user("hi"))
            outcomes.append("ok")
        except SimulatedError:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "ok", "fail"]


async def test_error_rate_extremes() -> None:
    always, never = Simulator(SimulatorKnobs(error_rate=1.0)), Simulator()
    for _ in range(5):
        with pytest.raises(SimulatedError):
            await always.respond(user("hi"))
        await never.respond(user("hi"))
    assert always.calls == never.calls == 5


async def test_simulated_error_carries_status_and_retry_after() -> None:
    sim = Simulator(SimulatorKnobs(error_rate=1.0, error_status=503, retry_after=2.5))
    with pytest.raises(SimulatedError) as info:
        await sim.respond(user("hi"))
    error = info.value
    assert error.status_code == 503
    assert error.retry_after == 2.5
    assert set(error.body["error"]) == {"message", "type", "code"}
    assert error.body["error"]["type"] == "server_error"
    assert "[simulator]" in error.body["error"]["message"]


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(503, True), (429, True), (500, True), (400, False)],
)
async def test_chat_model_maps_errors(status: int, retryable: bool) -> None:
    knobs = SimulatorKnobs(error_rate=1.0, error_status=status, retry_after=1.0)
    model = SimulatorChatModel(Simulator(knobs), name="sim-a")
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="any")
    with pytest.raises(LLMError) as info:
        await model.complete(request)
    error = info.value
    assert (error.kind, error.status_code, error.retry_after) == ("status", status, 1.0)
    assert error.upstream == "sim-a"
    assert error.retryable is retryable
    with pytest.raises(LLMError) as stream_info:
        async for _ in model.stream(request):
            pass
    assert stream_info.value.status_code == status
    assert stream_info.value.retryable is retryable


async def test_stream_errors_before_first_chunk() -> None:
    sim = Simulator(SimulatorKnobs(error_rate=1.0, error_status=429))
    chunks = sim.respond_stream(user("hi"))
    assert sim.calls == 1
    with pytest.raises(SimulatedError) as info:
        await anext(chunks)
    assert info.value.status_code == 429


async def test_hang_is_cancellable_and_counted() -> None:
    sim = Simulator(SimulatorKnobs(hang=True))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sim.respond(user("hi")), timeout=0.02)
    assert sim.calls == 1
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(sim.respond_stream(user("hi"))), timeout=0.02)
    assert sim.calls == 2
    # a per-call override wins over the simulator's knobs
    data = await sim.respond(user("hi"), SimulatorKnobs())
    assert data["id"] == "chatcmpl-sim-3"


async def test_latency_applies() -> None:
    sim = Simulator(SimulatorKnobs(latency_ms=30))
    start = time.perf_counter()
    await sim.respond(user("hi"))
    assert time.perf_counter() - start >= 0.03
    start = time.perf_counter()
    await anext(sim.respond_stream(user("hi")))
    assert time.perf_counter() - start >= 0.03


async def test_per_token_latency_applies() -> None:
    sim = Simulator(SimulatorKnobs(per_token_latency_ms=1))
    data = await sim.respond(user("hi"))
    tokens = data["usage"]["completion_tokens"]
    start = time.perf_counter()
    await collect(sim.respond_stream(user("hi")))
    assert time.perf_counter() - start >= tokens * 0.001 * 0.9


def test_header_overrides() -> None:
    base = SimulatorKnobs(latency_ms=5)
    assert base.with_headers({"content-type": "application/json"}) is base
    knobs = base.with_headers(
        {
            "X-Sim-Latency-Ms": "12.5",
            "x-sim-per-token-latency-ms": "2",
            "X-SIM-ERROR-RATE": "0.5",
            "X-Sim-Error-Status": "429",
            "X-Sim-Retry-After": "3",
            "X-Sim-Hang": "true",
        }
    )
    assert knobs == SimulatorKnobs(
        latency_ms=12.5,
        per_token_latency_ms=2,
        error_rate=0.5,
        error_status=429,
        retry_after=3,
        hang=True,
    )
    assert base.with_headers({"X-Sim-Hang": "0"}).hang is False


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Sim-Latency-Ms", "slow"),
        ("X-Sim-Latency-Ms", "-1"),
        ("X-Sim-Error-Rate", "1.5"),
        ("X-Sim-Error-Rate", "nan"),
        ("X-Sim-Error-Status", "200"),
        ("X-Sim-Error-Status", "5xx"),
        ("X-Sim-Retry-After", "soon"),
        ("X-Sim-Hang", "maybe"),
    ],
)
def test_invalid_header_raises(header: str, value: str) -> None:
    with pytest.raises(ValueError, match=header):
        SimulatorKnobs().with_headers({header.lower(): value})


def test_knobs_validate() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimulatorKnobs(error_rate=2)
    with pytest.raises(ValueError, match="unknown knob"):
        SimulatorKnobs().updated({"speed": 1})
    with pytest.raises(ValueError, match="hang"):
        SimulatorKnobs().updated({"hang": "yes"})
    knobs = SimulatorKnobs().updated({"error_rate": 1, "retry_after": None})
    assert knobs.error_rate == 1.0
    assert isinstance(knobs.error_rate, float)


# ---------------------------------------------------------------------------------------
# Streaming and the chat model


async def test_stream_matches_complete() -> None:
    for payload in (
        user("Tell me about streams", stream_options={"include_usage": True}),
        user(
            "what is 6*7 and the time in Asia/Tokyo",
            tools=TOOLS,
            stream_options={"include_usage": True},
        ),
        user("Tell me about streams", max_tokens=6, stream_options={"include_usage": True}),
    ):
        whole = await complete(Simulator(), payload)
        chunks = await collect(Simulator().respond_stream(payload))
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        assert all(chunk["model"] == "simulator" for chunk in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"] == []
        assert len(chunks) > 4
        accumulator = StreamAccumulator(upstream="simulator")
        for chunk in chunks:
            accumulator.feed(chunk)
        streamed = accumulator.result()
        assert streamed.content == whole.content
        assert streamed.tool_calls == whole.tool_calls
        assert streamed.usage == whole.usage
        assert streamed.finish_reason == whole.finish_reason


async def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    chunks = await collect(Simulator().respond_stream(user("hi")))
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_model_complete_and_stream() -> None:
    model = SimulatorChatModel(Simulator(), name="local")
    request = ChatRequest(
        messages=[{"role": "user", "content": "Explain circuit breakers briefly"}],
        model="gpt-whatever",
    )
    completion = await model.complete(request)
    assert completion.upstream == "local"
    assert completion.model == "simulator"
    assert completion.content is not None
    assert completion.content.startswith("[simulator]")

    items = [item async for item in model.stream(request)]
    deltas = [item for item in items if isinstance(item, CompletionDelta)]
    final = items[-1]
    assert isinstance(final, Completion)
    assert all(isinstance(item, CompletionDelta) for item in items[:-1])
    assert len(deltas) > 3
    assert "".join(delta.content for delta in deltas) == final.content == completion.content
    assert final.usage == completion.usage
    assert final.upstream == "local"


async def test_chat_model_stream_tool_calls() -> None:
    model = SimulatorChatModel(Simulator())
    request = ChatRequest(
        messages=[{"role": "user", "content": "what is 3*3"}], model="m", tools=TOOLS
    )
    items = [item async for item in model.stream(request)]
    assert len(items) == 1
    final = items[0]
    assert isinstance(final, Completion)
    assert final.content is None
    assert final.tool_calls == (await model.complete(request)).tool_calls


# ---------------------------------------------------------------------------------------
# HTTP app


def client_for(sim: Simulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(sim)), base_url="http://sim"
    )


async def test_http_models() -> None:
    async with client_for(Simulator()) as client:
        response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [{"id": "simulator", "object": "model", "owned_by": "agentserve"}],
    }


async def test_http_completion() -> None:
    sim = Simulator()
    payload = user("what is (1+2)*3", tools=TOOLS)
    async with client_for(sim) as client:
        response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    completion = parse_completion(response.json(), upstream="http")
    expected = await complete(Simulator(), payload)
    assert completion.tool_calls == expected.tool_calls
    assert completion.usage == expected.usage
    assert sim.calls == 1


async def test_http_stream_equals_complete() -> None:
    for payload in (
        user("Say something nice"),
        user("what is 2*21 and what time is it", tools=TOOLS),
    ):
        stream_payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        async with client_for(Simulator()) as client:
            whole = parse_completion(
                (await client.post("/v1/chat/completions", json=payload)).json(), upstream="x"
            )
            async with client.stream(
                "POST", "/v1/chat/completions", json=stream_payload
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                body = (await response.aread()).decode()
        assert body.endswith("data: [DONE]\n\n")
        events = [block for block in body.split("\n\n") if block]
        assert all(event.startswith("data: ") for event in events)
        assert events[-1] == "data: [DONE]"
        accumulator = StreamAccumulator(upstream="x")
        for event in events[:-1]:
            accumulator.feed(orjson.loads(event.removeprefix("data: ")))
        streamed = accumulator.result()
        assert streamed.content == whole.content
        assert streamed.tool_calls == whole.tool_calls
        assert streamed.usage == whole.usage
        assert streamed.usage.total_tokens > 0


async def test_http_error_status_and_retry_after() -> None:
    sim = Simulator(SimulatorKnobs(error_rate=1.0, error_status=503, retry_after=7))
    async with client_for(sim) as client:
        response = await client.post("/v1/chat/completions", json=user("hi"))
        streamed = await client.post("/v1/chat/completions", json=user("hi", stream=True))
    for reply in (response, streamed):
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "7"
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert error["type"] == "server_error"
    assert sim.calls == 2


async def test_http_header_knobs() -> None:
    sim = Simulator()
    async with client_for(sim) as client:
        failed = await client.post(
            "/v1/chat/completions",
            json=user("hi"),
            headers={"X-Sim-Error-Rate": "1", "X-Sim-Error-Status": "429"},
        )
        assert failed.status_code == 429
        assert "retry-after" not in failed.headers
        ok = await client.post("/v1/chat/completions", json=user("hi"))
        assert ok.status_code == 200
        bad = await client.post(
            "/v1/chat/completions", json=user("hi"), headers={"X-Sim-Error-Rate": "lots"}
        )
        assert bad.status_code == 400
        assert "X-Sim-Error-Rate" in bad.json()["error"]["message"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                client.post("/v1/chat/completions", json=user("hi"), headers={"X-Sim-Hang": "1"}),
                timeout=0.05,
            )
    assert sim.knobs == SimulatorKnobs()
    assert sim.calls == 3


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b"{}", b'{"messages": []}', b'{"messages": "hello"}'],
)
async def test_http_bad_body_is_400(body: bytes) -> None:
    sim = Simulator()
    async with client_for(sim) as client:
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert sim.calls == 0


async def test_http_sim_controls() -> None:
    sim = Simulator()
    async with client_for(sim) as client:
        stats = (await client.get("/sim/stats")).json()
        assert stats == {"calls": 0, "streams_open": 0, "knobs": SimulatorKnobs().as_dict()}

        updated = await client.put("/sim/knobs", json={"error_rate": 1.0, "error_status": 502})
        assert updated.status_code == 200
        assert updated.json()["error_rate"] == 1.0
        assert updated.json()["error_status"] == 502
        assert updated.json()["latency_ms"] == 0.0
        assert (await client.post("/v1/chat/completions", json=user("hi"))).status_code == 502

        for bad in ({"error_rate": 3}, {"nope": 1}, {"hang": "sure"}, [1]):
            response = await client.put("/sim/knobs", json=bad)
            assert response.status_code == 422
            assert response.json()["error"]["message"]
        assert sim.knobs.error_status == 502

        # flip the upstream back to healthy at runtime
        assert (await client.put("/sim/knobs", json={"error_rate": 0})).status_code == 200
        assert (await client.post("/v1/chat/completions", json=user("hi"))).status_code == 200
        stats = (await client.get("/sim/stats")).json()
        assert stats["calls"] == 2
        assert stats["knobs"]["error_rate"] == 0.0

        reset = await client.post("/sim/reset")
        assert reset.status_code == 200
        assert reset.json()["calls"] == 0
        assert (await client.get("/sim/stats")).json()["calls"] == 0
    assert sim.calls == 0


def test_prompt_tokens_count_every_message_and_tool_call() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 2 + 2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "calculator", "arguments": '{"x": "2+2"}'}}],
        },
        {"role": "tool", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "and again, please"}]},
    ]
    assert (
        prompt_tokens(messages) == 6 + 11 + 1 + 4
    )  # What is 2 + 2 ? | { " x " : " 2 + 2 " } | 4 | ...
    assert prompt_tokens([]) == 0


TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def test_prompt_tokens_are_the_sum_over_the_messages_whatever_their_edges() -> None:
    """The prompt is counted in one pass over the joined texts: a text ending in a word
    character next to one starting with one must still count as two tokens, not one."""
    rng = random.Random(11)
    alphabet = "ab_9 .,!?\t\n\x1fé天"
    for _ in range(2_000):
        messages: list[dict[str, Any]] = []
        for _ in range(rng.randint(0, 6)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            message: dict[str, Any] = {"role": rng.choice(["user", "assistant"]), "content": text}
            if rng.random() < 0.2:
                arguments = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
                message["tool_calls"] = [{"function": {"name": "f", "arguments": arguments}}]
            messages.append(message)
        texts = [m["content"] for m in messages] + [
            call["function"]["arguments"] for m in messages for call in m.get("tool_calls", [])
        ]
        expected = sum(len(TOKEN_RE.findall(text)) for text in texts)
        assert prompt_tokens(messages) == expected, messages


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "word",
        "What is (12+30)*2?",
        '[simulator] You said: "hi". This is a simulated answer, not a real model.',
        '{"expression": "(12+30)*2"}',
        "snake_case and CamelCase2 x_1",
        "tabs\tand\nnewlines\r\x0b\x0c, \x1c\x1d\x1e\x1f separators",
        "\x00control\x7f\x01chars",
        "...!!!???",
        "Wetter in Zürich? 天気 ☀️ émigré",  # not ASCII: the regex itself counts
    ],
)
def test_count_tokens_is_the_regex_count(text: str) -> None:
    assert count_tokens(text) == len(TOKEN_RE.findall(text))


def test_count_tokens_matches_the_regex_on_random_ascii() -> None:
    rng = random.Random(7)
    alphabet = string.printable + "\x00\x01\x1c\x1f\x7f_"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert count_tokens(text) == len(TOKEN_RE.findall(text)), repr(text)
