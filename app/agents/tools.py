"""A small registry of tools that agents can call through OpenAI tool calling.

A typed Python function becomes a `Tool`: its signature is turned into a pydantic model
once, at registration, which both validates the model's JSON arguments and produces the
JSON schema advertised to the model. Invoking a tool never raises (except for
cancellation): every failure becomes an error `ToolResult` the model can read and react to.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from app.agents import calculator as _calculator
from app.llm.types import ToolSchema

__all__ = ["Tool", "ToolRegistry", "ToolResult", "builtin_registry"]

F = TypeVar("F", bound=Callable[..., Any])

_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MAX_ERRORS_SHOWN = 5
_MAX_ECHO = 80
"""Longest piece of model-controlled text (a tool name, a zone) echoed back in messages."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    content: str
    is_error: bool = False


class Tool:
    """One callable tool: its schema, its argument model and how to run it."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = 10.0,
        inline: bool = False,
    ) -> None:
        if name is None:
            name = getattr(fn, "__name__", None)
            if name is None:
                raise TypeError(f"cannot derive a tool name from {fn!r}; pass name=...")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid tool name {name!r}: must match ^[a-zA-Z0-9_-]{{1,64}}$")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout of tool {name!r} must be a positive number of seconds")
        self.name = name
        self.description = _first_paragraph(fn) if description is None else description.strip()
        self.timeout = float(timeout)
        self.inline = inline
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)
        self._model, self._params = _argument_model(fn, name)
        self.schema: ToolSchema = {
            "type": "function",
            "function": {
                "name": name,
                "description": self.description,
                "parameters": _parameters_schema(self._model),
            },
        }

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, timeout={self.timeout}, inline={self.inline})"

    async def invoke(self, arguments: str) -> ToolResult:
        """Validate `arguments` (the model's JSON string), run the function, encode the result.

        Never raises except `asyncio.CancelledError`; an empty string counts as `{}`
        (some models send that for tools without parameters).
        """
        try:
            args, kwargs = self._parse(arguments)
        except _InvalidArgumentsError as exc:
            return ToolResult(f"invalid arguments for {self.name}: {exc}", is_error=True)

        try:
            async with asyncio.timeout(self.timeout) as deadline:
                result = await self._call(args, kwargs)
        except TimeoutError as exc:
            if deadline.expired():
                return ToolResult(f"{self.name} timed out after {self.timeout:g}s", is_error=True)
            return self._failure(exc)
        except Exception as exc:
            return self._failure(exc)

        try:
            return ToolResult(_encode(result))
        except Exception as exc:
            return ToolResult(
                f"{self.name} failed: could not encode result: {type(exc).__name__}: {exc}",
                is_error=True,
            )

    def _parse(self, arguments: str) -> tuple[list[Any], dict[str, Any]]:
        if not isinstance(arguments, str | bytes):
            raise _InvalidArgumentsError("arguments must be a JSON string")
        if not arguments.strip():
            arguments = "{}"
        try:
            data = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise _InvalidArgumentsError(f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            kind = "null" if data is None else type(data).__name__
            raise _InvalidArgumentsError(f"expected a JSON object, got {kind}")
        try:
            validated = self._model.model_validate(data)
        except ValidationError as exc:
            raise _InvalidArgumentsError(_summarize(exc)) from None
        except Exception as exc:  # a custom validator raising something pydantic passes on
            raise _InvalidArgumentsError(f"{type(exc).__name__}: {exc}") from None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for param in self._params:
            value = getattr(validated, param.field)
            if param.positional_only:
                args.append(value)
            else:
                kwargs[param.name] = value
        return args, kwargs

    async def _call(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if self._is_async:
            result = await self._fn(*args, **kwargs)
        elif self.inline:
            result = self._fn(*args, **kwargs)
        else:
            result = await asyncio.to_thread(self._fn, *args, **kwargs)
        if inspect.isawaitable(result):  # a sync wrapper around a coroutine function
            result = await result
        return result

    def _failure(self, exc: Exception) -> ToolResult:
        return ToolResult(f"{self.name} failed: {type(exc).__name__}: {exc}", is_error=True)


class ToolRegistry:
    """Named tools; `register` is usable as `@registry.register` or `@registry.register(...)`."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    @overload
    def register(
        self,
        fn: F,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = 10.0,
        inline: bool = False,
    ) -> F: ...

    @overload
    def register(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = 10.0,
        inline: bool = False,
    ) -> Callable[[F], F]: ...

    def register(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = 10.0,
        inline: bool = False,
    ) -> F | Callable[[F], F]:
        """Register `fn` as a tool and return it unchanged.

        `inline=True` runs a sync function on the event loop, where a timeout cannot stop
        it: only for pure, bounded, fast functions. Other sync functions run in a worker
        thread (abandoned, not killed, on timeout); coroutine functions are awaited.
        """

        def decorate(func: F) -> F:
            tool = Tool(func, name=name, description=description, timeout=timeout, inline=inline)
            if tool.name in self._tools:
                raise ValueError(f"tool {tool.name!r} is already registered")
            self._tools[tool.name] = tool
            return func

        if fn is None:
            return decorate
        return decorate(fn)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(self._tools) or "none"
            raise KeyError(f"unknown tool {name!r} (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def schemas(self, names: Iterable[str]) -> list[ToolSchema]:
        """Schemas for `names`, in the given order (duplicates dropped); KeyError if unknown.

        Each schema is a fresh copy, so callers may mutate it.
        """
        seen: dict[str, ToolSchema] = {}
        for name in names:
            if name not in seen:
                seen[name] = copy.deepcopy(self.get(name).schema)
        return list(seen.values())

    async def invoke(self, name: str, arguments: str) -> ToolResult:
        """Run tool `name`; an unknown tool is an error result, never an exception."""
        tool = self._tools.get(name)
        if tool is None:
            shown = name if len(name) <= _MAX_ECHO else name[:_MAX_ECHO] + "..."
            known = ", ".join(self._tools) or "none"
            return ToolResult(f"unknown tool {shown}; available tools: {known}", is_error=True)
        return await tool.invoke(arguments)


# ---------------------------------------------------------------------------------------
# Built-in tools.


def calculator(
    expression: Annotated[
        str,
        Field(description="Arithmetic expression, e.g. '(2 + 3) * 4 / 7' or '2 ^ 10'."),
    ],
) -> str:
    """Evaluate an arithmetic expression with + - * / // % and ** (or ^), parentheses and
    decimal numbers. Use it for any non-trivial arithmetic instead of computing by hand.
    """
    return _calculator.format_result(_calculator.evaluate(expression))


_TIMEZONE_RE = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")


def current_time(
    timezone: Annotated[
        str,
        Field(description="IANA timezone name, e.g. 'UTC', 'Europe/Paris', 'America/New_York'."),
    ] = "UTC",
) -> str:
    """Get the current date and time in an IANA timezone, as ISO 8601 with the UTC offset."""
    shown = timezone if len(timezone) <= _MAX_ECHO else timezone[:_MAX_ECHO] + "..."
    if len(timezone) > 64 or not _TIMEZONE_RE.fullmatch(timezone):
        raise ValueError(f"unknown timezone {shown!r}")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ZoneInfoNotFoundError is a KeyError; ValueError covers keys zoneinfo refuses
        # (absolute or escaping paths); OSError e.g. a directory such as "Europe".
        raise ValueError(f"unknown timezone {shown!r}") from None
    now = datetime.now(zone).replace(microsecond=0)
    return f"{now.isoformat()} ({zone.key})"


def builtin_registry() -> ToolRegistry:
    """A new registry holding the built-in tools `calculator` and `current_time`."""
    registry = ToolRegistry()
    registry.register(calculator, timeout=2.0, inline=True)
    registry.register(current_time, timeout=2.0, inline=True)
    return registry


# ---------------------------------------------------------------------------------------
# Internals.


class _InvalidArgumentsError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    field: str
    positional_only: bool


def _first_paragraph(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    paragraph = doc.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def _argument_model(fn: Callable[..., Any], tool_name: str) -> tuple[type[BaseModel], list[_Param]]:
    """Build the pydantic model validating `fn`'s arguments (once, at registration).

    Field names are synthetic (`p0`, `p1`, ...) with the parameter names as aliases, so
    parameters may be called anything (`json`, `schema`, `model_config`, `_private`...)
    without clashing with BaseModel attributes.
    """
    try:
        signature = inspect.signature(fn)
        hints = _parameter_hints(fn)
    except (TypeError, ValueError, NameError) as exc:
        raise TypeError(f"cannot inspect the signature of tool {tool_name!r}: {exc}") from exc
    fields: dict[str, Any] = {}
    params: list[_Param] = []
    for index, param in enumerate(signature.parameters.values()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args/**kwargs parameters are not supported")
        if param.name not in hints:
            raise TypeError(f"tool {tool_name!r}: parameter {param.name!r} has no type hint")
        field = f"p{index}"
        default = ... if param.default is param.empty else param.default
        fields[field] = (hints[param.name], Field(default, alias=param.name))
        params.append(_Param(param.name, field, param.kind is param.POSITIONAL_ONLY))
    model = create_model(
        f"{tool_name}_arguments",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )
    return model, params


def _parameter_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved parameter annotations; the return annotation is ignored, so it may name
    types that are not resolvable at runtime (local classes, TYPE_CHECKING imports)."""
    annotations = dict(getattr(fn, "__annotations__", None) or {})
    annotations.pop("return", None)
    holder = types.SimpleNamespace(__annotations__=annotations)
    globalns = getattr(inspect.unwrap(fn), "__globals__", {})
    return typing.get_type_hints(holder, globalns=globalns, include_extras=True)


def _parameters_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema: dict[str, Any] = _strip_titles(model.model_json_schema())
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    schema.setdefault("required", [])
    return schema


_NAMED_CHILDREN = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_LITERAL_VALUES = frozenset({"default", "const", "enum", "examples"})


def _strip_titles(node: Any) -> Any:
    """Drop pydantic's generated "title" keys, keeping properties that are named "title"."""
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _LITERAL_VALUES:
            out[key] = value
        elif key in _NAMED_CHILDREN and isinstance(value, dict):
            out[key] = {name: _strip_titles(sub) for name, sub in value.items()}
        else:
            out[key] = _strip_titles(value)
    return out


def _summarize(exc: ValidationError) -> str:
    """A short, model-readable summary: 'a: Field required; b: Input should be ...'."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for error in errors[:_MAX_ERRORS_SHOWN]:
        location = ".".join(str(part) for part in error["loc"])
        parts.append(f"{location}: {error['msg']}" if location else error["msg"])
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more errors")
    return "; ".join(parts)


def _encode(result: Any) -> str:
    if isinstance(result, str):
        return result
    return orjson.dumps(result, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
