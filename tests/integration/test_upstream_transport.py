"""The upstream HTTP transport (httpx on aiohttp's connector) against scripted servers.

Every test talks to a real loopback socket: a tiny HTTP/1.1 server in the test's own event
loop (`Upstream`) answers each request with a script, so the failures the transport must
translate happen for real: refused connections, a peer that closes before or in the middle
of an answer, a body or an SSE stream that stops and hangs, 429 with Retry-After. The client
is the one the app builds (`build_http_client`), read through `OpenAICompatibleModel`, whose
LLMError kinds are what the retry policy and the breaker act on.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app.config import Settings, UpstreamConfig
from app.llm.openai_compat import OpenAICompatibleModel, build_http_client
from app.llm.transport import AiohttpTransport, as_httpx_error, client_timeout
from app.llm.types import ChatRequest, Completion, CompletionDelta, LLMError
from tests.conftest import wait_until
from tests.support.simserver import unused_port

# ---------------------------------------------------------------------------------------
# A scripted HTTP/1.1 server


@dataclass(slots=True)
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # 1 for the first connection accepted, 2 for the next...


Script = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one request; returns False to close the connection afterwards."""


@dataclass
class Upstream:
    script: Script
    port: int = 0
    accepted: int = 0
    open: int = 0
    max_open: int = 0
    requests: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        connection = self.accepted
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = request_line.split(" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, target, headers, body, connection)
                self.requests.append(received)
                if not await self.script(received, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> bool:
    fields = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
    writer.write(head(status, fields) + body)
    await writer.drain()
    return True


def completion_body(text: str = "hi") -> bytes:
    return orjson.dumps(
        {
            "model": "scripted",
            "choices": [
                {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )


def chunk(text: str) -> bytes:
    data = orjson.dumps({"model": "scripted", "choices": [{"delta": {"content": text}}]})
    return b"data: " + data + b"\n\n"


async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
    """A completion, or for `"stream": true` an SSE stream of one delta (Content-Length)."""
    text = f"answer to {request.target}"
    if request.body and orjson.loads(request.body).get("stream"):
        events = chunk(text) + b"data: [DONE]\n\n"
        return await send(writer, 200, events, content_type="text/event-stream")
    return await send(writer, 200, completion_body(text))


def ask(text: str = "hello") -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], model="gpt-x")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[Upstream]]]:
    servers: list[Upstream] = []

    async def start(script: Script) -> Upstream:
        server = await Upstream(script).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


MakeModel = Callable[..., OpenAICompatibleModel]


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    clients: list[httpx.AsyncClient] = []

    def make(base_url: str, **settings: Any) -> OpenAICompatibleModel:
        settings.setdefault("llm_timeout", 2.0)
        settings.setdefault("llm_connect_timeout", 1.0)
        client = build_http_client(
            Settings(**settings), UpstreamConfig(name="scripted", base_url=base_url)
        )
        clients.append(client)
        return OpenAICompatibleModel("scripted", client)

    yield make
    for client in clients:
        await client.aclose()


async def collect(model: OpenAICompatibleModel) -> list[CompletionDelta | Completion]:
    return [item async for item in model.stream(ask())]


async def drain(
    stream: AsyncIterator[CompletionDelta | Completion], into: list[CompletionDelta | Completion]
) -> None:
    """Like `collect`, but what arrived before an exception stays in `into`."""
    async for item in stream:
        into.append(item)


# ---------------------------------------------------------------------------------------
# What the client is made of


def test_the_client_has_the_settings_timeouts() -> None:
    client = build_http_client(
        Settings(llm_max_connections=7, llm_max_keepalive=3, llm_timeout=30, llm_connect_timeout=4),
        UpstreamConfig(name="u", base_url="http://127.0.0.1:1/v1"),
    )
    assert client.timeout == httpx.Timeout(30, connect=4)


def test_httpx_timeouts_map_to_aiohttp_timeouts() -> None:
    timeout = client_timeout(httpx.Timeout(60, connect=5).as_dict())
    assert timeout == aiohttp.ClientTimeout(total=None, connect=65, sock_connect=5, sock_read=60)
    unlimited = client_timeout(httpx.Timeout(None).as_dict())
    assert unlimited == aiohttp.ClientTimeout()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (aiohttp.ServerTimeoutError("read"), httpx.ReadTimeout),
        (TimeoutError(), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("short body"), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.ClientConnectionError("other"), httpx.NetworkError),
        (ConnectionResetError(104, "reset"), httpx.NetworkError),
    ],
)
def test_aiohttp_errors_become_httpx_errors(error: Exception, expected: type[Exception]) -> None:
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")
    mapped = as_httpx_error(error, request)
    assert type(mapped) is expected
    assert isinstance(mapped, httpx.TransportError)
    assert mapped.request is request
    assert str(mapped)


def test_other_exceptions_are_left_alone() -> None:
    error = ValueError("a bug, not the network")
    assert as_httpx_error(error, httpx.Request("GET", "http://upstream/")) is error


# ---------------------------------------------------------------------------------------
# Answers


async def test_completion_and_request_on_the_wire(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    server = await serve(answer)
    model = make_model(server.base_url)

    completion = await model.complete(ask("over aiohttp"))

    assert completion.content == "answer to /v1/chat/completions"
    assert completion.usage.prompt_tokens == 3
    [request] = server.requests
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert "transfer-encoding" not in request.headers
    assert orjson.loads(request.body)["messages"] == [{"role": "user", "content": "over aiohttp"}]
    assert int(request.headers["content-length"]) == len(request.body)


async def test_api_key_and_upstream_headers_are_sent(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    server = await serve(answer)
    config = UpstreamConfig(
        name="u", base_url=server.base_url, api_key="sk-test", headers={"X-Org": "acme"}
    )
    async with build_http_client(Settings(), config) as client:
        await OpenAICompatibleModel("u", client).complete(ask())
    [request] = server.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["x-org"] == "acme"


async def test_cookies_the_upstream_sets_are_not_sent_back(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    async def with_cookie(request: Received, writer: asyncio.StreamWriter) -> bool:
        return await send(writer, 200, completion_body(), {"Set-Cookie": "session=abc; Path=/"})

    server = await serve(with_cookie)
    config = UpstreamConfig(name="u", base_url=server.base_url)
    async with (
        build_http_client(Settings(), config) as one,
        build_http_client(Settings(), config) as two,
    ):
        one.cookies.set("set_by_hand", "1")  # dropped too: nothing reaches another client
        for client in (one, two, one):
            await OpenAICompatibleModel("u", client).complete(ask())
    assert [request.target for request in server.requests] == ["/v1/chat/completions"] * 3
    assert all("cookie" not in request.headers for request in server.requests)


async def test_http_proxy_from_the_environment_is_used(
    serve: Callable[[Script], Awaitable[Upstream]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured as httpx honours it with its own transport (egress proxies)."""
    proxy = await serve(answer)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    config = UpstreamConfig(name="u", base_url="http://llm.upstream.test/v1")
    async with build_http_client(Settings(), config) as client:
        completion = await OpenAICompatibleModel("u", client).complete(ask())
    assert completion.content == "answer to http://llm.upstream.test/v1/chat/completions"
    [request] = proxy.requests
    assert request.target == "http://llm.upstream.test/v1/chat/completions"  # proxy form


async def test_response_headers_status_and_version_reach_httpx(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    async def script(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 201 Made\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok")
        await writer.drain()
        return True

    server = await serve(script)
    async with build_http_client(
        Settings(), UpstreamConfig(name="u", base_url=server.base_url)
    ) as client:
        response = await client.get("/anything?q=a%20b")
    assert response.status_code == 201
    assert response.reason_phrase == "Made"
    assert response.http_version == "HTTP/1.1"
    assert response.headers.get_list("x-a") == ["1", "2"]
    assert response.content == b"ok"
    assert server.requests[0].target == "/v1/anything?q=a%20b"


async def test_sse_stream_split_across_writes_ends_at_done(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def script(request: Received, writer: asyncio.StreamWriter) -> bool:
        assert orjson.loads(request.body)["stream"] is True
        writer.write(
            head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
        )
        events = chunk("Hel") + chunk("lo") + b'data: {"usage": {"completion_tokens": 2}}\n\n'
        events += b"data: [DONE]\n\n" + chunk("after [DONE]: never read")
        for piece in (events[:7], events[7:40], events[40:]):  # events cut mid-line
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    server = await serve(script)
    model = make_model(server.base_url)

    *deltas, final = await collect(model)

    assert deltas == [CompletionDelta("Hel"), CompletionDelta("lo")]
    assert isinstance(final, Completion)
    assert final.content == "Hello"
    assert final.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------
# Failures and their kinds


async def test_connection_refused_is_a_connect_error(make_model: MakeModel) -> None:
    model = make_model(f"http://127.0.0.1:{unused_port()}/v1")
    with pytest.raises(LLMError) as caught:
        await model.complete(ask())
    assert caught.value.kind == "connect"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    with pytest.raises(LLMError) as streamed:
        await collect(model)
    assert streamed.value.kind == "connect"


@pytest.mark.parametrize("stream", [False, True])
async def test_peer_closing_before_answering_is_a_connect_error(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel, stream: bool
) -> None:
    async def close(request: Received, writer: asyncio.StreamWriter) -> bool:
        return False

    server = await serve(close)
    model = make_model(server.base_url)
    with pytest.raises(LLMError) as caught:
        await (collect(model) if stream else model.complete(ask()))
    assert caught.value.kind == "connect"
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


async def test_peer_closing_mid_body_is_a_connect_error(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def short(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(head(200, {"Content-Length": "500"}) + b'{"choices": [')
        await writer.drain()
        return False

    server = await serve(short)
    with pytest.raises(LLMError) as caught:
        await make_model(server.base_url).complete(ask())
    assert caught.value.kind == "connect"
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


async def test_peer_closing_mid_stream_is_a_connect_error(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def cut(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
        )
        first = chunk("partial")
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        return False

    server = await serve(cut)
    items: list[CompletionDelta | Completion] = []
    with pytest.raises(LLMError) as caught:
        await drain(make_model(server.base_url).stream(ask()), items)
    assert items == [CompletionDelta("partial")]
    assert caught.value.kind == "connect"


async def test_read_timeout_mid_body_is_a_timeout(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def stall(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(head(200, {"Content-Length": "500"}) + b'{"choices": [')
        await writer.drain()
        await asyncio.sleep(10)
        return False

    server = await serve(stall)
    model = make_model(server.base_url, llm_timeout=0.2)
    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await model.complete(ask())
    assert caught.value.kind == "timeout"
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert 0.2 <= time.perf_counter() - started < 1.5


async def test_read_timeout_mid_stream_is_a_timeout(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def stall(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
        )
        first = chunk("slow")
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await asyncio.sleep(10)
        return False

    server = await serve(stall)
    items: list[CompletionDelta | Completion] = []
    with pytest.raises(LLMError) as caught:
        await drain(make_model(server.base_url, llm_timeout=0.2).stream(ask()), items)
    assert items == [CompletionDelta("slow")]
    assert caught.value.kind == "timeout"


async def test_read_timeout_is_between_reads_not_for_the_whole_body(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def trickle(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
        )
        for text in ("a", "b", "c", "d", "e"):
            event = chunk(text)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.1)  # 0.5 s in all, each gap under the 0.3 s read timeout
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        return True

    server = await serve(trickle)
    *_, final = await collect(make_model(server.base_url, llm_timeout=0.3))
    assert isinstance(final, Completion)
    assert final.content == "abcde"


async def test_waiting_for_a_pool_slot_times_out_as_a_timeout(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    async def slow(request: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1.0)
        return await answer(request, writer)

    server = await serve(slow)
    client = httpx.AsyncClient(
        base_url=server.base_url,
        timeout=httpx.Timeout(5.0, connect=0.1, pool=0.1),
        transport=AiohttpTransport(limits=httpx.Limits(max_connections=1)),
    )
    async with client:
        model = OpenAICompatibleModel("u", client)
        first = asyncio.create_task(model.complete(ask()))
        await wait_until(lambda: len(server.requests) == 1)
        with pytest.raises(LLMError) as caught:
            await model.complete(ask())  # the only connection is busy
        assert caught.value.kind == "timeout"
        assert isinstance(caught.value.__cause__, httpx.ConnectTimeout)
        assert (await first).content
    assert server.accepted == 1


async def test_429_retry_after_seconds_and_date(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    retry_afters = ["7", format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)]

    async def limited(request: Received, writer: asyncio.StreamWriter) -> bool:
        body = b'{"error": {"message": "slow down"}}'
        return await send(
            writer, 429, body, {"Retry-After": retry_afters[len(server.requests) - 1]}
        )

    server = await serve(limited)
    model = make_model(server.base_url)

    with pytest.raises(LLMError) as seconds:
        await model.complete(ask())
    assert seconds.value.kind == "status"
    assert seconds.value.status_code == 429
    assert seconds.value.retry_after == 7.0
    assert "slow down" in str(seconds.value)

    with pytest.raises(LLMError) as date:
        await collect(model)
    assert date.value.kind == "status"
    assert date.value.status_code == 429
    assert date.value.retry_after is not None
    assert 25 < date.value.retry_after <= 30
    assert server.accepted == 1  # error answers with a body keep the connection


async def test_non_json_body_is_a_protocol_error(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def html(request: Received, writer: asyncio.StreamWriter) -> bool:
        if orjson.loads(request.body).get("stream"):
            return await send(writer, 200, b"data: <html>\n\n", content_type="text/event-stream")
        return await send(writer, 200, b"<html>bad gateway</html>", content_type="text/html")

    server = await serve(html)
    model = make_model(server.base_url)
    with pytest.raises(LLMError) as whole:
        await model.complete(ask())
    assert whole.value.kind == "protocol"
    with pytest.raises(LLMError) as streamed:
        await collect(model)
    assert streamed.value.kind == "protocol"


# ---------------------------------------------------------------------------------------
# Connections: reuse, limits, keep-alive off, close


async def test_sequential_calls_reuse_one_connection(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    server = await serve(answer)
    model = make_model(server.base_url)
    for _ in range(5):
        await model.complete(ask())
    *_, streamed = await collect(model)
    assert isinstance(streamed, Completion)
    assert streamed.content == "answer to /v1/chat/completions"
    assert (await model.complete(ask())).content
    assert len(server.requests) == 7
    assert {request.connection for request in server.requests} == {1}
    assert server.accepted == 1


async def test_concurrent_calls_open_connections_up_to_the_limit_then_reuse_them(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def slow(request: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await answer(request, writer)

    server = await serve(slow)
    model = make_model(server.base_url, llm_max_connections=3)
    await asyncio.gather(*(model.complete(ask()) for _ in range(9)))
    assert server.max_open == 3
    assert server.accepted == 3
    await asyncio.gather(*(model.complete(ask()) for _ in range(3)))
    assert server.accepted == 3  # kept alive and reused


async def test_keepalive_zero_opens_a_connection_per_call(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    server = await serve(answer)
    model = make_model(server.base_url, llm_max_keepalive=0)
    for _ in range(3):
        await model.complete(ask())
    assert server.accepted == 3


async def test_a_connection_the_peer_closed_while_idle_is_not_reused(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def once(request: Received, writer: asyncio.StreamWriter) -> bool:
        await answer(request, writer)
        return False  # closes without saying Connection: close (an idle timeout)

    server = await serve(once)
    model = make_model(server.base_url)
    await model.complete(ask())
    await wait_until(lambda: server.open == 0)
    await asyncio.sleep(0.01)
    assert (await model.complete(ask())).content
    assert server.accepted == 2


async def test_connection_close_header_is_honoured(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    async def closing(request: Received, writer: asyncio.StreamWriter) -> bool:
        await send(writer, 200, completion_body(), {"Connection": "close"})
        return False

    server = await serve(closing)
    model = make_model(server.base_url)
    for _ in range(3):
        await model.complete(ask())  # never sent on the connection the server is closing
    assert server.accepted == 3


@contextmanager
def reports() -> Iterator[list[str]]:
    """ResourceWarnings and event-loop error reports ("Unclosed client session") in the block,
    after a garbage collection at its end."""
    messages: list[str] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: messages.append(str(context.get("message"))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # only the text: a recorded warning would keep its source (the session) alive
            warnings.showwarning = lambda message, *_, **__: messages.append(str(message))
            try:
                yield messages
            finally:
                gc.collect()
    finally:
        loop.set_exception_handler(handler)


async def test_closing_the_client_closes_its_connections_cleanly(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    async def slow(request: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        return await answer(request, writer)

    server = await serve(slow)
    settings = Settings(llm_timeout=2.0)
    with reports() as reported:
        client = build_http_client(settings, UpstreamConfig(name="u", base_url=server.base_url))
        model = OpenAICompatibleModel("u", client)
        await asyncio.gather(*(model.complete(ask()) for _ in range(4)))
        items = [item async for item in model.stream(ask())]
        assert items
        assert server.open == 4
        await client.aclose()
        await wait_until(lambda: server.open == 0, timeout=2.0)
        assert client.is_closed
        del client, model
    assert reported == []

    # A client that never sent anything has no session to close.
    with reports() as reported:
        idle = build_http_client(settings, UpstreamConfig(name="u", base_url=server.base_url))
        await idle.aclose()
        del idle
    assert reported == []


async def test_an_unclosed_client_is_reported(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    """The check above can see a leak: dropping a used client without aclose is reported."""
    server = await serve(answer)
    with reports() as reported:
        client = build_http_client(Settings(), UpstreamConfig(name="u", base_url=server.base_url))
        await OpenAICompatibleModel("u", client).complete(ask())
        del client
        gc.collect()  # the session warns, its connector warns and closes the connection
        await wait_until(lambda: server.open == 0)
    assert "Unclosed client session" in reported, reported
    assert "Unclosed connector" in reported, reported


async def test_closed_client_refuses_to_send(
    serve: Callable[[Script], Awaitable[Upstream]],
) -> None:
    server = await serve(answer)
    client = build_http_client(Settings(), UpstreamConfig(name="u", base_url=server.base_url))
    await OpenAICompatibleModel("u", client).complete(ask())
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.post("/chat/completions", content=b"{}")
    transport = AiohttpTransport(limits=httpx.Limits())
    await transport.aclose()
    with pytest.raises(httpx.ConnectError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", server.base_url))


# ---------------------------------------------------------------------------------------
# Tracing: OpenTelemetry's httpx instrumentation sees the requests


async def test_httpx_client_instrumentation_traces_and_propagates_through_the_transport(
    serve: Callable[[Script], Awaitable[Upstream]], make_model: MakeModel
) -> None:
    server = await serve(answer)
    model = make_model(server.base_url)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    HTTPXClientInstrumentor.instrument_client(model.client, tracer_provider=provider)
    try:
        with provider.get_tracer("test").start_as_current_span("parent") as parent:
            await model.complete(ask())
            await collect(model)
    finally:
        HTTPXClientInstrumentor.uninstrument_client(model.client)

    spans = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert [span.name for span in spans] == ["POST", "POST"]
    for span, request in zip(spans, server.requests, strict=True):
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        assert dict(span.attributes or {})["http.status_code"] == 200
        assert span.context is not None
        assert request.headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
