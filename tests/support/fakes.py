"""Stand-ins that every suite may use: a clock the test moves, and a chat model that answers
from a script."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

from app.domain import Message
from app.llm.types import ChatRequest, Completion


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Hang:
    """Script step: never answer (until cancelled)."""


HANG: Final = Hang()

Step = Completion | BaseException | Hang


class ScriptedModel:
    """A ChatModel answering from a script, one step per call (the last step repeats): a
    Completion is returned, an exception raised, HANG waits until cancelled. It records each
    request, a copy of its messages (the agent appends to its own list) and when it came."""

    def __init__(self, *script: Step) -> None:
        assert script, "a script needs at least one step"
        self.script = list(script)
        self.requests: list[ChatRequest] = []
        self.seen_messages: list[list[Message]] = []
        self.call_times: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def complete(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        self.seen_messages.append([dict(m) for m in request.messages])
        self.call_times.append(time.perf_counter())
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Hang):
            await asyncio.Event().wait()
            raise AssertionError("unreachable")
        if isinstance(step, BaseException):
            raise step
        return step


@dataclass
class RedisEvents:
    """A RedisGuard observer that records what it is told: failed operations, states."""

    errors: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    def on_redis_error(self, operation: str) -> None:
        self.errors.append(operation)

    def on_redis_state(self, state: str) -> None:
        self.states.append(state)
