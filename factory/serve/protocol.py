"""The OpenAI chat-completions request, typed: what the server accepts, and the text it routes on.

`ChatCompletionRequest` checks the fields that OpenAI's API checks and that matter here:
messages (string or content-part content, assistant `tool_calls`, tool messages with their
`tool_call_id`), tools, tool_choice, response_format, stream, the sampling and budget
fields, n and logprobs. Types are strict, as at OpenAI: `"max_tokens": "8"`, a boolean
where a number belongs or a number as message content is an error, never coerced. Any
other field is let through unchecked: OpenAI clients send many (`user`, `seed`, `store`,
`prediction`, ...) and an escalation forwards the body as it came. The trade-off: a field
OpenAI added later is accepted here whatever its value, and the upstream judges it.

`plain_messages` hands the router and the specialists what chat templates expect: every
content a string, text parts joined with "\\n". Image, audio and file parts cannot be
read by a text specialist; it says whether the request had any (the server escalates it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class InvalidRequest(ValueError):
    """A request body that is not a valid chat-completions request; `param` names the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message, self.param = message, param


class _Open(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


class ImageUrl(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Open):
    data: str
    format: str


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Open):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Open):
    type: Literal["file"]
    file: FileRef


UserPart = Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Field(discriminator="type")]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]
TextContent = Union[str, Annotated[list[TextPart], Field(min_length=1)]]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Open):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: Union[str, Annotated[list[UserPart], Field(min_length=1)]]
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Union[str, Annotated[list[AssistantPart], Field(min_length=1)], None] = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        """Raises ValueError for a turn with neither content nor a call, as OpenAI does."""
        if self.content is None and self.tool_calls is None and self.function_call is None:
            raise ValueError("an assistant message needs content, tool_calls or function_call")
        return self


class ToolMessage(_Open):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(_Open):
    role: Literal["function"]
    name: str
    content: str | None


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage,
                          FunctionMessage], Field(discriminator="role")]


class FunctionDefinition(_Open):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class ToolName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: ToolName


class TextFormat(_Open):
    type: Literal["text"]


class JsonObjectFormat(_Open):
    type: Literal["json_object"]


class JsonSchemaSpec(_Open):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Open):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(_Open):
    """The body of POST /v1/chat/completions (see the module docstring)."""

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    response_format: Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat],
                               Field(discriminator="type")] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    metadata: dict[str, str] | None = None

    @property
    def budget(self) -> int | None:
        """The client's cap on generated tokens (`max_completion_tokens` wins over the older `max_tokens`)."""
        return self.max_completion_tokens or self.max_tokens


def _param(loc: tuple[str | int, ...], body: Any) -> str:
    """The field a validation error is about, as OpenAI writes it (`messages[0].content`).

    Walks `loc` through the body itself, so the tags pydantic adds for union members
    (`user`, `str`, `list[...]`) are left out: they are not keys of the data.
    """
    param, value = "", body
    for step in loc:
        if isinstance(value, dict) and isinstance(step, str) and step in value:
            param, value = f"{param}.{step}" if param else step, value[step]
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            param, value = f"{param}[{step}]", value[step]
    return param


def _where(error: dict[str, Any], body: Any) -> str:
    """The param of one validation error, naming a missing field or a missing / unknown tag."""
    param = _param(error["loc"], body)
    if error["type"] == "missing":
        return f"{param}.{error['loc'][-1]}" if param else str(error["loc"][-1])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a missing or unknown role
        tag = error["ctx"]["discriminator"].strip("'")
        return f"{param}.{tag}"
    return param


def parse_request(body: Any) -> ChatCompletionRequest:
    """The typed request of a decoded JSON body.

    Raises InvalidRequest naming the deepest invalid field (the part of a list of parts
    rather than the list) and, for a union such as a string or a list of parts, what
    each alternative expected.
    """
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        deepest = max(errors, key=lambda e: len(e["loc"]))
        param = _where(deepest, body)
        reasons = dict.fromkeys(e["msg"] for e in errors if _where(e, body) == param)
        raise InvalidRequest(f"{param or 'body'}: {' or '.join(reasons)}", param or None) from None


def _text(content: str | list[BaseModel] | None) -> tuple[str | None, bool]:
    """(the content as one string, whether non-text parts were dropped)."""
    if not isinstance(content, list):
        return content, False
    texts = [p.text if isinstance(p, TextPart) else p.refusal
             for p in content if isinstance(p, (TextPart, RefusalPart))]
    return "\n".join(texts), len(texts) < len(content)


def plain_messages(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], bool]:
    """The messages with every content a plain string (or None where the client sent none),
    and whether any image, audio or file part was dropped on the way."""
    messages, dropped = [], False
    for message in request.messages:
        data = message.model_dump(exclude_unset=True)
        if "content" in data:
            data["content"], lost = _text(message.content)
            dropped |= lost
        messages.append(data)
    return messages, dropped


def plain_tools(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tools as the router and the chat templates take them (dicts, as sent)."""
    return [tool.model_dump(exclude_unset=True) for tool in request.tools or []]


def openapi_components() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request body's JSON schema, the schemas it refers to) for the OpenAPI document:
    references point into `#/components/schemas/`, where the second item belongs."""
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})
