"""POST /query: one conversation turn with a pooled agent."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body
from starlette.responses import Response

from app.api.deps import ServiceDep, SettingsDep
from app.api.errors import APIError
from app.api.responses import JSON
from app.api.schemas import QUERY_EXAMPLES, ErrorResponse, QueryRequest, QueryResponse
from app.config import Settings
from app.service import QueryInput, QueryOutput, QueryService

router = APIRouter(tags=["query"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        404: "Unknown agent or session",
        409: "The session is answering another request",
        413: "Body too large",
        422: "Invalid body",
        503: "No agent free in time, or no LLM upstream can answer (see Retry-After)",
        504: "The request deadline was reached",
    }.items()
}


def validate_limits(body: QueryRequest, settings: Settings) -> None:
    if len(body.message) > settings.max_message_chars:
        raise APIError(
            422,
            "validation_error",
            f"message: at most {settings.max_message_chars} characters are allowed "
            f"(got {len(body.message)})",
        )
    if body.metadata and len(orjson.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise APIError(
            422,
            "validation_error",
            f"metadata: at most {settings.max_metadata_bytes} bytes of JSON are allowed",
        )


def render(output: QueryOutput, request_id: str) -> dict[str, Any]:
    usage = output.usage
    return {
        "answer": output.answer,
        "session_id": str(output.session_id),
        "agent": output.agent,
        "model": output.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
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
        "cached": output.cached,
        "request_id": request_id,
        "latency_ms": round(output.latency_ms, 3),
    }


async def run_query(
    service: QueryService, settings: Settings, body: QueryRequest, owner: str | None
) -> Response:
    validate_limits(body, settings)
    request_id = correlation_id.get() or "-"
    query = QueryInput(
        message=body.message,
        session_id=body.session_id,
        agent=body.agent,
        metadata=body.metadata or {},
        owner=owner,
        request_id=request_id,
    )
    try:
        async with asyncio.timeout(settings.request_timeout) as deadline:
            output = await service.answer(query)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise APIError(
            504,
            "deadline_exceeded",
            f"the request did not finish within {settings.request_timeout:g}s; nothing was stored",
        ) from None
    return JSON(render(output, request_id))


@router.post(
    "/query",
    response_model=QueryResponse,
    responses=ERROR_RESPONSES,
    summary="Ask an agent (anonymous)",
)
async def query(
    body: Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)],
    service: ServiceDep,
    settings: SettingsDep,
) -> Response:
    """Send a message to an agent. Omit `session_id` to start a conversation; pass the
    returned `session_id` to continue it."""
    return await run_query(service, settings, body, owner=None)
