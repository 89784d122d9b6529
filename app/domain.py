"""Plain types every layer may use: messages, token usage, and a conversation's turns.

Messages travel in the OpenAI Chat Completions wire shape (plain dicts), because that is what
every upstream speaks and what gets stored; everything else is a small dataclass.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Message = dict[str, Any]
"""One chat message in OpenAI wire shape: {"role": ..., "content": ..., ...}."""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class StoredMessage:
    """A message to write: the wire shape plus the tokens its answer cost."""

    message: Message
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Turn:
    """One exchange to write atomically: the user's message and everything it led to.

    `expected_count` is the session's message count when the turn began (its version): the
    write succeeds only if nobody wrote to the session since.
    """

    session_id: uuid.UUID
    agent: str
    owner: str | None
    is_new: bool
    expected_count: int
    previous_digest: str
    messages: Sequence[StoredMessage]
    request_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SessionRecord:
    """A stored session; `history` is its last messages (oldest first) when asked for."""

    id: uuid.UUID
    owner: str | None
    agent: str
    message_count: int
    history_digest: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    history: list[Message] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class MessageRecord:
    """A stored message with its bookkeeping, as a session's transcript shows it."""

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
