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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from app.llm.simulator import Simulator, SimulatorKnobs, create_app
from tests.support.processes import free_port, unused_port
from tests.support.threaded_server import serve_in_thread

__all__ = ["SimServer", "free_port", "running_simulator", "unused_port"]


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
        """``GET /sim/stats``: {"calls": n, "streams_open": n, "knobs": {...}}."""
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
    with serve_in_thread(lambda _port: create_app(simulator), "simulator") as (server, port):
        yield SimServer(simulator=simulator, host="127.0.0.1", port=port, server=server)
