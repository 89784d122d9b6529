"""POST /query and /secure-query as Server-Sent Events.

In process (httpx's ASGI transport, on SQLite and Postgres): the events, their order, the
`done` body, cache hits, and the refusals that come as plain JSON before the stream starts.
Over a real socket (uvicorn in a thread, Postgres, Redis, the simulator as an HTTP
upstream): timing, pings, a client that goes away, and the deadline.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.llm.simulator import SimulatorKnobs
from app.main import create_app
from app.security.jwt import mint_token
from tests.conftest import AppFactory, make_settings, wait_until
from tests.support.simserver import SimServer, running_simulator
from tests.support.threaded_server import serve_in_thread

SECRET = "streaming-tests-" + "s" * 32
TOOLS_QUESTION = "What is (12+30)*2 and the time in Europe/Paris?"


@dataclass
class Event:
    event: str
    data: dict[str, Any]


async def read_events(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], **kwargs: Any
) -> tuple[httpx.Response, list[Event]]:
    async with aconnect_sse(client, "POST", url, json=body, **kwargs) as source:
        events = [Event(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]
        return source.response, events


def answer_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")


# --- in process ------------------------------------------------------------------------------


async def test_a_streamed_turn_sends_its_events_in_order(app_factory: AppFactory) -> None:
    async with app_factory() as (app, client):
        response, events = await read_events(
            client, "/query", {"message": TOOLS_QUESTION, "agent": "tools", "stream": True}
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-cache"] == "MISS"
        request_id = response.headers["x-request-id"]

        kinds = [e.event for e in events]
        assert kinds[0] == "start"
        assert kinds[-1] == "done"
        assert kinds.count("tool_call") == 2
        assert kinds.count("tool_result") == 2
        assert kinds.count("delta") >= 2
        # every tool result follows its call, and the answer's text comes after both
        assert max(kinds.index("tool_call"), 0) < kinds.index("tool_result")
        assert kinds.index("delta") > max(i for i, k in enumerate(kinds) if k == "tool_result")

        start, done = events[0].data, events[-1].data
        assert start["agent"] == "tools"
        assert start["request_id"] == request_id
        assert done["session_id"] == start["session_id"]
        assert done["request_id"] == request_id
        assert done["cached"] is False
        assert done["finish_reason"] == "stop"
        assert answer_of(events) == done["answer"]
        assert "calculator returned 84" in done["answer"]
        calls = {e.data["id"]: e.data for e in events if e.event == "tool_call"}
        results = {e.data["id"]: e.data for e in events if e.event == "tool_result"}
        assert calls.keys() == results.keys()
        assert {c["tool"] for c in calls.values()} == {"calculator", "current_time"}
        calculator = next(r for r in results.values() if r["tool"] == "calculator")
        assert calculator["result"] == "84"
        assert calculator["is_error"] is False
        assert [s["tool"] for s in done["steps"]] == ["calculator", "current_time"]

        # the turn is stored when the stream completes, as a JSON turn would be
        record = await app.state.runtime.turns.load(uuid.UUID(done["session_id"]))
        assert record is not None
        assert record.message_count == 5  # user, assistant(tool calls), 2 tools, answer
        assert record.history[-1]["content"] == done["answer"]


async def test_the_done_event_is_the_json_answer(app_factory: AppFactory) -> None:
    async with app_factory() as (_, client):
        body = {"message": "Tell me something, streamed or not."}
        plain = await client.post("/query", json=body, headers={"Cache-Control": "no-store"})
        assert plain.status_code == 200
        _, events = await read_events(client, "/query", {**body, "cache": {"no_cache": True}})
        done = events[-1].data
        differs = {"session_id", "request_id", "latency_ms"}
        expected = {k: v for k, v in plain.json().items() if k not in differs}
        assert {k: v for k, v in done.items() if k not in differs} == expected
        assert set(done) == set(plain.json())


async def test_a_cache_hit_streams_the_cached_answer(app_factory: AppFactory) -> None:
    """httpx-sse sends `Cache-Control: no-store` on every stream (for HTTP caches): the
    response cache still stores the first answer and serves the second."""
    async with app_factory() as (_, client):
        body = {"message": "Stream this twice, please.", "stream": True}
        _, first = await read_events(client, "/query", body)
        response, second = await read_events(client, "/query", body)
        assert response.headers["x-cache"] == "HIT"
        assert second[0].event == "start"
        assert second[-1].event == "done"
        assert second[-1].data["cached"] is True
        assert second[-1].data["answer"] == first[-1].data["answer"]
        assert answer_of(second) == first[-1].data["answer"]
        assert sum(e.event == "delta" for e in second) > 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"message": "hi", "agent": "nope"}, 404, "agent_not_found"),
        ({"message": "hi", "session_id": str(uuid.uuid4())}, 404, "session_not_found"),
        ({"message": "   "}, 422, "validation_error"),
        ({"message": "x" * 20}, 422, "validation_error"),
    ],
)
async def test_refusals_before_the_stream_are_plain_json(
    app_factory: AppFactory, body: dict[str, Any], status: int, code: str
) -> None:
    async with app_factory(max_message_chars=10) as (_, client):
        response = await client.post("/query", json={**body, "stream": True})
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == code


async def test_a_rate_limited_stream_is_a_json_429(app_factory: AppFactory) -> None:
    async with app_factory(rate_limit_query="1/minute") as (_, client):
        first = await client.post("/query", json={"message": "one", "stream": True})
        assert first.status_code == 200
        assert first.headers["ratelimit-limit"] == "1"
        second = await client.post("/query", json={"message": "two", "stream": True})
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "rate_limited"
        assert "retry-after" in second.headers


async def test_secure_query_streams_for_the_tokens_subject(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        token = mint_token(app.state.settings, "alice")
        headers = {"Authorization": f"Bearer {token}"}
        response, events = await read_events(
            client, "/secure-query", {"message": "mine", "stream": True}, headers=headers
        )
        assert response.status_code == 200
        session_id = events[-1].data["session_id"]
        record = await app.state.runtime.turns.load(uuid.UUID(session_id))
        assert record is not None
        assert record.owner == "alice"
        refused = await client.post("/secure-query", json={"message": "x", "stream": True})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"


# --- over a socket ---------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    sim: SimServer
    database_url: str


@contextmanager
def served(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, **overrides: Any
) -> Iterator[Served]:
    """agentserve under uvicorn in a thread, on Postgres and Redis, asking the simulator
    over HTTP; each answer streams 30 tokens 20 ms apart after 50 ms."""
    knobs = SimulatorKnobs(latency_ms=50, per_token_latency_ms=20)
    with running_simulator(knobs) as sim:
        settings = make_settings(
            database_url=postgres_url,
            redis_url=redis_url,
            redis_key_prefix=redis_prefix,
            llm_base_url=sim.base_url,
            **overrides,
        )
        with serve_in_thread(lambda _port: create_app(settings), "agentserve", lifespan="on") as (
            _server,
            port,
        ):
            yield Served(f"http://127.0.0.1:{port}", sim, postgres_url)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def stored_session(database_url: str, session_id: str) -> bool:
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        found = await connection.fetchval(
            "SELECT count(*) FROM sessions WHERE id = $1", uuid.UUID(session_id)
        )
    finally:
        await connection.close()
    return bool(found)


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def pool_in_use(ready: dict[str, Any], agent: str = "assistant") -> int:
    detail = ready["checks"][f"pool:{agent}"]["detail"]  # "0/64 in use, 0 waiting"
    return int(detail.split("/", 1)[0])


LONG_QUESTION = "Please give me a long answer " + "about streaming " * 6


async def test_the_first_delta_arrives_while_the_upstream_is_still_producing(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with served(postgres_url, redis_url, redis_prefix, tmp_path) as svc:
        started = time.monotonic()
        arrivals: list[float] = []
        async with aconnect_sse(
            http, "POST", f"{svc.url}/query", json={"message": LONG_QUESTION, "stream": True}
        ) as source:
            async for sse in source.aiter_sse():
                if sse.event == "delta":
                    arrivals.append(time.monotonic() - started)
        assert len(arrivals) >= 10
        # tokens are 20 ms apart upstream: the first reaches us long before the last
        assert arrivals[-1] - arrivals[0] > 0.2
        assert arrivals[0] < arrivals[-1] / 2


async def test_pings_keep_a_quiet_stream_open(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with served(postgres_url, redis_url, redis_prefix, tmp_path, sse_ping_seconds=0.1) as svc:
        svc.sim.put_knobs(latency_ms=600)
        lines: list[str] = []
        async with http.stream(
            "POST", f"{svc.url}/query", json={"message": "ping me", "stream": True}
        ) as response:
            async for line in response.aiter_lines():
                lines.append(line)
        first_delta = next(i for i, line in enumerate(lines) if line == "event: delta")
        assert lines[:first_delta].count(": ping") >= 3
        assert lines[-3] == "event: done"
        assert lines[-2].startswith("data: ")


async def test_a_client_gone_mid_stream_cancels_the_turn(
    postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with served(postgres_url, redis_url, redis_prefix, tmp_path, concurrency_limit_query=1) as svc:
        svc.sim.put_knobs(per_token_latency_ms=100)  # about 3 s of tokens
        body = {"message": LONG_QUESTION, "stream": True}
        session_id = ""
        async with aconnect_sse(http, "POST", f"{svc.url}/query", json=body) as source:
            async for sse in source.aiter_sse():
                if sse.event == "start":
                    session_id = json.loads(sse.data)["session_id"]
                if sse.event == "delta":
                    break  # and close the connection
        gone = time.monotonic()
        await wait_until(lambda: svc.sim.simulator.streams_open == 0, timeout=1.0)
        assert time.monotonic() - gone < 1.0  # the upstream request was cancelled

        ready = (await http.get(f"{svc.url}/ready")).json()
        assert pool_in_use(ready) == 0
        metrics = (await http.get(f"{svc.url}/metrics")).text
        assert metric(metrics, "agentserve_stream_disconnects_total", 'route="/query"') == 1
        assert not await stored_session(svc.database_url, session_id)

        # the concurrency slot (limit 1) is free again, and nothing was cached
        svc.sim.put_knobs(per_token_latency_ms=0)
        again = await http.post(f"{svc.url}/query", json={"message": LONG_QUESTION})
        assert again.status_code == 200
        assert again.headers["x-cache"] == "MISS"


async def test_the_deadline_covers_the_whole_stream(
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with served(postgres_url, redis_url, redis_prefix, tmp_path, request_timeout=0.6) as svc:
        svc.sim.put_knobs(per_token_latency_ms=100)
        response, events = await read_events(
            http, f"{svc.url}/query", {"message": LONG_QUESTION, "stream": True}
        )
        assert response.status_code == 200
        assert events[0].event == "start"
        assert events[-1].event == "error"
        assert events[-1].data["error"]["code"] == "deadline_exceeded"
        # a failure after the stream started is logged as a JSON 5xx would be
        assert any(r.getMessage().startswith("deadline_exceeded:") for r in caplog.records)
        assert not await stored_session(svc.database_url, events[0].data["session_id"])
