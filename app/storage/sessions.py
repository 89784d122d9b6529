"""SessionStore: load a conversation, write one turn atomically.

Core statements over the ORM tables (no identity map): a turn is a handful of rows and
this is the hot path. A connection is held only inside `load` and `save_turn`, never while
an agent waits for the LLM. On Postgres (asyncpg), `load` and `save_turn` run hand-written
SQL on the pooled asyncpg connection instead (app/storage/postgres_turns.py: SQLAlchemy's
async layer cost more CPU per turn than the statements); the rest stays on Core.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import orjson
import sqlalchemy.exc
from sqlalchemy import Table, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.llm.types import Message
from app.storage.models import ChatMessage, ChatSession

if TYPE_CHECKING:
    from app.storage.postgres_turns import PostgresTurns

_messages = cast(Table, ChatMessage.__table__)
_sessions = cast(Table, ChatSession.__table__)


class SessionBusyError(Exception):
    """Another turn was written to the session since this one loaded it."""


class DatabaseUnavailableError(Exception):
    """The database could not be reached or did not answer (not a problem with the data)."""


_UNREACHABLE = (
    sqlalchemy.exc.OperationalError,  # refused, lost, shutting down, SQLite locked
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection within DB_POOL_TIMEOUT
    OSError,  # asyncpg's connect errors arrive unwrapped (refused, DNS, connect timeout)
)


UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
"""Connection exceptions, insufficient resources (too many connections), operator
intervention (shutting down, starting up): the server, not the data."""


def _server_side_unavailable(exc: sqlalchemy.exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES):
            return True
    return False


@asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    try:
        yield
    except _UNREACHABLE as exc:
        raise DatabaseUnavailableError(repr(exc)[:300]) from exc
    except sqlalchemy.exc.DBAPIError as exc:
        if _server_side_unavailable(exc):
            raise DatabaseUnavailableError(repr(exc)[:300]) from exc
        raise


def next_history_digest(previous: str, messages: Sequence[Message]) -> str:
    """Chain the turn's messages onto the digest of everything before them.

    The digest names the whole conversation without reading it back, so two sessions share
    a digest only if every message they ever held is the same.
    """
    canonical = orjson.dumps(
        [
            [m.get("role"), m.get("content"), m.get("tool_calls"), m.get("tool_call_id")]
            for m in messages
        ]
    )
    return hashlib.sha256(previous.encode() + b"\n" + canonical).hexdigest()


@dataclass(slots=True)
class SessionRecord:
    id: uuid.UUID
    owner: str | None
    agent: str
    message_count: int
    history_digest: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    history: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class StoredMessage:
    """A message to write: wire shape plus bookkeeping."""

    message: Message
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Turn:
    session_id: uuid.UUID
    agent: str
    owner: str | None
    is_new: bool
    expected_count: int
    previous_digest: str
    messages: Sequence[StoredMessage]
    request_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _text(value: Any) -> Any:
    """Postgres text cannot hold NUL; a model may still produce one. Keep the rest intact."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _to_wire(row: Any) -> Message:
    message: Message = {"role": row.role, "content": row.content}
    if row.tool_calls:
        message["tool_calls"] = row.tool_calls
    if row.tool_call_id:
        message["tool_call_id"] = row.tool_call_id
    if row.name and row.role == "tool":
        message["name"] = row.name
    return message


def trim_history(history: list[Message]) -> list[Message]:
    """A window cut mid-turn may start with tool results; start it at a user message."""
    for index, message in enumerate(history):
        if message["role"] == "user":
            return history[index:]
    return []


class SessionStore:
    def __init__(
        self, engine: AsyncEngine, *, history_limit: int, asyncpg_fast_path: bool = True
    ) -> None:
        """`asyncpg_fast_path=False` keeps Postgres on SQLAlchemy Core too (the tests compare
        both paths); SQLite and other drivers always use Core."""
        self._engine = engine
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._history_limit = history_limit
        self._postgres: PostgresTurns | None = None
        if asyncpg_fast_path and engine.dialect.driver == "asyncpg":
            from app.storage.postgres_turns import PostgresTurns  # imports this module

            self._postgres = PostgresTurns(engine)

    def _fast_path(self) -> PostgresTurns | None:
        postgres = self._postgres
        return None if postgres is None or postgres.observed() else postgres

    async def load(
        self, session_id: uuid.UUID, *, with_history: bool = True
    ) -> SessionRecord | None:
        """The session and its last `history_limit` messages (oldest first), in ONE query.

        Sequence numbers are dense (1..message_count), so the window is an index range:
        `seq > message_count - limit`, whatever the session's length. Reads run in
        autocommit mode: no BEGIN/ROLLBACK round trips for a single SELECT.
        """
        postgres = self._fast_path()
        if postgres is not None:
            return await postgres.load(
                session_id, history_limit=self._history_limit, with_history=with_history
            )
        query = select(_sessions).where(_sessions.c.id == session_id)
        if with_history:
            window = and_(
                _messages.c.session_id == _sessions.c.id,
                _messages.c.seq > _sessions.c.message_count - self._history_limit,
            )
            query = (
                select(
                    _sessions,
                    _messages.c.role,
                    _messages.c.content,
                    _messages.c.tool_calls,
                    _messages.c.tool_call_id,
                    _messages.c.name,
                )
                .select_from(_sessions.outerjoin(_messages, window))
                .where(_sessions.c.id == session_id)
                .order_by(_messages.c.seq)
            )
        async with _reachable(), self._reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return None
        row = rows[0]
        history = [_to_wire(r) for r in rows if r.role is not None] if with_history else []
        return SessionRecord(
            id=row.id,
            owner=row.owner,
            agent=row.agent,
            message_count=row.message_count,
            history_digest=row.history_digest,
            metadata=row.metadata or {},
            created_at=row.created_at,
            updated_at=row.updated_at,
            history=trim_history(history),
        )

    async def save_turn(self, turn: Turn) -> None:
        """Write the whole turn in one transaction, or nothing (SessionBusyError)."""
        now = datetime.now(UTC)
        digest = next_history_digest(turn.previous_digest, [s.message for s in turn.messages])
        postgres = self._fast_path()
        if postgres is not None:
            await postgres.save_turn(turn, digest=digest, now=now)
            return
        first_seq = turn.expected_count + 1
        rows = [
            {
                "session_id": turn.session_id,
                "seq": first_seq + offset,
                "role": stored.message["role"],
                "content": _text(stored.message.get("content")),
                "tool_calls": stored.message.get("tool_calls"),
                "tool_call_id": _text(stored.message.get("tool_call_id")),
                "name": _text(stored.message.get("name")),
                "prompt_tokens": stored.prompt_tokens,
                "completion_tokens": stored.completion_tokens,
                "request_id": turn.request_id,
                "created_at": now,
            }
            for offset, stored in enumerate(turn.messages)
        ]
        new_count = turn.expected_count + len(rows)
        try:
            async with _reachable(), self._engine.begin() as conn:
                if turn.is_new:
                    await conn.execute(
                        insert(_sessions).values(
                            id=turn.session_id,
                            owner=turn.owner,
                            agent=turn.agent,
                            message_count=new_count,
                            history_digest=digest,
                            metadata=turn.metadata,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                else:
                    result = await conn.execute(
                        update(_sessions)
                        .where(
                            _sessions.c.id == turn.session_id,
                            _sessions.c.message_count == turn.expected_count,
                        )
                        .values(message_count=new_count, history_digest=digest, updated_at=now)
                    )
                    if result.rowcount != 1:
                        raise SessionBusyError(str(turn.session_id))
                await conn.execute(insert(_messages), rows)
        except IntegrityError as exc:  # a concurrent writer took the same seq numbers
            raise SessionBusyError(str(turn.session_id)) from exc

    async def list_sessions(self, owner: str, *, limit: int, offset: int) -> list[dict[str, Any]]:
        """The owner's sessions, most recently active first (index: owner, updated_at)."""
        async with _reachable(), self._reader.connect() as conn:
            result = await conn.execute(
                select(
                    _sessions.c.id,
                    _sessions.c.agent,
                    _sessions.c.message_count,
                    _sessions.c.metadata,
                    _sessions.c.created_at,
                    _sessions.c.updated_at,
                )
                .where(_sessions.c.owner == owner)
                .order_by(_sessions.c.updated_at.desc(), _sessions.c.id)
                .limit(limit)
                .offset(offset)
            )
            return [dict(row._mapping) for row in result]

    async def messages(
        self, session_id: uuid.UUID, *, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """Stored messages in conversation order, with their bookkeeping columns."""
        async with _reachable(), self._reader.connect() as conn:
            result = await conn.execute(
                select(
                    _messages.c.seq,
                    _messages.c.role,
                    _messages.c.content,
                    _messages.c.tool_calls,
                    _messages.c.tool_call_id,
                    _messages.c.name,
                    _messages.c.prompt_tokens,
                    _messages.c.completion_tokens,
                    _messages.c.request_id,
                    _messages.c.created_at,
                )
                .where(_messages.c.session_id == session_id)
                .order_by(_messages.c.seq)
                .limit(limit)
                .offset(offset)
            )
            return [dict(row._mapping) for row in result]

    async def count_messages(self, session_id: uuid.UUID) -> int:
        async with _reachable(), self._reader.connect() as conn:
            result = await conn.execute(
                select(func.count()).where(_messages.c.session_id == session_id)
            )
            return int(result.scalar_one())

    async def delete(self, session_id: uuid.UUID) -> bool:
        async with _reachable(), self._engine.begin() as conn:
            await conn.execute(delete(_messages).where(_messages.c.session_id == session_id))
            result = await conn.execute(delete(_sessions).where(_sessions.c.id == session_id))
            return bool(result.rowcount)
