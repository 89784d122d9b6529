"""Run the LLM simulator's HTTP app in a real uvicorn server on a loopback socket.

Usage::

    with running_simulator(SimulatorKnobs(error_rate=1.0)) as server:
        client = httpx.AsyncClient(base_url=server.base_url)  # "http://127.0.0.1:PORT/v1"
        ...
        server.simulator.knobs = SimulatorKnobs()  # or server.put_knobs(error_rate=0)
        assert server.simulator.calls == 3

The server runs in a background thread with its own event loop, so it keeps answering even
while the test's event loop is blocked, and tests may use sync or async clients alike. The
socket is bound (port 0) before the thread starts, so there is no race for the port.

Cross-thread access is safe for what tests need: ``Simulator.knobs`` is a frozen dataclass
replaced by a single assignment, and ``Simulator.calls`` is a plain int read.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from app.llm.simulator import Simulator, SimulatorKnobs, create_app

__all__ = ["SimServer", "free_port", "running_simulator", "unused_port"]

START_TIMEOUT = 10.0
"""Seconds to wait for uvicorn to report `started`."""
STOP_TIMEOUT = 5.0
"""Seconds to wait for the server thread after asking it to exit (then it is forced)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy; prefer binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unused_port() -> int:
    """A port where nothing listens (connecting to it is refused): for connect-error tests."""
    return free_port()


@dataclass(slots=True)
class SimServer:
    """A running simulator server: its address, its Simulator, and its uvicorn server."""

    simulator: Simulator
    host: str
    port: int
    server: uvicorn.Server = field(repr=False)

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (for the /sim/* control routes)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what an OpenAI-compatible client is pointed at."""
        return f"{self.root_url}/v1"

    @property
    def calls(self) -> int:
        return self.simulator.calls

    def put_knobs(self, **changes: Any) -> dict[str, Any]:
        """Change knobs over HTTP (``PUT /sim/knobs``); returns the knobs now in force."""
        response = httpx.put(f"{self.root_url}/sim/knobs", json=changes, timeout=5.0)
        response.raise_for_status()
        knobs: dict[str, Any] = response.json()
        return knobs

    def stats(self) -> dict[str, Any]:
        """``GET /sim/stats``: {"calls": n, "knobs": {...}}."""
        response = httpx.get(f"{self.root_url}/sim/stats", timeout=5.0)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> dict[str, Any]:
        """``POST /sim/reset``: the call count (and the error sequence) restart."""
        response = httpx.post(f"{self.root_url}/sim/reset", timeout=5.0)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


@contextlib.contextmanager
def running_simulator(
    knobs: SimulatorKnobs | None = None,
    *,
    simulator: Simulator | None = None,
) -> Iterator[SimServer]:
    """Serve a Simulator (a new one with `knobs`, or the given one) on 127.0.0.1:<free port>
    for the duration of the block; shut the server down cleanly afterwards."""
    if simulator is None:
        simulator = Simulator(knobs)
    elif knobs is not None:
        simulator.knobs = knobs
    host = "127.0.0.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(simulator),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # Hung requests (knob `hang`) would otherwise hold the shutdown forever.
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by the waiting thread
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"simulator-{port}", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not server.started:
                if errors or not thread.is_alive():
                    raise RuntimeError(
                        f"simulator server on {host}:{port} exited before starting: {errors!r}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"simulator server on {host}:{port} did not start within {START_TIMEOUT:g}s"
                    )
                time.sleep(0.005)
            yield SimServer(simulator=simulator, host=host, port=port, server=server)
        finally:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"simulator server on {host}:{port} did not shut down")
    finally:
        sock.close()
