"""One error shape for every failure: {"error": {"code", "message", "request_id"}}.

`AppError` (app.errors) carries its status, code, message, Retry-After and headers, so one
handler renders all of them; FastAPI's own validation and HTTP errors are rendered in the
same shape, and anything else is a logged 500.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.api.responses import JSON
from app.api.schemas import RATE_LIMIT_HEADERS, RETRY_AFTER_HEADER, ErrorResponse
from app.errors import AppError

logger = logging.getLogger(__name__)


def documented_errors(
    descriptions: dict[int, str], model: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the statuses a route may answer, all in the error shape
    (`model`); 429 and 503 declare their Retry-After (and 429 its RateLimit-*) headers."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, description in descriptions.items():
        response: dict[str, Any] = {"model": model, "description": description}
        if status == 429:
            response["headers"] = {**RETRY_AFTER_HEADER, **RATE_LIMIT_HEADERS}
        elif status == 503:
            response["headers"] = RETRY_AFTER_HEADER
        responses[status] = response
    return responses


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
        503: "The database cannot be reached (see Retry-After)",
    }
)


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


FRAMEWORK_CODES = {413: "payload_too_large"}
"""Codes for the HTTP errors Starlette and FastAPI raise themselves, where the status's
phrase is not the name this API uses (the rest: `not_found`, `method_not_allowed`, ...)."""


def http_code(status: int) -> str:
    """A machine code for an HTTP error raised by the framework (404 route, 405, ...)."""
    if status in FRAMEWORK_CODES:
        return FRAMEWORK_CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def log_server_error(exc: AppError) -> None:
    """A 5xx is the service's or a dependency's failure: logged with its cause."""
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc, extra={"cause": repr(exc.__cause__)[:300]})


async def on_app_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    log_server_error(exc)
    return error_response(
        exc.status, exc.code, exc.message, retry_after=exc.retry_after, headers=exc.headers
    )


async def on_validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return error_response(422, "validation_error", f"{where}: {first['msg']}", details=details)


async def on_http(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(
        exc.status_code,
        http_code(exc.status_code),
        str(exc.detail),
        headers=dict(exc.headers or {}),
    )


async def on_unexpected(_: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, on_app_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
