"""POST /query (anonymous) and POST /secure-query (JWT): one conversation turn."""

from __future__ import annotations

from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Request, Response

from app.api.deps import (
    Admission,
    AnonymousAdmissionDep,
    PrincipalDep,
    QueryServiceDep,
    SubjectAdmissionDep,
)
from app.api.errors import AUTH_ERRORS, documented_errors
from app.api.schemas import (
    QUERY_EXAMPLES,
    QUERY_HEADERS,
    QueryRequest,
    QueryResponse,
)
from app.api.streaming import open_event_stream, query_error, query_events, wants_stream
from app.services.query import CachePolicy, QueryInput, QueryService

QUERY_ERRORS = {
    404: "Unknown agent or session",
    409: "The session is answering another request",
    413: "Body too large",
    422: "Invalid body",
    429: "Too many requests (see Retry-After and RateLimit-* headers)",
    503: "No agent free in time, the database or no LLM upstream can answer (see Retry-After)",
    504: "The request deadline was reached",
}
ERROR_RESPONSES = documented_errors(QUERY_ERRORS)
SECURE_ERROR_RESPONSES = documented_errors({**QUERY_ERRORS, **AUTH_ERRORS})

CACHE_CONTROL = {
    "parameters": [
        {
            "name": "Cache-Control",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`no-cache` (or `max-age=0`, or `Pragma: no-cache`) skips the cache "
            "lookup, `no-store` skips storing. Not read on a streamed request (SSE clients send "
            "it for HTTP caches): use the body's `cache` there.",
        }
    ]
}
"""Documented here rather than declared as a parameter: `cache_directives` reads every
Cache-Control and Pragma line itself, and a declared header costs each request its parsing."""
QueryBody = Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)]


def cache_directives(request: Request) -> set[str]:
    """Every Cache-Control line (and Pragma) as a set of lower-cased directives."""
    lines = [*request.headers.getlist("cache-control"), *request.headers.getlist("pragma")]
    directives = {
        part.strip().lower().replace(" ", "") for line in lines for part in line.split(",")
    }
    if "max-age=0" in directives:
        directives.add("no-cache")
    return directives


def cache_policy(body: QueryRequest, directives: set[str]) -> CachePolicy:
    options = body.cache
    return CachePolicy(
        read="no-cache" not in directives and not (options and options.no_cache),
        write="no-store" not in directives and not (options and options.no_store),
        ttl=options.ttl if options else None,
    )


def query_input(
    body: QueryRequest,
    request: Request,
    *,
    streamed: bool,
    owner: str | None,
    allowed_agents: frozenset[str] | None,
) -> QueryInput:
    """A streamed request's Cache-Control is left alone: SSE clients (httpx-sse, browsers'
    EventSource) send `no-store` or `no-cache` on every stream to keep HTTP caches off it,
    not to turn off this response cache; the body's `cache` options still apply."""
    directives = set() if streamed else cache_directives(request)
    return QueryInput(
        message=body.message,
        session_id=body.session_id,
        agent=body.agent,
        metadata=body.metadata or {},
        owner=owner,
        allowed_agents=allowed_agents,
        request_id=correlation_id.get() or "-",
        cache=cache_policy(body, directives),
    )


async def answer(
    service: QueryService,
    body: QueryRequest,
    admission: Admission,
    request: Request,
    response: Response,
    *,
    owner: str | None = None,
    allowed_agents: frozenset[str] | None = None,
) -> QueryResponse | Response:
    """The turn as JSON, or as Server-Sent Events when the caller asks for a stream."""
    streamed = wants_stream(request.headers.get("accept"), body.stream)
    query = query_input(
        body, request, streamed=streamed, owner=owner, allowed_agents=allowed_agents
    )
    if streamed:
        return await stream(service, query, admission, request, response)
    async with admission:
        output = await service.answer(query)
    response.headers["X-Cache"] = "HIT" if output.cached else "MISS"
    return QueryResponse.from_output(output, query.request_id or "-")


async def stream(
    service: QueryService,
    query: QueryInput,
    admission: Admission,
    request: Request,
    response: Response,
) -> Response:
    request_id = query.request_id or "-"
    sse_response, _ = await open_event_stream(
        service,
        query,
        admission,
        request,
        response,
        render=lambda turn: query_events(turn, request_id),
        on_error=lambda exc: query_error(exc, request_id),
    )
    return sse_response


router = APIRouter(tags=["query"])

QUERY_200 = {
    "headers": QUERY_HEADERS,
    "content": {
        "text/event-stream": {
            "schema": {"type": "string"},
            "description": "With `stream: true` or `Accept: text/event-stream`: events "
            "`start`, `delta`*, `tool_call`/`tool_result`*, then `done` (this JSON body) "
            "or `error`.",
        }
    },
}


@router.post(
    "/query",
    response_model=QueryResponse,
    responses={200: QUERY_200, **ERROR_RESPONSES},
    summary="Ask an agent (anonymous)",
    openapi_extra=CACHE_CONTROL,
)
async def query(
    body: QueryBody,
    service: QueryServiceDep,
    admission: AnonymousAdmissionDep,
    request: Request,
    response: Response,
) -> QueryResponse | Response:
    """Send a message to an agent. Omit `session_id` to start a conversation; pass the
    returned `session_id` to continue it. Limited per client IP. `"stream": true` (or
    `Accept: text/event-stream`) answers as Server-Sent Events."""
    return await answer(service, body, admission, request, response)


secure_router = APIRouter(tags=["query"])


@secure_router.post(
    "/secure-query",
    response_model=QueryResponse,
    responses={200: QUERY_200, **SECURE_ERROR_RESPONSES},
    summary="Ask an agent as the token's subject",
    openapi_extra=CACHE_CONTROL,
)
async def secure_query(
    body: QueryBody,
    service: QueryServiceDep,
    principal: PrincipalDep,
    admission: SubjectAdmissionDep,
    request: Request,
    response: Response,
) -> QueryResponse | Response:
    """Same body as /query. Sessions started here belong to the token's `sub`: nobody else
    (and no anonymous /query) can read or continue them. Limited per subject."""
    return await answer(
        service,
        body,
        admission,
        request,
        response,
        owner=principal.subject,
        allowed_agents=principal.agents,
    )
