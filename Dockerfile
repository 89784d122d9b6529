# syntax=docker/dockerfile:1
#
# agentserve image: a builder stage installs the locked runtime dependencies and the package
# (a wheel, migrations inside) into /opt/venv; the runtime stage copies only that venv.
# Build with `docker build -t agentserve .`
#
#   docker run --rm -p 8000:8000 --stop-timeout 30 agentserve           # SQLite in ./var
#   docker run --rm -e DATABASE_URL=postgresql+asyncpg://... agentserve migrate
#
# Every dependency ships wheels for CPython 3.11 (asyncpg, uvloop, httptools, orjson,
# cryptography, ...), so no compiler is installed in either stage.

# --- builder: the virtualenv, from uv.lock ---------------------------------------------------
FROM python:3.11-slim AS builder

# uv from PyPI, the version the Makefile pins (UV_VERSION there).
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
RUN pip install "uv==${UV_VERSION}"

WORKDIR /build
# The locked runtime dependencies first: this layer changes only with uv.lock.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
# Then the package itself, installed as a wheel (not editable): app/ with its migrations.
COPY app/ ./app/
COPY migrations/ ./migrations/
RUN uv sync --frozen --no-dev --no-editable \
    && uv pip check --python /opt/venv/bin/python

# --- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="agentserve" \
      org.opencontainers.image.description="Pooled LLM agents over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

# Unprivileged user with a fixed uid/gid (Kubernetes runAsUser/runAsGroup use 10001).
RUN groupadd --system --gid 10001 agentserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin agentserve

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000
# SHUTDOWN_DELAY_SECONDS and DRAIN_SECONDS are left to the orchestrator (compose: 3 + 20 s,
# Kubernetes: 5 + 20 s); its stop timeout must exceed their sum, e.g. `--stop-timeout 30`.

# The package, its migrations included (app/migrations), is installed in /opt/venv.
WORKDIR /srv/agentserve
COPY --from=builder /opt/venv /opt/venv
# ./var is the default SQLite location (`docker run` without DATABASE_URL); the code and
# migrations stay root-owned and read-only for the service user.
RUN mkdir -p var && chown 10001:10001 var \
    && python -c "from app.storage.db import head_revision; assert head_revision(), 'no migrations'"

USER 10001:10001
EXPOSE 8000

# Liveness of the process only; readiness (database, migrations, draining) is GET /ready.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=2)"]

# Exec form: `agentserve` is PID 1 and receives SIGTERM itself (no shell in between), so
# `agentserve serve` turns /ready to 503, waits SHUTDOWN_DELAY_SECONDS and drains for up to
# DRAIN_SECONDS. It runs uvicorn with uvloop + httptools (uvicorn[standard]). No
# --proxy-headers flag: the app applies X-Forwarded-* itself, trusting FORWARDED_ALLOW_IPS.
# Other commands: `migrate`, `simulate`, `token` (e.g. `docker run agentserve migrate`).
ENTRYPOINT ["agentserve"]
CMD ["serve"]
