"""The one error hierarchy: every failure the app reports on purpose is an `AppError`.

A subclass names its HTTP `status` and stable machine `code`; an instance carries the
message, an optional `retry_after` (seconds, sent as Retry-After) and extra headers. One
handler in `app.api.errors` renders them all in the same JSON shape, so a new error is a
new subclass, never a table edit. The status is just a number: nothing here knows HTTP
frameworks.
"""

from __future__ import annotations

from collections.abc import Mapping


class AppError(Exception):
    """A failure the caller can act on."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})


# --- 4xx: the request ------------------------------------------------------------------


class InvalidRequestError(AppError):
    status, code = 422, "validation_error"


class AgentNotFoundError(AppError):
    status, code = 404, "agent_not_found"


class AgentForbiddenError(AppError):
    status, code = 403, "agent_forbidden"


class SessionNotFoundError(AppError):
    status, code = 404, "session_not_found"


class SessionBusyError(AppError):
    """Another turn of the session is running, or was written since this one loaded it."""

    status, code = 409, "session_busy"


class SessionFullError(AppError):
    status, code = 422, "session_full"


class AgentMismatchError(AppError):
    status, code = 422, "agent_mismatch"


class RateLimitedError(AppError):
    status, code = 429, "rate_limited"


# --- 5xx: this service or what it depends on -------------------------------------------


class PoolExhaustedError(AppError):
    """No agent of the pool became free in time, or too many callers already wait."""

    status, code = 503, "agent_pool_exhausted"

    def __init__(self, pool: str, reason: str, retry_after: float) -> None:
        super().__init__(
            f"all {pool!r} agents are busy ({reason}); retry shortly", retry_after=retry_after
        )
        self.pool = pool
        self.reason = reason


class DatabaseUnavailableError(AppError):
    """The database could not be reached or did not answer (not a problem with the data)."""

    status, code = 503, "database_unavailable"
    RETRY_AFTER = 5.0

    def __init__(self, detail: str) -> None:
        super().__init__(
            "the database cannot be reached right now; retry later",
            retry_after=self.RETRY_AFTER,
        )
        self.detail = detail


class UpstreamUnavailableError(AppError):
    """No LLM upstream could answer (the `LLMError` that says why is its cause, for logs)."""

    status, code = 503, "llm_unavailable"
    RETRY_AFTER = 5.0

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__(
            "no LLM upstream could answer right now; retry later",
            retry_after=self.RETRY_AFTER if retry_after is None else retry_after,
        )


class DeadlineExceededError(AppError):
    status, code = 504, "deadline_exceeded"
