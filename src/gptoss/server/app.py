"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/responses, /v1/models, /health, and a chat page.

Every request goes through Harmony: the OpenAI messages (or Responses input items) become a Harmony
conversation (system message with the reasoning effort, developer message with the instructions and
function tools, then the turns), the prompt is rendered to tokens, the engine generates, and the completion
is parsed back token by token with harmony.StreamParser into reasoning (`analysis`), content (`final` and
preambles) and tool calls (a message to `functions.NAME`). Streaming and non-streaming answers come from
the same events, so they are equal by construction.

The parts, each in a module of its own: errors.py (OpenAI-shaped errors), schemas.py (request bodies and
reading them), translate.py (OpenAI → Harmony), generation.py (streaming generation and stop handling),
shaping.py (Harmony → OpenAI objects and streams); this module holds the routes, the guards in front of
them (API key, Host and Origin, CORS) and the shutdown of in-flight requests.

No client input gets a 500: a body is read up to a size limit, decoded and validated (schemas.py), and
turned into a prompt (translate.py) in a worker thread, so neither a large body nor a slow tokenization
stalls the event loop; every refusal is an APIError answered in OpenAI's shape, on a connection that stays
usable.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .. import harmony
from ..engine import ContextLengthError, Engine, EngineBusy, EngineClosed
from ..errors import GenerationError
from ..generate import SamplingParams
from ..tokenizer import Tokenizer, get_tokenizer
from .errors import APIError, bad_request
from .generation import SSE_HEADERS, Generation, _drain, _new_id, until_disconnect
from .schemas import MAX_BODY_BYTES, ChatCompletionRequest, GenerationBody, ResponsesRequest, decode, read_body
from .shaping import chat_completion, chat_stream, conversation_after, finished_response, response_shell, \
    responses_stream
from .translate import ToolChoice, Turns, _unsupported_tool, answer_format, chat_tool, chat_turns, check_unique, \
    fit_turns, longest_token, render_prompt, responses_turns, structured_constraint, tool_choice, tool_definition

log = logging.getLogger("gptoss.server")

__all__ = ["create_app", "loopback_hosts"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_hosts(bind: str) -> list[str] | None:
    """The Host header values a server bound to `bind` accepts: for a loopback address only loopback names
    (a DNS-rebinding page reaches it under its own name, which is refused); None (any) otherwise."""
    return list(LOOPBACK) if bind in LOOPBACK or bind.startswith("127.") else None


# ---------------------------------------------------------------------------------------------- guards
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


class BrowserGuard:
    """What a web page could do to a server on this machine, refused:

    - a Host header not in `allowed_hosts` (DNS rebinding: a page on evil.example whose name now resolves to
      127.0.0.1 sends "Host: evil.example") → 400;
    - on /v1 routes, an Origin that is neither the server's own (the chat page) nor one of `cors_origins` → 403;
    - on /v1 POSTs, a body that is not JSON (a form or text/plain POST is a "simple" cross-origin request a
      page may send without asking) → 415.
    """

    def __init__(self, app, allowed_hosts: Sequence[str] | None, cors_origins: Sequence[str]):
        self.app, self.cors_origins = app, set(cors_origins)
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                log.warning("%s %s -> %d %s", scope["method"], scope["path"], error.status, error.message)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _hostname(host) not in self.allowed_hosts:
            return APIError(400, f"Invalid Host header {host!r}: this server answers to "
                                 f"{', '.join(sorted(self.allowed_hosts))}.", None, "invalid_host")
        if not scope["path"].startswith("/v1/"):
            return None
        origin = headers.get("origin")
        if origin is not None and origin not in self.cors_origins and urlsplit(origin).netloc != host:
            return APIError(403, f"Cross-origin requests from {origin!r} are not allowed (start the server with "
                                 "--cors-origin ORIGIN to allow one).", None, "forbidden_origin")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
                return APIError(415, f"Unsupported Content-Type {media or '(none)'!r}: send the body as JSON with "
                                     "'Content-Type: application/json'.", None, "unsupported_media_type")
        return None


def _hostname(host: str) -> str:
    """The name in a Host header ("localhost:8000" → "localhost", "[::1]:80" → "::1")."""
    if host.startswith("["):
        return host[1:].split("]")[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class GuardedRoute(APIRoute):
    """An unexpected exception in a route (a bug) becomes an APIError 500 handled like any other error, so the
    connection stays open; Starlette's catch-all would answer it and then close the connection."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, StarletteHTTPException):
                raise
            except Exception as e:
                log.exception("%s %s failed", request.method, request.url.path)
                raise APIError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error",
                               "server_error") from e

        return guarded


# ---------------------------------------------------------------------------------------------- state
@dataclass
class StoredResponse:
    body: dict[str, Any]
    turns: Turns  # the conversation after this response (its input and output), for previous_response_id


@dataclass
class Prepared:
    """A validated request as the engine takes it."""
    body: Any
    prompt: list[int]
    forced: list[int]
    params: SamplingParams
    tools: list[harmony.ToolDefinition]
    choice: ToolChoice
    turns: Turns
    effort: str
    stop: list[str] | None = None


SHUTTING_DOWN = "The server is shutting down; retry on another instance or later."


class ServerState:
    def __init__(self, engine: Engine, model_name: str, tokenizer: Tokenizer, max_stored: int, max_body: int,
                 reasoning_budget: int | None = None):
        self.engine, self.model_name, self.tok = engine, model_name, tokenizer
        self.reasoning_budget = reasoning_budget  # analysis tokens allowed before a structured answer
        self.created = int(time.time())
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self.max_stored, self.max_body = max_stored, max_body
        self.active: set[Generation] = set()
        self.closing = False

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
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature, top_k=body.top_k,
                                top_p=1.0 if body.top_p is None else body.top_p, max_tokens=max_tokens,
                                seed=body.seed, stop_tokens=tuple(sorted(stops)))
        try:  # what fp32 sampling cannot honour (a top_p or temperature too small to represent)
            params.validate()
        except GenerationError as e:
            param = next((p for p in ("temperature", "top_p", "top_k", "seed") if str(e).startswith(p)), None)
            raise bad_request(f"Invalid value for '{param}': {e}." if param else f"{e}.", param) from None
        return params

    # ------------------------------------------------------------------ requests (in a worker thread)
    def prepare_chat(self, raw: bytes) -> Prepared:
        body: ChatCompletionRequest = decode(raw, ChatCompletionRequest)
        self.check_model(body.model)
        if body.n not in (None, 1):
            raise bad_request(f"Invalid value for 'n': only n=1 is supported, got {body.n}.", "n")
        if body.logprobs:
            raise bad_request("Invalid value for 'logprobs': log probabilities are not supported.", "logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise bad_request(f"Invalid value for '{name}': only 0 is supported.", name)
        if body.logit_bias:
            raise bad_request("Invalid value for 'logit_bias': token biases are not supported (send {} or leave it "
                              "out).", "logit_bias")
        answer = answer_format(body.response_format, "response_format", nested=True)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        tools = check_unique([chat_tool(t, i) for i, t in enumerate(body.tools or [])])
        strict = {t.function.name: bool(t.function.strict) for t in body.tools or [] if t.function is not None}
        choice = tool_choice(body.tool_choice, tools)
        constraint = structured_constraint(self.tok, answer, tools, strict, choice, "tools", self.reasoning_budget)
        turns = chat_turns(body.messages)
        effort = body.reasoning_effort or "medium"
        prompt, forced = render_prompt(self.tok, turns, tools, effort, choice, self.engine.max_context, "messages",
                                       answer)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self.params(body, len(prompt), max_tokens, "messages")
        params.constraint = constraint
        return Prepared(body, prompt, forced, params, tools, choice, turns, effort, stop)

    def prepare_response(self, raw: bytes) -> Prepared:
        body: ResponsesRequest = decode(raw, ResponsesRequest)
        self.check_model(body.model)
        answer = answer_format(body.text.format if body.text is not None else None, "text.format", nested=False)
        tools = check_unique([tool_definition(t.name, t.description, t.parameters, f"tools[{i}]")
                              if t.type == "function" else _unsupported_tool(t.type, f"tools[{i}].type")
                              for i, t in enumerate(body.tools or [])])
        # strict only when asked (OpenAI's Responses default is strict: true; here a schema is enforced only
        # where the caller says so, as in Chat Completions)
        strict = {t.name: t.strict is True for t in body.tools or [] if t.type == "function"}
        choice = tool_choice(body.tool_choice, tools)
        constraint = structured_constraint(self.tok, answer, tools, strict, choice, "tools", self.reasoning_budget)
        if body.previous_response_id is not None:
            previous = self.responses.get(body.previous_response_id)
            if previous is None:
                raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found.",
                               "previous_response_id", "previous_response_not_found")
            turns = Turns([], list(previous.turns.messages), dict(previous.turns.call_names))
        else:
            turns = Turns()
        if body.input is None and body.previous_response_id is None:
            raise bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")
        responses_turns(body.input or [], turns)
        if body.instructions is not None:
            turns.instructions.insert(0, body.instructions)
        effort = (body.reasoning.effort if body.reasoning else None) or "medium"
        limit = self.engine.max_context

        def render() -> tuple[list[int], list[int]]:
            return render_prompt(self.tok, turns, tools, effort, choice, limit, "input", answer)

        if body.truncation == "auto":  # room for max_output_tokens, or without it for a quarter of the context
            room = body.max_output_tokens or max(1, limit // 4)
            prompt, forced, _ = fit_turns(self.tok, turns, tools, render, min(room, limit), limit)
        else:
            prompt, forced = render()
        params = self.params(body, len(prompt), body.max_output_tokens, "input")
        params.constraint = constraint
        return Prepared(body, prompt, forced, params, tools, choice, turns, effort)

    # ------------------------------------------------------------------ generations
    def start(self, p: Prepared, rid: str) -> Generation:
        if self.closing:
            raise APIError(503, SHUTTING_DOWN, None, "server_shutting_down", "server_error")
        try:
            gen = Generation(self.engine, self.tok, p.prompt, p.forced, p.params, rid, p.stop,
                             frozenset(t.name for t in p.tools if p.choice.mode != "none"))
        except EngineBusy as e:
            raise APIError(503, str(e), None, "server_busy", "server_error", {"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), None, "server_shutting_down", "server_error") from None
        except ContextLengthError as e:
            raise bad_request(str(e), None, "context_length_exceeded") from None
        except GenerationError as e:
            raise bad_request(str(e)) from None
        self.active.add(gen)
        gen.on_close = lambda: self.active.discard(gen)
        return gen

    def begin_shutdown(self, grace: float) -> None:
        """In the event loop, once the server stops accepting connections: requests still waiting for the
        engine end now with a 503 (an error event if streaming), new ones get a 503, and the rest have `grace`
        seconds to finish before they are ended the same way."""
        if self.closing:
            return
        self.closing = True
        error = APIError(503, SHUTTING_DOWN, None, "server_shutting_down", "server_error")
        self.active = {g for g in self.active if g.finish is None}
        queued = [g for g in self.active if g.queued]
        log.warning("shutting down: %d requests generating get %.1f s to finish, %d queued are refused",
                    len(self.active) - len(queued), grace, len(queued))
        for gen in queued:
            gen.abort(error)

        def end_the_rest() -> None:
            for gen in list(self.active):
                gen.abort(error)

        asyncio.get_running_loop().call_later(grace, end_the_rest)


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, tokenizer: Tokenizer | None = None,
               max_stored_responses: int = 1000, allowed_hosts: Sequence[str] | None = None,
               cors_origins: Sequence[str] = (), max_body_bytes: int = MAX_BODY_BYTES,
               reasoning_budget: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as the model `model_name`. With `api_key`, every
    /v1 route needs "Authorization: Bearer <api_key>"; the chat page and /health stay open. allowed_hosts:
    the Host header values accepted (None: any; see loopback_hosts); cors_origins: web origins allowed to call
    the API from a browser (none by default). `app.state.gptoss.begin_shutdown(grace)` ends requests in flight
    (serve_command calls it on SIGTERM / SIGINT). reasoning_budget: under a structured output (response_format,
    text.format, strict tools), the analysis tokens allowed before the answer is forced to begin (None: no
    bound but max_tokens)."""
    tok = tokenizer or get_tokenizer()
    longest_token(tok)  # computed once, here, rather than in the first request
    state = ServerState(engine, model_name, tok, max_stored_responses, max_body_bytes, reasoning_budget)
    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN-hosted docs UI
    app.router.route_class = GuardedRoute
    app.state.gptoss = state
    page = resources.files("gptoss.server").joinpath("static/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------ errors and guards
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

    # added innermost first: CORS answers preflights, then Host/Origin/Content-Type, then the key
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BrowserGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # ------------------------------------------------------------------ small routes
    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = engine.load
        return {"status": "shutting_down" if state.closing else "ok", "model": model_name, "running": running,
                "waiting": waiting, "max_concurrency": engine.max_concurrency, "max_queue": engine.max_queue,
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

    # ------------------------------------------------------------------ generation routes
    async def finish(request: Request, gen: Generation, endpoint: str) -> bool:
        """Wait for a non-streamed generation; False if the client went away first."""
        try:
            done = await until_disconnect(request, _drain(gen))
        finally:
            log.info(gen.log_line(endpoint))
        if done is None:
            return False
        gen.check_error()
        return True

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, state.max_body)
        p = await run_in_threadpool(state.prepare_chat, raw)  # decoding and tokenizing hold the CPU
        cid, created = _new_id("chatcmpl-"), int(time.time())
        gen = state.start(p, cid)
        if p.body.stream:
            include_usage = bool(p.body.stream_options and p.body.stream_options.include_usage)
            return StreamingResponse(chat_stream(gen, cid, created, model_name, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        if not await finish(request, gen, "chat.completions"):
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(chat_completion(gen, cid, created, model_name))

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        raw = await read_body(request, state.max_body)
        p = await run_in_threadpool(state.prepare_response, raw)
        rid = _new_id("resp_")
        gen = state.start(p, rid)
        body: ResponsesRequest = p.body
        shell = response_shell(body, rid, p.tools, p.choice, p.effort, model_name)

        def on_done(out: dict[str, Any]) -> None:
            if body.store:
                state.store(out["id"], StoredResponse(out, conversation_after(p.turns, gen)))

        if body.stream:
            return StreamingResponse(responses_stream(gen, shell, on_done), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        if not await finish(request, gen, "responses"):
            return Response(status_code=499)
        out = finished_response(shell, gen)
        on_done(out)
        return JSONResponse(out)

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str) -> dict[str, Any]:
        stored = state.responses.get(rid)
        if stored is None:
            raise APIError(404, f"No response with id '{rid}' found.", "response_id", "not_found")
        return stored.body

    return app
