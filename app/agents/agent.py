"""The agent loop, shaped as an async stream of events.

`Agent.run` yields events as they happen (text deltas, tool calls, tool results, the final
answer); `collect` folds them into one AgentResult for the JSON endpoint, and a streaming
endpoint can forward them as they come. When tracing is on, a run is an `agent.run` span
over the chain's `llm.call` spans and a `tool.call` span per tool call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.trace import Span, StatusCode, Tracer

from app.agents.spec import AgentSpec
from app.agents.tools import ToolRegistry, ToolResult
from app.domain import Message, Usage
from app.llm.types import (
    ChatModel,
    ChatRequest,
    Completion,
    CompletionDelta,
    StreamingChatModel,
    ToolCall,
    ToolSchema,
)
from app.observability.tracing import current_tracer, traced_iteration

FinishReason = Literal["stop", "max_steps", "length"]


@dataclass(slots=True, frozen=True)
class TextDelta:
    text: str
    type: Literal["delta"] = "delta"


@dataclass(slots=True, frozen=True)
class ToolCallStarted:
    call: ToolCall
    type: Literal["tool_call"] = "tool_call"


@dataclass(slots=True, frozen=True)
class ToolCallFinished:
    call: ToolCall
    result: ToolResult
    duration_ms: float
    type: Literal["tool_result"] = "tool_result"


@dataclass(slots=True)
class StepRecord:
    """One tool call the agent made, as reported in the response's `steps`."""

    tool: str
    arguments: str
    result: str
    is_error: bool
    duration_ms: float


@dataclass(slots=True)
class AgentResult:
    answer: str
    model: str
    usage: Usage
    steps: list[StepRecord]
    finish_reason: FinishReason
    messages: list[Message]
    """The messages this turn added after the user's: tool steps and the final answer."""
    message_usage: list[Usage] = field(default_factory=list)
    """Token usage per message in `messages` (zero for tool results)."""
    type: Literal["final"] = "final"


AgentEvent = TextDelta | ToolCallStarted | ToolCallFinished | AgentResult


@dataclass(slots=True, frozen=True)
class RunOptions:
    """One request's model options (the /v1 API's); None keeps the agent's own setting."""

    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def within(self, spec: AgentSpec) -> RunOptions:
        """The options every model call of the run gets: the agent's where unset, and
        max_tokens never above the agent's (a client lowers the limit, never raises it)."""
        max_tokens = self.max_tokens
        if max_tokens is None or (spec.max_tokens is not None and max_tokens > spec.max_tokens):
            max_tokens = spec.max_tokens
        temperature = spec.temperature if self.temperature is None else self.temperature
        return RunOptions(temperature, max_tokens, self.stop, self.seed)


class Agent:
    """One pooled agent: a spec bound to a chat model and its tools. Stateless per request."""

    __slots__ = ("_model", "_model_id", "_tool_schemas", "_tools", "spec")

    def __init__(
        self,
        spec: AgentSpec,
        model: ChatModel,
        tools: ToolRegistry,
        *,
        model_id: str,
        tool_schemas: Sequence[ToolSchema],
    ) -> None:
        self.spec = spec
        self._model = model
        self._model_id = model_id
        self._tools = tools
        self._tool_schemas = tool_schemas

    def run(
        self,
        history: Sequence[Message],
        user_message: str,
        *,
        stream: bool = False,
        options: RunOptions | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Model → tool calls (in parallel) → results → model … until an answer or max_steps.
        `options` (within the agent's limits) go into every model request of the run."""
        events = self._events(history, user_message, stream=stream, options=options)
        tracer = current_tracer()
        if tracer is None:
            return events
        return traced_iteration(
            tracer,
            "agent.run",
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": self.spec.name,
                "gen_ai.request.model": self._model_id,
                "agent.max_steps": self.spec.max_steps,
                "agent.stream": stream,
            },
            events,
            is_last=_annotate_run,
        )

    async def _events(
        self,
        history: Sequence[Message],
        user_message: str,
        *,
        stream: bool,
        options: RunOptions | None,
    ) -> AsyncIterator[AgentEvent]:
        messages: list[Message] = [
            {"role": "system", "content": self.spec.instructions},
            *history,
            {"role": "user", "content": user_message},
        ]
        temperature, max_tokens = self.spec.temperature, self.spec.max_tokens
        stop: tuple[str, ...] = ()
        seed: int | None = None
        if options is not None:
            options = options.within(self.spec)
            if options.temperature is not None:
                temperature = options.temperature
            max_tokens, stop, seed = options.max_tokens, options.stop, options.seed
        added: list[Message] = []
        added_usage: list[Usage] = []
        steps: list[StepRecord] = []
        usage = Usage()
        model_name = ""
        last_text = ""
        for _ in range(self.spec.max_steps):
            request = ChatRequest(
                messages=messages,
                model=self._model_id,
                tools=self._tool_schemas,
                temperature=temperature,
                max_tokens=max_tokens,
                stop=stop,
                seed=seed,
            )
            completion: Completion | None = None
            if stream and isinstance(self._model, StreamingChatModel):
                async for item in self._model.stream(request):
                    if isinstance(item, CompletionDelta):
                        yield TextDelta(item.content)
                    else:
                        completion = item
            else:
                completion = await self._model.complete(request)
            assert completion is not None, "a model stream must end with a Completion"
            usage = usage + completion.usage
            model_name = completion.model or model_name
            message = completion.to_message()
            messages.append(message)
            added.append(message)
            added_usage.append(completion.usage)
            last_text = completion.content or last_text
            if not completion.tool_calls:
                reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
                yield self._result(
                    completion.content or "", model_name, usage, steps, reason, added, added_usage
                )
                return
            for call in completion.tool_calls:
                yield ToolCallStarted(call)
            results = await asyncio.gather(*(self._invoke(call) for call in completion.tool_calls))
            for call, (result, duration_ms) in zip(completion.tool_calls, results, strict=True):
                tool_message: Message = {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "name": call.name,
                    "content": result.content,
                }
                messages.append(tool_message)
                added.append(tool_message)
                added_usage.append(Usage())
                steps.append(
                    StepRecord(
                        call.name, call.arguments, result.content, result.is_error, duration_ms
                    )
                )
                yield ToolCallFinished(call, result, duration_ms)
        note = f"[stopped after {self.spec.max_steps} steps without a final answer]"
        answer = f"{last_text}\n\n{note}" if last_text else note
        final: Message = {"role": "assistant", "content": answer}
        added.append(final)
        added_usage.append(Usage())
        yield self._result(answer, model_name, usage, steps, "max_steps", added, added_usage)

    async def _invoke(self, call: ToolCall) -> tuple[ToolResult, float]:
        tracer = current_tracer()
        if tracer is None:
            return await self._invoke_tool(call)
        return await self._traced_invoke(tracer, call)

    async def _traced_invoke(self, tracer: Tracer, call: ToolCall) -> tuple[ToolResult, float]:
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
        }
        with tracer.start_as_current_span("tool.call", attributes=attributes) as span:
            result, duration_ms = await self._invoke_tool(call)
            span.set_attribute("tool.is_error", result.is_error)
            span.set_attribute("tool.duration_ms", duration_ms)
            if result.is_error:
                span.set_status(StatusCode.ERROR, "the tool answered with an error")
            return result, duration_ms

    async def _invoke_tool(self, call: ToolCall) -> tuple[ToolResult, float]:
        started = time.perf_counter()
        if call.name not in self.spec.tools:
            result = ToolResult(f"unknown tool {call.name!r}", is_error=True)
        else:
            result = await self._tools.invoke(call.name, call.arguments)
        return result, (time.perf_counter() - started) * 1000

    @staticmethod
    def _result(
        answer: str,
        model: str,
        usage: Usage,
        steps: list[StepRecord],
        reason: FinishReason,
        added: list[Message],
        added_usage: list[Usage],
    ) -> AgentResult:
        return AgentResult(
            answer=answer,
            model=model,
            usage=usage,
            steps=steps,
            finish_reason=reason,
            messages=added,
            message_usage=added_usage,
        )


def _annotate_run(span: Span, event: AgentEvent) -> bool:
    """The final result closes the `agent.run` span with what the run came to."""
    if not isinstance(event, AgentResult):
        return False
    model_calls = sum(message["role"] == "assistant" for message in event.messages)
    if event.finish_reason == "max_steps":
        model_calls -= 1  # the closing note is not a model answer
    span.set_attributes(
        {
            "agent.finish_reason": event.finish_reason,
            "agent.steps": model_calls,
            "agent.tool_calls": len(event.steps),
            "gen_ai.response.model": event.model,
            "gen_ai.usage.input_tokens": event.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": event.usage.completion_tokens,
        }
    )
    return True


async def collect(events: AsyncIterator[AgentEvent]) -> AgentResult:
    """The JSON answer is the event stream, collected."""
    async for event in events:
        if isinstance(event, AgentResult):
            return event
    raise RuntimeError("agent run ended without a final result")


__all__ = [
    "Agent",
    "AgentEvent",
    "AgentResult",
    "FinishReason",
    "RunOptions",
    "StepRecord",
    "TextDelta",
    "ToolCallFinished",
    "ToolCallStarted",
    "collect",
]
