"""Structured JSON logs with the request id on every line, and the trace ids when traced.

The request id comes from asgi-correlation-id's context variable and `trace_id` / `span_id`
(hex, as tracing backends show them) from the current OpenTelemetry span, so lines logged
deep in the LLM client or the store carry them without a logger adapter. A line logged
outside any span has no trace keys.
"""

from __future__ import annotations

import logging
import sys

from asgi_correlation_id import CorrelationIdFilter
from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

_HANDLER_NAME = "agentserve"


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` to records logged inside a span; nothing otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        return True


def configure_logging(level: str, *, json_lines: bool = True) -> None:
    """Replace the root handler (idempotent); uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(CorrelationIdFilter(uuid_length=None, default_value="-"))
    handler.addFilter(TraceContextFilter())
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(correlation_id)s",
                rename_fields={
                    "levelname": "level",
                    "asctime": "time",
                    "correlation_id": "request_id",
                },
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s [%(correlation_id)s] %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
