"""Count the Redis commands and Postgres statements of one request of each kind.

    .venv/bin/python bench/roundtrips.py

Starts the service (and the floor) as bench/run.py does, sends one request of each kind
on a warm server, and lists what each one sent:

* Redis: every command from the service's clients, from MONITOR, restricted to this run's
  key prefix; commands run inside a Lua script are shown indented (they are not round
  trips). A pipeline is one round trip for several commands; MONITOR cannot tell, so read
  the list with the code at hand.
* Postgres: every statement, from the server log with ``log_statement = all`` set on the
  run's own database only (the log file: $BENCH_PG_LOG, default Debian's
  /var/log/postgresql/postgresql-<version>-main.log). An empty statement (``;``, the pool's
  pre-ping) is not logged by Postgres.

``-v`` also lists the commands run inside scripts. Nothing here is timed: it says how many
round trips each kind of request costs, which explains much of the difference with the
floor (2 Redis commands, 1 transaction).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h

STOP = "__roundtrips_stop__"


class RedisMonitor:
    """MONITOR in a thread; keeps the commands that name the run's key prefix."""

    def __init__(self, prefix: str) -> None:
        import redis

        self.prefix = prefix
        self.client = redis.Redis.from_url(h.REDIS_URL)
        self.events: list[tuple[float, str, bool]] = []  # (time, command, inside a script)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]  # redis-py
            self.ready.set()
            for event in monitor.listen():
                command = str(event.get("command", ""))
                if STOP in command:
                    return
                if self.prefix in command:
                    in_script = event.get("client_type") == "lua"
                    self.events.append((time.monotonic(), command, in_script))

    def __enter__(self) -> RedisMonitor:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.get(self.prefix + STOP)
        self.thread.join(5)
        self.client.close()

    def between(self, start: float, end: float) -> list[tuple[str, bool]]:
        return [(c, lua) for t, c, lua in self.events if start <= t < end]


def pg_log_path() -> Path | None:
    configured = os.environ.get("BENCH_PG_LOG")
    if configured:
        return Path(configured)
    candidates = sorted(Path("/var/log/postgresql").glob("postgresql-*-main.log"))
    return candidates[-1] if candidates else None


def pg_statements(log: Path | None, offset: int, database: str) -> list[str]:
    if log is None:
        return []
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if database in line and ("statement:" in line or "execute " in line):
            out.append(line.split("LOG:", 1)[-1].strip()[:150])
    return out


def probe(
    name: str,
    url: str,
    body: dict[str, Any],
    monitor: RedisMonitor,
    log: Path | None,
    database: str,
    prefix: str,
    verbose: bool,
) -> None:
    offset = log.stat().st_size if log is not None else 0
    start = time.monotonic()
    status, headers, _ = h.http("POST", url + "/query", body)
    time.sleep(0.3)  # background work of the request (slot release, flight cleanup)
    commands = monitor.between(start, time.monotonic())
    statements = pg_statements(log, offset, database)
    round_trips = sum(1 for _, lua in commands if not lua)
    print(
        f"\n== {name}: HTTP {status}, X-Cache {headers.get('x-cache', '-')}; "
        f"{round_trips} Redis commands (+{len(commands) - round_trips} inside scripts), "
        f"{len(statements)} Postgres statements"
    )
    for command, lua in commands:
        if lua and not verbose:
            continue
        print(("      [script] " if lua else "    redis ") + command.replace(prefix, "P:")[:110])
    for statement in statements:
        print("    pg    " + statement)


def main() -> int:
    verbose = "-v" in sys.argv[1:] or "--verbose" in sys.argv[1:]
    h.install_signal_handlers()
    log = pg_log_path()
    if log is None or not os.access(log, os.R_OK):
        h.log("Postgres log not readable (set BENCH_PG_LOG): statements are not counted")
        log = None
    try:
        with h.RunResources() as res:
            sessions = h.prepare_sessions(res, 4, 20)
            asyncio.run(h._admin([f"ALTER DATABASE \"{res.database}\" SET log_statement = 'all'"]))
            settings = h.service_settings(res, pool_size=64, db_pool_size=20)
            service = h.service_server(res, settings).start()
            floor = h.floor_server(res, db_pool_size=2, db_max_overflow=0).start()
            for i in range(3):  # warm: prepared statements, pools, scripts loaded
                h.http("POST", service.url + "/query", {"message": f"warm {i}"})
                h.http("POST", floor.url + "/query", {"message": f"warm {i}"})
            session_id = sessions.read_text().split()[0]
            args = (log, res.database, res.redis_prefix, verbose)
            with RedisMonitor(res.redis_prefix) as monitor:
                probe(
                    "service: full path (miss)",
                    service.url,
                    {"message": "rt probe"},
                    monitor,
                    *args,
                )
                probe("service: cache hit", service.url, {"message": "rt probe"}, monitor, *args)
                probe(
                    "service: continuation",
                    service.url,
                    {"message": "rt probe 2", "session_id": session_id},
                    monitor,
                    *args,
                )
                probe("floor (miss)", floor.url, {"message": "rt probe"}, monitor, *args)
    except KeyboardInterrupt:
        return 130
    except h.BenchError as exc:
        h.log(f"failed: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
