"""The I/O floor: a bare FastAPI app doing only the irreducible I/O of one turn.

POST /query ``{"message": ...}``: parse the JSON (orjson), one Redis GET (the "cache"),
one Postgres transaction inserting a session row and its two messages (asyncpg, into the
service's own migrated schema), one Redis SET, answer JSON (orjson). Nothing else: no
validation, no agent, no limits, no metrics. The service's scenarios are compared with it.

Configured through the environment (bench/harness.py's `floor_server`):

    FLOOR_DATABASE_URL   postgresql://... (plain asyncpg DSN) of the migrated bench database
    FLOOR_REDIS_URL      redis://127.0.0.1:6379/0
    FLOOR_KEY_PREFIX     prefix of every Redis key (the bench run's own)
    FLOOR_DB_POOL_MIN / FLOOR_DB_POOL_MAX   asyncpg pool bounds (the service's pool_size and
                         pool_size + max_overflow)
    FLOOR_REDIS_MAX_CONNECTIONS             default 50, the service's REDIS_MAX_CONNECTIONS
    FLOOR_UPSTREAM_URL   optional: an OpenAI-compatible base URL (.../v1). A cache miss then
                         asks it for the answer (POST /chat/completions with the message,
                         aiohttp, orjson) before the transaction: the floor of scenario 4.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from redis.asyncio import BlockingConnectionPool, Redis

DATABASE_URL = os.environ.get("FLOOR_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
REDIS_URL = os.environ.get("FLOOR_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("FLOOR_KEY_PREFIX", "agentserve-bench-floor:")
POOL_MIN = int(os.environ.get("FLOOR_DB_POOL_MIN", "10"))
POOL_MAX = int(os.environ.get("FLOOR_DB_POOL_MAX", "20"))
REDIS_MAX_CONNECTIONS = int(os.environ.get("FLOOR_REDIS_MAX_CONNECTIONS", "50"))
UPSTREAM_URL = os.environ.get("FLOOR_UPSTREAM_URL")
TTL_SECONDS = 3600

INSERT_SESSION = (
    "INSERT INTO sessions (id, owner, agent, message_count, history_digest, metadata,"
    " created_at, updated_at) VALUES ($1, NULL, 'assistant', 2, '', '{}', $2, $2)"
)
INSERT_MESSAGE = (
    "INSERT INTO messages (session_id, seq, role, content, prompt_tokens, completion_tokens,"
    " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (one more round trip per request: the floor
    only does what a turn needs; a transaction left open is still rolled back)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.db = await asyncpg.create_pool(
        DATABASE_URL, min_size=POOL_MIN, max_size=POOL_MAX, reset=_no_reset
    )
    app.state.redis = Redis.from_pool(
        BlockingConnectionPool.from_url(REDIS_URL, max_connections=REDIS_MAX_CONNECTIONS)
    )
    app.state.upstream = None
    if UPSTREAM_URL:
        # idle connections dropped before uvicorn's 5 s keep-alive closes them
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        app.state.upstream = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
    try:
        yield
    finally:
        if app.state.upstream is not None:
            await app.state.upstream.close()
        await app.state.redis.aclose()
        await app.state.db.close()


async def ask_upstream(session: aiohttp.ClientSession, message: str) -> str:
    payload = {"model": "simulator", "messages": [{"role": "user", "content": message}]}
    async with session.post(
        f"{UPSTREAM_URL}/chat/completions",
        data=orjson.dumps(payload),
        headers={"Content-Type": "application/json"},
    ) as response:
        response.raise_for_status()
        data = orjson.loads(await response.read())
    content: str = data["choices"][0]["message"]["content"]
    return content


app = FastAPI(title="bench floor", lifespan=lifespan, openapi_url=None, docs_url=None)


@app.post("/query")
async def query(request: Request) -> Response:
    message: str = orjson.loads(await request.body())["message"]
    key = KEY_PREFIX + "floor:" + hashlib.sha256(message.encode()).hexdigest()
    redis: Redis = request.app.state.redis
    cached = await redis.get(key)
    upstream: aiohttp.ClientSession | None = request.app.state.upstream
    if cached is not None:
        answer = cached.decode() if isinstance(cached, bytes) else str(cached)
    elif upstream is not None:
        answer = await ask_upstream(upstream, message)
    else:
        answer = f"[floor] You said: {message}"
    session_id = uuid.uuid4()
    now = datetime.now(UTC)
    pool: asyncpg.Pool = request.app.state.db
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(INSERT_SESSION, session_id, now)
        await conn.executemany(
            INSERT_MESSAGE,
            [
                (session_id, 1, "user", message, 0, 0, now),
                (session_id, 2, "assistant", answer, 10, 10, now),
            ],
        )
    await redis.set(key, answer, ex=TTL_SECONDS)
    body = orjson.dumps({"answer": answer, "session_id": str(session_id), "cached": bool(cached)})
    return Response(
        body,
        media_type="application/json",
        headers={"X-Cache": "HIT" if cached is not None else "MISS"},
    )


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
