"""The turn repository: how the services reach stored conversations, whatever the database.

`TurnRepository` is the one storage interface; `app.storage.open_repository` picks its
implementation once, at start-up, from the database URL (`SqlTurnRepository` on SQLAlchemy
Core, or `PostgresTurnRepository`, which answers the two hot calls in one statement each).
A connection is held only inside a call, never while an agent waits for the LLM.

Failures: a database that cannot be reached, or whose connection broke under a call, is
`DatabaseUnavailableError` (503); a turn that lost a race for its session is
`SessionBusyError` (409). Anything else is a bug and propagates.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import orjson
import sqlalchemy.exc

from app.domain import Message, MessageRecord, SessionRecord, Turn
from app.errors import DatabaseUnavailableError


class TurnRepository(Protocol):
    async def load(
        self, session_id: uuid.UUID, *, with_history: bool = True
    ) -> SessionRecord | None:
        """The session and (with_history) its last messages, oldest first, starting at a
        user message; None if there is no such session."""
        ...

    async def save_turn(self, turn: Turn) -> None:
        """Write the whole turn in one transaction, or nothing (SessionBusyError)."""
        ...

    async def list_sessions(self, owner: str, *, limit: int, offset: int) -> list[SessionRecord]:
        """The owner's sessions (no history), most recently active first."""
        ...

    async def messages(
        self, session_id: uuid.UUID, *, limit: int, offset: int
    ) -> list[MessageRecord]:
        """A session's stored messages in conversation order."""
        ...

    async def delete(self, session_id: uuid.UUID) -> bool:
        """Erase a session and its messages; False if there was none."""
        ...

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None: not migrated); for /ready."""
        ...

    async def aclose(self) -> None: ...


UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
"""Connection exceptions, insufficient resources (too many connections), operator
intervention (shutting down, starting up): the server, not the data."""

_UNREACHABLE = (
    sqlalchemy.exc.OperationalError,  # refused, lost, shutting down, SQLite locked
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection within DB_POOL_TIMEOUT
    OSError,  # the driver's connect errors may arrive unwrapped (refused, DNS, timeout)
)


def is_unavailable(exc: BaseException) -> bool:
    """The server, not the data: unreachable, a connection SQLAlchemy found dead, or an
    error whose SQLSTATE (on it or the driver error it wraps) is of the classes above."""
    if isinstance(exc, _UNREACHABLE):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        causes: tuple[object, ...] = (exc.orig, getattr(exc.orig, "__cause__", None))
    else:
        causes = (exc, exc.__cause__)
    for error in causes:
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES):
            return True
    return False


@asynccontextmanager
async def reachable() -> AsyncIterator[None]:
    """Raise DatabaseUnavailableError for failures of the server; leave the rest alone."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailableError(repr(exc)[:300]) from exc
        raise


def next_history_digest(previous: str, messages: Sequence[Message]) -> str:
    """Chain the turn's messages onto the digest of everything before them.

    The digest names the whole conversation without reading it back, so two sessions share
    a digest only if every message they ever held is the same (cache keys use it).
    """
    canonical = orjson.dumps(
        [
            [m.get("role"), m.get("content"), m.get("tool_calls"), m.get("tool_call_id")]
            for m in messages
        ]
    )
    return hashlib.sha256(previous.encode() + b"\n" + canonical).hexdigest()


def storable_text(value: Any) -> Any:
    """Postgres text cannot hold NUL; a model may still produce one. Keep the rest intact."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def trim_history(history: list[Message]) -> list[Message]:
    """A window cut mid-turn may start with tool results; start it at a user message, or at
    a system message (a /v1 conversation stored with the client's own system prompt)."""
    for index, message in enumerate(history):
        if message["role"] in ("user", "system"):
            return history[index:]
    return []


def wire_message(
    role: str,
    content: str | None,
    tool_calls: list[dict[str, Any]] | None,
    tool_call_id: str | None,
    name: str | None,
) -> Message:
    """A stored message's columns back in wire shape (empty fields left out)."""
    message: Message = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if name:
        message["name"] = name
    return message
