"""One error shape for every failure: {"error": {"code", "message", "request_id"}}."""

from __future__ import annotations

import logging
import math
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.agents.pool import PoolExhaustedError
from app.api.responses import JSON
from app.api.schemas import ErrorResponse
from app.llm.types import LLMError
from app.security.jwt import AuthError
from app.security.ratelimit import RateLimitExceeded, rate_limit_headers
from app.service import ServiceError
from app.storage.sessions import DatabaseUnavailableError

logger = logging.getLogger(__name__)

DATABASE_RETRY_AFTER = 5.0

SERVICE_STATUS = {
    "agent_not_found": 404,
    "agent_forbidden": 403,
    "session_full": 422,
    "session_not_found": 404,
    "session_busy": 409,
    "agent_mismatch": 422,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
    504: "deadline_exceeded",
}


def documented_errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the statuses a route may answer, all in the error shape."""
    return {
        status: {"model": ErrorResponse, "description": description}
        for status, description in descriptions.items()
    }


AUTH_ERRORS = {
    401: "Missing or invalid bearer token",
    403: "Token lacks the required scope or the agent",
}
SESSIONS_ERRORS = documented_errors(
    {
        **AUTH_ERRORS,
        404: "Not found (or not yours)",
        422: "Invalid parameters",
        429: "Too many requests",
    }
)


class APIError(Exception):
    """Raised by routes for failures that have no service-level exception."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retry_after: float | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": correlation_id.get() or "-",
    }
    if details is not None:
        body["details"] = details
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSON({"error": body}, status_code=status, headers=all_headers)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]


async def _on_validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return error_response(422, "validation_error", f"{where}: {first['msg']}", details=details)


async def _on_http(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after)


async def _on_service_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    status = SERVICE_STATUS.get(exc.code, 400)
    return error_response(status, exc.code, exc.message, retry_after=exc.retry_after)


async def _on_pool_exhausted(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, PoolExhaustedError)
    return error_response(
        503,
        "agent_pool_exhausted",
        f"all {exc.pool!r} agents are busy ({exc.reason}); retry shortly",
        retry_after=exc.retry_after,
    )


async def _on_llm_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, LLMError)
    logger.warning("LLM unavailable", extra={"error": str(exc)})
    return error_response(
        503,
        "llm_unavailable",
        "no LLM upstream could answer right now; retry later",
        retry_after=exc.retry_after if exc.retry_after is not None else 5.0,
    )


async def _on_auth_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    return error_response(
        exc.status,
        exc.error or "unauthorized",
        exc.description,
        headers={"WWW-Authenticate": exc.www_authenticate()},
    )


async def _on_rate_limited(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimitExceeded)
    route = request.scope.get("route")
    template = getattr(route, "path", "unmatched")  # the template, not the raw path (cardinality)
    request.app.state.metrics.rate_limited.labels(template, exc.kind).inc()
    what = "requests" if exc.kind == "rate" else "concurrent requests"
    return error_response(
        429,
        "rate_limited",
        f"too many {what}; retry after {max(1, math.ceil(exc.retry_after))}s",
        retry_after=exc.retry_after,
        headers=rate_limit_headers(exc.state),
    )


async def _on_database_error(_: Request, exc: Exception) -> Response:
    logger.warning("database unavailable", extra={"error": repr(exc)[:300]})
    return error_response(
        503,
        "database_unavailable",
        "the database cannot be reached right now; retry later",
        retry_after=DATABASE_RETRY_AFTER,
    )


async def _on_unexpected(_: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(PoolExhaustedError, _on_pool_exhausted)
    app.add_exception_handler(LLMError, _on_llm_error)
    app.add_exception_handler(AuthError, _on_auth_error)
    app.add_exception_handler(RateLimitExceeded, _on_rate_limited)
    app.add_exception_handler(DatabaseUnavailableError, _on_database_error)
    app.add_exception_handler(Exception, _on_unexpected)
