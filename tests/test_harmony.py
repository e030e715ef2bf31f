"""Our Harmony layer against openai-harmony: the same tokens rendered, the same messages parsed (offline)."""

from __future__ import annotations

import gzip
import socket
from importlib import resources

import pytest

from gptoss import harmony as h
from gptoss.tokenizer import VOCAB_FILE, get_tokenizer

TOK = get_tokenizer()


@pytest.fixture(scope="module")
def oh(tmp_path_factory):
    """openai-harmony's GPT-oss encoding, reading the vocabulary we ship (it would download it otherwise)."""
    vocab_dir = tmp_path_factory.mktemp("harmony-vocab")
    data = gzip.decompress(resources.files("gptoss.data").joinpath(VOCAB_FILE).read_bytes())
    (vocab_dir / "o200k_base.tiktoken").write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir))
    mp.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network used")))
    import openai_harmony

    enc = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    yield openai_harmony, enc
    mp.undo()


def to_oh(lib, m: h.Message):
    """Our message → openai-harmony's."""
    role = lib.Role(m.role)
    if isinstance(m.content, h.SystemContent):
        c = m.content
        content = lib.SystemContent.new().with_model_identity(c.model_identity) \
            .with_reasoning_effort(lib.ReasoningEffort(c.reasoning_effort.capitalize())) \
            .with_knowledge_cutoff(c.knowledge_cutoff)
        if c.conversation_start_date:
            content = content.with_conversation_start_date(c.conversation_start_date)
    elif isinstance(m.content, h.DeveloperContent):
        content = lib.DeveloperContent.new()
        if m.content.instructions is not None:
            content = content.with_instructions(m.content.instructions)
        if m.content.tools:
            content = content.with_function_tools([lib.ToolDescription.new(t.name, t.description, parameters=t.parameters)
                                                   for t in m.content.tools])
    else:
        content = m.content
    if m.role == "tool":
        msg = lib.Message.from_author_and_content(lib.Author.new(role, m.name), content)
    else:
        msg = lib.Message.from_role_and_content(role, content)
    if m.channel:
        msg = msg.with_channel(m.channel)
    if m.recipient:
        msg = msg.with_recipient(m.recipient)
    if m.content_type:
        msg = msg.with_content_type(m.content_type)
    return msg


def from_oh(m) -> tuple:
    text = "".join(c.text for c in m.content)
    return (m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, text)


def ours(m: h.Message) -> tuple:
    return (m.role, m.name, m.channel, m.recipient, m.content_type, m.content)


WEATHER = h.ToolDefinition("get_weather", "Gets the current weather.\nUse for any city.", {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "Forecast days", "default": 1},
    },
    "required": ["location"],
})
NOW = h.ToolDefinition("current_time", "The current time.")
SCHEMAS = [
    {"type": "object", "properties": {}},
    {"type": "object", "description": "top", "properties": {
        "a": {"type": "object", "description": "inner", "properties": {
            "b": {"type": "integer", "description": "bee"}, "c": {"type": "array", "items": {"type": "string"}}},
            "required": ["b"]},
        "n": {"type": "number", "default": 1.5}, "flag": {"type": "boolean", "default": False},
        "arr": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}},
        "bare_array": {"type": "array"}, "any": {}, "nul": {"type": ["string", "null"]},
        "maybe": {"type": "string", "nullable": True}, "ints": {"type": "integer", "enum": [1, 2]},
        "titled": {"type": "string", "title": "A title", "examples": ["x", "y"], "default": "x"},
        "list_default": {"type": "array", "items": {"type": "number"}, "default": [1, 2]},
    }, "required": ["a"]},
    {"type": "object", "properties": {
        "one": {"oneOf": [{"type": "string", "description": "as text"}, {"type": "number", "default": 3}],
                "description": "either"},
        "same": {"oneOf": [{"type": "string", "description": "d"}, {"type": "number", "nullable": True}],
                 "description": "d", "default": "q"},
        "enum_default": {"oneOf": [{"type": "string", "enum": ["a", "b"], "default": "a"}]},
    }, "required": ["one"]},
    {"oneOf": [{"type": "object", "properties": {"k": {"type": "string"}}}, {"type": "string"}]},
    {"type": "object", "properties": {"ünïcode": {"type": "string", "description": "naïve 😀"}}},
]


def system(effort="medium", date=None):
    return h.Message.system(h.SystemContent(reasoning_effort=effort, conversation_start_date=date))


def conversations():
    dev_tools = h.Message.developer(h.DeveloperContent("Answer briefly.", [WEATHER, NOW]))
    turn1 = [h.Message.user("What's the weather in Paris?"),
             h.Message.assistant("Need to call the weather tool.", "analysis"),
             h.Message.tool_call("get_weather", '{"location": "Paris, France"}'),
             h.Message.tool_result("get_weather", '{"temperature": 21, "sky": "clear"}'),
             h.Message.assistant("The user wants a summary.", "analysis"),
             h.Message.assistant("It is 21 °C and clear in Paris.")]
    turn2 = [h.Message.user("And tomorrow? Answer in 日本語 🌤"),
             h.Message.assistant("Think about it.", "analysis"),
             h.Message.assistant("明日も晴れです。")]
    out = {}
    for effort in ("low", "medium", "high"):
        out[f"plain-{effort}"] = [system(effort), h.Message.user("Hi!")]
        out[f"tools-{effort}"] = [system(effort, "2025-08-05"), dev_tools, *turn1, *turn2,
                                  h.Message.user("Thanks")]
    out["developer-only-instructions"] = [system(), h.Message.developer(h.DeveloperContent("Talk like a pirate.")),
                                          h.Message.user("Hello")]
    out["mid-tool-call"] = [system("high"), dev_tools, *turn1[:4]]
    out["assistant-last-final"] = [system(), *turn1[:1], turn1[1], turn1[5]]
    for i, schema in enumerate(SCHEMAS):
        tool = h.ToolDefinition(f"tool_{i}", "A tool.", schema)
        out[f"schema-{i}"] = [system(), h.Message.developer(h.DeveloperContent(None, [tool])), h.Message.user("go")]
    return out


CONVERSATIONS = conversations()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_for_completion_equals_openai_harmony(oh, name):
    lib, enc = oh
    messages = CONVERSATIONS[name]
    expected = enc.render_conversation_for_completion(lib.Conversation.from_messages([to_oh(lib, m) for m in messages]),
                                                      lib.Role.ASSISTANT)
    got = h.render_conversation_for_completion(messages, "assistant", TOK)
    assert got == expected, (TOK.decode(got), enc.decode_utf8(expected))


@pytest.mark.parametrize("name", ["tools-high", "assistant-last-final", "mid-tool-call", "plain-low"])
def test_render_for_training_equals_openai_harmony(oh, name):
    lib, enc = oh
    messages = CONVERSATIONS[name]
    expected = enc.render_conversation_for_training(lib.Conversation.from_messages([to_oh(lib, m) for m in messages]))
    assert h.render_conversation_for_training(messages, TOK) == expected


def test_previous_analysis_is_dropped_once_answered():
    text = TOK.decode(h.render_conversation_for_completion(CONVERSATIONS["tools-medium"], "assistant", TOK))
    assert "Need to call the weather tool." not in text and "The user wants a summary." not in text
    assert "It is 21 °C" in text
    mid = TOK.decode(h.render_conversation_for_completion(CONVERSATIONS["mid-tool-call"], "assistant", TOK))
    assert "Need to call the weather tool." in mid  # the turn is not over: its reasoning stays


def completion_tokens(messages: list[h.Message]) -> list[int]:
    """What a model would emit after the prompt's `<|start|>assistant`: the rendered messages, minus the first
    message's <|start|>assistant, ending in <|return|> or <|call|>."""
    toks = h.render_conversation(messages, TOK, drop_analysis=False)
    assert toks[:2] == [TOK.start] + TOK.encode_ordinary("assistant")
    toks = toks[2:]
    if messages[-1].channel == "final":
        toks[-1] = TOK.return_
    return toks


COMPLETIONS = {
    "analysis-final": [h.Message.assistant("Let me add 12 and 30: 42.", "analysis"), h.Message.assistant("42")],
    "tool-call": [h.Message.assistant("I should check.", "analysis"),
                  h.Message.tool_call("get_weather", '{"location":"Tōkyō"}')],
    "commentary-preamble": [h.Message.assistant("Checking the weather now.", "commentary"),
                            h.Message.tool_call("functions.lookup", "{}")],
    "unicode": [h.Message.assistant("思考中… 🤔🤔", "analysis"), h.Message.assistant("答え: 👍🏽 naïve")],
}


@pytest.mark.parametrize("name", list(COMPLETIONS))
def test_parse_equals_openai_harmony(oh, name):
    lib, enc = oh
    tokens = completion_tokens(COMPLETIONS[name])
    expected = [from_oh(m) for m in enc.parse_messages_from_completion_tokens(tokens, lib.Role.ASSISTANT)]
    assert [ours(m) for m in h.parse_messages(tokens, "assistant", TOK)] == expected
    assert [e[2:] for e in expected] == [(m.channel, m.recipient, m.content_type, m.content)
                                         for m in COMPLETIONS[name]]


def test_model_style_tool_call_header_parses_like_openai_harmony(oh):
    """Models put the recipient after the channel: `<|channel|>commentary to=functions.x <|constrain|>json`."""
    lib, enc = oh
    tokens = TOK.encode("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                        '{"location": "Oslo"}<|call|>', allowed_special="all")
    expected = [from_oh(m) for m in enc.parse_messages_from_completion_tokens(tokens, lib.Role.ASSISTANT)]
    got = [ours(m) for m in h.parse_messages(tokens, "assistant", TOK)]
    assert got == expected
    assert got[0][2:] == ("commentary", "functions.get_weather", "<|constrain|>json", '{"location": "Oslo"}')


@pytest.mark.parametrize("name", list(COMPLETIONS))
def test_stream_parser_deltas_match_openai_harmony(oh, name):
    lib, enc = oh
    tokens = completion_tokens(COMPLETIONS[name])
    theirs = lib.StreamableParser(enc, role=lib.Role.ASSISTANT)
    parser = h.StreamParser(TOK, "assistant")
    our_deltas, their_deltas = [], []
    for t in tokens:
        theirs.process(t)
        if theirs.last_content_delta:
            their_deltas.append((theirs.current_channel, theirs.last_content_delta))
        d = parser.process(t)
        if d is not None:
            our_deltas.append((d.channel, d.text))
    assert our_deltas == their_deltas
    assert [ours(m) for m in parser.finish()] == [from_oh(m) for m in theirs.messages]


def test_utf8_split_across_tokens_streams_whole_characters():
    text = "🤖" * 3 + "é"
    ids = TOK.encode(text)
    assert any(not TOK.decode_bytes([i]).decode("utf-8", errors="ignore") for i in ids)  # some tokens are partial
    parser = h.StreamParser(TOK, "assistant")
    for t in TOK.encode("<|channel|>final<|message|>", allowed_special="all"):
        parser.process(t)
    deltas = [d.text for t in ids if (d := parser.process(t)) is not None]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("completion, expected", [
    # no <|message|>: the header words become the content, channel kept (as openai-harmony non-strict)
    ("<|channel|>final Hello there<|return|>", [("assistant", "final", "Hello there")]),
    # no header at all, cut off by max_tokens
    ("just text", [("assistant", None, "just text")]),
    # a message cut off by max_tokens
    ("<|channel|>analysis<|message|>thinking about", [("assistant", "analysis", "thinking about")]),
    # <|start|> without <|end|>: the open message is closed
    ("<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>",
     [("assistant", "analysis", "a"), ("assistant", "final", "b")]),
    # unknown channel and stray special token in content are kept, not fatal
    ("<|channel|>secret<|message|>x<|constrain|>y<|end|>", [("assistant", "secret", "x<|constrain|>y")]),
    # empty completion
    ("", []),
    # only a stop token
    ("<|return|>", []),
])
def test_lenient_parsing_of_malformed_output(completion, expected):
    tokens = TOK.encode(completion, allowed_special="all")
    got = [(m.role, m.channel, m.content) for m in h.parse_messages(tokens, "assistant", TOK)]
    assert got == expected


def test_tool_message_needs_a_name():
    with pytest.raises(h.HarmonyError, match="tool's name"):
        h.render_message(h.Message("tool", "x"), TOK)
    with pytest.raises(h.HarmonyError, match="SystemContent may only appear in a system message"):
        h.render_message(h.Message("user", h.SystemContent()), TOK)
