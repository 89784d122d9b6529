"""A circuit breaker with resilience4j semantics (count-based sliding window), for every
dependency that can fail slowly: each LLM upstream, and Redis.

Hand-written because the Python breaker libraries (pybreaker, aiobreaker, circuitbreaker)
count consecutive failures; none trips on a failure rate or a slow-call rate over the last
N calls. A breaker belongs to one event loop and none of its methods await, so it needs no
locks (do not share one between threads).

Usage, per call::

    breaker.try_acquire()            # raises BreakerOpenError when refused
    started = clock()
    try:
        result = await call()
    except CountedError:
        breaker.record_failure(clock() - started)
        raise
    except BaseException:            # e.g. a 4xx that says nothing about upstream health,
        breaker.release()            # or cancellation: give the permit back, record nothing
        raise
    breaker.record_success(clock() - started)

Every permitted call must end in exactly one of record_success / record_failure / release;
otherwise a half-open breaker waits for the missing probe forever.

States (as resilience4j with automaticTransitionFromOpenToHalfOpen=false):

* CLOSED: outcomes fill a ring buffer of the last ``sliding_window_size`` calls. Once it
  holds ``min(minimum_number_of_calls, sliding_window_size)`` outcomes, the failure and
  slow-call rates are checked after every outcome; either reaching its threshold opens it.
* OPEN: every call is refused until ``wait_duration_in_open_state`` has passed; the next
  ``try_acquire`` then moves to HALF_OPEN and is permitted. Reading ``state`` never
  transitions.
* HALF_OPEN: ``permitted_number_of_calls_in_half_open_state`` probes (``release`` gives one
  back) fill a fresh window of that size; once it is full, a threshold reached opens the
  breaker again (a new wait starts), otherwise it closes with an empty window.

Outcomes recorded while OPEN (calls permitted before it opened) are ignored; a late outcome
in CLOSED or HALF_OPEN counts in the current window, as in resilience4j. While OPEN, the
snapshot still shows the window that tripped the breaker. A refusal in HALF_OPEN carries
``HALF_OPEN_RETRY_AFTER``: "retry after 0 s" would invite a retry storm while the probes
are out.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "HALF_OPEN_RETRY_AFTER",
    "BreakerConfig",
    "BreakerOpenError",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "StateListener",
]

logger = logging.getLogger(__name__)

HALF_OPEN_RETRY_AFTER = 1.0
"""Seconds suggested to a caller refused because every half-open probe permit is taken."""


class BreakerOpenError(Exception):
    """The breaker refused the call: no I/O was attempted."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name
        self.retry_after = retry_after


_FAILED = 1
_SLOW = 2


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_rate_threshold: float = 50.0
    """Percent; the breaker opens when the failure rate is >= this."""
    slow_call_rate_threshold: float = 100.0
    """Percent; the breaker opens when the slow-call rate is >= this."""
    slow_call_duration_threshold: float = 60.0
    """Seconds; a call lasting >= this is slow (whether it failed or not)."""
    sliding_window_size: int = 100
    """Count-based window: the last N recorded outcomes while CLOSED."""
    minimum_number_of_calls: int = 10
    """No rate is computed before this many outcomes (capped at the window size)."""
    wait_duration_in_open_state: float = 30.0
    """Seconds OPEN refuses every call before the next call may probe."""
    permitted_number_of_calls_in_half_open_state: int = 3

    def __post_init__(self) -> None:
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 100.0:
                raise ValueError(f"{name} must be in (0, 100], got {value!r}")
        for name in (
            "sliding_window_size",
            "minimum_number_of_calls",
            "permitted_number_of_calls_in_half_open_state",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.slow_call_duration_threshold > 0.0:
            raise ValueError(
                "slow_call_duration_threshold must be > 0, "
                f"got {self.slow_call_duration_threshold!r}"
            )
        wait = self.wait_duration_in_open_state
        if not (wait > 0.0 and math.isfinite(wait)):
            raise ValueError(f"wait_duration_in_open_state must be finite and > 0, got {wait!r}")


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    state: BreakerState
    failure_rate: float
    """Percent of buffered calls that failed, or -1.0 while below the minimum number of calls."""
    slow_call_rate: float
    """Percent of buffered calls that were slow, or -1.0 while below the minimum number of calls."""
    buffered_calls: int
    failed_calls: int
    slow_calls: int
    not_permitted_calls: int
    """Refusals over the breaker's lifetime (``reset`` zeroes them)."""


StateListener = Callable[[str, BreakerState, BreakerState], None]
"""Called as listener(name, old_state, new_state) after every state change."""


class _Window:
    """Ring buffer of the last `size` outcomes with running totals: O(1) per outcome."""

    __slots__ = ("_next", "_outcomes", "buffered", "failed", "minimum", "size", "slow")

    def __init__(self, size: int, minimum: int) -> None:
        self.size = size
        self.minimum = min(minimum, size)
        self._outcomes = [0] * size
        self._next = 0
        self.buffered = 0
        self.failed = 0
        self.slow = 0

    def add(self, *, failed: bool, slow: bool) -> None:
        if self.buffered == self.size:
            evicted = self._outcomes[self._next]
            self.failed -= evicted & _FAILED
            self.slow -= (evicted & _SLOW) >> 1
        else:
            self.buffered += 1
        outcome = (_FAILED if failed else 0) | (_SLOW if slow else 0)
        self._outcomes[self._next] = outcome
        self._next = (self._next + 1) % self.size
        self.failed += int(failed)
        self.slow += int(slow)

    @property
    def ready(self) -> bool:
        return self.buffered >= self.minimum

    def failure_rate(self) -> float:
        return self.failed * 100.0 / self.buffered if self.ready else -1.0

    def slow_call_rate(self) -> float:
        return self.slow * 100.0 / self.buffered if self.ready else -1.0


class CircuitBreaker:
    """One upstream's breaker. See the module docstring for the state machine."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = BreakerState.CLOSED
        self._window = self._closed_window()
        self._opened_at = 0.0
        self._half_open_permits_taken = 0
        self._not_permitted = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.name})"

    @property
    def state(self) -> BreakerState:
        """The current state; reading it never transitions (OPEN -> HALF_OPEN is lazy)."""
        return self._state

    def try_acquire(self) -> None:
        """Take permission for one call, or raise BreakerOpenError.

        Refused when OPEN and the wait has not elapsed (retry_after = time left), or when
        HALF_OPEN with every probe permit taken (retry_after = HALF_OPEN_RETRY_AFTER). When
        OPEN and the wait has elapsed, moves to HALF_OPEN and takes a probe permit.
        """
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.OPEN:
            remaining = self.retry_after()
            if remaining > 0.0:
                self._refuse(remaining)
            self._transition(BreakerState.HALF_OPEN)
        permits = self.config.permitted_number_of_calls_in_half_open_state
        if self._half_open_permits_taken >= permits:
            self._refuse(HALF_OPEN_RETRY_AFTER)
        self._half_open_permits_taken += 1

    def record_success(self, duration: float) -> None:
        """A permitted call succeeded after `duration` seconds."""
        self._record(failed=False, duration=duration)

    def record_failure(self, duration: float) -> None:
        """A permitted call failed (in a way that counts against the upstream)."""
        self._record(failed=True, duration=duration)

    def release(self) -> None:
        """The permitted call ended with an outcome that must not count (e.g. a 4xx other
        than 408/429, or the caller was cancelled): give back the half-open permit, record
        nothing. A no-op in CLOSED and OPEN."""
        if self._state is BreakerState.HALF_OPEN and self._half_open_permits_taken > 0:
            self._half_open_permits_taken -= 1

    def retry_after(self) -> float:
        """Seconds until an OPEN breaker may half-open; 0.0 when not OPEN."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        elapsed = self._clock() - self._opened_at
        return max(0.0, self.config.wait_duration_in_open_state - elapsed)

    def snapshot(self) -> BreakerSnapshot:
        window = self._window
        return BreakerSnapshot(
            state=self._state,
            failure_rate=window.failure_rate(),
            slow_call_rate=window.slow_call_rate(),
            buffered_calls=window.buffered,
            failed_calls=window.failed,
            slow_calls=window.slow,
            not_permitted_calls=self._not_permitted,
        )

    def reset(self) -> None:
        """Back to CLOSED with an empty window and zeroed counters."""
        self._not_permitted = 0
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)
        else:
            self._window = self._closed_window()

    # -- internals ------------------------------------------------------------------------

    def _closed_window(self) -> _Window:
        return _Window(self.config.sliding_window_size, self.config.minimum_number_of_calls)

    def _refuse(self, retry_after: float) -> NoReturn:
        self._not_permitted += 1
        raise BreakerOpenError(self.name, retry_after=retry_after)

    def _record(self, *, failed: bool, duration: float) -> None:
        if self._state is BreakerState.OPEN:
            return  # a late outcome of a call permitted before opening: ignore it
        slow = duration >= self.config.slow_call_duration_threshold
        window = self._window
        window.add(failed=failed, slow=slow)
        if not window.ready:
            return
        if self._over_threshold(window):
            self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)

    def _over_threshold(self, window: _Window) -> bool:
        return (
            window.failure_rate() >= self.config.failure_rate_threshold
            or window.slow_call_rate() >= self.config.slow_call_rate_threshold
        )

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._half_open_permits_taken = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()  # keep the window that tripped it, for snapshots
        elif new is BreakerState.HALF_OPEN:
            size = self.config.permitted_number_of_calls_in_half_open_state
            self._window = _Window(size, size)
        else:
            self._window = self._closed_window()

        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        logger.log(
            level,
            "circuit breaker %r: %s -> %s",
            self.name,
            old.name,
            new.name,
            extra={"breaker": self.name, "from_state": old.name, "to_state": new.name},
        )
        if self._on_state_change is not None:
            try:
                self._on_state_change(self.name, old, new)
            except Exception:
                logger.exception(
                    "circuit breaker %r: state listener failed",
                    self.name,
                    extra={"breaker": self.name, "from_state": old.name, "to_state": new.name},
                )
