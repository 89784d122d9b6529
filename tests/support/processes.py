"""Real processes for the tests: free loopback ports, and a server started and waited for."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nobody listens on right now (bound, then released; racy, so prefer
    binding port 0 where the server allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unused_port() -> int:
    """A port where nothing listens (connecting is refused): for connect-error tests."""
    return free_port()


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment for a service of its own: a SQLite file under
    `tmp_path` (in a folder that does not exist yet), quiet logs, no LLM or simulator knobs
    leaking in from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "SIM_"))}
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'var' / 'service.db'}",
        LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def wait_for_health(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    """Poll `url`/health until it answers 200; fail with the server's stderr if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.communicate()[1]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server at {url} did not become healthy in {timeout:g}s")


def start(
    command: list[str], env: Mapping[str, str], *, cwd: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
