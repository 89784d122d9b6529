"""The turn repository on SQLAlchemy Core: SQLite, and the base of the Postgres one.

Core statements over the ORM tables (no identity map): a turn is a handful of rows. Reads
run in autocommit mode (no BEGIN/ROLLBACK round trips for one SELECT); a turn is one
transaction. The engine and its pool belong to the repository, which disposes of them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, and_, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain import MessageRecord, SessionRecord, Turn
from app.errors import SessionBusyError
from app.storage.models import ChatMessage, ChatSession
from app.storage.turns import (
    next_history_digest,
    reachable,
    storable_text,
    trim_history,
    wire_message,
)

messages_table = cast(Table, ChatMessage.__table__)
sessions_table = cast(Table, ChatSession.__table__)


def busy(session_id: uuid.UUID) -> SessionBusyError:
    return SessionBusyError(f"session {session_id} was written by another turn meanwhile")


def utc(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes for what was written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def session_record(row: Any, history: list[Any] | None = None) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        owner=row.owner,
        agent=row.agent,
        message_count=row.message_count,
        history_digest=row.history_digest,
        metadata=row.metadata or {},
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        history=trim_history(history or []),
    )


class SqlTurnRepository:
    def __init__(self, engine: AsyncEngine, *, history_limit: int) -> None:
        self.engine = engine
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.history_limit = history_limit

    async def load(
        self, session_id: uuid.UUID, *, with_history: bool = True
    ) -> SessionRecord | None:
        """The session and its last `history_limit` messages in ONE query: sequence numbers
        are dense (1..message_count), so the window is an index range whatever the length."""
        s, m = sessions_table, messages_table
        query = select(s).where(s.c.id == session_id)
        if with_history:
            window = and_(
                m.c.session_id == s.c.id, m.c.seq > s.c.message_count - self.history_limit
            )
            query = (
                select(s, m.c.role, m.c.content, m.c.tool_calls, m.c.tool_call_id, m.c.name)
                .select_from(s.outerjoin(m, window))
                .where(s.c.id == session_id)
                .order_by(m.c.seq)
            )
        async with reachable(), self.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return None
        history = (
            [
                wire_message(r.role, r.content, r.tool_calls, r.tool_call_id, r.name)
                for r in rows
                if r.role is not None
            ]
            if with_history
            else []
        )
        return session_record(rows[0], history)

    async def save_turn(self, turn: Turn) -> None:
        now = datetime.now(UTC)
        digest = next_history_digest(turn.previous_digest, [s.message for s in turn.messages])
        first_seq = turn.expected_count + 1
        rows = [
            {
                "session_id": turn.session_id,
                "seq": first_seq + offset,
                "role": stored.message["role"],
                "content": storable_text(stored.message.get("content")),
                "tool_calls": stored.message.get("tool_calls"),
                "tool_call_id": storable_text(stored.message.get("tool_call_id")),
                "name": storable_text(stored.message.get("name")),
                "prompt_tokens": stored.prompt_tokens,
                "completion_tokens": stored.completion_tokens,
                "request_id": turn.request_id,
                "created_at": now,
            }
            for offset, stored in enumerate(turn.messages)
        ]
        new_count = turn.expected_count + len(rows)
        s = sessions_table
        try:
            async with reachable(), self.engine.begin() as conn:
                if turn.is_new:
                    await conn.execute(
                        insert(s).values(
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
                        update(s)
                        .where(s.c.id == turn.session_id, s.c.message_count == turn.expected_count)
                        .values(message_count=new_count, history_digest=digest, updated_at=now)
                    )
                    if result.rowcount != 1:
                        raise busy(turn.session_id)
                await conn.execute(insert(messages_table), rows)
        except IntegrityError as exc:  # a concurrent writer took the same id or seq numbers
            raise busy(turn.session_id) from exc

    async def list_sessions(self, owner: str, *, limit: int, offset: int) -> list[SessionRecord]:
        s = sessions_table
        query = (
            select(s)
            .where(s.c.owner == owner)
            .order_by(s.c.updated_at.desc(), s.c.id)
            .limit(limit)
            .offset(offset)
        )
        async with reachable(), self.reader.connect() as conn:
            return [session_record(row) for row in await conn.execute(query)]

    async def messages(
        self, session_id: uuid.UUID, *, limit: int, offset: int
    ) -> list[MessageRecord]:
        m = messages_table
        query = (
            select(
                m.c.seq,
                m.c.role,
                m.c.content,
                m.c.tool_calls,
                m.c.tool_call_id,
                m.c.name,
                m.c.prompt_tokens,
                m.c.completion_tokens,
                m.c.request_id,
                m.c.created_at,
            )
            .where(m.c.session_id == session_id)
            .order_by(m.c.seq)
            .limit(limit)
            .offset(offset)
        )
        async with reachable(), self.reader.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [MessageRecord(**{**row, "created_at": utc(row["created_at"])}) for row in rows]

    async def delete(self, session_id: uuid.UUID) -> bool:
        async with reachable(), self.engine.begin() as conn:
            await conn.execute(
                delete(messages_table).where(messages_table.c.session_id == session_id)
            )
            result = await conn.execute(
                delete(sessions_table).where(sessions_table.c.id == session_id)
            )
            return bool(result.rowcount)

    async def schema_revision(self) -> str | None:
        async with reachable(), self.reader.connect() as conn:
            try:
                result = await conn.execute(text("SELECT version_num FROM alembic_version"))
            except Exception:  # no alembic_version table yet: nothing migrated
                return None
            return result.scalar_one_or_none()

    async def aclose(self) -> None:
        await self.engine.dispose()
