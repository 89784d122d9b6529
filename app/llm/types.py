"""The chat model interface and its data types, shared by every implementation.

Messages are `app.domain.Message` (OpenAI's wire shape); the rest are small dataclasses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from app.domain import Message, Usage

ToolSchema = dict[str, Any]
"""One tool in OpenAI wire shape: {"type": "function", "function": {...}}."""


@dataclass(slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON-encoded arguments, exactly as the model produced them."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class Completion:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    finish_reason: str = "stop"
    upstream: str = ""

    def to_message(self) -> Message:
        message: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_wire() for call in self.tool_calls]
        return message


@dataclass(slots=True, frozen=True)
class ChatRequest:
    messages: Sequence[Message]
    model: str
    tools: Sequence[ToolSchema] = ()
    temperature: float = 0.0
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None

    def to_payload(self, *, stream: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": list(self.messages),
            "temperature": self.temperature,
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        if self.stop:
            payload["stop"] = list(self.stop)
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.tools:
            payload["tools"] = list(self.tools)
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload


@dataclass(slots=True, frozen=True)
class CompletionDelta:
    """A piece of a streamed completion: text so far is the concatenation of `content`."""

    content: str


class ChatModel(Protocol):
    """Anything that answers a chat request: one upstream, the simulator, or a chain."""

    async def complete(self, request: ChatRequest) -> Completion: ...


@runtime_checkable
class StreamingChatModel(ChatModel, Protocol):
    def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        """Yield deltas, then exactly one final Completion (content + tool calls + usage)."""
        ...


# ---------------------------------------------------------------------------------------
# Errors. `retryable` decides whether retries and the breaker treat it as a failure.

FailureKind = Literal["connect", "timeout", "status", "protocol", "open", "deadline"]


class LLMError(Exception):
    """A call to an upstream failed. Its text (upstream, status, body) is for the logs: the
    service reports it to callers as `app.errors.UpstreamUnavailableError`."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str = "",
        kind: FailureKind = "protocol",
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.kind = kind
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Connect errors, timeouts, 408, 429 and 5xx may succeed on a later try."""
        if self.kind in ("connect", "timeout"):
            return True
        if self.kind == "status" and self.status_code is not None:
            return self.status_code in (408, 429) or self.status_code >= 500
        return False


class CallNotPermittedError(LLMError):
    """The upstream's circuit breaker is open: the call was refused without any I/O."""

    def __init__(self, upstream: str, retry_after: float) -> None:
        super().__init__(
            f"circuit breaker for upstream {upstream!r} is open",
            upstream=upstream,
            kind="open",
            retry_after=retry_after,
        )


class LLMUnavailableError(LLMError):
    """No upstream in the fallback chain could answer."""

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message, kind="open", retry_after=retry_after)
