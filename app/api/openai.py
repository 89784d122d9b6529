"""The OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models and /v1/models/{id}.

The official SDKs use it unchanged: `base_url` is this service's `/v1`, `api_key` a JWT
(the same bearer token as /secure-query, with the same per-subject limits under a scope of
their own). A model is an agent: its instructions come first, its tools run on the server,
and what it did (steps, session, cache) travels in one extra top-level object, `agentserve`,
which the SDKs keep as an unknown field.

State: a request is stateless (its `messages` are the conversation, and the cache key covers
them all), yet recorded as a new session of the caller's, named in the `X-Session-ID`
response header. A request that sends `X-Session-ID` continues that session instead: the
stored history, plus the request's last (user) message.

Errors under /v1 take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with this API's statuses (a 422 becomes 400, as OpenAI answers any invalid request), so
the SDKs raise their usual classes; `install_error_handlers` switches on the path.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import (
    Admission,
    PrincipalDep,
    QueryServiceDep,
    admit_subject,
    limit_subject_rate,
)
from app.api.errors import documented_errors, http_code, log_server_error
from app.api.openai_schemas import (
    UNSUPPORTED,
    ChatCompletion,
    ChatCompletionRequest,
    ModelList,
    ModelOut,
    OpenAIErrorResponse,
    ParameterError,
)
from app.api.query import cache_directives
from app.api.responses import JSON
from app.api.schemas import RATE_LIMIT_HEADERS, REQUEST_ID_HEADER
from app.api.streaming import CACHED_CHUNK, SEP, open_event_stream
from app.errors import AppError
from app.security.jwt import Principal
from app.services.query import (
    CachePolicy,
    QueryInput,
    QueryOutput,
    QueryService,
    RunOptions,
    TextDelta,
    TurnStarted,
    TurnStream,
)

logger = logging.getLogger(__name__)

PREFIX = "/v1"
SCOPE = "v1"
"""The rate and concurrency limits' scope: /v1 counts apart from /secure-query."""
OWNER = "agentserve"

# --- errors in OpenAI's shape -----------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
MODEL_CODES = {
    "agent_not_found": "model_not_found",
    "agent_forbidden": "model_forbidden",
    "agent_mismatch": "model_mismatch",
}
"""Here an agent is a model: its codes say so, and point at `model`."""


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def openai_status(status: int) -> int:
    """OpenAI answers every invalid request with 400; the rest keep this API's status."""
    return 400 if status == 422 else status


def app_error(exc: AppError) -> tuple[int, dict[str, Any]]:
    status = openai_status(exc.status)
    code = MODEL_CODES.get(exc.code, exc.code)
    if isinstance(exc, ParameterError):
        param = exc.param
    else:
        param = "model" if exc.code in MODEL_CODES else None
    return status, error_body(status, exc.message, code, param)


def error_response(
    status: int,
    body: dict[str, Any],
    *,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSON(body, status_code=status, headers=all_headers)


async def on_app_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    log_server_error(exc)
    status, body = app_error(exc)
    return error_response(status, body, retry_after=exc.retry_after, headers=exc.headers)


def param_of(loc: Sequence[int | str]) -> str | None:
    """`("body", "messages", 0, "content")` → `messages[0].content`."""
    parts = list(loc)
    if parts and parts[0] in ("body", "header", "query", "path"):
        parts.pop(0)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


async def on_validation(_: Request, exc: Exception) -> Response:
    """Invalid JSON or parameters: 400. A parameter this service does not take (an unknown
    field, an image part) is reported before the rest, as `unsupported_parameter`."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    unsupported = [e for e in errors if e.get("type") in (UNSUPPORTED, "extra_forbidden")]
    first = (unsupported or errors or [{}])[0]
    kind = first.get("type")
    if kind == "json_invalid":
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'invalid')}"
        return error_response(400, error_body(400, message, "validation_error"))
    param = param_of(first.get("loc", ()))
    if kind == "extra_forbidden":
        message = f"unknown parameter `{param}`"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    code = UNSUPPORTED if first in unsupported else "validation_error"
    return error_response(400, error_body(400, message, code, param))


async def on_http(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = openai_status(exc.status_code)
    body = error_body(status, str(exc.detail), http_code(exc.status_code))
    return error_response(status, body, headers=dict(exc.headers or {}))


Handler = Callable[[Request, Exception], Response | Awaitable[Response]]


def by_path(v1: Handler, other: Handler) -> Handler:
    async def handle(request: Request, exc: Exception) -> Response:
        path: str = request.scope["path"]
        chosen = v1 if path == PREFIX or path.startswith(f"{PREFIX}/") else other
        response = chosen(request, exc)
        return await response if inspect.isawaitable(response) else response

    return handle


class OpenAIRoute(APIRoute):
    """A /v1 route whose unexpected failures are a logged 500 in OpenAI's shape too (the
    app's outer layer would answer them in the API's own shape)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (AppError, RequestValidationError, StarletteHTTPException):
                raise  # the handlers above render them
            except Exception:
                logger.exception("unhandled error")
                body = error_body(500, "an unexpected error occurred", "internal_error")
                return error_response(500, body)

        return route


def install_error_handlers(app: FastAPI) -> None:
    """Under /v1, errors in OpenAI's shape; elsewhere the handlers installed before (the
    API's own). Install after `app.api.errors.install_error_handlers`."""
    for exc_class, handler in (
        (AppError, on_app_error),
        (RequestValidationError, on_validation),
        (StarletteHTTPException, on_http),
    ):
        app.add_exception_handler(exc_class, by_path(handler, app.exception_handlers[exc_class]))


def documented(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return documented_errors(descriptions, OpenAIErrorResponse)


AUTH_ERRORS = {
    401: "Missing or invalid bearer token (the SDK's api_key)",
    403: "The token lacks the scope, or may not use this model",
    429: "Too many requests (see Retry-After and RateLimit-* headers)",
}
CHAT_ERRORS = documented(
    {
        400: "Invalid JSON, an invalid or unsupported parameter",
        **AUTH_ERRORS,
        404: "Unknown model, or X-Session-ID names no session of yours",
        409: "The session is answering another request",
        413: "Body too large",
        503: "No agent free in time, the database or no LLM upstream can answer",
        504: "The request deadline was reached",
    }
)
MODEL_ERRORS = documented({**AUTH_ERRORS, 404: "Unknown model"})

# --- admission -------------------------------------------------------------------------------


async def v1_admission(request: Request, response: Response, principal: PrincipalDep) -> Admission:
    """Per token subject, with /secure-query's rate and concurrency settings."""
    return admit_subject(request, response, principal, SCOPE)


async def limit_v1(request: Request, response: Response, principal: PrincipalDep) -> None:
    """GET /v1/models: the subject's request rate (no slot: each call is short)."""
    await limit_subject_rate(request, response, principal, SCOPE)


V1AdmissionDep = Annotated[Admission, Depends(v1_admission)]
SessionHeader = Annotated[
    uuid.UUID | None,
    Header(description="Continue this stored session (from an earlier X-Session-ID)."),
]

router = APIRouter(prefix=PREFIX, tags=["openai"], route_class=OpenAIRoute)

# --- models ------------------------------------------------------------------------------------


def model_out(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


@router.get(
    "/models",
    response_model=ModelList,
    responses=MODEL_ERRORS,
    dependencies=[Depends(limit_v1)],
    summary="The agents, as OpenAI models",
)
async def list_models(service: QueryServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    """The agents this token may use; a model's `id` is the agent's name."""
    models = [model_out(spec.name) for spec in service.agents() if principal.may_use(spec.name)]
    return {"object": "list", "data": models}


@router.get(
    "/models/{model}",
    response_model=ModelOut,
    responses=MODEL_ERRORS,
    dependencies=[Depends(limit_v1)],
    summary="One agent, as an OpenAI model",
)
async def retrieve_model(
    model: str, service: QueryServiceDep, principal: PrincipalDep
) -> dict[str, Any]:
    return model_out(service.spec(model, principal.agents).name)


# --- chat completions ---------------------------------------------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "max_steps": "length"}
"""OpenAI has no `max_steps`: the answer was cut short by a limit (`agentserve` says which)."""


def chat_query(
    body: ChatCompletionRequest,
    request: Request,
    principal: Principal,
    session_id: uuid.UUID | None,
) -> QueryInput:
    """The turn a request asks for; ParameterError for what it cannot honour."""
    refusal = body.refusal()
    if refusal is not None:
        raise refusal
    *earlier, last = body.messages
    options = RunOptions(body.temperature, body.token_limit(), body.stops(), body.seed)
    # As on /query, a stream's Cache-Control is for HTTP caches, not this response cache.
    directives = set() if body.stream else cache_directives(request)
    return QueryInput(
        message=last.text() or "",
        session_id=session_id,
        agent=body.model,
        metadata=body.session_metadata(),
        owner=principal.subject,
        allowed_agents=principal.agents,
        request_id=correlation_id.get() or "-",
        cache=CachePolicy(read="no-cache" not in directives, write="no-store" not in directives),
        history=None if session_id is not None else tuple(m.to_wire() for m in earlier),
        options=None if options == RunOptions() else options,
        metadata_must_match=True,
    )


def agentserve(output: QueryOutput) -> dict[str, Any]:
    """What the agent did: the extra top-level object of a completion (or last chunk)."""
    return {
        "session_id": str(output.session_id),
        "cached": output.cached,
        "steps": [
            {
                "tool": step.tool,
                "arguments": step.arguments,
                "result": step.result,
                "is_error": step.is_error,
                "duration_ms": round(step.duration_ms, 3),
            }
            for step in output.steps
        ],
        "finish_reason": output.finish_reason,
        "upstream_model": output.model,
    }


def usage(output: QueryOutput) -> dict[str, int]:
    u = output.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


@dataclass(slots=True, frozen=True)
class Completion:
    """One answer's identity, shared by a completion or all of its chunks."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def body(self, output: QueryOutput) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": output.answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": FINISH_REASONS[output.finish_reason],
                }
            ],
            "usage": usage(output),
            "system_fingerprint": None,
            "agentserve": agentserve(output),
        }

    def chunk(self, delta: dict[str, Any]) -> ServerSentEvent:
        return data(self.chunk_body([choice(delta)]))

    def chunk_body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        return body

    def closing(self, output: QueryOutput) -> list[ServerSentEvent]:
        """The finish chunk, and the usage chunk (no choices) when asked for; the last of
        them carries `agentserve`."""
        finish = self.chunk_body([choice({}, FINISH_REASONS[output.finish_reason])])
        if not self.include_usage:
            finish["agentserve"] = agentserve(output)
            return [data(finish)]
        last = self.chunk_body([])
        last["usage"] = usage(output)
        last["agentserve"] = agentserve(output)
        return [data(finish), data(last)]


def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def data(body: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(body).decode(), sep=SEP)


DONE = "[DONE]"
ROLE = {"role": "assistant", "content": ""}


async def completion_chunks(
    turn: TurnStream, completion: Completion
) -> AsyncIterator[ServerSentEvent]:
    """A turn as `chat.completion.chunk` events, then `data: [DONE]`. Tool calls are not
    streamed (they are the server's): they come in `agentserve.steps` at the end."""
    async for item in turn.events():
        if isinstance(item, TurnStarted):
            yield completion.chunk(ROLE)
        elif isinstance(item, TextDelta):
            if item.text:
                yield completion.chunk({"content": item.text})
        elif isinstance(item, QueryOutput):
            if item.cached:  # a hit: nothing streamed yet
                yield completion.chunk(ROLE)
                for piece in CACHED_CHUNK.findall(item.answer):
                    yield completion.chunk({"content": piece})
            for event in completion.closing(item):
                yield event
            yield ServerSentEvent(data=DONE, sep=SEP)


def stream_error(exc: AppError | None) -> ServerSentEvent:
    """An error after the start: one `data: {"error": ...}` event (the SDKs raise APIError)."""
    if exc is None:
        return data(error_body(500, "an unexpected error occurred", "internal_error"))
    return data(app_error(exc)[1])


async def stream_completion(
    service: QueryService,
    query: QueryInput,
    completion: Completion,
    admission: Admission,
    request: Request,
    response: Response,
) -> Response:
    sse_response, first = await open_event_stream(
        service,
        query,
        admission,
        request,
        response,
        render=lambda turn: completion_chunks(turn, completion),
        on_error=stream_error,
    )
    if isinstance(first, TurnStarted | QueryOutput):
        sse_response.headers["X-Session-ID"] = str(first.session_id)
    return sse_response


SESSION_ID_HEADER: dict[str, Any] = {
    "X-Session-ID": {
        "description": "The session this turn is stored in; send it back to continue it.",
        "schema": {"type": "string", "format": "uuid"},
    }
}
COMPLETION_200 = {
    "headers": {**REQUEST_ID_HEADER, **SESSION_ID_HEADER, **RATE_LIMIT_HEADERS},
    "content": {
        "text/event-stream": {
            "schema": {"type": "string"},
            "description": 'With `"stream": true`: `data: {chat.completion.chunk}` events, '
            "the last with `agentserve` (and `usage` with `stream_options.include_usage`), "
            "then `data: [DONE]`.",
        }
    },
}


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: COMPLETION_200, **CHAT_ERRORS},
    summary="Ask an agent, OpenAI-style",
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    service: QueryServiceDep,
    principal: PrincipalDep,
    admission: V1AdmissionDep,
    request: Request,
    response: Response,
    x_session_id: SessionHeader = None,
) -> Response:
    """OpenAI's Chat Completions with `model` = an agent. Stateless: `messages` are the
    conversation; the turn is stored as a new session (`X-Session-ID` in the response).
    Send `X-Session-ID` to continue a stored session with the last message instead."""
    query = chat_query(body, request, principal, x_session_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    completion = Completion(
        f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, include_usage
    )
    if body.stream:
        return await stream_completion(service, query, completion, admission, request, response)
    async with admission:
        output = await service.answer(query)
    result = JSON(completion.body(output))
    result.headers.update(response.headers)  # RateLimit-*
    result.headers["X-Session-ID"] = str(output.session_id)
    result.headers["X-Cache"] = "HIT" if output.cached else "MISS"
    return result
