"""Harmony → OpenAI: the chat completion message and usage, Responses output items and the Response object,
built from a finished (or streaming) Generation."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, AsyncIterator, Callable

from .. import harmony
from .errors import APIError
from .generation import Generation, Piece, sse
from .schemas import ResponsesRequest
from .translate import ToolChoice, Turns

log = logging.getLogger("gptoss.server")

FINGERPRINT = "fp_gptoss"


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


def _cached(gen: Generation) -> int:
    """Prompt tokens whose keys/values came from the engine's prefix cache."""
    return gen.finish.cached_tokens if gen.finish is not None else 0


def chat_usage(gen: Generation) -> dict[str, Any]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": _cached(gen)},
            "completion_tokens_details": {"reasoning_tokens": gen.reasoning_tokens}}


def chat_completion(gen: Generation, cid: str, created: int, model_name: str) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "message": chat_message(gen), "logprobs": None,
                         "finish_reason": gen.finish_reason()}],
            "usage": chat_usage(gen)}


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
    strict = {t.name: t.strict is True for t in body.tools or [] if t.type == "function"}
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": model_name, "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": strict.get(t.name, False)} for t in tools],
            "tool_choice": choice.echo(), "parallel_tool_calls": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": effort, "summary": None},
            "store": body.store, "text": {"format": text_format(body)}, "truncation": body.truncation or "disabled"}


def text_format(body: ResponsesRequest) -> dict[str, Any]:
    """The text.format the request asked for, echoed as OpenAI does."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return {"type": fmt.type if fmt is not None else "text"}
    return {"type": "json_schema", "name": fmt.name, "description": fmt.description, "schema": fmt.schema_,
            "strict": bool(fmt.strict)}


def finished_response(shell: dict[str, Any], gen: Generation) -> dict[str, Any]:
    incomplete = gen.finish_reason() == "length"
    return {**shell, "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [output_item(p, "completed") for p in gen.pieces],
            # cache_write_tokens: OpenAI's explicit prompt-cache writes (its ResponseUsage requires the field);
            # this server has no such writes
            "usage": {"input_tokens": gen.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": _cached(gen), "cache_write_tokens": 0},
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

# ---------------------------------------------------------------------------------------------- streams
async def chat_stream(gen: Generation, cid: str, created: int, model_name: str,
                      include_usage: bool) -> AsyncIterator[str]:
    """A chat completion as SSE chunks; usage in a last chunk when asked; errors as an error event; then [DONE]."""
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


async def responses_stream(gen: Generation, shell: dict[str, Any],
                           on_done: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
    """A Response as SSE events (created, in_progress, items and their deltas, completed/incomplete/failed);
    on_done(response) runs once it is complete (storing it for previous_response_id)."""
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
        if gen.aborted is not None:  # the server is shutting down: an error event, then [DONE] as in chat
            e = gen.aborted
            yield event("error", code=e.code, message=e.message, param=e.param)
            yield sse("[DONE]")
            return
        f = gen.finish
        if f is not None and f.reason == "error":
            failed = {**shell, "status": "failed",
                      "error": {"code": "server_error", "message": f"generation failed: {f.error}"}}
            yield event("response.failed", response=failed)
            return
        out = finished_response(shell, gen)
        on_done(out)
        yield event("response.completed" if out["status"] == "completed" else "response.incomplete", response=out)
    finally:
        log.info(gen.log_line("responses"))
