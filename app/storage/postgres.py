"""The turn repository on Postgres: the two calls of every turn in one statement each.

Through Core a continued turn is BEGIN, UPDATE, INSERT, COMMIT (four round trips) and a load
repeats the session's columns in every message row. Here a turn is one data-modifying
statement, atomic on its own, and a load is one row holding the window of messages as one
array per column. Both run on the asyncpg connection that SQLAlchemy's pool hands out
(`AsyncConnection.get_raw_connection().driver_connection`): SQLAlchemy's statement
execution costs more CPU than these two statements themselves (docs/performance.md). The
pool, its size and its timeouts stay SQLAlchemy's; `driver_connection` says how a failure
leaves the connection. Listing, paging and deleting stay on Core, and rows written here read
back identically there.

JSON columns travel as text (``$n::text::json`` out, ``::text`` back, orjson both ways), so
no driver codec is involved; None is stored as JSON ``null``, as SQLAlchemy's JSON type does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text

from app.domain import Message, SessionRecord, Turn
from app.errors import DatabaseUnavailableError
from app.storage.sql import SqlTurnRepository, busy
from app.storage.turns import (
    next_history_digest,
    reachable,
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
"""One row: the session and its window of messages, one array per column. Sequence numbers
are dense (1..message_count), so the window is an index range. The arrays come unordered,
with their seq numbers, and `in_seq_order` sorts them: an `ORDER BY` inside each
`array_agg` would be a sort per column."""

# A turn is one statement: the session row (CTE `s`), then the messages, which join `s`, so
# no message is written unless `s` wrote its row. It returns how many session rows it wrote
# (0: another turn got there first). The messages come as one array per column.

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


class PostgresTurnRepository(SqlTurnRepository):
    @asynccontextmanager
    async def driver_connection(self) -> AsyncIterator[Any]:
        """A pooled asyncpg connection for one statement.

        A connection the server closed under the statement (a restart, a terminated backend,
        a network cut: whatever asyncpg calls the error) means the database is unavailable;
        one `SELECT 1` through SQLAlchemy then lets its disconnect handling retire the
        pool's other connections, which died with it. A connection left in an unknown state
        (cancelled mid-statement, a protocol error) is invalidated, never reused. An error
        the server reported about the statement leaves the connection usable.
        """
        async with reachable(), self.engine.connect() as conn:
            pooled = await conn.get_raw_connection()
            driver = pooled.driver_connection
            try:
                yield driver
            except BaseException as exc:
                if driver is None or driver.is_closed():
                    await self._retire_pool(exc)
                    raise DatabaseUnavailableError(repr(exc)[:300]) from exc
                if not isinstance(exc, asyncpg.PostgresError):
                    pooled.invalidate(exc)
                raise

    async def _retire_pool(self, cause: BaseException) -> None:
        try:
            async with self.engine.connect() as probe:
                await probe.execute(text("SELECT 1"))
        except Exception as exc:  # the probe failing is the point: SQLAlchemy saw the disconnect
            exc.__context__ = cause

    async def load(
        self, session_id: uuid.UUID, *, with_history: bool = True
    ) -> SessionRecord | None:
        async with self.driver_connection() as connection:
            if with_history:
                row = await connection.fetchrow(LOAD_WITH_HISTORY, session_id, self.history_limit)
            else:
                row = await connection.fetchrow(LOAD_SESSION, session_id)
        if row is None:
            return None
        owner, agent, count, digest, metadata, created_at, updated_at = row[:7]
        history: list[Message] = []
        if with_history and row[7] is not None:  # None: no message in the window
            columns = in_seq_order(row[7], row[8:])
            for role, content, tool_calls, tool_call_id, name in zip(*columns, strict=True):
                calls = orjson.loads(tool_calls) if tool_calls is not None else None
                history.append(wire_message(role, content, calls, tool_call_id, name))
        return SessionRecord(
            id=session_id,
            owner=owner,
            agent=agent,
            message_count=count,
            history_digest=digest,
            metadata=(orjson.loads(metadata) if metadata is not None else None) or {},
            created_at=created_at,
            updated_at=updated_at,
            history=trim_history(history),
        )

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
            async with self.driver_connection() as connection:
                written = await connection.fetchval(statement, *args)
        except asyncpg.IntegrityConstraintViolationError as exc:  # same id or seq numbers
            raise busy(turn.session_id) from exc
        if written != 1:
            raise busy(turn.session_id)
