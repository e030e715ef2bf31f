"""gptoss.harmony against openai-harmony (the test oracle): the same tokens rendered, the same messages parsed;
and our parser's leniency on malformed completions. Offline: openai-harmony reads the vocabulary we ship."""

from __future__ import annotations

import gzip
import random
import socket
from importlib import resources

import pytest

from gptoss import harmony as h
from gptoss.tokenizer import VOCAB_FILE, get_tokenizer

TOK = get_tokenizer()
S = TOK.special_tokens


def enc(text: str) -> list[int]:
    return TOK.encode(text, allowed_special="all")


def _refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every test here runs with Python's sockets refused."""
    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def oh(tmp_path_factory):
    """(openai_harmony, its GPT-oss encoding), loaded from the o200k_base ranks we ship.

    openai-harmony (Rust) reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (and checks its sha256) instead of
    downloading; its HTTP client would go through the proxy variables, pointed here at a closed port, and Python's
    sockets are refused too, so any download attempt fails the fixture."""
    lib = pytest.importorskip("openai_harmony")
    vocab_dir = tmp_path_factory.mktemp("harmony-vocab")
    data = gzip.decompress(resources.files("gptoss.data").joinpath(VOCAB_FILE).read_bytes())
    (vocab_dir / "o200k_base.tiktoken").write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir))
    mp.setenv("TIKTOKEN_RS_CACHE_DIR", str(tmp_path_factory.mktemp("empty-cache")))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        mp.setenv(var, "http://127.0.0.1:9")
    mp.delenv("NO_PROXY", raising=False)
    mp.delenv("no_proxy", raising=False)
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    try:
        encoding = lib.load_harmony_encoding(lib.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        mp.undo()
    yield lib, encoding


# ---------------------------------------------------------------------------------------------- conversion
def to_oh(lib, m: h.Message):
    """Our message → openai-harmony's."""
    c = m.content
    if isinstance(c, h.SystemContent):
        effort = None if c.reasoning_effort is None else lib.ReasoningEffort(c.reasoning_effort.capitalize())
        channels = (lib.ChannelConfig(valid_channels=list(c.valid_channels), channel_required=c.channel_required)
                    if c.valid_channels else None)
        content = lib.SystemContent(model_identity=c.model_identity, reasoning_effort=effort,
                                    knowledge_cutoff=c.knowledge_cutoff,
                                    conversation_start_date=c.conversation_start_date, channel_config=channels)
        for ns in c.tools:
            content = content.with_tools(lib.ToolNamespaceConfig(name=ns.name, description=ns.description,
                                                                 tools=oh_tools(lib, ns.tools)))
    elif isinstance(c, h.DeveloperContent):
        content = lib.DeveloperContent(instructions=c.instructions)
        if c.tools:
            content = content.with_function_tools(oh_tools(lib, c.tools))
    else:
        content = lib.TextContent(text=c)
    msg = lib.Message.from_author_and_content(lib.Author(role=lib.Role(m.role), name=m.name), content)
    msg.channel, msg.recipient = m.channel, m.recipient
    msg.content_type = h.CONSTRAIN + "json" if m.content_type == "json" else m.content_type
    return msg


def oh_tools(lib, tools: list[h.ToolDefinition]) -> list:
    return [lib.ToolDescription.new(t.name, t.description, t.parameters) for t in tools]


def from_oh(m) -> tuple:
    ct = m.content_type
    ct = "json" if ct == h.CONSTRAIN + "json" else ct  # our one normalization
    return (m.author.role.value, m.author.name, m.channel, m.recipient, ct, "".join(c.text for c in m.content))


def ours(m: h.Message) -> tuple:
    return (m.role, m.name, m.channel, m.recipient, m.content_type, m.content)


def oh_conversation(lib, messages):
    return lib.Conversation.from_messages([to_oh(lib, m) for m in messages])


# ---------------------------------------------------------------------------------------------- fixtures: tools
WEATHER = h.ToolDefinition("get_current_weather", "Gets the current weather in the provided location.", {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
})
LOCATION = h.ToolDefinition("get_location", "Gets the location of the user.")
KITCHEN_SINK = h.ToolDefinition("kitchensink", "A function with various complex schemas.", {
    "description": "params object",
    "type": "object",
    "properties": {
        "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
        "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string",
                            "default": "the default"},
        "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
        "oneof_string_or_number": {"oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                                             {"type": "number", "description": "numbers can happen too"}],
                                   "description": "a oneof", "default": 20},
    },
})
SCHEMAS = [  # varied JSON schemas, quirks of openai-harmony's TypeScript rendering included
    {"type": "object", "properties": {}},
    {"type": "object"},
    {},
    {"type": "object", "properties": {
        "query": {"type": "string", "description": "Search query"},
        "limit": {"type": "integer", "minimum": 1, "default": 10},
        "ratio": {"type": "number", "default": 0.5},
        "tiny": {"type": "number", "default": 1e-05},
        "tinier": {"type": "number", "default": 1e-7},
        "huge": {"type": "number", "default": 1e20},
        "whole": {"type": "number", "default": 2.0},
        "big": {"type": "integer", "default": 2**70},
        "exact": {"type": "boolean", "default": False},
        "nothing": {"type": "string", "default": None},
        "tags": {"type": "array", "items": {"type": "string"}, "default": ["a", "b"]},
        "meta": {"type": "object", "default": {"k": "v", "n": [1, 2.5]}},
        "quoted": {"type": "string", "default": 'say "hi"\n'},
        "enum_default": {"type": "string", "enum": ["x", "y"], "default": "y"},
    }, "required": ["query"]},
    {"type": "object", "description": "Nested things.", "properties": {
        "address": {"type": "object", "description": "Where", "properties": {
            "street": {"type": "string"},
            "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"]},
        }, "required": ["street"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "qty": {"type": ["integer", "null"]}}, "required": ["id"]}},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "anything": {"type": "array"},
        "null_items": {"type": "array", "items": None},
    }},
    {"type": "object", "properties": {
        "mode": {"oneOf": [{"type": "string", "enum": ["fast", "slow"], "description": "a preset"},
                           {"type": "integer", "description": "a speed", "nullable": True}],
                 "description": "a preset"},
        "mode2": {"oneOf": [{"type": "string", "default": "x", "enum": ["x"]}, {"type": "boolean", "default": True}],
                  "default": "x", "enum": ["x"]},
        "mode3": {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "null"}]},
        "mode4": {"oneOf": None, "description": "not rendered", "default": 3},
        "kind": {"type": ["string", "integer"], "description": "either"},
        "multi": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "ref": {"$ref": "#/definitions/x"},
        "enum_no_type": {"enum": ["a", "b"]},
        "numbers_enum": {"type": "string", "enum": [1, 2]},
        "nullable_num": {"type": "number", "nullable": True},
        "nullable_union": {"type": ["string", "null"], "nullable": True},
        "unknown": {"type": "date"},
        "empty_types": {"type": []},
        "titled": {"type": "string", "title": "The title"},
        "examples_non_str": {"type": "integer", "examples": [1, 2]},
        "unicode": {"type": "string", "description": "Température en °C — 東京 😀"},
        "weird key-name": {"type": "string"},
    }, "required": ["mode", "kind", "weird key-name", "not-a-property", 7]},
    {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "description": "by a"},
               {"type": "object", "properties": {"b": {"type": "integer"}}, "default": {"b": 1}},
               {"type": "string", "enum": ["c"], "default": "c"}]},
    {"type": "array", "items": {"type": "string"}},
    {"type": "string"},
]
VARIED_TOOLS = [h.ToolDefinition(f"tool_{i}", desc, schema) for i, (schema, desc) in enumerate(zip(SCHEMAS, [
    "Plain.", "Multi-line\r\ndescription\n\nwith a blank line.\n", "", "Many defaults.", "Nested objects.",
    "Unions and odd types.", "Top-level oneOf.", "An array.", "A string."]))]


def system(**kw) -> h.Message:
    return h.Message.system(h.SystemContent(**kw))


def developer(instructions=None, tools=()) -> h.Message:
    return h.Message.developer(h.DeveloperContent(instructions, list(tools)))


# ---------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("effort", ["low", "medium", "high"])
@pytest.mark.parametrize("date", [None, "2025-06-28"])
@pytest.mark.parametrize("function_tools", [False, True])
def test_system_message_equals_openai_harmony(oh, effort, date, function_tools):
    lib, encoding = oh
    m = system(reasoning_effort=effort, conversation_start_date=date)
    options = lib.RenderOptions(conversation_has_function_tools=function_tools)
    ids = h.render_message(m, TOK, has_function_tools=function_tools)
    assert ids == encoding.render(to_oh(lib, m), options)
    text = TOK.decode(ids)
    assert f"Reasoning: {effort}" in text and ("Current date: 2025-06-28" in text) == (date is not None)
    assert ("Calls to these tools must go to the commentary channel: 'functions'." in text) == function_tools


@pytest.mark.parametrize("fields", [
    dict(model_identity=None, knowledge_cutoff=None, reasoning_effort=None),
    dict(model_identity="You are a terse assistant.\nAnswer in French.", knowledge_cutoff="2023-10"),
    dict(valid_channels=(), reasoning_effort="HIGH"),
    dict(valid_channels=("analysis", "final"), channel_required=False),
    dict(model_identity="", conversation_start_date=""),
])
def test_system_message_variants(oh, fields):
    lib, encoding = oh
    m = system(**fields)
    for tools in (False, True):
        assert h.render_message(m, TOK, has_function_tools=tools) == \
            encoding.render(to_oh(lib, m), lib.RenderOptions(conversation_has_function_tools=tools))


def test_system_message_text():
    assert h.SystemContent(conversation_start_date="2025-06-28", reasoning_effort="high").render_text(True) == (
        "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
        "Current date: 2025-06-28\n\nReasoning: high\n\n# Valid channels: analysis, commentary, final. "
        "Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.")
    with pytest.raises(h.HarmonyError, match="reasoning_effort"):
        h.SystemContent(reasoning_effort="extreme").render_text()


def python_namespace(description: str | None = None) -> h.ToolNamespace:
    from gptoss.tools import PYTHON_DESCRIPTION

    return h.ToolNamespace("python", PYTHON_DESCRIPTION.format(timeout=30) if description is None else description)


@pytest.mark.parametrize("function_tools", [False, True])
def test_builtin_python_tool_equals_openai_harmony(oh, function_tools):
    """The system message with `## python`: openai-harmony's own python namespace (its default text) and ours."""
    lib, encoding = oh
    options = lib.RenderOptions(conversation_has_function_tools=function_tools)
    reference = lib.Message.from_role_and_content(lib.Role.SYSTEM, lib.SystemContent.new().with_python_tool())
    theirs = lib.ToolNamespaceConfig.python().description
    m = system(tools=[python_namespace(theirs)])
    assert h.render_message(m, TOK, has_function_tools=function_tools) == encoding.render(reference, options)
    m = system(tools=[python_namespace()], reasoning_effort="high", conversation_start_date="2025-06-28")
    ids = h.render_message(m, TOK, has_function_tools=function_tools)
    assert ids == encoding.render(to_oh(lib, m), options)
    assert "## python\n\nUse this tool to execute Python code" in TOK.decode(ids)


def test_builtin_namespaces_with_functions_equal_openai_harmony(oh):
    """Several built-in namespaces (one holding functions, as `browser` does) in one system message."""
    lib, encoding = oh
    m = system(tools=[h.ToolNamespace("browser", "Tool for browsing.\nCite sources.", [LOCATION, WEATHER]),
                      python_namespace(), h.ToolNamespace("empty")])
    assert h.render_message(m, TOK) == encoding.render(to_oh(lib, m))


def test_python_call_and_result_conversation_equals_openai_harmony(oh):
    """A python call (`to=python`, analysis, content type `code`) and its result, rendered for the next
    completion; and a python call parsed from a completion."""
    lib, encoding = oh
    messages = [system(tools=[python_namespace()]), h.Message.user("What is 2**100?"),
                h.Message("assistant", "Compute it.", channel="analysis"),
                h.Message("assistant", "print(2**100)", channel="analysis", recipient="python", content_type="code"),
                h.Message("tool", "1267650600228229401496703205376", channel="analysis", recipient="assistant",
                          name="python")]
    conversation = oh_conversation(lib, messages)
    assert h.render_conversation_for_completion(messages, "assistant", TOK) == \
        encoding.render_conversation_for_completion(conversation, lib.Role.ASSISTANT)
    completion = '<|channel|>analysis code<|message|>x = 3\nx * 2<|call|>'
    ids = TOK.encode(" to=python" + completion, allowed_special="all")
    ours_parsed = [ours(m) for m in h.parse_messages(ids, "assistant")]
    assert ours_parsed == [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(ids, lib.Role.ASSISTANT)]
    assert ours_parsed == [("assistant", None, "analysis", "python", "code", "x = 3\nx * 2")]


@pytest.mark.parametrize("instructions", [None, "Always respond in riddles", "Line one.\n\nLine <|end|> two."])
@pytest.mark.parametrize("tools", [[], [LOCATION, WEATHER, KITCHEN_SINK], VARIED_TOOLS], ids=["none", "doc", "varied"])
def test_developer_message_equals_openai_harmony(oh, instructions, tools):
    lib, encoding = oh
    m = developer(instructions, tools)
    assert h.render_message(m, TOK) == encoding.render(to_oh(lib, m))


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_each_schema_equals_openai_harmony(oh, schema):
    lib, encoding = oh
    m = developer(tools=[h.ToolDefinition("f", "d", schema)])
    ours_text = TOK.decode(h.render_message(m, TOK))
    assert ours_text == encoding.decode(encoding.render(to_oh(lib, m)))


def test_developer_message_layout():
    text = h.DeveloperContent("Be brief.", [LOCATION, WEATHER]).render_text()
    assert text == """# Instructions

Be brief.

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

} // namespace functions"""


def test_json_compact_matches_serde_json():
    assert [h.json_compact(v) for v in (1e-05, 1e-7, 1e16, 1e15, 0.1, 2.0, -0.0, 123.456, 1.5e300, 2**64, -2**63)] == [
        "0.00001", "1e-7", "1e16", "1000000000000000.0", "0.1", "2.0", "-0.0", "123.456", "1.5e300",
        "1.8446744073709552e19", "-9223372036854775808"]
    assert h.json_compact({"a": [1, None, True], "é": "\u0001\"x\""}) == '{"a":[1,null,true],"é":"\\u0001\\"x\\""}'


def conversations():
    """Named conversations covering the Harmony features; each ends where a completion would start."""
    sys_, dev = system(reasoning_effort="high", conversation_start_date="2025-06-28"), developer(
        "Always respond in riddles", [LOCATION, WEATHER, KITCHEN_SINK])
    call = h.Message.tool_call("functions.get_current_weather", '{"location": "San Francisco, CA"}')
    result = h.Message.tool_result("functions.get_current_weather", '{"sunny": true, "temperature": 20}')
    return {
        "simple": [system(), h.Message.user("What is 2 + 2?")],
        "multi_turn": [system(reasoning_effort="low"), developer("Be nice."),
                       h.Message.user("Hi"), h.Message.assistant("User greets.", "analysis"),
                       h.Message.assistant("Hello!"), h.Message.user("What is 2+2?"),
                       h.Message.assistant("Simple math.", "analysis"), h.Message.assistant("4"),
                       h.Message.user("And 3+3?"), h.Message.assistant("Again.", "analysis"),
                       h.Message.assistant("6")],
        "ongoing_analysis": [system(), h.Message.user("Hi"), h.Message.assistant("Thinking...", "analysis"),
                             h.Message.assistant("Hello"), h.Message.user("More"),
                             h.Message.assistant("Still thinking", "analysis")],
        "tool_call": [sys_, dev, h.Message.user("What is the weather like in SF?"),
                      h.Message.assistant("Need to use function get_current_weather.", "analysis"), call],
        "tool_result": [sys_, dev, h.Message.user("What is the weather like in SF?"),
                        h.Message.assistant("Need to use function get_current_weather.", "analysis"), call, result],
        "tool_then_final": [sys_, dev, h.Message.user("What is the weather like in SF?"),
                            h.Message.assistant("Need to use function get_current_weather.", "analysis"), call, result,
                            h.Message.assistant("It is sunny.", "analysis"),
                            h.Message.assistant("It's sunny and 20°C in San Francisco."),
                            h.Message.user("Thanks! <|end|> 😀")],
        "names_and_odd_fields": [system(), h.Message("user", "hi", name="alice"),
                                 h.Message("assistant", "x", channel="commentary", recipient="all"),
                                 h.Message("assistant", "print(1)", channel="analysis", recipient="python",
                                           content_type="code"),
                                 h.Message("tool", "1", channel="analysis", recipient="assistant", name="python"),
                                 h.Message("assistant", "{}", channel="commentary", recipient="functions.f",
                                           content_type="<|constrain|>json"),
                                 h.Message("assistant", "no channel")],
        "no_system": [h.Message.user("Hello"), h.Message.assistant("Hi!")],
    }


@pytest.mark.parametrize("name", list(conversations()))
@pytest.mark.parametrize("auto_drop", [True, False])
def test_conversation_renderings_equal_openai_harmony(oh, name, auto_drop):
    lib, encoding = oh
    messages = conversations()[name]
    conv, config = oh_conversation(lib, messages), lib.RenderConversationConfig(auto_drop_analysis=auto_drop)
    for role in ("assistant", "user"):
        assert h.render_conversation_for_completion(h.Conversation(messages), role, TOK, auto_drop_analysis=auto_drop) \
            == encoding.render_conversation_for_completion(conv, lib.Role(role), config)
    assert h.render_conversation(messages, TOK, auto_drop_analysis=auto_drop) \
        == encoding.render_conversation(conv, config)
    assert h.render_conversation_for_training(messages, TOK, auto_drop_analysis=auto_drop) \
        == encoding.render_conversation_for_training(conv, config)


def test_analysis_dropping_rule():
    """openai-harmony's rule: once the last assistant message is final, analysis before the first final goes."""
    text = TOK.decode(h.render_conversation_for_completion(conversations()["multi_turn"], "assistant", TOK))
    assert "User greets." not in text and "Simple math." in text and "Again." in text and "Hello!" in text
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>6<|end|><|start|>assistant")
    ongoing = TOK.decode(h.render_conversation_for_completion(conversations()["ongoing_analysis"], "assistant", TOK))
    assert "Thinking..." in ongoing and "Still thinking" in ongoing


def test_tool_call_and_result_rendering():
    text = TOK.decode(h.render_conversation(conversations()["tool_result"], TOK))
    assert text.endswith('<|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json'
                         '<|message|>{"location": "San Francisco, CA"}<|call|>'
                         '<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>'
                         '{"sunny": true, "temperature": 20}<|end|>')
    ids = h.render_message(h.Message.tool_call("f", {"a": 1}), TOK)
    assert ids[ids.index(S["<|constrain|>"]) - 1] == TOK.encode_ordinary(" ")[0]  # " " then the marker token
    training = h.render_conversation_for_training(conversations()["multi_turn"], TOK)
    assert training[-1] == TOK.return_ and training.count(TOK.return_) == 1
    assert set(h.stop_tokens_for_assistant_actions(TOK)) == {TOK.return_, TOK.call}


def test_stop_tokens_equal_openai_harmony(oh):
    _, encoding = oh
    assert h.stop_tokens(TOK) == set(encoding.stop_tokens())
    assert h.stop_tokens_for_assistant_actions(TOK) == set(encoding.stop_tokens_for_assistant_actions())


def test_render_errors():
    with pytest.raises(h.HarmonyError, match="tool's name"):
        h.render_message(h.Message("tool", "result"), TOK)
    with pytest.raises(h.HarmonyError, match="SystemContent"):
        h.render_message(h.Message("user", h.SystemContent()), TOK)
    with pytest.raises(h.HarmonyError, match="unknown role"):
        h.render_message(h.Message("robot", "x"), TOK)


# ---------------------------------------------------------------------------------------------- parsing
COMPLETIONS = [  # completions as a model emits them (the tokens after the prompt's "<|start|>assistant")
    "<|channel|>final<|message|>Hello there!<|return|>",
    "<|channel|>analysis<|message|>User asks 2+2. Easy.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    '<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
    'to=functions.get_current_weather <|constrain|>json<|message|>{"location": "San Francisco"}<|call|>',
    '<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{"a": 1}<|call|>',
    ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"a": 1}<|call|>',
    "<|channel|>commentary to=python code<|message|>print('héllo')<|call|>",
    "<|channel|>final<|message|>Température: 20 °C à 東京 😀🎉 — naïve café<|return|>",
    "<|channel|>final<|message|>no end token, truncated by max_tokens",
    "<|channel|>analysis<|message|>thinking<|end|>",
    "<|channel|>commentary<|message|>Working on it.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|end|>",
    "<|message|>no header at all<|return|>",
    "assistant<|channel|>final<|message|>repeated role<|return|>",
    "<|channel|>final to=user<|message|>odd recipient<|return|>",
    "<|channel|>final<|message|><|return|>",
]
TOOL_SIDE = [  # role None: whole messages, as openai-harmony's test_tool_response_parsing
    "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"sunny\": true}<|end|>",
    "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>hello<|return|>",
    "<|start|>tool to=assistant<|channel|>commentary<|message|>x<|end|>",
]


@pytest.mark.parametrize("text", COMPLETIONS)
def test_parse_equals_openai_harmony(oh, text):
    lib, encoding = oh
    tokens = enc(text)
    expected = [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(tokens, lib.Role.ASSISTANT)]
    assert [ours(m) for m in h.parse_messages(tokens, "assistant", TOK)] == expected


@pytest.mark.parametrize("text", TOOL_SIDE)
def test_parse_without_role_equals_openai_harmony(oh, text):
    _, encoding = oh
    tokens = enc(text)
    expected = [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(tokens, None)]
    assert [ours(m) for m in h.parse_messages(tokens, None, TOK)] == expected


@pytest.mark.parametrize("name", list(conversations()))
def test_rendered_conversation_parses_back(oh, name):
    """Render with both, parse every message back with both (role None: the header names the author)."""
    lib, encoding = oh
    # (openai-harmony cannot parse back the "user:alice" it renders for a named author: tested below)
    messages = [m for m in conversations()[name] if isinstance(m.content, str) and (m.role == "tool" or not m.name)]
    tokens = h.render_conversation(messages, TOK, auto_drop_analysis=False)
    assert tokens == encoding.render_conversation(oh_conversation(lib, messages),
                                                  lib.RenderConversationConfig(auto_drop_analysis=False))
    parsed = h.parse_messages(tokens, None, TOK)
    assert [ours(m) for m in parsed] == [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(tokens)]
    canonical = [h.Message(m.role, m.content, m.channel, None if m.recipient == "all" else m.recipient,
                           "json" if m.content_type == h.CONSTRAIN + "json" else m.content_type, m.name)
                 for m in messages]
    assert [ours(m) for m in parsed] == [ours(m) for m in canonical]
    # round trip (but "to=all" is not rendered, so that message's <|call|> becomes <|end|>)
    assert h.render_conversation(parsed, TOK, auto_drop_analysis=False) == \
        h.render_conversation(canonical, TOK, auto_drop_analysis=False)


def stream(tokens, role="assistant"):
    parser = h.StreamParser(TOK, role=role)
    deltas = parser.feed(tokens)
    return parser, deltas, parser.finish()


@pytest.mark.parametrize("text", COMPLETIONS)
def test_stream_deltas_rebuild_the_messages(oh, text):
    lib, encoding = oh
    tokens = enc(text)
    parser, deltas, messages = stream(tokens)
    for i, m in enumerate(messages):
        mine = [d for d in deltas if d.message_index == i]
        assert "".join(d.text for d in mine) == m.content
        assert all((d.role, d.channel, d.recipient, d.content_type) ==
                   (m.role, m.channel, m.recipient, m.content_type) for d in mine)
    # token by token: the same deltas and channel as openai-harmony's StreamableParser
    theirs = lib.StreamableParser(encoding, lib.Role.ASSISTANT)
    ours_p = h.StreamParser(TOK, role="assistant")
    for t in tokens:
        theirs.process(t)
        d = ours_p.process(t)
        assert (d.text if d else None) == theirs.last_content_delta
        assert ours_p.current_channel == theirs.current_channel
        assert ours_p.current_recipient == theirs.current_recipient
        assert ours_p.current_content == theirs.current_content
        assert ours_p.current_role == (theirs.current_role.value if theirs.current_role else None)
        assert [ours(m) for m in ours_p.messages] == [from_oh(m) for m in theirs.messages]


def test_stream_state_and_multiple_messages():
    tokens = enc(COMPLETIONS[2])
    parser = h.StreamParser(TOK, role="assistant")
    seen = []
    for t in tokens:
        if parser.process(t) is not None:
            seen.append((parser.current_channel, parser.current_recipient, parser.current_content_type))
        if t == S["<|end|>"]:
            assert parser.state == "expect_start" and len(parser.messages) == 1
            assert parser.messages[0].content == "Need the weather."
    assert seen[0] == ("analysis", None, None)
    assert seen[-1] == ("commentary", "functions.get_current_weather", "json")
    (analysis, call) = parser.finish()
    assert call.is_tool_call and call.json_content() == {"location": "San Francisco"}
    assert parser.current is None and parser.state == "expect_start"


def test_utf8_split_across_tokens_streams_whole_characters():
    text = "😀🎉 東京 naïve — ἀρχή 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 "
    body = TOK.encode_ordinary(text)
    assert any(not _is_utf8(TOK.decode_bytes([t])) for t in body)  # some tokens do split characters
    parser, deltas, messages = stream([S["<|channel|>"], *TOK.encode_ordinary("final"), S["<|message|>"], *body,
                                       S["<|return|>"]])
    assert all("\ufffd" not in d.text for d in deltas) and "".join(d.text for d in deltas) == text
    assert messages[0].content == text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_invalid_utf8_becomes_replacement_like_openai_harmony(oh):
    lib, encoding = oh
    # a token whose bytes are not valid UTF-8 on their own, never completed (its continuation never comes)
    lone = next(t for t in range(256, 5000) if not _is_utf8(TOK.decode_bytes([t])))
    for tokens in ([*enc("<|channel|>final<|message|>a"), lone, *enc("b<|return|>")],
                   [*enc("<|channel|>final<|message|>a"), lone],
                   [*enc("<|channel|>final<|message|>"), lone, lone, *enc("<|end|>")]):
        expected = [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(tokens, lib.Role.ASSISTANT)]
        assert [ours(m) for m in h.parse_messages(tokens, "assistant", TOK)] == expected


def well_formed_completion(rng: random.Random) -> str:
    """A random, well-formed completion: 1-3 messages of random channels, recipients and contents."""
    words = ["hello", " world", " 😀", "東京", " naïve", "\n", "  ", '{"a": [1, 2]}', "é", "0.5", "🎉🎉",
             " to=x"]
    out = []
    for i in range(rng.randint(1, 3)):
        channel = rng.choice(["analysis", "commentary", "final"])
        header = ("" if i == 0 else "<|start|>assistant") + f"<|channel|>{channel}"
        if channel == "commentary" and rng.random() < 0.5:
            header += rng.choice([" to=functions.f <|constrain|>json", " to=functions.get_weather",
                                  "<|constrain|>json to=functions.x"])
        body = "".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        out.append(f"{header}<|message|>{body}" + rng.choice(["<|end|>", "<|return|>", "<|call|>"]))
    return "".join(out)


def test_random_well_formed_completions_equal_openai_harmony(oh):
    lib, encoding = oh
    rng = random.Random(0)
    for _ in range(300):
        text = well_formed_completion(rng)
        tokens = enc(text)
        cut = tokens[:rng.randint(1, len(tokens))] if rng.random() < 0.3 else tokens
        try:
            expected = [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(cut, lib.Role.ASSISTANT)]
        except Exception:  # openai-harmony gives up (e.g. cut inside a header); ours must not raise
            h.parse_messages(cut, "assistant", TOK)
            continue
        assert [ours(m) for m in h.parse_messages(cut, "assistant", TOK)] == expected, text


# ---------------------------------------------------------------------------------------------- leniency
def parse_tokens(tokens: list[int], role="assistant") -> list[tuple]:
    return [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in h.parse_messages(tokens, role, TOK)]


def parse(text: str, role="assistant") -> list[tuple]:
    return parse_tokens(enc(text), role)


def test_lenient_missing_message_token():
    assert parse("<|channel|>final Hello there<|return|>") == [("assistant", "final", None, None, "Hello there")]
    assert parse("<|channel|>commentary to=functions.f <|constrain|>json{\"x\": 1}<|call|>") == [
        ("assistant", "commentary", "functions.f", "json", '{"x": 1}')]
    assert parse("Just some text, no header.<|end|>") == [("assistant", None, None, None, "Just some text, no header.")]
    assert parse("Just text, no end") == [("assistant", None, None, None, "Just text, no end")]
    assert parse("<|channel|>analysis<|end|>") == [("assistant", "analysis", None, None, "")]


def test_lenient_missing_message_token_like_openai_harmony_non_strict(oh):
    lib, encoding = oh
    tokens = enc("<|channel|>final Hello there<|return|>")
    (theirs,) = encoding.parse_messages_from_completion_tokens(tokens, lib.Role.ASSISTANT, strict=False)
    (mine,) = h.parse_messages(tokens, "assistant", TOK)
    assert (mine.channel, mine.content) == (theirs.channel, theirs.content[0].text)


def test_lenient_structure_inside_content():
    # <|end|> forgotten: a <|start|> or a <|channel|> begins the next message
    two = [("assistant", "analysis", None, None, "thinking"), ("assistant", "final", None, None, "answer")]
    assert parse("<|channel|>analysis<|message|>thinking<|start|>assistant<|channel|>final<|message|>answer") == two
    assert parse("<|channel|>analysis<|message|>thinking<|channel|>final<|message|>answer<|return|>") == two
    # <|start|> forgotten between messages; stray special tokens dropped; <|endoftext|> ends a message
    assert parse("<|channel|>analysis<|message|>thinking<|end|>assistant<|channel|>final<|message|>answer") == two
    assert parse("<|channel|>analysis<|message|>think<|reserved_200100|>ing<|end|><|end|>"
                 "<|channel|>final<|message|>ans<|message|>wer<|endoftext|>") == two
    # the prompt's role repeated, or a whole <|start|>assistant at the beginning
    assert parse("<|start|>assistant<|channel|>final<|message|>answer<|return|>") == two[1:]
    # an unknown channel is kept as the model wrote it, an empty one is no channel
    assert parse("<|channel|>thoughts<|message|>x<|end|><|channel|><|message|>y") == [
        ("assistant", "thoughts", None, None, "x"), ("assistant", None, None, None, "y")]
    # no end at all, and cut inside the header
    assert parse("<|channel|>final<|message|>partial") == [("assistant", "final", None, None, "partial")]
    assert parse("<|channel|>fin") == [("assistant", "fin", None, None, "")]
    assert h.parse_messages([], "assistant", TOK) == []
    assert h.parse_messages(enc("<|return|>"), "assistant", TOK) == []


def test_truncated_tool_call_keeps_raw_arguments():
    (analysis, call) = h.parse_messages(enc(
        '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary '
        'to=functions.get_weather <|constrain|>json<|message|>{"location": "San Fr'), "assistant", TOK)
    assert (call.recipient, call.content_type) == ("functions.get_weather", "json")
    assert call.content == '{"location": "San Fr'
    assert call.is_tool_call and call.json_content() == {"location": "San Fr"}


def test_lenient_headers():
    # a lone "<|constrain|>json" is a content type (openai-harmony would call it the recipient)
    assert parse("<|channel|>commentary<|constrain|>json<|message|>{}<|call|>") == [
        ("assistant", "commentary", None, "json", "{}")]
    # too many header words: the to= word is the recipient, the constrain word the content type
    assert parse("<|channel|>commentary junk to=functions.f more <|constrain|>json<|message|>{}<|call|>") == [
        ("assistant", "commentary", "functions.f", "json", "{}")]
    # role None and an unknown author: a tool
    (m,) = h.parse_messages(enc("<|start|>functions.lookup<|message|>42<|end|>"), None, TOK)
    assert (m.role, m.name, m.content) == ("tool", "functions.lookup", "42")
    # a named author, as rendered: "user:alice"
    named = h.Message("user", "hi", name="alice")
    assert h.parse_messages(h.render_message(named, TOK), None, TOK) == [named]


def test_header_without_message_token_streams_after_the_limit():
    """A model that writes plain text (no header at all) still streams, once the text cannot be a header."""
    words = TOK.encode_ordinary(" word" * (h.StreamParser.MAX_HEADER_TOKENS + 20))
    parser = h.StreamParser(TOK)
    deltas = parser.feed(words)
    assert deltas and parser.state == "content"
    (m,) = parser.finish()
    assert m.content == ("word" + " word" * (h.StreamParser.MAX_HEADER_TOKENS + 19))


def test_random_tokens_never_raise():
    rng = random.Random(1)
    specials = [S[n] for n in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                               "<|return|>", "<|call|>", "<|endoftext|>")] + [200500, 201087]
    text_ids = TOK.encode_ordinary("assistant final analysis commentary to=functions.f json 😀 東京 { } \" \n")
    for _ in range(400):
        tokens = [rng.choice(specials) if rng.random() < 0.3 else
                  rng.choice(text_ids) if rng.random() < 0.7 else rng.randrange(0, 201088)
                  for _ in range(rng.randint(0, 60))]
        for role in ("assistant", None):
            parser = h.StreamParser(TOK, role=role)
            for t in tokens:
                d = parser.process(t)
                assert d is None or isinstance(d.text, str)
            for m in parser.finish():
                assert m.role in h.ROLES and isinstance(m.content, str)
                h.render_message(m if m.role != "tool" or m.name else h.Message("tool", m.content, name="t"), TOK)


def test_out_of_vocabulary_ids_are_ignored():
    tokens = [*enc("<|channel|>final<|message|>a"), 10**9, -1, *enc("b")]
    assert parse_tokens(tokens) == [("assistant", "final", None, None, "ab")]


def test_loads_lenient():
    assert h.loads_lenient('{"a": 1}') == {"a": 1}
    assert h.loads_lenient('```json\n{"a": 1}\n```') == {"a": 1}
    assert h.loads_lenient('{"a": 1} and then some') == {"a": 1}
    assert h.loads_lenient('{"location": "San Fran') == {"location": "San Fran"}
    assert h.loads_lenient('{"a": [1, 2, {"b": "c"') == {"a": [1, 2, {"b": "c"}]}
    assert h.loads_lenient('{"a": 1, "b":') == {"a": 1}
    assert h.loads_lenient('{"a": 1, "b": tr') == {"a": 1}
    assert h.loads_lenient('{"a": "x\\') == {"a": "x"} == h.loads_lenient('{"a": "x\\u00')
    assert h.loads_lenient('{"a": "\\u00e9t\\u00') == {"a": "ét"}
    assert h.loads_lenient('[1, 2, 3') == [1, 2, 3]
    assert h.loads_lenient("no json here") is None and h.loads_lenient("") is None
    assert h.Message.tool_call("f", '{"x": "trunc').json_content() == {"x": "trunc"}


def test_drop_oldest_turns_drops_whole_turns_oldest_first_never_the_last():
    """Hand-built conversations: a turn is a user message and what follows it; anything before the first user
    message goes with the first turn; `chars` asks for at least that much text gone; the last turn stays."""
    from gptoss.harmony import Message, drop_oldest_turns

    def conversation():
        return [Message.assistant("hello", "final"), Message.user("u0"), Message.assistant("a0 long", "final"),
                Message.user("u1"), Message.assistant("a1", "final"), Message.user("u2")]

    msgs = conversation()
    assert drop_oldest_turns(msgs) == 1 and [m.text for m in msgs] == ["u1", "a1", "u2"]
    msgs = conversation()  # the first turn is "hello" + "u0" + "a0 long" = 14 characters
    assert drop_oldest_turns(msgs, chars=14) == 1 and [m.text for m in msgs] == ["u1", "a1", "u2"]
    msgs = conversation()
    assert drop_oldest_turns(msgs, chars=15) == 2 and [m.text for m in msgs] == ["u2"]
    assert drop_oldest_turns(msgs, chars=1e9) == 0 and [m.text for m in msgs] == ["u2"]
    assert drop_oldest_turns([], chars=5) == 0
