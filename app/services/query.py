"""QueryService: one turn of a conversation.

load session → cache lookup → (miss) lease an agent and run it → write the whole turn in
one transaction. A database connection is held only while loading and while writing,
never across the LLM call; the agent goes back to its pool before the write. A cache hit
still writes the turn, so the stored conversation is always complete.

`answer` returns the finished turn; `open_stream` runs the same turn in a task and hands
its events over as they happen (`TurnStream`). A turn continues a stored session, starts a
new one, or (the /v1 API) answers a conversation the client keeps itself (`history`): that
turn is stored as a new session holding the client's messages, the user's and the answer.
Everything that can refuse a turn (limits, unknown agent or session, busy session, no agent
free in time) refuses it before `open_stream` returns, so an HTTP stream starts only for a
turn that is under way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.agents.agent import (
    Agent,
    AgentEvent,
    AgentResult,
    FinishReason,
    RunOptions,
    StepRecord,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    collect,
)
from app.agents.pool import AgentPool
from app.agents.spec import AgentSpec
from app.cache import ResponseCache, cache_key, history_digest
from app.domain import Message, StoredMessage, Turn, Usage
from app.errors import (
    AgentForbiddenError,
    AgentMismatchError,
    AgentNotFoundError,
    DeadlineExceededError,
    InvalidRequestError,
    SessionBusyError,
    SessionFullError,
    SessionNotFoundError,
    UpstreamUnavailableError,
)
from app.llm.types import LLMError
from app.storage import TurnRepository

logger = logging.getLogger(__name__)

__all__ = [
    "ActiveTurns",
    "CachePolicy",
    "QueryInput",
    "QueryOutput",
    "QueryService",
    "RunOptions",
    "StreamEvent",
    "TextDelta",
    "ToolCallFinished",
    "ToolCallStarted",
    "TurnStarted",
    "TurnStream",
    "busy_error",
    "decode_result",
    "encode_result",
]


@dataclass(slots=True, frozen=True)
class CachePolicy:
    """What the caller allows: `read` (no-cache turns it off), `write` (no-store), `ttl`."""

    read: bool = True
    write: bool = True
    ttl: int | None = None


@dataclass(slots=True, frozen=True)
class QueryInput:
    message: str
    session_id: uuid.UUID | None = None
    agent: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None
    allowed_agents: frozenset[str] | None = None
    request_id: str | None = None
    cache: CachePolicy = CachePolicy()
    history: Sequence[Message] | None = None
    """A new session only: the conversation before `message`, as the client keeps it (/v1).
    It goes to the model after the agent's instructions, and is stored with the turn."""
    options: RunOptions | None = None
    """Model options of this request (/v1), within the agent's limits; None: the agent's."""
    metadata_must_match: bool = False
    """Continuing a session: refuse `metadata` that disagrees with the session's (/v1 never
    drops a parameter silently); otherwise it is only stored with a new session."""


@dataclass(slots=True)
class QueryOutput:
    answer: str
    session_id: uuid.UUID
    agent: str
    model: str
    usage: Usage
    steps: list[StepRecord]
    finish_reason: FinishReason
    cached: bool
    latency_ms: float


@dataclass(slots=True, frozen=True)
class TurnStarted:
    """A streamed turn has its agent (a cache miss): the model's events follow."""

    session_id: uuid.UUID
    agent: str


StreamEvent = TurnStarted | TextDelta | ToolCallStarted | ToolCallFinished | QueryOutput
"""What a TurnStream yields: TurnStarted (misses only), the agent's events, and last the
QueryOutput that `answer` would have returned (for a cache hit, the only event)."""


@dataclass(slots=True, frozen=True)
class _Failed:
    error: Exception


class TurnStream:
    """A turn running in its own task, its events read in order with `events()`.

    `aclose()` cancels a turn that has not finished (the client went away): the agent's
    upstream call is cancelled, the agent goes back to its pool, nothing is stored and the
    cache is not written. It is safe to call more than once, and after the end.
    """

    def __init__(
        self, task: asyncio.Task[None], queue: asyncio.Queue[StreamEvent | _Failed]
    ) -> None:
        self._task = task
        self._queue = queue
        self.first: StreamEvent | None = None

    async def start(self) -> StreamEvent:
        """Wait for the first event; raise the AppError of a turn refused before it."""
        try:
            first = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(first, _Failed):
            await self.aclose()
            raise first.error
        self.first = first
        return first

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The events after `start()`, the first included; raises the turn's error."""
        item: StreamEvent | _Failed | None = self.first
        while item is not None:
            if isinstance(item, _Failed):
                raise item.error
            yield item
            item = None if isinstance(item, QueryOutput) else await self._queue.get()

    @property
    def finished(self) -> bool:
        return self._task.done()

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])


class ActiveTurns:
    """The sessions answering a turn in this process right now: a second turn of the same
    session is refused at once (409) rather than racing the first to the database, and a
    session is not erased under a running turn (whose cache entries would outlive it)."""

    def __init__(self) -> None:
        self.sessions: set[uuid.UUID] = set()

    def __contains__(self, session_id: uuid.UUID) -> bool:
        return session_id in self.sessions

    def begin(self, session_id: uuid.UUID) -> None:
        if session_id in self.sessions:
            raise busy_error(session_id)
        self.sessions.add(session_id)

    def end(self, session_id: uuid.UUID) -> None:
        self.sessions.discard(session_id)


def busy_error(session_id: uuid.UUID) -> SessionBusyError:
    return SessionBusyError(
        f"session {session_id} is answering another request; retry when it has finished",
        retry_after=1.0,
    )


async def forward(
    events: AsyncIterator[AgentEvent], on_event: Callable[[StreamEvent], None]
) -> AgentResult:
    """Hand an agent run's events to `on_event` and return its result."""
    async for event in events:
        if isinstance(event, AgentResult):
            return event
        on_event(event)
    raise RuntimeError("an agent run ended without a result")


def encode_result(result: AgentResult) -> bytes:
    """A finished turn as the cache stores it (compact JSON, no pydantic on the hot path)."""
    return orjson.dumps(
        {
            "answer": result.answer,
            "model": result.model,
            "usage": [result.usage.prompt_tokens, result.usage.completion_tokens],
            "steps": [
                [s.tool, s.arguments, s.result, s.is_error, s.duration_ms] for s in result.steps
            ],
            "finish_reason": result.finish_reason,
            "messages": result.messages,
            "message_usage": [[u.prompt_tokens, u.completion_tokens] for u in result.message_usage],
        }
    )


def decode_result(raw: bytes) -> AgentResult:
    data = orjson.loads(raw)
    return AgentResult(
        answer=data["answer"],
        model=data["model"],
        usage=Usage(*data["usage"]),
        steps=[StepRecord(*step) for step in data["steps"]],
        finish_reason=data["finish_reason"],
        messages=data["messages"],
        message_usage=[Usage(*u) for u in data["message_usage"]],
    )


class QueryService:
    def __init__(
        self,
        *,
        turns: TurnRepository,
        specs: dict[str, AgentSpec],
        pools: dict[str, AgentPool[Agent]],
        cache: ResponseCache | None,
        active: ActiveTurns,
        default_agent: str,
        default_model: str,
        fingerprints: dict[str, str],
        default_cache_ttl: int,
        session_max_messages: int,
        max_message_chars: int,
        max_metadata_bytes: int,
        deadline: float,
        on_turn_saved: Callable[[str, list[StepRecord], bool], None] | None = None,
    ) -> None:
        self._turns = turns
        self._specs = specs
        self._pools = pools
        self._cache = cache
        self._active = active
        self._default_agent = default_agent
        self._default_model = default_model
        self._default_cache_ttl = default_cache_ttl
        self._session_max_messages = session_max_messages
        self._max_message_chars = max_message_chars
        self._max_metadata_bytes = max_metadata_bytes
        self._deadline = deadline
        self._fingerprints = fingerprints
        self._on_turn_saved = on_turn_saved

    def agents(self) -> list[AgentSpec]:
        return list(self._specs.values())

    def model_id(self, spec: AgentSpec) -> str:
        return spec.model or self._default_model

    def spec(self, name: str | None, allowed: frozenset[str] | None = None) -> AgentSpec:
        name = name or self._default_agent
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs))
            raise AgentNotFoundError(f"unknown agent {name!r}; available agents: {known}")
        if allowed is not None and name not in allowed:
            raise AgentForbiddenError(f"this token may not use agent {name!r}")
        return spec

    def check(self, query: QueryInput) -> None:
        """The configured limits on what a caller may send (the API's schema checks the
        rest); InvalidRequestError names the one exceeded."""
        if len(query.message) > self._max_message_chars:
            raise InvalidRequestError(
                f"message: at most {self._max_message_chars} characters are allowed "
                f"(got {len(query.message)})"
            )
        if query.metadata and len(orjson.dumps(query.metadata)) > self._max_metadata_bytes:
            raise InvalidRequestError(
                f"metadata: at most {self._max_metadata_bytes} bytes of JSON are allowed"
            )
        if query.history and len(query.history) >= self._session_max_messages:
            raise InvalidRequestError(
                f"messages: at most {self._session_max_messages} are allowed "
                f"(got {len(query.history) + 1})"
            )

    async def answer(
        self, query: QueryInput, on_event: Callable[[StreamEvent], None] | None = None
    ) -> QueryOutput:
        """One turn within the request deadline (DeadlineExceededError: nothing stored).
        With `on_event`, a cache miss reports TurnStarted once it has its agent, then the
        agent's events as they happen."""
        self.check(query)
        try:
            async with asyncio.timeout(self._deadline) as deadline:
                return await self._answer(query, on_event)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DeadlineExceededError(
                f"the request did not finish within {self._deadline:g}s; the turn was not completed"
            ) from None

    async def open_stream(self, query: QueryInput) -> TurnStream:
        """The turn in a task of its own, once it is under way: after its first event (a
        miss has its agent; a hit is finished), or the error that refused it."""
        queue: asyncio.Queue[StreamEvent | _Failed] = asyncio.Queue()

        async def produce() -> None:
            try:
                queue.put_nowait(await self.answer(query, queue.put_nowait))
            except Exception as exc:  # handed to the reader, who raises it
                queue.put_nowait(_Failed(exc))

        stream = TurnStream(asyncio.create_task(produce(), name="turn-stream"), queue)
        await stream.start()
        return stream

    async def _answer(
        self, query: QueryInput, on_event: Callable[[StreamEvent], None] | None
    ) -> QueryOutput:
        started = time.perf_counter()
        history: Sequence[Message]
        if query.session_id is None:
            spec = self.spec(query.agent, query.allowed_agents)
            session_id, history, expected, digest, is_new = uuid.uuid4(), [], 0, "", True
            key_digest = ""
            if query.history:  # the client's conversation names the answer, as a stored one does
                history = query.history
                key_digest = history_digest(history)
        else:
            record = await self._turns.load(query.session_id)
            if record is None or record.owner != query.owner:
                raise SessionNotFoundError(f"session {query.session_id} does not exist")
            if query.agent is not None and query.agent != record.agent:
                raise AgentMismatchError(
                    f"session {record.id} belongs to agent {record.agent!r}, "
                    f"not {query.agent!r}; omit `agent` to continue it"
                )
            spec = self.spec(record.agent, query.allowed_agents)
            if record.message_count >= self._session_max_messages:
                raise SessionFullError(
                    f"session {record.id} holds {record.message_count} messages, the most "
                    f"allowed is {self._session_max_messages}; start a new session"
                )
            if query.metadata_must_match and any(
                record.metadata.get(key) != value for key, value in query.metadata.items()
            ):
                raise InvalidRequestError(
                    f"metadata: session {record.id} was started with other metadata (or user); "
                    "they are stored when a session starts and cannot change"
                )
            session_id, history = record.id, record.history
            expected, digest, is_new = record.message_count, record.history_digest, False
            key_digest = digest
        options = None if query.options is None else self._options(spec, query.options)

        self._active.begin(session_id)
        try:
            pool = self._pools[spec.name]
            computed: AgentResult | None = None

            async def run_agent() -> AgentResult:
                async with pool.lease() as agent:
                    if on_event is None:
                        return await collect(agent.run(history, query.message, options=options))
                    on_event(TurnStarted(session_id, spec.name))
                    return await forward(
                        agent.run(history, query.message, stream=True, options=options), on_event
                    )

            async def run_for_cache() -> bytes:
                nonlocal computed
                computed = await run_agent()
                return encode_result(computed)

            try:
                if self._cache is None:
                    answer, hit = await run_agent(), False
                else:
                    key = cache_key(
                        fingerprint=self._fingerprints[spec.name]
                        if options is None
                        else self._fingerprint(spec, options),
                        history_digest=key_digest,
                        message=query.message,
                        scope=self._cache_scope(spec, query.owner),
                    )
                    raw, hit = await self._cache.get_or_compute(
                        key,
                        run_for_cache,
                        ttl=query.cache.ttl or spec.cache_ttl or self._default_cache_ttl,
                        read=query.cache.read,
                        write=query.cache.write,
                        session_id=str(session_id),
                    )
                    # what this request computed itself needs no decoding
                    answer = computed if computed is not None and not hit else decode_result(raw)
            except LLMError as exc:
                logger.warning("LLM unavailable", extra={"error": str(exc)})
                raise UpstreamUnavailableError(exc.retry_after) from exc
            await self._save(query, spec, session_id, is_new, expected, digest, answer, hit)
        finally:
            self._active.end(session_id)

        return QueryOutput(
            answer=answer.answer,
            session_id=session_id,
            agent=spec.name,
            model=answer.model,
            usage=Usage() if hit else answer.usage,
            steps=answer.steps,
            finish_reason=answer.finish_reason,
            cached=hit,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    @staticmethod
    def _options(spec: AgentSpec, options: RunOptions) -> RunOptions | None:
        """The request's options within the agent's limits; None when they come to the
        agent's own, so that such a turn shares its cache entries with any other."""
        effective = options.within(spec)
        return None if effective == RunOptions(spec.temperature, spec.max_tokens) else effective

    def _fingerprint(self, spec: AgentSpec, options: RunOptions) -> str:
        """The agent's fingerprint with the options that change its answers."""
        fingerprint = self._fingerprints[spec.name]
        shaping = [fingerprint, options.temperature, options.max_tokens, options.stop, options.seed]
        return hashlib.sha256(orjson.dumps(shaping)).hexdigest()

    @staticmethod
    def _cache_scope(spec: AgentSpec, owner: str | None) -> str:
        """Per subject on /secure-query unless the agent is shared; anonymous callers share."""
        if spec.cache_shared:
            return "shared"
        return "anon" if owner is None else f"sub:{owner}"

    async def _save(
        self,
        query: QueryInput,
        spec: AgentSpec,
        session_id: uuid.UUID,
        is_new: bool,
        expected: int,
        digest: str,
        answer: AgentResult,
        hit: bool,
    ) -> None:
        stored = [StoredMessage({"role": "user", "content": query.message})]
        if is_new and query.history:  # a new session holds the client's conversation before
            stored[:0] = [StoredMessage(message) for message in query.history]
        for message, usage in zip(answer.messages, answer.message_usage, strict=True):
            if hit:  # no tokens were spent on this turn
                stored.append(StoredMessage(message))
            else:
                stored.append(StoredMessage(message, usage.prompt_tokens, usage.completion_tokens))
        turn = Turn(
            session_id=session_id,
            agent=spec.name,
            owner=query.owner,
            is_new=is_new,
            expected_count=expected,
            previous_digest=digest,
            messages=stored,
            request_id=query.request_id,
            metadata=query.metadata,
        )
        try:
            await self._turns.save_turn(turn)
        except SessionBusyError:
            if not is_new and await self._turns.load(session_id, with_history=False) is None:
                if self._cache is not None:  # this turn's entry outlived the erasure
                    await self._cache.forget_session(str(session_id))
                raise SessionNotFoundError(
                    f"session {session_id} was deleted while this turn ran"
                ) from None
            raise busy_error(session_id) from None
        if self._on_turn_saved is not None:
            self._on_turn_saved(spec.name, answer.steps, hit)
