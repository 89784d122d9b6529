"""The `agentserve` command as operators run it: a real process, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect

from tests.support.processes import free_port, wait_for_health

pytestmark = pytest.mark.integration

AGENTSERVE = [sys.executable, "-m", "app"]


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "SIM_"))}
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'var' / 'cli.db'}",  # no var/ yet
        LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    result = subprocess.run(
        [*AGENTSERVE, "migrate"],
        env=base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'cli.db'}")
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"sessions", "messages", "alembic_version"} <= tables


def test_sigterm_turns_ready_off_and_drains_in_flight_requests(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*AGENTSERVE, "serve", "--port", str(port)],
        env=base_env(tmp_path, SIM_LATENCY_MS="1500", SHUTDOWN_DELAY_SECONDS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_health(url, process)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        results: dict[str, httpx.Response] = {}

        def slow_query() -> None:
            results["query"] = httpx.post(f"{url}/query", json={"message": "finish me"}, timeout=10)

        worker = threading.Thread(target=slow_query)
        worker.start()
        time.sleep(0.3)  # the query is now waiting on the simulated LLM
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        during = httpx.get(f"{url}/ready", timeout=5)
        assert during.status_code == 503
        assert during.json()["checks"]["lifecycle"]["detail"] == "shutting down"
        worker.join(timeout=15)
        assert results["query"].status_code == 200
        assert results["query"].json()["answer"].startswith("[simulator]")
        # uvicorn re-raises the captured SIGTERM after its clean shutdown, as a server should
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
