"""The baseline: a bare FastAPI app whose POST /query returns a fixed JSON body.

It measures what uvicorn (one worker, uvloop, httptools) and FastAPI routing cost by
themselves on this machine: no body parsing, no I/O. Run by bench/run.py as
``uvicorn baseline:app --app-dir bench/apps``.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

BODY = orjson.dumps(
    {
        "answer": "[baseline] a fixed answer",
        "session_id": "00000000-0000-4000-8000-000000000000",
        "cached": False,
    }
)

app = FastAPI(title="bench baseline", openapi_url=None, docs_url=None, redoc_url=None)


@app.post("/query")
async def query() -> Response:
    return Response(BODY, media_type="application/json")


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
