"""The Harmony chat format of GPT-oss: conversations → tokens, and completions → messages.

A message is `<|start|>{role}[ to={recipient}][<|channel|>{channel}][ <|constrain|>{type}]<|message|>{content}`
closed by `<|end|>`, or by `<|call|>` for an assistant message addressed to a tool; the model ends its turn
with `<|return|>`. Rendering here equals openai-harmony's token for token (tests compare the two, header
pieces are tokenized separately exactly as it does); parsing is lenient, because a small or fine-tuned model
does emit malformed headers, stray tokens and cut-off messages, and a chat must show what came back, not
crash. Reference: https://github.com/openai/harmony (format doc and src/encoding.rs).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

from .tokenizer import Tokenizer, get_tokenizer

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES = ("system", "developer", "user", "assistant", "tool")
CONSTRAIN = "<|constrain|>"


# ---------------------------------------------------------------- content
@dataclass
class SystemContent:
    model_identity: str | None = "You are ChatGPT, a large language model trained by OpenAI."
    reasoning_effort: Literal["low", "medium", "high"] | None = "medium"
    knowledge_cutoff: str | None = "2024-06"
    conversation_start_date: str | None = None  # "YYYY-MM-DD"
    valid_channels: tuple[str, ...] = ("analysis", "commentary", "final")
    channel_required: bool = True

    def render(self, has_function_tools: bool) -> str:
        sections = []
        top = [self.model_identity] if self.model_identity else []
        if self.knowledge_cutoff:
            top.append(f"Knowledge cutoff: {self.knowledge_cutoff}")
        if self.conversation_start_date:
            top.append(f"Current date: {self.conversation_start_date}")
        if top:
            sections.append("\n".join(top))
        if self.reasoning_effort:
            sections.append(f"Reasoning: {self.reasoning_effort}")
        if self.valid_channels:
            channels = f"# Valid channels: {', '.join(self.valid_channels)}."
            if self.channel_required:
                channels += " Channel must be included for every message."
            if has_function_tools:  # tells the model where tool calls belong
                channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
            sections.append(channels)
        return "\n\n".join(sections)


@dataclass
class ToolDefinition:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object


@dataclass
class DeveloperContent:
    instructions: str | None = None
    tools: list[ToolDefinition] = field(default_factory=list)  # the `functions` namespace

    def render(self) -> str:
        sections = []
        if self.instructions is not None:
            sections += ["# Instructions", self.instructions]
        if self.tools:
            sections.append(render_tools_namespace("functions", self.tools))
        return "\n\n".join(sections)


# ---------------------------------------------------------------- JSON schema → TypeScript
def _default_comment(schema: dict, value: Any) -> str:
    # openai-harmony quotes a string default unless the schema is an enum
    if isinstance(value, str):
        return f'default: "{value}"' if not schema.get("enum") else f"default: {value}"
    return f"default: {json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """The TypeScript-like type the model was trained on (port of openai-harmony's renderer, quirks kept)."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for i, variant in enumerate(one_of):
            out += f"\n{indent} | "
            out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
            comments = []
            if isinstance(variant, dict) and isinstance(variant.get("description"), str):
                comments.append(variant["description"])
            if isinstance(variant, dict) and "default" in variant:
                comments.append(_default_comment(variant, variant["default"]))
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
        out += "{\n"
        props = schema.get("properties")
        required = {r for r in schema.get("required", []) if isinstance(r, str)} \
            if isinstance(schema.get("required"), list) else set()
        for key, val in (props.items() if isinstance(props, dict) else ()):
            val = val if isinstance(val, dict) else {}
            opt = "" if key in required else "?"
            if isinstance(val.get("title"), str):
                out += f"{indent}// {val['title']}\n{indent}//\n"
            if "oneOf" not in val and isinstance(val.get("description"), str):
                out += f"{indent}// {val['description']}\n"
            examples = val.get("examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            if isinstance(val.get("oneOf"), list):
                out += _one_of_property(key, opt, val, indent)
                continue
            out += f"{indent}{key}{opt}: " + _nullable(val, schema_to_typescript(val, indent + "    ")) + ","
            if "default" in val:
                out += " // " + _default_comment(val, val["default"])
            out += "\n"
        return out + f"{indent}}}"
    if kind == "string":
        enum = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(enum) if enum else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _nullable(schema: Any, ts: str) -> str:
    if isinstance(schema, dict) and schema.get("nullable") is True and "null" not in ts:
        return f"{ts} | null"
    return ts


def _one_of_property(key: str, opt: str, val: dict, indent: str) -> str:
    variants = val["oneOf"]
    desc = val.get("description") if isinstance(val.get("description"), str) else None
    first_desc = variants[0].get("description") if variants and isinstance(variants[0], dict) else None
    above = desc is not None and desc != first_desc  # a description equal to the first variant's is said once
    out = f"{indent}// {desc}\n" if above else ""
    if "default" in val:
        out += f"{indent}// {_default_comment(val, val['default'])}\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
        comments = []
        v_desc = variant.get("description") if isinstance(variant, dict) else None
        if not (i == 0 and above) and isinstance(v_desc, str) and v_desc != desc:
            comments.append(v_desc)
        if isinstance(variant, dict) and "default" in variant:
            comments.append(_default_comment(variant, variant["default"]))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


def render_tools_namespace(namespace: str, tools: Sequence[ToolDefinition]) -> str:
    lines = [f"## {namespace}\n", f"namespace {namespace} {{\n"]
    for tool in tools:
        lines += [f"// {line}" for line in tool.description.splitlines()]
        params = f"_: {schema_to_typescript(tool.parameters)}" if tool.parameters is not None else ""
        lines.append(f"type {tool.name} = ({params}) => any;\n")
    lines.append(f"}} // namespace {namespace}")
    return "# Tools\n\n" + "\n".join(lines)


# ---------------------------------------------------------------- messages
@dataclass
class Message:
    role: Role
    content: str | SystemContent | DeveloperContent = ""
    channel: str | None = None
    recipient: str | None = None  # "functions.NAME" for a tool call; "assistant" on a tool's result
    content_type: str | None = None  # "<|constrain|>json" for JSON tool arguments
    name: str | None = None  # author name; a tool message's is the tool ("functions.NAME")

    @classmethod
    def system(cls, content: SystemContent | None = None) -> "Message":
        return cls("system", content or SystemContent())

    @classmethod
    def developer(cls, content: DeveloperContent) -> "Message":
        return cls("developer", content)

    @classmethod
    def user(cls, text: str) -> "Message":
        return cls("user", text)

    @classmethod
    def assistant(cls, text: str, channel: str = "final") -> "Message":
        return cls("assistant", text, channel=channel)

    @classmethod
    def tool_call(cls, tool: str, arguments: str, channel: str = "commentary") -> "Message":
        """An assistant call of function `tool` ("functions.NAME" or "NAME") with JSON arguments."""
        recipient = tool if "." in tool else f"functions.{tool}"
        return cls("assistant", arguments, channel=channel, recipient=recipient, content_type=f"{CONSTRAIN}json")

    @classmethod
    def tool_result(cls, tool: str, text: str, channel: str = "commentary") -> "Message":
        name = tool if "." in tool else f"functions.{tool}"
        return cls("tool", text, channel=channel, recipient="assistant", name=name)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else ""


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def has_function_tools(self) -> bool:
        return any(isinstance(m.content, DeveloperContent) and m.content.tools for m in self.messages)


class HarmonyError(ValueError):
    pass


def render_message(message: Message, tokenizer: Tokenizer | None = None, has_function_tools: bool = False,
                   ) -> list[int]:
    tok = tokenizer or get_tokenizer()
    text = tok.encode_ordinary  # header pieces are encoded one by one, as openai-harmony does
    if message.role not in ROLES:
        raise HarmonyError(f"message role must be one of {ROLES}, got {message.role!r}")
    if message.role == "tool":
        if not message.name:
            raise HarmonyError("a tool message needs the tool's name (e.g. 'functions.get_weather')")
        out = [tok.start, *text(message.name)]
    else:
        out = [tok.start, *text(message.role)]
        if message.name:
            out += text(f":{message.name}")
    if message.recipient and message.recipient != "all":
        out += text(f" to={message.recipient}")
    if message.channel:
        out += [tok.channel, *text(message.channel)]
    if message.content_type:
        if message.content_type.startswith(CONSTRAIN):
            rest = message.content_type[len(CONSTRAIN):]
            out += [*text(" "), tok.constrain, *(text(rest) if rest else [])]
        else:
            out += text(f" {message.content_type}")
    out.append(tok.message)
    content = message.content
    if isinstance(content, SystemContent):
        if message.role != "system":
            raise HarmonyError(f"SystemContent may only appear in a system message, found in {message.role}")
        content = content.render(has_function_tools)
    elif isinstance(content, DeveloperContent):
        if message.role != "developer":
            raise HarmonyError(f"DeveloperContent may only appear in a developer message, found in {message.role}")
        content = content.render()
    out += text(content)
    out.append(tok.call if message.role == "assistant" and message.recipient else tok.end)
    return out


def _kept(messages: Sequence[Message], drop_analysis: bool) -> list[Message]:
    """openai-harmony's auto_drop_analysis: when the last assistant message is a final answer, analysis
    messages before the first final message are left out (the chain of thought of finished turns)."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if not (drop_analysis and last_assistant is not None and last_assistant.channel == "final"):
        return list(messages)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    return [m for i, m in enumerate(messages)
            if not (first_final is not None and i < first_final and m.channel == "analysis")]


def render_conversation(conversation: Conversation | Sequence[Message], tokenizer: Tokenizer | None = None,
                        drop_analysis: bool = True) -> list[int]:
    conv = conversation if isinstance(conversation, Conversation) else Conversation(list(conversation))
    tools = conv.has_function_tools()
    return [t for m in _kept(conv.messages, drop_analysis) for t in render_message(m, tokenizer, tools)]


def render_conversation_for_completion(conversation: Conversation | Sequence[Message], next_role: Role = "assistant",
                                       tokenizer: Tokenizer | None = None, drop_analysis: bool = True) -> list[int]:
    """The prompt: the conversation, then `<|start|>{next_role}` for the model to continue."""
    tok = tokenizer or get_tokenizer()
    return render_conversation(conversation, tok, drop_analysis) + [tok.start, *tok.encode_ordinary(next_role)]


def render_conversation_for_training(conversation: Conversation | Sequence[Message],
                                     tokenizer: Tokenizer | None = None, drop_analysis: bool = True) -> list[int]:
    """As rendered, but a closing final answer ends with <|return|> (what the model emits) instead of <|end|>."""
    tok = tokenizer or get_tokenizer()
    conv = conversation if isinstance(conversation, Conversation) else Conversation(list(conversation))
    out = render_conversation(conv, tok, drop_analysis)
    if conv.messages and conv.messages[-1].role == "assistant" and conv.messages[-1].channel == "final":
        out[-1] = tok.return_
    return out


def stop_tokens_for_assistant_actions(tokenizer: Tokenizer | None = None) -> list[int]:
    """Where sampling stops: the model is done (<|return|>) or waits for a tool (<|call|>)."""
    tok = tokenizer or get_tokenizer()
    return [tok.call, tok.return_]


def stop_tokens(tokenizer: Tokenizer | None = None) -> list[int]:
    """Tokens that end a message: the two above and <|end|>."""
    tok = tokenizer or get_tokenizer()
    return [tok.end, tok.return_, tok.call]


# ---------------------------------------------------------------- parsing
@dataclass
class Delta:
    """New content text of the message being streamed, with that message's header."""
    text: str
    channel: str | None
    recipient: str | None
    content_type: str | None


def parse_header(header: str, role: str | None) -> tuple[Message, str]:
    """Header text (between <|start|> and <|message|>) → an empty Message, and any text left unexplained.

    Follows openai-harmony: the channel is the word after <|channel|>; then the last word is the content
    type when there are two words (or a `to=` recipient), and the word before it the recipient.
    """
    channel, header = _split_channel(header)
    header = header.strip().replace(CONSTRAIN, f" {CONSTRAIN}").strip()
    parts = header.split()
    name = None
    if role is None:
        if not parts:
            return Message("assistant"), ""
        first = parts[0]
        if first in ROLES:
            role = first
        else:  # anything else that speaks is a tool ("functions.get_weather to=assistant")
            role, name = "tool", first
            parts = parts[1:]
    if parts and parts[0] == role:
        parts = parts[1:]
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
    return Message(role, "", channel=channel, recipient=recipient, content_type=content_type, name=name), \
        " ".join(parts)


class StreamParser:
    """Feed completion tokens one at a time; get content deltas as they form and messages as they close.

    Lenient where openai-harmony raises: a header that never reaches <|message|> becomes a message whose
    content is the header text; a <|start|> inside a message closes it; leftover header words are kept as
    content; an unfinished message is closed by `finish()`.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, role: str | None = "assistant"):
        self.tok = tokenizer or get_tokenizer()
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self._stops = set(stop_tokens(self.tok))
        self._role = role  # the first message's role is given by the prompt (`<|start|>assistant`)
        self._state = "header" if role else "start"
        self._header: list[int] = []
        self._current: Message | None = None
        self._content: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def current(self) -> Message | None:
        """The message whose content is streaming now (header parsed), if any."""
        return self._current

    @property
    def current_channel(self) -> str | None:
        return self._current.channel if self._current else None

    @property
    def current_recipient(self) -> str | None:
        return self._current.recipient if self._current else None

    def process(self, token: int) -> Delta | None:
        self.tokens.append(token)
        tok = self.tok
        if self._state == "start":
            if token == tok.start:
                self._state, self._header = "header", []
            elif token not in self._stops:  # text with no <|start|>: an assistant message without header
                self._role, self._state, self._header = self._role or "assistant", "header", [token]
            return None
        if self._state == "header":
            if token == tok.message:
                self._open(self.tok.decode(self._header))
            elif token == tok.start:
                self._header = []  # a restarted header replaces the broken one
            elif token in self._stops:
                self._close_headless()
            else:
                self._header.append(token)
            return None
        # content
        if token in self._stops or token == tok.start:
            self._close()
            if token == tok.start:
                self._state, self._header = "header", []
            return None
        text = self._decoder.decode(tok.decode_bytes([token]))
        if not text:
            return None  # a multi-byte character continues in the next token
        self._content.append(text)
        m = self._current
        return Delta(text, m.channel, m.recipient, m.content_type)

    def finish(self) -> list[Message]:
        """End of the completion (max tokens or stop): close what is open; return all messages."""
        if self._state == "content":
            self._close()
        elif self._state == "header" and self._header:
            self._close_headless()
        return self.messages

    # -------------------------------------------------------- internals
    def _open(self, header_text: str) -> None:
        self._current, extra = parse_header(header_text, self._role)
        self._content = [extra + " "] if extra else []  # words the header cannot explain: keep them visible
        self._role, self._state = None, "content"

    def _close(self) -> None:
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self.messages.append(replace(self._current, content="".join(self._content) + tail))
        self._current, self._content, self._state = None, [], "start"

    def _close_headless(self) -> None:
        """A stop token (or the end) before <|message|>: the header words become the content, the channel
        is kept (openai-harmony's non-strict mode does the same for the first message)."""
        channel, rest = _split_channel(self.tok.decode(self._header))
        parts = rest.replace(CONSTRAIN, f" {CONSTRAIN}").split()
        role = self._role or (parts[0] if parts and parts[0] in ROLES else "assistant")
        if parts and parts[0] == role:
            parts = parts[1:]
        if parts or channel:
            self.messages.append(Message(role, " ".join(parts), channel=channel))
        self._header, self._role, self._state = [], None, "start"


def _split_channel(header: str) -> tuple[str | None, str]:
    """The word after <|channel|> (up to whitespace or the next marker), and the header without it."""
    if "<|channel|>" not in header:
        return None, header
    before, _, after = header.partition("<|channel|>")
    end = next((i for i, ch in enumerate(after) if ch.isspace() or ch == "<"), len(after))
    return after[:end] or None, before + after[end:]


def parse_messages(tokens: Iterable[int], role: str | None = "assistant",
                   tokenizer: Tokenizer | None = None) -> list[Message]:
    """All messages of a completion (the tokens after the prompt's `<|start|>assistant`)."""
    parser = StreamParser(tokenizer, role)
    for t in tokens:
        parser.process(t)
    return parser.finish()
