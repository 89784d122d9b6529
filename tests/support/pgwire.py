"""Postgres on the wire, misbehaving on purpose (tests): a proxy whose connections can be cut
the way a network partition cuts them, and a server that refuses every connection with the
ErrorResponse a real one sends (too many clients, starting up, a wrong password).

Both run on the test's own event loop, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

HOST = "127.0.0.1"
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


@dataclass
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    severed: bool = False


class SeveringProxy:
    """A TCP proxy in front of a Postgres server. `sever()` cuts every connection open through
    it as a partition (or a server host that died) does: the server side is closed, so its
    backends see EOF and exit, while the client side stays open and silent: a client finds
    out only when it next sends something, and then the proxy resets the connection.
    Connections opened afterwards go through as before."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: list[_Link] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def sever(self) -> int:
        """Cut every open connection; how many were cut."""
        cut = 0
        for link in self.links:
            if not link.severed:
                link.severed = True
                link.tasks[1].cancel()  # nothing more reaches the client, not even an EOF
                link.server.close()
                cut += 1
        return cut

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            for task in link.tasks:
                task.cancel()
            link.client.transport.abort()
            link.server.transport.abort()
        await asyncio.gather(
            *(t for link in self.links for t in link.tasks), return_exceptions=True
        )
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        link = _Link(client_w, server_w)

        async def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := await client_r.read(65536):
                    if link.severed:
                        client_w.transport.abort()
                        return
                    server_w.write(data)
                    await server_w.drain()
                server_w.close()

        async def downstream() -> None:
            with contextlib.suppress(OSError):
                while data := await server_r.read(65536):
                    client_w.write(data)
                    await client_w.drain()
                client_w.close()

        link.tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self.links.append(link)


def error_response(sqlstate: str, message: str) -> bytes:
    """A FATAL ErrorResponse ('E') as the server sends it before closing the connection."""
    fields = b"".join(
        code + value.encode() + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


@dataclass
class RefusingServer:
    port: int
    attempts: int = 0
    """Startup messages received: each a client that got as far as asking to connect."""


@contextlib.asynccontextmanager
async def refusing_postgres(
    sqlstate: str, message: str, *, ask_password: bool = False
) -> AsyncIterator[RefusingServer]:
    """A server that answers every startup with a FATAL `sqlstate` ErrorResponse; with
    `ask_password`, only after asking for a cleartext password and reading it (a wrong
    password is refused after the exchange, as Postgres does)."""
    state = RefusingServer(port=0)

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # SSL and GSS encryption requests are declined; then the startup
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if struct.unpack("!i", body[:4])[0] in (SSL_REQUEST, GSSENC_REQUEST):
                    writer.write(b"N")
                    continue
                break
            state.attempts += 1
            if ask_password:
                writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                assert await reader.readexactly(1) == b"p"
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                await reader.readexactly(length - 4)
            writer.write(error_response(sqlstate, message))
            await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(refuse, HOST, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
