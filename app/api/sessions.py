"""The caller's own sessions: list, read, delete (JWT; other subjects get 404)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import PrincipalDep, SessionServiceDep, SessionsLimit
from app.api.errors import SESSIONS_ERRORS
from app.api.schemas import (
    RATE_LIMIT_HEADERS,
    REQUEST_ID_HEADER,
    MessageOut,
    SessionDetail,
    SessionOut,
    SessionPage,
)

router = APIRouter(
    prefix="/sessions",
    tags=["sessions"],
    responses={200: {"headers": {**REQUEST_ID_HEADER, **RATE_LIMIT_HEADERS}}, **SESSIONS_ERRORS},
    dependencies=[SessionsLimit],
)

Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
MessageLimit = Annotated[int, Query(ge=1, le=1000, description="Messages per page.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]


@router.get("", operation_id="list_sessions", summary="My sessions, most recent first")
async def list_sessions(
    sessions: SessionServiceDep, principal: PrincipalDep, limit: Limit = 20, offset: Offset = 0
) -> SessionPage:
    page = await sessions.list(principal.subject, limit=limit, offset=offset)
    return SessionPage(
        sessions=[SessionOut.from_record(record) for record in page.sessions],
        limit=page.page.limit,
        offset=page.page.offset,
        next_offset=page.page.next_offset,
    )


@router.get("/{session_id}", operation_id="get_session", summary="One session's messages")
async def get_session(
    session_id: uuid.UUID,
    sessions: SessionServiceDep,
    principal: PrincipalDep,
    limit: MessageLimit = 100,
    offset: Offset = 0,
) -> SessionDetail:
    transcript = await sessions.transcript(
        session_id, principal.subject, limit=limit, offset=offset
    )
    session = SessionOut.from_record(transcript.session)
    return SessionDetail(
        **session.model_dump(),
        messages=[MessageOut.model_validate(message) for message in transcript.messages],
        limit=transcript.page.limit,
        offset=transcript.page.offset,
        next_offset=transcript.page.next_offset,
    )


@router.delete(
    "/{session_id}",
    status_code=204,
    summary="Erase a session, its messages and the cache entries its turns wrote",
)
async def delete_session(
    session_id: uuid.UUID, sessions: SessionServiceDep, principal: PrincipalDep
) -> Response:
    await sessions.forget(session_id, principal.subject)
    return Response(status_code=204)
