"""Streaming generation: engine tokens → Harmony messages (harmony.StreamParser) → pieces (reasoning,
content, tool calls) as open/delta/close events, with stop strings; SSE framing; client disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from .. import harmony
from ..engine import Engine, Finish, TokenStream
from ..generate import SamplingParams
from ..tokenizer import Tokenizer
from .errors import APIError
from .translate import TOOL_NAME

log = logging.getLogger("gptoss.server")


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
        """Tool-call arguments as JSON: as generated if valid, else repaired (harmony.call_arguments)."""
        return harmony.call_arguments(self.text)


SHOWN_CHANNELS = (None, "final", "commentary")  # content; "analysis" is reasoning


def _kind(channel: str | None, recipient: str | None, tools: frozenset[str]) -> tuple[str, str | None]:
    """A message's kind and, for a call, its function. `tools`: the functions the request lets the model call
    (none with tool_choice "none"). A call to a function ("functions.X") of a request that lets it call some is
    returned as a call even when X was not declared: dropped, the client would get an empty reply and no way to
    tell the model so; returned, it can answer the call with an error, as `gptoss chat` does and agent
    frameworks do with a hallucinated tool name, and its next request carries the call back (translate accepts
    any name OpenAI allows). Any other
    call (to no function, a name OpenAI does not allow, or when no call is allowed) is "dropped": never returned
    as a call (nor as content: its text is arguments). So is a message on a channel Harmony does not declare
    (malformed output, e.g. `<|channel|>Too big.<|end|>` read as channel "Too"): `gptoss chat` does not show it
    either (ChatSession yields it under its channel's name)."""
    if recipient and recipient not in ("all", "user", "assistant"):
        name = recipient.removeprefix("functions.")
        callable_ = recipient.startswith("functions.") and bool(tools) and TOOL_NAME.match(name) is not None
        return ("tool_call", name) if callable_ else ("dropped", name)
    if channel == "analysis":
        return "reasoning", None
    return ("content" if channel in SHOWN_CHANNELS else "dropped"), None


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

    Constructing it submits the request, so EngineBusy / GenerationError surface before any response starts.
    `tools`: the declared function names (a call to any other is dropped). The engine stops the request once a
    final answer has ended (harmony.FinalAnswerEnded), so a model that goes on after it is never shown."""

    def __init__(self, engine: Engine, tok: Tokenizer, prompt: list[int], forced: list[int], params: SamplingParams,
                 request_id: str, stop: list[str] | None = None, tools: frozenset[str] = frozenset()):
        self.stream = TokenStream(engine, prompt, params, request_id,
                                  stop_rule=harmony.FinalAnswerEnded(tok, header=forced))
        self.prompt_tokens = len(prompt)
        self.tools = tools
        self.parser = harmony.StreamParser(tok, role="assistant")
        self.parser.feed(forced)  # the forced header is the start of the assistant's message
        self.stop = StopStrings(stop or [])
        self.pieces: list[Piece] = []  # what the API returns (dropped calls are not in it)
        self._open: dict[int, Piece] = {}  # Harmony message index → piece
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.aborted: APIError | None = None  # set by abort(): the error the client gets instead of the rest
        self.on_close: Callable[[], None] | None = None  # called once the events have ended

    def abort(self, error: APIError) -> None:
        """End this request early (the server is shutting down): the engine drops it at its next step, and the
        client gets `error` (a status before the response starts, an error event in a stream)."""
        if self.aborted is None and self.stream.finish is None:
            self.aborted = error
            self.stream.cancel()

    @property
    def queued(self) -> bool:
        """Still waiting for a row of the engine (not yet prefilled)."""
        return not self.stream.request.admitted and self.stream.finish is None

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
            if self.on_close is not None:
                self.on_close()

    def _piece(self, index: int, channel: str | None, recipient: str | None, out: list[Event]) -> Piece:
        piece = self._open.get(index)
        if piece is None:
            kind, name = _kind(channel, recipient, self.tools)
            piece = Piece(kind, name)
            self._open[index] = piece
            if kind == "tool_call" and name not in self.tools:
                log.warning("%s: the model called %r, which the request did not declare; returned as is",
                            self.stream.request.id, name)
            if kind == "dropped":
                if name is None:
                    log.warning("%s: dropped a message on channel %r, which Harmony does not declare",
                                self.stream.request.id, channel)
                else:
                    log.warning("%s: dropped a call to %r, which is not a declared function", self.stream.request.id,
                                recipient)
                return piece
            piece.id = _new_id({"reasoning": "rs_", "content": "msg_", "tool_call": "fc_"}[kind])
            piece.call_id = _new_id("call_") if kind == "tool_call" else ""
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
            if piece.kind != "dropped":
                out.append(("close", piece, ""))
        return out

    def _add(self, piece: Piece, text: str, out: list[Event]) -> None:
        piece.raw += text
        if self.stop.hit or piece.kind == "dropped":  # nothing is shown after a stop string
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
        if self.aborted is not None:
            raise self.aborted
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
        decode = ""
        if f is not None and f.completion_tokens > 1:  # the engine's pace after the first token
            decode = f" decode={f.decode_tok_s:.2f}tok/s step_median={1e3 * f.step_median_s:.1f}ms"
        return (f"{self.stream.request.id} {endpoint} in={self.prompt_tokens} out={self.completion_tokens} "
                f"cached={f.cached_tokens if f else 0} latency={latency:.3f}s ttft={ttft:.3f}s{decode} "
                f"finish={reason}")


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



async def _drain(gen: Generation) -> bool:
    async for _ in gen.events():
        pass
    return True
