"""An httpx transport on aiohttp's connection pool, written against both libraries' public APIs.

Why not httpx's own transport: httpcore's pool scans every connection it holds, with a
readability syscall per idle one, on every request and every response close, so its CPU per
request grows with the number of open connections. aiohttp's connector takes an idle
connection off a per-host list and parses HTTP in C, flat with concurrency. Why not the
`httpx-aiohttp` package: it reports a server that closes the connection as `ConnectTimeout`
(a dropped answer would read as a timeout in logs and metrics), and ignores
`max_keepalive_connections=0` and the environment's proxies. The client stays httpx
(timeouts, exceptions, httpx-sse); tracing wraps it with OpenTelemetry's `instrument_client`.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

# First match wins: aiohttp's timeouts subclass both ClientConnectionError and TimeoutError,
# TimeoutError subclasses OSError, ClientConnectorError subclasses ClientOSError.
ERROR_MAP: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),  # pool wait + connect
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # sock_read
    (TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),  # closed, no response
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # closed mid-body
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not HTTP
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.ReadError),  # reset
    (aiohttp.ClientError, httpx.NetworkError),
    (OSError, httpx.NetworkError),
)


def as_httpx_error(exc: BaseException, request: httpx.Request) -> BaseException:
    """The httpx exception for an aiohttp (or socket) failure; anything else unchanged."""
    for source, target in ERROR_MAP:
        if isinstance(exc, source):
            return target(str(exc) or type(exc).__name__, request=request)
    return exc


def client_timeout(timeouts: dict[str, float | None]) -> aiohttp.ClientTimeout:
    """httpx's timeouts as aiohttp's: connect → sock_connect, read → sock_read (between two
    reads, as httpx means it), pool + connect → connect (aiohttp's covers both)."""
    connect, read, pool = timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool")
    return aiohttp.ClientTimeout(
        total=None,
        connect=None if pool is None or connect is None else pool + connect,
        sock_connect=connect,
        sock_read=read,
    )


class AiohttpResponseStream(httpx.AsyncByteStream):
    """A response body as aiohttp delivers it; closing it releases the connection (back to
    the pool when the body was read to the end, closed otherwise)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self.response = response
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise as_httpx_error(exc, self.request) from exc

    async def aclose(self) -> None:
        self.response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 requests through one aiohttp session, made at the first request (aiohttp
    binds it to the running loop) and closed by `aclose`.

    Limits: `max_connections` is the connector's `limit` (None: no limit);
    `keepalive_expiry` its `keepalive_timeout`; `max_keepalive_connections=0` turns
    keep-alive off (aiohttp has no other cap on idle connections). HTTP(S)_PROXY and
    NO_PROXY are honoured as httpx honours them. The request body is sent whole.
    """

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        self.limits = limits
        self.ssl_context = (
            verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
        )
        self.session: aiohttp.ClientSession | None = None
        self.closed = False

    def client_session(self) -> aiohttp.ClientSession:
        if self.session is None:
            if self.closed:
                raise RuntimeError("the transport is closed")
            limits = self.limits
            keepalive: dict[str, Any] = (
                {"force_close": True}
                if limits.max_keepalive_connections == 0
                else {"keepalive_timeout": limits.keepalive_expiry}
            )
            connector = aiohttp.TCPConnector(
                limit=limits.max_connections or 0,  # 0: no limit (httpx: None)
                limit_per_host=0,
                ssl=self.ssl_context,
                **keepalive,
            )
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(),  # every request brings its own
                auto_decompress=False,  # httpx decodes Content-Encoding
                cookie_jar=aiohttp.DummyCookieJar(),  # cookies are httpx's business
                skip_auto_headers=("Content-Type",),  # httpx sets the headers it means
                # only when a proxy is set: aiohttp then reads the environment per request
                trust_env=bool(urllib.request.getproxies()),
            )
        return self.session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            session = self.client_session()
        except RuntimeError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        body = await request.aread()
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() != "transfer-encoding"  # the body is sent whole (Content-Length)
        ]
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=client_timeout(request.extensions.get("timeout", {})),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except Exception as exc:
            raise as_httpx_error(exc, request) from exc
        version = response.version
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=AiohttpResponseStream(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/%d.%d" % (version.major, version.minor)
                if version is not None
                else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        self.closed = True
        session, self.session = self.session, None
        if session is not None:
            await session.close()
