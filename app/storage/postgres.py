"""The turn repository on Postgres, on an asyncpg pool of its own.

Why not SQLAlchemy here: on Postgres every turn is two statements (load, save), and running
them through SQLAlchemy's async engine costs more CPU than the statements themselves (a
greenlet switch per call, statement and result processing; docs/performance.md). asyncpg's
own pool and prepared-statement cache serve them directly. The SQL is small and written out
below; SQLite and other databases use `SqlTurnRepository` (Core). Both read and write the
same schema, which Alembic owns, and rows written by one read back identically through the
other.

A continued turn is ONE data-modifying statement (atomic on its own, so no BEGIN/COMMIT),
and a load is one row holding the window of messages as one array per column. JSON columns
travel as text (``$n::text::json`` out, ``::text`` back, orjson both ways); None is stored
as JSON ``null``, as SQLAlchemy's JSON type stores it.

Failures: a statement that fails because its connection broke (a restart, a terminated
backend, a network cut: whatever asyncpg calls the error) means the database is unavailable,
and the pool's other connections, which likely died with it, are expired so the next calls
reconnect. A cancelled statement is cancelled on the server too (asyncpg sends the cancel
request), so a turn cut short commits nothing. An error the server reported about the
statement leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import make_url

from app.config import Settings
from app.domain import Message, MessageRecord, SessionRecord, Turn
from app.errors import DatabaseUnavailableError, SessionBusyError
from app.storage.turns import (
    is_unavailable,
    next_history_digest,
    storable_text,
    trim_history,
    wire_message,
)

LOAD_SESSION = """SELECT owner, agent, message_count, history_digest, metadata::text,
       created_at, updated_at
FROM sessions
WHERE id = $1
"""

LOAD_WITH_HISTORY = """SELECT s.owner, s.agent, s.message_count, s.history_digest,
       s.metadata::text, s.created_at, s.updated_at, h.seqs, h.roles, h.contents,
       h.tool_calls, h.tool_call_ids, h.names
FROM sessions AS s
LEFT JOIN LATERAL (
    SELECT array_agg(m.seq) AS seqs,
           array_agg(m.role) AS roles,
           array_agg(m.content) AS contents,
           array_agg(m.tool_calls::text) AS tool_calls,
           array_agg(m.tool_call_id) AS tool_call_ids,
           array_agg(m.name) AS names
    FROM messages AS m
    WHERE m.session_id = s.id AND m.seq > s.message_count - $2::int
) AS h ON true
WHERE s.id = $1
"""
"""One row: the session, and its window of messages as one array per column. Sequence
numbers are dense (1..message_count), so the window is an index range. The arrays are
aggregated unordered with their seq numbers beside them and put in order here
(`in_seq_order`): an `ORDER BY` inside each `array_agg` is a sort of its own per column."""

# A turn is ONE statement: the session row (CTE `s`), then the messages, which join `s`:
# if `s` wrote no row, no message is written either. It returns how many session rows it
# wrote (0: another turn got there first). The messages come as one array per column.

INSERT_TURN = """WITH s AS (
    INSERT INTO sessions (id, owner, agent, message_count, history_digest, metadata,
                          created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6::text::json, $7, $7)
    RETURNING id
),
m AS (
    INSERT INTO messages (session_id, seq, role, content, tool_calls, tool_call_id, name,
                          prompt_tokens, completion_tokens, request_id, created_at)
    SELECT s.id, $8::int + t.n::int, t.role, t.content, t.tool_calls::json, t.tool_call_id,
           t.name, t.prompt_tokens, t.completion_tokens, $9, $7
    FROM s CROSS JOIN unnest($10::text[], $11::text[], $12::text[], $13::text[],
                             $14::text[], $15::int[], $16::int[])
         WITH ORDINALITY AS t(role, content, tool_calls, tool_call_id, name,
                              prompt_tokens, completion_tokens, n)
)
SELECT count(*) FROM s
"""
"""A new session: a taken id is a unique violation (SessionBusyError)."""

UPDATE_TURN = """WITH s AS (
    UPDATE sessions SET message_count = $2, history_digest = $3, updated_at = $4
    WHERE id = $1 AND message_count = $5
    RETURNING id
),
m AS (
    INSERT INTO messages (session_id, seq, role, content, tool_calls, tool_call_id, name,
                          prompt_tokens, completion_tokens, request_id, created_at)
    SELECT s.id, $5::int + t.n::int, t.role, t.content, t.tool_calls::json, t.tool_call_id,
           t.name, t.prompt_tokens, t.completion_tokens, $6, $4
    FROM s CROSS JOIN unnest($7::text[], $8::text[], $9::text[], $10::text[],
                             $11::text[], $12::int[], $13::int[])
         WITH ORDINALITY AS t(role, content, tool_calls, tool_call_id, name,
                              prompt_tokens, completion_tokens, n)
)
SELECT count(*) FROM s
"""
"""A continuation: optimistic concurrency on message_count, the session's version."""

LIST_SESSIONS = """SELECT id, owner, agent, message_count, history_digest, metadata::text,
       created_at, updated_at
FROM sessions
WHERE owner = $1
ORDER BY updated_at DESC, id
LIMIT $2 OFFSET $3
"""

MESSAGES = """SELECT seq, role, content, tool_calls::text, tool_call_id, name, prompt_tokens,
       completion_tokens, request_id, created_at
FROM messages
WHERE session_id = $1
ORDER BY seq
LIMIT $2 OFFSET $3
"""

DELETE_SESSION = "DELETE FROM sessions WHERE id = $1"
"""Its messages go with it (ON DELETE CASCADE), in the same statement."""

SCHEMA_REVISION = "SELECT version_num FROM alembic_version"


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (`postgresql+asyncpg://...`) as the DSN asyncpg takes."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def json_text(value: Any) -> str:
    """JSON text as SQLAlchemy's JSON type would store it (None is JSON null)."""
    if value is None:
        return "null"
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # beyond orjson (integers over 64 bits, non-string keys)
        return json.dumps(value)


def in_seq_order(seqs: list[int], columns: Sequence[list[Any]]) -> Sequence[list[Any]]:
    """The window's columns ordered by seq (LOAD_WITH_HISTORY says why the server does not)."""
    ordered = sorted(seqs)  # linear on a list already in order, as it nearly always is
    if ordered == seqs:
        return columns
    position = {seq: index for index, seq in enumerate(seqs)}
    order = [position[seq] for seq in ordered]
    return [[column[index] for index in order] for column in columns]


def is_server_failure(exc: Exception) -> bool:
    """asyncpg's errors about the connection, and what `is_unavailable` says of the rest."""
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError) or (
        is_unavailable(exc)
    )


def busy(session_id: uuid.UUID) -> SessionBusyError:
    return SessionBusyError(f"session {session_id} was written by another turn meanwhile")


def session_record(session_id: uuid.UUID, row: Sequence[Any]) -> SessionRecord:
    owner, agent, count, digest, metadata, created_at, updated_at = row[:7]
    return SessionRecord(
        id=session_id,
        owner=owner,
        agent=agent,
        message_count=count,
        history_digest=digest,
        metadata=(orjson.loads(metadata) if metadata is not None else None) or {},
        created_at=created_at,
        updated_at=updated_at,
    )


async def no_reset(_connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool after one autocommit statement that sets no
    session state, so asyncpg's reset query (a round trip per release) has nothing to do."""


class PostgresTurnRepository:
    def __init__(self, pool: asyncpg.Pool, *, history_limit: int, acquire_timeout: float) -> None:
        self.pool = pool
        self.history_limit = history_limit
        self.acquire_timeout = acquire_timeout

    @classmethod
    async def open(cls, settings: Settings) -> PostgresTurnRepository:
        """A pool of DB_POOL_SIZE + DB_MAX_OVERFLOW connections, opened lazily (the service
        starts, and reports not ready, while the database is down)."""
        pool = await asyncpg.create_pool(
            asyncpg_dsn(settings.database_url),
            min_size=0,
            max_size=settings.db_pool_size + settings.db_max_overflow,
            max_inactive_connection_lifetime=300.0,
            timeout=settings.db_pool_timeout,  # connecting
            reset=no_reset,
        )
        return cls(
            pool,
            history_limit=settings.history_max_messages,
            acquire_timeout=settings.db_pool_timeout,
        )

    async def _run(self, method: str, query: str, *args: Any) -> Any:
        """One statement on a pooled connection (`fetchrow`, `fetch`, `fetchval`,
        `execute`), with the failure policy of the module docstring."""
        try:
            # asyncio.timeout rather than acquire(timeout=): that one runs a task per call
            async with asyncio.timeout(self.acquire_timeout):
                connection = await self.pool.acquire()
        except TimeoutError as exc:
            raise DatabaseUnavailableError("no pooled database connection in time") from exc
        except Exception as exc:  # a connect that failed: a bad password stays what it is
            if is_server_failure(exc):
                raise DatabaseUnavailableError(repr(exc)[:300]) from exc
            raise
        try:
            return await getattr(connection, method)(query, *args)
        except Exception as exc:
            if is_server_failure(exc):
                await self.pool.expire_connections()
                raise DatabaseUnavailableError(repr(exc)[:300]) from exc
            raise
        finally:
            await self.pool.release(connection)

    async def load(
        self, session_id: uuid.UUID, *, with_history: bool = True
    ) -> SessionRecord | None:
        if not with_history:
            row = await self._run("fetchrow", LOAD_SESSION, session_id)
            return None if row is None else session_record(session_id, row)
        row = await self._run("fetchrow", LOAD_WITH_HISTORY, session_id, self.history_limit)
        if row is None:
            return None
        record = session_record(session_id, row)
        if row[7] is not None:  # None: no message in the window
            history: list[Message] = []
            columns = in_seq_order(row[7], row[8:])
            for role, content, tool_calls, tool_call_id, name in zip(*columns, strict=True):
                calls = orjson.loads(tool_calls) if tool_calls is not None else None
                history.append(wire_message(role, content, calls, tool_call_id, name))
            record.history = trim_history(history)
        return record

    async def save_turn(self, turn: Turn) -> None:
        """The whole turn in one statement (one round trip), or nothing (SessionBusyError)."""
        now = datetime.now(UTC)
        digest = next_history_digest(turn.previous_digest, [s.message for s in turn.messages])
        roles: list[str] = []
        contents: list[Any] = []
        tool_calls: list[str] = []
        tool_call_ids: list[Any] = []
        names: list[Any] = []
        prompt_tokens: list[int] = []
        completion_tokens: list[int] = []
        for stored in turn.messages:
            message = stored.message
            roles.append(message["role"])
            contents.append(storable_text(message.get("content")))
            tool_calls.append(json_text(message.get("tool_calls")))
            tool_call_ids.append(storable_text(message.get("tool_call_id")))
            names.append(storable_text(message.get("name")))
            prompt_tokens.append(stored.prompt_tokens)
            completion_tokens.append(stored.completion_tokens)
        new_count = turn.expected_count + len(roles)
        columns = (
            turn.request_id,
            roles,
            contents,
            tool_calls,
            tool_call_ids,
            names,
            prompt_tokens,
            completion_tokens,
        )
        if turn.is_new:
            statement = INSERT_TURN
            args: tuple[Any, ...] = (
                turn.session_id,
                turn.owner,
                turn.agent,
                new_count,
                digest,
                json_text(turn.metadata),
                now,
                turn.expected_count,
                *columns,
            )
        else:
            statement = UPDATE_TURN
            args = (turn.session_id, new_count, digest, now, turn.expected_count, *columns)
        try:
            written = await self._run("fetchval", statement, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:  # same id or seq numbers
            raise busy(turn.session_id) from exc
        if written != 1:
            raise busy(turn.session_id)

    async def list_sessions(self, owner: str, *, limit: int, offset: int) -> list[SessionRecord]:
        rows = await self._run("fetch", LIST_SESSIONS, owner, limit, offset)
        return [session_record(row[0], row[1:]) for row in rows]

    async def messages(
        self, session_id: uuid.UUID, *, limit: int, offset: int
    ) -> list[MessageRecord]:
        rows = await self._run("fetch", MESSAGES, session_id, limit, offset)
        return [
            MessageRecord(
                seq=seq,
                role=role,
                content=content,
                tool_calls=orjson.loads(tool_calls) if tool_calls is not None else None,
                tool_call_id=tool_call_id,
                name=name,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                request_id=request_id,
                created_at=created_at,
            )
            for (
                seq,
                role,
                content,
                tool_calls,
                tool_call_id,
                name,
                prompt_tokens,
                completion_tokens,
                request_id,
                created_at,
            ) in rows
        ]

    async def delete(self, session_id: uuid.UUID) -> bool:
        status: str = await self._run("execute", DELETE_SESSION, session_id)
        return status != "DELETE 0"

    async def schema_revision(self) -> str | None:
        try:
            revision: str | None = await self._run("fetchval", SCHEMA_REVISION)
        except asyncpg.UndefinedTableError:  # nothing migrated yet
            return None
        return revision

    async def aclose(self) -> None:
        await self.pool.close()
