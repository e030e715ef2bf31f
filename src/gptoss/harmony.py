"""Harmony, the chat format of GPT-oss, in pure Python: conversations → tokens, completion tokens → messages.

A message is `<|start|>{header}<|message|>{content}{end}`; the header holds the author, ` to={recipient}`,
`<|channel|>{channel}` and a content type (` <|constrain|>json` for JSON tool arguments), the end is
`<|end|>`, `<|call|>` (an assistant message to a tool) or `<|return|>` (the last message of a completion).

Rendering is token-for-token that of openai-harmony 0.0.8 (https://github.com/openai/harmony, the test
oracle; never imported here): each header piece is tokenized on its own, special-token strings in any text
stay text, system and developer contents are laid out line for line as it does, and JSON-schema tool
parameters become its TypeScript-like declarations, quirks included. Rendering differs on purpose only in:

* `content_type="json"` renders as ` <|constrain|>json` (openai-harmony needs the marker in the string,
  "<|constrain|>json", which is accepted too); parsing turns "<|constrain|>json" back into "json".
* An empty `DeveloperContent.tools` renders no "# Tools" section (as openai-harmony with no namespace).

Parsing (`StreamParser`, `parse_messages`) gives openai-harmony's messages on well-formed completions and
never raises: small or untrained models emit malformed output, and a chat must show what came back. Where
openai-harmony raises or misreads, a header without `<|message|>` becomes content, a `<|start|>` or
`<|channel|>` inside content opens a new message (openai-harmony keeps it as text), other special tokens
there are dropped, `<|endoftext|>` ends a message, a missing end token is fine, "user:alice" is a named
author, a lone "<|constrain|>json" header word is a content type (not a recipient), and bytes split across
tokens are decoded incrementally.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .errors import GptOssError
from .tokenizer import Tokenizer, TokenizerError, get_tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_CHANNELS = ("analysis", "commentary", "final")

CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"


class HarmonyError(GptOssError, ValueError):
    """A message that cannot be rendered (unknown role, tool message without a name, misplaced content)."""


# ---------------------------------------------------------------------------------------------- data model
@dataclass
class ToolDefinition:
    """A function tool: rendered in the developer message as `type name = (_: {...}) => any;`."""
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object; None: no arguments


@dataclass
class ToolNamespace:
    """A namespace of built-in tools declared in the system message (`## python`, `## browser`): its
    description, and the functions it holds (none for `python`, which takes code as its message)."""
    name: str
    description: str | None = None
    tools: list[ToolDefinition] = field(default_factory=list)


@dataclass
class SystemContent:
    """The system message. Every field left None is omitted from the rendering, as in openai-harmony."""
    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    reasoning_effort: str | None = "medium"  # "low" | "medium" | "high"
    knowledge_cutoff: str | None = "2024-06"
    conversation_start_date: str | None = None  # e.g. "2025-06-28"
    valid_channels: Sequence[str] = DEFAULT_CHANNELS
    channel_required: bool = True
    tools: list[ToolNamespace] = field(default_factory=list)  # built-in tools (function tools: developer)

    def render_text(self, has_function_tools: bool = False) -> str:
        top = [] if self.model_identity is None else [self.model_identity]
        if self.knowledge_cutoff is not None:
            top.append(f"Knowledge cutoff: {self.knowledge_cutoff}")
        if self.conversation_start_date is not None:
            top.append(f"Current date: {self.conversation_start_date}")
        sections = ["\n".join(top)] if top else []
        if self.reasoning_effort is not None:
            effort = self.reasoning_effort.lower()
            if effort not in REASONING_EFFORTS:
                raise HarmonyError(f"reasoning_effort {self.reasoning_effort!r}: expected one of {REASONING_EFFORTS}")
            sections.append(f"Reasoning: {effort}")
        if self.tools:
            names = [ns.name for ns in self.tools]
            if len(set(names)) < len(names):
                raise HarmonyError(f"SystemContent.tools: a namespace is declared twice in {names}")
            # openai-harmony keeps them in a map keyed by name: they render sorted by name
            sections.append(tools_section(sorted(self.tools, key=lambda ns: ns.name)))
        if self.valid_channels:
            channels = f"# Valid channels: {', '.join(self.valid_channels)}."
            if self.channel_required:
                channels += " Channel must be included for every message."
            if has_function_tools:  # a property of the whole conversation: see Conversation.has_function_tools
                channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
            sections.append(channels)
        return "\n\n".join(sections)


@dataclass
class ResponseFormat:
    """A structured-output format the final answer must follow (the Harmony guide's "# Response Formats"
    section of the developer message: `## name`, an optional `// description` line, the JSON schema)."""
    name: str
    schema: dict[str, Any]
    description: str | None = None

    def render_text(self) -> str:
        comment = f"// {self.description}\n" if self.description else ""
        return f"## {self.name}\n\n{comment}{json_compact(self.schema)}"


@dataclass
class DeveloperContent:
    """The developer message: instructions ("system prompt" in other APIs), the function tools, and the
    response format of a structured output."""
    instructions: str | None = None
    tools: list[ToolDefinition] = field(default_factory=list)
    response_format: ResponseFormat | None = None

    def render_text(self) -> str:
        sections = ["# Instructions", self.instructions] if self.instructions is not None else []
        if self.tools:
            sections.append(tools_section([ToolNamespace("functions", None, self.tools)]))
        if self.response_format is not None:
            sections += ["# Response Formats", self.response_format.render_text()]
        return "\n\n".join(sections)


@dataclass
class Message:
    """One Harmony message. `name` is the author name: for role "tool" the tool itself ("functions.NAME")."""
    role: str
    content: str | SystemContent | DeveloperContent = ""
    channel: str | None = None
    recipient: str | None = None  # "functions.NAME" for a tool call, "assistant" for a tool's result
    content_type: str | None = None  # "json": rendered as " <|constrain|>json"
    name: str | None = None

    @classmethod
    def system(cls, content: SystemContent | None = None) -> Message:
        return cls("system", content if content is not None else SystemContent())

    @classmethod
    def developer(cls, content: DeveloperContent | str) -> Message:
        return cls("developer", DeveloperContent(content) if isinstance(content, str) else content)

    @classmethod
    def user(cls, text: str) -> Message:
        return cls("user", text)

    @classmethod
    def assistant(cls, text: str, channel: str | None = "final") -> Message:
        return cls("assistant", text, channel=channel)

    @classmethod
    def tool_call(cls, recipient: str, arguments: str | Any, channel: str = "commentary") -> Message:
        """An assistant call: `recipient` "functions.NAME" (a bare NAME gets the prefix), JSON arguments."""
        recipient = recipient if "." in recipient else f"functions.{recipient}"
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls("assistant", text, channel=channel, recipient=recipient, content_type="json")

    @classmethod
    def tool_result(cls, tool: str, output: str, channel: str = "commentary") -> Message:
        """A tool's answer to the assistant; `tool` is the call's recipient ("functions.NAME")."""
        tool = tool if "." in tool else f"functions.{tool}"
        return cls("tool", output, channel=channel, recipient="assistant", name=tool)

    @property
    def text(self) -> str:
        """The content as text (the rendered text for system and developer contents)."""
        return self.content if isinstance(self.content, str) else self.content.render_text()

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and self.recipient is not None

    def json_content(self) -> Any | None:
        """The content as JSON (tool-call arguments), repaired if truncated; None if nothing can be recovered."""
        return loads_lenient(self.text)


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def has_function_tools(self) -> bool:
        """openai-harmony's rule: a developer message declares function tools (adds a line to the system one)."""
        return any(isinstance(m.content, DeveloperContent) and m.content.tools for m in self.messages)


# ---------------------------------------------------------------------------------------------- rendering
def drop_oldest_turns(messages: list[Message], chars: float = 0) -> int:
    """Drop whole turns from the start of `messages` in place (a user message and all that follows it up to the
    next one; anything before the first user message goes with the first turn), oldest first: at least one,
    and until `chars` characters of text are gone, never the last user turn. Returns the number dropped (0:
    only the last turn is left). What `gptoss chat` and the server's truncation "auto" do past the context."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    gone, k = 0, 0
    while k + 1 < len(users) and (k == 0 or gone < chars):
        gone += sum(len(m.text) for m in messages[users[k] if k else 0:users[k + 1]])
        k += 1
    if k:
        del messages[:users[k]]
    return k


def render_message(message: Message, tokenizer: Tokenizer | None = None, *,
                   has_function_tools: bool = False) -> list[int]:
    tok = tokenizer or get_tokenizer()
    text = tok.encode_ordinary  # special-token strings in any text stay text
    role = message.role
    if role not in ROLES:
        raise HarmonyError(f"unknown role {role!r}: expected one of {ROLES}")
    out = [tok.start]
    if role == "tool":  # a tool's message is authored by the tool: its name replaces the role
        if not message.name:
            raise HarmonyError("a tool message needs the tool's name as author (name='functions.NAME')")
        out += text(message.name)
    else:
        out += text(role)
        if message.name is not None:
            out += text(f":{message.name}")
    if message.recipient is not None and message.recipient != "all":
        out += text(f" to={message.recipient}")
    if message.channel is not None:
        out += [tok.channel, *text(message.channel)]
    content_type = message.content_type
    if content_type is not None:
        if content_type == "json":
            content_type = CONSTRAIN + content_type
        if content_type.startswith(CONSTRAIN):  # the marker is a token of its own, after a text space
            rest = content_type[len(CONSTRAIN):]
            out += [*text(" "), tok.constrain, *(text(rest) if rest else [])]
        else:
            out += text(f" {content_type}")
    out.append(tok.message)
    content = message.content
    if isinstance(content, SystemContent):
        if role != "system":
            raise HarmonyError(f"SystemContent may only appear in a system message, not in a {role} one")
        out += text(content.render_text(has_function_tools))
    elif isinstance(content, DeveloperContent):
        if role != "developer":
            raise HarmonyError(f"DeveloperContent may only appear in a developer message, not in a {role} one")
        out += text(content.render_text())
    else:
        out += text(content)
    out.append(tok.call if role == "assistant" and message.recipient is not None else tok.end)
    return out


def _messages(conversation: Conversation | Sequence[Message]) -> list[Message]:
    return list(conversation.messages if isinstance(conversation, Conversation) else conversation)


def render_conversation(conversation: Conversation | Sequence[Message], tokenizer: Tokenizer | None = None, *,
                        auto_drop_analysis: bool = True) -> list[int]:
    """Every message, each ended by <|end|> (<|call|> for tool calls).

    openai-harmony's `auto_drop_analysis` rule, replicated exactly: only when the last assistant message is
    in the `final` channel, `analysis` messages before the *first* `final` message are left out (the
    chain of thought of finished turns; analysis between two finals stays, as in openai-harmony)."""
    messages = _messages(conversation)
    has_tools = Conversation(messages).has_function_tools()
    last_assistant_final = next((m.channel == "final" for m in reversed(messages) if m.role == "assistant"), False)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    drop = auto_drop_analysis and last_assistant_final and first_final is not None
    out: list[int] = []
    for i, m in enumerate(messages):
        if not (drop and i < first_final and m.channel == "analysis"):
            out += render_message(m, tokenizer, has_function_tools=has_tools)
    return out


def render_conversation_for_completion(conversation: Conversation | Sequence[Message], next_role: str = "assistant",
                                       tokenizer: Tokenizer | None = None, *,
                                       auto_drop_analysis: bool = True) -> list[int]:
    """The prompt: the conversation then `<|start|>{next_role}`, for the model to continue."""
    tok = tokenizer or get_tokenizer()
    if next_role not in ROLES:
        raise HarmonyError(f"unknown role {next_role!r}: expected one of {ROLES}")
    out = render_conversation(conversation, tok, auto_drop_analysis=auto_drop_analysis)
    return out + [tok.start, *tok.encode_ordinary(next_role)]


def render_conversation_for_training(conversation: Conversation | Sequence[Message],
                                     tokenizer: Tokenizer | None = None, *,
                                     auto_drop_analysis: bool = True) -> list[int]:
    """As `render_conversation`, but a last assistant message in `final` ends with <|return|> (what the
    model emits at the end of its answer) instead of <|end|> (how history records it)."""
    tok = tokenizer or get_tokenizer()
    messages = _messages(conversation)
    out = render_conversation(messages, tok, auto_drop_analysis=auto_drop_analysis)
    if out and messages[-1].role == "assistant" and messages[-1].channel == "final":
        out[-1] = tok.return_
    return out


def stop_tokens(tokenizer: Tokenizer | None = None) -> frozenset[int]:
    """Tokens that end a message: <|return|>, <|call|>, <|end|> (openai-harmony's `stop_tokens`)."""
    tok = tokenizer or get_tokenizer()
    return frozenset((tok.return_, tok.call, tok.end))


def stop_tokens_for_assistant_actions(tokenizer: Tokenizer | None = None) -> frozenset[int]:
    """Where sampling stops: <|return|> (answer done) and <|call|> (a tool must run). Not <|end|>: after
    an analysis message ends the model goes on with the next one."""
    tok = tokenizer or get_tokenizer()
    return frozenset((tok.return_, tok.call))


# ------------------------------------------------------------------------------- tools as TypeScript
def tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """The "# Tools" section of a system or developer message, as openai-harmony lays it out."""
    return "# Tools\n\n" + "\n\n".join(_namespace_section(ns) for ns in namespaces)


def _namespace_section(ns: ToolNamespace) -> str:
    lines = [f"## {ns.name}\n"]
    if ns.description is not None:  # a comment above the namespace, plain text when it holds no functions
        lines += [f"// {line}" if ns.tools else line for line in _rust_lines(ns.description)]
    if ns.tools:
        lines.append(f"namespace {ns.name} {{\n")
        for tool in ns.tools:
            lines += [f"// {line}" for line in _rust_lines(tool.description)]
            if tool.parameters is not None:
                lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
            else:
                lines.append(f"type {tool.name} = () => any;\n")
        lines.append(f"}} // namespace {ns.name}")
    return "\n".join(lines)


def _rust_lines(s: str) -> list[str]:
    """Rust's str::lines (openai-harmony splits descriptions with it): \\n or \\r\\n, no final empty line."""
    lines = s.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema: Any, key: str) -> bool:  # serde's `get(key).is_some()`: a JSON null counts as present
    return isinstance(schema, dict) and key in schema


def _str(schema: Any, key: str) -> str | None:
    value = _get(schema, key)
    return value if isinstance(value, str) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and bool(values)


def _nullable(schema: Any, rendered: str) -> str:
    return rendered + " | null" if _get(schema, "nullable") is True and "null" not in rendered else rendered


def _default(schema: Any, bare_enum_strings: bool = True) -> str:
    """A `default` for a comment: strings in quotes, unescaped; enum strings bare (in property positions)
    or as JSON (in a top-level oneOf variant); anything else as compact JSON."""
    value = schema["default"]
    if isinstance(value, str) and not _is_enum(schema):
        return f'default: "{value}"'
    if isinstance(value, str) and bare_enum_strings:
        return f"default: {value}"
    return f"default: {json_compact(value)}"


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as openai-harmony's TypeScript-like type (port of `json_schema_to_typescript`)."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
            comments = [d] if (d := _str(variant, "description")) is not None else []
            if _has(variant, "default"):
                comments.append(_default(variant, bare_enum_strings=False))
            if comments:
                out += f" // {' '.join(comments)}"
        return out
    ty = _get(schema, "type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        return _object_to_typescript(schema, indent)
    if ty == "string":
        values = _get(schema, "enum")
        literals = [f'"{v}"' for v in values if isinstance(v, str)] if isinstance(values, list) else []
        return " | ".join(literals) if literals else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if _has(schema, "items") else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = f"{indent}// {d}\n" if (d := _str(schema, "description")) is not None else ""
    out += "{\n"
    props = _get(schema, "properties")
    required_list = _get(schema, "required")
    required = {r for r in required_list if isinstance(r, str)} if isinstance(required_list, list) else set()
    for key, val in (props.items() if isinstance(props, dict) else ()):
        optional = "" if key in required else "?"
        if (title := _str(val, "title")) is not None:
            out += f"{indent}// {title}\n{indent}//\n"
        if not _has(val, "oneOf") and (d := _str(val, "description")) is not None:
            out += f"{indent}// {d}\n"
        examples = _get(val, "examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n" + "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
        variants = _get(val, "oneOf")
        if isinstance(variants, list):
            # A union property: its description above (unless the first variant repeats it), each variant on
            # a line of its own with its own description and default as a trailing comment.
            prop_desc = _str(val, "description")
            desc_above = prop_desc is not None and not (variants and _str(variants[0], "description") == prop_desc)
            if desc_above:
                out += f"{indent}// {prop_desc}\n"
            if _has(val, "default"):
                out += f"{indent}// {_default(val)}\n"
            out += f"{indent}{key}{optional}:\n"
            for i, variant in enumerate(variants):
                out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
                comments = []
                if not (i == 0 and desc_above) and (d := _str(variant, "description")) is not None and d != prop_desc:
                    comments.append(d)
                if _has(variant, "default"):
                    comments.append(_default(variant))
                out += (f" // {' '.join(comments)}" if comments else "") + "\n"
            out += f"{indent},\n"
            continue
        out += f"{indent}{key}{optional}: " + _nullable(val, schema_to_typescript(val, indent + "    ")) + ","
        if not _has(val, "oneOf") and _has(val, "default"):
            out += f" // {_default(val)}"
        out += "\n"
    return out + f"{indent}}}"


def json_compact(value: Any) -> str:
    """JSON as serde_json's Display writes it (openai-harmony prints defaults so): compact, non-ASCII kept,
    floats in Rust's shortest form (1e-7, 1e16, 0.00001), integers beyond 64 bits as floats."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -2**63 <= value < 2**64 else _rust_float(float(value))
    if isinstance(value, float):
        return _rust_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{json_compact(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(json_compact, value)) + "]"
    return json.dumps(value, ensure_ascii=False)


def _rust_float(x: float) -> str:
    """ryu's formatting (serde_json's) of the shortest round-trip digits, which Python's repr also finds."""
    if not math.isfinite(x):
        return "null"  # serde_json writes NaN and infinities as null
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits, k = (whole + frac).lstrip("0"), int(exp or 0) - len(frac)
    while digits.endswith("0"):
        digits, k = digits[:-1], k + 1
    n = len(digits)
    kk = n + k  # 10^(kk-1) <= x < 10^kk
    if 0 <= k and kk <= 16:
        s = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        s = f"{digits[:kk]}.{digits[kk:]}"
    elif -5 < kk <= 0:
        s = "0." + "0" * -kk + digits
    else:
        s = (digits if n == 1 else f"{digits[0]}.{digits[1:]}") + f"e{kk - 1}"
    return ("-" if x < 0 else "") + s


# ---------------------------------------------------------------------------------------------- parsing
# Rust's char::is_whitespace (Unicode White_Space) and split_ascii_whitespace, which openai-harmony uses.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"
_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")
_SALVAGE_WORD = re.compile(r"[ \t\n\x0c\r]*(to=[\w.:/-]+|<\|constrain\|>[\w.+/-]*)")


@dataclass
class Header:
    """A parsed message header."""
    role: str
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


def _split_channel(text: str) -> tuple[str | None, str]:
    """The channel (after the first <|channel|>, up to whitespace or '<') and the text without it."""
    i = text.find(CHANNEL)
    if i < 0:
        return None, text
    after = text[i + len(CHANNEL):]
    j = next((k for k, c in enumerate(after) if c in _WHITESPACE or c == "<"), len(after))
    return after[:j] or None, text[:i] + after[j:]


def _content_type(value: str | None) -> str | None:
    return "json" if value == CONSTRAIN + "json" else value


def parse_header(text: str, role: str | None, default_role: str = "assistant") -> Header:
    """A decoded header (between <|start|> and <|message|>), as openai-harmony reads it; `role` None: the
    header names its author. Where openai-harmony raises, a best guess instead."""
    channel, rest = _split_channel(text)
    rest = rest.strip(_WHITESPACE)
    if CONSTRAIN in rest:  # "to=x<|constrain|>json": the content type is a word of its own
        rest = rest.replace(CONSTRAIN, " " + CONSTRAIN).strip(_WHITESPACE)
    parts = [p for p in _ASCII_WS.split(rest) if p]
    name = None
    if role is None:
        if not parts:
            role = default_role
        elif parts[0] in ROLES:
            role = parts[0]
            name = parts[0] if role == "tool" else None
        elif parts[0].partition(":")[0] in ROLES:  # "user:alice", a named author as rendered (openai-harmony raises)
            role, _, name = parts.pop(0).partition(":")
        else:  # an author that is no role is a tool ("functions.get_weather to=assistant")
            role, name = "tool", parts.pop(0)
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if len(parts) > 2:  # openai-harmony: "unexpected tokens remaining in message header"
        recipient = next((p[3:] for p in parts if p.startswith("to=")), None)
        content_type = next((p for p in reversed(parts) if p.startswith(CONSTRAIN)), None)
    elif parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts:
            # A lone word is a recipient to openai-harmony, even "<|constrain|>json"; that one is a content type.
            (content_type, recipient) = (last, None) if last.startswith(CONSTRAIN) else (None, last)
        else:
            content_type, other = last, parts.pop()
            recipient = other[3:] if other.startswith("to=") else other
    return Header(role, name, channel, recipient, _content_type(content_type))


def salvage_header(text: str, role: str | None, default_role: str = "assistant") -> tuple[Header, str]:
    """A header that never saw <|message|>: its channel, a leading role, ` to=` recipient and content type
    are taken as such, the rest of the text is the message's content (kept as written)."""
    channel, rest = _split_channel(text)
    rest = rest.lstrip(_WHITESPACE)
    word = _ASCII_WS.split(rest, maxsplit=1)[0] if rest else ""
    if word and (word == role or (role is None and word in ROLES)):
        role, rest = word, rest[len(word):]
    role = role or default_role
    recipient = content_type = None
    while m := _SALVAGE_WORD.match(rest):
        w = m.group(1)
        if w.startswith("to="):
            recipient = w[3:]
        else:
            content_type = w
        rest = rest[m.end():]
    return Header(role, None, channel, recipient, _content_type(content_type)), rest.lstrip(_WHITESPACE)


@dataclass
class Delta:
    """New text of the message being streamed, with that message's header."""
    text: str
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    message_index: int  # where the message is (or will be) in StreamParser.messages


class StreamParser:
    """Parses a completion token by token (the tokens after the prompt's `<|start|>assistant`).

    `process(token)` returns the text it adds to the current message's content (a Delta), or None;
    `finish()` closes a message left open and returns every message. Never raises on what a model emits.
    """

    MAX_HEADER_TOKENS = 64  # real headers are ~15 tokens; beyond this a "header" is text without <|message|>

    def __init__(self, tokenizer: Tokenizer | None = None, role: str | None = "assistant"):
        if isinstance(tokenizer, str):
            raise TypeError("StreamParser(tokenizer=None, role='assistant'): pass the role by keyword")
        self.tokenizer = tok = tokenizer or get_tokenizer()
        self.role = role
        self.default_role = role or "assistant"
        self.tokens: list[int] = []
        self._messages: list[Message] = []
        self._closing = frozenset((tok.end, tok.return_, tok.call, tok.endoftext))
        # The header being read: its role (None: the header names it) and tokens.
        self._state = "header" if role is not None else "expect_start"
        self._next_role: str | None = role
        self._header_tokens: list[int] = []
        # The message being read.
        self._header: Header | None = None
        self._pieces: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    # ------------------------------------------------------------------ state
    @property
    def messages(self) -> list[Message]:
        return list(self._messages)

    @property
    def state(self) -> str:
        """"expect_start" (between messages), "header" or "content"."""
        return self._state

    @property
    def current_role(self) -> str | None:
        return self._header.role if self._state == "content" else self._next_role

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._state == "content" else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._state == "content" else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._state == "content" else None

    @property
    def current_content(self) -> str:
        return "".join(self._pieces) if self._state == "content" else ""

    @property
    def current(self) -> Message | None:
        """The message being streamed (header parsed, content so far), if any."""
        if self._state != "content":
            return None
        h = self._header
        return Message(h.role, self.current_content, h.channel, h.recipient, h.content_type, h.name)

    # ------------------------------------------------------------------ input
    def feed(self, tokens: Iterable[int]) -> list[Delta]:
        return [d for t in tokens if (d := self.process(t)) is not None]

    def process(self, token: int) -> Delta | None:
        tok = self.tokenizer
        self.tokens.append(token)
        special = tok.is_special(token)
        if self._state == "content":
            if token in self._closing:
                self._close()
            elif token == tok.start:  # a missing <|end|>: a new message begins
                self._close()
                self._begin_header(None)
            elif token == tok.channel:  # "...<|channel|>final<|message|>": same author, new channel
                role = self._header.role
                self._close()
                self._begin_header(role, [token])
            elif not special:
                return self._add_text(self._bytes(token))
            return None  # other special tokens in content mean nothing: dropped
        if self._state == "header":
            if token == tok.message:
                self._begin_content(parse_header(self._decode_header(), self._next_role, self.default_role))
            elif token in self._closing:
                return self._salvage(close=True)
            elif token == tok.start:
                delta = self._salvage(close=True) if self._header_tokens else None
                self._begin_header(None)
                return delta
            elif not special or token in (tok.channel, tok.constrain):
                self._header_tokens.append(token)
                if len(self._header_tokens) > self.MAX_HEADER_TOKENS:
                    return self._salvage(close=False)
            return None
        # expect_start: between messages
        if token == tok.start:
            self._begin_header(None)
        elif token == tok.channel or not special:  # a missing <|start|>
            self._begin_header(self.default_role, [token])
        elif token == tok.message:
            self._begin_content(Header(self.default_role))
        return None

    def finish(self) -> list[Message]:
        """End of the completion: close the message being read (if any); all messages parsed."""
        if self._state == "content":
            self._close()
        elif self._state == "header" and self._header_tokens:
            self._salvage(close=True)
        self._state, self._next_role, self._header_tokens = "expect_start", None, []
        return self.messages

    # ------------------------------------------------------------------ internals
    def _bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_bytes([token])
        except TokenizerError:  # an id outside the vocabulary: nothing to decode
            return b""

    def _decode_header(self) -> str:
        return b"".join(map(self._bytes, self._header_tokens)).decode("utf-8", errors="replace")

    def _begin_header(self, role: str | None, tokens: list[int] | None = None) -> None:
        self._state, self._next_role, self._header_tokens = "header", role, list(tokens or [])

    def _begin_content(self, header: Header, reset_decoder: bool = True) -> None:
        self._state, self._header, self._pieces = "content", header, []
        self._next_role, self._header_tokens = None, []
        if reset_decoder:
            self._decoder.reset()

    def _add_text(self, data: bytes, final: bool = False) -> Delta | None:
        text = self._decoder.decode(data, final)  # holds back an incomplete UTF-8 sequence
        if not text:
            return None
        self._pieces.append(text)
        h = self._header
        return Delta(text, h.role, h.channel, h.recipient, h.content_type, len(self._messages))

    def _close(self) -> None:
        self._add_text(b"", final=True)
        h = self._header
        self._messages.append(Message(h.role, "".join(self._pieces), h.channel, h.recipient, h.content_type, h.name))
        self._state, self._header, self._pieces = "expect_start", None, []

    def _salvage(self, close: bool) -> Delta | None:
        """A header without <|message|>: recover its header words, the rest is content."""
        if not self._header_tokens:
            self._state, self._next_role = "expect_start", None
            return None
        self._decoder.reset()  # an incomplete UTF-8 tail of the header text stays in it, for the content
        text = self._decoder.decode(b"".join(map(self._bytes, self._header_tokens)), close)
        header, content = salvage_header(text, self._next_role, self.default_role)
        self._begin_content(header, reset_decoder=False)
        delta = None
        if content:
            self._pieces.append(content)
            delta = Delta(content, header.role, header.channel, header.recipient, header.content_type,
                          len(self._messages))
        if close:
            self._close()
        return delta


def parse_messages(tokens: Iterable[int], role: str | None = "assistant",
                   tokenizer: Tokenizer | None = None) -> list[Message]:
    """The messages of a completion: the tokens after `<|start|>{role}` (role None: after `<|start|>` or
    whole messages), ended by <|return|>, <|call|>, <|end|> or by nothing."""
    parser = StreamParser(tokenizer, role=role)
    parser.feed(tokens)
    return parser.finish()


class FinalAnswerEnded:
    """A stop rule for the engine (Engine.submit(stop_rule=...)): True once an assistant message on the `final`
    channel, addressed to nobody, has ended with <|end|>. The format's final answer ends the turn (the model
    was trained to end it with <|return|>); a model that writes <|end|> instead and goes on starts a second
    answer, which a client would get joined to the first. Fed only the generated tokens, after `header`
    (the forced part of the first header, if any); incremental, so each call costs one token's parse."""

    def __init__(self, tokenizer: Tokenizer | None = None, header: Sequence[int] = ()):
        self.parser = StreamParser(tokenizer, role="assistant")
        self.parser.feed(header)
        self.end = self.parser.tokenizer.end
        self.seen = 0

    def __call__(self, tokens: Sequence[int]) -> bool:
        messages = self.parser._messages
        for token in tokens[self.seen:]:
            self.seen += 1
            closed = len(messages)
            self.parser.process(token)
            if token == self.end and len(messages) > closed:
                m = messages[-1]
                if m.role == "assistant" and m.channel == "final" and m.recipient in (None, "all", "user"):
                    return True
        return False


# ---------------------------------------------------------------------------------------------- JSON
def call_arguments(text: str) -> str:
    """A function call's arguments as an application sees them: as generated if valid JSON, else repaired
    (loads_lenient: a truncated object closed, or cut back to its last complete member), "{}" when empty. The
    server returns these, and `gptoss chat` runs the tool on them and keeps them in the conversation, so both
    continue from the same call."""
    if not text.strip():
        return "{}"
    try:
        json.loads(text)
        return text
    except ValueError:
        value = loads_lenient(text)
        return json.dumps(value) if isinstance(value, dict) else text


def loads_lenient(text: str) -> Any | None:
    """JSON that a model wrote: as is if valid; else the first object/array in it, with a truncated end
    closed (an open string, brackets) or cut back to its last complete member; None if nothing is left."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    s = text[min(starts):]
    try:
        return json.JSONDecoder().raw_decode(s)[0]  # a complete value with text after it
    except ValueError:
        pass
    stack: list[str] = []
    in_string = escape = False
    cuts: list[int] = []  # prefixes that can be closed: before a ',' or after a '{' / '['
    for i, c in enumerate(s):
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
            cuts.append(i + 1)
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == ",":
            cuts.append(i)
    closers = "".join(reversed(stack))
    # An open string is closed where it stops, less a half-written escape ("\\" or "\\u00").
    candidates = [re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", s) + '"' + closers] if in_string else []
    candidates.append(s.rstrip(_WHITESPACE + ",:") + closers)
    candidates += (_close_prefix(s[:cut]) for cut in reversed(cuts[-64:]))
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _close_prefix(prefix: str) -> str:
    stack: list[str] = []
    in_string = escape = False
    for c in prefix:
        if in_string:
            escape, in_string = (False, True) if escape else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    return prefix.rstrip(_WHITESPACE + ",") + "".join(reversed(stack))
