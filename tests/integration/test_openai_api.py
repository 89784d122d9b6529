"""/v1, the OpenAI-compatible API, and the official SDKs pointed at it.

In process (httpx's ASGI transport, on SQLite and Postgres): the answer's shape, the
conversation as context, what is stored, cache keys, the model options, parameters refused
by name, and errors in OpenAI's shape. Over a real socket (uvicorn in a thread, Postgres,
Redis): the `openai` Python SDK, sync and async, streamed and not; the options on the wire
to the upstream; a client that goes away; and the `openai` npm package when node is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionUserMessageParam
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.llm.simulator import Simulator, SimulatorKnobs
from app.llm.simulator import create_app as create_simulator_app
from app.main import create_app
from app.security.jwt import mint_token
from tests.conftest import AppFactory, make_settings, wait_until, write_agents
from tests.support.simserver import SimServer, running_simulator
from tests.support.threaded_server import serve_in_thread

pytestmark = pytest.mark.integration

SECRET = "openai-api-tests-" + "s" * 32
TOOLS_QUESTION = "What is (12+30)*2?"
COMPLETIONS = "/v1/chat/completions"
ERROR_FIELDS = {"message", "type", "param", "code"}
RUN = uuid.uuid4().hex[:8]
ALICE, BOB, CAROL = f"v1-alice-{RUN}", f"v1-bob-{RUN}", f"v1-carol-{RUN}"
"""Subjects of this module's own: the session database is shared by the whole run."""


def bearer(settings: Settings, sub: str = ALICE, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, sub, **kwargs)}"}


def user(text: str) -> ChatCompletionUserMessageParam:
    return {"role": "user", "content": text}


ANY = object()


def openai_error(
    response: httpx.Response, status: int, code: str, param: object = ANY
) -> dict[str, Any]:
    """The error in OpenAI's shape, with exactly its four fields (and `param`, if given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_FIELDS
    assert error["code"] == code, error
    assert error["message"]
    if param is not ANY:
        assert error["param"] == param, error
    return error


@contextmanager
def unchanged(app: FastAPI) -> Iterator[None]:
    """Nothing reaches the model inside the block."""
    simulator = app.state.runtime.gateway.simulator
    before = simulator.calls
    yield
    assert simulator.calls == before


# --- in process: the answer and the state --------------------------------------------------------


async def test_a_completion_in_openai_shape(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)
        response = await client.post(
            COMPLETIONS,
            json={"model": "tools", "messages": [user(TOOLS_QUESTION)]},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == "tools"
        [choice] = body["choices"]
        assert choice["index"] == 0
        assert choice["finish_reason"] == "stop"
        assert choice["message"] == {
            "role": "assistant",
            "content": "[simulator] calculator returned 84.",
            "refusal": None,
        }
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        extra = body["agentserve"]
        assert extra["cached"] is False
        assert extra["finish_reason"] == "stop"
        assert extra["upstream_model"] == "simulator"
        [step] = extra["steps"]
        assert (step["tool"], step["result"], step["is_error"]) == ("calculator", "84", False)
        assert response.headers["x-session-id"] == extra["session_id"]
        assert response.headers["x-cache"] == "MISS"
        assert response.headers["ratelimit-limit"]
        assert response.headers["x-request-id"]

        # recorded as a session of the caller's, which /sessions shows
        record = await app.state.runtime.turns.load(uuid.UUID(extra["session_id"]))
        assert record is not None
        assert record.owner == ALICE
        assert record.agent == "tools"
        assert [m["role"] for m in record.history] == ["user", "assistant", "tool", "assistant"]
        listed = await client.get("/sessions", headers=headers)
        assert extra["session_id"] in [s["id"] for s in listed.json()["sessions"]]


CONVERSATION = [
    {"role": "system", "content": "Answer like a pirate."},
    {"role": "user", "content": "Hello there.", "name": "ann"},
    {"role": "assistant", "content": "Ahoy."},
    user("Tell me about the sea."),
]


async def test_the_clients_messages_are_the_conversation_and_are_stored(
    app_factory: AppFactory,
) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)
        alone = await client.post(
            COMPLETIONS,
            json={"model": "assistant", "messages": [user("Tell me about the sea.")]},
            headers=headers,
        )
        full = await client.post(
            COMPLETIONS, json={"model": "assistant", "messages": CONVERSATION}, headers=headers
        )
        assert full.status_code == 200, full.text
        answer = full.json()["choices"][0]["message"]["content"]
        assert answer == alone.json()["choices"][0]["message"]["content"]  # the echo of the last
        # the earlier messages went to the model too
        assert full.json()["usage"]["prompt_tokens"] > alone.json()["usage"]["prompt_tokens"]

        # the new session holds the whole conversation and the answer
        session_id = full.headers["x-session-id"]
        record = await app.state.runtime.turns.load(uuid.UUID(session_id))
        assert record is not None
        assert record.history == [*CONVERSATION, {"role": "assistant", "content": answer}]

        # continuing it sends the model what the client would have sent itself
        follow_up = user("And about the wind?")
        continued = await client.post(
            COMPLETIONS,
            json={"model": "assistant", "messages": [follow_up]},
            headers={**headers, "X-Session-ID": session_id},
        )
        stateless = await client.post(
            COMPLETIONS,
            json={
                "model": "assistant",
                "messages": [*CONVERSATION, {"role": "assistant", "content": answer}, follow_up],
            },
            headers=headers,
        )
        assert continued.status_code == 200, continued.text
        assert continued.headers["x-session-id"] == session_id
        assert continued.json()["agentserve"]["session_id"] == session_id
        assert stateless.headers["x-session-id"] != session_id
        assert continued.json()["usage"] == stateless.json()["usage"]
        assert continued.json()["choices"] == stateless.json()["choices"]
        record = await app.state.runtime.turns.load(uuid.UUID(session_id))
        assert record is not None
        assert record.message_count == 7


async def test_the_cache_key_covers_the_conversation_and_the_options(
    app_factory: AppFactory,
) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)

        async def cache(messages: list[Any], **options: Any) -> str:
            body = {"model": "assistant", "messages": messages, **options}
            response = await client.post(COMPLETIONS, json=body, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["agentserve"]["cached"] is (response.headers["x-cache"] == "HIT")
            return response.headers["x-cache"]

        question = user("Same last words.")
        assert await cache([question]) == "MISS"
        assert await cache([question]) == "HIT"
        assert await cache([user("Something else first."), question]) == "MISS"
        assert await cache([user("Something else first."), question]) == "HIT"
        assert await cache([{"role": "system", "content": "Be brief."}, question]) == "MISS"
        # each option that changes the answer is in the key; the agent's own values are not
        assert await cache([question], temperature=0.9) == "MISS"
        assert await cache([question], temperature=0.9) == "HIT"
        assert await cache([question], temperature=0.8) == "MISS"
        assert await cache([question], temperature=0.2) == "HIT"  # the agent's temperature
        assert await cache([question], max_tokens=100_000) == "HIT"  # capped at the agent's
        assert await cache([question], max_tokens=50) == "MISS"
        assert await cache([question], max_tokens=51) == "MISS"
        assert await cache([question], seed=7) == "MISS"
        assert await cache([question], seed=7) == "HIT"
        assert await cache([question], seed=8) == "MISS"
        assert await cache([question], stop=["\n\n"]) == "MISS"
        assert await cache([question], stop="\n\n") == "HIT"  # one stop, however it is sent
        assert await cache([question], stop=["END"]) == "MISS"


async def test_max_tokens_is_honoured_within_the_agents_limit(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    agents = write_agents(
        tmp_path / "agents.yaml",
        """
agents:
  - name: assistant
    instructions: Be helpful.
    max_tokens: 1024
  - name: terse
    instructions: Be terse.
    max_tokens: 8
""",
    )
    async with app_factory(jwt_secret=SECRET, agents_file=agents, cache_enabled=False) as (
        app,
        client,
    ):
        headers = bearer(app.state.settings)
        question = [user("Please repeat this rather long sentence back to me, word for word.")]

        async def ask(model: str, **options: Any) -> tuple[str, int]:
            body = {"model": model, "messages": question, **options}
            response = await client.post(COMPLETIONS, json=body, headers=headers)
            assert response.status_code == 200, response.text
            data = response.json()
            return data["choices"][0]["finish_reason"], data["usage"]["completion_tokens"]

        assert (await ask("assistant"))[0] == "stop"
        assert await ask("assistant", max_tokens=5) == ("length", 5)
        assert await ask("assistant", max_completion_tokens=6) == ("length", 6)
        assert await ask("assistant", max_tokens=9, max_completion_tokens=7) == ("length", 7)
        # never above the agent's own limit
        assert await ask("terse") == ("length", 8)
        assert await ask("terse", max_tokens=1000) == ("length", 8)
        assert await ask("terse", max_tokens=4) == ("length", 4)


async def test_user_and_metadata_are_stored_with_the_session(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)
        body = {
            "model": "assistant",
            "messages": [user("Keep my ticket.")],
            "user": "end-user-42",
            "metadata": {"ticket": "OPS-42"},
        }
        first = await client.post(COMPLETIONS, json=body, headers=headers)
        assert first.status_code == 200, first.text
        session_id = first.headers["x-session-id"]
        stored = (await client.get(f"/sessions/{session_id}", headers=headers)).json()
        assert stored["metadata"] == {"ticket": "OPS-42", "user": "end-user-42"}

        # continuing: the same values (or a part of them) are fine, others are refused
        same = {**body, "messages": [user("Again.")], "metadata": None}
        resumed = await client.post(
            COMPLETIONS, json=same, headers={**headers, "X-Session-ID": session_id}
        )
        assert resumed.status_code == 200, resumed.text
        other = {**same, "user": "someone-else"}
        with unchanged(app):
            refused = await client.post(
                COMPLETIONS, json=other, headers={**headers, "X-Session-ID": session_id}
            )
        assert "metadata" in openai_error(refused, 400, "validation_error")["message"]

        clash = {**body, "metadata": {"user": "a"}, "user": "b"}
        openai_error(
            await client.post(COMPLETIONS, json=clash, headers=headers),
            400,
            "invalid_value",
            "metadata",
        )


# --- in process: parameters and errors -----------------------------------------------------------


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
            "unsupported_parameter",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"top_p": 0.5}, "top_p", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "unsupported_parameter",
        ),
        ({"frobnicate": True}, "frobnicate", "unsupported_parameter"),
        ({"frobnicate": None}, "frobnicate", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": False}},
            "stream_options.include_obfuscation",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, IMAGE]}]},
            "messages[0].content",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "weight": 2}]},
            "messages[0].weight",
            "unsupported_parameter",
        ),
        (
            {"messages": [user("hi"), {"role": "assistant", "content": "x"}]},
            "messages",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "tool", "content": "42"}, user("hi")]},
            "messages[0]",
            "invalid_value",
        ),
        ({"messages": [user("   ")]}, "messages[0].content", "invalid_value"),
        (
            {"messages": [{"role": "function", "content": "x"}]},
            "messages[0].role",
            "validation_error",
        ),
        ({"messages": []}, "messages", "validation_error"),
        ({"temperature": 2.5}, "temperature", "validation_error"),
        ({"max_tokens": 0}, "max_tokens", "validation_error"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "validation_error"),
        ({"seed": 2**64}, "seed", "validation_error"),
        ({"metadata": {"k": "v" * 600}}, "metadata.k", "validation_error"),
        ({"model": ""}, "model", "validation_error"),
    ],
)
async def test_what_cannot_be_honoured_is_refused_by_name(
    app_factory: AppFactory, extra: dict[str, Any], param: str, code: str
) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        body = {"model": "assistant", "messages": [user("hi")], **extra}
        with unchanged(app):
            response = await client.post(COMPLETIONS, json=body, headers=bearer(app.state.settings))
        error = openai_error(response, 400, code, param)
        assert error["type"] == "invalid_request_error"


async def test_defaults_that_change_nothing_are_accepted(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        body = {
            "model": "assistant",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                user("hi"),
            ],
            "n": 1,
            "top_p": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logprobs": False,
            "tools": None,
            "response_format": {"type": "text"},
            "stream": False,
            "stream_options": None,
        }
        response = await client.post(COMPLETIONS, json=body, headers=bearer(app.state.settings))
        assert response.status_code == 200, response.text
        record = await app.state.runtime.turns.load(uuid.UUID(response.headers["x-session-id"]))
        assert record is not None
        assert record.history[0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"text"', b"", b'{"model": "assistant"}', b'{"messages": 5}'],
)
async def test_bad_bodies_are_400s_in_openai_shape(app_factory: AppFactory, content: bytes) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = {**bearer(app.state.settings), "Content-Type": "application/json"}
        response = await client.post(COMPLETIONS, content=content, headers=headers)
        assert openai_error(response, 400, "validation_error")["type"] == "invalid_request_error"


async def test_errors_keep_the_apis_own_shape_outside_v1(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)
        query = await client.post("/secure-query", json={"message": ""}, headers=headers)
        assert query.status_code == 422
        assert set(query.json()["error"]) >= {"code", "message", "request_id"}
        assert (await client.get("/nope")).json()["error"]["code"] == "not_found"
        # framework errors under /v1 take OpenAI's shape
        openai_error(await client.get("/v1/embeddings", headers=headers), 404, "not_found")
        openai_error(await client.get(COMPLETIONS, headers=headers), 405, "method_not_allowed")


async def test_auth_ownership_and_agent_rights(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        settings = app.state.settings
        body = {"model": "assistant", "messages": [user("mine")]}
        missing = await client.post(COMPLETIONS, json=body)
        assert openai_error(missing, 401, "unauthorized")["type"] == "authentication_error"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        invalid = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        openai_error(invalid, 401, "invalid_token")

        mine = await client.post(COMPLETIONS, json=body, headers=bearer(settings))
        session = {"X-Session-ID": mine.headers["x-session-id"]}
        theirs = await client.post(
            COMPLETIONS, json=body, headers={**bearer(settings, BOB), **session}
        )
        assert openai_error(theirs, 404, "session_not_found")["type"] == "not_found_error"
        wrong_model = {**body, "model": "tools"}
        mismatch = await client.post(
            COMPLETIONS, json=wrong_model, headers={**bearer(settings), **session}
        )
        openai_error(mismatch, 400, "model_mismatch", "model")
        not_uuid = await client.post(
            COMPLETIONS, json=body, headers={**bearer(settings), "X-Session-ID": "seven"}
        )
        openai_error(not_uuid, 400, "validation_error", "x-session-id")

        limited = bearer(settings, CAROL, agents=["assistant"])
        models = await client.get("/v1/models", headers=limited)
        assert [m["id"] for m in models.json()["data"]] == ["assistant"]
        forbidden = await client.post(COMPLETIONS, json=wrong_model, headers=limited)
        assert openai_error(forbidden, 403, "model_forbidden", "model")["type"] == (
            "permission_error"
        )
        openai_error(await client.get("/v1/models/tools", headers=limited), 403, "model_forbidden")
        openai_error(
            await client.get("/v1/models/nope", headers=limited), 404, "model_not_found", "model"
        )


async def test_openapi_documents_v1(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (_, client):
        spec = (await client.get("/openapi.json")).json()
        chat = spec["paths"]["/v1/chat/completions"]["post"]
        assert {"bearer": []} in chat["security"]
        assert "text/event-stream" in chat["responses"]["200"]["content"]
        assert "X-Session-ID" in chat["responses"]["200"]["headers"]
        error = chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/OpenAIErrorResponse")
        assert {"/v1/models", "/v1/models/{model}"} <= set(spec["paths"])


async def test_an_unexpected_failure_is_a_500_in_openai_shape(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("boom: internal detail")

        app.state.runtime.state["query_service"].answer = broken
        response = await client.post(
            COMPLETIONS,
            json={"model": "assistant", "messages": [user("hi")]},
            headers={**bearer(app.state.settings), "X-Request-ID": "trace-v1-500"},
        )
        assert openai_error(response, 500, "internal_error")["type"] == "server_error"
        assert "boom" not in response.text
        assert response.headers["x-request-id"] == "trace-v1-500"


async def read_chunks(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response, list[Any]]:
    """The `data:` of each event, parsed (`[DONE]` kept as the string)."""
    async with aconnect_sse(client, "POST", COMPLETIONS, json=body, headers=headers) as source:
        items = []
        async for sse in source.aiter_sse():
            assert sse.event == "message"  # data-only events, as OpenAI sends them
            items.append(sse.data if sse.data == "[DONE]" else json.loads(sse.data))
        return source.response, items


async def test_a_stream_of_chunks(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET) as (app, client):
        headers = bearer(app.state.settings)
        body = {
            "model": "tools",
            "messages": [user(TOOLS_QUESTION)],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response, items = await read_chunks(client, body, headers)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-cache"] == "MISS"
        session_id = response.headers["x-session-id"]

        assert items[-1] == "[DONE]"
        chunks = items[:-1]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1
        assert {c["model"] for c in chunks} == {"tools"}
        assert all("usage" in c for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "[simulator] calculator returned 84."
        finish, last = chunks[-2], chunks[-1]
        assert finish["choices"][0]["finish_reason"] == "stop"
        assert finish["choices"][0]["delta"] == {}
        assert last["choices"] == []
        assert last["usage"]["completion_tokens"] > 0
        assert last["agentserve"]["session_id"] == session_id
        assert [s["tool"] for s in last["agentserve"]["steps"]] == ["calculator"]
        assert all("agentserve" not in c for c in chunks[:-1])
        record = await app.state.runtime.turns.load(uuid.UUID(session_id))
        assert record is not None
        assert record.owner == ALICE

        # a cache hit is replayed as chunks too; without include_usage `agentserve` rides on
        # the finish chunk
        body.pop("stream_options")
        response, again = await read_chunks(client, body, headers)
        assert response.headers["x-cache"] == "HIT"
        *rest, finish, done = again
        assert done == "[DONE]"
        assert finish["agentserve"]["cached"] is True
        assert all("usage" not in c for c in rest)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in rest) == text


async def test_refusals_before_a_stream_are_plain_json(app_factory: AppFactory) -> None:
    async with app_factory(jwt_secret=SECRET, rate_limit_secure_query="2/minute") as (app, client):
        headers = bearer(app.state.settings)
        body = {"model": "nope", "messages": [user("hi")], "stream": True}
        openai_error(
            await client.post(COMPLETIONS, json=body, headers=headers), 404, "model_not_found"
        )
        ok = await client.post(COMPLETIONS, json={**body, "model": "assistant"}, headers=headers)
        assert ok.status_code == 200
        limited = await client.post(
            COMPLETIONS, json={**body, "model": "assistant"}, headers=headers
        )
        assert openai_error(limited, 429, "rate_limited")["type"] == "rate_limit_error"
        assert limited.headers["retry-after"]


# --- over a socket: the official SDKs ------------------------------------------------------------


@dataclass
class Served:
    url: str
    settings: Settings
    token: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token or self.token, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.token, max_retries=0)

    def session(self, session_id: str, token: str | None = None) -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/sessions/{session_id}",
            headers={"Authorization": f"Bearer {token or self.token}"},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@contextmanager
def served(
    postgres_url: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Iterator[Served]:
    """agentserve under uvicorn in a thread, on Postgres and Redis."""
    settings = make_settings(
        database_url=postgres_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        jwt_secret=SECRET,
        **overrides,
    )
    with serve_in_thread(lambda _port: create_app(settings), "agentserve", lifespan="on") as (
        _server,
        port,
    ):
        yield Served(f"http://127.0.0.1:{port}", settings, mint_token(settings, ALICE))


@pytest.fixture
def service(postgres_url: str, redis_url: str, redis_prefix: str) -> Iterator[Served]:
    with served(postgres_url, redis_url, redis_prefix, cache_enabled=False) as svc:
        yield svc


def text_of(stream: openai.Stream[Any]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def collect_text(stream: openai.Stream[Any], into: list[str]) -> None:
    """Read a stream into `into`, which keeps what came before an error."""
    for chunk in stream:
        if chunk.choices:
            into.append(chunk.choices[0].delta.content or "")


async def test_python_sdk_lists_and_retrieves_models(service: Served) -> None:
    client = service.client()
    assert [model.id for model in client.models.list()] == ["assistant", "tools"]
    model = client.models.retrieve("tools")
    assert (model.id, model.object, model.owned_by) == ("tools", "model", "agentserve")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.code == "model_not_found"


async def test_python_sdk_chats_streamed_and_not(service: Served) -> None:
    client = service.client()
    plain = client.chat.completions.create(model="assistant", messages=[user("Hello, SDK.")])
    assert plain.choices[0].message.content == (
        '[simulator] You said: "Hello, SDK.". This is a simulated answer, not a real model.'
    )
    assert plain.model == "assistant"
    assert plain.usage is not None
    assert plain.usage.total_tokens > 0

    for model, question in (("assistant", "Hello, SDK."), ("tools", TOOLS_QUESTION)):
        answer = client.chat.completions.create(model=model, messages=[user(question)])
        streamed = client.chat.completions.create(
            model=model, messages=[user(question)], stream=True
        )
        assert text_of(streamed) == answer.choices[0].message.content
    assert answer.choices[0].message.content == "[simulator] calculator returned 84."
    extra = answer.model_extra or {}
    assert [step["tool"] for step in extra["agentserve"]["steps"]] == ["calculator"]
    assert extra["agentserve"]["cached"] is False


async def test_python_sdk_continues_a_session(service: Served) -> None:
    client = service.client()
    raw = client.chat.completions.with_raw_response.create(
        model="tools", messages=[user(TOOLS_QUESTION)]
    )
    session_id = raw.headers["X-Session-ID"]
    first = raw.parse()
    assert (first.model_extra or {})["agentserve"]["session_id"] == session_id

    follow_up = [user("And what time is it in Asia/Tokyo?")]
    second = client.chat.completions.create(
        model="tools", messages=follow_up, extra_headers={"X-Session-ID": session_id}
    )
    extra = (second.model_extra or {})["agentserve"]
    assert extra["session_id"] == session_id
    assert [step["tool"] for step in extra["steps"]] == ["current_time"]
    assert "Asia/Tokyo" in extra["steps"][0]["arguments"]

    # streamed, continuing again: the header comes back on the stream's response
    raw_stream = client.chat.completions.with_raw_response.create(
        model="tools",
        messages=[user("Thanks!")],
        stream=True,
        extra_headers={"X-Session-ID": session_id},
    )
    assert raw_stream.headers["X-Session-ID"] == session_id
    streamed = raw_stream.parse()
    assert isinstance(streamed, openai.Stream)
    assert text_of(streamed).startswith('[simulator] You said: "Thanks!"')

    stored = service.session(session_id)
    roles = [m["role"] for m in stored["messages"]]
    assert roles.count("user") == 3
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        TOOLS_QUESTION,
        "And what time is it in Asia/Tokyo?",
        "Thanks!",
    ]
    # a fresh question alone costs fewer prompt tokens than with the session's history
    fresh = client.chat.completions.create(model="tools", messages=follow_up)
    assert fresh.usage is not None
    assert second.usage is not None
    assert second.usage.prompt_tokens > fresh.usage.prompt_tokens


async def test_python_async_sdk_streams_usage_and_the_agents_steps(service: Served) -> None:
    client = service.async_client()
    answer = await client.chat.completions.create(model="tools", messages=[user(TOOLS_QUESTION)])
    stream = await client.chat.completions.create(
        model="tools",
        messages=[user(TOOLS_QUESTION)],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content == "[simulator] calculator returned 84."
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert answer.usage is not None
    assert last.usage.total_tokens == answer.usage.total_tokens
    extra = (last.model_extra or {})["agentserve"]
    assert [step["result"] for step in extra["steps"]] == ["84"]
    assert extra["session_id"] != (answer.model_extra or {})["agentserve"]["session_id"]
    await client.close()


async def test_python_sdk_error_classes(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    with served(postgres_url, redis_url, redis_prefix, rate_limit_secure_query="2/minute") as svc:
        with pytest.raises(openai.AuthenticationError):
            svc.client("not-a-token").models.list()
        client = svc.client()
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="nope", messages=[user("hi")])
        assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
        with pytest.raises(openai.BadRequestError) as tools:
            client.chat.completions.create(
                model="tools",
                messages=[user("hi")],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            )
        assert (tools.value.code, tools.value.param) == ("unsupported_parameter", "tools")
        limited = svc.client(mint_token(svc.settings, CAROL, agents=["assistant"]))
        with pytest.raises(openai.PermissionDeniedError):
            limited.chat.completions.create(model="tools", messages=[user("hi")])

        # two requests a minute (the unknown model's was one; refusals of parameters are
        # not counted): the third is refused
        client.models.list()
        with pytest.raises(openai.RateLimitError) as limit:
            client.models.list()
        assert limit.value.response.headers["retry-after"]
        assert limit.value.type == "rate_limit_error"


# --- over a socket: the upstream, streams --------------------------------------------------------


class Recording:
    """An ASGI wrapper that keeps the JSON body of every chat completion request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, recording_receive, send)


async def test_the_options_reach_the_upstream_request(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    upstream = Recording(create_simulator_app(Simulator()))
    with (
        serve_in_thread(lambda _port: upstream, "recorder") as (_, upstream_port),
        served(
            postgres_url,
            redis_url,
            redis_prefix,
            llm_base_url=f"http://127.0.0.1:{upstream_port}/v1",
            cache_enabled=False,
        ) as svc,
    ):
        client = svc.client()
        client.chat.completions.create(model="assistant", messages=[user("Defaults.")])
        defaults = upstream.bodies[-1]
        assert defaults["temperature"] == 0.2  # the agent's
        assert defaults["max_tokens"] == 1024
        assert "stop" not in defaults
        assert "seed" not in defaults

        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": "Client rules."},
            user(TOOLS_QUESTION),
        ]
        options: dict[str, Any] = {"temperature": 0.7, "max_tokens": 50_000, "seed": 1234}
        for stream in (False, True):
            upstream.bodies.clear()
            if stream:
                chunks = client.chat.completions.create(
                    model="tools", messages=messages, stop=["END"], stream=True, **options
                )
                assert text_of(chunks) == "[simulator] calculator returned 84."
            else:
                client.chat.completions.create(
                    model="tools", messages=messages, stop=["END"], **options
                )
            assert len(upstream.bodies) == 2  # the tool call, then the answer
            for body in upstream.bodies:
                assert body["temperature"] == 0.7
                assert body["max_tokens"] == 1024  # never above the agent's
                assert body["stop"] == ["END"]
                assert body["seed"] == 1234
                assert body.get("stream", False) is stream
                roles = [m["role"] for m in body["messages"]]
                assert roles[:3] == ["system", "system", "user"]  # the agent's rules first
                assert body["messages"][1]["content"] == "Client rules."


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def pool_in_use(ready: dict[str, Any], agent: str = "assistant") -> int:
    detail = ready["checks"][f"pool:{agent}"]["detail"]  # "0/64 in use, 0 waiting"
    return int(detail.split("/", 1)[0])


@contextmanager
def behind_simulator(
    postgres_url: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Iterator[tuple[Served, SimServer]]:
    """The service asking the simulator over HTTP: 50 ms, then 20 ms a token."""
    with (
        running_simulator(SimulatorKnobs(latency_ms=50, per_token_latency_ms=20)) as sim,
        served(
            postgres_url, redis_url, redis_prefix, llm_base_url=sim.base_url, **overrides
        ) as svc,
    ):
        yield svc, sim


LONG_QUESTION = "Please give me a long answer " + "about streaming " * 6


async def test_a_client_gone_mid_stream_cancels_the_turn(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    with behind_simulator(
        postgres_url, redis_url, redis_prefix, concurrency_limit_secure_query=1
    ) as (svc, sim):
        sim.put_knobs(per_token_latency_ms=100)  # seconds of tokens
        client = svc.client()
        raw = client.chat.completions.with_raw_response.create(
            model="assistant", messages=[user(LONG_QUESTION)], stream=True
        )
        session_id = raw.headers["X-Session-ID"]
        stream = raw.parse()
        assert isinstance(stream, openai.Stream)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        gone = time.monotonic()
        await wait_until(lambda: sim.simulator.streams_open == 0, timeout=1.0)
        assert time.monotonic() - gone < 1.0  # the upstream request was cancelled

        ready = httpx.get(f"{svc.url}/ready").json()
        assert pool_in_use(ready) == 0
        metrics = httpx.get(f"{svc.url}/metrics").text
        disconnects = metric(
            metrics, "agentserve_stream_disconnects_total", 'route="/v1/chat/completions"'
        )
        assert disconnects == 1
        missing = httpx.get(
            f"{svc.url}/sessions/{session_id}",
            headers={"Authorization": f"Bearer {svc.token}"},
        )
        assert missing.status_code == 404  # nothing was stored

        # the concurrency slot (limit 1) is free again, and nothing was cached
        sim.put_knobs(per_token_latency_ms=0)
        again = client.chat.completions.with_raw_response.create(
            model="assistant", messages=[user(LONG_QUESTION)]
        )
        assert again.headers["X-Cache"] == "MISS"


async def test_a_stream_pings_and_ends_with_an_openai_error(
    postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    with behind_simulator(
        postgres_url, redis_url, redis_prefix, sse_ping_seconds=0.1, request_timeout=1.0
    ) as (svc, sim):
        sim.put_knobs(latency_ms=600, per_token_latency_ms=0)
        lines: list[str] = []
        body = {"model": "assistant", "messages": [user("ping me")], "stream": True}
        headers = {"Authorization": f"Bearer {svc.token}"}
        with httpx.stream("POST", f"{svc.url}{COMPLETIONS}", json=body, headers=headers) as r:
            assert r.headers["x-accel-buffering"] == "no"
            lines = list(r.iter_lines())
        first_content = next(i for i, line in enumerate(lines) if '"content":"[' in line)
        assert lines[:first_content].count(": ping") >= 3
        assert lines[-2:] == ["data: [DONE]", ""]
        assert not any(line.startswith("event:") for line in lines)

        # past the deadline mid-stream: one error event, which the SDK raises
        sim.put_knobs(latency_ms=50, per_token_latency_ms=100)
        stream = svc.client().chat.completions.create(
            model="assistant", messages=[user(LONG_QUESTION)], stream=True
        )
        received: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            collect_text(stream, received)
        assert "".join(received)  # it had started
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "deadline_exceeded"
        assert caught.value.body["type"] == "timeout_error"


# --- the npm package -----------------------------------------------------------------------------

NODE_SCRIPT = Path(__file__).resolve().parents[1] / "node" / "openai_sdk.mjs"


def node_major() -> int:
    version = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return int(version.strip().lstrip("v").split(".", 1)[0])


@pytest.fixture(scope="module")
def node_openai(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the `openai` npm package installed (from the npm registry) and the
    test script; node 22 or later gets the latest release, older ones the 6.x line (the
    last that runs on them)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the npm SDK test needs both")
    directory = tmp_path_factory.mktemp("node-openai")
    package = "openai" if node_major() >= 22 else "openai@6"
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", package],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, f"npm install {package} failed:\n{installed.stderr}"
    shutil.copy(NODE_SCRIPT, directory / NODE_SCRIPT.name)
    return directory


async def test_the_npm_sdk(node_openai: Path, service: Served) -> None:
    run = subprocess.run(
        ["node", NODE_SCRIPT.name],
        cwd=node_openai,
        env={
            **os.environ,
            "AGENTSERVE_BASE_URL": service.base_url,
            "AGENTSERVE_TOKEN": service.token,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["models"] == ["assistant", "tools"]
    assert seen["answer"] == "[simulator] calculator returned 84."
    assert seen["finish_reason"] == "stop"
    assert seen["streamed"] == seen["answer"]
    assert seen["agentserve"]["session_id"] == seen["session_id"]
    assert [step["tool"] for step in seen["agentserve"]["steps"]] == ["calculator"]
    last = seen["last_chunk"]
    assert last["choices"] == []
    assert last["usage"]["total_tokens"] > 0
    assert last["agentserve"]["steps"][0]["result"] == "84"
    assert seen["continued_session"] == seen["session_id"]
    assert seen["continued_steps"] == ["current_time"]
    assert seen["unknown_model"] == {
        "class": "NotFoundError",
        "status": 404,
        "type": "not_found_error",
        "code": "model_not_found",
        "param": "model",
    }
    assert seen["client_tools"]["class"] == "BadRequestError"
    assert seen["client_tools"]["param"] == "tools"
    assert seen["bad_token"]["class"] == "AuthenticationError"
    assert seen["bad_token"]["status"] == 401
