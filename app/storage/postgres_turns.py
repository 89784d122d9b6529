"""The hot path of SessionStore on Postgres: hand-written SQL on the pooled asyncpg connection.

Why: on Postgres, SQLAlchemy's async layer cost about 20% of the service's CPU per turn
(a greenlet per statement, Core statements built and compiled per turn, BEGIN/COMMIT round
trips), more than the statements themselves. Here a turn is one statement (a data-modifying
CTE is atomic on its own, so no BEGIN/COMMIT), and a load is one autocommit SELECT. asyncpg
keeps each statement prepared per connection, so a repeated turn costs a Bind/Execute.

The connection still comes from the engine's pool (one pool, sized by DB_POOL_SIZE etc.):
checkout, the statement and checkin run inside ONE greenlet. Everything else (listing,
paging, deleting) stays on SQLAlchemy, and rows written here read back identically there.

JSON columns: SQLAlchemy's asyncpg dialect installs json/jsonb codecs on every connection
that take and give text (``str.encode`` / its ``json_deserializer``, default ``json.loads``),
and its JSON type stores Python None as JSON ``null``, not SQL NULL. Here values are sent as
text (``$n::text::json``, serialised by orjson, so no codec is involved) and read as text
(``::text``) decoded with the dialect's deserializer, so both paths see the same values.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from app.llm.types import Message
from app.storage.sessions import (
    UNAVAILABLE_SQLSTATES,
    DatabaseUnavailableError,
    SessionBusyError,
    SessionRecord,
    Turn,
    _text,
    trim_history,
)

try:  # SQLAlchemy 2.1 name; 2.0 only has the older one
    from sqlalchemy.util import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

_T = TypeVar("_T")

LOAD_SESSION = """SELECT owner, agent, message_count, history_digest, metadata::text,
       created_at, updated_at
FROM sessions
WHERE id = $1
"""

LOAD_WITH_HISTORY = """SELECT s.owner, s.agent, s.message_count, s.history_digest, s.metadata::text,
       s.created_at, s.updated_at, h.seqs, h.roles, h.contents, h.tool_calls, h.tool_call_ids,
       h.names
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
"""One row: the session, and its window of messages as one array per column (twenty rows
repeating the session's columns cost the client more to decode). Sequence numbers are dense
(1..message_count), so the window is an index range.

The arrays are aggregated in no stated order, with the seq numbers beside them, and put in
order by the client (`_in_seq_order`): each `array_agg(... ORDER BY seq)` is a sort of its
own in Postgres 15, five per load, about 40 % of the statement's execution time (55 -> 31
us for a 20-message session, 66 -> 39 us for a 1,000-message one; medians of 300 EXPLAIN
ANALYZE runs), for 9,000-19,000 more instructions in this process (the seq array and its
check, `bench/turn_cost.py --http`). The rows come in seq order in practice (the index
range, or the heap in insertion order), so the check is one comparison of two int lists."""

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


def _json_text(value: Any) -> str:
    """JSON text as SQLAlchemy's JSON type would store it (None is JSON null)."""
    if value is None:
        return "null"
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # beyond orjson (integers over 64 bits, non-string keys)
        return json.dumps(value)


def _in_seq_order(seqs: list[int], columns: Sequence[list[Any]]) -> Sequence[list[Any]]:
    """The window's columns ordered by seq (LOAD_WITH_HISTORY says why the server does not)."""
    ordered = sorted(seqs)  # linear on a list already in order
    if ordered == seqs:
        return columns
    position = {seq: index for index, seq in enumerate(seqs)}
    order = [position[seq] for seq in ordered]
    return [[column[index] for index in order] for column in columns]


def _is_unavailable(exc: BaseException) -> bool:
    """The server, not the data: lost/refused connections, and SQLSTATE 08, 53, 57P."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | sqlalchemy.exc.TimeoutError  # no pooled connection within DB_POOL_TIMEOUT
        | sqlalchemy.exc.OperationalError
        | sqlalchemy.exc.InterfaceError,
    ):
        return True
    for error in (exc, exc.__cause__):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES):
            return True
    return False


class PostgresTurns:
    """`SessionStore.load` and `SessionStore.save_turn` for the asyncpg dialect."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.sync_engine
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._json_loads: Callable[[str], Any] = (
            getattr(engine.dialect, "_json_deserializer", None) or json.loads
        )

    def observed(self) -> bool:
        """Statement listeners on the engine (OpenTelemetry's SQLAlchemy instrumentation)
        expect to see every statement: while there are any, SessionStore stays on SQLAlchemy
        rather than write turns they would not see."""
        dispatch = self._engine.dispatch
        return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)

    async def load(
        self, session_id: uuid.UUID, *, history_limit: int, with_history: bool
    ) -> SessionRecord | None:
        if with_history:
            row = await self._run(_fetchrow, LOAD_WITH_HISTORY, session_id, history_limit)
        else:
            row = await self._run(_fetchrow, LOAD_SESSION, session_id)
        if row is None:
            return None
        owner, agent, count, digest, metadata, created_at, updated_at = row[:7]
        history: list[Message] = []
        if with_history and row[7] is not None:  # None: no message in the window
            loads = self._json_loads
            columns = _in_seq_order(row[7], row[8:])
            for role, content, tool_calls, tool_call_id, name in zip(*columns, strict=True):
                message: Message = {"role": role, "content": content}
                if tool_calls is not None and tool_calls != "null":
                    calls = loads(tool_calls)
                    if calls:
                        message["tool_calls"] = calls
                if tool_call_id:
                    message["tool_call_id"] = tool_call_id
                if name and role == "tool":
                    message["name"] = name
                history.append(message)
        return SessionRecord(
            id=session_id,
            owner=owner,
            agent=agent,
            message_count=count,
            history_digest=digest,
            metadata=(self._json_loads(metadata) if metadata is not None else None) or {},
            created_at=created_at,
            updated_at=updated_at,
            history=trim_history(history),
        )

    async def save_turn(self, turn: Turn, *, digest: str, now: datetime) -> None:
        """The whole turn in one statement (one round trip), or nothing (SessionBusyError)."""
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
            contents.append(_text(message.get("content")))
            tool_calls.append(_json_text(message.get("tool_calls")))
            tool_call_ids.append(_text(message.get("tool_call_id")))
            names.append(_text(message.get("name")))
            prompt_tokens.append(stored.prompt_tokens)
            completion_tokens.append(stored.completion_tokens)
        new_count = turn.expected_count + len(roles)
        messages = (
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
            query = INSERT_TURN
            args: Sequence[Any] = (
                turn.session_id,
                turn.owner,
                turn.agent,
                new_count,
                digest,
                _json_text(turn.metadata),
                now,
                turn.expected_count,
                *messages,
            )
        else:
            query = UPDATE_TURN
            args = (turn.session_id, new_count, digest, now, turn.expected_count, *messages)
        try:
            written = await self._run(_fetchval, query, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            # a concurrent writer took the same seq numbers, or the same new session id
            raise SessionBusyError(str(turn.session_id)) from exc
        if written != 1:
            raise SessionBusyError(str(turn.session_id))

    async def _run(self, call: Callable[..., Awaitable[_T]], query: str, *args: Any) -> _T:
        try:
            return await greenlet_spawn(self._checked_out, call, query, args)
        except Exception as exc:
            if _is_unavailable(exc):
                raise DatabaseUnavailableError(repr(exc)[:300]) from exc
            raise

    def _checked_out(
        self, call: Callable[..., Awaitable[_T]], query: str, args: Sequence[Any]
    ) -> _T:
        """In a greenlet: check a connection out of the pool (which may wait, or connect),
        run the statement on the asyncpg connection, check it back in."""
        try:
            pooled = self._engine.raw_connection()
        except self._dbapi_error as exc:  # connecting failed: classify as SQLAlchemy would
            raise sqlalchemy.exc.DBAPIError.instance(
                None, None, exc, self._dbapi_error, dialect=self._engine.dialect
            ) from exc
        connection = pooled.driver_connection
        try:
            result = await_(call(connection, query, *args))
        except BaseException as exc:
            self._release_after(pooled, connection, exc)
            raise
        pooled.close()
        return result

    def _release_after(
        self, pooled: PoolProxiedConnection, connection: Any, exc: BaseException
    ) -> None:
        """A connection the server closed is invalidated with every older one in the pool
        (as SQLAlchemy does on a disconnect: after a restart they are all dead). One whose
        state is unknown (cancelled mid-statement, a protocol error) is closed. An error from
        the server about the statement leaves it idle and usable: back to the pool."""
        if connection.is_closed():
            self._engine.pool._invalidate(pooled, exc)
        elif not isinstance(exc, asyncpg.PostgresError):
            pooled.invalidate(exc)
        else:
            pooled.close()


async def _fetchrow(connection: Any, query: str, *args: Any) -> Any:
    return await connection.fetchrow(query, *args)


async def _fetchval(connection: Any, query: str, *args: Any) -> Any:
    return await connection.fetchval(query, *args)
