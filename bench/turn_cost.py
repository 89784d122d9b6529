"""Instructions the service spends on one continuation turn, by the length of the session,
counted by valgrind's callgrind: a figure this shared, noisy machine cannot move.

    .venv/bin/python bench/turn_cost.py [--messages 20 50 1000] [--turns 50 250] [--out DIR]
                                        [--http] [--upstream]

Why: the 1,000-against-20-messages target is a 10 % margin, and on this machine two wrk
runs of the same code differ by more than that. callgrind counts the instructions a process
executes, the same whatever else runs beside it. What it cannot see: Postgres's and Redis's
own work (other processes) and the cost of cache misses; the wrk rows of bench/run.py
measure those.

How: for each session length, the service runs in-process (the app factory and its
lifespan, as uvicorn would build it; no HTTP) and answers one turn on each of a list of
prepared sessions, each session once, so each holds exactly that many messages (`--http`:
as `POST /query` through the ASGI app; `--upstream`: the LLM asked over HTTP, the simulator
in a process of its own with no latency, as in scenario 4). The whole
process runs under callgrind twice, with the two turn counts of `--turns` on separate,
identical sessions; the difference of the totals over the difference of the counts is the
cost of a turn, start-up and warm-up cancelled out. Sessions, database and Redis keys are
private to the run and removed at the end, as in bench/run.py.

Needs valgrind (``apt-get install -y valgrind``) besides what bench/run.py needs; ~4 min.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h

WARMUP_TURNS = 20
COLLECTED = re.compile(r"Collected : (\d+)")


async def _answer_turns(sessions_file: Path, turns: int, http: bool) -> None:
    """The child: warm-up turns, then `turns` turns, one per prepared session (a new session
    per turn when the file lists none)."""
    from app.main import create_app
    from app.service import QueryInput

    ids: list[uuid.UUID | None] = [
        uuid.UUID(line)
        for line in sessions_file.read_text().split()  # noqa: ASYNC240
    ]
    if not ids:
        ids = [None] * (WARMUP_TURNS + turns)
    if len(ids) < WARMUP_TURNS + turns:
        raise h.BenchError(f"{sessions_file} holds {len(ids)} sessions, {turns} turns need more")
    app = create_app()
    async with app.router.lifespan_context(app):
        service = app.state.runtime.service
        for index, session_id in enumerate(ids[: WARMUP_TURNS + turns]):
            message = f"turn cost {index} {sessions_file.stem}"
            if http:
                await _post_query(app, message, session_id)
            else:
                await service.answer(QueryInput(message=message, session_id=session_id))


async def _post_query(app: Any, message: str, session_id: uuid.UUID | None) -> None:
    """One `POST /query` through the app's ASGI callable: its middleware, routing, body
    validation and rate limiter, as uvicorn would call it (uvicorn's own parsing and socket
    I/O excepted)."""
    payload: dict[str, str] = {"message": message}
    if session_id is not None:
        payload["session_id"] = str(session_id)
    body = json.dumps(payload).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/query",
        "raw_path": b"/query",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # nothing more comes; the app never waits for it
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise h.BenchError(f"POST /query answered {status}")


def _instructions(
    sessions_file: Path, turns: int, http: bool, env: dict[str, str], out: Path | None
) -> int:
    """Instructions callgrind counted for a whole child process answering `turns` turns."""
    profile = "/dev/null" if out is None else str(out / f"{sessions_file.stem}.callgrind")
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={profile}"]
    argv += [h.PYTHON, __file__, "--child", str(sessions_file), str(turns), str(int(http))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("=="))
        raise h.BenchError(f"the callgrind run failed ({done.returncode}):\n{tail[-3000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        import uvloop

        uvloop.run(_answer_turns(Path(args[1]), int(args[2]), args[3] == "1"))
        return 0
    parser = argparse.ArgumentParser(description="callgrind: instructions per continuation turn")
    parser.add_argument(
        "--messages",
        type=int,
        nargs="+",
        default=[20, 50, 1000],
        help="session lengths; 0: a new session per turn (the full path)",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="send each turn as POST /query through the ASGI app (middleware, routing, "
        "validation, rate limiter) instead of calling the service",
    )
    parser.add_argument(
        "--upstream",
        action="store_true",
        help="ask the simulator over HTTP (its own process, no latency) instead of in-process: "
        "the path of scenario 4",
    )
    parser.add_argument("--turns", type=int, nargs=2, default=[50, 250], metavar=("FEW", "MANY"))
    parser.add_argument(
        "--out", type=Path, help="keep callgrind's profiles here (for callgrind_annotate)"
    )
    parsed = parser.parse_args(args)
    few, many = sorted(parsed.turns)
    if few == many:
        parser.error("--turns needs two different counts")
    if shutil.which("valgrind") is None:
        h.log("valgrind not found: apt-get install -y valgrind")
        return 2
    h.install_signal_handlers()
    try:
        with h.RunResources() as res:
            runs: list[tuple[int, int, Path]] = []
            first_index = 0
            for messages in parsed.messages:
                for turns in (few, many):
                    count = WARMUP_TURNS + turns
                    moved = res.tmp / f"turn-cost-{messages}-{turns}.txt"
                    if messages == 0:
                        moved.write_text("")
                    else:
                        path = h.prepare_sessions(res, count, messages, first_index=first_index)
                        first_index += count
                        path.rename(moved)
                    runs.append((messages, turns, moved))
            upstream = h.simulator_server(res, 0).start() if parsed.upstream else None
            try:
                env = {
                    **h.clean_env(),
                    **h.service_settings(
                        res,
                        pool_size=64,
                        llm_base_url=None if upstream is None else f"{upstream.url}/v1",
                    ),
                    "PYTHONHASHSEED": "0",
                }
                h.log(f"{len(runs)} callgrind runs, two at a time (~1-2 min each)")
                if parsed.out is not None:
                    parsed.out.mkdir(parents=True, exist_ok=True)
                with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                    totals = list(
                        pool.map(
                            lambda run: _instructions(run[2], run[1], parsed.http, env, parsed.out),
                            runs,
                        )
                    )
            finally:
                if upstream is not None:
                    upstream.stop()
    except KeyboardInterrupt:
        return 130
    except h.BenchError as exc:
        h.log(f"turn cost failed: {exc}")
        return 2
    by_length: dict[int, dict[int, int]] = {}
    for (messages, turns, _), total in zip(runs, totals, strict=True):
        by_length.setdefault(messages, {})[turns] = total
    per_turn = {m: (t[many] - t[few]) / (many - few) for m, t in by_length.items()}
    base = per_turn[min(per_turn)]
    how = "POST /query through the ASGI app" if parsed.http else "the service called directly"
    if parsed.upstream:
        how += ", the simulator over HTTP"
    print(f"\ninstructions per turn ({how}; callgrind, {few} and {many} turns)")
    relative = f"turns/s vs {min(per_turn)}"
    print(f"{'messages in the session':>24} {'instructions':>14} {relative:>16}")
    for messages, cost in per_turn.items():
        print(f"{messages:>24} {cost:>14,.0f} {base / cost:>16.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
