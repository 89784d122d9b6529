"""Unit tests for app.agents.agent: the tool loop, its event stream and its result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from app.agents.agent import (
    Agent,
    AgentEvent,
    AgentResult,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    collect,
)
from app.agents.spec import AgentSpec
from app.agents.tools import ToolRegistry, builtin_registry
from app.domain import Message, Usage
from app.llm.simulator import Simulator, SimulatorChatModel
from app.llm.types import ChatRequest, Completion, CompletionDelta, LLMError, ToolCall
from tests.support.fakes import ScriptedModel

INSTRUCTIONS = "You are a helpful agent with tools."
BOTH_TOOLS = "what is 2+3 and the time in Europe/Paris"


def tools_spec(**overrides: Any) -> AgentSpec:
    settings: dict[str, Any] = {
        "name": "tools",
        "instructions": INSTRUCTIONS,
        "tools": ("calculator", "current_time"),
        "max_steps": 4,
    }
    settings.update(overrides)
    return AgentSpec(**settings)


def make_agent(
    model: Any,
    spec: AgentSpec | None = None,
    tools: ToolRegistry | None = None,
) -> Agent:
    spec = spec if spec is not None else tools_spec()
    tools = tools if tools is not None else builtin_registry()
    return Agent(spec, model, tools, model_id="m", tool_schemas=tools.schemas(spec.tools))


def sim_agent(spec: AgentSpec | None = None) -> tuple[Agent, Simulator]:
    simulator = Simulator()
    return make_agent(SimulatorChatModel(simulator), spec), simulator


async def events_of(agent: Agent, message: str, *, stream: bool = False) -> list[AgentEvent]:
    return [event async for event in agent.run([], message, stream=stream)]


def call(name: str, arguments: str = "{}", id_: str | None = None) -> ToolCall:
    return ToolCall(id=id_ or f"call_{name}", name=name, arguments=arguments)


class ScriptedStreamingModel(ScriptedModel):
    """Streams each scripted text answer word by word (tool calls in the final item)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        completion = await self.complete(request)
        for word in (completion.content or "").split(" "):
            yield CompletionDelta(word + " ")
        yield Completion(
            content="".join(w + " " for w in (completion.content or "").split(" ")),
            tool_calls=completion.tool_calls,
            usage=completion.usage,
            model=completion.model,
        )


def final(result: list[AgentEvent]) -> AgentResult:
    last = result[-1]
    assert isinstance(last, AgentResult)
    assert sum(isinstance(e, AgentResult) for e in result) == 1
    return last


# ---------------------------------------------------------------------------------------
# Plain answers


async def test_plain_message_gets_a_final_answer_without_steps() -> None:
    agent, simulator = sim_agent()
    result = await collect(agent.run([], "hello there"))
    assert result.answer.startswith('[simulator] You said: "hello there"')
    assert result.finish_reason == "stop"
    assert result.steps == []
    assert result.model == "simulator"
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0
    assert result.messages == [{"role": "assistant", "content": result.answer}]
    assert result.message_usage == [result.usage]
    assert simulator.calls == 1


async def test_request_carries_spec_settings_history_and_tools() -> None:
    spec = tools_spec(temperature=0.7, max_tokens=99)
    tools = builtin_registry()
    model = ScriptedModel(Completion(content="hi", model="x"))
    agent = make_agent(model, spec, tools)
    history: list[Message] = [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "reply"},
    ]
    await collect(agent.run(history, "now"))
    request = model.requests[0]
    assert request.model == "m"
    assert request.temperature == 0.7
    assert request.max_tokens == 99
    assert list(request.tools) == tools.schemas(("calculator", "current_time"))
    assert model.seen_messages[0] == [
        {"role": "system", "content": INSTRUCTIONS},
        *history,
        {"role": "user", "content": "now"},
    ]


async def test_truncated_answer_finishes_with_length() -> None:
    agent, _ = sim_agent(tools_spec(max_tokens=4))
    result = await collect(agent.run([], "please say something rather long"))
    assert result.finish_reason == "length"
    assert result.answer.startswith("[simulator]")


# ---------------------------------------------------------------------------------------
# Tool calls


async def test_two_tool_calls_are_executed_and_fed_back() -> None:
    agent, simulator = sim_agent()
    result = await collect(agent.run([], BOTH_TOOLS))

    assert simulator.calls == 2
    assert [(s.tool, s.is_error) for s in result.steps] == [
        ("calculator", False),
        ("current_time", False),
    ]
    calc, clock = result.steps
    assert calc.arguments == '{"expression":"2+3"}'
    assert calc.result == "5"
    assert clock.result.endswith("(Europe/Paris)")
    assert all(s.duration_ms >= 0 for s in result.steps)

    assert "calculator returned 5" in result.answer
    assert f"current_time returned {clock.result}" in result.answer
    assert result.finish_reason == "stop"

    roles = [m["role"] for m in result.messages]
    assert roles == ["assistant", "tool", "tool", "assistant"]
    tool_calls = result.messages[0]["tool_calls"]
    assert [c["function"]["name"] for c in tool_calls] == ["calculator", "current_time"]
    assert result.messages[1]["tool_call_id"] == tool_calls[0]["id"]
    assert result.messages[1]["content"] == "5"
    assert result.messages[2]["tool_call_id"] == tool_calls[1]["id"]
    assert result.messages[2]["content"] == clock.result
    assert result.messages[3] == {"role": "assistant", "content": result.answer}

    assert len(result.message_usage) == 4
    assert result.message_usage[1] == result.message_usage[2] == Usage()
    assert result.usage == result.message_usage[0] + result.message_usage[3]


async def test_tool_calls_run_in_parallel() -> None:
    registry = ToolRegistry()

    async def slow_a() -> str:
        """Sleep, then answer."""
        await asyncio.sleep(0.1)
        return "a done"

    async def slow_b() -> str:
        """Sleep, then answer."""
        await asyncio.sleep(0.1)
        return "b done"

    registry.register(slow_a)
    registry.register(slow_b)
    spec = tools_spec(tools=("slow_a", "slow_b"))
    model = ScriptedModel(
        Completion(content=None, tool_calls=[call("slow_a"), call("slow_b")]),
        Completion(content="both done"),
    )
    agent = make_agent(model, spec, registry)

    started = time.perf_counter()
    result = await collect(agent.run([], "go"))
    elapsed = time.perf_counter() - started

    assert 0.1 <= elapsed < 0.18
    assert [(s.tool, s.result) for s in result.steps] == [
        ("slow_a", "a done"),
        ("slow_b", "b done"),
    ]
    assert all(s.duration_ms >= 90 for s in result.steps)
    # Both results were fed back to the model, in call order.
    fed_back = model.seen_messages[1][-2:]
    assert [(m["role"], m["tool_call_id"], m["content"]) for m in fed_back] == [
        ("tool", "call_slow_a", "a done"),
        ("tool", "call_slow_b", "b done"),
    ]


async def test_tool_error_is_a_step_not_an_exception() -> None:
    agent, _ = sim_agent()
    result = await collect(agent.run([], "what is 1/0"))
    assert len(result.steps) == 1
    step = result.steps[0]
    assert step.tool == "calculator"
    assert step.is_error is True
    assert "division by zero" in step.result
    assert result.finish_reason == "stop"
    assert "calculator returned" in result.answer
    assert "division by zero" in result.answer


async def test_unknown_tool_becomes_an_error_result() -> None:
    model = ScriptedModel(
        Completion(content=None, tool_calls=[call("no_such_tool")]),
        Completion(content="sorry"),
    )
    agent = make_agent(model)
    result = await collect(agent.run([], "go"))
    assert result.answer == "sorry"
    assert len(result.steps) == 1
    assert result.steps[0].is_error is True
    assert "unknown tool" in result.steps[0].result
    assert model.seen_messages[1][-1]["content"] == result.steps[0].result


async def test_tool_outside_the_spec_is_refused_even_if_registered() -> None:
    ran: list[str] = []
    registry = ToolRegistry()

    def secret() -> str:
        """Must not run for this agent."""
        ran.append("secret")
        return "leaked"

    def allowed() -> str:
        """Fine to run."""
        ran.append("allowed")
        return "fine"

    registry.register(secret, inline=True)
    registry.register(allowed, inline=True)
    spec = tools_spec(tools=("allowed",))
    model = ScriptedModel(
        Completion(content=None, tool_calls=[call("secret"), call("allowed")]),
        Completion(content="done"),
    )
    agent = make_agent(model, spec, registry)
    result = await collect(agent.run([], "go"))

    assert ran == ["allowed"]
    refused, ok = result.steps
    assert refused.tool == "secret"
    assert refused.is_error is True
    assert "unknown tool 'secret'" in refused.result
    assert "leaked" not in refused.result
    assert (ok.tool, ok.result, ok.is_error) == ("allowed", "fine", False)


async def test_builtin_tool_outside_the_spec_is_refused() -> None:
    spec = tools_spec(tools=("calculator",))
    tools = builtin_registry()
    model = ScriptedModel(
        Completion(content=None, tool_calls=[call("current_time", '{"timezone":"UTC"}')]),
        Completion(content="done"),
    )
    agent = make_agent(model, spec, tools)
    result = await collect(agent.run([], "go"))
    assert result.steps[0].is_error is True
    assert "unknown tool 'current_time'" in result.steps[0].result


async def test_max_steps_stops_a_model_that_always_calls_tools() -> None:
    looping = Completion(
        content="Let me compute.",
        tool_calls=[call("calculator", '{"expression":"1+1"}')],
        usage=Usage(5, 1),
    )
    model = ScriptedModel(looping)
    agent = make_agent(model, tools_spec(max_steps=3))
    result = await collect(agent.run([], "loop forever"))

    assert model.calls == 3
    assert result.finish_reason == "max_steps"
    assert "stopped after 3 steps" in result.answer
    assert result.answer.startswith("Let me compute.")
    assert [s.result for s in result.steps] == ["2", "2", "2"]
    roles = [m["role"] for m in result.messages]
    assert roles == ["assistant", "tool"] * 3 + ["assistant"]
    assert result.messages[-1] == {"role": "assistant", "content": result.answer}
    assert result.usage == Usage(15, 3)
    assert len(result.message_usage) == len(result.messages)


async def test_max_steps_without_any_text_still_explains() -> None:
    model = ScriptedModel(Completion(content=None, tool_calls=[call("calculator", "{}")]))
    agent = make_agent(model, tools_spec(max_steps=1))
    result = await collect(agent.run([], "go"))
    assert model.calls == 1
    assert result.finish_reason == "max_steps"
    assert result.answer == "[stopped after 1 steps without a final answer]"


@pytest.mark.parametrize("stream", [False, True])
async def test_llm_error_propagates(stream: bool) -> None:
    error = LLMError("upstream down", kind="status", status_code=503)
    model = ScriptedStreamingModel(error)
    agent = make_agent(model)
    with pytest.raises(LLMError) as info:
        await collect(agent.run([], "hello", stream=stream))
    assert info.value is error


async def test_llm_error_after_a_tool_step_propagates() -> None:
    error = LLMError("upstream down", kind="timeout")
    model = ScriptedModel(
        Completion(content=None, tool_calls=[call("calculator", '{"expression":"1+1"}')]),
        error,
    )
    agent = make_agent(model)
    with pytest.raises(LLMError) as info:
        await collect(agent.run([], "go"))
    assert info.value is error
    assert model.calls == 2


async def test_usage_is_summed_over_all_model_calls() -> None:
    model = ScriptedModel(
        Completion(
            content=None,
            tool_calls=[call("calculator", '{"expression":"2*3"}')],
            usage=Usage(10, 2),
            model="first",
        ),
        Completion(
            content=None,
            tool_calls=[call("calculator", '{"expression":"6*7"}', id_="c2")],
            usage=Usage(20, 3),
            model="",
        ),
        Completion(content="42", usage=Usage(40, 1), model="last"),
    )
    agent = make_agent(model)
    result = await collect(agent.run([], "go"))
    assert model.calls == 3
    assert result.usage == Usage(70, 6)
    assert result.message_usage == [Usage(10, 2), Usage(), Usage(20, 3), Usage(), Usage(40, 1)]
    assert result.model == "last"


# ---------------------------------------------------------------------------------------
# Event stream


async def test_streamed_plain_answer_is_deltas_then_the_result() -> None:
    agent, _ = sim_agent()
    events = await events_of(agent, "hello streaming world", stream=True)
    result = final(events)
    deltas = events[:-1]
    assert len(deltas) > 1
    assert all(isinstance(e, TextDelta) for e in deltas)
    assert "".join(e.text for e in deltas if isinstance(e, TextDelta)) == result.answer
    assert result.answer.startswith("[simulator]")


async def test_streamed_tool_run_event_order() -> None:
    agent, _ = sim_agent()
    events = await events_of(agent, BOTH_TOOLS, stream=True)
    result = final(events)

    kinds = [e.type for e in events]
    first_delta = kinds.index("delta")
    # Tool events all come before the final answer's text, which comes before the result.
    assert kinds[:first_delta] == ["tool_call", "tool_call", "tool_result", "tool_result"]
    assert set(kinds[first_delta:-1]) == {"delta"}
    assert kinds[-1] == "final"

    started = [e for e in events if isinstance(e, ToolCallStarted)]
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [e.call.name for e in started] == ["calculator", "current_time"]
    for done in finished:
        start_index = next(
            i
            for i, e in enumerate(events)
            if isinstance(e, ToolCallStarted) and e.call == done.call
        )
        assert start_index < events.index(done)
    assert [e.result.content for e in finished] == [s.result for s in result.steps]

    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == result.answer
    assert "calculator returned 5" in text


async def test_events_without_streaming_have_no_deltas() -> None:
    agent, _ = sim_agent()
    events = await events_of(agent, BOTH_TOOLS, stream=False)
    assert [e.type for e in events] == [
        "tool_call",
        "tool_call",
        "tool_result",
        "tool_result",
        "final",
    ]


async def test_streaming_requested_of_a_non_streaming_model_falls_back_to_complete() -> None:
    model = ScriptedModel(Completion(content="whole answer", model="x"))
    agent = make_agent(model)
    events = await events_of(agent, "hi", stream=True)
    assert len(events) == 1
    assert final(events).answer == "whole answer"


async def test_collect_returns_the_agent_result() -> None:
    agent, _ = sim_agent()
    result = await collect(agent.run([], BOTH_TOOLS, stream=True))
    assert isinstance(result, AgentResult)
    assert [s.tool for s in result.steps] == ["calculator", "current_time"]
    assert "calculator returned 5" in result.answer


async def test_collect_returns_the_result_event_itself() -> None:
    expected = AgentResult(
        answer="a", model="m", usage=Usage(), steps=[], finish_reason="stop", messages=[]
    )

    async def events() -> AsyncIterator[AgentEvent]:
        yield TextDelta("a")
        yield expected

    assert await collect(events()) is expected


async def test_collect_without_a_result_raises() -> None:
    async def no_result() -> AsyncIterator[AgentEvent]:
        yield TextDelta("dangling")

    with pytest.raises(RuntimeError, match="without a final result"):
        await collect(no_result())


def _texts(events: Sequence[AgentEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_streamed_text_of_every_model_call_is_forwarded() -> None:
    model = ScriptedStreamingModel(
        Completion(content="checking", tool_calls=[call("calculator", '{"expression":"1+2"}')]),
        Completion(content="it is 3"),
    )
    agent = make_agent(model)
    events = [e async for e in agent.run([], "go", stream=True)]
    result = final(events)
    assert _texts(events) == "checking it is 3 "
    assert result.answer == "it is 3 "
    kinds = [e.type for e in events]
    assert kinds.index("tool_call") > kinds.index("delta")
    assert kinds.index("tool_result") < len(kinds) - 2  # more deltas after the tool result
