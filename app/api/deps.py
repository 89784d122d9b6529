"""Dependency aliases, so route signatures read like prose.

All `async def`: FastAPI runs a plain `def` dependency in the threadpool, two thread hops
per request for a dictionary lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.observability.metrics import Metrics
from app.runtime import Runtime
from app.service import QueryService


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_service(request: Request) -> QueryService:
    service: QueryService = request.app.state.runtime.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[QueryService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
