"""Operational endpoints: /health (liveness), /ready (readiness), /agents."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import QueryServiceDep, ReadinessDep
from app.api.responses import JSON
from app.api.schemas import AgentOut, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/health", operation_id="health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready"}},
    summary="Readiness: database reachable and migrated, not draining",
)
async def ready(readiness: ReadinessDep) -> Response:
    result = await readiness.check()
    body = ReadyResponse.from_readiness(result)
    return JSON(body.model_dump(), status_code=200 if result.ready else 503)


@router.get(
    "/agents",
    summary="The agents this service runs",
)
async def list_agents(service: QueryServiceDep) -> list[AgentOut]:
    return [
        AgentOut(
            name=spec.name,
            description=spec.description,
            model=service.model_id(spec),
            tools=list(spec.tools),
            max_steps=spec.max_steps,
            pool_size=spec.pool_size,
        )
        for spec in service.agents()
    ]
