"""Profile the service's hot path under wrk load with py-spy, and summarise where the CPU
goes (by component and by function, inclusive and self).

    .venv/bin/python bench/hotpath_profile.py [--scenario full_path|continuation|cache_hit]
                                      [--seconds 20] [--concurrency 64] [--out DIR]

Starts the service as bench/run.py does (private database and Redis prefix, removed at
the end), warms it up, then runs wrk and ``py-spy record`` on the server process at the
same time. Writes DIR/<scenario>.txt (collapsed stacks: one "frame;frame;... count" per
line, for flamegraph.pl or speedscope) and DIR/<scenario>.svg, and prints the tables.

py-spy: from PATH, the venv, $BENCH_PYSPY, or /tmp/pyspy/bin (``pip install --target
/tmp/pyspy py-spy`` keeps it out of the project's environment).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h

COMPONENTS: list[tuple[str, str]] = [
    # (regex on the frame's file path, component) - first match wins
    (r"/app/api/", "app: api (routes, deps, errors)"),
    (r"/app/service\.py", "app: service"),
    (r"/app/storage/", "app: storage"),
    (r"/app/cache\.py", "app: cache"),
    (r"/app/security/", "app: limits/security"),
    (r"/app/agents/", "app: agents"),
    (r"/app/llm/", "app: llm (chain, breaker, simulator, wire)"),
    (r"/app/observability/", "app: metrics/logging"),
    (r"/app/main\.py", "app: main"),
    (r"/app/", "app: other"),
    (r"sqlalchemy/", "sqlalchemy"),
    (r"asyncpg/", "asyncpg"),
    (r"redis/", "redis-py"),
    (r"/limits/", "limits"),
    (r"prometheus_fastapi_instrumentator/", "prometheus instrumentator"),
    (r"prometheus_client/", "prometheus_client"),
    (r"asgi_correlation_id/", "asgi-correlation-id"),
    (r"opentelemetry/", "opentelemetry"),
    (r"fastapi/", "fastapi"),
    (r"starlette/", "starlette"),
    (r"pydantic", "pydantic"),
    (r"uvicorn/", "uvicorn"),
    (
        r"httpx/|httpcore/|h11/|anyio/|aiohttp/|yarl/|multidict/|propcache/|app/llm/transport",
        "LLM client (httpx on aiohttp)",
    ),
    (r"tenacity/", "tenacity"),
    (r"logging/|pythonjsonlogger/", "logging"),
    (r"asyncio/|uvloop", "asyncio/uvloop"),
    (r"json|orjson", "json"),
]

HOT_PATH = (
    "to_thread.run_sync",
    "run_in_threadpool",
    "run_sync_in_worker_thread",
    "AsyncConnection.execute",
    "AsyncConnection.start",
    "AsyncEngine.begin",
    "AsyncEngine.connect",
    "_ConnectionRecord.__connect",
    "_ConnectionFairy._checkout",
    "_ConnectionFairy._checkin",
    "pre_ping",
    "_do_ping_w_event",
    "do_ping",
    "connect (asyncpg/connection.py)",
    "AsyncAdapt_asyncpg_connection",
    "SQLCompiler.__init__",
    "Executable._execute_on_connection",
    "PrometheusInstrumentatorMiddleware.__call__",
    "CorrelationIdMiddleware.__call__",
    "serialize_response",
    "_prepare_response_content",
    "request_body_to_args",
    "solve_dependencies",
    "MovingWindow",
    "SlidingWindowCounter",
    "Script.__call__",
    "Pipeline.execute",
    "Redis.execute_command",
    "JSONResponse.render",
    "Logger.",
)

# Steps of one request: a sample goes to the innermost frame (leaf first) that names a step.
STEPS: list[tuple[tuple[str, ...], str]] = [
    (("_async_ping", "do_ping", "_do_ping_w_event"), "DB: pool pre-ping (BEGIN; ;; ROLLBACK)"),
    (
        (
            "_ConnectionRecord.__connect",
            "connect (asyncpg/connection.py)",
            "_connect_addr",
            "_create_ssl_connection",
            "_setup_type_codecs",
            "setup_asyncpg",
        ),
        "DB: opening connections (pool overflow)",
    ),
    (("_ConnectionFairy._checkin", "_finalize_fairy", "AsyncConnection.close"), "DB: checkin"),
    (("SessionStore.load",), "DB: SessionStore.load"),
    (("SessionStore.save_turn",), "DB: SessionStore.save_turn"),
    (("RateLimiter.hit",), "Redis: rate limit (limits, 2 scripts)"),
    (("RateLimiter._acquire", "_Slot.__aenter__"), "Redis: concurrency slot acquire"),
    (
        ("RateLimiter._remove_token", "RateLimiter._release", "_Slot.__aexit__"),
        "Redis: concurrency slot release",
    ),
    (("ResponseCache._lookup",), "Redis: cache GET"),
    (("ResponseCache._lock_or_wait",), "Redis: cache lock (SET NX + GET)"),
    (("ResponseCache.set",), "Redis: cache SET + session index"),
    (("ResponseCache._unlock",), "Redis: cache unlock (EVAL)"),
    (
        (
            "Agent._events",
            "Agent.run",
            "FallbackChain.",
            "ResilientUpstream.",
            "OpenAICompatibleModel.",
            "SimulatorChatModel.",
            "Simulator.",
            "collect (app/agents",
            "AgentPool.",
        ),
        "LLM: agent loop, chain, upstream call",
    ),
    (("_Answer.", "cache_key", "next_history_digest", "normalize_message"), "service: encode/keys"),
    (
        ("run_in_threadpool", "run_sync_in_worker_thread", "WorkerThread.", "to_thread"),
        "FastAPI: sync dependencies via the threadpool",
    ),
    (
        ("solve_dependencies", "request_body_to_args", "_validate", "serialize_response"),
        "FastAPI: dependencies, body parsing, validation",
    ),
    (("render (app/api/query.py)", "JSON.", "JSONResponse."), "response rendering"),
    (("QueryService.", "run_query", "query (app/api/query.py)"), "route/service own code"),
    (
        (
            "CorrelationIdMiddleware",
            "PrometheusInstrumentatorMiddleware",
            "RequestEnvelope",
            "ProxyHeadersMiddleware",
            "ExceptionMiddleware",
            "ServerErrorMiddleware",
            "AsyncExitStackMiddleware",
        ),
        "middleware",
    ),
    (("RequestResponseCycle", "HttpToolsProtocol"), "uvicorn: HTTP protocol"),
]


def step_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for markers, step in STEPS:
            if any(marker in frame for marker in markers):
                return step
    if any("sqlalchemy/" in frame for frame in frames):
        return "DB: SQLAlchemy in a greenlet (statement execution)"
    if any("asyncpg/" in frame for frame in frames):
        return "DB: asyncpg, no caller on the stack"
    if any("redis/" in frame for frame in frames):
        return "Redis: redis-py, no caller on the stack (mostly socket writes)"
    if not frames or frames == [""]:
        return "no Python frame (uvloop / C code)"
    return "event loop, other"


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_pyspy() -> str:
    candidates = [
        os.environ.get("BENCH_PYSPY"),
        shutil.which("py-spy"),
        str(Path(h.PYTHON).with_name("py-spy")),
        "/tmp/pyspy/bin/py-spy",  # noqa: S108 - where the docstring says to install it
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise h.BenchError(
        "py-spy not found: pip install --target /tmp/pyspy py-spy (or set BENCH_PYSPY)"
    )


def component(path: str) -> str:
    for pattern, name in COMPONENTS:
        if re.search(pattern, path):
            return name
    return "other (stdlib, C)"


def parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame)
    if match is None:
        return frame, ""
    return match.group("func"), match.group("file")


def short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(collapsed: Path, top: int = 30) -> str:
    stacks: list[tuple[list[str], int]] = []
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    total = sum(n for _, n in stacks)
    if not total:
        return "no samples"
    steps: collections.Counter[str] = collections.Counter()
    comp_self: collections.Counter[str] = collections.Counter()
    comp_incl: collections.Counter[str] = collections.Counter()
    func_self: collections.Counter[str] = collections.Counter()
    func_incl: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        steps[step_of(frames)] += n
        parsed = [parse_frame(f) for f in frames]
        seen_funcs, seen_comps = set(), set()
        for func, path in parsed:
            key = f"{func} ({short(path)})"
            seen_funcs.add(key)
            seen_comps.add(component(path))
        for key in seen_funcs:
            func_incl[key] += n
        for comp in seen_comps:
            comp_incl[comp] += n
        # self time: the innermost frame that is Python code we can name (skip C shims)
        leaf_func, leaf_path = parsed[-1]
        func_self[f"{leaf_func} ({short(leaf_path)})"] += n
        comp_self[component(leaf_path)] += n
    lines = [f"{total} samples holding the GIL (py-spy --gil: idle time is not sampled)", ""]
    lines.append("by step of the request (innermost step frame of each sample)")
    for step, n in steps.most_common():
        lines.append(f"  {n * 100 / total:5.1f}  {step}")
    lines.append("")
    lines.append("by component            self %   inclusive %")
    for comp, n in comp_self.most_common():
        lines.append(f"  {comp:<42} {n * 100 / total:6.1f}   {comp_incl[comp] * 100 / total:6.1f}")
    lines.append("")
    lines.append(f"top {top} functions by inclusive time (% of samples)")
    for key, n in func_incl.most_common(top):
        lines.append(f"  {n * 100 / total:5.1f}  {key}")
    lines.append("")
    lines.append("app/ functions and hot-path entry points by inclusive time")
    for key, n in func_incl.most_common():
        if n * 1000 < total * 5:  # under 0.5 %
            break
        if "(app/" in key or any(marker in key for marker in HOT_PATH):
            lines.append(f"  {n * 100 / total:5.1f}  {key}")
    lines.append("")
    lines.append(f"top {top} functions by self time")
    for key, n in func_self.most_common(top):
        lines.append(f"  {n * 100 / total:5.1f}  {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarise":
        print(summarise(Path(sys.argv[2])))  # re-read a saved profile
        return 0
    parser = argparse.ArgumentParser(description="py-spy profile of the service under wrk")
    parser.add_argument(
        "--scenario", default="full_path", choices=["full_path", "continuation", "cache_hit"]
    )
    parser.add_argument(
        "--upstream-latency-ms",
        type=float,
        help="use the simulator as an HTTP upstream with this latency (scenario 4: 50)",
    )
    parser.add_argument(
        "--messages", type=int, default=20, help="messages per prepared session (continuation)"
    )
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("/tmp/agentserve-profile"))  # noqa: S108
    args = parser.parse_args(argv)
    h.install_signal_handlers()
    try:
        pyspy = find_pyspy()
        wrk = h.Wrk(h.ensure_wrk())
        h.raise_nofile()
        args.out.mkdir(parents=True, exist_ok=True)
        with h.RunResources() as res:
            env: dict[str, str] = {}
            if args.scenario == "continuation":
                env["BENCH_SESSIONS"] = str(
                    h.prepare_sessions(res, 8 * args.concurrency, args.messages)
                )
            sim = None
            if args.upstream_latency_ms is not None:
                sim = h.simulator_server(res, args.upstream_latency_ms).start()
            settings = h.service_settings(
                res,
                pool_size=h.POOL_SIZE,
                llm_base_url=None if sim is None else f"{sim.url}/v1",
                llm_max_connections=h.POOL_SIZE,
            )
            server = h.service_server(res, settings).start()
            try:
                if args.scenario == "cache_hit":
                    message = "bench profile: what is the capital of France?"
                    for _ in range(2):
                        h.http("POST", server.url + "/query", {"message": message})
                    env["BENCH_MESSAGE"] = message
                wrk.run(
                    "warm-up",
                    server.url,
                    args.scenario,
                    connections=args.concurrency,
                    duration=5,
                    env=env,
                )
                name = args.scenario if sim is None else f"{args.scenario}-upstream"
                if args.scenario == "continuation":
                    name += f"-{args.messages}"
                raw = args.out / f"{name}.txt"
                svg = args.out / f"{name}.svg"
                record = [
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.seconds),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    # only the thread holding the GIL (the event loop, or a threadpool
                    # worker running sync code), without pausing the process per sample
                    "--gil",
                    "--nonblocking",
                ]
                spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
                result: list[h.WrkResult] = []
                load = threading.Thread(
                    target=lambda: result.append(
                        wrk.run(
                            "profiled",
                            server.url,
                            args.scenario,
                            connections=args.concurrency,
                            duration=args.seconds,
                            env=env,
                        )
                    )
                )
                load.start()
                _, err = spy.communicate(timeout=args.seconds + 60)
                load.join()
                if spy.returncode != 0 or not raw.exists():
                    raise h.BenchError(f"py-spy failed ({spy.returncode}): {err.decode()[-2000:]}")
                subprocess.run(  # noqa: S603
                    [sys.executable, "-c", _FLAMEGRAPH, str(raw), str(svg)], check=False
                )
                r = result[0]
                print(
                    f"\n{name}: wrk -c{args.concurrency} -d{args.seconds}s under py-spy "
                    f"(--rate {args.rate}): {r.rps:.1f} req/s, p50 {r.p50_ms:.1f} ms, "
                    f"errors {r.errors}" + (f" ({r.error_detail()})" if r.errors else "")
                )
                print(f"collapsed stacks: {raw}\n")
                print(summarise(raw))
            finally:
                server.stop()
    except KeyboardInterrupt:
        return 130
    except h.BenchError as exc:
        h.log(f"profile failed: {exc}")
        return 2
    return 0


# py-spy writes one format per run; an SVG is handy but optional (needs flamegraph.pl or
# nothing at all: skip quietly when it is not installed).
_FLAMEGRAPH = """
import shutil, subprocess, sys
tool = shutil.which("flamegraph.pl") or shutil.which("inferno-flamegraph")
if tool:
    with open(sys.argv[2], "wb") as out:
        subprocess.run([tool, sys.argv[1]], stdout=out, check=False)
"""


if __name__ == "__main__":
    sys.exit(main())
