"""Settings: every knob of the service, from environment variables or `.env`.

One flat namespace (the variable name is the field name upper-cased) so that the README's
configuration table, `.env.example`, docker-compose and Kubernetes ConfigMaps all use the
same names.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGED_AGENTS_FILE = Path(__file__).with_name("agents.yaml")


class UpstreamConfig(BaseModel):
    """One OpenAI-compatible endpoint (or the built-in simulator) in the fallback chain."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    kind: Literal["openai", "simulator"] = "openai"
    base_url: AnyHttpUrl | None = None
    api_key: SecretStr | None = None
    models: list[str] = Field(
        default_factory=list, description="Model ids served here; empty means any model."
    )
    headers: dict[str, str] = Field(default_factory=dict)

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- service -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    access_log: bool = Field(True, description="One log line per HTTP request (uvicorn).")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-* headers are trusted."
    )

    # --- request limits and deadlines ----------------------------------------------------
    request_timeout: float = Field(120.0, gt=0, description="Whole-request deadline (504).")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_message_chars: int = Field(16_000, ge=1)
    max_metadata_bytes: int = Field(4096, ge=2)
    drain_seconds: float = Field(
        20.0, ge=0, description="How long in-flight requests may finish after SIGTERM."
    )
    shutdown_delay_seconds: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, keep serving with /ready=503 this long before draining "
        "(lets a load balancer notice); set to ~5 on Kubernetes.",
    )

    # --- database ------------------------------------------------------------------------
    database_url: str = "sqlite+aiosqlite:///./var/agentserve.db"
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_pool_timeout: float = Field(5.0, gt=0)
    db_auto_migrate: bool | None = Field(
        None, description="Run `alembic upgrade head` on start; default: only for SQLite."
    )
    history_max_messages: int = Field(50, ge=2, description="Messages of history sent.")

    # --- agents and the pool -------------------------------------------------------------
    agents_file: Path = PACKAGED_AGENTS_FILE
    default_agent: str = "assistant"
    pool_acquire_timeout: float = Field(5.0, ge=0)
    pool_max_waiting: int = Field(64, ge=0, description="Longest queue per agent pool.")

    # --- LLM upstreams -------------------------------------------------------------------
    llm_base_url: AnyHttpUrl | None = None
    llm_api_key: SecretStr | None = None
    llm_model: str = Field("gpt-4o-mini", description="Model id for agents that name none.")
    llm_upstreams: Annotated[list[UpstreamConfig], NoDecode] = Field(default_factory=list)
    llm_connect_timeout: float = Field(5.0, gt=0)
    llm_timeout: float = Field(60.0, gt=0, description="Per attempt.")
    llm_deadline: float = Field(90.0, gt=0, description="Per call, all retries included.")
    llm_max_attempts: int = Field(3, ge=1)
    llm_backoff_initial: float = Field(0.5, ge=0)
    llm_backoff_max: float = Field(8.0, ge=0)
    llm_max_connections: int = Field(100, ge=1)
    llm_max_keepalive: int = Field(20, ge=0)
    llm_unavailable_retry_after: float = Field(
        5.0, gt=0, description="Retry-After when no breaker is open but nothing answered."
    )

    # --- circuit breaker (per upstream, resilience4j semantics) --------------------------
    breaker_failure_rate: float = Field(50.0, gt=0, le=100)
    breaker_slow_call_rate: float = Field(100.0, gt=0, le=100)
    breaker_slow_call_seconds: float = Field(30.0, gt=0)
    breaker_window_size: int = Field(20, ge=1)
    breaker_min_calls: int = Field(10, ge=1)
    breaker_open_seconds: float = Field(30.0, gt=0)
    breaker_half_open_calls: int = Field(3, ge=1)

    # --- in-process simulator (used when no upstream is configured) ----------------------
    sim_latency_ms: float = Field(0.0, ge=0)
    sim_per_token_latency_ms: float = Field(0.0, ge=0)
    sim_error_rate: float = Field(0.0, ge=0, le=1)
    sim_error_status: int = Field(500, ge=400, le=599)
    sim_retry_after: float | None = Field(None, ge=0)
    sim_hang: bool = False

    @field_validator("llm_upstreams", mode="before")
    @classmethod
    def _parse_upstreams(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Accept the plain URLs operators paste and pick the async driver for them."""
        for plain, driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.db_auto_migrate is None else self.db_auto_migrate

    @cached_property
    def upstreams(self) -> list[UpstreamConfig]:
        """The fallback chain in order: LLM_UPSTREAMS, else LLM_BASE_URL, else the simulator."""
        if self.llm_upstreams:
            return list(self.llm_upstreams)
        if self.llm_base_url is not None:
            return [
                UpstreamConfig(name="default", base_url=self.llm_base_url, api_key=self.llm_api_key)
            ]
        return [UpstreamConfig(name="simulator", kind="simulator")]
