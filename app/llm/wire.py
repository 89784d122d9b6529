"""Decoding of OpenAI Chat Completions responses (whole and streamed).

Shared by the httpx client and the in-process simulator model, so both go through the same
parsing and a response the simulator can produce is one the real client can read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.domain import Usage
from app.llm.types import Completion, LLMError, ToolCall


def parse_usage(data: Mapping[str, Any] | None) -> Usage:
    if not data:
        return Usage()
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
    )


def parse_completion(data: Mapping[str, Any], *, upstream: str) -> Completion:
    """Turn a `chat.completion` object into a Completion; malformed bodies are LLMErrors."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        tool_calls = [
            ToolCall(
                id=str(call["id"]),
                name=str(call["function"]["name"]),
                arguments=str(call["function"].get("arguments") or "{}"),
            )
            for call in message.get("tool_calls") or ()
        ]
        return Completion(
            content=message.get("content"),
            tool_calls=tool_calls,
            usage=parse_usage(data.get("usage")),
            model=str(data.get("model") or ""),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            upstream=upstream,
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LLMError(
            f"malformed completion from upstream {upstream!r}: {exc!r}",
            upstream=upstream,
            kind="protocol",
        ) from exc


class StreamAccumulator:
    """Folds `chat.completion.chunk` objects into deltas and one final Completion."""

    def __init__(self, *, upstream: str) -> None:
        self._upstream = upstream
        self._content: list[str] = []
        self._calls: dict[int, dict[str, str]] = {}
        self._usage = Usage()
        self._model = ""
        self._finish_reason = "stop"

    def feed(self, chunk: Mapping[str, Any]) -> str:
        """Absorb one chunk; return the text it adds (possibly empty)."""
        self._model = str(chunk.get("model") or self._model)
        if chunk.get("usage"):
            self._usage = parse_usage(chunk["usage"])
        text = ""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text += delta["content"]
            for call in delta.get("tool_calls") or ():
                slot = self._calls.setdefault(
                    int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])
        if text:
            self._content.append(text)
        return text

    def result(self) -> Completion:
        calls = [
            ToolCall(id=slot["id"], name=slot["name"], arguments=slot["arguments"] or "{}")
            for _, slot in sorted(self._calls.items())
        ]
        return Completion(
            content="".join(self._content) if self._content or not calls else None,
            tool_calls=calls,
            usage=self._usage,
            model=self._model,
            finish_reason=self._finish_reason,
            upstream=self._upstream,
        )
