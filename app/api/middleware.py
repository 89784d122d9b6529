"""Pure ASGI middleware (BaseHTTPMiddleware costs a task and a copy per request)."""

from __future__ import annotations

import logging

import orjson
from asgi_correlation_id import correlation_id
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response

logger = logging.getLogger(__name__)


class UnhandledErrors:
    """An unexpected exception becomes the JSON 500 here, inside the other middleware, so the
    answer still carries X-Request-ID and X-Instance and is counted in the HTTP metrics
    (Starlette's own handler sits outside all of them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:  # too late for a clean answer; let the server close the connection
                raise
            logger.exception("unhandled error")
            response = error_response(500, "internal_error", "an unexpected error occurred")
            await response(scope, receive, send)


class InstanceHeader:
    """Name the replica that answered (X-Instance): load-balancer debugging, stack tests."""

    def __init__(self, app: ASGIApp, *, instance: str) -> None:
        self.app = app
        self.header = (b"x-instance", instance.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_instance(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_instance)


class BodySizeLimit:
    """413 for bodies over `max_bytes`: by Content-Length up front, or while a chunked body
    is read (the route's body parsing then fails with the same 413).

    Hand-written: Starlette has no body limit and uvicorn only bounds headers.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    await self._reject(send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes"

    async def _reject(self, send: Send) -> None:
        body = orjson.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": self._message(),
                    "request_id": correlation_id.get() or "-",
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
