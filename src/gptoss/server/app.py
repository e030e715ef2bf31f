"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/responses, /v1/models, /health, and a chat page.

Every request goes through Harmony: the OpenAI messages (or Responses input items) become a Harmony
conversation (system message with the reasoning effort, developer message with the instructions and
function tools, then the turns), the prompt is rendered to tokens, the engine generates, and the completion
is parsed back token by token with harmony.StreamParser into reasoning (`analysis`), content (`final` and
preambles) and tool calls (a message to `functions.NAME`). Streaming and non-streaming answers come from
the same events, so they are equal by construction.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad input (naming the
parameter), 401 for a wrong API key, 404 for unknown routes, 503 when the engine is full.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import harmony
from ..engine import ContextLengthError, Engine, EngineBusy, EngineClosed, Finish, TokenStream
from ..errors import GenerationError
from ..generate import SamplingParams
from ..tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("gptoss.server")

FINGERPRINT = "fp_gptoss"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _loc(loc: tuple) -> str:
    """pydantic's error location as an OpenAI parameter path: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = _loc(err["loc"])
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    return bad_request(f"Invalid value for '{param}': {err['msg']}.", param)


# ---------------------------------------------------------------------------------------------- requests
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


# ---------------------------------------------------------------------------------------------- OpenAI → Harmony
def tool_definition(name: Any, description: str | None, parameters: Any, where: str) -> harmony.ToolDefinition:
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise bad_request(f"Invalid value for '{where}.name': function names are 1-64 letters, digits, '_' or "
                          f"'-', got {name!r}.", f"{where}.name")
    if parameters is not None and parameters.get("type", "object") != "object":
        raise bad_request(f"Invalid schema for function '{name}': '{where}.parameters' must be a JSON schema of "
                          f"type 'object', got type {parameters.get('type')!r}.", f"{where}.parameters",
                          "invalid_function_parameters")
    tool = harmony.ToolDefinition(name, description or "", parameters or None)
    try:  # a schema the TypeScript renderer cannot lay out is the caller's error, not ours
        harmony.tools_section([harmony.ToolNamespace("functions", None, [tool])])
    except Exception as e:
        raise bad_request(f"Invalid schema for function '{name}': {type(e).__name__}: {e}.", f"{where}.parameters",
                          "invalid_function_parameters") from None
    return tool


def check_unique(tools: list[harmony.ToolDefinition]) -> list[harmony.ToolDefinition]:
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad_request(f"Invalid value for 'tools': function '{dup}' is declared twice.", "tools")
    return tools


@dataclass
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required" | "function"
    name: str | None = None

    def echo(self) -> Any:
        return {"type": "function", "name": self.name} if self.mode == "function" else self.mode


def tool_choice(value: Any, tools: list[harmony.ToolDefinition]) -> ToolChoice:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name"}} (chat) / {"type", "name"}."""
    if value is None or value == "auto":
        return ToolChoice()
    if value in ("none", "required"):
        choice = ToolChoice(value)
    elif isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")  # chat: {"function": {"name"}}; responses: {"name"}
        name = function.get("name") if isinstance(function, dict) else value.get("name")
        choice = ToolChoice("function", name)
        if name not in {t.name for t in tools}:
            raise bad_request(f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice")
    else:
        raise bad_request("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                          "{'type': 'function', ...}.", "tool_choice")
    if choice.mode != "none" and not tools:
        raise bad_request(f"Invalid value for 'tool_choice': {choice.mode!r} needs 'tools'.", "tool_choice")
    return choice


def forced_header(tok: Tokenizer, choice: ToolChoice) -> list[int]:
    """Assistant-header tokens appended to the prompt so the model must call a tool: the whole header for a
    named function, up to "to=functions" for "required" (the model picks ".name"; the split matches how
    o200k tokenizes a full header, so the model sees the token boundaries it was trained on)."""
    if choice.mode == "function":
        return [tok.channel, *tok.encode_ordinary(f"commentary to=functions.{choice.name}"),
                *tok.encode_ordinary(" "), tok.constrain, *tok.encode_ordinary("json"), tok.message]
    if choice.mode == "required":
        return [tok.channel, *tok.encode_ordinary("commentary to=functions")]
    return []


def _text(content: Any, where: str, part_types: tuple[str, ...] = ("text", "input_text", "output_text")) -> str:
    """A message content: a string, or a list of text parts (joined); anything else is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in part_types or not isinstance(part.get("text"), str):
                raise bad_request(f"Invalid value for '{where}[{j}].type': only text content parts are supported "
                                  f"(type {' / '.join(part_types)}), got {kind or type(part).__name__!r}.",
                                  f"{where}[{j}].type", "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"Invalid value for '{where}': expected a string or a list of text parts.", where)


@dataclass
class Turns:
    """A request as Harmony: developer instructions, turn messages (no system/developer), call id → name."""
    instructions: list[str] = field(default_factory=list)
    messages: list[harmony.Message] = field(default_factory=list)
    call_names: dict[str, str] = field(default_factory=dict)


def chat_turns(messages: list[ChatMessage]) -> Turns:
    turns = Turns()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text = _text(m.content, f"{where}.content")
        if m.role in ("system", "developer"):  # the API's system prompt is Harmony's developer instructions
            turns.instructions.append(text)
        elif m.role == "user":
            turns.messages.append(harmony.Message.user(text))
        elif m.role == "assistant":
            reasoning = m.reasoning_content or m.reasoning
            if reasoning:
                turns.messages.append(harmony.Message.assistant(reasoning, "analysis"))
            if text:  # text beside tool calls is a preamble (commentary), not the turn's final answer
                turns.messages.append(harmony.Message.assistant(text, "commentary" if m.tool_calls else "final"))
            for j, call in enumerate(m.tool_calls or []):
                if not TOOL_NAME.match(call.function.name):
                    raise bad_request(f"Invalid value for '{where}.tool_calls[{j}].function.name': "
                                      f"{call.function.name!r}.", f"{where}.tool_calls[{j}].function.name")
                turns.call_names[call.id] = call.function.name
                turns.messages.append(harmony.Message.tool_call(call.function.name, call.function.arguments))
        else:  # tool
            name = turns.call_names.get(m.tool_call_id or "") or m.name
            if not name:
                raise bad_request(f"Invalid value for '{where}.tool_call_id': {m.tool_call_id!r} answers no tool "
                                  "call of an earlier assistant message.", f"{where}.tool_call_id")
            turns.messages.append(harmony.Message.tool_result(name, text))
    return turns


def responses_turns(items: Any, turns: Turns) -> Turns:
    """Responses API input (a string or a list of items) appended to `turns` (from previous_response_id)."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad_request("Invalid value for 'input': expected a string or a list of input items.", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"Invalid value for '{where}': expected an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content",
                         ("input_text", "output_text", "text", "refusal"))
            if role in ("system", "developer"):
                turns.instructions.append(text)
            elif role == "user":
                turns.messages.append(harmony.Message.user(text))
            elif role == "assistant":
                turns.messages.append(harmony.Message.assistant(text, "final"))
            else:
                raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected user, assistant, system "
                                  "or developer.", f"{where}.role")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            if text:
                turns.messages.append(harmony.Message.assistant(text, "analysis"))
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not TOOL_NAME.match(name) or not isinstance(call_id, str):
                raise bad_request(f"Invalid value for '{where}': a function_call needs 'name' and 'call_id'.", where)
            arguments = item.get("arguments", "")
            turns.call_names[call_id] = name
            turns.messages.append(harmony.Message.tool_call(name, arguments if isinstance(arguments, str)
                                                            else json.dumps(arguments)))
        elif kind == "function_call_output":
            name = turns.call_names.get(item.get("call_id"))
            if name is None:
                raise bad_request(f"Invalid value for '{where}.call_id': no function_call with call_id "
                                  f"{item.get('call_id')!r} precedes it.", f"{where}.call_id")
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            turns.messages.append(harmony.Message.tool_result(name, text))
        else:
            raise bad_request(f"Invalid value for '{where}.type': {kind!r} items are not supported (message, "
                              "reasoning, function_call, function_call_output are).", f"{where}.type")
    return turns


def render_prompt(tok: Tokenizer, turns: Turns, tools: list[harmony.ToolDefinition], effort: str,
                  choice: ToolChoice) -> tuple[list[int], list[int]]:
    """The prompt tokens (ending with any forced tool-call header) and that forced header."""
    declared = [] if choice.mode == "none" else tools  # "none": the model is not told about the tools
    system = harmony.Message.system(harmony.SystemContent(reasoning_effort=effort))
    conversation = [system]
    instructions = "\n\n".join(turns.instructions) if turns.instructions else None
    if instructions is not None or declared:
        conversation.append(harmony.Message.developer(harmony.DeveloperContent(instructions, declared)))
    try:
        prompt = harmony.render_conversation_for_completion(conversation + turns.messages, "assistant", tok)
    except harmony.HarmonyError as e:
        raise bad_request(f"Invalid conversation: {e}.", "messages") from None
    forced = forced_header(tok, choice)
    return prompt + forced, forced


# ---------------------------------------------------------------------------------------------- Harmony → OpenAI
def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(eq=False)
class Piece:
    """One Harmony message of the completion, as the API shows it."""
    kind: str  # "reasoning" (analysis), "content" (final, preambles), "tool_call" (a message to a tool)
    name: str | None = None  # the function, for tool calls
    text: str = ""  # what was shown (content after stop strings; tool arguments as generated)
    raw: str = ""  # what the parser gave, before stop strings
    message: harmony.Message | None = None  # set when the message is complete
    id: str = ""
    call_id: str = ""

    @property
    def arguments(self) -> str:
        """Tool-call arguments as JSON: as generated if valid, else repaired (a truncated object closed)."""
        if not self.text.strip():
            return "{}"
        try:
            json.loads(self.text)
            return self.text
        except ValueError:
            value = harmony.loads_lenient(self.text)
            return json.dumps(value) if isinstance(value, dict) else self.text


def _kind(channel: str | None, recipient: str | None) -> tuple[str, str | None]:
    if recipient and recipient not in ("all", "user", "assistant"):
        return "tool_call", recipient.removeprefix("functions.")
    return ("reasoning" if channel == "analysis" else "content"), None


class StopStrings:
    """Cuts content at the first stop string; text that may begin one is held back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.hit, self.held = True, ""
            return buf[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


Event = tuple[str, Piece, str]  # ("open" | "delta" | "close", piece, delta text)


class Generation:
    """One request in flight: engine tokens → Harmony messages → pieces, as ("open"/"delta"/"close") events.

    Constructing it submits the request, so EngineBusy / GenerationError surface before any response starts."""

    def __init__(self, engine: Engine, tok: Tokenizer, prompt: list[int], forced: list[int], params: SamplingParams,
                 request_id: str, stop: list[str] | None = None):
        self.stream = TokenStream(engine, prompt, params, request_id)
        self.prompt_tokens = len(prompt)
        self.parser = harmony.StreamParser(tok, role="assistant")
        self.parser.feed(forced)  # the forced header is the start of the assistant's message
        self.stop = StopStrings(stop or [])
        self.pieces: list[Piece] = []
        self._open: dict[int, Piece] = {}  # Harmony message index → piece
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.started = time.perf_counter()
        self.first_token: float | None = None

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for token in self.stream:
                self.first_token = self.first_token or time.perf_counter()
                self.completion_tokens += 1
                closed = len(self.parser.messages)
                delta = self.parser.process(token)
                if self.parser.current_channel == "analysis":
                    self.reasoning_tokens += 1
                for event in self._events(delta, closed):
                    yield event
                if self.stop.hit:
                    self.stream.cancel()
                    break
            closed = len(self.parser.messages)
            self.parser.finish()  # closes a message cut off by max_tokens or a stop string
            for event in self._events(None, closed):
                yield event
        finally:
            self.stream.cancel()  # a no-op when finished; otherwise the client went away

    def _piece(self, index: int, channel: str | None, recipient: str | None, out: list[Event]) -> Piece:
        piece = self._open.get(index)
        if piece is None:
            kind, name = _kind(channel, recipient)
            piece = Piece(kind, name)
            piece.id = _new_id({"reasoning": "rs_", "content": "msg_", "tool_call": "fc_"}[kind])
            piece.call_id = _new_id("call_") if kind == "tool_call" else ""
            self._open[index] = piece
            self.pieces.append(piece)
            out.append(("open", piece, ""))
        return piece

    def _events(self, delta: harmony.Delta | None, closed_before: int) -> list[Event]:
        out: list[Event] = []
        if delta is not None:
            self._add(self._piece(delta.message_index, delta.channel, delta.recipient, out), delta.text, out)
        messages = self.parser.messages
        for i in range(closed_before, len(messages)):
            m = messages[i]
            piece = self._piece(i, m.channel, m.recipient, out)
            if m.text.startswith(piece.raw) and len(m.text) > len(piece.raw):
                # text the parser added without a delta: a header that never saw <|message|>, recovered at the end
                self._add(piece, m.text[len(piece.raw):], out)
            if piece.kind == "content" and not self.stop.hit and (rest := self.stop.flush()):
                piece.text += rest
                out.append(("delta", piece, rest))
            piece.message = m
            out.append(("close", piece, ""))
        return out

    def _add(self, piece: Piece, text: str, out: list[Event]) -> None:
        piece.raw += text
        if self.stop.hit:  # nothing is shown after a stop string
            return
        if piece.kind == "content":
            text = self.stop.feed(text)
        if text:
            piece.text += text
            out.append(("delta", piece, text))

    @property
    def finish(self) -> Finish | None:
        return self.stream.finish

    def finish_reason(self) -> str:
        """OpenAI's: "stop", "length", "tool_calls" (the model stopped at <|call|>)."""
        f = self.stream.finish
        if self.stop.hit:
            return "stop"
        if f is not None and f.reason == "length":
            return "length"
        if self.pieces and self.pieces[-1].kind == "tool_call":
            return "tool_calls"
        return "stop"

    def check_error(self) -> None:
        f = self.stream.finish
        if f is not None and f.reason == "error":
            raise APIError(500, f"generation failed: {f.error}", None, "server_error", "server_error")

    def log_line(self, endpoint: str) -> str:
        now = time.perf_counter()
        latency = now - self.started
        ttft = (self.first_token or now) - self.started
        f = self.stream.finish
        reason = ("stop" if self.stop.hit else "cancelled" if f is None or f.reason == "cancelled" else
                  "error" if f.reason == "error" else self.finish_reason())
        return (f"{self.stream.request.id} {endpoint} in={self.prompt_tokens} out={self.completion_tokens} "
                f"latency={latency:.3f}s ttft={ttft:.3f}s {self.completion_tokens / latency if latency else 0:.1f} "
                f"tok/s finish={reason}")


def sse(data: Any, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def until_disconnect(request: Request, coro) -> Any:
    """Await `coro`, cancelling it if the client disconnects first (non-streaming requests)."""
    task = asyncio.ensure_future(coro)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


# ---------------------------------------------------------------------------------------------- the app
class APIKeyMiddleware:
    """/v1 routes need "Authorization: Bearer <key>". Plain ASGI (not BaseHTTPMiddleware), so streamed
    responses and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("Incorrect API key provided." if given else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
                log.warning("%s %s -> 401", scope["method"], scope["path"])
                await APIError(401, message, None, "invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class StoredResponse:
    body: dict[str, Any]
    turns: Turns  # the conversation after this response (its input and output), for previous_response_id


class ServerState:
    def __init__(self, engine: Engine, model_name: str, tokenizer: Tokenizer, max_stored: int):
        self.engine, self.model_name, self.tok = engine, model_name, tokenizer
        self.created = int(time.time())
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self.max_stored = max_stored

    def store(self, rid: str, stored: StoredResponse) -> None:
        self.responses[rid] = stored
        while len(self.responses) > self.max_stored:  # oldest first: memory stays bounded
            self.responses.popitem(last=False)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(400, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           "model", "model_not_found")

    def params(self, body: GenerationBody, prompt_len: int, max_tokens: int | None, param: str) -> SamplingParams:
        limit = self.engine.max_context
        if max_tokens is None:
            max_tokens = limit - prompt_len  # as OpenAI: up to the context limit
        if max_tokens < 1 or prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the {param}, "
                           f"{max(max_tokens, 1)} in the completion). Please reduce the length of the {param} or "
                           "completion.", param, "context_length_exceeded")
        stops = harmony.stop_tokens_for_assistant_actions(self.tok) | {self.tok.endoftext}
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature, top_k=body.top_k,
                              top_p=1.0 if body.top_p is None else body.top_p, max_tokens=max_tokens, seed=body.seed,
                              stop_tokens=tuple(sorted(stops)))

    def start(self, prompt: list[int], forced: list[int], params: SamplingParams, rid: str,
              stop: list[str] | None = None) -> Generation:
        try:
            return Generation(self.engine, self.tok, prompt, forced, params, rid, stop)
        except EngineBusy as e:
            raise APIError(503, str(e), None, "server_busy", "server_error", {"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), None, "server_shutting_down", "server_error") from None
        except ContextLengthError as e:
            raise bad_request(str(e), None, "context_length_exceeded") from None
        except GenerationError as e:
            raise bad_request(str(e)) from None


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, tokenizer: Tokenizer | None = None,
               max_stored_responses: int = 1000) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as the model `model_name`. With `api_key`, every
    /v1 route needs "Authorization: Bearer <api_key>"; the chat page and /health stay open."""
    state = ServerState(engine, model_name, tokenizer or get_tokenizer(), max_stored_responses)
    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN-hosted docs UI
    app.state.gptoss = state
    page = resources.files("gptoss.server").joinpath("static/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------ errors and auth
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        log.warning("%s %s -> %d %s", request.method, request.url.path, e.status, e.message)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"Unknown route: {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, message, None, "not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        error = APIError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error", "server_error")
        return error.response()

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ------------------------------------------------------------------ small routes
    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = engine.load
        return {"status": "ok", "model": model_name, "running": running, "waiting": waiting,
                "max_concurrency": engine.max_concurrency, "max_queue": engine.max_queue,
                "max_context": engine.max_context}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "gptoss"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return model_card()

    # ------------------------------------------------------------------ chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        state.check_model(body.model)
        if body.n not in (None, 1):
            raise bad_request(f"Invalid value for 'n': only n=1 is supported, got {body.n}.", "n")
        if body.logprobs:
            raise bad_request("Invalid value for 'logprobs': log probabilities are not supported.", "logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise bad_request(f"Invalid value for '{name}': only 0 is supported.", name)
        if body.response_format is not None and body.response_format.get("type") != "text":
            raise bad_request("Invalid value for 'response_format': only {'type': 'text'} is supported.",
                              "response_format.type")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                                 not all(isinstance(s, str) for s in stop)):
            raise bad_request("Invalid value for 'stop': expected a string or a list of up to 4 strings.", "stop")
        tools = check_unique([chat_tool(t, i) for i, t in enumerate(body.tools or [])])
        choice = tool_choice(body.tool_choice, tools)
        turns = chat_turns(body.messages)
        prompt, forced = render_prompt(state.tok, turns, tools, body.reasoning_effort or "medium", choice)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = state.params(body, len(prompt), max_tokens, "messages")
        cid, created = _new_id("chatcmpl-"), int(time.time())
        gen = state.start(prompt, forced, params, cid, stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(gen, cid, created, include_usage), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            done = await until_disconnect(request, _drain(gen))
        finally:
            log.info(gen.log_line("chat.completions"))
        if done is None:
            return Response(status_code=499)  # nobody is listening
        gen.check_error()
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "system_fingerprint": FINGERPRINT,
                             "choices": [{"index": 0, "message": chat_message(gen), "logprobs": None,
                                          "finish_reason": gen.finish_reason()}],
                             "usage": chat_usage(gen)})

    async def chat_stream(gen: Generation, cid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "system_fingerprint": FINGERPRINT,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                out["usage"] = None
            return sse(out)

        calls: dict[Piece, int] = {}
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, piece, text in gen.events():
                if piece.kind == "tool_call" and kind == "open":
                    calls[piece] = len(calls)
                    yield chunk({"tool_calls": [{"index": calls[piece], "id": piece.call_id, "type": "function",
                                                 "function": {"name": piece.name, "arguments": ""}}]})
                elif kind == "delta" and piece.kind == "tool_call":
                    yield chunk({"tool_calls": [{"index": calls[piece], "function": {"arguments": text}}]})
                elif kind == "delta":
                    yield chunk({"reasoning_content" if piece.kind == "reasoning" else "content": text})
            gen.check_error()
            yield chunk({}, gen.finish_reason())
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "system_fingerprint": FINGERPRINT, "choices": [], "usage": chat_usage(gen)})
        except APIError as e:  # mid-stream: the status is sent already, so the error travels as an event
            yield sse(e.body())
        finally:
            log.info(gen.log_line("chat.completions"))
        yield sse("[DONE]")

    # ------------------------------------------------------------------ responses
    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        body: ResponsesRequest = await parse_body(request, ResponsesRequest)
        state.check_model(body.model)
        if body.text is not None and (body.text.get("format") or {"type": "text"}).get("type") != "text":
            raise bad_request("Invalid value for 'text.format': only {'type': 'text'} is supported.", "text.format")
        tools = check_unique([tool_definition(t.name, t.description, t.parameters, f"tools[{i}]")
                              if t.type == "function" else _unsupported_tool(t.type, f"tools[{i}].type")
                              for i, t in enumerate(body.tools or [])])
        choice = tool_choice(body.tool_choice, tools)
        if body.previous_response_id is not None:
            previous = state.responses.get(body.previous_response_id)
            if previous is None:
                raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found.",
                               "previous_response_id", "previous_response_not_found")
            turns = Turns([], list(previous.turns.messages), dict(previous.turns.call_names))
        else:
            turns = Turns()
        if body.input is None and body.previous_response_id is None:
            raise bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")
        responses_turns(body.input if body.input is not None else [], turns)
        if body.instructions is not None:
            turns.instructions.insert(0, body.instructions)
        effort = (body.reasoning.effort if body.reasoning else None) or "medium"
        prompt, forced = render_prompt(state.tok, turns, tools, effort, choice)
        params = state.params(body, len(prompt), body.max_output_tokens, "input")
        rid = _new_id("resp_")
        gen = state.start(prompt, forced, params, rid)
        shell = response_shell(body, rid, tools, choice, effort, model_name)
        if body.stream:
            return StreamingResponse(responses_stream(gen, shell, body.store, turns), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            done = await until_disconnect(request, _drain(gen))
        finally:
            log.info(gen.log_line("responses"))
        if done is None:
            return Response(status_code=499)
        gen.check_error()
        out = finished_response(shell, gen)
        if body.store:
            state.store(rid, StoredResponse(out, conversation_after(turns, gen)))
        return JSONResponse(out)

    async def responses_stream(gen: Generation, shell: dict[str, Any], store: bool, turns: Turns) -> AsyncIterator[str]:
        seq = itertools.count()
        indices: dict[Piece, int] = {}

        def event(kind: str, **fields: Any) -> str:
            return sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

        try:
            yield event("response.created", response=shell)
            yield event("response.in_progress", response=shell)
            async for kind, piece, text in gen.events():
                if kind == "open":
                    indices[piece] = i = len(indices)
                    yield event("response.output_item.added", output_index=i, item=output_item(piece, "in_progress"))
                    if piece.kind != "tool_call":
                        yield event("response.content_part.added", item_id=piece.id, output_index=i,
                                    content_index=0, part=_part(piece, ""))
                    continue
                i = indices[piece]
                if kind == "delta" and piece.kind == "reasoning":
                    yield event("response.reasoning_text.delta", item_id=piece.id, output_index=i, content_index=0,
                                delta=text)
                elif kind == "delta" and piece.kind == "content":
                    yield event("response.output_text.delta", item_id=piece.id, output_index=i, content_index=0,
                                delta=text, logprobs=[])
                elif kind == "delta":
                    yield event("response.function_call_arguments.delta", item_id=piece.id, output_index=i, delta=text)
                elif piece.kind == "reasoning":  # close
                    yield event("response.reasoning_text.done", item_id=piece.id, output_index=i, content_index=0,
                                text=piece.text)
                    yield event("response.content_part.done", item_id=piece.id, output_index=i, content_index=0,
                                part=_part(piece, piece.text))
                elif piece.kind == "content":
                    yield event("response.output_text.done", item_id=piece.id, output_index=i, content_index=0,
                                text=piece.text, logprobs=[])
                    yield event("response.content_part.done", item_id=piece.id, output_index=i, content_index=0,
                                part=_part(piece, piece.text))
                else:
                    yield event("response.function_call_arguments.done", item_id=piece.id, output_index=i,
                                name=piece.name, arguments=piece.arguments)
                if kind == "close":
                    yield event("response.output_item.done", output_index=i, item=output_item(piece, "completed"))
            f = gen.finish
            if f is not None and f.reason == "error":
                failed = {**shell, "status": "failed",
                          "error": {"code": "server_error", "message": f"generation failed: {f.error}"}}
                yield event("response.failed", response=failed)
                return
            out = finished_response(shell, gen)
            if store:
                state.store(out["id"], StoredResponse(out, conversation_after(turns, gen)))
            yield event("response.completed" if out["status"] == "completed" else "response.incomplete", response=out)
        finally:
            log.info(gen.log_line("responses"))

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str) -> dict[str, Any]:
        stored = state.responses.get(rid)
        if stored is None:
            raise APIError(404, f"No response with id '{rid}' found.", "response_id", "not_found")
        return stored.body

    return app


# ---------------------------------------------------------------------------------------------- shaping helpers
def chat_tool(t: ChatTool, i: int) -> harmony.ToolDefinition:
    if t.type != "function":
        _unsupported_tool(t.type, f"tools[{i}].type")
    if t.function is None:
        raise bad_request(f"Missing required parameter: 'tools[{i}].function'.", f"tools[{i}].function",
                          "missing_required_parameter")
    return tool_definition(t.function.name, t.function.description, t.function.parameters, f"tools[{i}].function")


def _unsupported_tool(kind: str, param: str):
    raise bad_request(f"Invalid value for '{param}': only 'function' tools are supported, got {kind!r}.", param,
                      "unsupported_tool_type")


async def _drain(gen: Generation) -> bool:
    async for _ in gen.events():
        pass
    return True


def chat_message(gen: Generation) -> dict[str, Any]:
    content = [p.text for p in gen.pieces if p.kind == "content"]
    reasoning = [p.text for p in gen.pieces if p.kind == "reasoning"]
    calls = [{"id": p.call_id, "type": "function", "function": {"name": p.name, "arguments": p.arguments}}
             for p in gen.pieces if p.kind == "tool_call"]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content or not calls else None,
                               "reasoning_content": "".join(reasoning) if reasoning else None}
    if calls:
        message["tool_calls"] = calls
    return message


def chat_usage(gen: Generation) -> dict[str, Any]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": gen.reasoning_tokens}}


def _part(piece: Piece, text: str) -> dict[str, Any]:
    if piece.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_item(piece: Piece, status: str) -> dict[str, Any]:
    done = status != "in_progress"
    if piece.kind == "reasoning":
        return {"id": piece.id, "type": "reasoning", "summary": [], "status": status,
                "content": [_part(piece, piece.text)] if done else []}
    if piece.kind == "content":
        return {"id": piece.id, "type": "message", "role": "assistant", "status": status,
                "content": [_part(piece, piece.text)] if done else []}
    return {"id": piece.id, "type": "function_call", "call_id": piece.call_id, "name": piece.name,
            "arguments": piece.arguments if done else "", "status": status}


def response_shell(body: ResponsesRequest, rid: str, tools: list[harmony.ToolDefinition], choice: ToolChoice,
                   effort: str, model_name: str) -> dict[str, Any]:
    """The Response object before any output (status in_progress)."""
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": model_name, "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": False} for t in tools],
            "tool_choice": choice.echo(), "parallel_tool_calls": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": effort, "summary": None},
            "store": body.store, "text": {"format": {"type": "text"}}, "truncation": "disabled"}


def finished_response(shell: dict[str, Any], gen: Generation) -> dict[str, Any]:
    incomplete = gen.finish_reason() == "length"
    return {**shell, "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [output_item(p, "completed") for p in gen.pieces],
            "usage": {"input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": gen.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": gen.reasoning_tokens},
                      "total_tokens": gen.prompt_tokens + gen.completion_tokens}}


def conversation_after(turns: Turns, gen: Generation) -> Turns:
    """This response's input and output turns, and its call ids, for a later previous_response_id."""
    messages = list(turns.messages)
    call_names = dict(turns.call_names)
    for p in gen.pieces:
        if p.message is not None:
            messages.append(p.message)
        if p.kind == "tool_call":
            call_names[p.call_id] = p.name
    return Turns([], messages, call_names)
