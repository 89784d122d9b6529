"""CPU instructions the service spends on one request, counted with valgrind's callgrind.

A wrk run of the same code moves by 10-20 % with whatever else the machine does; an
instruction count does not, so it settles a change smaller than that (and shows where the
instructions go, with ``callgrind_annotate``). It does not see Postgres', Redis' or the
client's work, nor stalls on memory.

The service runs as `make bench` runs it (uvicorn, one worker, the run's own Postgres
database and Redis prefix, the in-process simulator) but under ``valgrind --tool=callgrind``.
For each scenario this script sends `--warm` requests, zeroes the counters
(``callgrind_control --zero``), sends `--requests` more, one at a time over HTTP, and dumps
the counters (``callgrind_control --dump``): instructions per request = the dump's total
over `--requests`. Start-up (about three minutes under valgrind) is paid once.

Scenarios: ``full_path`` (a new session and a unique message each: a cache miss),
``cache_hit`` (one question on a new session each: answered from Redis after the first),
``continuation`` (unique messages on one session; past 25 turns its history window is full).

Usage: ``.venv/bin/python bench/instructions.py [--scenario full_path ...] [--requests 200]
[--warm 50] [--keep DIR]``; `--keep` copies each scenario's profile there. Needs valgrind
(``apt-get install -y valgrind``), Postgres and Redis as for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h

SCENARIOS = ("full_path", "cache_hit", "continuation")
START_TIMEOUT_S = 300.0  # start-up is ~50x slower under valgrind


def send(
    server: h.Server, scenario: str, count: int, tag: str, first: int = 0, session: str = ""
) -> str:
    """`count` requests of the scenario, one at a time; every answer must be a 200. Returns
    the last answer's session (a continuation goes on with it)."""
    for i in range(first, first + count):
        if scenario == "cache_hit":
            body: dict[str, object] = {"message": f"the same question {tag}"}
        else:
            body = {"message": f"question {tag}-{i}"}
        if scenario == "continuation" and session:
            body["session_id"] = session
        status, _headers, raw = h.http("POST", server.url + "/query", body, timeout=60.0)
        if status != 200:
            raise h.BenchError(f"{scenario}: {status} {raw[:300]!r}")
        session = json.loads(raw)["session_id"]
    return session


def callgrind(command: str, pid: int) -> None:
    """Ask the running callgrind to zero or dump its counters (it answers within ~0.1 s:
    uvicorn's main loop ticks, so the program runs and sees the request)."""
    control = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
    done = subprocess.run(  # noqa: S603
        [control, command, str(pid)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise h.BenchError(f"callgrind_control {command}: {done.stdout}{done.stderr}")


def measure(server: h.Server, out: Path, scenario: str, args: argparse.Namespace) -> int:
    """Instructions of `args.requests` requests of the scenario, after `args.warm` of them."""
    tag = secrets.token_hex(4)
    session = send(server, scenario, args.warm, tag)
    callgrind("--zero", server.pid)
    send(server, scenario, args.requests, tag, first=args.warm, session=session)
    before = set(out.parent.glob(out.name + ".*"))
    callgrind(f"--dump={scenario}", server.pid)
    dumps = set(out.parent.glob(out.name + ".*")) - before
    if len(dumps) != 1:
        raise h.BenchError(f"expected one new callgrind dump next to {out}, found {dumps}")
    dump = dumps.pop()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dump, args.keep / f"callgrind.{scenario}.out")
    match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
    if match is None:
        raise h.BenchError(f"no instruction total in {dump}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="instructions per request, with callgrind")
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--requests", type=int, default=200, help="requests counted (200)")
    parser.add_argument("--warm", type=int, default=50, help="requests before them (50)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind profiles here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        h.log("valgrind is not installed: apt-get install -y valgrind")
        return 2
    h.install_signal_handlers()
    with h.exit_codes("instructions"), h.RunResources() as res:
        out = res.tmp / "callgrind.out"
        server = h.service_server(res, h.service_settings(res, pool_size=64))
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        server.argv = [*valgrind, *server.argv]
        server.start(timeout=START_TIMEOUT_S)
        print(f"{'scenario':<14} {'instructions/request':>21}", flush=True)
        for scenario in args.scenario:
            total = measure(server, out, scenario, args)
            print(f"{scenario:<14} {total / args.requests:>21,.0f}", flush=True)
        server.stop(timeout=START_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
