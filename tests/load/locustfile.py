"""Load test for agentserve: a realistic mix of callers, configured by environment variables.

Two kinds of users: `AgentServeUser` runs the mix of tasks below, and `StreamingUser` asks
for streamed answers (POST /query with `"stream": true`) and reads each stream to its `done`
event. Locust spawns them 4 : LOAD_WEIGHT_STREAMING_USER (default 1, so one user in five
streams; 0 turns streaming off).

Run it through ``make load`` (``scripts/load.sh``), which starts the service and an HTTP LLM
simulator and passes the right JWT_SECRET; or point it at a running service yourself::

    JWT_SECRET=<the server's secret> .venv/bin/locust -f tests/load/locustfile.py \
        --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8000

The server must allow far more than the default rate and concurrency limits per caller
(all users share one client IP): a 429 counts as a failure here.

Task weights (integers >= 0; 0 turns a task off):

    LOAD_WEIGHT_NEW       3  POST /query, a new conversation with a varied message
    LOAD_WEIGHT_FOLLOWUP  4  POST /query, the next turn of this user's current session
    LOAD_WEIGHT_CACHED    3  POST /query, one of a few fixed questions (answer cache hits)
    LOAD_WEIGHT_SECURE    3  POST /secure-query as one of LOAD_USERS_TOKENS subjects
    LOAD_WEIGHT_TOOLS     1  POST /query to the `tools` agent ("What is 12*7?")
    LOAD_WEIGHT_READY     1  GET /ready

Other knobs: LOAD_USERS_TOKENS (distinct JWT subjects, default 50), LOAD_FOLLOWUP_TURNS
(turns before a session is left for a new one, default 10), LOAD_WAIT_MIN_S /
LOAD_WAIT_MAX_S (think time between tasks, default 0.1 / 1.0), and the pass criteria
checked when locust quits: LOAD_MAX_FAILURE_RATIO (default 0.01) and LOAD_MAX_P95_MS
(default 500). When either is exceeded the process exits with 1 and says why; within them
it exits with 0 even if some requests failed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from locust import FastHttpUser, HttpUser, between, events, task
from locust import log as locust_log
from locust.env import Environment
from locust.runners import WorkerRunner

from app.config import Settings
from app.security.jwt import mint_token


def _env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"locustfile: {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"locustfile: {name}={value} must be >= {minimum}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"locustfile: {name}={raw!r} is not a number") from None
    if value < 0:
        raise SystemExit(f"locustfile: {name}={value} must be >= 0")
    return value


WEIGHT_NEW = _env_int("LOAD_WEIGHT_NEW", 3)
WEIGHT_FOLLOWUP = _env_int("LOAD_WEIGHT_FOLLOWUP", 4)
WEIGHT_CACHED = _env_int("LOAD_WEIGHT_CACHED", 3)
WEIGHT_SECURE = _env_int("LOAD_WEIGHT_SECURE", 3)
WEIGHT_TOOLS = _env_int("LOAD_WEIGHT_TOOLS", 1)
WEIGHT_READY = _env_int("LOAD_WEIGHT_READY", 1)
WEIGHT_STREAMING_USER = _env_int("LOAD_WEIGHT_STREAMING_USER", 1)
USERS_TOKENS = _env_int("LOAD_USERS_TOKENS", 50, minimum=1)
FOLLOWUP_TURNS = _env_int("LOAD_FOLLOWUP_TURNS", 10, minimum=1)
WAIT_MIN_S = _env_float("LOAD_WAIT_MIN_S", 0.1)
WAIT_MAX_S = max(WAIT_MIN_S, _env_float("LOAD_WAIT_MAX_S", 1.0))
MAX_FAILURE_RATIO = _env_float("LOAD_MAX_FAILURE_RATIO", 0.01)
MAX_P95_MS = _env_float("LOAD_MAX_P95_MS", 500.0)

TOKEN_TTL_SECONDS = 24 * 3600  # outlives any sensible run; tokens are minted per user start

TOPICS = (
    "the water cycle",
    "TCP congestion control",
    "sourdough bread",
    "the French revolution",
    "black holes",
    "database indexes",
    "photosynthesis",
    "the history of jazz",
    "garbage collection in Python",
    "how vaccines work",
    "compound interest",
    "plate tectonics",
)
OPENERS = (
    "Explain {topic} in two sentences.",
    "What should a beginner know about {topic}?",
    "Give me three facts about {topic}.",
    "Summarise {topic} for a ten-year-old.",
    "What is a common misconception about {topic}?",
)
FOLLOWUPS = (
    "Can you say more about that?",
    "Why is that so?",
    "Give me an example, please.",
    "How does that compare with the alternatives?",
    "Summarise your last answer in one line.",
    "What would an expert add here?",
)
CACHED_QUESTIONS = (
    "Hello! What can you do?",
    "What is the capital of France?",
    "How do I reverse a list in Python?",
    "What does HTTP status 429 mean?",
    "Tell me a short joke.",
)


def _new_message() -> str:
    opener = random.choice(OPENERS).format(topic=random.choice(TOPICS))
    return f"{opener} (ref {uuid.uuid4().hex[:8]})"  # unique: a cache miss, a real LLM call


def _follow_up_message(turn: int) -> str:
    return f"{random.choice(FOLLOWUPS)} (turn {turn})"


def _error_text(response: Any) -> str:
    """What went wrong, for the failure message (no body for a connection error)."""
    if not response.status_code:
        return f"no response: {response.error!r}"
    text = response.text or ""
    return f"HTTP {response.status_code}: {text[:200]}"


def _check_answer(response: Any, *, session_id: str | None = None) -> dict[str, Any] | None:
    """Mark the response failed unless it is a 200 answer; return its JSON when it is."""
    if response.status_code == 429:
        response.failure(
            f"429 rate limited (the load-test server should have high limits): "
            f"{(response.text or '')[:200]}"
        )
        return None
    if response.status_code != 200:
        response.failure(_error_text(response))
        return None
    try:
        body = response.json()
    except ValueError:
        response.failure(f"200 without a JSON body: {(response.text or '')[:200]}")
        return None
    if not isinstance(body, dict):
        response.failure("200 with a JSON body that is not an object")
        return None
    if not isinstance(body.get("answer"), str) or not body["answer"]:
        response.failure("200 without an answer")
        return None
    if not isinstance(body.get("session_id"), str):
        response.failure("200 without a session_id")
        return None
    if session_id is not None and body["session_id"] != session_id:
        response.failure(f"answered in session {body['session_id']}, asked in {session_id}")
        return None
    return body


class AgentServeUser(FastHttpUser):
    """One caller: anonymous conversations, cached questions, tools and JWT-authenticated
    conversations as several subjects."""

    weight = 4
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.session_id: str | None = None
        self.turns = 0
        # /secure-query: many distinct subjects (load-user-0 .. load-user-N-1), each with
        # its own conversation; the secret is JWT_SECRET, the one the server verifies with.
        settings = Settings()
        self.tokens = {
            f"load-user-{n}": mint_token(settings, f"load-user-{n}", ttl_seconds=TOKEN_TTL_SECONDS)
            for n in range(USERS_TOKENS)
        }
        self.secure_sessions: dict[str, tuple[str, int]] = {}

    def _ask(
        self,
        name: str,
        payload: dict[str, Any],
        *,
        path: str = "/query",
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        with self.client.post(
            path, json=payload, headers=headers, name=name, catch_response=True
        ) as response:
            return _check_answer(response, session_id=payload.get("session_id"))

    @task(WEIGHT_NEW)
    def new_conversation(self) -> None:
        body = self._ask("/query [new]", {"message": _new_message()})
        if body is not None:
            self.session_id, self.turns = body["session_id"], 1

    @task(WEIGHT_FOLLOWUP)
    def follow_up(self) -> None:
        if self.session_id is None or self.turns >= FOLLOWUP_TURNS:
            self.new_conversation()
            return
        self.turns += 1
        payload = {"message": _follow_up_message(self.turns), "session_id": self.session_id}
        if self._ask("/query [follow-up]", payload) is None:
            self.session_id = None  # start afresh rather than hammer a broken session

    @task(WEIGHT_CACHED)
    def cached_question(self) -> None:
        self._ask("/query [cached]", {"message": random.choice(CACHED_QUESTIONS)})

    @task(WEIGHT_SECURE)
    def secure_query(self) -> None:
        subject = random.choice(list(self.tokens))
        headers = {"Authorization": f"Bearer {self.tokens[subject]}"}
        session_id, turns = self.secure_sessions.get(subject, (None, 0))
        payload: dict[str, Any]
        if session_id is None or turns >= FOLLOWUP_TURNS or random.random() < 0.3:
            payload, turns = {"message": _new_message()}, 1
        else:
            turns += 1
            payload = {"message": _follow_up_message(turns), "session_id": session_id}
        body = self._ask("/secure-query", payload, path="/secure-query", headers=headers)
        if body is None:
            self.secure_sessions.pop(subject, None)
        else:
            self.secure_sessions[subject] = (body["session_id"], turns)

    @task(WEIGHT_TOOLS)
    def tools_agent(self) -> None:
        # Mostly the fixed question (cached after its first answer), sometimes new numbers
        # so that the agent's tool loop (two LLM calls and the calculator) runs too.
        a, b = (12, 7) if random.random() < 0.5 else (random.randint(2, 99), random.randint(2, 99))
        payload = {"message": f"What is {a}*{b}?", "agent": "tools"}
        with self.client.post(
            "/query", json=payload, name="/query [tools]", catch_response=True
        ) as response:
            body = _check_answer(response)
            if body is None:
                return
            steps = body.get("steps")
            if not body.get("cached") and not (
                isinstance(steps, list)
                and any(
                    isinstance(step, dict)
                    and step.get("tool") == "calculator"
                    and not step.get("is_error")
                    for step in steps
                )
            ):
                response.failure(f"the tools agent did not use the calculator: {steps!r}")

    @task(WEIGHT_READY)
    def ready(self) -> None:
        with self.client.get("/ready", name="/ready", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_error_text(response))
                return
            try:
                status = response.json().get("status")
            except ValueError:
                status = None
            if status != "ready":
                response.failure(f"/ready said {status!r}")


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust: untyped
def _check_secret(environment: Environment, **_: Any) -> None:
    """Fail fast (before any user starts) when no token can be minted."""
    try:
        mint_token(Settings(), "load-user-probe")
    except ValueError as exc:
        sys.exit(f"locustfile: cannot mint tokens for /secure-query: {exc}")


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _enforce_thresholds(environment: Environment, **_: Any) -> None:
    """Exit code 1, with the reasons, when the run missed LOAD_MAX_FAILURE_RATIO or
    LOAD_MAX_P95_MS (or the locustfile itself crashed); 0 otherwise."""
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the aggregated numbers
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0.0
    problems = []
    if total.num_requests == 0:
        problems.append("no requests were made")
    if total.fail_ratio > MAX_FAILURE_RATIO:
        problems.append(
            f"failure ratio {total.fail_ratio:.2%} ({total.num_failures} of "
            f"{total.num_requests}) > LOAD_MAX_FAILURE_RATIO {MAX_FAILURE_RATIO:.2%}"
        )
    if p95 > MAX_P95_MS:
        problems.append(f"p95 {p95:.0f} ms > LOAD_MAX_P95_MS {MAX_P95_MS:.0f} ms")
    runner = environment.runner
    if runner is not None and runner.exceptions:
        problems.append(f"{len(runner.exceptions)} exception(s) in the locustfile")
    if locust_log.unhandled_greenlet_exception:
        problems.append("an unhandled greenlet exception")
    summary = (
        f"{total.num_requests} requests, {total.num_failures} failures "
        f"({total.fail_ratio:.2%}), p50 {total.median_response_time:.0f} ms, "
        f"p95 {p95:.0f} ms, {total.total_rps:.1f} req/s"
    )
    if problems:
        print(f"load test FAILED: {'; '.join(problems)} [{summary}]", file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print(f"load test passed: {summary}", file=sys.stderr)
        environment.process_exit_code = 0


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Event in a body's lines; comments (`: ping`) and
    fields other than `event` and `data` are skipped."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class StreamError(Exception):
    """A stream that ended in an `error` event, or without `done`."""


class StreamingUser(HttpUser):
    """A caller of streamed answers. It reads each stream to its end over requests (which
    hands over each chunk as it arrives; FastHttpUser's reader waits for whole blocks) and
    reports three entries: `/query [stream]` (POST, to the response headers), and as type
    SSE `/query [stream] first delta` (to the first `delta` event) and `/query [stream]
    whole` (to `done`; a failure on an `error` event or a stream without `done`)."""

    abstract = WEIGHT_STREAMING_USER == 0
    weight = max(WEIGHT_STREAMING_USER, 1)
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)

    def _report(self, name: str, started: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task
    def streamed_answer(self) -> None:
        started = time.perf_counter()
        payload = {"message": _new_message(), "stream": True}
        with self.client.post(
            "/query", json=payload, name="/query [stream]", stream=True, timeout=30.0,
            catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(_error_text(response))
                return
            length, first_delta = 0, True
            error: StreamError | None = StreamError("the stream ended without `done`")
            try:
                for event, data in sse_events(response.iter_lines(decode_unicode=True)):
                    length += len(data)
                    if event == "delta" and first_delta:
                        first_delta = False
                        self._report("/query [stream] first delta", started, length, None)
                    elif event == "error":  # the last event, as `done` is
                        error = StreamError(f"error event: {data[:200]}")
                    elif event == "done":
                        answer = json.loads(data).get("answer")
                        ok = isinstance(answer, str) and answer
                        error = None if ok else StreamError("`done` without an answer")
            except (OSError, ValueError) as exc:  # the connection broke, or bad JSON
                error = StreamError(f"reading the stream failed: {exc!r}")
            self._report("/query [stream] whole", started, length, error)
