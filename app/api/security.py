"""Who is calling: the JWT principal (/secure-query, /sessions) and the client address."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import RuntimeDep
from app.security.jwt import Principal

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A JWT. For development: `agentserve token --sub alice` prints one.",
)


async def require_principal(
    request: Request,
    runtime: RuntimeDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """Verify the bearer token (the scheme above only makes Swagger's Authorize button)."""
    return await runtime.verifier.authenticate(request.headers.get("authorization"))


async def client_ip(request: Request) -> str:
    """The peer address; X-Forwarded-For is honoured only from FORWARDED_ALLOW_IPS, by the
    proxy-headers middleware that rewrites the peer before this runs."""
    return request.client.host if request.client else "unknown"


PrincipalDep = Annotated[Principal, Depends(require_principal)]
ClientIPDep = Annotated[str, Depends(client_ip)]
