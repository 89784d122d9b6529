"""QueryService: one turn of a conversation, with no HTTP types in sight.

load session → lease an agent → run it → write the whole turn in one transaction.
A database connection is held only while loading and while writing, never across the LLM
call; the agent goes back to its pool before the write.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.agents.agent import Agent, AgentResult, StepRecord, collect
from app.agents.pool import AgentPool
from app.agents.spec import AgentSpec
from app.llm.types import Usage
from app.storage.sessions import SessionBusyError, SessionStore, StoredMessage, Turn

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure the caller can act on; the API maps `code` to an HTTP status."""

    code = "error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class AgentNotFoundError(ServiceError):
    code = "agent_not_found"


class SessionNotFoundError(ServiceError):
    code = "session_not_found"


class SessionBusy(ServiceError):  # noqa: N818 - named after its error code
    code = "session_busy"


class AgentMismatchError(ServiceError):
    code = "agent_mismatch"


@dataclass(slots=True, frozen=True)
class QueryInput:
    message: str
    session_id: uuid.UUID | None = None
    agent: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None
    request_id: str | None = None


@dataclass(slots=True)
class QueryOutput:
    answer: str
    session_id: uuid.UUID
    agent: str
    model: str
    usage: Usage
    steps: list[StepRecord]
    finish_reason: str
    cached: bool
    latency_ms: float


class QueryService:
    def __init__(
        self,
        *,
        store: SessionStore,
        specs: dict[str, AgentSpec],
        pools: dict[str, AgentPool[Agent]],
        default_agent: str,
        on_turn_saved: Callable[[str, AgentResult], None] | None = None,
    ) -> None:
        self._store = store
        self._specs = specs
        self._pools = pools
        self._default_agent = default_agent
        self._busy: set[uuid.UUID] = set()
        self._on_turn_saved = on_turn_saved

    def spec(self, name: str | None) -> AgentSpec:
        name = name or self._default_agent
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs))
            raise AgentNotFoundError(f"unknown agent {name!r}; available agents: {known}")
        return spec

    async def answer(self, query: QueryInput) -> QueryOutput:
        started = time.perf_counter()
        if query.session_id is None:
            spec = self.spec(query.agent)
            session_id, history, expected, is_new = uuid.uuid4(), [], 0, True
        else:
            record = await self._store.load(query.session_id)
            if record is None or record.owner != query.owner:
                raise SessionNotFoundError(f"session {query.session_id} does not exist")
            if query.agent is not None and query.agent != record.agent:
                raise AgentMismatchError(
                    f"session {record.id} belongs to agent {record.agent!r}, "
                    f"not {query.agent!r}; omit `agent` to continue it"
                )
            spec = self.spec(record.agent)
            session_id, history = record.id, record.history
            expected, is_new = record.message_count, False

        if session_id in self._busy:
            raise self._busy_error(session_id)
        self._busy.add(session_id)
        try:
            async with self._pools[spec.name].lease() as agent:
                result = await collect(agent.run(history, query.message))
            await self._save(query, spec, session_id, is_new, expected, result)
        finally:
            self._busy.discard(session_id)

        return QueryOutput(
            answer=result.answer,
            session_id=session_id,
            agent=spec.name,
            model=result.model,
            usage=result.usage,
            steps=result.steps,
            finish_reason=result.finish_reason,
            cached=False,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def _save(
        self,
        query: QueryInput,
        spec: AgentSpec,
        session_id: uuid.UUID,
        is_new: bool,
        expected: int,
        result: AgentResult,
    ) -> None:
        stored = [StoredMessage({"role": "user", "content": query.message})]
        stored += [
            StoredMessage(message, usage.prompt_tokens, usage.completion_tokens)
            for message, usage in zip(result.messages, result.message_usage, strict=True)
        ]
        turn = Turn(
            session_id=session_id,
            agent=spec.name,
            owner=query.owner,
            is_new=is_new,
            expected_count=expected,
            messages=stored,
            request_id=query.request_id,
            metadata=query.metadata,
        )
        try:
            await self._store.save_turn(turn)
        except SessionBusyError:
            raise self._busy_error(session_id) from None
        if self._on_turn_saved is not None:
            self._on_turn_saved(spec.name, result)

    @staticmethod
    def _busy_error(session_id: uuid.UUID) -> SessionBusy:
        return SessionBusy(
            f"session {session_id} is answering another request; retry when it has finished",
            retry_after=1.0,
        )
