"""What routes may ask for: a dependency per component of the lifespan's state, and
`Annotated` aliases on them, so a route's signature says what it touches. All `async def`:
FastAPI runs a plain `def` dependency in the threadpool, two thread hops for a lookup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, TypedDict

from fastapi import Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.observability.metrics import Metrics
from app.security.jwt import JWTVerifier, Principal
from app.security.ratelimit import RateLimiter, RateLimitExceeded, rate_limit_headers
from app.services.health import ReadinessService
from app.services.query import QueryService
from app.services.sessions import SessionService


class AppState(TypedDict):
    """What the lifespan built, as every request sees it (`request.state`)."""

    settings: Settings
    metrics: Metrics
    query_service: QueryService
    session_service: SessionService
    readiness: ReadinessService
    limiter: RateLimiter
    verifier: JWTVerifier


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_query_service(request: Request) -> QueryService:
    service: QueryService = request.state.query_service
    return service


async def get_session_service(request: Request) -> SessionService:
    service: SessionService = request.state.session_service
    return service


async def get_readiness(request: Request) -> ReadinessService:
    readiness: ReadinessService = request.state.readiness
    return readiness


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueryServiceDep = Annotated[QueryService, Depends(get_query_service)]
SessionServiceDep = Annotated[SessionService, Depends(get_session_service)]
ReadinessDep = Annotated[ReadinessService, Depends(get_readiness)]

# --- who is calling -------------------------------------------------------------------------

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A JWT. For development: `agentserve token --sub alice` prints one.",
)


async def require_principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """Verify the bearer token (the scheme above only makes Swagger's Authorize button)."""
    verifier: JWTVerifier = request.state.verifier
    return await verifier.authenticate(request.headers.get("authorization"))


async def client_ip(request: Request) -> str:
    """The peer address; X-Forwarded-For is honoured only from FORWARDED_ALLOW_IPS, by the
    proxy-headers middleware that rewrites the peer before this runs."""
    return request.client.host if request.client else "unknown"


PrincipalDep = Annotated[Principal, Depends(require_principal)]
ClientIPDep = Annotated[str, Depends(client_ip)]

# --- limits per caller ----------------------------------------------------------------------


@asynccontextmanager
async def admitted(
    request: Request, response: Response, scope: str, identity: str, rate: str, slots: int
) -> AsyncIterator[None]:
    """Count the request and hold a concurrency slot (`slots` > 0) for the body of the
    block; the RateLimit-* headers go on the response, and a refusal is counted by route."""
    limiter: RateLimiter = request.state.limiter
    try:
        if slots:
            async with limiter.admit(scope, identity, rate, slots) as state:
                response.headers.update(rate_limit_headers(state))
                yield
        else:
            state = await limiter.hit(scope, identity, rate)
            response.headers.update(rate_limit_headers(state))
            yield
    except RateLimitExceeded as exc:
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")  # the template, not the raw path
        metrics: Metrics = request.state.metrics
        metrics.rate_limited.labels(template, exc.kind).inc()
        raise


async def limit_anonymous(
    request: Request, response: Response, ip: ClientIPDep, settings: SettingsDep
) -> AsyncIterator[None]:
    """/query: per client IP; the slot is held until the response has been sent."""
    rate, slots = settings.rate_limit_query, settings.concurrency_limit_query
    async with admitted(request, response, "query", ip, rate, slots):
        yield


async def limit_subject(
    request: Request, response: Response, principal: PrincipalDep, settings: SettingsDep
) -> AsyncIterator[None]:
    """/secure-query: per token subject; the slot is held until the response has been sent."""
    rate, slots = settings.rate_limit_secure_query, settings.concurrency_limit_secure_query
    async with admitted(request, response, "secure-query", principal.subject, rate, slots):
        yield


async def limit_sessions(
    request: Request, response: Response, principal: PrincipalDep, settings: SettingsDep
) -> AsyncIterator[None]:
    """/sessions: the subject's request rate (no slot: each call is short)."""
    rate = settings.rate_limit_secure_query
    async with admitted(request, response, "sessions", principal.subject, rate, 0):
        yield


AnonymousLimit = Depends(limit_anonymous, scope="request")
SubjectLimit = Depends(limit_subject, scope="request")
SessionsLimit = Depends(limit_sessions, scope="request")
