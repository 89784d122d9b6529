"""Unit tests for app.llm.resilient: retries, breaker integration, fallback chain, streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, cast

import pytest

from app.domain import Usage
from app.llm.resilient import FallbackChain, ResilientUpstream, RetryPolicy, counts_as_failure
from app.llm.simulator import Simulator, SimulatorChatModel, SimulatorKnobs
from app.llm.types import (
    CallNotPermittedError,
    ChatRequest,
    Completion,
    CompletionDelta,
    LLMError,
    LLMUnavailableError,
)
from app.resilience.breaker import BreakerConfig, BreakerOpenError, BreakerState, CircuitBreaker
from tests.support.fakes import HANG, FakeClock, Hang, ScriptedModel

# ---------------------------------------------------------------------------------------
# Fakes and helpers


StreamStep = CompletionDelta | Completion | BaseException | Hang


class ScriptedStreamModel:
    """A StreamingChatModel: call n plays script n (the last repeats) item by item."""

    def __init__(self, *script: Sequence[StreamStep]) -> None:
        assert script
        self.script = [list(items) for items in script]
        self.requests: list[ChatRequest] = []
        self.finalized = 0  # streams whose generator has been closed/finished

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def complete(self, request: ChatRequest) -> Completion:
        raise AssertionError("complete() must not be used for streaming")

    async def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        self.requests.append(request)
        try:
            for step in self.script[min(len(self.requests), len(self.script)) - 1]:
                if isinstance(step, Hang):
                    await asyncio.Event().wait()
                elif isinstance(step, BaseException):
                    raise step
                else:
                    await asyncio.sleep(0)
                    yield step
        finally:
            self.finalized += 1


class RecordingObserver:
    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, str, float]] = []
        self.usages: list[tuple[str, str, Usage]] = []
        self.retries: list[str] = []

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, _, outcome, _ in self.attempts]

    def on_attempt(self, upstream: str, model: str, outcome: str, duration: float) -> None:
        self.attempts.append((upstream, model, outcome, duration))

    def on_usage(self, upstream: str, model: str, usage: Usage) -> None:
        self.usages.append((upstream, model, usage))

    def on_retry(self, upstream: str) -> None:
        self.retries.append(upstream)


FAST = RetryPolicy(
    max_attempts=3, backoff_initial=0.001, backoff_max=0.01, attempt_timeout=2.0, deadline=5.0
)


def policy(**overrides: Any) -> RetryPolicy:
    settings: dict[str, Any] = {
        "max_attempts": FAST.max_attempts,
        "backoff_initial": FAST.backoff_initial,
        "backoff_max": FAST.backoff_max,
        "attempt_timeout": FAST.attempt_timeout,
        "deadline": FAST.deadline,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)


def make_breaker(
    name: str = "up", clock: FakeClock | None = None, **overrides: Any
) -> CircuitBreaker:
    settings: dict[str, Any] = {
        "sliding_window_size": 100,
        "minimum_number_of_calls": 100,  # never opens unless a test says so
        "wait_duration_in_open_state": 30.0,
        "permitted_number_of_calls_in_half_open_state": 1,
    }
    settings.update(overrides)
    if clock is None:
        return CircuitBreaker(name, BreakerConfig(**settings))
    return CircuitBreaker(name, BreakerConfig(**settings), clock=clock)


def tripping_breaker(
    name: str, clock: FakeClock, wait: float = 30.0, **overrides: Any
) -> CircuitBreaker:
    """A breaker that opens on its first recorded failure."""
    return make_breaker(
        name,
        clock,
        sliding_window_size=1,
        minimum_number_of_calls=1,
        wait_duration_in_open_state=wait,
        **overrides,
    )


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The state, read through a call so mypy does not narrow it across awaits."""
    return breaker.state


def trip(breaker: CircuitBreaker) -> None:
    breaker.try_acquire()
    breaker.record_failure(0.0)
    assert breaker.state is BreakerState.OPEN


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker and let its wait pass, so the next call is the half-open probe."""
    trip(breaker)
    clock.advance(breaker.config.wait_duration_in_open_state + 1)


def upstream(
    model: Any,
    *,
    name: str = "up",
    breaker: CircuitBreaker | None = None,
    retry: RetryPolicy = FAST,
    observer: RecordingObserver | None = None,
) -> ResilientUpstream:
    return ResilientUpstream(
        name, model, breaker if breaker is not None else make_breaker(name), retry, observer
    )


def status(code: int, retry_after: float | None = None, name: str = "up") -> LLMError:
    return LLMError(
        f"HTTP {code}", upstream=name, kind="status", status_code=code, retry_after=retry_after
    )


def answer(text: str = "ok", model: str = "", usage: Usage | None = None) -> Completion:
    return Completion(content=text, model=model, usage=usage if usage is not None else Usage(1, 1))


REQUEST = ChatRequest(messages=[{"role": "user", "content": "hello there"}], model="m")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def drain(stream: AsyncIterator[CompletionDelta | Completion]) -> list[Any]:
    return [item async for item in stream]


async def drain_into(
    stream: AsyncIterator[CompletionDelta | Completion], received: list[Any]
) -> None:
    """Consume `stream`, keeping what arrived before it failed."""
    async for item in stream:
        received.append(item)


# ---------------------------------------------------------------------------------------
# Retries


async def test_success_on_first_try_makes_one_call() -> None:
    done = answer("hi")
    model = ScriptedModel(done)
    up = upstream(model)
    assert await up.complete(REQUEST) is done
    assert model.calls == 1
    assert model.requests[0] is REQUEST
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (1, 0)


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(lambda n: LLMError(f"connect {n}", kind="connect"), id="connect"),
        pytest.param(lambda n: LLMError(f"timeout {n}", kind="timeout"), id="timeout"),
        *(pytest.param(lambda n, c=c: status(c), id=f"http_{c}") for c in (500, 502, 503, 408)),
        pytest.param(lambda n: status(429), id="http_429"),
    ],
)
async def test_retryable_errors_are_retried_then_the_last_is_raised(make_error: Any) -> None:
    errors = [make_error(n) for n in range(3)]
    model = ScriptedModel(*errors)
    up = upstream(model)
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert info.value is errors[-1]
    assert model.calls == FAST.max_attempts
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (3, 3)


async def test_retry_then_success_returns_the_answer() -> None:
    done = answer()
    model = ScriptedModel(status(503), LLMError("reset", kind="connect"), done)
    up = upstream(model)
    assert await up.complete(REQUEST) is done
    assert model.calls == 3
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (3, 2)


@pytest.mark.parametrize(
    "error",
    [
        *(pytest.param(status(c), id=f"http_{c}") for c in (400, 401, 404, 422)),
        pytest.param(LLMError("bad body", kind="protocol"), id="protocol"),
    ],
)
async def test_non_retryable_errors_are_not_retried(error: LLMError) -> None:
    model = ScriptedModel(error, answer())
    up = upstream(model)
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert info.value is error
    assert model.calls == 1


async def test_unexpected_exception_becomes_a_protocol_error() -> None:
    boom = ValueError("boom")
    model = ScriptedModel(boom, answer())
    up = upstream(model)
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert info.value.kind == "protocol"
    assert info.value.upstream == "up"
    assert info.value.__cause__ is boom
    assert model.calls == 1
    assert up.breaker.snapshot().failed_calls == 1


# ---------------------------------------------------------------------------------------
# What counts for the breaker


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (status(400), False),
        (status(401), False),
        (status(404), False),
        (status(422), False),
        (status(408), True),
        (status(429), True),
        (status(500), True),
        (status(503), True),
        (LLMError("t", kind="timeout"), True),
        (LLMError("c", kind="connect"), True),
        (LLMError("p", kind="protocol"), True),
        (LLMError("d", kind="deadline"), True),
        (CallNotPermittedError("up", retry_after=1.0), False),
    ],
)
def test_counts_as_failure(error: LLMError, counts: bool) -> None:
    assert counts_as_failure(error) is counts


@pytest.mark.parametrize("code", [400, 401, 404])
async def test_client_errors_do_not_count_for_the_breaker(code: int) -> None:
    observer = RecordingObserver()
    up = upstream(ScriptedModel(status(code)), observer=observer)
    with pytest.raises(LLMError):
        await up.complete(REQUEST)
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (0, 0)
    assert observer.outcomes == [f"http_{code}"]  # still observed


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (status(500), "http_500"),
        (status(429), "http_429"),
        (status(408), "http_408"),
        (LLMError("t", kind="timeout"), "timeout"),
        (LLMError("c", kind="connect"), "connect"),
    ],
)
async def test_server_errors_count_for_the_breaker(error: LLMError, outcome: str) -> None:
    observer = RecordingObserver()
    up = upstream(ScriptedModel(error), retry=policy(max_attempts=1), observer=observer)
    with pytest.raises(LLMError):
        await up.complete(REQUEST)
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (1, 1)
    assert observer.outcomes == [outcome]


async def test_client_error_in_half_open_releases_the_probe_permit() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    up = upstream(ScriptedModel(status(400)), breaker=breaker)
    with pytest.raises(LLMError):
        await up.complete(REQUEST)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.try_acquire()  # the single permit was given back


async def test_server_error_in_half_open_reopens_the_breaker() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    model = ScriptedModel(status(500))
    up = upstream(model, breaker=breaker)
    with pytest.raises(CallNotPermittedError):
        await up.complete(REQUEST)  # probe fails -> OPEN -> the retry is refused
    assert breaker.state is BreakerState.OPEN
    assert model.calls == 1


# ---------------------------------------------------------------------------------------
# Retry-After, timeouts and the deadline


async def test_retry_after_is_honoured() -> None:
    done = answer()
    model = ScriptedModel(status(429, retry_after=0.15), done)
    up = upstream(model)
    assert await up.complete(REQUEST) is done
    assert model.calls == 2
    assert model.call_times[1] - model.call_times[0] >= 0.149


async def test_retry_after_beyond_the_deadline_stops_at_once() -> None:
    error = status(429, retry_after=5.0)
    model = ScriptedModel(error, answer())
    up = upstream(model, retry=policy(deadline=1.0))
    started = time.perf_counter()
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert time.perf_counter() - started < 0.1  # did not sleep toward the deadline
    assert info.value is error
    assert model.calls == 1


async def test_attempt_timeout_turns_a_hang_into_a_timeout_failure() -> None:
    observer = RecordingObserver()
    model = ScriptedModel(HANG)
    up = upstream(model, retry=policy(max_attempts=2, attempt_timeout=0.03), observer=observer)
    started = time.perf_counter()
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert time.perf_counter() - started < 0.3
    assert info.value.kind == "timeout"
    assert info.value.upstream == "up"
    assert model.calls == 2  # a timeout is retryable
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (2, 2)
    assert observer.outcomes == ["timeout", "timeout"]


async def test_attempt_timeout_then_success() -> None:
    done = answer()
    model = ScriptedModel(HANG, done)
    up = upstream(model, retry=policy(attempt_timeout=0.03))
    assert await up.complete(REQUEST) is done
    assert model.calls == 2


async def test_deadline_bounds_the_whole_call() -> None:
    model = ScriptedModel(HANG)
    up = upstream(model, retry=policy(attempt_timeout=5.0, deadline=0.05))
    started = time.perf_counter()
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert time.perf_counter() - started < 0.3
    assert info.value.kind == "deadline"
    assert info.value.upstream == "up"
    assert model.calls == 1


async def test_deadline_bounds_many_retried_attempts() -> None:
    model = ScriptedModel(HANG)
    up = upstream(model, retry=policy(max_attempts=10, attempt_timeout=0.03, deadline=0.08))
    started = time.perf_counter()
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert time.perf_counter() - started < 0.2
    # Cut by the deadline mid-attempt, or stopped because the next attempt would cross it.
    assert info.value.kind in ("deadline", "timeout")
    assert 2 <= model.calls <= 3  # far fewer than max_attempts


# ---------------------------------------------------------------------------------------
# Breaker integration


async def test_open_breaker_refuses_without_calling_and_without_retrying() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock, wait=30.0)
    trip(breaker)
    clock.advance(10)
    observer = RecordingObserver()
    model = ScriptedModel(answer())
    up = upstream(model, breaker=breaker, observer=observer)
    with pytest.raises(CallNotPermittedError) as info:
        await up.complete(REQUEST)
    assert info.value.retry_after == pytest.approx(20.0)
    assert model.calls == 0
    assert observer.retries == []
    assert breaker.snapshot().not_permitted_calls == 1  # asked exactly once


async def test_breaker_opens_after_enough_failures() -> None:
    breaker = make_breaker(
        "up", sliding_window_size=4, minimum_number_of_calls=4, failure_rate_threshold=50.0
    )
    model = ScriptedModel(status(500))
    up = upstream(model, breaker=breaker)

    with pytest.raises(LLMError) as first:
        await up.complete(REQUEST)
    assert not isinstance(first.value, CallNotPermittedError)
    assert state_of(breaker) is BreakerState.CLOSED
    assert model.calls == 3

    # The 4th failure fills the window and opens it; the retry that follows is refused.
    with pytest.raises(CallNotPermittedError):
        await up.complete(REQUEST)
    assert state_of(breaker) is BreakerState.OPEN
    assert model.calls == 4

    with pytest.raises(CallNotPermittedError):
        await up.complete(REQUEST)
    assert model.calls == 4


# ---------------------------------------------------------------------------------------
# Observer


async def test_observer_records_attempts_usage_and_retries() -> None:
    observer = RecordingObserver()
    done = answer(model="served-model", usage=Usage(7, 5))
    model = ScriptedModel(status(500), HANG, done)
    up = upstream(model, name="primary", retry=policy(attempt_timeout=0.03), observer=observer)
    assert await up.complete(REQUEST) is done

    assert observer.outcomes == ["http_500", "timeout", "success"]
    assert [(u, m) for u, m, _, _ in observer.attempts] == [
        ("primary", "m"),
        ("primary", "m"),
        ("primary", "served-model"),  # the model the upstream says it used
    ]
    assert all(duration >= 0 for *_, duration in observer.attempts)
    assert observer.attempts[1][3] >= 0.025  # the timed-out attempt took its timeout
    assert observer.usages == [("primary", "served-model", Usage(7, 5))]
    assert observer.retries == ["primary", "primary"]


async def test_observer_sees_no_usage_on_failure() -> None:
    observer = RecordingObserver()
    up = upstream(ScriptedModel(status(502)), observer=observer)
    with pytest.raises(LLMError):
        await up.complete(REQUEST)
    assert observer.outcomes == ["http_502"] * 3
    assert observer.usages == []
    assert len(observer.retries) == 2  # between 3 attempts


# ---------------------------------------------------------------------------------------
# Fallback chain


async def test_chain_falls_back_when_primary_exhausts_its_retries() -> None:
    primary = ScriptedModel(status(503))
    backup_answer = answer("from backup", model="backup-model")
    secondary = ScriptedModel(backup_answer)
    chain = FallbackChain(
        [
            (upstream(primary, name="a"), "main-model"),
            (upstream(secondary, name="b"), "backup-model"),
        ],
        unavailable_retry_after=5.0,
    )
    result = await chain.complete(REQUEST)
    assert result is backup_answer
    assert primary.calls == FAST.max_attempts
    assert [r.model for r in primary.requests] == ["main-model"] * 3
    assert secondary.calls == 1
    assert secondary.requests[0].model == "backup-model"
    assert secondary.requests[0].messages == REQUEST.messages


async def test_chain_uses_primary_when_it_answers() -> None:
    primary = ScriptedModel(answer("main"))
    secondary = ScriptedModel(answer("backup"))
    chain = FallbackChain(
        [(upstream(primary, name="a"), "x"), (upstream(secondary, name="b"), "y")],
        unavailable_retry_after=5.0,
    )
    assert (await chain.complete(REQUEST)).content == "main"
    assert secondary.calls == 0


async def test_chain_skips_primary_with_open_breaker() -> None:
    clock = FakeClock()
    primary_breaker = tripping_breaker("a", clock)
    trip(primary_breaker)
    primary = ScriptedModel(answer("main"))
    secondary = ScriptedModel(answer("backup"))
    chain = FallbackChain(
        [
            (upstream(primary, name="a", breaker=primary_breaker), "x"),
            (upstream(secondary, name="b"), "y"),
        ],
        unavailable_retry_after=5.0,
    )
    started = time.perf_counter()
    result = await chain.complete(REQUEST)
    assert time.perf_counter() - started < 0.05
    assert result.content == "backup"
    assert primary.calls == 0
    assert secondary.requests[0].model == "y"


async def test_chain_all_failing_without_open_breaker_uses_default_retry_after() -> None:
    chain = FallbackChain(
        [
            (upstream(ScriptedModel(status(503, name="a")), name="a"), "x"),
            (upstream(ScriptedModel(status(400, name="b")), name="b"), "y"),
        ],
        unavailable_retry_after=7.5,
    )
    with pytest.raises(LLMUnavailableError) as info:
        await chain.complete(REQUEST)
    assert info.value.retry_after == 7.5
    assert "a: HTTP 503" in str(info.value)
    assert "b: HTTP 400" in str(info.value)


async def test_chain_all_open_reports_the_smallest_remaining_wait() -> None:
    clock = FakeClock()
    a_breaker = tripping_breaker("a", clock, wait=30.0)
    b_breaker = tripping_breaker("b", clock, wait=10.0)
    trip(a_breaker)
    trip(b_breaker)
    clock.advance(3.0)
    a_model, b_model = ScriptedModel(answer()), ScriptedModel(answer())
    chain = FallbackChain(
        [
            (upstream(a_model, name="a", breaker=a_breaker), "x"),
            (upstream(b_model, name="b", breaker=b_breaker), "y"),
        ],
        unavailable_retry_after=99.0,
    )
    with pytest.raises(LLMUnavailableError) as info:
        await chain.complete(REQUEST)
    assert info.value.retry_after == pytest.approx(7.0)
    assert chain.retry_after() == pytest.approx(7.0)
    assert (a_model.calls, b_model.calls) == (0, 0)


async def test_chain_retry_after_reflects_a_breaker_opened_by_this_call() -> None:
    clock = FakeClock()
    a_breaker = tripping_breaker("a", clock, wait=12.0)
    a_model = ScriptedModel(status(500))
    chain = FallbackChain(
        [
            (upstream(a_model, name="a", breaker=a_breaker), "x"),
            (upstream(ScriptedModel(status(404)), name="b"), "y"),
        ],
        unavailable_retry_after=99.0,
    )
    with pytest.raises(LLMUnavailableError) as info:
        await chain.complete(REQUEST)
    assert a_breaker.state is BreakerState.OPEN
    assert a_model.calls == 1  # the retry was refused by the now open breaker
    assert info.value.retry_after == pytest.approx(12.0)


def test_chain_needs_links() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FallbackChain([], unavailable_retry_after=1.0)


# ---------------------------------------------------------------------------------------
# Streaming


def assert_well_formed(items: list[Any]) -> Completion:
    """Deltas, then exactly one Completion whose content is the deltas joined."""
    assert len(items) >= 2
    *deltas, last = items
    assert all(isinstance(item, CompletionDelta) for item in deltas)
    assert isinstance(last, Completion)
    assert "".join(d.content for d in deltas) == last.content
    return last


async def test_stream_with_simulator_yields_deltas_then_one_completion() -> None:
    observer = RecordingObserver()
    simulator = Simulator()
    up = upstream(SimulatorChatModel(simulator), observer=observer)
    items = await drain(up.stream(REQUEST))
    final = assert_well_formed(items)
    assert final.content is not None
    assert final.content.startswith("[simulator]")
    assert final.usage.completion_tokens > 0
    assert simulator.calls == 1
    snap = up.breaker.snapshot()
    assert (snap.buffered_calls, snap.failed_calls) == (1, 0)
    assert observer.outcomes == ["success"]
    assert observer.usages[0][2] == final.usage


async def test_chain_stream_falls_back_before_the_first_item() -> None:
    failing = Simulator(SimulatorKnobs(error_rate=1.0, error_status=503))
    working = Simulator()
    chain = FallbackChain(
        [
            (upstream(SimulatorChatModel(failing), name="a"), "x"),
            (upstream(SimulatorChatModel(working), name="b"), "y"),
        ],
        unavailable_retry_after=5.0,
    )
    final = assert_well_formed(await drain(chain.stream(REQUEST)))
    assert final.upstream == "simulator"
    assert failing.calls == FAST.max_attempts
    assert working.calls == 1


async def test_chain_stream_all_failing_raises_unavailable() -> None:
    chain = FallbackChain(
        [
            (
                upstream(SimulatorChatModel(Simulator(SimulatorKnobs(error_rate=1.0))), name="a"),
                "x",
            ),
        ],
        unavailable_retry_after=4.0,
    )
    with pytest.raises(LLMUnavailableError) as info:
        await drain(chain.stream(REQUEST))
    assert info.value.retry_after == 4.0


async def test_stream_retries_failures_before_the_first_item() -> None:
    observer = RecordingObserver()
    final = answer("ab")
    model = ScriptedStreamModel(
        [status(502)],
        [CompletionDelta("a"), CompletionDelta("b"), final],
    )
    up = upstream(model, observer=observer)
    items = await drain(up.stream(REQUEST))
    assert items == [CompletionDelta("a"), CompletionDelta("b"), final]
    assert model.calls == 2
    assert observer.outcomes == ["http_502", "success"]
    assert observer.retries == ["up"]


async def test_stream_failure_after_the_first_delta_is_raised_not_retried() -> None:
    error = status(502)
    model = ScriptedStreamModel([CompletionDelta("partial"), error], [answer("second try")])
    up = upstream(model)
    received: list[Any] = []
    with pytest.raises(LLMError) as info:
        await drain_into(up.stream(REQUEST), received)
    assert info.value is error
    assert received == [CompletionDelta("partial")]
    assert model.calls == 1
    assert up.breaker.snapshot().failed_calls == 1


async def test_stream_stall_after_the_first_delta_is_a_timeout() -> None:
    model = ScriptedStreamModel([CompletionDelta("partial"), HANG])
    up = upstream(model, retry=policy(attempt_timeout=0.03))
    started = time.perf_counter()
    with pytest.raises(LLMError) as info:
        await drain(up.stream(REQUEST))
    assert time.perf_counter() - started < 0.3
    assert info.value.kind == "timeout"
    assert model.calls == 1
    assert up.breaker.snapshot().failed_calls == 1


async def test_chain_stream_does_not_switch_after_text_was_yielded() -> None:
    error = status(503)
    primary = ScriptedStreamModel([CompletionDelta("half an ans"), error])
    secondary = ScriptedStreamModel([CompletionDelta("other"), answer("other")])
    chain = FallbackChain(
        [(upstream(primary, name="a"), "x"), (upstream(secondary, name="b"), "y")],
        unavailable_retry_after=5.0,
    )
    received: list[Any] = []
    with pytest.raises(LLMError) as info:
        await drain_into(chain.stream(REQUEST), received)
    assert info.value is error
    assert not isinstance(info.value, LLMUnavailableError)
    assert received == [CompletionDelta("half an ans")]
    assert secondary.calls == 0


async def test_stream_of_a_non_streaming_model_yields_one_completion() -> None:
    done = answer("whole")
    model = ScriptedModel(status(500), done)
    up = upstream(model)
    assert await drain(up.stream(REQUEST)) == [done]
    assert model.calls == 2  # complete() with its retries


async def test_stream_refused_by_open_breaker() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    trip(breaker)
    model = ScriptedStreamModel([answer()])
    with pytest.raises(CallNotPermittedError):
        await drain(upstream(model, breaker=breaker).stream(REQUEST))
    assert model.calls == 0
    assert breaker.snapshot().not_permitted_calls == 1


# ---------------------------------------------------------------------------------------
# Cancellation must give the half-open probe permit back


def assert_probe_permitted_again(breaker: CircuitBreaker) -> None:
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.try_acquire()  # raises CallNotPermittedError if the permit leaked


async def test_cancelled_complete_releases_the_half_open_permit() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    up = upstream(ScriptedModel(HANG), breaker=breaker)

    task = asyncio.create_task(up.complete(REQUEST))
    await settle()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(BreakerOpenError):
        breaker.try_acquire()  # the probe in flight holds the only permit

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_probe_permitted_again(breaker)


async def test_deadline_releases_the_half_open_permit() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    up = upstream(ScriptedModel(HANG), breaker=breaker, retry=policy(deadline=0.03))
    with pytest.raises(LLMError) as info:
        await up.complete(REQUEST)
    assert info.value.kind == "deadline"
    assert_probe_permitted_again(breaker)


async def test_cancelled_stream_before_first_item_releases_the_half_open_permit() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    up = upstream(ScriptedStreamModel([HANG]), breaker=breaker)

    task = asyncio.create_task(drain(up.stream(REQUEST)))
    await settle()
    with pytest.raises(BreakerOpenError):
        breaker.try_acquire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_probe_permitted_again(breaker)


async def test_cancelled_stream_mid_stream_releases_the_half_open_permit() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    up = upstream(ScriptedStreamModel([CompletionDelta("x"), HANG]), breaker=breaker)
    received: list[Any] = []

    async def consume() -> None:
        async for item in up.stream(REQUEST):
            received.append(item)

    task = asyncio.create_task(consume())
    await settle()
    assert received == [CompletionDelta("x")]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_probe_permitted_again(breaker)


async def test_stream_closed_by_a_cancelled_consumer_releases_the_half_open_permit() -> None:
    """Regression: GeneratorExit at `yield item` was unhandled, so the probe permit leaked
    and the breaker stayed HALF_OPEN refusing every call."""
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    model = ScriptedStreamModel([CompletionDelta("x"), CompletionDelta("y"), answer("xy")])
    up = upstream(model, breaker=breaker)
    got_first = asyncio.Event()

    async def consume() -> None:
        # The real type of ResilientUpstream.stream(): an async generator.
        generator = cast(AsyncGenerator[CompletionDelta | Completion, None], up.stream(REQUEST))
        async with aclosing(generator) as stream:
            async for _ in stream:
                got_first.set()
                await asyncio.Event().wait()  # e.g. writing to a slow client

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_probe_permitted_again(breaker)


async def test_unexpected_exception_mid_stream_is_a_protocol_failure() -> None:
    """Regression: a non-LLMError after the first item escaped unconverted (past the chain's
    `except LLMError`) and left the half-open permit taken."""
    clock = FakeClock()
    breaker = tripping_breaker("up", clock, permitted_number_of_calls_in_half_open_state=2)
    half_open(breaker, clock)
    boom = ValueError("boom")
    up = upstream(ScriptedStreamModel([CompletionDelta("x"), boom]), breaker=breaker)
    with pytest.raises(LLMError) as info:
        await drain(up.stream(REQUEST))
    assert info.value.kind == "protocol"
    assert info.value.__cause__ is boom
    assert breaker.snapshot().failed_calls == 1


async def test_stream_closed_early_closes_the_model_stream_at_once() -> None:
    model = ScriptedStreamModel([CompletionDelta("x"), CompletionDelta("y"), answer("xy")])
    up = upstream(model)
    generator = cast(AsyncGenerator[CompletionDelta | Completion, None], up.stream(REQUEST))
    assert await anext(generator) == CompletionDelta("x")
    await generator.aclose()
    assert model.finalized == 1  # not left to the garbage collector
    snap = up.breaker.snapshot()
    assert snap.buffered_calls == 0  # no verdict on the upstream


async def test_consumer_stopping_at_the_completion_still_records_success() -> None:
    clock = FakeClock()
    breaker = tripping_breaker("up", clock)
    half_open(breaker, clock)
    observer = RecordingObserver()
    final = answer("x")
    model = ScriptedStreamModel([CompletionDelta("x"), final])
    up = upstream(model, breaker=breaker, observer=observer)
    generator = cast(AsyncGenerator[CompletionDelta | Completion, None], up.stream(REQUEST))
    assert await anext(generator) == CompletionDelta("x")
    assert await anext(generator) is final
    await generator.aclose()  # never asks past the Completion
    assert breaker.state is BreakerState.CLOSED  # the successful probe closed it
    assert observer.outcomes == ["success"]
