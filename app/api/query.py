"""POST /query (anonymous) and POST /secure-query (JWT): one conversation turn."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Header, Request
from starlette.responses import Response

from app.api.deps import RuntimeDep
from app.api.errors import AUTH_ERRORS, APIError, documented_errors
from app.api.responses import JSON
from app.api.schemas import QUERY_EXAMPLES, QueryRequest, QueryResponse
from app.api.security import ClientIPDep, PrincipalDep
from app.config import Settings
from app.runtime import Runtime
from app.security.ratelimit import rate_limit_headers
from app.service import CachePolicy, QueryInput, QueryOutput

router = APIRouter(tags=["query"])

QUERY_ERRORS = {
    404: "Unknown agent or session",
    409: "The session is answering another request",
    413: "Body too large",
    422: "Invalid body",
    429: "Too many requests (see Retry-After and RateLimit-* headers)",
    503: "No agent free in time, or no LLM upstream can answer (see Retry-After)",
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


def cache_directives(request: Request) -> set[str]:
    """Every Cache-Control line (and Pragma) as a set of lower-cased directives."""
    lines = [*request.headers.getlist("cache-control"), *request.headers.getlist("pragma")]
    directives = {
        part.strip().lower().replace(" ", "") for line in lines for part in line.split(",")
    }
    if "max-age=0" in directives:
        directives.add("no-cache")
    return directives


def validate_limits(body: QueryRequest, settings: Settings) -> None:
    if len(body.message) > settings.max_message_chars:
        raise APIError(
            422,
            "validation_error",
            f"message: at most {settings.max_message_chars} characters are allowed "
            f"(got {len(body.message)})",
        )
    if body.metadata and len(orjson.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise APIError(
            422,
            "validation_error",
            f"metadata: at most {settings.max_metadata_bytes} bytes of JSON are allowed",
        )


def cache_policy(body: QueryRequest, directives: set[str]) -> CachePolicy:
    options = body.cache
    return CachePolicy(
        read="no-cache" not in directives and not (options and options.no_cache),
        write="no-store" not in directives and not (options and options.no_store),
        ttl=options.ttl if options else None,
    )


def render(output: QueryOutput, request_id: str) -> dict[str, Any]:
    usage = output.usage
    return {
        "answer": output.answer,
        "session_id": str(output.session_id),
        "agent": output.agent,
        "model": output.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "steps": [
            {
                "tool": step.tool,
                "arguments": step.arguments,
                "result": step.result,
                "is_error": step.is_error,
                "duration_ms": round(step.duration_ms, 3),
            }
            for step in output.steps
        ],
        "finish_reason": output.finish_reason,
        "cached": output.cached,
        "request_id": request_id,
        "latency_ms": round(output.latency_ms, 3),
    }


async def run_query(
    runtime: Runtime,
    body: QueryRequest,
    directives: set[str],
    *,
    scope: str,
    identity: str,
    rate: str,
    max_in_flight: int,
    owner: str | None = None,
    allowed_agents: frozenset[str] | None = None,
) -> Response:
    settings = runtime.settings
    validate_limits(body, settings)  # before counting: a refused body costs no budget
    request_id = correlation_id.get() or "-"
    query = QueryInput(
        message=body.message,
        session_id=body.session_id,
        agent=body.agent,
        metadata=body.metadata or {},
        owner=owner,
        allowed_agents=allowed_agents,
        request_id=request_id,
        cache=cache_policy(body, directives),
    )
    # One Redis round trip counts the request and takes its slot; the slot goes back after.
    async with runtime.limiter.admit(scope, identity, rate, max_in_flight) as limit_state:
        try:
            async with asyncio.timeout(settings.request_timeout) as deadline:
                output = await runtime.service.answer(query)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise APIError(
                504,
                "deadline_exceeded",
                f"the request did not finish within {settings.request_timeout:g}s; the turn "
                "was not completed",
            ) from None
    headers = rate_limit_headers(limit_state)
    headers["X-Cache"] = "HIT" if output.cached else "MISS"
    return JSON(render(output, request_id), headers=headers)


@router.post(
    "/query",
    response_model=QueryResponse,
    responses=ERROR_RESPONSES,
    summary="Ask an agent (anonymous)",
)
async def query(
    body: Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)],
    runtime: RuntimeDep,
    ip: ClientIPDep,
    request: Request,
    cache_control: CacheControl = None,
) -> Response:
    """Send a message to an agent. Omit `session_id` to start a conversation; pass the
    returned `session_id` to continue it. Limited per client IP."""
    settings = runtime.settings
    return await run_query(
        runtime,
        body,
        cache_directives(request),
        scope="query",
        identity=ip,
        rate=settings.rate_limit_query,
        max_in_flight=settings.concurrency_limit_query,
    )


secure_router = APIRouter(tags=["query"])


@secure_router.post(
    "/secure-query",
    response_model=QueryResponse,
    responses=SECURE_ERROR_RESPONSES,
    summary="Ask an agent as the token's subject",
)
async def secure_query(
    body: Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)],
    runtime: RuntimeDep,
    principal: PrincipalDep,
    request: Request,
    cache_control: CacheControl = None,
) -> Response:
    """Same body as /query. Sessions started here belong to the token's `sub`: nobody else
    (and no anonymous /query) can read or continue them. Limited per subject."""
    settings = runtime.settings
    return await run_query(
        runtime,
        body,
        cache_directives(request),
        scope="secure-query",
        identity=principal.subject,
        rate=settings.rate_limit_secure_query,
        max_in_flight=settings.concurrency_limit_secure_query,
        owner=principal.subject,
        allowed_agents=principal.agents,
    )
