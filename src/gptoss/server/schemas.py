"""Request bodies as pydantic models, and reading them (size limit, JSON decoding, validation)."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, bad_request, validation_error


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields (user, metadata, ...) are accepted and ignored


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: str = "function"
    function: FunctionSpec | None = None  # required for type "function"; checked after the type


class ChatToolCallFunction(_Body):
    name: str
    arguments: str = ""


class ChatToolCall(_Body):
    id: str
    type: str = "function"
    function: ChatToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str or a list of content parts; checked by _text
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, sent back mid-tool-loop
    reasoning: str | None = None  # the same, as some clients name it


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationBody(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM's extension
    seed: int | None = None
    stream: bool = False
    tool_choice: Any = None


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Any = None
    n: int | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None


class ResponsesTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ReasoningOptions(_Body):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesRequest(GenerationBody):
    input: Any = None  # a string or a list of items; checked by responses_turns
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    text: dict[str, Any] | None = None


MAX_BODY_BYTES = 32 * 2**20


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:  # refuse before reading it into memory
        raise APIError(413, f"The request body is {int(size)} bytes; the limit is {MAX_BODY_BYTES}.", None,
                       "request_too_large")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                          "object.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(data).__name__}.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
