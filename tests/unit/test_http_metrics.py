"""The service's HTTP instrumentation records what the instrumentator's default records."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import metrics
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from app.observability.metrics import http_instrumentation

_CREATED = re.compile(r"^.*_created(\{.*\})? .*$\n?", re.MULTILINE)


def info(
    handler: str,
    status: str,
    duration: float,
    method: str = "POST",
    request_length: str | None = "40",
    response_length: str | None = "300",
) -> metrics.Info:
    request_headers = [(b"host", b"test")]
    if request_length is not None:
        request_headers.append((b"content-length", request_length.encode()))
    scope = {"type": "http", "method": method, "path": handler, "headers": request_headers}
    raw = [(b"content-type", b"application/json")]
    if response_length is not None:
        raw.append((b"content-length", response_length.encode()))
    response = Response(content=b"", headers=Headers(raw=raw), status_code=200)
    if response_length is None:
        del response.headers["content-length"]  # Response adds one; the middleware's may not
    return metrics.Info(
        request=Request(scope),
        response=response,
        method=method,
        modified_handler=handler,
        modified_status=status,
        modified_duration=duration,
        modified_duration_without_streaming=duration / 2,
    )


REQUESTS = [
    info("/query", "2xx", 0.004),
    info("/query", "2xx", 0.07),
    info("/query", "4xx", 0.0001, response_length="120"),
    info("/secure-query", "2xx", 2.2, request_length=None),
    info("/sessions/{session_id}", "2xx", 31.0, method="GET", response_length=None),
    info("none", "4xx", 75.0, method="GET", request_length="0"),
]


def exposition(registry: CollectorRegistry) -> str:
    return _CREATED.sub("", generate_latest(registry).decode())


def test_the_same_series_and_values_as_the_instrumentators_default() -> None:
    ours_registry, default_registry = CollectorRegistry(), CollectorRegistry()
    ours = http_instrumentation(ours_registry, "agentserve")
    default = metrics.default(metric_namespace="agentserve", registry=default_registry)
    assert default is not None
    for request in REQUESTS:
        ours(request)
        default(request)
    expected = exposition(default_registry)
    assert "agentserve_http_request_duration_highr_seconds_bucket" in expected
    assert 'agentserve_http_requests_total{handler="/query",method="POST",status="2xx"} 2.0' in (
        expected
    )
    assert exposition(ours_registry) == expected


@pytest.mark.parametrize("length", ["", "abc"])
def test_a_content_length_that_is_not_a_number_counts_as_zero(length: str) -> None:
    registry = CollectorRegistry()
    ours = http_instrumentation(registry, "agentserve")
    ours(info("/query", "2xx", 0.01, response_length=length))
    text = exposition(registry)
    assert 'agentserve_http_response_size_bytes_sum{handler="/query"} 0.0' in text
    assert 'agentserve_http_response_size_bytes_count{handler="/query"} 1.0' in text
