"""Resilience around chat models: breaker + retries per upstream, and a fallback chain.

As resilience4j's Retry(CircuitBreaker(call)): every attempt asks the breaker first, so an
open breaker stops the retries at once and the chain moves on to the next upstream. Retries
use tenacity (full-jitter exponential backoff, Retry-After honoured, no wait that would
cross the per-call deadline). When tracing is on, a call on an upstream (all its attempts)
is one `llm.call` span, with an `llm.retry` event per retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from app.domain import Usage
from app.llm.types import (
    CallNotPermittedError,
    ChatModel,
    ChatRequest,
    Completion,
    CompletionDelta,
    LLMError,
    LLMUnavailableError,
    StreamingChatModel,
)
from app.observability.tracing import current_tracer, record_error, traced_iteration
from app.resilience.breaker import BreakerOpenError, CircuitBreaker

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LLMObserver(Protocol):
    """Where per-attempt facts go (metrics); keeps llm/ free of Prometheus."""

    def on_attempt(self, upstream: str, model: str, outcome: str, duration: float) -> None: ...

    def on_usage(self, upstream: str, model: str, usage: Usage) -> None: ...

    def on_retry(self, upstream: str) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    attempt_timeout: float = 60.0
    deadline: float = 90.0


def counts_as_failure(error: LLMError) -> bool:
    """Client errors (4xx but 408/429) say nothing about the upstream's health."""
    if error.kind == "status" and error.status_code is not None:
        return error.retryable or error.status_code >= 500
    return error.kind != "open"


def _should_retry(exc: BaseException) -> bool:
    return (
        isinstance(exc, LLMError) and exc.retryable and not isinstance(exc, CallNotPermittedError)
    )


class _WaitHonouringRetryAfter:
    """Full-jitter exponential backoff, but never shorter than the upstream's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._jitter = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        wait = float(self._jitter(state))
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, LLMError) and error.retry_after is not None:
            wait = max(wait, error.retry_after)
        return wait


class ResilientUpstream:
    """One upstream behind its circuit breaker, with retries and a per-call deadline."""

    def __init__(
        self,
        name: str,
        model: ChatModel,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        observer: LLMObserver | None = None,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self._model = model
        self._policy = policy
        self._observer = observer
        self._wait = _WaitHonouringRetryAfter(policy.backoff_initial, policy.backoff_max)

    def _retrying(self, spent: float = 0.0) -> AsyncRetrying:
        """`spent`: seconds of the deadline already used by an attempt made outside."""
        return AsyncRetrying(
            stop=stop_after_attempt(self._policy.max_attempts)
            | stop_before_delay(self._policy.deadline - spent),
            wait=self._wait,
            retry=retry_if_exception(_should_retry),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "retrying LLM call",
            extra={
                "upstream": self.name,
                "attempt": state.attempt_number,
                "wait_s": round(state.upcoming_sleep, 3),
                "error": str(error),
            },
        )
        if self._observer is not None:
            self._observer.on_retry(self.name)
        if current_tracer() is not None:  # the current span is this call's `llm.call`
            span = trace.get_current_span()
            span.set_attribute("llm.retries", state.attempt_number)
            span.add_event(
                "llm.retry",
                {
                    "llm.attempt": state.attempt_number,
                    "llm.outcome": _outcome(error) if isinstance(error, LLMError) else "error",
                    "llm.wait_s": round(state.upcoming_sleep, 3),
                },
            )

    def _span_attributes(self, request: ChatRequest) -> dict[str, AttributeValue]:
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": request.model,
            "llm.upstream": self.name,
            "llm.breaker.state": self.breaker.state.name.lower(),
            "llm.retries": 0,
        }

    def _annotate_success(self, span: Span, completion: Completion) -> None:
        span.set_attributes(
            {
                "llm.outcome": "success",
                "gen_ai.response.model": completion.model,
                "gen_ai.response.finish_reasons": (completion.finish_reason,),
                "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
            }
        )

    async def complete(self, request: ChatRequest) -> Completion:
        tracer = current_tracer()
        if tracer is None:
            return await self._complete(request)
        with tracer.start_as_current_span(
            "llm.call",
            attributes=self._span_attributes(request),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                completion = await self._complete(request)
            except Exception as exc:
                record_error(span, exc)
                _annotate_error(span, exc)
                raise
            self._annotate_success(span, completion)
            return completion

    async def _complete(self, request: ChatRequest) -> Completion:
        """The first attempt runs without tenacity, whose set-up is paid on every call while
        most calls succeed at once. A failed first attempt is re-raised inside tenacity as
        its attempt 1, so the retry rules, waits, logs and counts stay tenacity's."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.deadline):
                try:
                    return await self._attempt(request)
                except Exception as exc:
                    if not _should_retry(exc):
                        raise
                    first_failure: Exception | None = exc
                async for attempt in self._retrying(spent=time.monotonic() - started):
                    with attempt:
                        if first_failure is not None:
                            failure, first_failure = first_failure, None
                            raise failure
                        return await self._attempt(request)
        except TimeoutError:
            raise self._deadline_error() from None
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        """Retries apply until the first item arrives; after that a failure is final."""
        items = self._stream(request)
        tracer = current_tracer()
        if tracer is None:
            return items
        return traced_iteration(
            tracer,
            "llm.call",
            self._span_attributes(request),
            items,
            is_last=self._annotate_item,
            on_error=_annotate_error,
        )

    def _annotate_item(self, span: Span, item: CompletionDelta | Completion) -> bool:
        if isinstance(item, Completion):
            self._annotate_success(span, item)
            return True
        return False

    async def _stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        if not isinstance(self._model, StreamingChatModel):
            yield await self._complete(request)
            return
        model = self._model
        iterator: AsyncIterator[CompletionDelta | Completion] | None = None
        first: CompletionDelta | Completion | None = None
        started = 0.0
        try:
            async with asyncio.timeout(self._policy.deadline):
                async for attempt in self._retrying():
                    with attempt:
                        self._permit()
                        started = time.perf_counter()
                        iterator = model.stream(request)
                        first = await self._guarded(anext(iterator), request.model, started)
        except TimeoutError:
            raise self._deadline_error() from None
        assert iterator is not None
        assert first is not None
        item: CompletionDelta | Completion = first
        settled = False  # has the breaker been told how this call went?
        try:
            while True:
                if isinstance(item, Completion):
                    self._succeeded(request.model, item, started)
                    settled = True
                    yield item
                    return
                yield item
                async with asyncio.timeout(self._policy.attempt_timeout):
                    item = await anext(iterator)
        except TimeoutError:
            settled = True
            self._failed(request.model, "timeout", started)
            raise LLMError("stream stalled", upstream=self.name, kind="timeout") from None
        except LLMError as error:
            settled = True
            self._record_error(request.model, error, started)
            raise
        except Exception as exc:
            settled = True
            self._failed(request.model, "error", started)
            raise LLMError(
                f"upstream {self.name!r} stream failed: {exc!r}",
                upstream=self.name,
                kind="protocol",
            ) from exc
        finally:
            # Cancelled, or the consumer stopped reading (GeneratorExit): no verdict on the
            # upstream, but the permit must come back or a half-open breaker sticks.
            if not settled:
                self.breaker.release()
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    def _permit(self) -> None:
        """The breaker's permission for one attempt; its refusal as this upstream's LLMError."""
        try:
            self.breaker.try_acquire()
        except BreakerOpenError as refused:
            raise CallNotPermittedError(self.name, refused.retry_after) from None

    async def _attempt(self, request: ChatRequest) -> Completion:
        self._permit()
        started = time.perf_counter()
        completion = await self._guarded(self._model.complete(request), request.model, started)
        self._succeeded(request.model, completion, started)
        return completion

    async def _guarded(self, call: Awaitable[T], model_id: str, started: float) -> T:
        """Await one attempt under the attempt timeout, telling the breaker how it went."""
        try:
            async with asyncio.timeout(self._policy.attempt_timeout):
                return await call
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except TimeoutError:
            self._failed(model_id, "timeout", started)
            raise LLMError(
                f"upstream {self.name!r} did not answer within {self._policy.attempt_timeout}s",
                upstream=self.name,
                kind="timeout",
            ) from None
        except LLMError as error:
            self._record_error(model_id, error, started)
            raise
        except Exception as exc:
            self._failed(model_id, "error", started)
            raise LLMError(
                f"upstream {self.name!r} failed: {exc!r}", upstream=self.name, kind="protocol"
            ) from exc

    def _succeeded(self, model: str, completion: Completion, started: float) -> None:
        duration = time.perf_counter() - started
        self.breaker.record_success(duration)
        if self._observer is not None:
            model = completion.model or model
            self._observer.on_attempt(self.name, model, "success", duration)
            self._observer.on_usage(self.name, model, completion.usage)

    def _failed(self, model: str, outcome: str, started: float) -> None:
        duration = time.perf_counter() - started
        self.breaker.record_failure(duration)
        if self._observer is not None:
            self._observer.on_attempt(self.name, model, outcome, duration)

    def _record_error(self, model: str, error: LLMError, started: float) -> None:
        if counts_as_failure(error):
            self._failed(model, _outcome(error), started)
            return
        self.breaker.release()
        if self._observer is not None:
            self._observer.on_attempt(
                self.name, model, _outcome(error), time.perf_counter() - started
            )

    def _deadline_error(self) -> LLMError:
        return LLMError(
            f"upstream {self.name!r} did not answer within the {self._policy.deadline}s deadline",
            upstream=self.name,
            kind="deadline",
        )


def _outcome(error: LLMError) -> str:
    if error.kind == "status":
        return f"http_{error.status_code}"
    return error.kind


def _annotate_error(span: Span, error: Exception) -> None:
    if isinstance(error, LLMError):
        span.set_attribute("llm.outcome", _outcome(error))
        span.set_attribute("error.type", _outcome(error))


class FallbackChain:
    """Try each (upstream, model id) in order; 503-style error when none can answer."""

    def __init__(
        self,
        links: Sequence[tuple[ResilientUpstream, str]],
        *,
        unavailable_retry_after: float,
    ) -> None:
        if not links:
            raise ValueError("a fallback chain needs at least one upstream")
        self.links = tuple(links)
        self._default_retry_after = unavailable_retry_after

    async def complete(self, request: ChatRequest) -> Completion:
        errors: list[LLMError] = []
        for upstream, model_id in self.links:
            try:
                return await upstream.complete(dataclasses.replace(request, model=model_id))
            except LLMError as error:
                errors.append(error)
                self._log_fallback(upstream, model_id, error)
        raise self._unavailable(errors)

    async def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        errors: list[LLMError] = []
        for upstream, model_id in self.links:
            started = False
            try:
                async for item in upstream.stream(dataclasses.replace(request, model=model_id)):
                    started = True
                    yield item
                return
            except LLMError as error:
                if started:  # text already reached the caller: switching would garble it
                    raise
                errors.append(error)
                self._log_fallback(upstream, model_id, error)
        raise self._unavailable(errors)

    def retry_after(self) -> float:
        """Seconds until the earliest open breaker half-opens (or the configured default)."""
        waits = [u.breaker.retry_after() for u, _ in self.links if u.breaker.retry_after() > 0]
        return min(waits) if waits else self._default_retry_after

    def _log_fallback(self, upstream: ResilientUpstream, model_id: str, error: LLMError) -> None:
        logger.warning(
            "upstream failed; trying the next in the chain",
            extra={"upstream": upstream.name, "model": model_id, "error": str(error)},
        )

    def _unavailable(self, errors: list[LLMError]) -> LLMUnavailableError:
        summary = "; ".join(f"{e.upstream or '?'}: {e}" for e in errors)
        return LLMUnavailableError(
            f"no LLM upstream could answer ({summary})", retry_after=self.retry_after()
        )
