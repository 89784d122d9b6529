"""The docker-compose topology without Docker: nginx (the project's nginx.conf, unchanged)
in front of three agentserve replicas sharing this run's Postgres database and Redis, and
asking the LLM simulator over HTTP (its knobs shape a test's answers).

What only several replicas behind the real proxy show: requests spread over the replicas,
a session, a cache entry and a rate limit that follow the caller from replica to replica,
request ids and client addresses through the proxy, /metrics kept inside, streamed answers
passed on event by event, and replicas stopped under load (one for good, then all in turn,
as a deploy does) without a failed request.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis import Redis

from app.config import Settings
from app.security.jwt import mint_token
from tests.stack.nginx import (
    DEPLOY,
    NGINX_CONF,
    Nginx,
    NginxUnavailableError,
    Replica,
    free_port,
    install_nginx,
    server_parameters,
    template_server_parameters,
)
from tests.support.simserver import SimServer, running_simulator

pytestmark = pytest.mark.integration

REPLICAS = 3
"""As many as the compose file's api replicas; no more, on a two-core machine."""
SECURE_QUERY_RATE = 5
"""RATE_LIMIT_SECURE_QUERY per minute: low enough to exceed; every other test that uses
/secure-query or /sessions has a subject of its own and stays below it."""
QUERY_RATE = 100_000
"""RATE_LIMIT_QUERY per minute: the load test sends hundreds of /query from one address."""
START_TIMEOUT = 60.0
SSE_PING_SECONDS = 0.25
"""The replicas' ping interval: short, so that a test sees `: ping` lines through nginx."""
MAX_BODY_BYTES = 64 * 1024
RUN = uuid.uuid4().hex[:8]


@dataclass
class Stack:
    url: str
    nginx: Nginx
    replicas: list[Replica]
    sim: SimServer
    jwt_settings: Settings
    client: httpx.Client = field(repr=False)

    @property
    def instances(self) -> set[str]:
        return {replica.name for replica in self.replicas}

    def auth(self, subject: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.jwt_settings, subject)}"}


@contextlib.contextmanager
def terminal_output(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let the nginx installation print to the terminal (pytest captures output)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
        return
    with capture.global_and_fixture_disabled():
        yield


def replica_env(
    database_url: str, redis_url: str, redis_prefix: str, jwt_secret: str, llm_base_url: str
) -> dict[str, str]:
    # nothing of the outer environment that the app reads (APP_ENV, LLM_*, WORKERS, ...)
    settings = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=redis_prefix,
        JWT_SECRET=jwt_secret,
        LLM_BASE_URL=llm_base_url,
        SSE_PING_SECONDS=str(SSE_PING_SECONDS),
        LOG_LEVEL="WARNING",
        ACCESS_LOG="false",
        DB_AUTO_MIGRATE="false",
        FORWARDED_ALLOW_IPS="127.0.0.1",
        RATE_LIMIT_QUERY=f"{QUERY_RATE}/minute",
        RATE_LIMIT_SECURE_QUERY=f"{SECURE_QUERY_RATE}/minute",
        CONCURRENCY_LIMIT_QUERY="64",
        DRAIN_SECONDS="10",
    )
    return env


def delete_keys(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """The replicas' LLM: the simulator over HTTP, answering at once unless a test turns
    its knobs (see `upstream_knobs`)."""
    with running_simulator() as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    redis_url: str,
    sim: SimServer,
) -> Iterator[Stack]:
    with terminal_output(request):
        try:
            executable = install_nginx(lambda line: print(f"[tests/stack] {line}", flush=True))
        except NginxUnavailableError as exc:
            pytest.fail(f"{exc}", pytrace=False)

    workdir = tmp_path_factory.mktemp("stack")
    prefix = f"agentserve-stack:{os.getpid()}:{RUN}:"
    jwt_secret = secrets.token_urlsafe(48)
    env = replica_env(postgres_url, redis_url, prefix, jwt_secret, sim.base_url)
    replicas = [Replica(f"replica-{n}", env, workdir) for n in range(1, REPLICAS + 1)]
    nginx: Nginx | None = None
    try:
        for replica in replicas:  # all at once: they start in parallel
            replica.start()
        deadline = time.monotonic() + START_TIMEOUT
        for replica in replicas:
            replica.wait_healthy(deadline)
        nginx = Nginx(executable, [replica.address for replica in replicas], workdir / "nginx")
        nginx.start(time.monotonic() + 15)
        assert httpx.get(f"{nginx.url}/health", timeout=10).status_code == 200
        with httpx.Client(base_url=nginx.url, timeout=30) as client:
            yield Stack(
                url=nginx.url,
                nginx=nginx,
                replicas=replicas,
                sim=sim,
                jwt_settings=Settings(_env_file=None, jwt_secret=jwt_secret),
                client=client,
            )
    finally:
        processes: list[Nginx | Replica] = [*([nginx] if nginx else []), *replicas]
        for process in processes:
            process.close()
        delete_keys(redis_url, prefix)
        left = [process.name for process in processes if process.group_alive()]
        assert not left, f"still running after the stack tests: {left}"


def ask(
    client: httpx.Client, message: str, *, headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post("/query", json={"message": message}, headers=headers)


def test_requests_spread_over_all_replicas(stack: Stack) -> None:
    seen: list[str] = []
    for n in range(30):
        response = ask(stack.client, f"spread {RUN} {n}")
        assert response.status_code == 200, response.text
        seen.append(response.headers["X-Instance"])
    assert set(seen) == stack.instances, seen


def test_a_session_continues_on_another_replica(stack: Stack) -> None:
    headers = stack.auth(f"alice-{RUN}")
    first = stack.client.post(
        "/secure-query", json={"message": "Remember the number 7."}, headers=headers
    )
    assert first.status_code == 200, first.text
    session_id = first.json()["session_id"]
    turns = 1
    answer = first
    while answer.headers["X-Instance"] == first.headers["X-Instance"]:
        assert turns < SECURE_QUERY_RATE - 1, "every turn went to the same replica"
        answer = stack.client.post(
            "/secure-query",
            json={"message": "Which number did I mention?", "session_id": session_id},
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        turns += 1
    assert answer.json()["session_id"] == session_id

    detail = stack.client.get(f"/sessions/{session_id}", headers=headers)
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["message_count"] == 2 * turns
    assert len(body["messages"]) == 2 * turns
    assert [m["role"] for m in body["messages"][:2]] == ["user", "assistant"]


def test_a_cache_entry_written_by_one_replica_is_hit_by_another(stack: Stack) -> None:
    message = f"Cache me across replicas {RUN}"
    first = ask(stack.client, message)
    assert first.status_code == 200, first.text
    assert first.headers["X-Cache"] == "MISS"
    for _ in range(REPLICAS * 2):
        again = ask(stack.client, message)
        assert again.status_code == 200, again.text
        if again.headers["X-Instance"] != first.headers["X-Instance"]:
            break
    else:
        pytest.fail("the same question never reached a second replica")
    assert again.headers["X-Cache"] == "HIT"
    assert again.json()["cached"] is True
    assert again.json()["answer"] == first.json()["answer"]


def test_a_rate_limit_holds_across_replicas(stack: Stack) -> None:
    headers = stack.auth(f"limited-{RUN}")
    instances: set[str] = set()
    for n in range(SECURE_QUERY_RATE):
        response = stack.client.post(
            "/secure-query", json={"message": f"limit {n}"}, headers=headers
        )
        assert response.status_code == 200, response.text
        assert response.headers["RateLimit-Remaining"] == str(SECURE_QUERY_RATE - n - 1)
        instances.add(response.headers["X-Instance"])
    assert len(instances) >= 2, instances

    refused = stack.client.post("/secure-query", json={"message": "one more"}, headers=headers)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"


REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def test_a_callers_request_id_comes_back_unchanged(stack: Stack) -> None:
    mine = f"stack-test.{RUN}:42"
    response = ask(stack.client, "Hello", headers={"X-Request-ID": mine})
    assert response.status_code == 200, response.text
    assert response.headers.get_list("X-Request-ID") == [mine]
    assert response.json()["request_id"] == mine


def test_nginx_generates_a_request_id_the_app_uses(stack: Stack) -> None:
    response = ask(stack.client, "Hello")
    assert response.status_code == 200, response.text
    [request_id] = response.headers.get_list("X-Request-ID")
    assert REQUEST_ID.fullmatch(request_id), request_id
    assert response.json()["request_id"] == request_id  # the app saw what nginx sent

    entry = stack.nginx.access_entry(request_id)
    assert entry["status"] == 200
    assert entry["upstream_addr"] in {replica.address for replica in stack.replicas}


def test_an_unusable_request_id_is_replaced(stack: Stack) -> None:
    response = ask(stack.client, "Hello", headers={"X-Request-ID": "no spaces allowed"})
    assert response.status_code == 200, response.text
    [request_id] = response.headers.get_list("X-Request-ID")
    assert REQUEST_ID.fullmatch(request_id), request_id
    assert response.json()["request_id"] == request_id


def test_the_access_log_is_json_with_request_id_and_upstream(stack: Stack) -> None:
    entries = stack.nginx.access_entries()
    assert entries
    for entry in entries:
        assert {"time", "request_id", "status", "upstream_addr", "request_time"} <= set(entry)
        assert entry["request_id"]
    proxied = [e for e in entries if e["uri"] == "/query"]
    assert proxied
    assert all(e["upstream_addr"] for e in proxied)


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/%6Detrics", "//metrics"])
def test_metrics_are_not_served_through_nginx(stack: Stack, path: str) -> None:
    url = httpx.URL(stack.url).copy_with(raw_path=path.encode())  # sent as written
    request_id = f"metrics-{uuid.uuid4().hex}"
    response = stack.client.get(url, headers={"X-Request-ID": request_id})
    assert stack.nginx.access_entry(request_id)["uri"] == path
    assert response.status_code == 404
    assert "X-Instance" not in response.headers  # no replica was asked
    assert response.json()["error"]["code"] == "not_found"
    assert "agentserve_" not in response.text


def test_each_replica_serves_metrics_directly(stack: Stack) -> None:
    for replica in stack.replicas:
        response = httpx.get(f"{replica.url}/metrics", timeout=10)
        assert response.status_code == 200
        assert "agentserve_" in response.text


def test_the_client_address_comes_from_nginx_not_from_the_caller(stack: Stack) -> None:
    """nginx replaces X-Forwarded-For with the peer it sees: a caller cannot choose the
    address its per-IP rate limit counts against (RateLimit-Remaining shows the bucket)."""
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(2):  # at least two hits in 127.0.0.1's bucket
        assert ask(stack.client, "who am I").status_code == 200
    through_nginx = ask(stack.client, "who am I", headers=spoofed)
    assert through_nginx.status_code == 200, through_nginx.text
    # counted in 127.0.0.1's bucket, not in a fresh one for the spoofed address
    assert int(through_nginx.headers["RateLimit-Remaining"]) <= QUERY_RATE - 3

    # the replica does honour the header from a trusted proxy (127.0.0.1): a fresh bucket
    replica = stack.replicas[0]
    direct = httpx.post(
        f"{replica.url}/query", json={"message": "who am I"}, headers=spoofed, timeout=10
    )
    assert direct.status_code == 200, direct.text
    assert int(direct.headers["RateLimit-Remaining"]) == QUERY_RATE - 1


def test_bodies_over_the_limit_are_refused_by_nginx(stack: Stack) -> None:
    too_big = b'{"message": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = stack.client.post(
        "/query", content=too_big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "X-Instance" not in response.headers
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.json()["error"]["request_id"] == response.headers["X-Request-ID"]

    # exactly the limit still reaches a replica (which refuses the message's length)
    padding = MAX_BODY_BYTES - len(b'{"message": ""}')
    at_limit = b'{"message": "' + b"x" * padding + b'"}'
    assert len(at_limit) == MAX_BODY_BYTES
    response = stack.client.post(
        "/query", content=at_limit, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "X-Instance" in response.headers


def test_nginx_answers_in_the_apps_error_shape_when_no_replica_can(
    stack: Stack, tmp_path: Path
) -> None:
    """A second nginx (same nginx.conf) whose only replica address refuses connections."""
    with Nginx(stack.nginx.executable, [f"127.0.0.1:{free_port()}"], tmp_path) as nginx:
        nginx.start(time.monotonic() + 15)
        response = httpx.post(f"{nginx.url}/query", json={"message": "anyone?"}, timeout=10)
    assert response.status_code == 502
    assert response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["code"] == "bad_gateway"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert REQUEST_ID.fullmatch(error["request_id"])


def test_json_is_compressed(stack: Stack) -> None:
    response = stack.client.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.json()["info"]["title"] == "agentserve"


def test_the_compose_upstream_uses_the_tested_server_parameters() -> None:
    """compose/upstream.conf is not run here (`resolve` needs nginx >= 1.27.3): its server
    lines must say what the template tested here says, `resolve` apart."""
    compose = (DEPLOY / "compose" / "upstream.conf").read_text(encoding="utf-8")
    lines = [[p for p in params if p != "resolve"] for params in server_parameters(compose)]
    assert lines == template_server_parameters()
    assert all("resolve" in params for params in server_parameters(compose))


@contextlib.contextmanager
def upstream_knobs(stack: Stack, **knobs: float) -> Iterator[None]:
    """The simulator's knobs for the block (every replica asks it), then an instant LLM."""
    stack.sim.put_knobs(**knobs)
    try:
        yield
    finally:
        stack.sim.put_knobs(latency_ms=0, per_token_latency_ms=0)


@dataclass
class Line:
    at: float
    """Seconds after the request was sent."""
    text: str
    streams_open: int
    """The simulator's streams still being produced when the line arrived."""


def stream(
    stack: Stack,
    message: str,
    *,
    path: str = "/query",
    client: httpx.Client | None = None,
) -> tuple[httpx.Response, list[Line]]:
    """A streamed answer to `message` from /query or, OpenAI's way, /v1/chat/completions
    (with a token of its own: /v1 takes /secure-query's limits), through the stack's nginx
    unless `client` says otherwise. Returns every line of the body, timestamped when this
    plain streaming client read it. httpx asks for gzip, as browsers do."""
    body: dict[str, object] = {"message": message, "stream": True}
    headers: dict[str, str] = {}
    if path.startswith("/v1/"):
        messages = [{"role": "user", "content": message}]
        body = {"model": "assistant", "messages": messages, "stream": True}
        headers = stack.auth(f"v1-{uuid.uuid4().hex}")
    lines: list[Line] = []
    started = time.monotonic()
    with (client or stack.client).stream("POST", path, json=body, headers=headers) as response:
        for text in response.iter_lines():
            now = time.monotonic() - started
            lines.append(Line(now, text, stack.sim.simulator.streams_open))
    return response, lines


def text_deltas(lines: list[Line]) -> list[Line]:
    """The lines that bring answer text: `event: delta` (/query), or an OpenAI chunk whose
    delta has content (/v1/chat/completions)."""
    found = []
    for line in lines:
        if line.text == "event: delta":
            found.append(line)
        elif line.text.startswith("data: {"):
            choices = json.loads(line.text.removeprefix("data: ")).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                found.append(line)
    return found


@pytest.mark.parametrize("path", ["/query", "/v1/chat/completions"])
def test_a_stream_reaches_the_caller_through_nginx_while_the_upstream_produces(
    stack: Stack, path: str
) -> None:
    """About 2 s of tokens upstream (50 ms, then 80 ms a token, ~100 ms between the
    simulator's chunks). Were nginx buffering the response, the first delta would arrive
    with the rest, when the answer is complete."""
    with upstream_knobs(stack, latency_ms=50, per_token_latency_ms=80):
        response, lines = stream(stack, f"Stream this answer through nginx {RUN}", path=path)
    assert response.status_code == 200, response.read()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Instance"] in stack.instances
    assert {"event: done", "data: [DONE]"} & {line.text for line in lines[-3:]}
    ended = lines[-1].at
    assert ended > 1.5, "the simulator did not take its ~2 s"

    deltas = text_deltas(lines)
    assert len(deltas) >= 10
    first = deltas[0]
    assert first.streams_open == 1, "the first delta came after the simulator had finished"
    assert first.at < 0.6
    assert first.at < ended / 4
    # and the others as they were produced, not in a batch at the end
    assert deltas[-1].at - first.at > 1.0
    assert len({round(delta.at, 2) for delta in deltas}) >= len(deltas) // 2


def test_pings_pass_through_nginx_while_the_agent_works(stack: Stack) -> None:
    """Before its first token the stream has only `: ping` comments to send
    (SSE_PING_SECONDS=0.25): each reaches the caller when sent."""
    with upstream_knobs(stack, latency_ms=1500):
        response, lines = stream(stack, f"Ping me through nginx {RUN}")
    assert response.status_code == 200
    first_delta = next(i for i, line in enumerate(lines) if line.text == "event: delta")
    pings = [line for line in lines[:first_delta] if line.text == ": ping"]
    assert len(pings) >= 4, [line.text for line in lines[:first_delta]]
    assert pings[0].at < 0.6
    assert pings[-1].at - pings[0].at > 0.6
    assert lines[first_delta].at > 1.4
    assert any(line.text == "event: done" for line in lines[first_delta:])


def test_a_caller_leaving_mid_stream_stops_the_upstream_through_nginx(stack: Stack) -> None:
    """nginx closes the replica's connection once the caller's is gone (at the latest when
    the next event cannot be written), and the replica cancels the turn: the simulator
    stops producing long before the answer's end (about 3 s of tokens)."""
    with upstream_knobs(stack, per_token_latency_ms=100):
        body = {"message": f"Leave in the middle of this {RUN}", "stream": True}
        with stack.client.stream("POST", "/query", json=body) as response:
            next(line for line in response.iter_lines() if line == "event: delta")
            assert stack.sim.simulator.streams_open == 1
        left = time.monotonic()
        while stack.sim.simulator.streams_open and time.monotonic() - left < 2.0:
            time.sleep(0.02)
        assert stack.sim.simulator.streams_open == 0
        assert time.monotonic() - left < 1.0


def test_a_buffering_nginx_would_hold_the_stream_back(stack: Stack, tmp_path: Path) -> None:
    """The check above can fail: a second nginx whose config differs only where it matters
    (buffered /query, the app's X-Accel-Buffering ignored, SSE compressed) hands the caller
    the first delta only with the last one."""
    config = NGINX_CONF.read_text(encoding="utf-8")
    unbuffered = "proxy_buffering off;"
    assert unbuffered in config
    config = config.replace(
        unbuffered, "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"
    ).replace("gzip_types application/json;", "gzip_types application/json text/event-stream;")
    (tmp_path / "buffering.conf").write_text(config, encoding="utf-8")
    upstreams = [replica.address for replica in stack.replicas]
    with Nginx(
        stack.nginx.executable, upstreams, tmp_path / "nginx", config=tmp_path / "buffering.conf"
    ) as nginx:
        nginx.start(time.monotonic() + 15)
        with (
            httpx.Client(base_url=nginx.url, timeout=30) as client,
            upstream_knobs(stack, latency_ms=50, per_token_latency_ms=20),
        ):
            response, lines = stream(stack, f"Hold this answer back {RUN}", client=client)
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    deltas = text_deltas(lines)
    assert len(deltas) >= 10
    assert deltas[0].streams_open == 0  # the simulator had finished
    assert deltas[-1].at - deltas[0].at < 0.05


@dataclass
class Outcome:
    started: float
    status: int
    instance: str | None
    request_id: str | None = None
    error: str | None = None


class Load:
    """Callers asking /query in a loop, each on its own connection pool, until the block
    ends (and at most `max_requests` each, for at most `max_seconds`)."""

    def __init__(
        self, url: str, *, callers: int = 4, max_requests: int = 2000, max_seconds: float = 60
    ) -> None:
        self.url = url
        self.callers = callers
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _call(self, caller: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for n in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    response = ask(client, f"load {RUN} {caller} {n} {started}")
                except httpx.HTTPError as exc:
                    outcome = Outcome(started, 0, None, error=repr(exc))
                else:
                    outcome = Outcome(
                        started,
                        response.status_code,
                        response.headers.get("X-Instance"),
                        request_id=response.headers.get("X-Request-ID"),
                        error=None if response.status_code == 200 else response.text[:300],
                    )
                with self._lock:
                    self.outcomes.append(outcome)

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status != 200]

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(self.callers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def explain(stack: Stack, failures: list[Outcome]) -> str:
    """The failed requests as nginx logged them, and the end of nginx's error log."""
    ids = {o.request_id for o in failures}
    entries = [e for e in stack.nginx.access_entries() if e["request_id"] in ids]
    return f"{len(failures)} failed: {failures[:3]}\naccess log: {entries[:3]}\n" + (
        stack.nginx.log_tail(15)
    )


def stop_replica(replica: Replica) -> None:
    replica.signal(signal.SIGTERM)
    status = replica.wait(15)
    # uvicorn exits by re-raising the SIGTERM it handled, after draining
    assert status in {0, -signal.SIGTERM}, f"{replica.name}: {status}\n{replica.log_tail()}"


def test_a_replica_stopped_under_load_fails_no_request(stack: Stack) -> None:
    """Four callers keep asking for three seconds; one replica gets SIGTERM after one: it
    drains what it has and closes. nginx retries what could not reach it on another replica
    and marks it down, so every request is answered 200, after the stop by the other two."""
    victim = stack.replicas[-1]
    with Load(stack.url) as load:
        time.sleep(1.0)
        stop_replica(victim)
        exited_at = time.monotonic()
        time.sleep(2.0)

    assert not load.failures(), explain(stack, load.failures())
    before = {o.instance for o in load.outcomes if o.started < exited_at - 0.5}
    after = [o for o in load.outcomes if o.started > exited_at]
    assert victim.name in before
    assert len(after) > 20, "hardly any request was sent after the replica had stopped"
    assert {o.instance for o in after} <= stack.instances - {victim.name}

    # nginx found out by trying: some request went to the stopped replica first and was
    # answered by another one (upstream_addr lists both attempts).
    retried = [e for e in stack.nginx.access_entries() if "," in e["upstream_addr"]]
    assert any(victim.address in e["upstream_addr"] for e in retried)


def test_a_rolling_restart_fails_no_request(stack: Stack) -> None:
    """What a deploy does: each replica in turn is stopped (SIGTERM) and started again,
    seconds apart, under load. No request may fail, neither while a replica is gone nor
    because the restarted ones are still marked down when the next one stops (the `backup`
    server lines). One replica is down at a time: the one the previous test stopped is
    started first."""
    for replica in stack.replicas:
        if not replica.running:
            replica.start()
            replica.wait_healthy(time.monotonic() + START_TIMEOUT)
    with Load(stack.url) as load:
        for replica in stack.replicas:
            time.sleep(0.5)
            stop_replica(replica)
            replica.start()
            replica.wait_healthy(time.monotonic() + START_TIMEOUT)
        time.sleep(0.5)

    assert not load.failures(), explain(stack, load.failures())
    assert len(load.outcomes) > 100
    for replica in stack.replicas:
        assert httpx.get(f"{replica.url}/health", timeout=5).status_code == 200
