"""Unit tests for app.resilience.breaker, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from app.resilience.breaker import (
    HALF_OPEN_RETRY_AFTER,
    BreakerConfig,
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
)
from tests.support.fakes import FakeClock

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN


Transition = tuple[str, BreakerState, BreakerState]


def make(
    clock: FakeClock | None = None,
    transitions: list[Transition] | None = None,
    **overrides: Any,
) -> CircuitBreaker:
    settings: dict[str, Any] = {
        "failure_rate_threshold": 50.0,
        "slow_call_rate_threshold": 100.0,
        "slow_call_duration_threshold": 5.0,
        "sliding_window_size": 10,
        "minimum_number_of_calls": 10,
        "wait_duration_in_open_state": 30.0,
        "permitted_number_of_calls_in_half_open_state": 3,
    }
    settings.update(overrides)

    def listener(name: str, old: BreakerState, new: BreakerState) -> None:
        if transitions is not None:
            transitions.append((name, old, new))

    return CircuitBreaker(
        "up",
        BreakerConfig(**settings),
        clock=clock if clock is not None else FakeClock(),
        on_state_change=listener,
    )


def call(breaker: CircuitBreaker, *, ok: bool, duration: float = 0.1) -> None:
    """One permitted call with the given outcome."""
    breaker.try_acquire()
    if ok:
        breaker.record_success(duration)
    else:
        breaker.record_failure(duration)


def trip(breaker: CircuitBreaker) -> None:
    """Open a CLOSED breaker (default test config) with a full window of failures."""
    for _ in range(breaker.config.sliding_window_size):
        call(breaker, ok=False)
    assert breaker.state is OPEN


def refusal(breaker: CircuitBreaker) -> BreakerOpenError:
    with pytest.raises(BreakerOpenError) as excinfo:
        breaker.try_acquire()
    return excinfo.value


# -- CLOSED ------------------------------------------------------------------------------


def test_closed_stays_closed_below_minimum_calls_even_if_all_fail() -> None:
    breaker = make(sliding_window_size=20, minimum_number_of_calls=10)
    for _ in range(9):
        call(breaker, ok=False)
    snap = breaker.snapshot()
    assert breaker.state is CLOSED
    assert snap.buffered_calls == 9
    assert snap.failed_calls == 9
    assert snap.failure_rate == -1.0
    assert snap.slow_call_rate == -1.0
    call(breaker, ok=False)  # the 10th call reaches the minimum: 100% >= 50%
    assert breaker.state is OPEN


def test_minimum_is_capped_at_window_size() -> None:
    breaker = make(sliding_window_size=4, minimum_number_of_calls=10)
    for _ in range(3):
        call(breaker, ok=False)
    assert breaker.state is CLOSED
    call(breaker, ok=False)
    assert breaker.state is OPEN


def test_opens_at_exactly_the_failure_rate_threshold() -> None:
    breaker = make()
    for _ in range(5):
        call(breaker, ok=True)
    for _ in range(4):
        call(breaker, ok=False)
    assert breaker.state is CLOSED
    call(breaker, ok=False)  # 5 of 10 = 50% >= 50%
    assert breaker.state is OPEN
    snap = breaker.snapshot()
    assert snap.failure_rate == 50.0
    assert snap.failed_calls == 5
    assert snap.buffered_calls == 10


def test_does_not_open_just_under_the_failure_rate_threshold() -> None:
    breaker = make()
    for _ in range(6):
        call(breaker, ok=True)
    for _ in range(4):
        call(breaker, ok=False)  # 4 of 10 = 40% < 50%
    assert breaker.state is CLOSED
    assert breaker.snapshot().failure_rate == 40.0
    breaker.try_acquire()  # still permitted


def test_sliding_window_evicts_old_failures() -> None:
    breaker = make(sliding_window_size=100, minimum_number_of_calls=10, failure_rate_threshold=50)
    for _ in range(20):
        call(breaker, ok=True)
    for _ in range(10):
        call(breaker, ok=False)
    assert breaker.state is CLOSED
    first = breaker.snapshot()
    assert first.failed_calls == 10
    assert first.failure_rate == pytest.approx(100 / 3)

    rates = []
    for _ in range(100):
        call(breaker, ok=True)
        rates.append(breaker.snapshot().failure_rate)
    assert breaker.state is CLOSED
    # The rate only goes down as successes push the failures out of the window...
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert rates[0] < first.failure_rate
    # ...and after 100 more calls every failure has been evicted.
    last = breaker.snapshot()
    assert last.buffered_calls == 100
    assert last.failed_calls == 0
    assert last.failure_rate == 0.0


def test_evicted_failures_no_longer_count_towards_opening() -> None:
    breaker = make(sliding_window_size=10, minimum_number_of_calls=10)
    for _ in range(4):
        call(breaker, ok=False)
    for _ in range(10):
        call(breaker, ok=True)  # pushes all 4 failures out
    assert breaker.snapshot().failed_calls == 0
    for _ in range(4):
        call(breaker, ok=False)  # 4 of 10 again, not 8
    assert breaker.state is CLOSED
    assert breaker.snapshot().failure_rate == 40.0


def test_slow_calls_open_the_breaker_via_the_slow_call_threshold() -> None:
    breaker = make(slow_call_rate_threshold=60.0, slow_call_duration_threshold=5.0)
    for _ in range(4):
        call(breaker, ok=True, duration=0.5)
    for _ in range(5):
        call(breaker, ok=True, duration=5.0)  # exactly the duration threshold counts as slow
    assert breaker.state is CLOSED
    assert breaker.snapshot().slow_calls == 5
    call(breaker, ok=True, duration=9.0)  # 6 of 10 slow = 60% >= 60%
    assert breaker.state is OPEN
    snap = breaker.snapshot()
    assert snap.slow_call_rate == 60.0
    assert snap.failure_rate == 0.0
    assert snap.failed_calls == 0


def test_a_call_can_be_both_slow_and_failed() -> None:
    breaker = make(failure_rate_threshold=100.0, slow_call_rate_threshold=100.0)
    for _ in range(3):
        call(breaker, ok=False, duration=10.0)
    call(breaker, ok=True, duration=0.1)
    snap = breaker.snapshot()
    assert snap.buffered_calls == 4
    assert snap.failed_calls == 3
    assert snap.slow_calls == 3


def test_call_just_under_the_slow_duration_is_not_slow() -> None:
    breaker = make(slow_call_duration_threshold=5.0)
    call(breaker, ok=True, duration=4.999)
    assert breaker.snapshot().slow_calls == 0


# -- OPEN --------------------------------------------------------------------------------


def test_open_rejects_with_retry_after_and_counts_not_permitted() -> None:
    clock = FakeClock()
    breaker = make(clock, wait_duration_in_open_state=30.0)
    trip(breaker)
    assert breaker.retry_after() == 30.0

    clock.advance(12.5)
    error = refusal(breaker)
    assert error.retry_after == pytest.approx(17.5)
    assert error.name == "up"
    assert breaker.retry_after() == pytest.approx(17.5)

    clock.advance(17.0)
    assert refusal(breaker).retry_after == pytest.approx(0.5)
    assert breaker.state is OPEN
    assert breaker.snapshot().not_permitted_calls == 2


def test_state_read_does_not_transition_from_open() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker)
    clock.advance(1000.0)
    assert breaker.state is OPEN
    assert breaker.snapshot().state is OPEN
    assert breaker.retry_after() == 0.0


def test_after_wait_next_try_acquire_moves_to_half_open() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make(clock, transitions)
    trip(breaker)
    clock.advance(29.999)
    refusal(breaker)
    clock.advance(0.001)
    breaker.try_acquire()  # permitted: the wait has elapsed
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0
    assert transitions[-1] == ("up", OPEN, HALF_OPEN)
    snap = breaker.snapshot()
    assert snap.buffered_calls == 0  # fresh half-open window
    assert snap.failure_rate == -1.0


def test_outcomes_recorded_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(5):
        call(breaker, ok=True)
    breaker.try_acquire()  # a slow call permitted while CLOSED...
    for _ in range(5):
        call(breaker, ok=False)
    assert breaker.state is OPEN
    before = breaker.snapshot()

    breaker.record_success(100.0)  # ...finishes after the breaker opened
    breaker.record_failure(0.1)
    breaker.release()
    assert breaker.snapshot() == before
    assert breaker.state is OPEN
    assert breaker.retry_after() == 30.0  # the wait did not restart

    clock.advance(30.0)
    breaker.try_acquire()
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot().buffered_calls == 0


# -- HALF_OPEN ---------------------------------------------------------------------------


def half_open(clock: FakeClock, breaker: CircuitBreaker) -> None:
    """Trip the breaker, wait, and take the first half-open permit."""
    trip(breaker)
    clock.advance(breaker.config.wait_duration_in_open_state)
    breaker.try_acquire()
    assert breaker.state is HALF_OPEN


def test_half_open_permits_exactly_n_then_rejects() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=3)
    half_open(clock, breaker)  # permit 1
    breaker.try_acquire()  # permit 2
    breaker.try_acquire()  # permit 3
    error = refusal(breaker)
    assert error.retry_after == HALF_OPEN_RETRY_AFTER
    assert breaker.retry_after() == 0.0
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot().not_permitted_calls == 1
    # Recording an outcome uses the permit up; it does not hand out a new one.
    breaker.record_success(0.1)
    refusal(breaker)
    assert breaker.snapshot().not_permitted_calls == 2


def test_half_open_all_success_closes_with_an_empty_window() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make(clock, transitions)
    half_open(clock, breaker)
    breaker.try_acquire()
    breaker.try_acquire()
    breaker.record_success(0.1)
    breaker.record_success(0.1)
    assert breaker.state is HALF_OPEN  # not until all 3 probes reported
    breaker.record_success(0.1)
    assert breaker.state is CLOSED
    snap = breaker.snapshot()
    assert snap.buffered_calls == 0
    assert snap.failed_calls == 0
    assert snap.failure_rate == -1.0
    assert transitions[-1] == ("up", HALF_OPEN, CLOSED)
    # The closed window is the full-size one again: 9 failures do not reopen it.
    for _ in range(9):
        call(breaker, ok=False)
    assert breaker.state is CLOSED


def test_half_open_under_threshold_closes() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=3)
    half_open(clock, breaker)
    breaker.try_acquire()
    breaker.try_acquire()
    breaker.record_failure(0.1)  # 1 of 3 = 33% < 50%
    breaker.record_success(0.1)
    breaker.record_success(0.1)
    assert breaker.state is CLOSED


def test_half_open_failure_rate_at_threshold_reopens_with_a_fresh_wait() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make(clock, transitions, permitted_number_of_calls_in_half_open_state=4)
    half_open(clock, breaker)
    for _ in range(3):
        breaker.try_acquire()
    clock.advance(7.0)
    breaker.record_success(0.1)
    breaker.record_success(0.1)
    breaker.record_failure(0.1)
    assert breaker.state is HALF_OPEN
    breaker.record_failure(0.1)  # 2 of 4 = 50% >= 50%
    assert breaker.state is OPEN
    assert transitions[-1] == ("up", HALF_OPEN, OPEN)
    assert breaker.snapshot().failure_rate == 50.0
    assert breaker.retry_after() == 30.0  # the wait restarts from now
    clock.advance(10.0)
    assert refusal(breaker).retry_after == pytest.approx(20.0)


def test_half_open_slow_probes_reopen() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=2)
    half_open(clock, breaker)
    breaker.try_acquire()
    breaker.record_success(10.0)
    breaker.record_success(10.0)  # 2 of 2 slow = 100% >= 100%
    assert breaker.state is OPEN


def test_release_gives_back_a_half_open_permit() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=2)
    half_open(clock, breaker)
    breaker.try_acquire()
    refusal(breaker)
    breaker.release()  # a probe ended with a 4xx / cancellation: not counted
    assert breaker.snapshot().buffered_calls == 0
    breaker.try_acquire()  # the permit is available again
    refusal(breaker)
    breaker.record_success(0.1)
    assert breaker.state is HALF_OPEN  # only 1 of 2 outcomes recorded
    breaker.record_success(0.1)
    assert breaker.state is CLOSED


def test_release_without_outstanding_permits_does_not_add_permits() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=1)
    half_open(clock, breaker)
    breaker.release()
    breaker.release()  # one too many: must not create a second permit
    breaker.try_acquire()
    refusal(breaker)


def test_release_in_closed_is_a_noop() -> None:
    breaker = make()
    breaker.try_acquire()
    breaker.release()
    snap = breaker.snapshot()
    assert snap.buffered_calls == 0
    assert breaker.state is CLOSED


# -- listeners and logging ---------------------------------------------------------------


def test_listener_receives_every_transition_in_order(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make(clock, transitions, permitted_number_of_calls_in_half_open_state=1)
    caplog.set_level(logging.INFO, logger="app.resilience.breaker")

    trip(breaker)  # CLOSED -> OPEN
    clock.advance(30.0)
    call(breaker, ok=False)  # OPEN -> HALF_OPEN -> OPEN
    clock.advance(30.0)
    call(breaker, ok=True)  # OPEN -> HALF_OPEN -> CLOSED

    assert transitions == [
        ("up", CLOSED, OPEN),
        ("up", OPEN, HALF_OPEN),
        ("up", HALF_OPEN, OPEN),
        ("up", OPEN, HALF_OPEN),
        ("up", HALF_OPEN, CLOSED),
    ]
    records = [r for r in caplog.records if r.name == "app.resilience.breaker"]
    assert [(r.levelno, r.__dict__["from_state"], r.__dict__["to_state"]) for r in records] == [
        (logging.WARNING, "CLOSED", "OPEN"),
        (logging.INFO, "OPEN", "HALF_OPEN"),
        (logging.WARNING, "HALF_OPEN", "OPEN"),
        (logging.INFO, "OPEN", "HALF_OPEN"),
        (logging.INFO, "HALF_OPEN", "CLOSED"),
    ]
    assert all(r.__dict__["breaker"] == "up" for r in records)


def test_listener_sees_the_new_state() -> None:
    seen: list[BreakerState] = []
    breaker: CircuitBreaker

    def listener(name: str, old: BreakerState, new: BreakerState) -> None:
        seen.append(breaker.state)

    breaker = CircuitBreaker(
        "up",
        BreakerConfig(minimum_number_of_calls=1, sliding_window_size=1),
        clock=FakeClock(),
        on_state_change=listener,
    )
    call(breaker, ok=False)
    assert seen == [OPEN]


def test_raising_listener_does_not_break_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    calls: list[Transition] = []

    def listener(name: str, old: BreakerState, new: BreakerState) -> None:
        calls.append((name, old, new))
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(
        "up",
        BreakerConfig(
            sliding_window_size=2,
            minimum_number_of_calls=2,
            wait_duration_in_open_state=5.0,
            permitted_number_of_calls_in_half_open_state=1,
        ),
        clock=clock,
        on_state_change=listener,
    )
    call(breaker, ok=False)
    call(breaker, ok=False)  # opens; the listener raises inside record_failure
    assert breaker.state is OPEN
    refusal(breaker)
    clock.advance(5.0)
    breaker.try_acquire()  # transition to HALF_OPEN; listener raises again
    assert breaker.state is HALF_OPEN
    breaker.record_success(0.1)
    assert breaker.state is CLOSED
    assert calls == [("up", CLOSED, OPEN), ("up", OPEN, HALF_OPEN), ("up", HALF_OPEN, CLOSED)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(errors) == 3


# -- config and reset --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_rate_threshold", 0.0),
        ("failure_rate_threshold", -1.0),
        ("failure_rate_threshold", 100.5),
        ("failure_rate_threshold", float("nan")),
        ("slow_call_rate_threshold", 0.0),
        ("slow_call_rate_threshold", 101.0),
        ("slow_call_duration_threshold", 0.0),
        ("slow_call_duration_threshold", -2.0),
        ("sliding_window_size", 0),
        ("minimum_number_of_calls", 0),
        ("permitted_number_of_calls_in_half_open_state", 0),
        ("permitted_number_of_calls_in_half_open_state", -3),
        ("wait_duration_in_open_state", 0.0),
        ("wait_duration_in_open_state", float("inf")),
    ],
)
def test_config_validation_rejects(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**kwargs)


def test_config_accepts_boundaries() -> None:
    config = BreakerConfig(
        failure_rate_threshold=100.0,
        slow_call_rate_threshold=0.001,
        sliding_window_size=1,
        minimum_number_of_calls=1,
        permitted_number_of_calls_in_half_open_state=1,
        wait_duration_in_open_state=0.001,
        slow_call_duration_threshold=0.001,
    )
    assert config.sliding_window_size == 1
    assert BreakerConfig() == BreakerConfig(50.0, 100.0, 60.0, 100, 10, 30.0, 3)


def test_reset_from_open_closes_with_an_empty_window() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make(clock, transitions)
    trip(breaker)
    refusal(breaker)
    breaker.reset()
    assert breaker.state is CLOSED
    assert transitions[-1] == ("up", OPEN, CLOSED)
    snap = breaker.snapshot()
    assert snap.buffered_calls == 0
    assert snap.failed_calls == 0
    assert snap.not_permitted_calls == 0
    assert breaker.retry_after() == 0.0
    breaker.try_acquire()  # permitted immediately
    for _ in range(8):
        call(breaker, ok=False)
    assert breaker.state is CLOSED  # old failures are gone: 9 < minimum 10


def test_reset_from_half_open_discards_permits() -> None:
    clock = FakeClock()
    breaker = make(clock, permitted_number_of_calls_in_half_open_state=1)
    half_open(clock, breaker)
    breaker.reset()
    assert breaker.state is CLOSED
    trip(breaker)
    clock.advance(30.0)
    breaker.try_acquire()  # the single half-open permit is available again
    assert breaker.state is HALF_OPEN


def test_reset_when_closed_clears_the_window_without_a_transition() -> None:
    transitions: list[Transition] = []
    breaker = make(None, transitions)
    for _ in range(9):
        call(breaker, ok=False)
    breaker.reset()
    assert transitions == []
    assert breaker.snapshot().buffered_calls == 0
    call(breaker, ok=False)
    assert breaker.state is CLOSED


def test_default_config_and_clock() -> None:
    breaker = CircuitBreaker("default")
    assert breaker.config == BreakerConfig()
    assert breaker.name == "default"
    assert breaker.state is CLOSED
    assert "default" in repr(breaker)
