"""SessionService: a subject's own sessions — list, read, erase — with ownership checked here
and only here (another subject's session is reported as not existing)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.cache import ResponseCache
from app.domain import MessageRecord, SessionRecord
from app.errors import SessionNotFoundError
from app.services.query import ActiveTurns, busy_error
from app.storage import TurnRepository


@dataclass(slots=True, frozen=True)
class Page:
    """One page of a listing, and where the next begins (None: this is the last)."""

    limit: int
    offset: int
    next_offset: int | None


@dataclass(slots=True, frozen=True)
class SessionPage:
    sessions: list[SessionRecord]
    page: Page


@dataclass(slots=True, frozen=True)
class Transcript:
    session: SessionRecord
    messages: list[MessageRecord]
    page: Page


class SessionService:
    def __init__(
        self, *, turns: TurnRepository, cache: ResponseCache | None, active: ActiveTurns
    ) -> None:
        self._turns = turns
        self._cache = cache
        self._active = active

    async def list(self, owner: str, *, limit: int, offset: int) -> SessionPage:
        """The owner's sessions, most recently active first."""
        # one row more than asked tells whether another page exists
        rows = await self._turns.list_sessions(owner, limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return SessionPage(rows[:limit], Page(limit, offset, offset + limit if more else None))

    async def transcript(
        self, session_id: uuid.UUID, owner: str, *, limit: int, offset: int
    ) -> Transcript:
        session = await self._owned(session_id, owner)
        messages = await self._turns.messages(session_id, limit=limit, offset=offset)
        more = offset + limit < session.message_count
        return Transcript(session, messages, Page(limit, offset, offset + limit if more else None))

    async def forget(self, session_id: uuid.UUID, owner: str) -> None:
        """Erase a session, its messages and the cache entries its turns wrote."""
        await self._owned(session_id, owner)
        if session_id in self._active:  # its turn would write cache entries after the erasure
            raise busy_error(session_id)
        await self._turns.delete(session_id)
        if self._cache is not None:
            await self._cache.forget_session(str(session_id))

    async def _owned(self, session_id: uuid.UUID, owner: str) -> SessionRecord:
        record = await self._turns.load(session_id, with_history=False)
        if record is None or record.owner != owner:
            raise SessionNotFoundError(f"session {session_id} does not exist")
        return record
