"""What bench/run.py and bench/soak.py share: wrk, a private Postgres database and Redis
key prefix, the apps as uvicorn processes, and wrk runs.

Everything a run creates is its own and is removed at the end, also after a crash or
Ctrl-C: the database ``agentserve_bench_<pid>_<hex>``, the Redis keys under
``agentserve-bench:<pid>-<hex>:``, the child processes, the temporary directory. The next
run removes what a run killed with SIGKILL left behind (the owner pid is in the names).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
WRK_DIR = BENCH_DIR / "wrk"
APPS_DIR = BENCH_DIR / "apps"
PYTHON = sys.executable

POOL_SIZE = 2000
"""Agents per pool (and LLM connections) the service gets: no request waits for an agent."""
DB_POOL_SIZE = 30
DB_MAX_OVERFLOW = 0
"""No overflow, so the floor and the service hold the same connections open: SQLAlchemy's
QueuePool closes overflow connections at checkin and reopens them under load (TLS attempt,
auth, statements prepared again), while asyncpg's pool keeps every connection it opened."""

POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

DB_PREFIX = "agentserve_bench_"
REDIS_PREFIX = "agentserve-bench:"

UVICORN_FLAGS = (
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
    # as `agentserve serve` runs it: the app applies X-Forwarded-* itself, no Server header
    "--no-proxy-headers",
    "--no-server-header",
    "--timeout-graceful-shutdown",
    "5",
)


class BenchError(RuntimeError):
    """The harness could not do its job (not a missed target)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


def raise_nofile(wanted: int = 65535) -> int:
    """Raise RLIMIT_NOFILE for this process and the children it starts (wrk -c1000, the
    service's 1,000 client sockets plus as many upstream sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else max(soft, min(wanted, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ensure_wrk() -> str:
    """wrk from Debian's packages (apt-get install -y wrk), installed when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is not installed and apt-get is not available: install wrk")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log("wrk is missing: apt-get install -y wrk")
    install = [*prefix, apt, "install", "-y", "-q", "wrk"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        log("apt-get install failed; apt-get update first")
        subprocess.run([*prefix, apt, "update", "-q"], env=env, capture_output=True, check=False)  # noqa: S603
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    found = shutil.which("wrk")
    if done.returncode != 0 or not found:
        raise BenchError(f"could not install wrk:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return found


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    return (
        (done.stdout or done.stderr).splitlines()[0].strip()
        if (done.stdout or done.stderr)
        else "?"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench process dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG), so that no server outlives a killed run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------
# HTTP helpers (stdlib only: these are a handful of calls, not load)


def http(
    method: str, url: str, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# ---------------------------------------------------------------------------------------
# Processes


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def summarise_problems(lines: list[str], limit: int = 3) -> str:
    """'N lines >= WARNING: message xK, ...' with JSON log lines reduced to their message."""
    counts: dict[str, int] = {}
    for line in lines:
        text = line
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            text = str(json.loads(line)["message"]).splitlines()[0]
        counts[text[:120]] = counts.get(text[:120], 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    more = "" if len(counts) <= limit else f", {len(counts) - limit} more kinds"
    return (
        f"server log: {len(lines)} lines >= WARNING ("
        + ", ".join(f"{text!r} x{n}" for text, n in top)
        + more
        + ")"
    )


@dataclass(eq=False)
class Server:
    """One uvicorn (or simulator) process; its stdout/stderr go to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    cwd: Path
    log_path: Path
    health_path: str = "/health"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> Server:
        log(f"starting {self.name} on port {self.port}")
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # no other thread runs while servers start
            )
        _CHILDREN.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode} on start:\n{self.tail()}"
                )
            try:
                status, _, _ = http("GET", self.url + self.health_path, timeout=2.0)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not become ready in {timeout:g}s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mib(self) -> float:
        """VmRSS of the server process, from /proc/<pid>/status."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        # after "pid (comm)": state is fields[0], utime fields[11], stime fields[12]
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def settle(self, quiet_s: float = 0.2, timeout_s: float = 5.0) -> bool:
        """Wait until the server has spent no CPU for `quiet_s` (at most `timeout_s`; False
        if it never did). wrk drops its in-flight requests when its time is up and the
        server still answers them: measuring at once would count their CPU, and a
        continuation could hit a session one of them is still answering (409). CPU time is
        read in clock ticks, so a server's idle timers may leave it "busy"."""
        deadline = time.monotonic() + timeout_s
        last = self.cpu_seconds()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.cpu_seconds()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return True
        log(f"{self.name} was still busy {timeout_s:g}s after the warm-up; measuring anyway")
        return False

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_lines_since(self, offset: int) -> list[str]:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def problems_since(self, offset: int) -> list[str]:
        """Log lines at WARNING or above written since `offset` (JSON or plain logs)."""
        pattern = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")
        return [line for line in self.log_lines_since(offset) if pattern.search(line)]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines_since(0)[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            _CHILDREN.discard(self)
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
        _CHILDREN.discard(self)


_CHILDREN: set[Server] = set()


def stop_all_children() -> None:
    for server in list(_CHILDREN):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


class RSSSampler:
    """Samples a server's VmRSS every `interval` seconds in a background thread."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - started, self.server.rss_mib()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, self.server.rss_mib()))

    @property
    def peak(self) -> float:
        return max((rss for _, rss in self.samples), default=float("nan"))

    @property
    def last(self) -> float:
        return self.samples[-1][1] if self.samples else float("nan")


# ---------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    label: str
    connections: int
    duration_s: float
    data: dict[str, Any]
    command: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return int(self.data["requests"])

    @property
    def rps(self) -> float:
        return float(self.requests / (self.data["duration_us"] / 1e6))

    def latency_ms(self, key: str) -> float:
        return float(self.data["latency_us"][key]) / 1000

    @property
    def p50_ms(self) -> float:
        return self.latency_ms("p50")

    @property
    def p99_ms(self) -> float:
        return self.latency_ms("p99")

    @property
    def statuses(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.data.get("statuses", {}).items())}

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not code.startswith("2"))

    @property
    def socket_errors(self) -> dict[str, int]:
        errors = self.data["errors"]
        return {k: int(errors[k]) for k in ("connect", "read", "write", "timeout") if errors[k]}

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def error_detail(self) -> str:
        bodies = self.data.get("error_bodies", {})
        parts = [
            f"HTTP {code}: {n}" + (f" {bodies[code][:160]!r}" if code in bodies else "")
            for code, n in self.statuses.items()
            if not code.startswith("2")
        ]
        parts += [f"{kind}: {n}" for kind, n in self.socket_errors.items()]
        return ", ".join(parts)

    @property
    def x_cache(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.data.get("x_cache", {}).items()}

    def steady_rps(self, skip_s: float) -> float:
        """Completions per second over the whole seconds after `skip_s` and before the end
        (wrk's own figure also counts the ramp-up, when nothing can complete yet)."""
        buckets = {int(k): int(v) for k, v in self.data.get("buckets", {}).items()}
        started = self.data.get("started")
        if not buckets or started is None:
            return self.rps
        end = started + self.data["duration_us"] / 1e6
        first = int(started + skip_s) + 1
        last = int(end) - 1  # the last whole second inside the run
        if last < first:
            return self.rps
        total = sum(buckets.get(second, 0) for second in range(first, last + 1))
        return total / (last - first + 1)


class Wrk:
    def __init__(self, binary: str, threads: int = 2) -> None:
        self.binary = binary
        self.threads = threads

    def run(
        self,
        label: str,
        url: str,
        script: str,
        *,
        connections: int,
        duration: int,
        timeout_s: int = 10,
        env: dict[str, str] | None = None,
    ) -> WrkResult:
        threads = min(self.threads, connections)
        command = [
            self.binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            f"--timeout={timeout_s}s",
            "--latency",
            "-s",
            str(WRK_DIR / f"{script}.lua"),
            url,
        ]
        run_env = {
            **os.environ,
            "BENCH_WRK_DIR": str(WRK_DIR),
            "BENCH_TAG": secrets.token_hex(4),
            "BENCH_CONNECTIONS": str(connections),
            "BENCH_THREADS": str(threads),
            **(env or {}),
        }
        done = subprocess.run(  # noqa: S603
            command,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=duration + timeout_s + 60,
            check=False,
        )
        for line in done.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                data = json.loads(line.removeprefix("BENCH_JSON "))
                return WrkResult(label, connections, float(duration), data, command)
        raise BenchError(
            f"wrk ({label}) printed no summary (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


# ---------------------------------------------------------------------------------------
# Postgres and Redis of the run


def asyncpg_dsn(database: str) -> str:
    base = POSTGRES_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


def sqlalchemy_url(database: str) -> str:
    return "postgresql+asyncpg://" + asyncpg_dsn(database).split("://", 1)[1]


async def _admin(statements: Sequence[str]) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        results = []
        for statement in statements:
            results.append(await conn.fetch(statement))
        return results
    finally:
        await conn.close()


def _stale_owner(name: str, prefix: str) -> int | None:
    match = re.match(re.escape(prefix) + r"(\d+)[_-]", name)
    if match is None:
        return None
    pid = int(match.group(1))
    return None if _pid_alive(pid) else pid


def drop_stale_databases() -> list[str]:
    rows = asyncio.run(
        _admin([f"SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"])  # noqa: S608
    )[0]
    stale = [r["datname"] for r in rows if _stale_owner(r["datname"], DB_PREFIX) is not None]
    if stale:
        asyncio.run(_admin([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in stale]))
    return stale


def delete_redis_keys(pattern: str, *, only_stale: bool = False) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            if only_stale and _stale_owner(key.decode(errors="replace"), REDIS_PREFIX) is None:
                continue
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


class RunResources:
    """The run's database (migrated to head), Redis prefix and temporary directory."""

    def __init__(self, keep_logs: Path | None = None) -> None:
        self.keep_logs = keep_logs
        token = secrets.token_hex(4)
        self.database = f"{DB_PREFIX}{os.getpid()}_{token}"
        self.redis_prefix = f"{REDIS_PREFIX}{os.getpid()}-{token}:"
        self.tmp = Path(tempfile.mkdtemp(prefix="agentserve-bench-"))
        self._created = False

    @property
    def dsn(self) -> str:
        return asyncpg_dsn(self.database)

    @property
    def database_url(self) -> str:
        return sqlalchemy_url(self.database)

    def __enter__(self) -> RunResources:
        stale = drop_stale_databases()
        if stale:
            log(f"dropped databases of dead bench runs: {', '.join(stale)}")
        with contextlib.suppress(Exception):
            n = delete_redis_keys(REDIS_PREFIX + "*", only_stale=True)
            if n:
                log(f"deleted {n} Redis keys of dead bench runs")
        asyncio.run(_admin([f'CREATE DATABASE "{self.database}"']))
        self._created = True
        log(f"database {self.database}: migrating to head")
        try:
            from app.storage.db import upgrade_to_head

            upgrade_to_head(self.database_url)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        stop_all_children()
        try:
            n = delete_redis_keys(self.redis_prefix + "*")
            log(f"deleted {n} Redis keys under {self.redis_prefix}")
        except Exception as exc:
            log(f"could not delete the Redis keys under {self.redis_prefix}: {exc!r}")
        if self._created:
            try:
                asyncio.run(_admin([f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)']))
                log(f"dropped database {self.database}")
            except Exception as exc:
                log(f"could not drop database {self.database}: {exc!r}")
        if self.keep_logs is not None:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in self.tmp.glob("*.log"):
                shutil.copy2(path, self.keep_logs / path.name)
            log(f"server logs copied to {self.keep_logs}")
        shutil.rmtree(self.tmp, ignore_errors=True)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so that every `finally` cleans up."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


@contextlib.contextmanager
def exit_codes(what: str = "bench") -> Iterator[None]:
    """End a run that failed with the exit codes every bench script documents.

    Ctrl-C (and SIGTERM/SIGHUP, see `install_signal_handlers`) exits 130; a BenchError or an
    unexpected error exits 2. The `with` blocks inside have cleaned up by then.
    """
    try:
        yield
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        raise SystemExit(130) from None
    except BenchError as exc:
        log(f"{what} failed: {exc}")
        raise SystemExit(2) from None
    except Exception:
        traceback.print_exc()
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------
# The apps


def baseline_server(res: RunResources) -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "baseline:app", "--app-dir", str(APPS_DIR)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_FLAGS]
    return Server("baseline", argv, dict(os.environ), port, res.tmp, res.tmp / "baseline.log")


def floor_server(
    res: RunResources,
    *,
    db_pool_size: int,
    db_max_overflow: int,
    upstream_url: str | None = None,
) -> Server:
    """The floor app; with `upstream_url` (.../v1) a miss also asks that upstream."""
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "floor:app", "--app-dir", str(APPS_DIR)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_FLAGS]
    env = {
        **os.environ,
        "FLOOR_DATABASE_URL": res.dsn,
        "FLOOR_REDIS_URL": REDIS_URL,
        "FLOOR_KEY_PREFIX": res.redis_prefix,
        "FLOOR_DB_POOL_MIN": str(db_pool_size),
        "FLOOR_DB_POOL_MAX": str(db_pool_size + db_max_overflow),
    }
    name = "floor"
    if upstream_url is not None:
        env["FLOOR_UPSTREAM_URL"] = upstream_url
        name = "floor-upstream"
    return Server(name, argv, env, port, res.tmp, res.tmp / f"{name}.log")


def write_agents_file(res: RunResources, pool_size: int) -> Path:
    """app/agents.yaml with every pool_size raised to `pool_size` (the bench's concurrency)."""
    import yaml

    from app.config import PACKAGED_AGENTS_FILE

    data = yaml.safe_load(PACKAGED_AGENTS_FILE.read_text(encoding="utf-8"))
    for agent in data["agents"]:
        agent["pool_size"] = pool_size
    path = res.tmp / "agents.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def service_settings(
    res: RunResources,
    *,
    pool_size: int,
    db_pool_size: int = DB_POOL_SIZE,
    db_max_overflow: int = DB_MAX_OVERFLOW,
    llm_base_url: str | None = None,
    llm_max_connections: int | None = None,
) -> dict[str, str]:
    """The service's environment: every setting the bench changes from its default."""
    settings = {
        "DATABASE_URL": res.database_url,
        "DB_AUTO_MIGRATE": "false",
        "DB_POOL_SIZE": str(db_pool_size),
        "DB_MAX_OVERFLOW": str(db_max_overflow),
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": res.redis_prefix,
        "LOG_LEVEL": "WARNING",
        "ACCESS_LOG": "false",
        "RATE_LIMIT_QUERY": "100000000/minute",
        "CONCURRENCY_LIMIT_QUERY": "100000",
        "AGENTS_FILE": str(write_agents_file(res, pool_size)),
        "POOL_MAX_WAITING": "100000",
    }
    if llm_base_url is not None:
        settings["LLM_BASE_URL"] = llm_base_url
        if llm_max_connections is not None:
            settings["LLM_MAX_CONNECTIONS"] = str(llm_max_connections)
            settings["LLM_MAX_KEEPALIVE"] = str(llm_max_connections)
    return settings


def clean_env() -> dict[str, str]:
    """The environment minus any setting of the service (a developer's shell may export
    some); the service runs in the run's temporary directory, so no .env is read either."""
    from app.config import Settings

    names = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def service_server(res: RunResources, settings: dict[str, str], name: str = "service") -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_FLAGS]
    env = {**clean_env(), **settings}
    return Server(name, argv, env, port, res.tmp, res.tmp / f"{name}.log")


def simulator_server(res: RunResources, latency_ms: float, name: str = "simulator") -> Server:
    port = free_port()
    agentserve = str(Path(PYTHON).with_name("agentserve"))
    argv = [agentserve, "simulate", "--port", str(port), "--latency-ms", f"{latency_ms:g}"]
    if not Path(agentserve).exists():
        argv = [PYTHON, "-m", "app", *argv[1:]]
    return Server(
        name,
        argv,
        clean_env(),
        port,
        res.tmp,
        res.tmp / f"{name}.log",
        health_path="/v1/models",
    )


def set_simulator_latency(sim: Server, latency_ms: float) -> None:
    status, _, body = http("PUT", sim.url + "/sim/knobs", {"latency_ms": latency_ms})
    if status != 200:
        raise BenchError(f"simulator refused latency_ms={latency_ms}: {status} {body[:200]!r}")


# ---------------------------------------------------------------------------------------
# Sessions for the continuation scenarios


def _chained_digests(
    session_index: int, turns: int
) -> Iterator[tuple[int, dict[str, str], dict[str, str], str]]:
    from app.storage.turns import next_history_digest

    digest = ""
    for turn in range(turns):
        user = {"role": "user", "content": f"prepared session {session_index} turn {turn}: go on"}
        answer = {
            "role": "assistant",
            "content": f'[simulator] You said: "{user["content"]}". This is a simulated '
            "answer, not a real model.",
        }
        digest = next_history_digest(digest, [user, answer])
        yield turn, user, answer, digest


async def _insert_sessions(dsn: str, ids: list[uuid.UUID], messages: int, first_index: int) -> None:
    """COPY sessions and their messages, with message_count and the chained history_digest
    exactly as the service's `save_turn` leaves them (one user + one assistant message per
    turn)."""
    import asyncpg

    turns = messages // 2
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        chunk = max(1, 50_000 // max(messages, 1))
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            session_rows = []
            message_rows = []
            for offset, session_id in enumerate(part):
                digest = ""
                for turn, user, answer, turn_digest in _chained_digests(
                    first_index + start + offset, turns
                ):
                    digest = turn_digest
                    seq = 2 * turn + 1
                    message_rows.append(
                        (session_id, seq, "user", user["content"], 0, 0, "bench-prepare", now)
                    )
                    message_rows.append(
                        (
                            session_id,
                            seq + 1,
                            "assistant",
                            answer["content"],
                            40,
                            24,
                            "bench-prepare",
                            now,
                        )
                    )
                session_rows.append(
                    (session_id, None, "assistant", 2 * turns, digest, "{}", now, now)
                )
            async with conn.transaction():
                # our own throw-away database: skip the per-row foreign-key triggers
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.copy_records_to_table(
                    "sessions",
                    records=session_rows,
                    columns=[
                        "id",
                        "owner",
                        "agent",
                        "message_count",
                        "history_digest",
                        "metadata",
                        "created_at",
                        "updated_at",
                    ],
                )
                await conn.copy_records_to_table(
                    "messages",
                    records=message_rows,
                    columns=[
                        "session_id",
                        "seq",
                        "role",
                        "content",
                        "prompt_tokens",
                        "completion_tokens",
                        "request_id",
                        "created_at",
                    ],
                )
        await conn.execute("ANALYZE sessions; ANALYZE messages")
    finally:
        await conn.close()


def prepare_sessions(res: RunResources, count: int, messages: int, first_index: int = 0) -> Path:
    """`count` sessions holding `messages` messages each; returns a file of their ids."""
    if messages % 2:
        raise ValueError("messages must be even (user + assistant per turn)")
    started = time.monotonic()
    ids = [uuid.uuid4() for _ in range(count)]
    asyncio.run(_insert_sessions(res.dsn, ids, messages, first_index))
    path = res.tmp / f"sessions-{messages}.txt"
    path.write_text("".join(f"{session_id}\n" for session_id in ids))
    log(f"prepared {count} sessions x {messages} messages in {time.monotonic() - started:.1f}s")
    return path


async def _verify_session(dsn: str, session_id: str) -> tuple[int, int, str, str]:
    import asyncpg

    from app.storage.turns import next_history_digest

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT message_count, history_digest FROM sessions WHERE id = $1",
            uuid.UUID(session_id),
        )
        messages = await conn.fetch(
            "SELECT role, content FROM messages WHERE session_id = $1 ORDER BY seq",
            uuid.UUID(session_id),
        )
    finally:
        await conn.close()
    digest = ""
    for i in range(0, len(messages), 2):
        pair = [{"role": m["role"], "content": m["content"]} for m in messages[i : i + 2]]
        digest = next_history_digest(digest, pair)
    return row["message_count"], len(messages), row["history_digest"], digest


def check_prepared_sessions(res: RunResources, service: Server, sessions_file: Path) -> None:
    """The prepared rows are what the service itself would have written: message_count
    equals the rows, the stored digest is the chain over them, and a turn on the session
    succeeds (the service's optimistic-concurrency write needs a consistent count)."""
    session_id = sessions_file.read_text().split()[0]
    count, rows, stored, chained = asyncio.run(_verify_session(res.dsn, session_id))
    if count != rows or stored != chained:
        raise BenchError(
            f"prepared session {session_id} is inconsistent: message_count={count}, "
            f"rows={rows}, digest ok={stored == chained}"
        )
    status, _, body = http(
        "POST", service.url + "/query", {"message": "check prepared", "session_id": session_id}
    )
    if status != 200:
        raise BenchError(f"a turn on prepared session {session_id} failed: {status} {body[:300]!r}")
    count, rows, stored, chained = asyncio.run(_verify_session(res.dsn, session_id))
    if count != rows or stored != chained:
        raise BenchError(
            f"after one turn through the API, session {session_id} has message_count={count}, "
            f"rows={rows}, digest chained like the prepared ones: {stored == chained}"
        )
