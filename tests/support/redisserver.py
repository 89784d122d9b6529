"""A private `redis-server` on a free loopback port, for outage tests.

Usage::

    with RedisServer() as server:            # started; answers PING
        client = Redis.from_url(server.url)
        server.stop()                         # connections now fail (refused)
        server.start()                        # back on the same port, empty

The server runs in the foreground as a child process (no persistence), is killed at the end
of the block, and also at interpreter exit should the block never be left.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer"]

START_TIMEOUT = 10.0
"""Seconds to wait for the server to answer PING."""
STOP_TIMEOUT = 5.0
"""Seconds to wait for the server to exit after SIGTERM (then it is killed)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One private redis-server; `start()` and `stop()` may be called any number of times."""

    def __init__(self, executable: str | None = None, host: str = "127.0.0.1") -> None:
        found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(found).exists():
            raise RuntimeError(f"redis-server not found (looked for {found!r})")
        self.executable = found
        self.host = host
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="redisserver-")
        self._log_path = Path(self._workdir.name) / "redis.log"
        atexit.register(self._kill)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.running:
            return
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._workdir.name,
        ]  # fmt: skip
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self.host, self.port):
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(
                    f"redis-server on {self.host}:{self.port} exited while starting:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(
                    f"redis-server on {self.host}:{self.port} did not answer PING within "
                    f"{START_TIMEOUT:g}s:\n" + self._log_tail()
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server and wait until it has exited (its port then refuses connections)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()
        atexit.unregister(self._kill)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
