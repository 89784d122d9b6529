"""`agentserve` command line: serve, migrate, token, simulate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from app import __version__
from app.config import Settings
from app.observability.logging import configure_logging


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /ready turns 503 at once, and after SHUTDOWN_DELAY_SECONDS
    uvicorn stops accepting connections and drains in-flight requests (bounded by
    --timeout-graceful-shutdown). Load balancers stop routing before connections close.
    """

    def __init__(self, config: uvicorn.Config, *, shutdown_delay: float) -> None:
        super().__init__(config)
        self._shutdown_delay = shutdown_delay
        self._exit_scheduled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._mark_draining()
        if self._exit_scheduled or self._shutdown_delay <= 0:
            super().handle_exit(sig, frame)
            return
        self._exit_scheduled = True
        loop = asyncio.get_event_loop()
        loop.call_later(self._shutdown_delay, super().handle_exit, sig, frame)

    def _mark_draining(self) -> None:
        app = getattr(self.config, "loaded_app", None)
        while app is not None:  # unwrap uvicorn's middleware down to the FastAPI app
            lifecycle = getattr(getattr(app, "state", None), "lifecycle", None)
            if lifecycle is not None:
                lifecycle.draining = True
                return
            app = getattr(app, "app", None)


def serve(args: argparse.Namespace) -> None:
    settings = Settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    options = {
        "factory": True,
        "host": args.host or settings.host,
        "port": args.port or settings.port,
        "workers": args.workers or settings.workers,
        "reload": args.reload,
        "log_config": None,
        "access_log": settings.access_log,
        # the app applies X-Forwarded-* itself (FORWARDED_ALLOW_IPS), in tests too
        "proxy_headers": False,
        "timeout_graceful_shutdown": int(settings.drain_seconds),
        "server_header": False,
    }
    if args.reload or options["workers"] != 1:
        # uvicorn's supervisors manage the worker processes; each worker drains on its own.
        uvicorn.run("app.main:create_app", **options)
        return
    config = uvicorn.Config("app.main:create_app", **options)
    DrainingServer(config, shutdown_delay=settings.shutdown_delay_seconds).run()


def migrate(_: argparse.Namespace) -> None:
    from app.storage.db import upgrade_to_head

    settings = Settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    upgrade_to_head(settings.database_url)
    logging.getLogger("app.cli").info("database migrated to head")


def token(args: argparse.Namespace) -> None:
    """Print a development token signed with JWT_SECRET (refused in production)."""
    from app.security.jwt import mint_token

    settings = Settings()
    try:
        print(
            mint_token(
                settings,
                args.sub,
                scopes=args.scope or [settings.jwt_required_scope],
                ttl_seconds=args.ttl,
                agents=args.agent,
            )
        )
    except ValueError as exc:
        print(f"agentserve token: {exc}", file=sys.stderr)
        sys.exit(2)


def simulate(args: argparse.Namespace) -> None:
    from app.llm.simulator import SimulatorKnobs
    from app.llm.simulator import serve as serve_simulator

    knobs = SimulatorKnobs(
        latency_ms=args.latency_ms,
        per_token_latency_ms=args.per_token_latency_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        retry_after=args.retry_after,
        hang=args.hang,
    )
    serve_simulator(args.host, args.port, knobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"agentserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p_serve = commands.add_parser("serve", help="run the HTTP service (uvicorn)")
    p_serve.add_argument("--host", help="bind address (HOST, default 127.0.0.1)")
    p_serve.add_argument("--port", type=int, help="port (PORT, default 8000)")
    p_serve.add_argument("--workers", type=int, help="worker processes (WORKERS, default 1)")
    p_serve.add_argument("--reload", action="store_true", help="reload on code changes (dev)")
    p_serve.set_defaults(func=serve)

    p_migrate = commands.add_parser("migrate", help="alembic upgrade head on DATABASE_URL")
    p_migrate.set_defaults(func=migrate)

    p_token = commands.add_parser("token", help="mint a development JWT (HS256, JWT_SECRET)")
    p_token.add_argument("--sub", required=True, help="the subject (user id)")
    p_token.add_argument(
        "--scope", action="append", help="a scope to grant (repeatable; default agents:query)"
    )
    p_token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    p_token.add_argument(
        "--agent", action="append", help="restrict the token to this agent (repeatable)"
    )
    p_token.set_defaults(func=token)

    p_sim = commands.add_parser(
        "simulate", help="run the LLM simulator as an OpenAI-compatible HTTP server"
    )
    p_sim.add_argument("--host", default="127.0.0.1")
    p_sim.add_argument("--port", type=int, default=9100)
    p_sim.add_argument("--latency-ms", type=float, default=0.0)
    p_sim.add_argument("--per-token-latency-ms", type=float, default=0.0)
    p_sim.add_argument("--error-rate", type=float, default=0.0)
    p_sim.add_argument("--error-status", type=int, default=500)
    p_sim.add_argument("--retry-after", type=float, default=None)
    p_sim.add_argument("--hang", action="store_true")
    p_sim.set_defaults(func=simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
