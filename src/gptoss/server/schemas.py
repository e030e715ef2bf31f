"""Request bodies as pydantic models, and reading them: the size limit while the body arrives, JSON decoding
with bounded nesting and size, then one validation step whose errors name the parameter.

Every field the server reads is typed here, so a value of the wrong shape (a list where a name goes, a
string where an object goes, NaN where a number goes, a seed beyond 64 bits) is a 400 before any code
touches it. Fields the server does not use are accepted and ignored, as clients send vendor extras.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import Request
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from .errors import APIError, bad_request, validation_error

MAX_BODY_BYTES = 32 * 2**20
# Decoding and validating hold the GIL (the event loop's too) for as long as they run, ≈ 0.1 µs a decoded
# value and ≈ 2.5 µs a validated one; a 32 MB body of small nested lists took 1.3 s to decode. Two bounds
# keep one request's hold on the loop short: commas and brackets in the raw body (an upper bound on its
# values, counted a slice at a time) before decoding, and the values themselves (counted in Python, which
# lets the loop run in between) before validating. A prompt that fits a 131k-token context, as text, takes a
# few values a message.
MAX_RAW_VALUES = 1_000_000
MAX_VALUES = 20_000
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _finite(value: Any) -> Any:
    """Free-form JSON (schemas, arguments) may not hold NaN or ±Infinity: they are not JSON, and the value is
    echoed back (Responses' tools) or rendered into the prompt."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("NaN and Infinity are not valid JSON numbers")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


JSONObject = Annotated[dict[str, Any], AfterValidator(_finite)]


class _Body(BaseModel):
    # unknown fields (user, metadata, vendor extras) are accepted and ignored; floats must be finite
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- shared
class ContentPart(_Body):
    type: str
    text: str | None = None  # checked by translate._text: only text parts are supported


Content = str | list[ContentPart]


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    """{"type": "function", "function": {"name"}} (chat) or {"type": "function", "name"} (responses)."""
    type: Literal["function"]
    function: FunctionName | None = None
    name: str | None = None


ToolChoiceValue = Literal["none", "auto", "required"] | NamedToolChoice


class GenerationBody(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM's extension
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    tool_choice: ToolChoiceValue | None = None


# ---------------------------------------------------------------------------------------------- chat
class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: str = "function"
    function: FunctionSpec | None = None  # required for type "function"; checked after the type


class ChatToolCallFunction(_Body):
    name: str
    arguments: str = ""


class ChatToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ChatToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, sent back mid-tool-loop
    reasoning: str | None = None  # the same, as some clients name it


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaSpec(_Body):
    """response_format.json_schema (chat); Responses' text.format carries the same fields flattened."""
    name: str | None = None  # OpenAI requires it; checked with the format, so the error names the right path
    description: str | None = None
    schema_: JSONObject | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: str
    json_schema: JSONSchemaSpec | None = None


StopString = Annotated[str, Field(max_length=1024)]


def _stop_shape(value: Any) -> Any:
    """`stop` is a string or a list of up to 4 (OpenAI's rule); said so, instead of the union's first error."""
    if value is not None and not isinstance(value, (str, list)):
        raise ValueError(f"expected a string or a list of up to 4 strings, got {type(value).__name__}")
    if isinstance(value, list) and len(value) > 4:
        raise ValueError(f"at most 4 stop sequences are supported, got {len(value)}")
    return value


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # up to 4 stop strings (OpenAI's rule) of up to 1024 characters: each generated token is checked against
    # every prefix of each (generation.StopStrings), so their length is bounded
    stop: Annotated[StopString | list[StopString] | None, BeforeValidator(_stop_shape)] = None
    n: int | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty: ignoring it would change what was asked
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None


# ---------------------------------------------------------------------------------------------- responses
class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    content: list[ContentPart] | None = None
    summary: list[ContentPart] | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    name: str
    call_id: str
    arguments: str | JSONObject = ""


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Content = ""


def _item_type(item: Any) -> Any:
    """An input item's tag: its "type" ("message" when absent, as OpenAI's easy input messages have none); an
    item that is no object is checked as a message, so that its error says an object was expected."""
    if isinstance(item, dict):
        kind = item.get("type")
        return "message" if kind is None else kind if isinstance(kind, str) else repr(kind)
    return getattr(item, "type", "message")


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[ReasoningItem, Tag("reasoning")] |
                      Annotated[FunctionCallItem, Tag("function_call")] |
                      Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_type)]


class ResponsesTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class ReasoningOptions(_Body):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class TextFormat(JSONSchemaSpec):
    type: str


class TextOptions(_Body):
    format: TextFormat | None = None


class ResponsesRequest(GenerationBody):
    input: list[InputItem] | None = None  # a string is one user message (see _user_input)
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    store: bool = True
    # echoed in the Response; OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = \
        Field(None, max_length=16)
    text: TextOptions | None = None
    # "auto": a conversation past the context drops its oldest whole turns (never the latest user turn)
    truncation: Literal["auto", "disabled"] | None = None


# ---------------------------------------------------------------------------------------------- reading
async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (a Content-Length over it before reading
    anything; a chunked upload, which has none, while it arrives)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise _too_large(int(size), limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> APIError:
    got = f"is {size} bytes" if size is not None else "is longer than that"
    return APIError(413, f"The request body {got}; the limit is {limit} bytes.", None, "request_too_large")


def _count_raw(raw: bytes, step: int = 1 << 16) -> int:
    """Commas and opening brackets in `raw`, a slice at a time: each count is short, so the event loop's thread
    gets the GIL back in between."""
    return sum(raw.count(b, i, i + step) for i in range(0, len(raw), step) for b in (b",", b"[", b"{"))


def _count(data: Any, limit: int) -> int:
    """JSON values in `data`, counted up to just past `limit`."""
    n, stack = 0, [data]
    while stack and n <= limit:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def decode(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes → a validated `model`, or an APIError (400) naming the parameter. Blocking: run it in a
    worker thread. JSON nested deeper than 200 levels is refused by the decoder (pydantic_core's limit),
    never by a RecursionError."""
    if _count_raw(raw) > MAX_RAW_VALUES:
        raise bad_request(f"The request body has more than {MAX_RAW_VALUES} commas and brackets; it cannot hold a "
                          f"valid request (at most {MAX_VALUES} JSON values).", None, "invalid_json")
    try:
        data = pydantic_core.from_json(raw)  # NaN / Infinity are let through, to be refused with their parameter
    except ValueError as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                          "object.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(data).__name__}.", None, "invalid_json")
    if _count(data, MAX_VALUES) > MAX_VALUES:
        raise bad_request(f"The request body holds more than {MAX_VALUES} JSON values (objects, arrays, strings, "
                          "numbers); this server's limit.", None, "invalid_json")
    if model is ResponsesRequest and isinstance(data.get("input"), str):
        data["input"] = [{"type": "message", "role": "user", "content": data["input"]}]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data) from None
