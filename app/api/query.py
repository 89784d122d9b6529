"""POST /query (anonymous) and POST /secure-query (JWT): one conversation turn."""

from __future__ import annotations

import asyncio
from typing import Annotated

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Header, Request, Response

from app.api.deps import (
    AnonymousLimit,
    PrincipalDep,
    QueryServiceDep,
    SettingsDep,
    SubjectLimit,
)
from app.api.errors import AUTH_ERRORS, documented_errors
from app.api.schemas import (
    QUERY_EXAMPLES,
    QUERY_HEADERS,
    QueryRequest,
    QueryResponse,
)
from app.config import Settings
from app.errors import DeadlineExceededError, InvalidRequestError
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

CacheControl = Annotated[
    str | None,
    Header(
        description="`no-cache` (or `max-age=0`, or `Pragma: no-cache`) skips the cache "
        "lookup, `no-store` skips storing."
    ),
]
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


def check_limits(body: QueryRequest, settings: Settings) -> None:
    """The limits that come from settings (the schema checks the rest)."""
    if len(body.message) > settings.max_message_chars:
        raise InvalidRequestError(
            f"message: at most {settings.max_message_chars} characters are allowed "
            f"(got {len(body.message)})"
        )
    if body.metadata and len(orjson.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise InvalidRequestError(
            f"metadata: at most {settings.max_metadata_bytes} bytes of JSON are allowed"
        )


def cache_policy(body: QueryRequest, directives: set[str]) -> CachePolicy:
    options = body.cache
    return CachePolicy(
        read="no-cache" not in directives and not (options and options.no_cache),
        write="no-store" not in directives and not (options and options.no_store),
        ttl=options.ttl if options else None,
    )


async def answer(
    service: QueryService,
    settings: Settings,
    body: QueryRequest,
    request: Request,
    response: Response,
    *,
    owner: str | None = None,
    allowed_agents: frozenset[str] | None = None,
) -> QueryResponse:
    check_limits(body, settings)
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
    try:
        async with asyncio.timeout(settings.request_timeout) as deadline:
            output = await service.answer(query)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise DeadlineExceededError(
            f"the request did not finish within {settings.request_timeout:g}s; the turn "
            "was not completed"
        ) from None
    response.headers["X-Cache"] = "HIT" if output.cached else "MISS"
    return QueryResponse.from_output(output, request_id)


router = APIRouter(tags=["query"])


@router.post(
    "/query",
    responses={200: {"headers": QUERY_HEADERS}, **ERROR_RESPONSES},
    summary="Ask an agent (anonymous)",
    dependencies=[AnonymousLimit],
)
async def query(
    body: QueryBody,
    service: QueryServiceDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    cache_control: CacheControl = None,
) -> QueryResponse:
    """Send a message to an agent. Omit `session_id` to start a conversation; pass the
    returned `session_id` to continue it. Limited per client IP."""
    return await answer(service, settings, body, request, response)


secure_router = APIRouter(tags=["query"])


@secure_router.post(
    "/secure-query",
    responses={200: {"headers": QUERY_HEADERS}, **SECURE_ERROR_RESPONSES},
    summary="Ask an agent as the token's subject",
    dependencies=[SubjectLimit],
)
async def secure_query(
    body: QueryBody,
    service: QueryServiceDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    request: Request,
    response: Response,
    cache_control: CacheControl = None,
) -> QueryResponse:
    """Same body as /query. Sessions started here belong to the token's `sub`: nobody else
    (and no anonymous /query) can read or continue them. Limited per subject."""
    return await answer(
        service,
        settings,
        body,
        request,
        response,
        owner=principal.subject,
        allowed_agents=principal.agents,
    )
