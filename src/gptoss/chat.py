"""A Harmony chat session and the terminal front end of `gptoss chat`.

The session owns the conversation (system, developer with tools, then turns) and talks to the engine
through one small interface, `Complete(prompt_ids, params) -> iterator of token ids`, so it runs the same
on a real model, a tiny random one, or a scripted stub in tests. One user turn may take several model
calls: the model stops at <|call|> when it calls a tool, the tool's result is appended as a `tool` message,
and the model is called again until it stops at <|return|> (its final answer).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from . import harmony, sandbox
from .errors import GptOssError
from .generate import SamplingParams
from .tokenizer import Tokenizer, get_tokenizer
from .tools import BUILTIN_TOOLS, PYTHON_DESCRIPTION, PYTHON_TIMEOUT, Tool, load_tools, run_python, run_tool

Complete = Callable[[Sequence[int], SamplingParams], Iterator[int]]


@dataclass
class ChatEvent:
    kind: str  # "analysis" | "commentary" | "final" (text deltas), "tool_call", "tool_result", "notice", "done"
    text: str = ""
    name: str | None = None  # the tool, for tool_call / tool_result


@contextmanager
def model_completer(model, prefix_cache_bytes: int | None = None) -> Iterator[Complete]:
    """Completions from `model` through a one-row Engine, whose prefix cache keeps the conversation's keys
    and values: each turn prefills only what was added since the last one. Under torchrun (a parallel
    Leader, whose followers mirror only plain caches) through `generate`, every turn from scratch."""
    from .engine import DEFAULT_PREFIX_CACHE_BYTES, Engine
    from .parallel import Leader
    from .vocab import unwrap

    if isinstance(unwrap(model), Leader):
        from .generate import generate

        def complete(prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
            for _, token in generate(model, [list(prompt)], params):
                yield token
        yield complete
        return
    # a queue, so that a turn may start while the engine still drops the previous one (an iterator closed early)
    with Engine(model, max_concurrency=1, max_queue=4, prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES
                if prefix_cache_bytes is None else prefix_cache_bytes) as engine:
        yield engine.complete


class ChatSession:
    def __init__(self, complete: Complete, params: SamplingParams, tokenizer: Tokenizer | None = None,
                 reasoning_effort: str = "medium", model_identity: str | None = None,
                 instructions: str | None = None, tools: Sequence[Tool] = (),
                 ask: Callable[[str], str] | None = None, max_tool_rounds: int = 8,
                 python_timeout: float | None = None, python_unsafe: bool = False,
                 response_format: harmony.ResponseFormat | None = None, reasoning_budget: int | None = None,
                 context_limit: int | None = None):
        self.complete, self.params = complete, params
        self.context_limit = context_limit  # prompt + generated tokens (the model's context); None: not checked
        self.tok = tokenizer or get_tokenizer()
        self.tools = {t.name: t for t in tools}
        self.ask, self.max_tool_rounds = ask, max_tool_rounds
        self.python_timeout = python_timeout  # None: no built-in python tool
        self.python_unsafe = python_unsafe  # True: its code runs without the sandbox
        if python_timeout is not None and not python_unsafe:
            sandbox.isolation()  # refuse now (SandboxUnavailable), not at the model's first call
        self.reasoning_effort, self.model_identity, self.instructions = reasoning_effort, model_identity, instructions
        # a structured answer: declared in the developer message, enforced on every model call (constrain.py)
        self.response_format, self.constraint = response_format, None
        if response_format is not None:
            if python_timeout is not None:
                raise GptOssError("a JSON schema for the answers cannot be combined with the python tool")
            from .constrain import Constraint, ToolSpec

            self.constraint = Constraint.harmony(answer=response_format.schema, reasoning_budget=reasoning_budget,
                                                 tools=[ToolSpec(t.name, t.parameters) for t in tools])
            self.constraint.check(self.tok)  # refuse an unsupported schema now, not at the first answer
        self.messages: list[harmony.Message] = []

    # -------------------------------------------------------- the conversation
    def header(self) -> list[harmony.Message]:
        system = harmony.SystemContent(reasoning_effort=self.reasoning_effort)
        if self.python_timeout is not None:
            description = PYTHON_DESCRIPTION.format(timeout=self.python_timeout)
            system.tools = [harmony.ToolNamespace("python", description)]
        if self.model_identity:
            system.model_identity = self.model_identity
        out = [harmony.Message.system(system)]
        if self.instructions or self.tools or self.response_format:
            defs = [harmony.ToolDefinition(t.name, t.description, t.parameters) for t in self.tools.values()]
            out.append(harmony.Message.developer(harmony.DeveloperContent(self.instructions, defs,
                                                                          self.response_format)))
        return out

    def prompt(self) -> list[int]:
        conversation = harmony.Conversation(self.header() + self.messages)
        return harmony.render_conversation_for_completion(conversation, "assistant", self.tok)

    def reset(self) -> None:
        self.messages.clear()

    def fit(self) -> tuple[list[int], int, int]:
        """(prompt, max_tokens, turns dropped): the oldest whole turns are dropped until the prompt leaves room
        for max_tokens (at most half the context), never the turn in progress; max_tokens is then cut to the
        room left. A turn that cannot fit on its own is a GptOssError that says by how much."""
        prompt, max_tokens = self.prompt(), self.params.max_tokens
        if self.context_limit is None:
            return prompt, max_tokens, 0
        limit, dropped = self.context_limit, 0
        reserve = min(max_tokens, limit // 2)
        while len(prompt) + reserve > limit and harmony.drop_oldest_turns(self.messages):  # one turn at a time
            dropped += 1
            prompt = self.prompt()
        if len(prompt) >= limit:
            raise GptOssError(f"the message does not fit: with it the conversation takes {len(prompt)} tokens, "
                              f"and the model's context is {limit}; /reset or write a shorter message")
        return prompt, min(max_tokens, limit - len(prompt)), dropped

    # -------------------------------------------------------- one user turn
    def send(self, text: str) -> Iterator[ChatEvent]:
        """One user turn: its events as the model writes them. A turn that fails (GptOssError) leaves the
        conversation as it was before it, so the chat can go on."""
        before = list(self.messages)
        try:
            yield from self._turn(text)
        except Exception:
            self.messages = before
            raise

    def _turn(self, text: str) -> Iterator[ChatEvent]:
        self.messages.append(harmony.Message(role="user", content=text))
        # <|endoftext|> is not a Harmony stop, but a model that emits it has nothing more to say
        stops = set(harmony.stop_tokens_for_assistant_actions(self.tok)) | {self.tok.endoftext}
        params = SamplingParams(**{**vars(self.params), "stop_tokens": tuple(stops), "constraint": self.constraint})
        answered = False  # the user saw an answer (final, or a preamble) this turn
        for _ in range(self.max_tool_rounds + 1):
            parser = harmony.StreamParser(self.tok, role="assistant")
            ended = harmony.FinalAnswerEnded(self.tok)  # a final answer ended with <|end|> ends the turn too
            tokens: list[int] = []
            prompt, max_tokens, dropped = self.fit()
            if dropped:
                what = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
                yield ChatEvent("notice", f"({what} left the conversation: it no longer fit the model's "
                                          f"{self.context_limit}-token context)")
            stream = self.complete(prompt, dataclasses.replace(params, max_tokens=max_tokens))
            for token in stream:
                tokens.append(token)
                delta = parser.process(token)
                if delta is not None and delta.text and not delta.recipient:
                    answered |= delta.channel != "analysis"
                    yield ChatEvent(delta.channel or "final", delta.text)
                if ended(tokens):  # what follows would be a second answer (gptoss serve stops there as well)
                    getattr(stream, "close", lambda: None)()  # Engine.complete: cancels the request
                    break
            new = parser.finish()
            self.messages.extend(new)
            call = new[-1] if new and new[-1].role == "assistant" and new[-1].recipient else None
            python = call is not None and call.recipient.split(".")[0] == "python"  # `to=python` (or python.exec)
            if call is None or not (python or call.recipient.startswith("functions.")):
                # a final answer (or max_tokens reached): the turn is over
                # Harmony: the chain of thought of finished turns is not shown to the model again
                self.messages = [m for m in self.messages if m.channel != "analysis"]
                if answered:
                    yield ChatEvent("done")
                elif len(tokens) >= max_tokens:
                    yield ChatEvent("done", f"(no answer: the turn reached its limit of {max_tokens} tokens "
                                            "before a final message)")
                else:  # e.g. a demo-model turn that stops after its analysis: say so rather than print nothing
                    yield ChatEvent("done", "(no answer: the model ended its turn without a final message)")
                return
            name = "python" if python else call.recipient.removeprefix("functions.")
            if not python:  # the arguments as the server would return them (repaired if the JSON is broken)
                call = self.messages[-1] = dataclasses.replace(call, content=harmony.call_arguments(call.content))
            yield ChatEvent("tool_call", call.content, name)
            if python:
                result = (run_python(call.content, self.python_timeout, unsafe=self.python_unsafe)
                          if self.python_timeout is not None
                          else "python is not available in this conversation")
                # the result comes back on the call's channel (analysis), authored by the tool
                reply = harmony.Message("tool", result, channel=call.channel or "analysis", recipient="assistant",
                                        name=call.recipient)
            else:
                tool = self.tools.get(name)
                result = (run_tool(tool, call.content, self.ask) if tool
                          else f'{{"error": "no tool named {name}; available: {", ".join(self.tools) or "none"}"}}')
                reply = harmony.Message.tool_result(call.recipient, result)
            yield ChatEvent("tool_result", result, name)
            self.messages.append(reply)
        yield ChatEvent("done", "stopped: too many tool calls in one turn")


# ---------------------------------------------------------------- terminal front end
HELP = """commands: /reset (new conversation)  /effort low|medium|high  /reasoning (show/hide analysis)
          /exit (or Ctrl-D)"""


def run_chat(args: argparse.Namespace) -> None:
    from .loading import load_model_from_args, prefix_cache_bytes, sampling_params

    tok = get_tokenizer()
    params = sampling_params(args)
    tools: list[Tool] = load_tools(args.tools) if args.tools else []
    if args.calculator:
        tools.append(BUILTIN_TOOLS["calculator"])
    python = args.python or args.python_unsafe
    if python and not args.python_timeout > 0:
        raise GptOssError(f"--python-timeout must be a positive number of seconds, got {args.python_timeout:g}")
    if python and not args.python_unsafe:
        sandbox.isolation()  # before loading the model: SandboxUnavailable says what is missing
    response_format = None
    if getattr(args, "json_schema", None):
        from .constrain import Constraint, ConstraintError, read_schema

        path = args.json_schema
        schema = read_schema(path)
        try:  # before the model loads
            Constraint.json_schema(schema).check(tok)
        except ConstraintError as e:
            raise GptOssError(f"--json-schema {path}: {e}") from None
        response_format = harmony.ResponseFormat(Path(path).stem.replace(".", "_") or "answer", schema)
    model = load_model_from_args(args)
    interactive = sys.stdin.isatty()
    out = sys.stdout

    def read(prompt: str) -> str | None:
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        if not line:
            return None
        out.write(prompt + line)  # echo piped input so the transcript reads like a session
        return line.rstrip("\n")

    def ask_tool_result(call: str) -> str:
        answer = read(f"[tool {call}] result> ")
        return answer if answer is not None else '{"error": "no result given"}'

    # reasoning is dimmed on a colour terminal (https://no-color.org: NO_COLOR turns it off)
    dim, undim = ("\033[2m", "\033[0m") if out.isatty() and not os.environ.get("NO_COLOR") else ("", "")

    def show_turn(events: Iterator[ChatEvent], show_reasoning: bool) -> None:
        channel = None
        for event in events:
            # what `gptoss serve` returns as content: the final answer and preambles (commentary to no one,
            # which Harmony means for the user); the analysis only with /reasoning
            if event.kind in ("analysis", "commentary", "final"):
                if event.kind == "analysis" and not show_reasoning:
                    continue
                if event.kind != channel:
                    label = "[thinking] " if event.kind == "analysis" else ""
                    out.write(label if channel is None else "\n" + label)
                    channel = event.kind
                out.write(f"{dim}{event.text}{undim}" if event.kind == "analysis" else event.text)
            elif event.kind == "tool_call" and event.name == "python":
                out.write(f"{chr(10) if channel else ''}[python]\n{event.text.rstrip()}\n")
                channel = None
            elif event.kind == "tool_call":
                out.write(f"{chr(10) if channel else ''}[tool call] {event.name}({event.text})\n")
                channel = None
            elif event.kind == "tool_result":
                sep = "\n" if event.name == "python" else " "
                out.write(f"[tool result]{sep}{event.text}\n")
            elif event.kind == "notice":
                out.write(f"{chr(10) if channel else ''}{event.text}\n")
                channel = None
            elif event.kind == "done":
                out.write(f"{event.text}\n" if event.text else "\n")
            out.flush()

    with model_completer(model, prefix_cache_bytes(args)) as complete:  # the engine thread ends with the chat
        session = ChatSession(complete, params, tok, args.reasoning_effort, args.system, args.developer, tools,
                              ask=ask_tool_result, python_timeout=args.python_timeout if python else None,
                              python_unsafe=args.python_unsafe, response_format=response_format,
                              context_limit=model.config.max_position_embeddings)
        show_reasoning = args.show_reasoning
        if interactive:
            out.write(f"gptoss chat — {args.model} — reasoning {args.reasoning_effort}. /help for commands.\n")
        while True:
            line = read(">>> ")
            if line is None:
                out.write("\n" if interactive else "")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/exit", "/quit", "/bye"):
                    return
                if cmd == "/reset":
                    session.reset()
                    out.write("(new conversation)\n")
                elif cmd == "/effort" and arg in ("low", "medium", "high"):
                    session.reasoning_effort = arg
                    out.write(f"(reasoning effort {arg})\n")
                elif cmd == "/reasoning":
                    show_reasoning = not show_reasoning
                    out.write(f"(reasoning {'shown' if show_reasoning else 'hidden'})\n")
                else:
                    out.write(HELP + "\n")
                continue
            try:
                show_turn(session.send(line), show_reasoning)
            except GptOssError as e:  # this turn failed and left the conversation as it was: say why, go on
                out.write(f"error: {e}\n")
                out.flush()
