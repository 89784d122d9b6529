"""The compose topology as local processes: nginx with the project's nginx.conf in front of
agentserve replicas on loopback ports.

nginx.conf is used unchanged: it is copied into a private prefix directory, and only the two
files it includes from `agentserve/` beside it are written here: `upstream.conf` (one
`server` line per replica, rendered from deploy/nginx/upstream.conf.template) and
`listen.conf` (a free loopback port). What nginx.conf leaves to the command line (`daemon`,
`pid`) is passed with `-g`, as the nginx image's own command does.

Every process runs in a session of its own and is stopped with SIGTERM, then SIGKILL sent to
that session's process group (nginx's workers included); an `atexit` hook does the same
should a test run end without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.processes import free_port

__all__ = [
    "INSTALL_HINT",
    "NGINX_CONF",
    "Nginx",
    "NginxUnavailableError",
    "Replica",
    "find_nginx",
    "free_port",
    "install_nginx",
    "render_upstream",
    "server_parameters",
    "template_server_parameters",
]

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "nginx.conf"
DEPLOY = REPO / "deploy" / "nginx"
UPSTREAM_TEMPLATE = DEPLOY / "upstream.conf.template"
INCLUDE_DIR = "agentserve"
"""Where nginx.conf includes upstream.conf and listen.conf from (beside nginx.conf)."""

INSTALL_HINT = "install nginx: apt-get install -y nginx"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
STOP_TIMEOUT = 10.0
"""Seconds a process gets to exit after SIGTERM before its process group is killed."""


class NginxUnavailableError(RuntimeError):
    """nginx is not installed and could not be installed."""


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def install_nginx(say: Callable[[str], None] = print) -> str:
    """The nginx executable; installs Debian's `nginx` package with apt-get when missing
    (`apt-get update` first only if the plain install fails). Raises NginxUnavailableError
    saying how to install it by hand when that fails too."""
    found = find_nginx()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise NginxUnavailableError(
            f"nginx is not installed and apt-get is missing; {INSTALL_HINT}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "nginx"]
    failures: list[str] = []
    for commands in ([install], [[apt, "update"], install]):
        for command in commands:
            say(f"nginx not found; running: {' '.join(command)}")
            try:
                result = subprocess.run(
                    command, env=env, stdin=subprocess.DEVNULL, timeout=600, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                failures.append(f"{' '.join(command)}: {exc!r}")
                break
            if result.returncode != 0:
                failures.append(f"{' '.join(command)}: exit status {result.returncode}")
                break
        else:
            found = find_nginx()
            if found:
                say(f"installed {found}")
                return found
            failures.append("the package installed no nginx executable")
    raise NginxUnavailableError(
        "nginx is not installed and installing it failed ("
        + "; ".join(failures)
        + f"); {INSTALL_HINT}"
    )


def _template_body() -> str:
    lines = UPSTREAM_TEMPLATE.read_text(encoding="utf-8").splitlines()
    return "".join(
        f"{line}\n" for line in lines if line.strip() and not line.lstrip().startswith("#")
    )


def render_upstream(addresses: Sequence[str]) -> str:
    """upstream.conf for these `host:port` addresses, from deploy/nginx/upstream.conf.template."""
    if not addresses:
        raise ValueError("an upstream needs at least one server")
    template = string.Template(_template_body())
    header = f"# rendered by {Path(__file__).name} from {UPSTREAM_TEMPLATE.name}\n"
    return header + "".join(template.substitute(address=address) for address in addresses)


def server_parameters(text: str) -> list[list[str]]:
    """The parameters after the address of each `server` line (comments skipped)."""
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [line.rstrip(";").split()[2:] for line in lines if line.startswith("server ")]


def template_server_parameters() -> list[list[str]]:
    """The parameters of the template's server lines (max_fails=..., backup, ...)."""
    return server_parameters(_template_body())


class _Process:
    """A child process in a session of its own, logging to a file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self._kill_group)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(
        self, command: Sequence[str], *, env: Mapping[str, str] | None, cwd: Path, stdout: Path
    ) -> None:
        with stdout.open("ab") as out, self.log_path.open("ab") as err:
            self.process = subprocess.Popen(
                list(command),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if stdout == self.log_path else err,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, then SIGKILL to the whole process group; returns the exit status."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        status = self.wait(timeout)
        if status is None:
            self._kill_group()
            status = self.wait(timeout)
        return status

    def group_alive(self) -> bool:
        """Whether any process of this one's process group (nginx: master and workers) runs."""
        if self.process is None:
            return False
        self.process.poll()
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _kill_group(self) -> None:
        """SIGKILL the process and its process group (it leads a session of its own), while
        it still runs: then the group id is certainly still ours."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        self.stop()
        atexit.unregister(self._kill_group)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _answers(url: str, *, status: int | None = 200) -> bool:
    """Whether GET `url` answers (with `status`, unless None: any answer)."""
    try:
        response = httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return False
    return status is None or response.status_code == status


class Replica(_Process):
    """`python -m app serve` on a loopback port."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path) -> None:
        super().__init__(name, workdir / f"{name}.log")
        self.port = free_port()
        self.env = {**env, "INSTANCE_NAME": name}
        self.workdir = workdir

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self._spawn(command, env=self.env, cwd=self.workdir, stdout=self.log_path)

    def wait_healthy(self, deadline: float) -> None:
        """Until GET /health answers 200; fails with the log's tail if it exits or the
        monotonic `deadline` passes."""
        while not _answers(f"{self.url}/health"):
            if not self.running:
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not answer /health in time:\n{self.log_tail()}"
                )
            time.sleep(0.1)


class Nginx(_Process):
    """nginx with the project's nginx.conf (copied unchanged) in the prefix `prefix`."""

    def __init__(
        self,
        executable: str,
        upstreams: Sequence[str],
        prefix: Path,
        *,
        config: Path = NGINX_CONF,
    ) -> None:
        super().__init__("nginx", prefix / "error.log")
        self.executable = executable
        self.prefix = prefix
        self.port = free_port()
        self.conf = prefix / "nginx.conf"
        self.access_log = prefix / "access.log"
        """nginx's stdout, where nginx.conf sends the access log."""
        self.pid_file = prefix / "nginx.pid"
        prefix.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, self.conf)
        includes = prefix / INCLUDE_DIR
        includes.mkdir(exist_ok=True)
        (includes / "upstream.conf").write_text(render_upstream(upstreams), encoding="utf-8")
        (includes / "listen.conf").write_text(f"listen 127.0.0.1:{self.port};\n", encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        return [
            self.executable,
            "-p", f"{self.prefix}/",
            "-c", str(self.conf),
            "-e", "stderr",
            "-g", f"daemon off; pid {self.pid_file};",
            *extra,
        ]  # fmt: skip

    def check(self) -> None:
        """`nginx -t`: a config error is reported with nginx's own message."""
        result = subprocess.run(
            self.command("-t", "-q"),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"nginx -t failed for {self.conf}:\n{result.stderr}{result.stdout}")

    def start(self, deadline: float) -> None:
        """Start nginx and wait until it answers HTTP (whatever the replicas say)."""
        self.check()
        self._spawn(self.command(), env=None, cwd=self.prefix, stdout=self.access_log)
        while not _answers(f"{self.url}/health", status=None):
            if not self.running:
                raise RuntimeError(f"nginx exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not answer in time:\n{self.log_tail()}")
            time.sleep(0.05)

    def access_entries(self) -> list[dict[str, Any]]:
        """The access log so far, one dict per request (each line must be JSON)."""
        text = self.access_log.read_text(encoding="utf-8")
        complete = text.split("\n")[:-1]  # the part after the last newline may be half written
        return [json.loads(line) for line in complete if line.strip()]

    def access_entry(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The access log line of one request; nginx writes it after the response has gone
        out, so it may come a moment after the caller has the answer."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.access_entries() if e.get("request_id") == request_id]
            if len(found) == 1:
                return found[0]
            if found:
                raise AssertionError(f"{len(found)} access log lines for {request_id}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no access log line for request {request_id}")
            time.sleep(0.02)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
