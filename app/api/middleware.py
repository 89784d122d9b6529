"""The service's own ASGI middleware, pure ASGI: BaseHTTPMiddleware costs a task and a copy
per request, and every layer a call and a wrapped send/receive per message."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response

logger = logging.getLogger(__name__)


class RequestEnvelope:
    """What every HTTP answer of this service gets, in one layer rather than three:

    * **X-Instance**: the replica that answered (load-balancer debugging, stack tests);
    * **a body limit**: 413 for bodies over `max_body_bytes`, by Content-Length up front or
      while a chunked body is read (the route's body parsing then fails with the same 413).
      uvicorn only bounds headers, and Starlette's RequestBodyLimitMiddleware (FastAPI's
      `max_body_size`) sits outside the app's middleware, where a 413 is plain text,
      uncounted and without X-Request-ID;
    * **the JSON 500**: an unexpected exception becomes the error shape here, inside the
      request-id and metrics middleware, so it still carries X-Request-ID and is counted
      (Starlette's own handler sits outside all of them).
    """

    def __init__(self, app: ASGIApp, *, instance: str, max_body_bytes: int) -> None:
        self.app = app
        self.instance_header = (b"x-instance", instance.encode("latin-1", "replace"))
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        instance_header = self.instance_header

        async def send_with_instance(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), instance_header]
            await send(message)

        try:
            if self._declared_too_large(scope):
                await self._too_large()(scope, receive, send_with_instance)
                return
            await self.app(scope, self._limited(receive), send_with_instance)
        except Exception:
            if started:  # too late for a clean answer; let the server close the connection
                raise
            logger.exception("unhandled error")
            response = error_response(500, "internal_error", "an unexpected error occurred")
            await response(scope, receive, send_with_instance)

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return bool(value.isdigit() and int(value) > self.max_body_bytes)
        return False

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, self._message())  # FastAPI re-raises HTTPException
            return message

        return limited_receive

    def _message(self) -> str:
        return f"request body exceeds {self.max_body_bytes} bytes"

    def _too_large(self) -> ASGIApp:
        return error_response(
            413, "payload_too_large", self._message(), headers={"Connection": "close"}
        )


class DocsContentPolicy:
    """A Content-Security-Policy on the API docs pages (/docs, /redoc): their assets are
    served by this app, and `img-src 'self' data:` stops ReDoc's bundle fetching its footer
    logo from its vendor's CDN, so the pages make no request off this host."""

    POLICY = (b"content-security-policy", b"img-src 'self' data:")

    def __init__(self, app: ASGIApp, *, paths: tuple[str, ...]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.POLICY]
            await send(message)

        await self.app(scope, receive, send_with_policy)
