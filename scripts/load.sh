#!/usr/bin/env bash
# Load test (`make load`): start the LLM simulator as an HTTP upstream and the service in
# front of it, both on free loopback ports, run tests/load/locustfile.py headless against
# the service, stop both, and exit with locust's exit code (0: within
# LOAD_MAX_FAILURE_RATIO and LOAD_MAX_P95_MS).
#
#   LOAD_USERS=50 LOAD_SPAWN_RATE=10 LOAD_DURATION=60s   locust -u / -r / -t
#   LOAD_SIM_LATENCY_MS=20                                simulator latency per LLM call
#   LOAD_REPORT_DIR=reports/load                          CSV, HTML report and server logs
#   LOAD_PORT / LOAD_SIM_PORT                             fixed ports (default: free ones)
#   DATABASE_URL  a database to use (default: a new SQLite file, removed afterwards)
#   REDIS_URL     Redis for the cache and limits (default: in-process)
#   VENV=.venv    where agentserve and locust are installed (`make test` installs them)
# plus the locustfile's own knobs (LOAD_WEIGHT_*, LOAD_MAX_*, ...; see its docstring).
#
# The service and locust run in a scratch directory, so a developer's .env is not read.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV:-.venv}"
case "$VENV_DIR" in /*) ;; *) VENV_DIR="$ROOT/$VENV_DIR" ;; esac
BIN="$VENV_DIR/bin"
for tool in python agentserve locust; do
    if [[ ! -x "$BIN/$tool" ]]; then
        echo "load.sh: $BIN/$tool not found; install the dev tools first (make test)" >&2
        exit 2
    fi
done

REPORT_DIR="${LOAD_REPORT_DIR:-reports/load}"
case "$REPORT_DIR" in /*) ;; *) REPORT_DIR="$ROOT/$REPORT_DIR" ;; esac
mkdir -p "$REPORT_DIR"
WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/agentserve-load.XXXXXX")"

SIM_PID=""
APP_PID=""
LOCUST_PID=""

stop() {  # stop PID: SIGTERM, up to 15 s to drain and exit, then SIGKILL; reap it
    local pid="$1" i
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "load.sh: pid $pid ignored SIGTERM for 15 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop "$LOCUST_PID"
    stop "$APP_PID"
    stop "$SIM_PID"
    rm -rf "$WORK_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Two distinct free ports (both bound at once, then released), unless given.
read -r FREE_APP_PORT FREE_SIM_PORT < <("$BIN/python" - <<'EOF'
import socket

socks = [socket.socket() for _ in range(2)]
for sock in socks:
    sock.bind(("127.0.0.1", 0))
print(*(sock.getsockname()[1] for sock in socks))
for sock in socks:
    sock.close()
EOF
)
PORT="${LOAD_PORT:-$FREE_APP_PORT}"
SIM_PORT="${LOAD_SIM_PORT:-$FREE_SIM_PORT}"
URL="http://127.0.0.1:$PORT"
SIM_URL="http://127.0.0.1:$SIM_PORT"

# wait_for URL PID NAME: until URL answers 200 (60 s), failing early if PID exits.
wait_for() {
    "$BIN/python" - "$@" <<'EOF'
import os
import sys
import time
import urllib.error
import urllib.request

url, pid, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"load.sh: the {name} exited before it was ready")
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            if response.status == 200:
                sys.exit(0)
    except (OSError, urllib.error.URLError):
        pass
    time.sleep(0.2)
sys.exit(f"load.sh: the {name} was not ready at {url} within 60 s")
EOF
}

show_logs() {
    echo "--- $REPORT_DIR/simulator.log (last lines)" >&2
    tail -n 20 "$REPORT_DIR/simulator.log" >&2 || true
    echo "--- $REPORT_DIR/server.log (last lines)" >&2
    tail -n 40 "$REPORT_DIR/server.log" >&2 || true
}

JWT_SECRET="$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(48))')"
export JWT_SECRET

cd "$WORK_DIR"  # no .env here: only the settings below (and the caller's environment) apply

"$BIN/agentserve" simulate --host 127.0.0.1 --port "$SIM_PORT" \
    --latency-ms "${LOAD_SIM_LATENCY_MS:-20}" >"$REPORT_DIR/simulator.log" 2>&1 &
SIM_PID=$!

export DATABASE_URL="${DATABASE_URL:-sqlite+aiosqlite:///$WORK_DIR/load.db}"
CACHE=Redis
if [[ -z "${REDIS_URL:-}" ]]; then
    unset REDIS_URL
    CACHE=in-process
fi
export LLM_BASE_URL="$SIM_URL/v1"
unset LLM_UPSTREAMS
export \
    APP_ENV=development \
    LOG_LEVEL=WARNING \
    ACCESS_LOG=false \
    RATE_LIMIT_QUERY=1000000/minute \
    RATE_LIMIT_SECURE_QUERY=1000000/minute \
    CONCURRENCY_LIMIT_QUERY=10000 \
    CONCURRENCY_LIMIT_SECURE_QUERY=10000 \
    DRAIN_SECONDS=5 \
    SHUTDOWN_DELAY_SECONDS=0

: >"$REPORT_DIR/server.log"
if ! wait_for "$SIM_URL/v1/models" "$SIM_PID" simulator; then
    show_logs
    exit 1
fi
case "$DATABASE_URL" in
    sqlite*) ;;  # migrated on start
    *) "$BIN/agentserve" migrate >>"$REPORT_DIR/server.log" 2>&1 || { show_logs; exit 1; } ;;
esac
"$BIN/agentserve" serve --host 127.0.0.1 --port "$PORT" >>"$REPORT_DIR/server.log" 2>&1 &
APP_PID=$!
echo "load.sh: service $URL (pid $APP_PID), simulator $SIM_URL (pid $SIM_PID)," \
    "database ${DATABASE_URL%%:*}, cache $CACHE"
if ! wait_for "$URL/ready" "$APP_PID" service; then
    show_logs
    exit 1
fi

# In the background with `wait`, so that SIGINT/SIGTERM reach the trap at once (the trap
# stops locust too; it writes its reports on SIGTERM).
"$BIN/locust" -f "$ROOT/tests/load/locustfile.py" --headless \
    -u "${LOAD_USERS:-50}" -r "${LOAD_SPAWN_RATE:-10}" -t "${LOAD_DURATION:-60s}" \
    --host "$URL" --csv "$REPORT_DIR/load" --html "$REPORT_DIR/load.html" --only-summary &
LOCUST_PID=$!
LOCUST_RC=0
wait "$LOCUST_PID" || LOCUST_RC=$?
LOCUST_PID=""
echo "load.sh: locust exited with $LOCUST_RC; reports in $REPORT_DIR (load_stats.csv, load.html)"
exit "$LOCUST_RC"
