"""Bodies of the OpenAI-compatible API (/v1): what the official SDKs send and read.

Requests are checked strictly: a parameter this service cannot honour is refused with
`ParameterError` (400, OpenAI's `param` names it), never dropped. Responses are built as
plain dicts on the hot path (app.api.openai); the models below document them in OpenAPI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from app.domain import Message
from app.errors import AppError

UNSUPPORTED = "unsupported_parameter"
"""The error type (pydantic) and code (the API) of a parameter this service cannot honour."""


class ParameterError(AppError):
    """A /v1 request parameter that is invalid or cannot be honoured, named in `param`."""

    status = 400

    def __init__(self, param: str | None, message: str, *, code: str = UNSUPPORTED) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def storable(value: str) -> str:
    """Text every database can store: no NUL, no lone surrogates."""
    if "\x00" in value:
        raise ValueError("strings must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
    return value


# --- the request ------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """A part of a message's content: only text parts are understood."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _storable(cls, value: str) -> str:
        return storable(value)


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str

    @field_validator("name", "arguments")
    @classmethod
    def _storable(cls, value: str) -> str:
        return storable(value)


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, as the client kept it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"]
    function: FunctionIn

    @field_validator("id")
    @classmethod
    def _storable(cls, value: str) -> str:
        return storable(value)


class ChatMessageIn(BaseModel):
    """One message of the conversation. `developer` is sent to the model as `system`."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # what an SDK's own assistant message carries when a client sends it back: empty only
    refusal: None = None
    audio: None = None
    function_call: None = None
    annotations: Annotated[list[Any], Field(max_length=0)] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Images, audio and files are refused by name, ahead of the type checks."""
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    UNSUPPORTED,
                    "content parts of type '{kind}' are not supported; send text",
                    {"kind": kind},
                )
        return value

    @field_validator("content", "name", "tool_call_id")
    @classmethod
    def _storable(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        return storable(value) if isinstance(value, str) else value

    def text(self) -> str | None:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content

    def problem(self) -> str | None:
        """What is wrong with the message for its role, if anything."""
        if self.role != "assistant" and self.content is None:
            return f"a {self.role} message needs `content`"
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            return "an assistant message needs `content` or `tool_calls`"
        if self.tool_calls and self.role != "assistant":
            return "only assistant messages have `tool_calls`"
        if (self.role == "tool") != (self.tool_call_id is not None):
            return "a tool message needs `tool_call_id`, and only a tool message has one"
        return None

    def to_wire(self) -> Message:
        message: Message = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(
        None, description="Send a last chunk with `usage` (and empty `choices`)."
    )


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
INT64 = 2**63

KNOWN_PARAMETERS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "modalities",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "safety_identifier",
        "service_tier",
        "store",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "verbosity",
        "web_search_options",
    }
)
"""Chat Completions parameters this service does not take (beyond the declared fields). A
null is taken as not sent; so is a default below, which changes nothing."""
NO_OP_DEFAULTS: dict[str, float | bool] = {
    "n": 1,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
}
TOOLS_MESSAGE = "client-supplied tools are not supported: the agent's own tools run on the server"
REASONS = {
    "tools": TOOLS_MESSAGE,
    "tool_choice": TOOLS_MESSAGE,
    "parallel_tool_calls": TOOLS_MESSAGE,
    "functions": TOOLS_MESSAGE,
    "function_call": TOOLS_MESSAGE,
    "n": "only one choice is supported (n=1)",
    "logprobs": "log probabilities are not available",
    "top_logprobs": "log probabilities are not available",
}


def is_no_op(name: str, value: Any) -> bool:
    if value is None:
        return True
    default = NO_OP_DEFAULTS.get(name)
    if default is None:
        return False
    if isinstance(default, bool):
        return value is default
    return not isinstance(value, bool) and isinstance(value, int | float) and value == default


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. `model` is an agent's name (GET /v1/models)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "tools", "messages": [{"role": "user", "content": "What is (12+30)*2?"}]}
            ]
        },
    )

    model: str = Field(min_length=1, max_length=128, description="The agent to ask.")
    messages: list[ChatMessageIn] = Field(
        min_length=1, description="The conversation; the last message is the user's."
    )
    stream: bool | None = Field(None, description="Answer as `chat.completion.chunk` events.")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(
        None, ge=1, lt=2**31, description="Per model call; never above the agent's."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, lt=2**31, description="As `max_tokens` (with both, the lower counts)."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    user: str | None = Field(None, max_length=256, description="Stored with the session.")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=16, description="Stored with the session (with `user`)."
    )
    response_format: dict[str, Any] | None = Field(
        None, description='Only `{"type": "text"}`: structured output is not supported yet.'
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        for stop in stops:
            storable(stop)
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return None if value is None else storable(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            storable(key)
            storable(item)
        return value

    def refusal(self) -> ParameterError | None:
        """The first parameter this service cannot honour, or a message list it cannot
        answer; None when the request can be served as it is."""
        for name, value in (self.model_extra or {}).items():
            if name in KNOWN_PARAMETERS or name in NO_OP_DEFAULTS:
                if not is_no_op(name, value):
                    reason = REASONS.get(name, f"`{name}` is not supported by this service")
                    return ParameterError(name, reason)
            else:
                return ParameterError(name, f"unknown parameter `{name}`")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            kind = self.response_format.get("type")
            return ParameterError(
                "response_format",
                f"response_format {kind!r} is not supported yet: structured output is not "
                'available; omit it or send {"type": "text"}',
            )
        if self.stream_options is not None and not self.stream:
            return ParameterError(
                "stream_options",
                "stream_options is only allowed with stream: true",
                code="invalid_value",
            )
        for index, message in enumerate(self.messages):
            problem = message.problem()
            if problem is not None:
                return ParameterError(f"messages[{index}]", problem, code="invalid_value")
        last = self.messages[-1]
        if last.role != "user":
            return ParameterError(
                "messages",
                f"the last message must be the user's, not {last.role!r}: "
                "the agent answers a user message",
                code="invalid_value",
            )
        if not (last.text() or "").strip():
            return ParameterError(
                f"messages[{len(self.messages) - 1}].content",
                "the user's message must not be blank",
                code="invalid_value",
            )
        return None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def token_limit(self) -> int | None:
        limits = [n for n in (self.max_tokens, self.max_completion_tokens) if n is not None]
        return min(limits) if limits else None

    def session_metadata(self) -> dict[str, str]:
        """`metadata`, and `user` under the key "user" (a different metadata "user" is an
        error: the two would be one stored value)."""
        metadata = dict(self.metadata or {})
        if self.user is not None:
            if metadata.get("user", self.user) != self.user:
                raise ParameterError(
                    "metadata",
                    "metadata.user differs from `user`: both are stored as the session's user",
                    code="invalid_value",
                )
            metadata["user"] = self.user
        return metadata


# --- responses (documentation: the routes build them as dicts) --------------------------------


class StepOut(BaseModel):
    tool: str
    arguments: str = Field(description="JSON, as the model wrote it.")
    result: str
    is_error: bool
    duration_ms: float


class AgentserveOut(BaseModel):
    """What the agent did, beyond OpenAI's fields (the SDKs keep it as an extra field)."""

    session_id: str = Field(description="The stored session; also the X-Session-ID header.")
    cached: bool = Field(description="Answered from the response cache (usage is then 0).")
    steps: list[StepOut] = Field(description="The tool calls the agent made, in order.")
    finish_reason: Literal["stop", "length", "max_steps"] = Field(
        description="The agent's own: `max_steps` is reported to OpenAI clients as `length`."
    )
    upstream_model: str = Field(description="The model id the upstream reported.")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChoiceOut(BaseModel):
    index: int
    message: AssistantMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="The agent that answered.")
    choices: list[ChoiceOut]
    usage: UsageOut
    system_fingerprint: None
    agentserve: AgentserveOut


class ModelOut(BaseModel):
    id: str = Field(description="An agent's name.")
    object: Literal["model"]
    created: int = Field(description="Always 0: agents have no creation time.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, `authentication_error`, ...")
    param: str | None = Field(description="The parameter at fault, when there is one.")
    code: str | None = Field(description="This API's machine code, e.g. `unsupported_parameter`.")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody
