"""What routes may ask for: a dependency per component of the lifespan's state, and
`Annotated` aliases on them, so a route's signature says what it touches. All `async def`:
FastAPI runs a plain `def` dependency in the threadpool, two thread hops for a lookup.
"""

from __future__ import annotations

from types import TracebackType
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


async def get_query_service(request: Request) -> QueryService:
    service: QueryService = request.state.query_service
    return service


async def get_session_service(request: Request) -> SessionService:
    service: SessionService = request.state.session_service
    return service


async def get_readiness(request: Request) -> ReadinessService:
    readiness: ReadinessService = request.state.readiness
    return readiness


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


def client_ip(request: Request) -> str:
    """The peer address; X-Forwarded-For is honoured only from FORWARDED_ALLOW_IPS, by the
    proxy-headers middleware that rewrites the peer before this runs."""
    return request.client.host if request.client else "unknown"


PrincipalDep = Annotated[Principal, Depends(require_principal)]

# --- limits per caller ----------------------------------------------------------------------


def count_refusal(request: Request, exc: RateLimitExceeded) -> RateLimitExceeded:
    route = request.scope.get("route")
    template = getattr(route, "path", "unmatched")  # the template, not the raw path
    metrics: Metrics = request.state.metrics
    metrics.rate_limited.labels(template, exc.kind).inc()
    return exc


class Admission:
    """One query's admission, entered by the route around its work: entering counts the
    request and takes a concurrency slot (429 + RateLimit-* when refused, counted by route);
    leaving gives the slot back. The headers go on the response.

    A plain dependency rather than one with `yield`: the route holds the slot exactly as
    long as its work runs, without the per-request exit stack a yield dependency costs.
    The admission dependencies read the settings from the request's state themselves:
    every dependency FastAPI resolves costs a request about as much as a Redis round trip.
    """

    def __init__(
        self, request: Request, response: Response, scope: str, identity: str, rate: str, slots: int
    ) -> None:
        limiter: RateLimiter = request.state.limiter
        self.request = request
        self.response = response
        self.held = limiter.admit(scope, identity, rate, slots)

    async def __aenter__(self) -> None:
        try:
            state = await self.held.__aenter__()
        except RateLimitExceeded as exc:
            raise count_refusal(self.request, exc) from None
        self.response.headers.update(rate_limit_headers(state))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.held.__aexit__(exc_type, exc, traceback)


async def anonymous_admission(request: Request, response: Response) -> Admission:
    """/query: per client IP."""
    settings: Settings = request.state.settings
    rate, slots = settings.rate_limit_query, settings.concurrency_limit_query
    return Admission(request, response, "query", client_ip(request), rate, slots)


def admit_subject(
    request: Request, response: Response, principal: Principal, scope: str
) -> Admission:
    """An admission per token subject in `scope`, with /secure-query's rate and slots."""
    settings: Settings = request.state.settings
    return Admission(
        request,
        response,
        scope,
        principal.subject,
        settings.rate_limit_secure_query,
        settings.concurrency_limit_secure_query,
    )


async def limit_subject_rate(
    request: Request, response: Response, principal: Principal, scope: str
) -> None:
    """The subject's request rate in `scope`, with no slot (for short calls)."""
    settings: Settings = request.state.settings
    limiter: RateLimiter = request.state.limiter
    try:
        state = await limiter.hit(scope, principal.subject, settings.rate_limit_secure_query)
    except RateLimitExceeded as exc:
        raise count_refusal(request, exc) from None
    response.headers.update(rate_limit_headers(state))


async def subject_admission(
    request: Request, response: Response, principal: PrincipalDep
) -> Admission:
    """/secure-query: per token subject."""
    return admit_subject(request, response, principal, "secure-query")


async def limit_sessions(request: Request, response: Response, principal: PrincipalDep) -> None:
    """/sessions: the subject's request rate."""
    await limit_subject_rate(request, response, principal, "sessions")


AnonymousAdmissionDep = Annotated[Admission, Depends(anonymous_admission)]
SubjectAdmissionDep = Annotated[Admission, Depends(subject_admission)]
SessionsLimit = Depends(limit_sessions)
