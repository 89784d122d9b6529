"""Settings: every knob of the service, from environment variables or `.env`.

One flat namespace (the variable name is the field name upper-cased) so that the configuration
table in docs/configuration.md, `.env.example`, docker-compose and Kubernetes ConfigMaps all use the
same names.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGED_AGENTS_FILE = Path(__file__).with_name("agents.yaml")

DEV_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"  # noqa: S105 - refused in prod
"""The default HS256 secret: fine for `make run`, refused in production mode."""

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _base_url_without_query(value: AnyHttpUrl | None) -> AnyHttpUrl | None:
    if value is not None and (value.query or value.fragment):
        raise ValueError(
            "an upstream's base URL takes no query string or fragment: the client appends "
            "/chat/completions to it (put extra parameters in the upstream's `headers`)"
        )
    return value


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

    @field_validator("base_url")
    @classmethod
    def _path_only(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        return _base_url_without_query(value)

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- service -------------------------------------------------------------------------
    app_env: Literal["development", "production"] = Field(
        "development", description="production: refuses weak JWT settings at start."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance_name: str = Field(
        "", description="Sent as the X-Instance response header; empty: the hostname."
    )
    log_json: bool = True
    access_log: bool = Field(True, description="One log line per HTTP request (uvicorn).")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-* headers are trusted."
    )

    # --- tracing (OpenTelemetry) ----------------------------------------------------------
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (spans go to <url>/v1/traces); "
        "unset: no tracing, nothing instrumented.",
    )
    otel_service_name: str = Field("agentserve", description="service.name of the spans.")

    # --- request limits and deadlines ----------------------------------------------------
    request_timeout: float = Field(120.0, gt=0, description="Whole-request deadline (504).")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_message_chars: int = Field(16_000, ge=1)
    max_metadata_bytes: int = Field(4096, ge=2)
    drain_seconds: float = Field(
        20.0, ge=0, description="How long in-flight requests may finish after SIGTERM."
    )
    sse_ping_seconds: float = Field(
        15.0, gt=0, description="A `: ping` comment this often on a stream, for proxies."
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

    # --- Redis: response cache, rate limits ----------------------------------------------
    redis_url: str | None = Field(None, description="Unset: in-process cache and limits.")
    redis_key_prefix: str = "agentserve:"
    redis_socket_timeout: float = Field(
        0.1,
        gt=0,
        description="Seconds to connect or wait for a pooled connection; a whole Redis call "
        "is bounded at three times this.",
    )
    redis_max_connections: int = Field(50, ge=1)
    cache_enabled: bool = True
    cache_ttl_seconds: int = Field(3600, ge=1, description="Default; agents may set their own.")
    cache_max_entries: int = Field(10_000, ge=1, description="In-process cache size.")
    cache_lock_seconds: float = Field(
        90.0, gt=0, description="Cross-replica single-flight lock lifetime (≈ LLM_DEADLINE)."
    )
    redis_breaker_open_seconds: float = Field(
        5.0, gt=0, description="How long Redis is skipped once it keeps failing."
    )

    # --- JWT on /secure-query (RFC 8725) -------------------------------------------------
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["HS256"])
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_public_key: SecretStr | None = Field(None, description="PEM, for RS*/ES*/PS*/EdDSA.")
    jwt_jwks_url: AnyHttpUrl | None = None
    jwt_jwks_cache_seconds: float = Field(300.0, gt=0)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = Field(30.0, ge=0)
    jwt_required_scope: str = "agents:query"
    jwt_agents_claim: str = Field("agents", description="Claim listing allowed agents.")

    # --- limits per caller (OWASP API4) --------------------------------------------------
    anonymous_query_enabled: bool = Field(True, description="false: only /secure-query.")
    rate_limit_query: str = Field("60/minute", description="Per client IP on /query.")
    rate_limit_secure_query: str = Field("120/minute", description="Per subject.")
    concurrency_limit_query: int = Field(8, ge=1, description="Per client IP on /query.")
    concurrency_limit_secure_query: int = Field(16, ge=1, description="Per subject.")
    session_max_messages: int = Field(10_000, ge=2, description="Longer sessions get 422.")

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
    llm_max_keepalive: int = Field(
        20, ge=0, description="0: no keep-alive; else idle connections are kept for 5 s."
    )
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

    @field_validator("llm_base_url")
    @classmethod
    def _llm_base_url_path_only(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        return _base_url_without_query(value)

    @field_validator("llm_upstreams", mode="before")
    @classmethod
    def _parse_upstreams(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _parse_algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _safe_algorithms(cls, value: list[str]) -> list[str]:
        """RFC 8725: an explicit allowlist, never `none`, never HMAC beside public-key."""
        if not value:
            raise ValueError("JWT_ALGORITHMS must name at least one algorithm")
        unknown = set(value) - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown:
            raise ValueError(f"JWT_ALGORITHMS has unsupported or unsafe entries: {unknown}")
        if set(value) & HMAC_ALGORITHMS and set(value) & ASYMMETRIC_ALGORITHMS:
            raise ValueError("JWT_ALGORITHMS must not mix HMAC (HS*) and public-key algorithms")
        return value

    @model_validator(mode="after")
    def _production_guards(self) -> Settings:
        if self.uses_hmac and len(self.jwt_secret.get_secret_value().encode()) < 32:
            raise ValueError("JWT_SECRET must be at least 32 bytes for HS* algorithms")
        if not self.uses_hmac and self.jwt_public_key is None and self.jwt_jwks_url is None:
            raise ValueError("public-key JWT_ALGORITHMS need JWT_PUBLIC_KEY or JWT_JWKS_URL")
        if self.app_env == "production":
            problems = []
            if self.uses_hmac and self.jwt_secret.get_secret_value() == DEV_JWT_SECRET:
                problems.append("JWT_SECRET is the development default")
            if not self.jwt_issuer:
                problems.append("JWT_ISSUER is required")
            if not self.jwt_audience:
                problems.append("JWT_AUDIENCE is required")
            if problems:
                raise ValueError("refusing to run in production: " + "; ".join(problems))
        return self

    @property
    def uses_hmac(self) -> bool:
        return bool(set(self.jwt_algorithms) & HMAC_ALGORITHMS)

    @property
    def uses_dev_secret(self) -> bool:
        return self.jwt_secret.get_secret_value() == DEV_JWT_SECRET

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
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql+asyncpg://")

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
