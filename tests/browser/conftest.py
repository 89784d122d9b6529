"""Fixtures for the browser tests: the real service, started as users start it, and Debian's
Chromium driven by Playwright.

* `service`: `agentserve serve --port <free port>` in a subprocess, with a SQLite database of
  its own, in a scratch working directory (no developer `.env` is read) and an environment
  cleared of every setting the outer shell may hold.
* `browser`: /usr/bin/chromium (the Debian package, installed with apt-get when missing; the
  tests fail saying what to install when that is impossible, they are never skipped),
  headless, with a fresh profile (Playwright's own temporary user-data dir).
* `docs_browser`: a fresh browser context per test whose every request that is not to
  the service on 127.0.0.1 is aborted and recorded, for the tests to assert none was.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Request,
    Route,
    expect,
    sync_playwright,
)

from app.config import Settings
from tests.support.debian import DebianPackageUnavailableError, ensure_debian_package
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
REPORTS = REPO / "reports"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # An http_proxy in the environment must not stand between the browser and 127.0.0.1.
    "--no-proxy-server",
]
HOST = "127.0.0.1"
TIMEOUT_MS = 30_000
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)

expect.set_options(timeout=TIMEOUT_MS)  # Playwright's assertions wait 5 s by default


def agentserve_command() -> str:
    """The `agentserve` console script of the interpreter running the tests (.venv/bin)."""
    for candidate in (Path(sys.executable).with_name("agentserve"), REPO / ".venv/bin/agentserve"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        "the agentserve command is not installed beside "
        f"{sys.executable}; install the project: uv sync (or pip install -e .)"
    )


def service_env(database: Path) -> dict[str, str]:
    """The outer environment without any agentserve setting (nor LLM_*, SIM_*, OTEL_*), so the
    service runs with its defaults (the built-in simulator, in-process cache and limits),
    plus a SQLite database and a JWT secret of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in SETTING_NAMES
        and not key.upper().startswith(("LLM_", "SIM_", "OTEL_"))
    }
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        LOG_LEVEL="WARNING",
        # `agentserve token` refuses the default development secret; this run's own.
        JWT_SECRET=secrets.token_urlsafe(48),
    )
    return env


@dataclass
class Service:
    """`agentserve serve` on 127.0.0.1:port; its output goes to `log_path`."""

    workdir: Path
    env: dict[str, str]
    port: int = 0
    log_path: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "agentserve.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def start(self, attempts: int = 3) -> None:
        """Start and wait for /health; a port taken between choosing and binding it (another
        process was quicker) means a new port and another attempt."""
        for _ in range(attempts):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [agentserve_command(), "serve", "--host", HOST, "--port", str(self.port)],
                    cwd=self.workdir,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_healthy():
                return
            if "address already in use" not in self.log_tail().lower():
                break
        pytest.fail(f"agentserve did not start on {self.url}; its output:\n{self.log_tail()}")

    def _wait_healthy(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.get("/health").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def token(self, subject: str) -> str:
        """`agentserve token --sub <subject>`, with the service's own settings."""
        result = subprocess.run(
            [agentserve_command(), "token", "--sub", subject],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"agentserve token failed: {result.stderr}"
        token = result.stdout.strip()
        assert token.count(".") == 2, f"not a JWT: {result.stdout!r}"
        return token


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("agentserve-browser")
    running = Service(workdir=workdir, env=service_env(workdir / "a.db"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's Chromium; apt-get installs it when missing, else the tests fail."""
    try:
        return ensure_debian_package(CHROMIUM, "chromium")
    except DebianPackageUnavailableError as exc:
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: {exc}")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright, chromium_executable: str) -> Iterator[Browser]:
    # launch() gives the browser a fresh temporary user-data dir, removed on close.
    browser = playwright.chromium.launch(
        executable_path=chromium_executable,
        headless=True,
        args=CHROMIUM_ARGS,
        timeout=TIMEOUT_MS,
    )
    try:
        yield browser
    finally:
        browser.close()


@dataclass
class DocsBrowser:
    """A page on the service, with what the browser tried and said, for assertions and for
    the failure messages."""

    service: Service
    context: BrowserContext
    page: Page
    blocked: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def route(self, route: Route, request: Request) -> None:
        """Only the service on 127.0.0.1 is reachable: everything else is aborted."""
        # blob:http://127.0.0.1:port/<id> (ReDoc's search worker) is the page's own.
        if urlsplit(request.url.removeprefix("blob:")).hostname == HOST:
            self.requested.append(request.url)
            route.continue_()
        else:
            self.blocked.append(f"{request.method} {request.url}")
            route.abort("blockedbyclient")

    def on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def on_failed(self, request: Request) -> None:
        self.failed.append(f"{request.method} {request.url}: {request.failure}")

    def report(self) -> str:
        """What the page showed and what the browser did, for a failure message."""
        try:
            body = self.page.locator("body").inner_text(timeout=2_000)
        except Exception as exc:  # the page may be gone; say so rather than hide the failure
            body = f"(could not read the page: {exc!r})"
        sections = {
            "page URL": self.page.url,
            "page text (first 4000 characters)": body[:4000],
            "blocked requests": "\n".join(self.blocked) or "none",
            "failed requests": "\n".join(self.failed) or "none",
            "console": "\n".join(self.console[-30:]) or "nothing",
            "service log (tail)": self.service.log_tail(),
        }
        return "\n".join(f"--- {name}:\n{text}" for name, text in sections.items())

    def screenshot(self, name: str) -> Path:
        REPORTS.mkdir(exist_ok=True)
        path = REPORTS / name
        self.page.screenshot(path=path, full_page=True)
        return path

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run one step; when it fails, the error says what the page showed (and a screenshot
        of it is saved in reports/)."""
        try:
            yield
        except Exception as exc:
            slug = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")[:60]
            try:
                shot = str(self.screenshot(f"failure-{slug}.png"))
            except Exception as shot_error:
                shot = f"(no screenshot: {shot_error!r})"
            raise AssertionError(f"{what}: {exc}\n--- screenshot: {shot}\n{self.report()}") from exc


@pytest.fixture
def docs_browser(browser: Browser, service: Service) -> Iterator[DocsBrowser]:
    context = browser.new_context(
        base_url=service.url, viewport={"width": 1400, "height": 1000}, locale="en-US"
    )
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    page = context.new_page()
    docs = DocsBrowser(service=service, context=context, page=page)
    context.route("**/*", docs.route)
    page.on("console", docs.on_console)
    page.on("pageerror", lambda error: docs.console.append(f"pageerror: {error}"))
    page.on("requestfailed", docs.on_failed)
    try:
        yield docs
    finally:
        context.close()
