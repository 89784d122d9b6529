"""Issue 4 through the HTTP API: cache, JWT on /secure-query, ownership, limits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.security.jwt import mint_token
from tests.conftest import make_settings, running_app
from tests.support.processes import unused_port
from tests.support.redisserver import RedisServer

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-0123456789-abcdefgh"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from app.storage.db import upgrade_to_head

    url = f"sqlite+aiosqlite:///{tmp_path / 'secure.db'}"
    upgrade_to_head(url)
    return url


def settings_for(database_url: str, redis_url: str | None, prefix: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "jwt_secret": SECRET,
    }
    values.update(extra)
    return make_settings(**values)


def app_with(
    database_url: str, redis_url: str | None, prefix: str, **extra: Any
) -> AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]:
    return running_app(settings_for(database_url, redis_url, prefix, **extra))


def bearer(settings: Settings, sub: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, sub, **kwargs)}"}


@pytest.fixture
async def redis_app(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, Settings]]:
    settings = settings_for(sqlite_url, redis_url, redis_prefix)
    async with running_app(settings) as (app, client):
        yield app, client, settings


def sim_calls(app: FastAPI) -> int:
    return int(app.state.runtime.gateway.simulator.calls)


# --- cache ------------------------------------------------------------------------------


async def test_hit_after_miss_with_the_same_context(redis_app: Any) -> None:
    app, client, _ = redis_app
    first = await client.post("/query", json={"message": "What is a cache?"})
    second = await client.post("/query", json={"message": "  What is   a cache? "})
    assert first.headers["x-cache"] == "MISS"
    assert first.json()["cached"] is False
    assert second.headers["x-cache"] == "HIT"
    assert second.json()["cached"] is True
    assert second.json()["answer"] == first.json()["answer"]
    assert second.json()["usage"]["total_tokens"] == 0  # nothing was spent on the hit
    assert second.json()["session_id"] != first.json()["session_id"]
    assert sim_calls(app) == 1
    metrics = (await client.get("/metrics")).text
    assert 'agentserve_cache_lookups_total{result="hit"} 1.0' in metrics
    assert 'agentserve_cache_lookups_total{result="miss"} 1.0' in metrics


async def test_miss_after_the_history_changed(redis_app: Any) -> None:
    app, client, _ = redis_app
    a = (await client.post("/query", json={"message": "first question"})).json()
    b = (await client.post("/query", json={"message": "another opening"})).json()
    follow_a = await client.post(
        "/query", json={"message": "and then?", "session_id": a["session_id"]}
    )
    follow_b = await client.post(
        "/query", json={"message": "and then?", "session_id": b["session_id"]}
    )
    assert follow_a.headers["x-cache"] == "MISS"
    assert follow_b.headers["x-cache"] == "MISS"  # same message, different conversation
    assert sim_calls(app) == 4


async def test_no_cache_and_no_store(redis_app: Any) -> None:
    app, client, _ = redis_app
    body = {"message": "fresh please"}
    await client.post("/query", json=body)  # stored
    bypass = await client.post("/query", json=body, headers={"Cache-Control": "no-cache"})
    assert bypass.headers["x-cache"] == "MISS"
    option = await client.post("/query", json={**body, "cache": {"no_cache": True}})
    assert option.headers["x-cache"] == "MISS"
    assert sim_calls(app) == 3

    for headers in (
        {"Cache-Control": "max-age=0"},
        {"Pragma": "no-cache"},
        [("Cache-Control", "max-age=60"), ("Cache-Control", "no-cache")],
    ):
        response = await client.post("/query", json=body, headers=headers)
        assert response.headers["x-cache"] == "MISS", headers

    secret = {"message": "do not keep this"}
    await client.post("/query", json=secret, headers={"Cache-Control": "no-store"})
    again = await client.post("/query", json=secret)
    assert again.headers["x-cache"] == "MISS"  # nothing was stored the first time
    await client.post("/query", json={"message": "nor this", "cache": {"no_store": True}})
    assert (await client.post("/query", json={"message": "nor this"})).headers["x-cache"] == (
        "MISS"
    )


async def test_ttl_expiry(redis_app: Any) -> None:
    _, client, _ = redis_app
    body = {"message": "short lived", "cache": {"ttl": 1}}
    await client.post("/query", json=body)
    assert (await client.post("/query", json=body)).headers["x-cache"] == "HIT"
    await asyncio.sleep(1.3)
    assert (await client.post("/query", json=body)).headers["x-cache"] == "MISS"


async def test_single_flight_makes_one_upstream_call(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    async with app_with(sqlite_url, redis_url, redis_prefix, sim_latency_ms=200) as (app, client):
        responses = await asyncio.gather(
            *(client.post("/query", json={"message": "everyone asks this"}) for _ in range(10))
        )
        assert [r.status_code for r in responses] == [200] * 10
        assert sim_calls(app) == 1
        assert sum(r.json()["cached"] for r in responses) == 9
        # every caller got a session of its own with the complete turn
        assert len({r.json()["session_id"] for r in responses}) == 10


async def test_single_flight_across_two_replicas(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    one = app_with(sqlite_url, redis_url, redis_prefix, sim_latency_ms=300)
    two = app_with(sqlite_url, redis_url, redis_prefix, sim_latency_ms=300)
    async with one as (app_a, client_a), two as (app_b, client_b):
        body = {"message": "asked on both replicas"}
        a, b = await asyncio.gather(
            client_a.post("/query", json=body), client_b.post("/query", json=body)
        )
        assert a.status_code == b.status_code == 200
        assert sim_calls(app_a) + sim_calls(app_b) == 1


async def test_cache_is_scoped_per_subject(redis_app: Any) -> None:
    app, client, settings = redis_app
    alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
    body = {"message": "what is on my calendar?"}
    first = await client.post("/secure-query", json=body, headers=alice)
    other = await client.post("/secure-query", json=body, headers=bob)
    again = await client.post("/secure-query", json=body, headers=alice)
    anonymous = await client.post("/query", json=body)
    assert first.headers["x-cache"] == "MISS"
    assert other.headers["x-cache"] == "MISS"
    assert again.headers["x-cache"] == "HIT"
    assert anonymous.headers["x-cache"] == "MISS"
    assert sim_calls(app) == 3


async def test_shared_agent_shares_across_subjects(
    sqlite_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "agents:\n  - name: assistant\n    instructions: x\n    cache_shared: true\n",
        encoding="utf-8",
    )
    async with app_with(sqlite_url, redis_url, redis_prefix, agents_file=agents) as (_, client):
        settings = settings_for(sqlite_url, redis_url, redis_prefix)
        body = {"message": "public facts"}
        await client.post("/secure-query", json=body, headers=bearer(settings, "alice"))
        bob = await client.post("/secure-query", json=body, headers=bearer(settings, "bob"))
        assert bob.headers["x-cache"] == "HIT"


async def test_a_cache_hit_is_recorded_in_the_session(redis_app: Any) -> None:
    _, client, settings = redis_app
    alice = bearer(settings, "alice")
    body = {"message": "remember this"}
    await client.post("/secure-query", json=body, headers=alice)
    hit = await client.post("/secure-query", json=body, headers=alice)
    assert hit.json()["cached"] is True
    detail = await client.get(f"/sessions/{hit.json()['session_id']}", headers=alice)
    assert detail.status_code == 200
    messages = detail.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "remember this"
    assert messages[1]["content"] == hit.json()["answer"]
    assert messages[1]["request_id"] == hit.headers["x-request-id"]


async def test_delete_erases_the_session_and_its_cache_entries(redis_app: Any) -> None:
    app, client, settings = redis_app
    alice = bearer(settings, "alice")
    first = await client.post("/secure-query", json={"message": "private"}, headers=alice)
    sid = first.json()["session_id"]
    deleted = await client.delete(f"/sessions/{sid}", headers=alice)
    assert deleted.status_code == 204
    assert (await client.get(f"/sessions/{sid}", headers=alice)).status_code == 404
    again = await client.post("/secure-query", json={"message": "private"}, headers=alice)
    assert again.headers["x-cache"] == "MISS"
    assert sim_calls(app) == 2


# --- Redis slow or down -----------------------------------------------------------------


async def test_redis_down_never_fails_a_request(sqlite_url: str, redis_prefix: str) -> None:
    url = f"redis://127.0.0.1:{unused_port()}/0"
    async with app_with(sqlite_url, url, redis_prefix) as (_, client):
        for i in range(12):
            started = time.perf_counter()
            response = await client.post("/query", json={"message": f"no redis {i % 3}"})
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.text
            assert response.headers["x-cache"] == "MISS"
            # lookup + lock + store, each bounded by the 0.1 s socket timeout, then the breaker
            assert elapsed < 1.0
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["cache"]["status"] == "degraded"
        metrics = (await client.get("/metrics")).text
        assert "agentserve_redis_degraded 1.0" in metrics
        assert "agentserve_redis_errors_total" in metrics


async def test_caching_resumes_after_a_redis_restart(sqlite_url: str, redis_prefix: str) -> None:
    with RedisServer() as server:
        settings = settings_for(
            sqlite_url, server.url, redis_prefix, redis_breaker_open_seconds=0.3
        )
        async with running_app(settings) as (_, client):
            body = {"message": "survive an outage"}
            await client.post("/query", json=body)
            assert (await client.post("/query", json=body)).headers["x-cache"] == "HIT"

            server.stop()
            for _ in range(8):
                started = time.perf_counter()
                response = await client.post("/query", json=body)
                assert response.status_code == 200
                assert time.perf_counter() - started < 1.0
            assert (await client.get("/ready")).json()["checks"]["cache"]["status"] == "degraded"

            server.start()  # empty again: the first request stores, the next one hits
            await asyncio.sleep(0.4)
            statuses = []
            for _ in range(6):
                response = await client.post("/query", json=body)
                statuses.append(response.headers["x-cache"])
                await asyncio.sleep(0.1)
            assert "HIT" in statuses
            assert (await client.get("/ready")).json()["checks"]["cache"]["status"] == "ok"


# --- JWT on /secure-query -----------------------------------------------------------------


async def test_secure_query_requires_a_valid_token(redis_app: Any) -> None:
    _, client, settings = redis_app
    missing = await client.post("/secure-query", json={"message": "hi"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"]

    forged = await client.post(
        "/secure-query",
        json={"message": "hi"},
        headers={"Authorization": "Bearer abc.def.ghi"},
    )
    assert forged.status_code == 401
    assert forged.json()["error"]["code"] == "invalid_token"
    assert 'error="invalid_token"' in forged.headers["www-authenticate"]

    no_scope = await client.post(
        "/secure-query", json={"message": "hi"}, headers=bearer(settings, "a", scopes=["other"])
    )
    assert no_scope.status_code == 403
    assert no_scope.json()["error"]["code"] == "insufficient_scope"

    ok = await client.post("/secure-query", json={"message": "hi"}, headers=bearer(settings, "a"))
    assert ok.status_code == 200


async def test_agents_claim_limits_the_agents(redis_app: Any) -> None:
    _, client, settings = redis_app
    only_assistant = bearer(settings, "carol", agents=["assistant"])
    denied = await client.post(
        "/secure-query", json={"message": "2+2", "agent": "tools"}, headers=only_assistant
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "agent_forbidden"
    allowed = await client.post("/secure-query", json={"message": "hi"}, headers=only_assistant)
    assert allowed.status_code == 200


async def test_swagger_offers_the_bearer_scheme(redis_app: Any) -> None:
    _, client, _ = redis_app
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"bearer": []} in spec["paths"]["/secure-query"]["post"]["security"]
    assert "security" not in spec["paths"]["/query"]["post"]


# --- ownership --------------------------------------------------------------------------


async def test_only_the_owner_can_read_continue_or_delete(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    async with app_with(database_url, redis_url, redis_prefix) as (_, client):
        settings = settings_for(database_url, redis_url, redis_prefix)
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        started = await client.post("/secure-query", json={"message": "mine"}, headers=alice)
        sid = started.json()["session_id"]

        def is_404(response: httpx.Response) -> None:
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "session_not_found"

        is_404(await client.get(f"/sessions/{sid}", headers=bob))
        is_404(
            await client.post(
                "/secure-query", json={"message": "theirs?", "session_id": sid}, headers=bob
            )
        )
        is_404(await client.delete(f"/sessions/{sid}", headers=bob))
        is_404(await client.post("/query", json={"message": "anon", "session_id": sid}))

        own = await client.post(
            "/secure-query", json={"message": "still mine", "session_id": sid}, headers=alice
        )
        assert own.status_code == 200
        listing = (await client.get("/sessions", headers=alice)).json()
        assert [s["id"] for s in listing["sessions"]] == [sid]
        assert listing["sessions"][0]["message_count"] == 4
        assert (await client.get("/sessions", headers=bob)).json()["sessions"] == []
        assert (await client.delete(f"/sessions/{sid}", headers=alice)).status_code == 204


async def test_an_anonymous_session_cannot_be_adopted(redis_app: Any) -> None:
    _, client, settings = redis_app
    anonymous = await client.post("/query", json={"message": "nobody's"})
    sid = anonymous.json()["session_id"]
    adopt = await client.post(
        "/secure-query",
        json={"message": "now mine", "session_id": sid},
        headers=bearer(settings, "mallory"),
    )
    assert adopt.status_code == 404
    assert (
        await client.get(f"/sessions/{sid}", headers=bearer(settings, "mallory"))
    ).status_code == (404)


async def test_sessions_are_paginated(redis_app: Any) -> None:
    _, client, settings = redis_app
    dave = bearer(settings, "dave")
    for i in range(5):
        await client.post("/secure-query", json={"message": f"topic {i}"}, headers=dave)
    page1 = (await client.get("/sessions?limit=2", headers=dave)).json()
    page2 = (await client.get("/sessions?limit=2&offset=2", headers=dave)).json()
    page3 = (await client.get("/sessions?limit=2&offset=4", headers=dave)).json()
    ids = [s["id"] for p in (page1, page2, page3) for s in p["sessions"]]
    assert len(ids) == len(set(ids)) == 5
    assert page1["next_offset"] == 2
    assert page3["next_offset"] is None
    assert page2["next_offset"] == 4
    sid = ids[0]
    detail = (await client.get(f"/sessions/{sid}?limit=1&offset=1", headers=dave)).json()
    assert detail["next_offset"] is None  # 2 messages: offset 1 + 1 is the end
    bad = await client.get("/sessions?limit=0", headers=dave)
    assert bad.status_code == 422


async def test_query_can_be_switched_off(sqlite_url: str, redis_prefix: str) -> None:
    async with app_with(sqlite_url, None, redis_prefix, anonymous_query_enabled=False) as (
        _,
        client,
    ):
        assert (await client.post("/query", json={"message": "hi"})).status_code == 404
        settings = settings_for(sqlite_url, None, redis_prefix)
        ok = await client.post(
            "/secure-query", json={"message": "hi"}, headers=bearer(settings, "x")
        )
        assert ok.status_code == 200


async def test_session_size_is_capped(sqlite_url: str, redis_prefix: str) -> None:
    async with app_with(sqlite_url, None, redis_prefix, session_max_messages=4) as (_, client):
        sid = (await client.post("/query", json={"message": "one"})).json()["session_id"]
        await client.post("/query", json={"message": "two", "session_id": sid})
        full = await client.post("/query", json={"message": "three", "session_id": sid})
        assert full.status_code == 422
        assert full.json()["error"]["code"] == "session_full"


# --- rate limits --------------------------------------------------------------------------


async def test_rate_limit_holds_across_two_instances(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    extra = {"rate_limit_query": "3/2 seconds", "cache_enabled": False}
    async with (
        app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, a),
        app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, b),
    ):
        first = await a.post("/query", json={"message": "1"})
        assert first.headers["ratelimit-limit"] == "3"
        assert first.headers["ratelimit-remaining"] == "2"
        await b.post("/query", json={"message": "2"})
        await a.post("/query", json={"message": "3"})
        limited = await b.post("/query", json={"message": "4"})
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["ratelimit-remaining"] == "0"
        assert int(limited.headers["ratelimit-reset"]) >= 1
        await asyncio.sleep(float(limited.headers["retry-after"]) + 0.2)
        assert (await a.post("/query", json={"message": "5"})).status_code == 200


async def test_rate_limit_metric_uses_the_route_template(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    extra = {"rate_limit_secure_query": "1/minute"}
    async with app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, client):
        auth = bearer(settings_for(sqlite_url, redis_url, redis_prefix), "frank")
        for _ in range(3):
            await client.get(f"/sessions/{uuid.uuid4()}", headers=auth)
        metrics = (await client.get("/metrics")).text
    assert 'agentserve_rate_limited_total{kind="rate",route="/sessions/{session_id}"} 2.0' in (
        metrics
    )


async def test_limits_are_per_subject_and_per_ip(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    extra = {
        "rate_limit_secure_query": "1/minute",
        "rate_limit_query": "1/minute",
        "forwarded_allow_ips": "192.0.2.1",  # the test peer 127.0.0.1 is not a trusted proxy
    }
    async with app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, client):
        settings = settings_for(sqlite_url, redis_url, redis_prefix)
        a, b = bearer(settings, "a"), bearer(settings, "b")
        assert (
            await client.post("/secure-query", json={"message": "x"}, headers=a)
        ).status_code == 200
        assert (
            await client.post("/secure-query", json={"message": "x"}, headers=a)
        ).status_code == 429
        assert (
            await client.post("/secure-query", json={"message": "x"}, headers=b)
        ).status_code == 200
        # X-Forwarded-For is ignored from an untrusted peer: both count against the same IP
        spoof = {"X-Forwarded-For": "203.0.113.9"}
        assert (
            await client.post("/query", json={"message": "y"}, headers=spoof)
        ).status_code == 200
        assert (await client.post("/query", json={"message": "y"})).status_code == 429


async def test_concurrency_cap_per_ip(sqlite_url: str, redis_url: str, redis_prefix: str) -> None:
    extra = {"concurrency_limit_query": 2, "sim_latency_ms": 300, "cache_enabled": False}
    async with app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/query", json={"message": f"c{i}"}) for i in range(4))
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429]


async def test_trusted_proxy_forwarded_for_is_used(
    sqlite_url: str, redis_url: str, redis_prefix: str
) -> None:
    # the ASGI test transport's peer is 127.0.0.1, trusted by default
    extra = {"rate_limit_query": "1/minute"}
    async with app_with(sqlite_url, redis_url, redis_prefix, **extra) as (_, client):
        one = {"X-Forwarded-For": "198.51.100.1"}
        two = {"X-Forwarded-For": "198.51.100.2"}
        assert (await client.post("/query", json={"message": "p"}, headers=one)).status_code == 200
        assert (await client.post("/query", json={"message": "p"}, headers=one)).status_code == 429
        assert (await client.post("/query", json={"message": "p"}, headers=two)).status_code == 200
