"""Run an ASGI app under uvicorn in a background thread on a free loopback port (tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
HOST = "127.0.0.1"


@contextlib.contextmanager
def serve_in_thread(
    make_app: Callable[[int], ASGIApp],
    name: str,
    *,
    lifespan: Literal["auto", "on", "off"] = "off",
) -> Iterator[tuple[uvicorn.Server, int]]:
    """`make_app(port)` served on 127.0.0.1:port for the block; the socket is bound before
    the thread starts, so there is no race for the port. Hung requests get 1 s at shutdown.
    `lifespan="on"` runs the app's lifespan in the server's thread (an agentserve app)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            make_app(port),
            host=HOST,
            port=port,
            log_level="warning",
            lifespan=lifespan,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by the waiting thread
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"{name}-{port}", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not server.started:  # after the lifespan's startup
                if errors or not thread.is_alive():
                    raise RuntimeError(f"{name} server exited before starting: {errors!r}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} server did not start within {START_TIMEOUT:g}s")
                time.sleep(0.005)
            yield server, port
        finally:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"{name} server on {HOST}:{port} did not shut down")
    finally:
        sock.close()
