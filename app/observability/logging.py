"""Structured JSON logs with the request id on every line.

The request id comes from asgi-correlation-id's context variable, so lines logged deep in
the LLM client or the store carry it without being handed a logger adapter.
"""

from __future__ import annotations

import logging
import sys

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.json import JsonFormatter

_HANDLER_NAME = "agentserve"


def configure_logging(level: str, *, json_lines: bool = True) -> None:
    """Replace the root handler (idempotent); uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(CorrelationIdFilter(uuid_length=None, default_value="-"))
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
