from __future__ import annotations

import asyncio
import re
import threading
from typing import Annotated, Any

import orjson
import pytest
from pydantic import BaseModel, Field

from app.agents.tools import Tool, ToolRegistry, ToolResult, builtin_registry


def _registry_with_samples() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.register
    def add(a: int, b: int = 2) -> int:
        """Add two integers.

        This second paragraph is not part of the description.
        """
        return a + b

    @registry.register(name="search-docs", description="Search the documentation.")
    async def search(
        query: Annotated[str, Field(description="What to look for.")],
        limit: int = 5,
        title: str | None = None,
    ) -> dict[str, Any]:
        return {"query": query, "limit": limit, "title": title}

    return registry


# ---------------------------------------------------------------------------------------
# Schemas


def test_schema_shape_from_signature_and_docstring() -> None:
    registry = _registry_with_samples()
    schema = registry.get("add").schema
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "add"
    assert function["description"] == "Add two integers."
    parameters = function["parameters"]
    assert parameters["type"] == "object"
    assert parameters["properties"]["a"]["type"] == "integer"
    assert parameters["properties"]["b"]["type"] == "integer"
    assert parameters["properties"]["b"]["default"] == 2
    assert parameters["required"] == ["a"]
    assert parameters["additionalProperties"] is False


def test_schema_uses_given_name_description_and_field_descriptions() -> None:
    registry = _registry_with_samples()
    tool = registry.get("search-docs")
    function = tool.schema["function"]
    assert tool.name == function["name"] == "search-docs"
    assert tool.description == function["description"] == "Search the documentation."
    properties = function["parameters"]["properties"]
    assert properties["query"]["description"] == "What to look for."
    assert set(properties) == {"query", "limit", "title"}
    assert function["parameters"]["required"] == ["query"]


def test_schema_titles_are_stripped_but_a_parameter_named_title_is_kept() -> None:
    parameters = _registry_with_samples().get("search-docs").schema["function"]["parameters"]
    assert "title" not in parameters
    assert "title" in parameters["properties"]
    for prop in parameters["properties"].values():
        assert "title" not in prop


def test_schema_of_tool_without_parameters_is_an_object() -> None:
    registry = ToolRegistry()

    @registry.register
    def ping() -> str:
        return "pong"

    parameters = registry.get("ping").schema["function"]["parameters"]
    assert parameters["type"] == "object"
    assert parameters["properties"] == {}
    assert parameters["required"] == []
    assert registry.get("ping").description == ""


def test_schema_is_json_serializable() -> None:
    registry = builtin_registry()
    orjson.dumps(registry.schemas(registry.names()))


def test_parameters_may_shadow_basemodel_attributes() -> None:
    registry = ToolRegistry()

    @registry.register
    def odd(json: str, schema: int, model_config: bool = False) -> str:
        return f"{json}-{schema}-{model_config}"

    properties = registry.get("odd").schema["function"]["parameters"]["properties"]
    assert set(properties) == {"json", "schema", "model_config"}


def test_register_returns_the_function_unchanged() -> None:
    registry = ToolRegistry()

    def double(x: int) -> int:
        return 2 * x

    assert registry.register(double) is double
    assert registry.register(name="double2")(double) is double
    assert double(4) == 8


# ---------------------------------------------------------------------------------------
# Registration errors


def test_duplicate_name_is_rejected() -> None:
    registry = _registry_with_samples()

    def add(a: int) -> int:
        return a

    with pytest.raises(ValueError, match="already registered"):
        registry.register(add)


@pytest.mark.parametrize("name", ["", "has space", "dots.not.ok", "a" * 65, "tool\n", "é"])
def test_invalid_name_is_rejected(name: str) -> None:
    def fn(a: int) -> int:
        return a

    with pytest.raises(ValueError, match="invalid tool name"):
        ToolRegistry().register(fn, name=name)


def test_name_of_64_characters_is_accepted() -> None:
    registry = ToolRegistry()

    def fn(a: int) -> int:
        return a

    registry.register(fn, name="a" * 64)
    assert "a" * 64 in registry


def test_missing_type_hint_is_rejected() -> None:
    def untyped(a, b: int):
        return a

    with pytest.raises(TypeError, match="'a' has no type hint"):
        ToolRegistry().register(untyped)


def test_var_args_are_rejected() -> None:
    def variadic(*args: int) -> int:
        return sum(args)

    with pytest.raises(TypeError, match="not supported"):
        ToolRegistry().register(variadic)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_invalid_timeout_is_rejected(timeout: float) -> None:
    def fn(a: int) -> int:
        return a

    with pytest.raises(ValueError, match="timeout"):
        ToolRegistry().register(fn, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Invocation


async def test_invoke_with_valid_arguments() -> None:
    registry = _registry_with_samples()
    assert await registry.invoke("add", '{"a": 1, "b": 41}') == ToolResult("42")
    assert await registry.invoke("add", '{"a": 1}') == ToolResult("3")
    # lax validation: a numeric string is coerced like pydantic does by default
    assert await registry.invoke("add", '{"a": "5"}') == ToolResult("7")


async def test_invoke_through_tool_directly() -> None:
    tool = _registry_with_samples().get("add")
    assert isinstance(tool, Tool)
    assert await tool.invoke('{"a": 2, "b": 3}') == ToolResult("5")


async def test_dict_results_are_json_encoded_with_orjson() -> None:
    registry = _registry_with_samples()
    result = await registry.invoke("search-docs", '{"query": "pools", "limit": 3}')
    assert not result.is_error
    assert result.content == orjson.dumps({"query": "pools", "limit": 3, "title": None}).decode()
    assert orjson.loads(result.content) == {"query": "pools", "limit": 3, "title": None}


async def test_pydantic_model_results_are_encoded() -> None:
    class Point(BaseModel):
        x: int
        y: int

    registry = ToolRegistry()

    @registry.register
    def origin() -> Point:
        return Point(x=0, y=0)

    assert await registry.invoke("origin", "{}") == ToolResult('{"x":0,"y":0}')


async def test_unencodable_result_is_an_error() -> None:
    registry = ToolRegistry()

    @registry.register
    def opaque() -> object:
        return object()

    result = await registry.invoke("opaque", "{}")
    assert result.is_error
    assert result.content.startswith("opaque failed: could not encode result")


async def test_empty_arguments_count_as_empty_object() -> None:
    registry = ToolRegistry()

    @registry.register
    def ping() -> str:
        return "pong"

    assert await registry.invoke("ping", "") == ToolResult("pong")
    assert await registry.invoke("ping", "{}") == ToolResult("pong")


async def test_invalid_json_is_an_error_result() -> None:
    result = await _registry_with_samples().invoke("add", '{"a": 1')
    assert result.is_error
    assert result.content.startswith("invalid arguments for add: invalid JSON")


@pytest.mark.parametrize(
    ("arguments", "kind"), [("[1, 2]", "list"), ("3", "int"), ("null", "null")]
)
async def test_non_object_json_is_an_error_result(arguments: str, kind: str) -> None:
    result = await _registry_with_samples().invoke("add", arguments)
    assert result == ToolResult(
        f"invalid arguments for add: expected a JSON object, got {kind}", is_error=True
    )


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ("{}", "a: Field required"),
        ('{"a": 1, "c": 3}', "c: Extra inputs are not permitted"),
        ('{"a": "one"}', "a: Input should be a valid integer"),
        ('{"a": [1]}', "a: Input should be a valid integer"),
        ('{"p0": 1}', "a: Field required"),
    ],
)
async def test_validation_errors_are_short_error_results(arguments: str, fragment: str) -> None:
    result = await _registry_with_samples().invoke("add", arguments)
    assert result.is_error
    assert result.content.startswith("invalid arguments for add: ")
    assert fragment in result.content
    assert "errors.pydantic.dev" not in result.content


async def test_raising_tool_is_an_error_result() -> None:
    registry = ToolRegistry()

    @registry.register
    def explode(reason: str) -> str:
        raise RuntimeError(reason)

    result = await registry.invoke("explode", '{"reason": "boom"}')
    assert result == ToolResult("explode failed: RuntimeError: boom", is_error=True)


async def test_raising_async_tool_is_an_error_result() -> None:
    registry = ToolRegistry()

    @registry.register
    async def explode() -> str:
        raise LookupError("nothing here")

    result = await registry.invoke("explode", "{}")
    assert result == ToolResult("explode failed: LookupError: nothing here", is_error=True)


async def test_slow_async_tool_times_out() -> None:
    registry = ToolRegistry()
    finished = False

    @registry.register(timeout=0.05)
    async def slow() -> str:
        nonlocal finished
        await asyncio.sleep(10)
        finished = True
        return "done"

    result = await registry.invoke("slow", "{}")
    assert result == ToolResult("slow timed out after 0.05s", is_error=True)
    assert not finished


async def test_timeout_error_raised_by_the_tool_itself_is_a_failure() -> None:
    registry = ToolRegistry()

    @registry.register(timeout=5)
    async def upstream() -> str:
        raise TimeoutError("upstream took too long")

    result = await registry.invoke("upstream", "{}")
    assert result == ToolResult(
        "upstream failed: TimeoutError: upstream took too long", is_error=True
    )


async def test_slow_sync_tool_in_thread_times_out() -> None:
    registry = ToolRegistry()
    release = threading.Event()

    @registry.register(timeout=0.05)
    def blocking() -> str:
        release.wait(5)
        return "done"

    try:
        result = await registry.invoke("blocking", "{}")
    finally:
        release.set()
    assert result == ToolResult("blocking timed out after 0.05s", is_error=True)


async def test_sync_tool_runs_in_a_worker_thread() -> None:
    registry = ToolRegistry()

    @registry.register
    def where() -> int:
        return threading.get_ident()

    result = await registry.invoke("where", "{}")
    assert not result.is_error
    assert int(result.content) != threading.get_ident()


async def test_inline_sync_tool_runs_on_the_event_loop_thread() -> None:
    registry = ToolRegistry()

    @registry.register(inline=True)
    def where() -> int:
        return threading.get_ident()

    result = await registry.invoke("where", "{}")
    assert int(result.content) == threading.get_ident()


async def test_cancellation_propagates() -> None:
    registry = ToolRegistry()
    started = asyncio.Event()

    @registry.register
    async def wait_forever() -> str:
        started.set()
        await asyncio.sleep(10)
        return "never"

    task = asyncio.create_task(registry.invoke("wait_forever", "{}"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_positional_only_parameters_are_passed_positionally() -> None:
    registry = ToolRegistry()

    @registry.register
    def sub(a: int, b: int, /) -> int:
        return a - b

    assert await registry.invoke("sub", '{"a": 10, "b": 4}') == ToolResult("6")


# ---------------------------------------------------------------------------------------
# Registry


async def test_unknown_tool_is_an_error_result() -> None:
    result = await _registry_with_samples().invoke("nope", "{}")
    assert result.is_error
    assert result.content.startswith("unknown tool nope")


def test_get_unknown_tool_raises_key_error() -> None:
    with pytest.raises(KeyError, match="unknown tool 'nope'"):
        _registry_with_samples().get("nope")


def test_names_and_contains() -> None:
    registry = _registry_with_samples()
    assert registry.names() == ["add", "search-docs"]
    assert "add" in registry
    assert "search" not in registry
    assert 42 not in registry


def test_schemas_follow_the_requested_order() -> None:
    registry = _registry_with_samples()
    names = [s["function"]["name"] for s in registry.schemas(["search-docs", "add"])]
    assert names == ["search-docs", "add"]
    assert registry.schemas([]) == []


def test_schemas_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="missing"):
        _registry_with_samples().schemas(["add", "missing"])


def test_schemas_are_copies() -> None:
    registry = _registry_with_samples()
    registry.schemas(["add"])[0]["function"]["name"] = "mutated"
    assert registry.get("add").schema["function"]["name"] == "add"


# ---------------------------------------------------------------------------------------
# Built-ins


def test_builtin_registry_is_new_each_time() -> None:
    first, second = builtin_registry(), builtin_registry()
    assert first is not second
    assert first.names() == ["calculator", "current_time"]
    first.register(lambda: "x", name="extra")
    assert "extra" not in second


async def test_builtin_calculator() -> None:
    registry = builtin_registry()
    assert await registry.invoke("calculator", '{"expression": "(2 + 3) * 4"}') == ToolResult("20")
    assert await registry.invoke("calculator", '{"expression": "2 ^ 10 / 4"}') == ToolResult("256")
    assert await registry.invoke("calculator", '{"expression": "1 / 3"}') == ToolResult(
        "0.333333333333"
    )


@pytest.mark.parametrize(
    "expression", ["1/0", "9**9**9", "__import__('os')", "().__class__", "x" * 1000]
)
async def test_builtin_calculator_errors(expression: str) -> None:
    arguments = orjson.dumps({"expression": expression}).decode()
    result = await builtin_registry().invoke("calculator", arguments)
    assert result.is_error
    assert result.content.startswith("calculator failed: CalculatorError: ")


def test_builtin_calculator_schema() -> None:
    function = builtin_registry().get("calculator").schema["function"]
    assert function["description"].startswith("Evaluate an arithmetic expression")
    assert function["parameters"]["required"] == ["expression"]
    assert "description" in function["parameters"]["properties"]["expression"]


_ISO = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}"


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"])
async def test_builtin_current_time(zone: str) -> None:
    arguments = orjson.dumps({"timezone": zone}).decode()
    result = await builtin_registry().invoke("current_time", arguments)
    assert not result.is_error
    assert zone in result.content
    assert re.fullmatch(rf"{_ISO} \({re.escape(zone)}\)", result.content)


async def test_builtin_current_time_defaults_to_utc() -> None:
    result = await builtin_registry().invoke("current_time", "{}")
    assert re.fullmatch(rf"{_ISO} \(UTC\)", result.content)
    assert "+00:00" in result.content


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus_Mons",
        "Europe",
        "../../etc/passwd",
        "/etc/passwd",
        "Europe/../../../etc/passwd",
        "",
        "UTC\x00",
        "x" * 500,
    ],
)
async def test_builtin_current_time_rejects_unknown_zones(zone: str) -> None:
    arguments = orjson.dumps({"timezone": zone}).decode()
    result = await builtin_registry().invoke("current_time", arguments)
    assert result.is_error
    assert result.content.startswith("current_time failed: ValueError: unknown timezone")
    assert len(result.content) < 200
