"""Operational endpoints: /health (liveness), /ready (readiness), /agents."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import RuntimeDep
from app.api.responses import JSON
from app.api.schemas import AgentOut, ReadyResponse
from app.llm.breaker import BreakerState
from app.storage.db import current_revision

router = APIRouter(tags=["operations"])

READY_DB_TIMEOUT = 2.0


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready"}},
    summary="Readiness: database reachable and migrated, pools up, not draining",
)
async def ready(runtime: RuntimeDep) -> Response:
    checks: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT):
            revision = await current_revision(runtime.engine)
        latency = round((time.perf_counter() - started) * 1000, 2)
        checks["database"] = {"status": "ok", "latency_ms": latency}
        if revision == runtime.head_revision:
            status = "ok"
        elif revision is not None and revision not in runtime.known_revisions:
            status = "degraded"  # a newer release migrated ahead of this one: keep serving
        else:
            status = "fail"  # migrations pending
        checks["migrations"] = {
            "status": status,
            "detail": f"at {revision}, head is {runtime.head_revision}",
        }
    except Exception as exc:  # any failure to reach the database means not ready
        latency = round((time.perf_counter() - started) * 1000, 2)
        checks["database"] = {"status": "fail", "latency_ms": latency, "detail": repr(exc)[:200]}
        checks["migrations"] = {"status": "fail", "detail": "database unreachable"}
    for name, pool in runtime.pools.items():
        checks[f"pool:{name}"] = {
            "status": "ok",
            "detail": f"{pool.in_use}/{pool.size} in use, {pool.waiting} waiting",
        }
    for breaker in runtime.gateway.breakers:
        state = breaker.state
        checks[f"llm:{breaker.name}"] = {
            "status": "info" if state is BreakerState.CLOSED else "degraded",
            "detail": f"circuit {state.name.lower().replace('_', '-')}",
        }
    if runtime.cache is not None:
        cache = runtime.cache.status()
        checks["cache"] = {
            "status": "ok" if cache.get("state") == "ok" else "degraded",
            "detail": f"{cache.get('backend')}: {cache.get('detail') or cache.get('state')}",
        }
    if runtime.lifecycle.draining:
        checks["lifecycle"] = {"status": "fail", "detail": "shutting down"}
    is_ready = all(check["status"] != "fail" for check in checks.values())
    return JSON(
        {"status": "ready" if is_ready else "not_ready", "checks": checks},
        status_code=200 if is_ready else 503,
    )


@router.get("/agents", response_model=list[AgentOut], summary="The agents this service runs")
async def agents(runtime: RuntimeDep) -> list[dict[str, Any]]:
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "model": runtime.model_id(spec),
            "tools": list(spec.tools),
            "max_steps": spec.max_steps,
            "pool_size": spec.pool_size,
        }
        for spec in runtime.specs.values()
    ]
