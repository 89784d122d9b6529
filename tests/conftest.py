"""Shared fixtures: a Postgres database of this run's own, SQLite files, app clients.

Postgres and Redis are used for real. When one is not running, the tests that need it fail
with a message saying how to start it (they are never skipped silently, least of all in CI).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.config import Settings
from app.main import create_app
from app.storage.db import migrate, upgrade_to_head

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
START_POSTGRES = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or point TEST_POSTGRES_URL at a server where you may create databases)"
)


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A database created for this test run only, migrated by Alembic, dropped at the end."""
    name = f"agentserve_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(
            f"Postgres is not reachable at {POSTGRES_ADMIN_URL} ({exc!r}); {START_POSTGRES}"
        )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    await migrate(url)
    try:
        yield url
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_REDIS = (
    "start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' "
    "(or point TEST_REDIS_URL at one)"
)


@pytest.fixture(scope="session")
async def redis_url() -> str:
    """The real Redis; this run's keys live under `redis_prefix`, so runs never collide."""
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc!r}); {START_REDIS}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"agentserve-test:{os.getpid()}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that asks runs twice: on a fresh SQLite file and on this run's Postgres."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'agentserve.db'}"
        upgrade_to_head(url)
        return url
    return str(request.getfixturevalue("postgres_url"))


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test: no .env file, quiet logs, fast failure knobs."""
    values: dict[str, Any] = {
        "log_level": "WARNING",
        "db_auto_migrate": False,
        "llm_backoff_initial": 0.001,
        "llm_backoff_max": 0.01,
        "llm_max_attempts": 2,
        "breaker_open_seconds": 0.5,
        # tests fire bursts from one address; the limits tests set their own
        "rate_limit_query": "100000/minute",
        "rate_limit_secure_query": "100000/minute",
        "concurrency_limit_query": 1000,
        "concurrency_limit_secure_query": 1000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


AppFactory = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


@pytest.fixture
def app_factory(database_url: str) -> AppFactory:
    """`async with app_factory(**settings) as (app, client)` on the parametrized database."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]:
        overrides.setdefault("database_url", database_url)
        return running_app(make_settings(**overrides))

    return factory


@pytest.fixture
async def client(app_factory: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with app_factory() as (_, http):
        yield http


def write_agents(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
