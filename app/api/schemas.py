"""Request and response bodies: pydantic at the edge only."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

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
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StepOut(BaseModel):
    tool: str
    arguments: str
    result: str
    is_error: bool
    duration_ms: float


class QueryResponse(BaseModel):
    answer: str
    session_id: uuid.UUID
    agent: str
    model: str
    usage: UsageOut
    steps: list[StepOut]
    finish_reason: Literal["stop", "max_steps", "length"]
    cached: bool
    request_id: str
    latency_ms: float


class ErrorBody(BaseModel):
    code: str = Field(examples=["validation_error"])
    message: str
    request_id: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class CheckOut(BaseModel):
    status: Literal["ok", "fail", "degraded", "info"]
    latency_ms: float | None = None
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckOut]


class SessionOut(BaseModel):
    id: uuid.UUID
    agent: str
    message_count: int
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class SessionPage(BaseModel):
    sessions: list[SessionOut]
    limit: int
    offset: int
    next_offset: int | None


class MessageOut(BaseModel):
    seq: int
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    name: str | None
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None
    created_at: datetime


class SessionDetail(SessionOut):
    messages: list[MessageOut]
    limit: int
    offset: int
    next_offset: int | None


class AgentOut(BaseModel):
    name: str
    description: str
    model: str
    tools: list[str]
    max_steps: int
    pool_size: int
