"""OpenAI requests → Harmony: function tools, tool_choice (and the forced call header), messages or
Responses input items as Harmony turns, and the rendered prompt."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .. import harmony
from ..tokenizer import Tokenizer
from .errors import bad_request
from .schemas import ChatMessage, ChatTool

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


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
