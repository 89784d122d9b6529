"""Request and response bodies: pydantic at the edge only."""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, field_validator

from app.domain import SessionRecord
from app.services.health import Readiness
from app.services.query import QueryOutput

QUERY_EXAMPLES = {
    "new conversation": {
        "summary": "Start a new conversation with the default agent",
        "value": {"message": "Hello! What can you do?"},
    },
    "tool use": {
        "summary": "Ask the tools agent to compute",
        "value": {"message": "What is (12 + 30) * 2?", "agent": "tools"},
    },
    "skip the cache": {
        "summary": "Force a fresh answer and do not cache it",
        "value": {
            "message": "Tell me something new.",
            "cache": {"no_cache": True, "no_store": True},
        },
    },
    "with metadata": {
        "summary": "Tag the session with metadata",
        "value": {"message": "Summarise our plan.", "metadata": {"ticket": "OPS-42"}},
    },
}


class CacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    no_cache: bool = Field(False, description="Do not answer from the cache (still stores).")
    no_store: bool = Field(False, description="Do not store this answer in the cache.")
    ttl: int | None = Field(
        None, ge=1, le=7 * 24 * 3600, description="Seconds to keep this answer cached."
    )


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, description="The user's message.")
    session_id: uuid.UUID | None = Field(
        None, description="Continue this session; omit to start a new one."
    )
    agent: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Agent to talk to; DEFAULT_AGENT when omitted.",
    )
    metadata: dict[str, JsonValue] | None = Field(
        None, description="Stored with a new session (ignored when continuing one)."
    )
    cache: CacheOptions | None = Field(
        None, description="Per-request cache control (also: Cache-Control: no-cache/no-store)."
    )
    stream: bool = Field(
        False,
        description="Answer as Server-Sent Events (also: `Accept: text/event-stream`).",
    )

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message must not be blank")
        if "\x00" in value:
            raise ValueError("message must not contain NUL characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _storable(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        if value is not None:
            _check_storable(value, "metadata")
        return value


INT64 = 2**63


def _check_storable(value: JsonValue, where: str) -> None:
    """Reject JSON that every database cannot store: NUL, NaN/Infinity, ints over 64 bits."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: strings must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{where}: strings must be valid Unicode (no lone surrogates)"
            ) from None
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise ValueError(f"{where}: integers must fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: numbers must be finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_storable(key, where)
            _check_storable(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")


class UsageOut(BaseModel):
    prompt_tokens: int = Field(description="Tokens sent to the model for this turn.")
    completion_tokens: int = Field(description="Tokens the model produced for this turn.")
    total_tokens: int = Field(description="Their sum (0 for an answer from the cache).")


class StepOut(BaseModel):
    tool: str = Field(description="The tool the agent called.")
    arguments: str = Field(description="Its arguments, JSON as the model wrote them.")
    result: str = Field(description="What the tool returned (or its error).")
    is_error: bool = Field(description="Whether the tool failed.")
    duration_ms: float = Field(description="How long the tool ran.")


class QueryResponse(BaseModel):
    """One answered turn."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "answer": "(12 + 30) * 2 = 84.",
                    "session_id": "6f1c2a9e-8d4b-4c1e-9a57-3b2f0d8e7c61",
                    "agent": "tools",
                    "model": "gpt-4o-mini",
                    "usage": {"prompt_tokens": 212, "completion_tokens": 31, "total_tokens": 243},
                    "steps": [
                        {
                            "tool": "calculator",
                            "arguments": '{"expression": "(12+30)*2"}',
                            "result": "84",
                            "is_error": False,
                            "duration_ms": 0.21,
                        }
                    ],
                    "finish_reason": "stop",
                    "cached": False,
                    "request_id": "0b7d1c6a4f3e4b2d9c8a7e6f5d4c3b2a",
                    "latency_ms": 812.4,
                }
            ]
        }
    )

    answer: str = Field(description="The agent's final answer.")
    session_id: uuid.UUID = Field(description="Pass it back to continue the conversation.")
    agent: str = Field(description="The agent that answered.")
    model: str = Field(description="The model id the upstream reported.")
    usage: UsageOut
    steps: list[StepOut] = Field(description="The tool calls made on the way, in order.")
    finish_reason: Literal["stop", "max_steps", "length"] = Field(
        description="`stop`: a final answer; `max_steps`: the step limit was reached; "
        "`length`: the model hit its token limit."
    )
    cached: bool = Field(description="Answered from the response cache (no tokens spent).")
    request_id: str = Field(description="Also in the X-Request-ID header; quote it in reports.")
    latency_ms: float = Field(description="Time spent in the service for this turn.")

    @classmethod
    def from_output(cls, output: QueryOutput, request_id: str) -> QueryResponse:
        usage = output.usage
        return cls(
            answer=output.answer,
            session_id=output.session_id,
            agent=output.agent,
            model=output.model,
            usage=UsageOut(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            steps=[
                StepOut(
                    tool=step.tool,
                    arguments=step.arguments,
                    result=step.result,
                    is_error=step.is_error,
                    duration_ms=round(step.duration_ms, 3),
                )
                for step in output.steps
            ],
            finish_reason=output.finish_reason,
            cached=output.cached,
            request_id=request_id,
            latency_ms=round(output.latency_ms, 3),
        )


RATE_LIMIT_HEADERS: dict[str, Any] = {
    "RateLimit-Limit": {
        "description": "Requests allowed in the current window.",
        "schema": {"type": "integer"},
    },
    "RateLimit-Remaining": {
        "description": "Requests left in the current window.",
        "schema": {"type": "integer"},
    },
    "RateLimit-Reset": {
        "description": "Seconds until the window frees capacity.",
        "schema": {"type": "integer"},
    },
}
"""The caller's standing in its rate limit (draft-ietf-httpapi-ratelimit-headers)."""

REQUEST_ID_HEADER: dict[str, Any] = {
    "X-Request-ID": {
        "description": "The request's id (the caller's own when it sent a valid one).",
        "schema": {"type": "string"},
    }
}

QUERY_HEADERS: dict[str, Any] = {
    **REQUEST_ID_HEADER,
    "X-Cache": {
        "description": "`HIT` when the answer came from the response cache, else `MISS`.",
        "schema": {"type": "string", "enum": ["HIT", "MISS"]},
    },
    **RATE_LIMIT_HEADERS,
}
"""Response headers of a successful query."""

RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable machine code, e.g. `validation_error`, `rate_limited`.",
        examples=["validation_error"],
    )
    message: str = Field(description="What went wrong, for a person.")
    request_id: str = Field(description="The request's id, as in X-Request-ID.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems of an invalid body."
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class CheckOut(BaseModel):
    status: Literal["ok", "fail", "degraded", "info"]
    latency_ms: float | None = None
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckOut]

    @classmethod
    def from_readiness(cls, readiness: Readiness) -> ReadyResponse:
        return cls(
            status="ready" if readiness.ready else "not_ready",
            checks={
                name: CheckOut(status=c.status, latency_ms=c.latency_ms, detail=c.detail)
                for name, c in readiness.checks.items()
            },
        )


class SessionOut(BaseModel):
    id: uuid.UUID
    agent: str = Field(description="The agent the session talks to.")
    message_count: int = Field(description="Messages stored (user, assistant and tool).")
    metadata: dict[str, Any] = Field(description="What the first request attached.")
    created_at: AwareDatetime
    updated_at: AwareDatetime

    @classmethod
    def from_record(cls, record: SessionRecord) -> SessionOut:
        return cls(
            id=record.id,
            agent=record.agent,
            message_count=record.message_count,
            metadata=record.metadata,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )


class SessionPage(BaseModel):
    sessions: list[SessionOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int = Field(description="Position in the session, from 1.")
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    name: str | None
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None = Field(description="The request that wrote it.")
    created_at: AwareDatetime


class SessionDetail(SessionOut):
    messages: list[MessageOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class AgentOut(BaseModel):
    name: str
    description: str
    model: str = Field(description="The model id its first upstream is asked for.")
    tools: list[str]
    max_steps: int
    pool_size: int
