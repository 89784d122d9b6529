"""An httpx transport on aiohttp's connection pool.

Why hand-written: the client stays httpx (timeouts, exceptions, httpx-sse, OpenTelemetry's
httpx instrumentation), but httpcore 1.0's pool scans every connection it holds, with a
readability syscall per idle one, on every request and every response close, so its CPU per
request grows with the number of connections: at c=1000 against a 2 s upstream it was 86 %
of the service's CPU (17 ms per request), at c=32 0.8 ms (docs/performance.md). aiohttp's
connector takes an idle connection off a per-host list in O(1) and parses HTTP in C: 0.4 ms
per request, flat with concurrency. The `httpx-aiohttp` package does the same job but maps a
refused connection and a server disconnect to `ConnectTimeout` and is not an
`AsyncHTTPTransport` (OpenTelemetry's httpx spans disappear), so this subclass replaces only
the pool of httpx's own transport: httpx's request handling, error mapping and
instrumentation run unchanged. It relies on `AsyncHTTPTransport._pool` (httpx is capped
below 0.29 in pyproject.toml; tests fail if that attribute changes).
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
import httpcore
import httpx
import yarl

# aiohttp's exceptions as httpcore's, so that httpx maps them exactly as it maps its own pool's
# (httpx.TimeoutException -> "timeout", httpx.TransportError -> "connect"). First match wins:
# the timeouts subclass both ClientConnectionError and TimeoutError, TimeoutError subclasses
# OSError, ClientConnectorError subclasses ClientOSError.
_ERRORS: tuple[tuple[type[BaseException], type[Exception]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpcore.ConnectTimeout),  # sock_connect / connect
    (aiohttp.ServerTimeoutError, httpcore.ReadTimeout),  # sock_read (SocketTimeoutError)
    (TimeoutError, httpcore.ReadTimeout),  # asyncio.TimeoutError
    (aiohttp.ClientConnectorError, httpcore.ConnectError),  # refused, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpcore.RemoteProtocolError),  # closed, no response
    (aiohttp.ClientPayloadError, httpcore.RemoteProtocolError),  # closed mid-body
    (aiohttp.ClientResponseError, httpcore.RemoteProtocolError),  # not HTTP
    (aiohttp.InvalidURL, httpcore.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpcore.ReadError),  # reset
    (aiohttp.ClientError, httpcore.NetworkError),
    (OSError, httpcore.NetworkError),
)


def _as_httpcore_error(exc: Exception) -> Exception:
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc) or type(exc).__name__)
    return exc


class _AiohttpBody:
    """A response body: aiohttp's chunks as they arrive; closing it releases the connection
    (back to the pool when the body was read to the end, closed otherwise)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise _as_httpcore_error(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


class _AiohttpPool:
    """What `httpx.AsyncHTTPTransport` asks of its httpcore pool, on an aiohttp session.

    The session is made at the first request (aiohttp binds it to the running loop) and
    closed by `aclose`, which waits for its connections to close.
    """

    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext) -> None:
        self._limits = limits
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise httpcore.ConnectError("the transport is closed")
            limits = self._limits
            keepalive: dict[str, Any] = (
                {"force_close": True}  # a connection per request, closed after it
                if limits.max_keepalive_connections == 0
                else {"keepalive_timeout": limits.keepalive_expiry}  # None: no expiry
            )
            connector = aiohttp.TCPConnector(
                limit=limits.max_connections or 0,  # 0: no limit (httpx: None)
                limit_per_host=0,
                ssl=self._ssl_context,
                **keepalive,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(),  # every request brings its own
                auto_decompress=False,  # httpx decodes Content-Encoding
                cookie_jar=aiohttp.DummyCookieJar(),  # cookies are httpx's business
                skip_auto_headers=("Content-Type",),  # httpx sets the headers it means
                # HTTP(S)_PROXY / NO_PROXY, as httpx honours them without a transport of ours;
                # only when one is set: aiohttp then scans the environment on every request
                trust_env=bool(urllib.request.getproxies()),
            )
        return self._session

    def _timeout(self, timeouts: dict[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read, pool = timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool")
        key = (connect, read, pool)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                # aiohttp's `connect` covers waiting for a pool slot and connecting
                connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect,
                sock_read=read,
            )
        return timeout

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        session = self._client_session()
        url = request.url
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers
            if name.lower() != b"transfer-encoding"  # the body is sent whole (Content-Length)
        ]
        stream = request.stream
        if isinstance(stream, AsyncIterable):
            body = b"".join([part async for part in stream])
        else:
            body = b"".join(stream)
        try:
            response = await session.request(
                request.method.decode("ascii"),
                yarl.URL(
                    f"{url.scheme.decode('ascii')}://{_authority(url)}{url.target.decode('ascii')}",
                    encoded=True,  # httpx has already percent-encoded it
                ),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=self._timeout(request.extensions.get("timeout", {})),
                server_hostname=_sni(request.extensions.get("sni_hostname")),
            )
        except Exception as exc:
            raise _as_httpcore_error(exc) from exc
        version = response.version
        return httpcore.Response(
            status=response.status,
            headers=list(response.raw_headers),
            content=_AiohttpBody(response),
            extensions={
                "http_version": b"HTTP/%d.%d" % (version.major, version.minor)
                if version is not None
                else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> _AiohttpPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


def _authority(url: httpcore.URL) -> str:
    host = url.host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    return host if url.port is None else f"{host}:{url.port}"


def _sni(value: Any) -> str | None:
    return value.decode("ascii") if isinstance(value, bytes) else value


class AiohttpTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport class, its httpcore pool replaced by an aiohttp connector.

    httpx's `handle_async_request` stays in charge: it hands the pool an httpcore.Request,
    maps httpcore's exceptions to httpx's, and is what OpenTelemetry's httpx instrumentation
    patches, so client spans and trace propagation keep working. HTTP/1.1 only; the request
    body is sent whole.

    Limits: `max_connections` is the connector's `limit` (None: no limit);
    `keepalive_expiry` its `keepalive_timeout`; `max_keepalive_connections` has no
    counterpart (aiohttp keeps every idle connection until it expires) except 0, which turns
    keep-alive off. Timeouts: connect -> `sock_connect`, read -> `sock_read` (between two
    reads, like httpx's), pool + connect -> `connect`; aiohttp has no write timeout.
    """

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        ssl_context = (
            verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
        )
        super().__init__(verify=ssl_context, limits=limits)  # its httpcore pool: dropped unused
        # httpx types its pool as httpcore's; it only calls handle_async_request, aclose,
        # __aenter__ and __aexit__ on it, which _AiohttpPool has.
        self._pool = _AiohttpPool(limits, ssl_context)  # type: ignore[assignment]
