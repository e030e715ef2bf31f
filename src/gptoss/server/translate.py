"""OpenAI requests → Harmony: function tools, tool_choice (and the forced call header), messages or
Responses input items as Harmony turns, and the rendered prompt."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .. import harmony
from ..constrain import Constraint, ConstraintError, ToolSpec
from ..tokenizer import Tokenizer
from .errors import bad_request
from .schemas import (ChatMessage, ChatTool, ContentPart, FunctionCallItem, InputItem, JSONSchemaSpec, MessageItem,
                      NamedToolChoice, ReasoningItem)

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


def tool_choice(value: Literal["none", "auto", "required"] | NamedToolChoice | None,
                tools: list[harmony.ToolDefinition]) -> ToolChoice:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name"}} (chat) / {"type", "name"}."""
    if value is None or value == "auto":
        return ToolChoice()
    if isinstance(value, str):
        choice = ToolChoice(value)
    else:
        name = value.function.name if value.function is not None else value.name
        if name is None:
            raise bad_request("Missing required parameter: 'tool_choice.function.name'.", "tool_choice.function.name",
                              "missing_required_parameter")
        choice = ToolChoice("function", name)
        if name not in {t.name for t in tools}:
            raise bad_request(f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice")
    if choice.mode != "none" and not tools:
        raise bad_request(f"Invalid value for 'tool_choice': {choice.mode!r} needs 'tools'.", "tool_choice")
    return choice


def forced_header(tok: Tokenizer, choice: ToolChoice, tools: list[harmony.ToolDefinition]) -> list[int]:
    """Assistant-header tokens appended to the prompt (which ends with `<|start|>assistant`) so that the model
    must call a tool, in the order calls are rendered and were trained on: `<|start|>assistant
    to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>` (openai-harmony's rendering). A named
    function gets the whole header; "required" gets ` to=functions` and the model picks `.NAME` and the rest
    (the split is where o200k splits a full header, so the model sees the token boundaries it was trained on);
    "required" with a single function declared is that function, named."""
    if choice.mode == "function" or (choice.mode == "required" and len(tools) == 1):
        name = choice.name if choice.mode == "function" else tools[0].name
        call = harmony.render_message(harmony.Message.tool_call(name, ""), tok)
        return call[2:call.index(tok.message) + 1]  # after <|start|>assistant, through <|message|>
    if choice.mode == "required":
        return tok.encode_ordinary(" to=functions")
    return []


def _text(content: str | list[ContentPart] | None, where: str,
          part_types: tuple[str, ...] = ("text", "input_text", "output_text")) -> str:
    """A message content: a string, or a list of text parts (joined); other parts are a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type in part_types and part.text is None:
            raise bad_request(f"Missing required parameter: '{where}[{j}].text'.", f"{where}[{j}].text",
                              "missing_required_parameter")
        if part.type not in part_types:
            raise bad_request(f"Invalid value for '{where}[{j}].type': only text content parts are supported "
                              f"(type {' / '.join(part_types)}), got {part.type!r}.", f"{where}[{j}].type",
                              "unsupported_content")
        texts.append(part.text)
    return "".join(texts)


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
        if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.reasoning_content or m.reasoning)):
            # OpenAI's rule: only an assistant message with tool calls (here: or reasoning) may leave out its content
            raise bad_request(f"Missing required parameter: '{where}.content'.", f"{where}.content",
                              "missing_required_parameter")
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


def responses_turns(items: list[InputItem], turns: Turns) -> Turns:
    """Responses API input items appended to `turns` (from previous_response_id)."""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            text = _text(item.content, f"{where}.content", ("input_text", "output_text", "text", "refusal"))
            if item.role in ("system", "developer"):
                turns.instructions.append(text)
            elif item.role == "user":
                turns.messages.append(harmony.Message.user(text))
            else:
                turns.messages.append(harmony.Message.assistant(text, "final"))
        elif isinstance(item, ReasoningItem):
            text = "".join(p.text or "" for p in item.content or item.summary or [])
            if text:
                turns.messages.append(harmony.Message.assistant(text, "analysis"))
        elif isinstance(item, FunctionCallItem):
            if not TOOL_NAME.match(item.name):
                raise bad_request(f"Invalid value for '{where}.name': function names are 1-64 letters, digits, '_' "
                                  f"or '-', got {item.name!r}.", f"{where}.name")
            turns.call_names[item.call_id] = item.name
            arguments = item.arguments if isinstance(item.arguments, str) else json.dumps(item.arguments)
            turns.messages.append(harmony.Message.tool_call(item.name, arguments))
        else:  # function_call_output
            name = turns.call_names.get(item.call_id)
            if name is None:
                raise bad_request(f"Invalid value for '{where}.call_id': no function_call with call_id "
                                  f"{item.call_id!r} precedes it.", f"{where}.call_id")
            turns.messages.append(harmony.Message.tool_result(name, _text(item.output, f"{where}.output")))
    return turns


def render_prompt(tok: Tokenizer, turns: Turns, tools: list[harmony.ToolDefinition], effort: str,
                  choice: ToolChoice, max_context: int, param: str,
                  answer: AnswerFormat | None = None) -> tuple[list[int], list[int]]:
    """The prompt tokens (ending with any forced tool-call header) and that forced header. A prompt whose text
    cannot fit `max_context` tokens is refused before it is tokenized (see check_characters). A structured
    answer's format is declared in the developer message (# Response Formats)."""
    check_characters(tok, turns, tools, max_context, param)
    declared = [] if choice.mode == "none" else tools  # "none": the model is not told about the tools
    system = harmony.Message.system(harmony.SystemContent(reasoning_effort=effort))
    conversation = [system]
    instructions = "\n\n".join(turns.instructions) if turns.instructions else None
    response_format = answer.harmony() if answer is not None else None
    if instructions is not None or declared or response_format is not None:
        conversation.append(harmony.Message.developer(harmony.DeveloperContent(instructions, declared,
                                                                               response_format)))
    try:
        prompt = harmony.render_conversation_for_completion(conversation + turns.messages, "assistant", tok)
    except harmony.HarmonyError as e:
        raise bad_request(f"Invalid conversation: {e}.", param) from None
    forced = forced_header(tok, choice, declared)
    return prompt + forced, forced



def fit_turns(tok: Tokenizer, turns: Turns, tools: list[harmony.ToolDefinition],
              render: Callable[[], tuple[list[int], list[int]]], room: int,
              max_context: int) -> tuple[list[int], list[int], int]:
    """Responses' truncation "auto": the oldest whole turns dropped until the prompt leaves `room` tokens of
    `max_context`. Returns (prompt, forced, turns dropped). Each round drops at least the text its excess
    tokens stand for (at the prompt's own characters per token), so a long history takes few renders; when only
    the last turn is left, what `render` (or the caller's length check) refuses is refused as without it."""
    dropped, bound = 0, max_context * longest_token(tok)
    while True:
        chars = prompt_characters(turns, tools)
        if chars > bound:  # cannot fit however it tokenizes: drop without tokenizing (check_characters' bound)
            n = harmony.drop_oldest_turns(turns.messages, chars - bound)
            if n:
                dropped += n
                continue
        prompt, forced = render()
        over = len(prompt) + room - max_context
        n = harmony.drop_oldest_turns(turns.messages, over * chars / max(len(prompt), 1)) if over > 0 else 0
        if not n:
            return prompt, forced, dropped
        dropped += n


@functools.lru_cache(maxsize=4)
def longest_token(tok: Tokenizer) -> int:
    """The most bytes one token of the vocabulary stands for."""
    return max(len(tok.token_bytes(i)) for i in range(tok.n_vocab) if not tok.is_special(i))


def prompt_characters(turns: Turns, tools: list[harmony.ToolDefinition]) -> int:
    """Characters of the text a prompt is rendered from: messages, instructions and tool definitions."""
    chars = sum(len(m.text) for m in turns.messages) + sum(map(len, turns.instructions))
    return chars + sum(len(t.name) + len(t.description) + len(json.dumps(t.parameters or {})) for t in tools)


def check_characters(tok: Tokenizer, turns: Turns, tools: list[harmony.ToolDefinition], max_context: int,
                     param: str) -> None:
    """Refuse, without tokenizing it, a prompt that cannot fit the context: a character is at least one byte
    and a token at most longest_token(tok) bytes, so text of C characters is at least C / longest tokens."""
    chars = prompt_characters(turns, tools)
    bound = max_context * longest_token(tok)
    if chars > bound:
        raise bad_request(f"This model's maximum context length is {max_context} tokens, and the {param} has "
                          f"{chars} characters: more tokens than that however it is tokenized (a token stands for "
                          f"at most {longest_token(tok)} characters). Please reduce the length of the {param}.",
                          param, "context_length_exceeded")


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


# ---------------------------------------------------------------------------------------------- structured outputs
FORMAT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class AnswerFormat:
    """A structured final answer: response_format (chat) or text.format (Responses) of type json_schema or
    json_object (then `schema` is any JSON object, not strict)."""
    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool = True
    param: str = "response_format"  # where the request said it, for errors

    def harmony(self) -> harmony.ResponseFormat:
        return harmony.ResponseFormat(self.name, self.schema, self.description)


def answer_format(fmt: Any, param: str, nested: bool) -> AnswerFormat | None:
    """response_format / text.format → AnswerFormat (None for "text"). nested: chat's fields sit under
    `json_schema`, Responses' in the format itself."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return AnswerFormat("json_object", {"type": "object"}, None, strict=False, param=param)
    if fmt.type != "json_schema":
        raise bad_request(f"Invalid value for '{param}.type': supported are 'text', 'json_object' and "
                          f"'json_schema', got {fmt.type!r}.", f"{param}.type")
    spec: JSONSchemaSpec | None = fmt.json_schema if nested else fmt
    where = f"{param}.json_schema" if nested else param
    if spec is None:
        raise bad_request(f"Missing required parameter: '{where}'.", where, "missing_required_parameter")
    if spec.name is None:
        raise bad_request(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
    if not FORMAT_NAME.match(spec.name):
        raise bad_request(f"Invalid value for '{where}.name': 1-64 letters, digits, '_' or '-', got {spec.name!r}.",
                          f"{where}.name")
    schema = spec.schema_ if spec.schema_ is not None else {}
    return AnswerFormat(spec.name, schema, spec.description, strict=bool(spec.strict), param=f"{where}.schema")


def _check(constraint: Constraint, tok: Tokenizer, param: str, what: str) -> None:
    try:
        constraint.check(tok)
    except ConstraintError as e:
        raise bad_request(f"Invalid schema for {what}: {e}.", param, "invalid_json_schema") from None


def structured_constraint(tok: Tokenizer, answer: AnswerFormat | None, tools: list[harmony.ToolDefinition],
                          strict: dict[str, bool], choice: ToolChoice, tools_param: str,
                          reasoning_budget: int | None = None) -> Constraint | None:
    """The request's constraint (constrain.py), or None when nothing is to be enforced: a structured answer,
    strict tools' arguments, and the name of a call forced by tool_choice "required". Each schema is compiled
    on its own first, so that a 400 names the one that fails (and its unsupported keyword)."""
    declared = [] if choice.mode == "none" else tools
    specs = [ToolSpec(t.name, t.parameters, strict.get(t.name, False)) for t in declared]
    if answer is not None:
        _check(Constraint.json_schema(answer.schema, strict=answer.strict), tok, answer.param,
               f"{answer.param.split('.')[0]} '{answer.name}'")
    for i, spec in enumerate(specs):
        if spec.strict:
            _check(Constraint.harmony(tools=[spec], forced="function"), tok, f"{tools_param}[{i}]",
                   f"function '{spec.name}'")
    if choice.mode == "function" or (choice.mode == "required" and len(specs) == 1):
        spec = next(s for s in specs if s.name == (choice.name if choice.mode == "function" else specs[0].name))
        constraint = Constraint.harmony(tools=[spec], forced="function") if spec.strict else None
    elif choice.mode == "required":
        constraint = Constraint.harmony(tools=specs, forced=" to=functions")
    elif answer is None and not any(s.strict for s in specs):
        constraint = None
    else:
        constraint = Constraint.harmony(answer=answer.schema if answer else None,
                                        strict=answer.strict if answer else True, tools=specs,
                                        reasoning_budget=reasoning_budget)
    if constraint is not None:  # compiled here, in the worker thread, not in the event loop at submit
        _check(constraint, tok, tools_param if answer is None else answer.param, "this request")
    return constraint
