"""A JSON response rendered by orjson (FastAPI's ORJSONResponse is deprecated)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSON(Response):
    """Naive datetimes are UTC (SQLite returns them naive) and are rendered with +00:00."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NAIVE_UTC)
