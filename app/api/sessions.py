"""The caller's own sessions: list, read, delete (JWT; other subjects get 404)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.responses import Response

from app.api.deps import RuntimeDep
from app.api.errors import SESSIONS_ERRORS
from app.api.responses import JSON
from app.api.schemas import SessionDetail, SessionPage
from app.api.security import PrincipalDep
from app.runtime import Runtime
from app.security.jwt import Principal
from app.security.ratelimit import rate_limit_headers
from app.service import SessionNotFoundError

router = APIRouter(prefix="/sessions", tags=["sessions"], responses=SESSIONS_ERRORS)

Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]


async def _limited(runtime: Runtime, principal: Principal) -> dict[str, str]:
    state = await runtime.limiter.hit(
        "sessions", principal.subject, runtime.settings.rate_limit_secure_query
    )
    return rate_limit_headers(state)


def _next(total: int, limit: int, offset: int) -> int | None:
    return offset + limit if offset + limit < total else None


@router.get("", response_model=SessionPage, summary="My sessions, most recent first")
async def list_sessions(
    runtime: RuntimeDep, principal: PrincipalDep, limit: Limit = 20, offset: Offset = 0
) -> Response:
    headers = await _limited(runtime, principal)
    # one row more than asked tells whether another page exists
    rows = await runtime.store.list_sessions(principal.subject, limit=limit + 1, offset=offset)
    body: dict[str, Any] = {
        "sessions": [_session(row) for row in rows[:limit]],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if len(rows) > limit else None,
    }
    return JSON(body, headers=headers)


@router.get("/{session_id}", response_model=SessionDetail, summary="One session's messages")
async def get_session(
    session_id: uuid.UUID,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> Response:
    headers = await _limited(runtime, principal)
    record = await runtime.store.load(session_id, with_history=False)
    if record is None or record.owner != principal.subject:
        raise SessionNotFoundError(f"session {session_id} does not exist")
    messages = await runtime.store.messages(session_id, limit=limit, offset=offset)
    body = {
        "id": str(record.id),
        "agent": record.agent,
        "message_count": record.message_count,
        "metadata": record.metadata,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "messages": messages,
        "limit": limit,
        "offset": offset,
        "next_offset": _next(record.message_count, limit, offset),
    }
    return JSON(body, headers=headers)


@router.delete(
    "/{session_id}",
    status_code=204,
    summary="Erase a session, its messages and the cache entries its turns wrote",
)
async def delete_session(
    session_id: uuid.UUID, runtime: RuntimeDep, principal: PrincipalDep
) -> Response:
    headers = await _limited(runtime, principal)
    await runtime.service.forget(session_id, principal.subject)
    return Response(status_code=204, headers=headers)


def _session(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "agent": row["agent"],
        "message_count": row["message_count"],
        "metadata": row["metadata"] or {},
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
