"""POST /query (anonymous) and POST /secure-query (JWT): one conversation turn."""

from __future__ import annotations

from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Request, Response

from app.api.deps import (
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
            "lookup, `no-store` skips storing.",
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


async def answer(
    service: QueryService,
    body: QueryRequest,
    request: Request,
    response: Response,
    *,
    owner: str | None = None,
    allowed_agents: frozenset[str] | None = None,
) -> QueryResponse:
    request_id = correlation_id.get() or "-"
    query = QueryInput(
        message=body.message,
        session_id=body.session_id,
        agent=body.agent,
        metadata=body.metadata or {},
        owner=owner,
        allowed_agents=allowed_agents,
        request_id=request_id,
        cache=cache_policy(body, cache_directives(request)),
    )
    output = await service.answer(query)
    response.headers["X-Cache"] = "HIT" if output.cached else "MISS"
    return QueryResponse.from_output(output, request_id)


router = APIRouter(tags=["query"])


@router.post(
    "/query",
    responses={200: {"headers": QUERY_HEADERS}, **ERROR_RESPONSES},
    summary="Ask an agent (anonymous)",
    openapi_extra=CACHE_CONTROL,
)
async def query(
    body: QueryBody,
    service: QueryServiceDep,
    admission: AnonymousAdmissionDep,
    request: Request,
    response: Response,
) -> QueryResponse:
    """Send a message to an agent. Omit `session_id` to start a conversation; pass the
    returned `session_id` to continue it. Limited per client IP."""
    async with admission:
        return await answer(service, body, request, response)


secure_router = APIRouter(tags=["query"])


@secure_router.post(
    "/secure-query",
    responses={200: {"headers": QUERY_HEADERS}, **SECURE_ERROR_RESPONSES},
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
) -> QueryResponse:
    """Same body as /query. Sessions started here belong to the token's `sub`: nobody else
    (and no anonymous /query) can read or continue them. Limited per subject."""
    async with admission:
        return await answer(
            service,
            body,
            request,
            response,
            owner=principal.subject,
            allowed_agents=principal.agents,
        )
