"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/responses, /v1/models, /health, and a chat page.

Every request goes through Harmony: the OpenAI messages (or Responses input items) become a Harmony
conversation (system message with the reasoning effort, developer message with the instructions and
function tools, then the turns), the prompt is rendered to tokens, the engine generates, and the completion
is parsed back token by token with harmony.StreamParser into reasoning (`analysis`), content (`final` and
preambles) and tool calls (a message to `functions.NAME`). Streaming and non-streaming answers come from
the same events, so they are equal by construction.

The parts, each in a module of its own: errors.py (OpenAI-shaped errors), schemas.py (request bodies),
translate.py (OpenAI → Harmony), generation.py (streaming generation and stop handling), shaping.py
(Harmony → OpenAI objects); this module holds the routes.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import harmony
from ..engine import ContextLengthError, Engine, EngineBusy, EngineClosed
from ..errors import GenerationError
from ..generate import SamplingParams
from ..tokenizer import Tokenizer, get_tokenizer
from .errors import APIError, bad_request
from .generation import SSE_HEADERS, Generation, _drain, _new_id, until_disconnect
from .schemas import ChatCompletionRequest, GenerationBody, ResponsesRequest, parse_body
from .shaping import FINGERPRINT, chat_message, chat_stream, chat_usage, conversation_after, finished_response, \
    response_shell, responses_stream
from .translate import Turns, _unsupported_tool, chat_tool, chat_turns, check_unique, render_prompt, \
    responses_turns, tool_choice, tool_definition

log = logging.getLogger("gptoss.server")

__all__ = ["create_app"]


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
            return StreamingResponse(chat_stream(gen, cid, created, model_name, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
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
            def on_done(out: dict[str, Any]) -> None:
                if body.store:
                    state.store(out["id"], StoredResponse(out, conversation_after(turns, gen)))

            return StreamingResponse(responses_stream(gen, shell, on_done), media_type="text/event-stream",
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

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str) -> dict[str, Any]:
        stored = state.responses.get(rid)
        if stored is None:
            raise APIError(404, f"No response with id '{rid}' found.", "response_id", "not_found")
        return stored.body

    return app

