"""The HTTP API end to end (lifespan running), on SQLite and on the real Postgres."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from app.storage.models import ChatMessage, ChatSession
from tests.conftest import AppFactory, write_agents

pytestmark = pytest.mark.integration


async def total_rows(database_url: str) -> tuple[int, int]:
    """(sessions, messages) in the whole database; tests run one at a time."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            sessions = await conn.scalar(select(func.count()).select_from(ChatSession))
            messages = await conn.scalar(select(func.count()).select_from(ChatMessage))
            return int(sessions or 0), int(messages or 0)
    finally:
        await engine.dispose()


async def count_rows(database_url: str, session_id: str) -> tuple[int, int]:
    """(sessions, messages) stored for one session id, read with a separate engine."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            sid = uuid.UUID(session_id)
            sessions = await conn.scalar(
                select(func.count()).select_from(ChatSession).where(ChatSession.id == sid)
            )
            messages = await conn.scalar(
                select(func.count()).select_from(ChatMessage).where(ChatMessage.session_id == sid)
            )
            return int(sessions or 0), int(messages or 0)
    finally:
        await engine.dispose()


async def roles(database_url: str, session_id: str) -> list[str]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(ChatMessage.role)
                .where(ChatMessage.session_id == uuid.UUID(session_id))
                .order_by(ChatMessage.seq)
            )
            return [row[0] for row in result]
    finally:
        await engine.dispose()


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


async def test_two_turn_conversation_is_stored(app_factory: AppFactory, database_url: str) -> None:
    async with app_factory() as (_, client):
        first = await client.post("/query", json={"message": "Hello, who are you?"})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["model"] == "simulator"
        assert body["answer"].startswith("[simulator]")
        assert body["agent"] == "assistant"
        assert body["cached"] is False
        assert body["usage"]["total_tokens"] == (
            body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
        assert body["request_id"] == first.headers["x-request-id"]
        session_id = body["session_id"]

        second = await client.post(
            "/query", json={"message": "And what did I just ask?", "session_id": session_id}
        )
        assert second.status_code == 200, second.text
        assert second.json()["session_id"] == session_id
        # the second call carried the first turn as history, so the prompt is longer
        assert second.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]

    sessions, messages = await count_rows(database_url, session_id)
    assert sessions == 1
    assert messages == 4
    assert await roles(database_url, session_id) == ["user", "assistant", "user", "assistant"]


async def test_tool_turn_stores_every_step(app_factory: AppFactory, database_url: str) -> None:
    async with app_factory() as (_, client):
        response = await client.post(
            "/query",
            json={"message": "What is (12+30)*2 and the time in Europe/Paris?", "agent": "tools"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [step["tool"] for step in body["steps"]] == ["calculator", "current_time"]
    assert body["steps"][0]["result"] == "84"
    assert "84" in body["answer"]
    assert await roles(database_url, body["session_id"]) == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]


async def test_failed_llm_call_leaves_no_partial_turn(
    app_factory: AppFactory, database_url: str
) -> None:
    async with app_factory() as (app, client):
        ok = await client.post("/query", json={"message": "first turn"})
        session_id = ok.json()["session_id"]
        simulator = app.state.runtime.gateway.simulator
        simulator.knobs = simulator.knobs.updated({"error_rate": 1.0, "error_status": 503})

        failed = await client.post("/query", json={"message": "second", "session_id": session_id})
        error = assert_error_shape(failed, 503, "llm_unavailable")
        assert int(failed.headers["retry-after"]) >= 1
        assert "retry" in error["message"]

        before = await total_rows(database_url)
        new_failed = await client.post("/query", json={"message": "a new conversation"})
        assert_error_shape(new_failed, 503, "llm_unavailable")
        assert await total_rows(database_url) == before  # no session, no message

    assert await count_rows(database_url, session_id) == (1, 2)


async def test_unknown_session_and_agent_are_404(client: httpx.AsyncClient) -> None:
    missing = await client.post("/query", json={"message": "hi", "session_id": str(uuid.uuid4())})
    assert_error_shape(missing, 404, "session_not_found")
    agent = await client.post("/query", json={"message": "hi", "agent": "nobody"})
    error = assert_error_shape(agent, 404, "agent_not_found")
    assert "assistant" in error["message"]


async def test_continuing_with_another_agent_is_refused(client: httpx.AsyncClient) -> None:
    first = await client.post("/query", json={"message": "hi"})
    mismatch = await client.post(
        "/query",
        json={"message": "hi", "session_id": first.json()["session_id"], "agent": "tools"},
    )
    assert_error_shape(mismatch, 422, "agent_mismatch")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"message": ""}, "message"),
        ({"message": "   "}, "blank"),
        ({}, "message"),
        ({"message": 42}, "message"),
        ({"message": "hi", "session_id": "not-a-uuid"}, "session_id"),
        ({"message": "hi", "agent": "Bad Agent!"}, "agent"),
        ({"message": "hi", "unexpected": True}, "unexpected"),
        ({"message": "x" * 20_000}, "at most"),
        ({"message": "hi", "metadata": {"blob": "y" * 5000}}, "metadata"),
    ],
)
async def test_validation_errors_have_the_json_shape(
    client: httpx.AsyncClient, payload: dict[str, Any], fragment: str
) -> None:
    response = await client.post("/query", json=payload)
    error = assert_error_shape(response, 422, "validation_error")
    assert fragment in error["message"] + str(error.get("details", ""))


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/query", content=b'{"message": ', headers={"content-type": "application/json"}
    )
    assert_error_shape(response, 422, "validation_error")


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    big = {"message": "hi", "metadata": {"blob": "z" * 70_000}}
    response = await client.post("/query", json=big, headers={"X-Request-ID": "too-big-1"})
    error = assert_error_shape(response, 413, "payload_too_large")
    assert error["request_id"] == "too-big-1"
    assert response.headers["x-request-id"] == "too-big-1"
    assert response.headers["x-instance"]
    assert response.headers["connection"] == "close"
    metrics = (await client.get("/metrics")).text
    assert 'handler="/query",method="POST",status="4xx"' in metrics


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        yield b'{"message": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    response = await client.post(
        "/query", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error_shape(response, 413, "payload_too_large")


async def test_request_id_is_accepted_or_replaced(client: httpx.AsyncClient) -> None:
    mine = await client.post(
        "/query", json={"message": "hi"}, headers={"X-Request-ID": "client-abc.123"}
    )
    assert mine.headers["x-request-id"] == "client-abc.123"
    assert mine.json()["request_id"] == "client-abc.123"
    hostile = await client.post(
        "/query", json={"message": "hi"}, headers={"X-Request-ID": "bad id <script>"}
    )
    assert hostile.headers["x-request-id"] != "bad id <script>"
    assert len(hostile.headers["x-request-id"]) == 32  # a fresh uuid4 hex
    assert hostile.json()["request_id"] == hostile.headers["x-request-id"]


async def test_concurrent_turns_on_one_session_get_409(app_factory: AppFactory) -> None:
    async with app_factory(sim_latency_ms=200) as (_, client):
        first = await client.post("/query", json={"message": "start"})
        session_id = first.json()["session_id"]
        a, b = await asyncio.gather(
            client.post("/query", json={"message": "one", "session_id": session_id}),
            client.post("/query", json={"message": "two", "session_id": session_id}),
        )
    statuses = sorted([a.status_code, b.status_code])
    assert statuses == [200, 409]
    busy = a if a.status_code == 409 else b
    assert_error_shape(busy, 409, "session_busy")
    assert busy.headers["retry-after"] == "1"


async def test_saturated_pool_answers_503_with_retry_after(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    agents = write_agents(
        tmp_path / "agents.yaml",
        "agents:\n  - name: assistant\n    instructions: be brief\n    pool_size: 1\n",
    )
    async with app_factory(
        agents_file=agents, sim_latency_ms=300, pool_acquire_timeout=0.05, pool_max_waiting=1
    ) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/query", json={"message": f"m{i}"}) for i in range(4))
        )
        metrics = (await client.get("/metrics")).text
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 1
    assert codes.count(503) == 3
    for response in responses:
        if response.status_code == 503:
            assert_error_shape(response, 503, "agent_pool_exhausted")
            assert int(response.headers["retry-after"]) >= 1
    assert 'agentserve_agent_pool_rejections_total{agent="assistant",reason="queue_full"}' in (
        metrics
    )
    assert 'agentserve_agent_pool_rejections_total{agent="assistant",reason="timeout"}' in metrics


async def test_request_deadline_is_504_and_stores_nothing(
    app_factory: AppFactory, database_url: str
) -> None:
    async with app_factory(sim_hang=True, request_timeout=0.3, llm_timeout=5) as (_, client):
        before = await total_rows(database_url)
        response = await client.post("/query", json={"message": "will hang"})
        assert await total_rows(database_url) == before
    assert_error_shape(response, 504, "deadline_exceeded")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"message": "hi \\u0000 there"}', "NUL"),
        (b'{"message": "hi", "metadata": {"a": NaN}}', "finite"),
        (b'{"message": "hi", "metadata": {"a": 1e400}}', "finite"),
        (b'{"message": "hi", "metadata": {"a": 100000000000000000000000000000}}', "64 bits"),
        (b'{"message": "hi", "metadata": {"k\\u0000": 1}}', "NUL"),
        (b'{"message": "hi", "metadata": {"k": "\\udfff"}}', "surrogate"),
        (b'{"message": "hi", "metadata": {"\\ud800": 1}}', "surrogate"),
    ],
)
async def test_values_no_database_can_store_are_422(
    client: httpx.AsyncClient, raw: bytes, fragment: str
) -> None:
    response = await client.post(
        "/query", content=raw, headers={"content-type": "application/json"}
    )
    error = assert_error_shape(response, 422, "validation_error")
    assert fragment in error["message"]


async def test_database_down_is_503_with_retry_after(tmp_path: Path) -> None:
    from tests.conftest import make_settings, running_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nothing", db_pool_timeout=1
    )
    async with running_app(settings) as (_, client):
        response = await client.post("/query", json={"message": "is anyone there?"})
        continued = await client.post(
            "/query", json={"message": "hello?", "session_id": str(uuid.uuid4())}
        )
        ready = await client.get("/ready")
    assert_error_shape(response, 503, "database_unavailable")
    assert_error_shape(continued, 503, "database_unavailable")
    assert int(response.headers["retry-after"]) >= 1
    assert ready.status_code == 503


async def test_a_session_deleted_by_another_replica_mid_turn_leaves_no_cache_entry(
    app_factory: AppFactory,
) -> None:
    async with app_factory(sim_latency_ms=400) as (app, client):
        runtime = app.state.runtime
        sid = (await client.post("/query", json={"message": "start"})).json()["session_id"]
        turn = asyncio.create_task(
            client.post("/query", json={"message": "more", "session_id": sid})
        )
        await asyncio.sleep(0.15)
        # another replica erases it: rows and cache entries, without this one knowing
        await runtime.turns.delete(uuid.UUID(sid))
        await runtime.cache.forget_session(sid)
        response = await turn
        assert_error_shape(response, 404, "session_not_found")
        assert await runtime.cache.forget_session(sid) == 0  # the turn's entry went too


async def test_deleting_a_busy_session_is_409(app_factory: AppFactory) -> None:
    from app.security.jwt import mint_token
    from tests.conftest import make_settings

    secret = "delete-while-busy-secret-0123456789abcdef"
    async with app_factory(sim_latency_ms=400, jwt_secret=secret) as (_, client):
        token = mint_token(make_settings(jwt_secret=secret), "erin")
        auth = {"Authorization": f"Bearer {token}"}
        first = await client.post("/secure-query", json={"message": "start"}, headers=auth)
        sid = first.json()["session_id"]
        turn = asyncio.create_task(
            client.post("/secure-query", json={"message": "more", "session_id": sid}, headers=auth)
        )
        await asyncio.sleep(0.15)
        deleted = await client.delete(f"/sessions/{sid}", headers=auth)
        assert_error_shape(deleted, 409, "session_busy")
        assert (await turn).status_code == 200
        assert (await client.delete(f"/sessions/{sid}", headers=auth)).status_code == 204


async def test_health_ready_and_metrics(app_factory: AppFactory) -> None:
    async with app_factory() as (app, client):
        health = await client.get("/health")
        assert health.json() == {"status": "ok"}
        assert health.headers["x-instance"]  # names the replica (hostname by default)
        ready = await client.get("/ready")
        assert ready.status_code == 200
        checks = ready.json()["checks"]
        assert checks["database"]["status"] == "ok"
        assert checks["database"]["latency_ms"] >= 0
        assert checks["migrations"]["status"] == "ok"
        assert checks["pool:assistant"]["status"] == "ok"
        assert checks["llm:simulator"]["detail"] == "circuit closed"

        await client.post("/query", json={"message": "count me"})
        metrics = (await client.get("/metrics")).text
        for name in (
            "agentserve_llm_calls_total",
            "agentserve_llm_call_duration_seconds_bucket",
            "agentserve_llm_tokens_total",
            "agentserve_circuit_breaker_state",
            "agentserve_agent_pool_size",
            "agentserve_agent_pool_in_use",
            "agentserve_agent_pool_waiting",
            "agentserve_agent_pool_wait_seconds_bucket",
            "agentserve_turns_persisted_total",
            "agentserve_http_requests_total",
        ):
            assert name in metrics, name
        assert (
            'agentserve_llm_calls_total{model="simulator",outcome="success",upstream="simulator"}'
            in metrics
        )

        app.state.lifecycle.draining = True
        draining = await client.get("/ready")
        assert draining.status_code == 503
        assert draining.json()["checks"]["lifecycle"]["detail"] == "shutting down"


async def test_ready_fails_when_migrations_are_behind(tmp_path: Path) -> None:
    from tests.conftest import make_settings, running_app

    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    async with running_app(make_settings(database_url=url)) as (_, client):
        ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["migrations"]["status"] == "fail"


async def test_ready_tolerates_a_newer_schema(tmp_path: Path) -> None:
    """A rolling upgrade migrates first; pods of the previous release must stay ready."""
    from sqlalchemy import text

    from app.storage.db import migrate
    from tests.conftest import make_settings, running_app

    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    await migrate(url)
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    await engine.dispose()
    async with running_app(make_settings(database_url=url)) as (_, client):
        ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["migrations"]["status"] == "degraded"


async def test_an_unexpected_error_is_a_json_500_with_the_request_id(
    app_factory: AppFactory,
) -> None:
    async with app_factory() as (app, client):

        async def broken(_: object) -> None:
            raise RuntimeError("boom: internal detail")

        app.state.runtime.state["query_service"].answer = broken
        response = await client.post(
            "/query", json={"message": "hi"}, headers={"X-Request-ID": "trace-500"}
        )
        metrics = (await client.get("/metrics")).text
    error = assert_error_shape(response, 500, "internal_error")
    assert error["request_id"] == "trace-500"
    assert "boom" not in response.text  # no internals leak
    assert response.headers["x-instance"]
    assert 'status="5xx"' in metrics


async def test_unknown_route_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error_shape(await client.get("/nope"), 404, "not_found")
    assert_error_shape(await client.get("/query"), 405, "method_not_allowed")


async def test_openapi_documents_the_examples(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    query = spec["paths"]["/query"]["post"]
    examples = query["requestBody"]["content"]["application/json"]["examples"]
    assert "tool use" in examples
    for example in examples.values():
        response = await client.post("/query", json=example["value"])
        assert response.status_code == 200, response.text
