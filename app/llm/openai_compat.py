"""One OpenAI-compatible Chat Completions upstream over a shared httpx.AsyncClient.

Translates transport and HTTP failures into LLMError with a `kind` and `status_code`, so
the retry policy and the breaker decide on facts, not on httpx's exception classes. The
client is httpx; its connections are aiohttp's (app/llm/transport.py says why).
"""

from __future__ import annotations

import email.utils
import http.cookiejar
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse

from app.config import Settings, UpstreamConfig
from app.llm.transport import AiohttpTransport
from app.llm.types import ChatRequest, Completion, CompletionDelta, LLMError
from app.llm.wire import StreamAccumulator, parse_completion


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _DiscardingJar(http.cookiejar.CookieJar):
    """Drops every cookie set on it."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """Cookies that stay empty (whatever is set is dropped): an LLM API has no use for them."""

    def __init__(self) -> None:
        super().__init__(_DiscardingJar())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class UpstreamClient(httpx.AsyncClient):
    """httpx.AsyncClient that keeps no cookies: httpx has no switch for them, and extracts
    them from every response through urllib's cookie machinery (a urllib Request and an
    `email.message.Message` per response), CPU an LLM API call has no use for."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("cookies"):
            raise TypeError("an upstream client keeps no cookies")
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("an upstream client keeps no cookies")


def build_http_client(settings: Settings, upstream: UpstreamConfig) -> UpstreamClient:
    headers = {"Content-Type": "application/json", **upstream.headers}
    if upstream.api_key is not None:
        headers["Authorization"] = f"Bearer {upstream.api_key.get_secret_value()}"
    limits = httpx.Limits(
        max_connections=settings.llm_max_connections,
        max_keepalive_connections=settings.llm_max_keepalive,
    )
    return UpstreamClient(
        base_url=str(upstream.base_url).rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(settings.llm_timeout, connect=settings.llm_connect_timeout),
        limits=limits,
        transport=AiohttpTransport(limits=limits),
    )


class OpenAICompatibleModel:
    """StreamingChatModel over `POST {base_url}/chat/completions`."""

    def __init__(self, name: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self.client = client
        # Absolute and parsed once (httpx's base_url always ends in "/"): a relative path
        # would be joined to base_url and parsed again, host included, on every request.
        self._url = client.base_url.join("chat/completions")

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            response = await self.client.post(self._url, content=orjson.dumps(request.to_payload()))
        except httpx.TimeoutException as exc:
            raise self._error("timeout", f"timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise self._error("connect", f"transport error: {exc!r}") from exc
        if response.status_code >= 400:
            raise self._status_error(response)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise self._error("protocol", "response body is not JSON") from exc
        return parse_completion(data, upstream=self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        accumulator = StreamAccumulator(upstream=self.name)
        payload = request.to_payload(stream=True)
        try:
            async with aconnect_sse(
                self.client, "POST", str(self._url), content=orjson.dumps(payload)
            ) as source:
                if source.response.status_code >= 400:
                    await source.response.aread()
                    raise self._status_error(source.response)
                async for sse in source.aiter_sse():
                    if sse.data.strip() == "[DONE]":
                        break
                    text = accumulator.feed(orjson.loads(sse.data))
                    if text:
                        yield CompletionDelta(text)
        except httpx.TimeoutException as exc:
            raise self._error("timeout", f"timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise self._error("connect", f"transport error: {exc!r}") from exc
        except orjson.JSONDecodeError as exc:
            raise self._error("protocol", "stream chunk is not JSON") from exc
        yield accumulator.result()

    def _error(self, kind: Any, message: str) -> LLMError:
        return LLMError(f"upstream {self.name!r}: {message}", upstream=self.name, kind=kind)

    def _status_error(self, response: httpx.Response) -> LLMError:
        detail = response.text[:300] if response.content else ""
        return LLMError(
            f"upstream {self.name!r} answered HTTP {response.status_code}: {detail}",
            upstream=self.name,
            kind="status",
            status_code=response.status_code,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
