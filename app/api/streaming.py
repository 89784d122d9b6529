"""A turn as Server-Sent Events (sse-starlette): the life of every stream (`open_event_stream`,
`guarded`: /query's and /v1's), and /query's and /secure-query's events.

Events, each `data:` one JSON object: `start` {session_id, agent, request_id}; `delta`
{text} (the deltas concatenated are the answer); `tool_call` {id, tool, arguments};
`tool_result` {id, tool, result, is_error, duration_ms}; then `done` (the body the request
would get without streaming) or `error` (the error shape), after which the stream ends.
A comment line (`: ping`) goes out every SSE_PING_SECONDS while the agent works.

A client that goes away mid-stream makes sse-starlette cancel `guarded`: its cleanup
(shielded, so that it runs to the end under that cancellation) cancels the turn, which
stores nothing and writes no cache entry, gives back the concurrency slot, and counts the
disconnect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import anyio
import orjson
from fastapi import Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.errors import log_server_error
from app.api.schemas import QueryResponse
from app.config import Settings
from app.errors import AppError
from app.observability.metrics import Metrics
from app.services.query import (
    QueryInput,
    QueryOutput,
    QueryService,
    StreamEvent,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnStarted,
    TurnStream,
)

logger = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CACHED_CHUNK = re.compile(r"\S+\s*|\s+")
"""A cached answer is replayed a word (with its trailing space) per delta."""


def wants_stream(accept: str | None, stream_field: bool | None) -> bool:
    """`"stream": true` in the body, or an Accept header that asks for text/event-stream."""
    return bool(stream_field) or (accept is not None and "text/event-stream" in accept)


SEP = "\n"
"""Lines end in LF, as OpenAI's streams do (any SSE client also reads CRLF)."""


def sse(event: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(data).decode(), event=event, sep=SEP)


def ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep=SEP)


def start(session_id: object, agent: str, request_id: str) -> ServerSentEvent:
    return sse("start", {"session_id": str(session_id), "agent": agent, "request_id": request_id})


def error_data(exc: AppError, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message, "request_id": request_id}
    if exc.retry_after is not None:
        body["retry_after"] = exc.retry_after
    return {"error": body}


async def query_events(turn: TurnStream, request_id: str) -> AsyncIterator[ServerSentEvent]:
    """/query's events for a turn that `QueryService.open_stream` started."""
    async for item in turn.events():
        if isinstance(item, TurnStarted):
            yield start(item.session_id, item.agent, request_id)
        elif isinstance(item, TextDelta):
            if item.text:
                yield sse("delta", {"text": item.text})
        elif isinstance(item, ToolCallStarted):
            call = item.call
            yield sse("tool_call", {"id": call.id, "tool": call.name, "arguments": call.arguments})
        elif isinstance(item, ToolCallFinished):
            yield sse(
                "tool_result",
                {
                    "id": item.call.id,
                    "tool": item.call.name,
                    "result": item.result.content,
                    "is_error": item.result.is_error,
                    "duration_ms": round(item.duration_ms, 3),
                },
            )
        elif isinstance(item, QueryOutput):
            if item.cached:  # a hit: nothing streamed yet
                yield start(item.session_id, item.agent, request_id)
                for chunk in CACHED_CHUNK.findall(item.answer):
                    yield sse("delta", {"text": chunk})
            done = QueryResponse.from_output(item, request_id)
            yield sse("done", done.model_dump(mode="json"))


def query_error(exc: AppError | None, request_id: str) -> ServerSentEvent:
    """/query's `error` event; None for an unexpected failure."""
    if exc is None:
        body = {
            "code": "internal_error",
            "message": "an unexpected error occurred",
            "request_id": request_id,
        }
        return sse("error", {"error": body})
    return sse("error", error_data(exc, request_id))


async def guarded(
    events: AsyncIterator[ServerSentEvent],
    turn: TurnStream,
    *,
    held: AsyncExitStack,
    on_error: Callable[[AppError | None], ServerSentEvent],
    on_disconnect: Callable[[], None],
) -> AsyncIterator[ServerSentEvent]:
    """A stream's events, then its end, however it comes: the turn's failure becomes one
    last event (`on_error`); a client gone (sse-starlette cancels this generator) cancels
    an unfinished turn and counts (`on_disconnect`); `held`, the concurrency slot, is
    released. The cleanup is shielded so that it runs to the end under that cancellation."""
    try:
        async for event in events:
            yield event
    except AppError as exc:
        log_server_error(exc)  # as a JSON error would be: the stream had started
        yield on_error(exc)
    except Exception:
        logger.exception("stream failed")
        yield on_error(None)
    finally:
        with anyio.CancelScope(shield=True):
            if not turn.finished:
                on_disconnect()
            await turn.aclose()
            await held.aclose()


async def open_event_stream(
    service: QueryService,
    query: QueryInput,
    admission: AbstractAsyncContextManager[None],
    request: Request,
    response: Response,
    *,
    render: Callable[[TurnStream], AsyncIterator[ServerSentEvent]],
    on_error: Callable[[AppError | None], ServerSentEvent],
) -> tuple[EventSourceResponse, StreamEvent | None]:
    """Start the turn and answer with its events; refusals before the start are raised
    (plain JSON errors). The concurrency slot (`admission`) is held until the stream ends.
    Returns the response and the turn's first event."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(admission)
        turn = await service.open_stream(query)
        held = stack.pop_all()
    settings: Settings = request.state.settings
    metrics: Metrics = request.state.metrics
    route = getattr(request.scope.get("route"), "path", "unmatched")
    events = guarded(
        render(turn),
        turn,
        held=held,
        on_error=on_error,
        on_disconnect=metrics.stream_disconnects.labels(route).inc,
    )
    first = turn.first
    sse_response = event_stream_response(
        events,
        cached=isinstance(first, QueryOutput) and first.cached,
        ping_seconds=settings.sse_ping_seconds,
        drain_seconds=settings.drain_seconds,
    )
    sse_response.headers.update(response.headers)  # RateLimit-*
    return sse_response, first


def event_stream_response(
    events: AsyncIterator[ServerSentEvent],
    *,
    cached: bool,
    ping_seconds: float,
    drain_seconds: float,
) -> EventSourceResponse:
    """On SIGTERM a stream may run on for all but the last second of the drain (before
    uvicorn gives up); one still running then is cancelled like a client that went away,
    and its turn is not stored."""
    return EventSourceResponse(
        events,
        headers={**STREAM_HEADERS, "X-Cache": "HIT" if cached else "MISS"},
        ping=ping_seconds,
        ping_message_factory=ping,
        sep=SEP,
        shutdown_grace_period=max(0.0, drain_seconds - 1.0),
    )
