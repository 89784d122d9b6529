"""A deterministic, OpenAI-compatible chat model for development, tests and load tests.

Nothing here talks to a real model, and it says so: every response has model
``"simulator"`` and every text answer starts with ``[simulator]``. Use it in process
(``Simulator`` / ``SimulatorChatModel``, no socket) or over HTTP (``create_app`` / ``serve``,
e.g. ``agentserve simulate --port 9100``). docs/simulator.md gives the answer rule, token
counting and ids in full.

The same request gets the same answer, byte for byte (only ``created`` varies): a report of
the tool results when the last message is from a tool; else tool calls for the offered
``calculator`` (an arithmetic expression in the last user message) and ``current_time`` (the
word ``time`` or ``clock``); else an echo of the user message. Tokens are counted with the
regex ``\\w+|[^\\w\\s]``; ``max_tokens`` truncates the answer (``finish_reason: "length"``)
but a text answer keeps its 3-token marker.

Failures are deterministic too: call n (1-based, per ``Simulator``, failed and hung calls
included, 400s not) fails iff ``floor(n * error_rate) > floor((n - 1) * error_rate)``, so
0.25 fails calls 4, 8, 12, ...; ``reset()`` restarts the count. ``latency_ms`` is spent
before answering or failing (before the first stream chunk), ``per_token_latency_ms`` per
completion token (spread over the chunks), and ``hang`` waits until cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, fields, replace
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from app.llm.types import ChatRequest, Completion, CompletionDelta, LLMError
from app.llm.wire import StreamAccumulator, parse_completion

MODEL_NAME = "simulator"
MARKER = "[simulator]"

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MARKER_TOKENS = 3  # "[", "simulator", "]"
_PIECE_RE = re.compile(r"\s*\S+\s*")
_ARG_PIECE_TOKENS = 4
_ECHO_CHARS = 80
_RESULT_CHARS = 120

_NUMBER = r"-?\d+(?:\.\d+)?"
_OPERATOR = r"(?:\*\*|[-+*/%^])"
_EXPRESSION_RE = re.compile(rf"[(\s]*{_NUMBER}[)\s]*(?:{_OPERATOR}[(\s]*{_NUMBER}[)\s]*)+")
_TIME_RE = re.compile(r"\b(?:time|clock)\b", re.IGNORECASE)
_IANA_RE = re.compile(
    r"\b(?:Africa|America|Antarctica|Arctic|Asia|Atlantic|Australia|Europe|Indian|Pacific|Etc)"
    r"(?:/[A-Za-z0-9_+\-]+)+"
)


# ---------------------------------------------------------------------------------------
# Knobs


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def _check_knob(name: str, value: object) -> object:
    """Validate one knob value; return it normalised (floats as float)."""
    if name in ("latency_ms", "per_token_latency_ms"):
        return _check_number(name, value, 0.0, math.inf)
    if name == "error_rate":
        return _check_number(name, value, 0.0, 1.0)
    if name == "error_status":
        if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
            raise ValueError(f"error_status must be an integer HTTP status 400-599, got {value!r}")
        return value
    if name == "retry_after":
        return None if value is None else _check_number(name, value, 0.0, math.inf)
    if name == "hang":
        if not isinstance(value, bool):
            raise ValueError(f"hang must be a boolean, got {value!r}")
        return value
    raise ValueError(f"unknown knob {name!r}; known knobs: {', '.join(_KNOB_NAMES)}")


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("", "none", "null") else _parse_float(text)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean (use true/false/1/0): {text!r}")


_HEADERS: dict[str, tuple[str, str, Callable[[str], object]]] = {
    "x-sim-latency-ms": ("X-Sim-Latency-Ms", "latency_ms", _parse_float),
    "x-sim-per-token-latency-ms": (
        "X-Sim-Per-Token-Latency-Ms",
        "per_token_latency_ms",
        _parse_float,
    ),
    "x-sim-error-rate": ("X-Sim-Error-Rate", "error_rate", _parse_float),
    "x-sim-error-status": ("X-Sim-Error-Status", "error_status", _parse_int),
    "x-sim-retry-after": ("X-Sim-Retry-After", "retry_after", _parse_optional_float),
    "x-sim-hang": ("X-Sim-Hang", "hang", _parse_bool),
}


@dataclass(frozen=True, slots=True)
class SimulatorKnobs:
    """How the simulator misbehaves. Validated on construction (ValueError if out of range)."""

    latency_ms: float = 0.0
    """Fixed delay before answering (and before the first stream chunk)."""
    per_token_latency_ms: float = 0.0
    """Extra delay per completion token (spread over stream chunks)."""
    error_rate: float = 0.0
    """0..1 fraction of calls that fail, deterministically (see the module docstring)."""
    error_status: int = 500
    """HTTP status of simulated failures (400-599)."""
    retry_after: float | None = None
    """Retry-After seconds sent with simulated failures."""
    hang: bool = False
    """Never answer (sleep until cancelled)."""

    def __post_init__(self) -> None:
        for name in _KNOB_NAMES:
            object.__setattr__(self, name, _check_knob(name, getattr(self, name)))

    def with_headers(self, headers: Mapping[str, str]) -> SimulatorKnobs:
        """Per-request overrides from headers X-Sim-Latency-Ms, X-Sim-Per-Token-Latency-Ms,
        X-Sim-Error-Rate, X-Sim-Error-Status, X-Sim-Retry-After, X-Sim-Hang (case-insensitive).

        Invalid values -> ValueError naming the header. Without such headers, returns self.
        """
        changes: dict[str, object] = {}
        for key, raw in headers.items():
            spec = _HEADERS.get(key.lower())
            if spec is None:
                continue
            header, name, parse = spec
            try:
                changes[name] = _check_knob(name, parse(raw.strip()))
            except ValueError as exc:
                raise ValueError(f"invalid {header} header {raw!r}: {exc}") from None
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def updated(self, changes: Mapping[str, Any]) -> SimulatorKnobs:
        """A copy with some fields changed (JSON values); unknown fields or bad values raise
        ValueError."""
        checked = {name: _check_knob(name, value) for name, value in changes.items()}
        return replace(self, **checked)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _KNOB_NAMES}


_KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SimulatorKnobs))


# ---------------------------------------------------------------------------------------
# Errors


class SimulatedError(Exception):
    """A simulated upstream failure (or a request the simulator rejects, status 400)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        retry_after: float | None = None,
        error_type: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after
        if error_type is None:
            if status_code == 429:
                error_type = "requests"
            elif status_code >= 500:
                error_type = "server_error"
            else:
                error_type = "invalid_request_error"
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": error_type, "code": code}
        }


def _invalid(message: str) -> SimulatedError:
    return SimulatedError(400, f"{MARKER} invalid request: {message}")


# ---------------------------------------------------------------------------------------
# Answer computation (pure, deterministic)


def _text_of(content: object) -> str:
    """Text of a message content: a string, None, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return str(content)


def _ascii_class(code: int) -> int:
    char = chr(code)
    if char.isalnum() or char == "_":
        return ord("a")  # \w
    return ord(" ") if char.isspace() else ord(".")


_ASCII_CLASSES = bytes(_ascii_class(code) for code in range(128)) + bytes(128)


def count_tokens(text: str) -> int:
    """Tokens in `text` according to the simulator's tokenizer (regex ``\\w+|[^\\w\\s]``).

    ASCII text, counted on every turn for the whole history, skips the regex and gets the
    same count: each character becomes its class (word, space, other), and the tokens are
    the word runs plus the other characters, counted with `bytes.count`.
    """
    if text.isascii():
        classes = b" " + text.encode("ascii").translate(_ASCII_CLASSES)
        return classes.count(b" a") + classes.count(b".a") + classes.count(b".")
    return len(_TOKEN_RE.findall(text))


def _truncate(text: str, limit: int) -> tuple[str, bool, int]:
    """`text` cut after its `limit`-th token; whether anything was cut; its tokens after.

    Text under the limit, nearly every answer, comes back whole without the regex (which
    builds a match per token), with its count so that the caller need not count it again.
    """
    tokens = count_tokens(text)
    if tokens < limit:
        return text, False, tokens
    for index, match in enumerate(_TOKEN_RE.finditer(text), start=1):
        if index == limit:
            end = match.end()
            return text[:end], bool(_TOKEN_RE.search(text, end)), limit
    return text, False, tokens


def _tool_calls_of(message: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    calls = message.get("tool_calls")
    return [call for call in calls if isinstance(call, Mapping)] if calls else []


def _function_of(call: Mapping[str, Any]) -> Mapping[str, Any]:
    function = call.get("function")
    return function if isinstance(function, Mapping) else {}


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of a conversation: its messages' texts and tool-call arguments.

    The whole history is counted on every turn, so it is counted in one pass over the texts
    joined by spaces: no token holds whitespace, so the count is exactly the sum of theirs.
    A conversation with text beyond ASCII is counted text by text, so that only those texts
    pay for the regex.
    """
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        texts.append(content if type(content) is str else _text_of(content))
        if message.get("tool_calls"):
            texts.extend(_arguments_texts(message))
    joined = " ".join(texts)
    if joined.isascii():
        return count_tokens(joined)
    return sum(count_tokens(text) for text in texts)


def _arguments_texts(message: Mapping[str, Any]) -> list[str]:
    """The arguments of a message's tool calls."""
    return [str(_function_of(call).get("arguments") or "") for call in _tool_calls_of(message)]


def _collapse(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit].rstrip() + "..."


def _balance(expression: str) -> str:
    """Drop parentheses that have no partner."""
    unmatched: list[int] = []
    opened: list[int] = []
    for index, char in enumerate(expression):
        if char == "(":
            opened.append(index)
        elif char == ")":
            if opened:
                opened.pop()
            else:
                unmatched.append(index)
    drop = set(unmatched) | set(opened)
    if not drop:
        return expression
    return "".join(char for index, char in enumerate(expression) if index not in drop).strip()


def find_expression(text: str) -> str | None:
    """The first arithmetic expression (two or more numbers joined by operators) in `text`."""
    match = _EXPRESSION_RE.search(text)
    return _balance(match.group().strip()) if match else None


def _offered_tools(payload: Mapping[str, Any]) -> frozenset[str]:
    tools = payload.get("tools")
    if not tools or payload.get("tool_choice") == "none":
        return frozenset()
    names: set[str] = set()
    for tool in tools:
        if isinstance(tool, Mapping):
            name = _function_of(tool).get("name")
            if isinstance(name, str):
                names.add(name)
    return frozenset(names)


@dataclass(slots=True)
class _Answer:
    content: str | None
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _tool_results_text(messages: Sequence[Mapping[str, Any]]) -> str:
    start = len(messages)
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    names: dict[str, str] = {}
    for message in reversed(messages[:start]):
        if message.get("role") == "assistant":
            for call in _tool_calls_of(message):
                names[str(call.get("id"))] = str(_function_of(call).get("name") or "tool")
            break
    reports = []
    for message in messages[start:]:
        name = names.get(str(message.get("tool_call_id"))) or str(message.get("name") or "tool")
        result = _collapse(_text_of(message.get("content")), _RESULT_CHARS) or "(nothing)"
        reports.append(f"{name} returned {result}")
    return f"{MARKER} " + "; ".join(reports) + "."


def _decide(payload: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]], str]:
    """(text, [(tool name, arguments)], user text) for an already validated payload."""
    messages: list[Mapping[str, Any]] = payload["messages"]
    if messages[-1].get("role") == "tool":
        return _tool_results_text(messages), [], ""
    user_text = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            user_text = _text_of(message.get("content"))
            break
    offered = _offered_tools(payload)
    calls: list[tuple[str, str]] = []
    if offered and user_text:
        if "calculator" in offered and (expression := find_expression(user_text)):
            calls.append(("calculator", orjson.dumps({"expression": expression}).decode()))
        if "current_time" in offered and _TIME_RE.search(user_text):
            zone = _IANA_RE.search(user_text)
            arguments = {"timezone": zone.group() if zone else "UTC"}
            calls.append(("current_time", orjson.dumps(arguments).decode()))
    if calls:
        return None, calls, user_text
    if user_text.strip():
        echo = _collapse(user_text, _ECHO_CHARS)
        text = f'{MARKER} You said: "{echo}". This is a simulated answer, not a real model.'
    else:
        text = f"{MARKER} No user message to answer. This is a simulated answer, not a real model."
    return text, [], user_text


def _answer(payload: Mapping[str, Any], max_tokens: int | None) -> _Answer:
    messages: list[Mapping[str, Any]] = payload["messages"]
    text, calls, user_text = _decide(payload)
    prompt = prompt_tokens(messages)
    if text is not None:
        if max_tokens is None:
            return _Answer(text, [], "stop", prompt, count_tokens(text))
        text, truncated, tokens = _truncate(text, max(max_tokens, _MARKER_TOKENS))
        return _Answer(text, [], "length" if truncated else "stop", prompt, tokens)
    digest = hashlib.sha256(f"{len(messages)}:{user_text}".encode()).hexdigest()[:12]
    budget = max_tokens
    finish_reason = "tool_calls"
    tool_calls: list[tuple[str, str, str]] = []
    completion_tokens = 0
    for index, (name, arguments) in enumerate(calls):
        if budget is None:
            tokens = count_tokens(arguments)
        else:
            if budget <= 0:
                finish_reason = "length"
                break
            arguments, truncated, tokens = _truncate(arguments, budget)
            if truncated:
                finish_reason = "length"
            budget -= tokens
        completion_tokens += tokens
        tool_calls.append((f"call_{digest}_{index}", name, arguments))
    return _Answer(None, tool_calls, finish_reason, prompt, completion_tokens)


def _usage(answer: _Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _validate(payload: object) -> int | None:
    """Check the request shape (SimulatedError 400 if wrong); return max_tokens."""
    if not isinstance(payload, Mapping):
        raise _invalid("the body must be a JSON object")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list")
    for message in messages:  # dicts first: `type() is` is far cheaper than an ABC check
        if type(message) is not dict and not isinstance(message, Mapping):
            raise _invalid("every message must be an object")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
    return max_tokens


def _pieces(text: str) -> list[str]:
    """Word-ish stream pieces whose concatenation is `text`."""
    pieces: list[str] = _PIECE_RE.findall(text)
    return pieces if pieces else ([text] if text else [])


def _argument_pieces(arguments: str) -> Iterator[str]:
    """Pieces of a few tokens each, whose concatenation is `arguments`."""
    start = 0
    for index, match in enumerate(_TOKEN_RE.finditer(arguments), start=1):
        if index % _ARG_PIECE_TOKENS == 0:
            yield arguments[start : match.end()]
            start = match.end()
    if start < len(arguments):
        yield arguments[start:]


# ---------------------------------------------------------------------------------------
# The simulator


@dataclass(slots=True)
class _Call:
    number: int
    knobs: SimulatorKnobs
    fails: bool
    max_tokens: int | None


class Simulator:
    """Deterministic OpenAI-compatible chat completions, with latency and failure knobs."""

    def __init__(self, knobs: SimulatorKnobs | None = None) -> None:
        self.knobs: SimulatorKnobs = knobs if knobs is not None else SimulatorKnobs()
        self.calls: int = 0
        self.streams_open: int = 0
        """Streamed answers being produced now: a client that goes away closes its own."""

    def reset(self) -> None:
        """Forget all calls: the count and the deterministic error sequence restart."""
        self.calls = 0

    def _admit(self, payload: Mapping[str, Any], knobs: SimulatorKnobs | None) -> _Call:
        """Validate, count the call and decide whether it fails."""
        max_tokens = _validate(payload)
        knobs = knobs if knobs is not None else self.knobs
        self.calls += 1
        number = self.calls
        rate = knobs.error_rate
        fails = rate > 0 and math.floor(number * rate) > math.floor((number - 1) * rate)
        return _Call(number, knobs, fails, max_tokens)

    @staticmethod
    def _failure(call: _Call) -> SimulatedError:
        knobs = call.knobs
        return SimulatedError(
            knobs.error_status,
            f"{MARKER} simulated failure of call {call.number} "
            f"(error_rate={knobs.error_rate:g}, status {knobs.error_status})",
            retry_after=knobs.retry_after,
            code="simulated_failure",
        )

    async def respond(
        self, payload: Mapping[str, Any], knobs: SimulatorKnobs | None = None
    ) -> dict[str, Any]:
        """A full `chat.completion` object, or raise SimulatedError. Applies latency/hang/errors."""
        call = self._admit(payload, knobs)
        knobs = call.knobs
        if knobs.hang:
            await asyncio.Event().wait()
        if call.fails:
            if knobs.latency_ms:
                await asyncio.sleep(knobs.latency_ms / 1000)
            raise self._failure(call)
        answer = _answer(payload, call.max_tokens)
        delay = knobs.latency_ms + knobs.per_token_latency_ms * answer.completion_tokens
        if delay:
            await asyncio.sleep(delay / 1000)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            message["tool_calls"] = [
                {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}
                for id_, name, args in answer.tool_calls
            ]
        return {
            "id": f"chatcmpl-sim-{call.number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": _usage(answer),
        }

    def respond_stream(
        self, payload: Mapping[str, Any], knobs: SimulatorKnobs | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """`chat.completion.chunk` objects: a role chunk, content pieces or tool_call deltas, a
        finish chunk, and a usage chunk when payload has ``stream_options.include_usage``.

        The call is validated (SimulatedError 400) and counted right away; latency, hang and
        simulated failures happen when the first chunk is awaited, before it is produced.
        """
        call = self._admit(payload, knobs)
        return self._stream(payload, call)

    async def _stream(
        self, payload: Mapping[str, Any], call: _Call
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.streams_open += 1
        try:
            async for item in self._stream_chunks(payload, call):
                yield item
        finally:
            self.streams_open -= 1

    async def _stream_chunks(
        self, payload: Mapping[str, Any], call: _Call
    ) -> AsyncGenerator[dict[str, Any], None]:
        knobs = call.knobs
        if knobs.hang:
            await asyncio.Event().wait()
        if knobs.latency_ms:
            await asyncio.sleep(knobs.latency_ms / 1000)
        if call.fails:
            raise self._failure(call)
        answer = _answer(payload, call.max_tokens)
        response_id = f"chatcmpl-sim-{call.number}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL_NAME,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        deltas: list[dict[str, Any]] = []
        if answer.content is not None:
            deltas = [{"content": piece} for piece in _pieces(answer.content)]
        for index, (id_, name, arguments) in enumerate(answer.tool_calls):
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": id_,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
            deltas.extend(
                {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                for piece in _argument_pieces(arguments)
            )
        pause = 0.0
        if knobs.per_token_latency_ms and deltas:
            pause = knobs.per_token_latency_ms * answer.completion_tokens / len(deltas) / 1000

        yield chunk({"role": "assistant", "content": "" if answer.content is not None else None})
        for delta in deltas:
            if pause:
                await asyncio.sleep(pause)
            yield chunk(delta)
        yield chunk({}, answer.finish_reason)
        options = payload.get("stream_options")
        if isinstance(options, Mapping) and options.get("include_usage"):
            yield {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL_NAME,
                "choices": [],
                "usage": _usage(answer),
            }


# ---------------------------------------------------------------------------------------
# In-process chat model


def _llm_error(exc: SimulatedError, upstream: str) -> LLMError:
    return LLMError(
        f"upstream {upstream!r} returned HTTP {exc.status_code}: {exc}",
        upstream=upstream,
        kind="status",
        status_code=exc.status_code,
        retry_after=exc.retry_after,
    )


class SimulatorChatModel:
    """A StreamingChatModel backed by a Simulator in the same process (no socket)."""

    def __init__(self, simulator: Simulator, *, name: str = MODEL_NAME) -> None:
        self.simulator = simulator
        self.name = name

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            data = await self.simulator.respond(request.to_payload())
        except SimulatedError as exc:
            raise _llm_error(exc, self.name) from exc
        return parse_completion(data, upstream=self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[CompletionDelta | Completion]:
        accumulator = StreamAccumulator(upstream=self.name)
        try:
            chunks = self.simulator.respond_stream(request.to_payload(stream=True))
        except SimulatedError as exc:
            raise _llm_error(exc, self.name) from exc
        async with aclosing(chunks):
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except SimulatedError as exc:
                    raise _llm_error(exc, self.name) from exc
                text = accumulator.feed(chunk)
                if text:
                    yield CompletionDelta(text)
        yield accumulator.result()


# ---------------------------------------------------------------------------------------
# HTTP server

_JSON = "application/json"
_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "agentserve"}],
    }
)


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status_code, media_type=_JSON, headers=headers
    )


def _error_response(exc: SimulatedError) -> Response:
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": f"{exc.retry_after:g}"}
    return _json(exc.body, exc.status_code, headers)


def _bad_request(message: str, status_code: int = 400) -> Response:
    return _json(
        {"error": {"message": message, "type": "invalid_request_error", "code": None}}, status_code
    )


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(simulator: Simulator) -> FastAPI:
    """The simulator's HTTP server: OpenAI routes plus /sim/* controls."""
    app = FastAPI(title="agentserve simulator", version="1")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _bad_request(f"{MARKER} invalid request: body is not valid JSON: {exc}")
        try:
            knobs = simulator.knobs.with_headers(request.headers)
        except ValueError as exc:
            return _bad_request(f"{MARKER} invalid request: {exc}")
        try:
            if knobs.hang:
                simulator._admit(payload, knobs)  # counts the call, then never answers
                await _until_disconnected(request)
                return Response(status_code=499)
            if not (isinstance(payload, dict) and payload.get("stream")):
                return _json(await simulator.respond(payload, knobs))
            chunks = simulator.respond_stream(payload, knobs)
            first = await anext(chunks)
        except SimulatedError as exc:
            return _error_response(exc)

        async def events() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                yield b"data: " + orjson.dumps(first) + b"\n\n"
                async for chunk in chunks:
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(_MODELS, media_type=_JSON)

    def stats() -> dict[str, Any]:
        return {
            "calls": simulator.calls,
            "streams_open": simulator.streams_open,
            "knobs": simulator.knobs.as_dict(),
        }

    @app.get("/sim/stats")
    async def get_stats() -> Response:
        return _json(stats())

    @app.put("/sim/knobs")
    async def put_knobs(request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _bad_request(f"body is not valid JSON: {exc}", 422)
        if not isinstance(changes, dict):
            return _bad_request("body must be a JSON object of knob fields", 422)
        try:
            simulator.knobs = simulator.knobs.updated(changes)
        except ValueError as exc:
            return _bad_request(str(exc), 422)
        return _json(simulator.knobs.as_dict())

    @app.post("/sim/reset")
    async def reset() -> Response:
        simulator.reset()
        return _json(stats())

    return app


def serve(host: str, port: int, knobs: SimulatorKnobs) -> None:
    """Run the simulator's HTTP server until interrupted."""
    uvicorn.run(
        create_app(Simulator(knobs)),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
    )
