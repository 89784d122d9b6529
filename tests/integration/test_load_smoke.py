"""`make load` in small: a 15-second run of scripts/load.sh (simulator + service + locust).

It checks that the script starts everything, that the locustfile's whole mix of requests
succeeds, that locust's exit code comes through, and that nothing the script started is
left behind afterwards.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "load.sh"
TIMEOUT = 90
REQUEST_NAMES = {
    "/query [new]",
    "/query [follow-up]",
    "/query [cached]",
    "/query [tools]",
    "/secure-query",
    "/ready",
    "/query [stream]",  # StreamingUser: to the headers, the first delta, the whole stream
    "/query [stream] first delta",
    "/query [stream] whole",
}
PIDS_RE = re.compile(r"service http://127\.0\.0\.1:\d+ \(pid (\d+)\), simulator .* \(pid (\d+)\)")


def port_is_free(port: int) -> bool:
    """Nothing listens on the port (TIME_WAIT leftovers of closed connections do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """bash scripts/load.sh in a session of its own: on a timeout the whole process group
    (bash, service, simulator, locust) is stopped, so a hung run leaves nothing behind."""
    process = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"load.sh did not finish within {TIMEOUT}s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_load_script_smoke_run(tmp_path: Path) -> None:
    report_dir = tmp_path / "load"
    port, sim_port = free_port(), free_port()
    while sim_port == port:
        sim_port = free_port()
    # The defaults (SQLite, in-process cache, the locustfile's own weights), whatever the
    # developer's shell says; only the test's knobs below.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LOAD_", "LLM_", "SIM_", "JWT_"))
        and key not in {"DATABASE_URL", "REDIS_URL", "VENV"}
    }
    env.update(
        VENV=sys.prefix,  # the environment running this test has agentserve and locust
        LOAD_DURATION="15s",
        LOAD_USERS="10",
        LOAD_SPAWN_RATE="5",
        LOAD_REPORT_DIR=str(report_dir),
        LOAD_PORT=str(port),
        LOAD_SIM_PORT=str(sim_port),
        # A smoke run checks that everything works, not this machine's speed; latency
        # budgets belong to `make load`.
        LOAD_MAX_P95_MS="2000",
    )

    result = run_script(env)
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    assert "load test passed" in result.stderr, output

    stats = report_dir / "load_stats.csv"
    assert stats.is_file(), output
    assert (report_dir / "load.html").is_file(), output
    with stats.open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    assert requests > 0, output
    assert failures / requests < 0.01, f"{failures} of {requests} failed\n{output}"
    assert set(rows) >= REQUEST_NAMES, f"missing: {REQUEST_NAMES - set(rows)}\n{output}"

    # Nothing the script started is left running or listening.
    match = PIDS_RE.search(result.stdout)
    assert match is not None, output
    for pid in map(int, match.groups()):
        assert not process_exists(pid), f"pid {pid} still runs\n{output}"
    assert port_is_free(port), f"something still listens on {port}\n{output}"
    assert port_is_free(sim_port), f"something still listens on {sim_port}\n{output}"
