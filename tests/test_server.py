"""The OpenAI-compatible server, started for real on 127.0.0.1 (a free port) and driven by the official
`openai` client: answers equal the model's greedy output for the same Harmony prompt, streamed or not,
through chat completions and responses; function-tool round trips; 32 concurrent streaming clients;
every documented error case.

Two tiny GPT-oss models (real architecture, full o200k vocabulary, fp32): a random one, whose answers are
arbitrary but deterministic, and one trained in seconds to a script (reasoning, a tool call, an answer),
so that reasoning and tool calls come out of a real model's tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import gptoss
from gptoss import harmony as h
from gptoss import synthetic
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.server import create_app, serve_in_thread
from gptoss.server.generation import SHOWN_CHANNELS, StopStrings
from gptoss.tokenizer import get_tokenizer
from test_chat import train_to_script

TOK = get_tokenizer()
STOPS = tuple(sorted(h.stop_tokens_for_assistant_actions(TOK) | {TOK.endoftext}))
CONFIG = preset("tiny").replace(vocab_size=201_088)  # max_position_embeddings 2048: the context limit

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": WEATHER_SCHEMA}}
WEATHER_DEF = h.ToolDefinition("get_weather", "Current weather in a city.", WEATHER_SCHEMA)
QUESTION = "What is the weather in Paris?"
M = "tiny-random"
USER = [{"role": "user", "content": "Hi"}]
CALL_ARGS = '{"city": "Paris"}'
WEATHER_RESULT = '{"temperature": 21, "sky": "sunny"}'
UNDECLARED_QUESTION = "What time is it in Paris?"
SCRIPT = [  # (Harmony messages after the system message, completion): what the scripted model learns
    ([h.Message.developer(h.DeveloperContent(None, [WEATHER_DEF])), h.Message.user(QUESTION)],
     "<|channel|>analysis<|message|>Check the weather tool.<|end|><|start|>assistant<|channel|>commentary "
     f"to=functions.get_weather <|constrain|>json<|message|>{CALL_ARGS}<|call|>"),
    ([h.Message.developer(h.DeveloperContent(None, [WEATHER_DEF])), h.Message.user(QUESTION),
      h.Message.assistant("Check the weather tool.", "analysis"), h.Message.tool_call("get_weather", CALL_ARGS),
      h.Message.tool_result("get_weather", WEATHER_RESULT)],
     "<|channel|>final<|message|>It is sunny and 21 °C in Paris.<|return|>"),
    ([h.Message.developer(h.DeveloperContent(None, [WEATHER_DEF])), h.Message.user("What is 2+2?")],
     # a final answer ended with <|end|>, then another one: the server must stop after the first (issue 19)
     "<|channel|>final<|message|>2 + 2 = 4<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4<|return|>"),
    ([h.Message.developer(h.DeveloperContent(None, [WEATHER_DEF])), h.Message.user(UNDECLARED_QUESTION)],
     # a call to a function the request did not declare
     f"<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{CALL_ARGS}<|call|>"),
    ([h.Message.user("Malformed?")],  # a message on a channel Harmony does not declare, then the answer
     "<|channel|>Too big.<|end|><|start|>assistant<|channel|>final<|message|>I don't know.<|return|>"),
    ([h.Message.user("Hello")],  # the chat page's test (test_server_page.py)
     "<|channel|>analysis<|message|>The user greets me.<|end|><|start|>assistant<|channel|>final<|message|>"
     "Hello! How can I help?<|return|>"),
]


def render(messages: list[h.Message], effort: str = "medium") -> list[int]:
    system = h.Message.system(h.SystemContent(reasoning_effort=effort))
    return h.render_conversation_for_completion([system, *messages], "assistant", TOK)


@functools.lru_cache(maxsize=None)
def random_model() -> gptoss.Transformer:
    model = gptoss.Transformer(CONFIG, dtype=torch.float32)
    model.load_state_dict(dict(synthetic.random_tensors(CONFIG, seed=0, dtype=torch.float32)))
    return model


@functools.lru_cache(maxsize=None)
def scripted_model() -> gptoss.Transformer:
    """Trained once per session; test_server_page.py uses it too."""
    return train_to_script([render(m) for m, _ in SCRIPT], [TOK.encode(c, allowed_special="all") for _, c in SCRIPT])


def is_call(m: h.Message) -> bool:
    return m.recipient not in (None, "all", "user", "assistant")


def expected(model, prompt: list[int], max_tokens: int, forced: list[int] = ()) -> dict:
    """What the API must answer: the greedy tokens for the prompt, parsed as Harmony."""
    tokens = generate_tokens(model, [*prompt, *forced], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       stop_tokens=STOPS))
    messages = h.parse_messages([*forced, *tokens])
    calls = [m for m in messages if is_call(m)]
    finish = ("length" if len(tokens) == max_tokens and tokens[-1] not in STOPS else
              "tool_calls" if messages and is_call(messages[-1]) else "stop")
    return {"tokens": tokens, "finish": finish,
            "calls": [(m.recipient.removeprefix("functions."), m.text) for m in calls],
            "content": "".join(m.text for m in messages if not is_call(m) and m.channel in SHOWN_CHANNELS),
            "reasoning": "".join(m.text for m in messages if not is_call(m) and m.channel == "analysis")}


class Server:
    """`app` served on 127.0.0.1 at a free port (gptoss.server.serve_in_thread), with the engine behind it."""

    def __init__(self, app, engine: Engine):
        self.app, self.engine = app, engine
        self._serving = serve_in_thread(app, timeout=30)

    def __enter__(self) -> "Server":
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._serving.__exit__(*exc)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def random_server():
    with Engine(random_model(), max_concurrency=32, max_queue=64) as engine:
        with Server(create_app(engine, "tiny-random"), engine) as server:
            yield server


@pytest.fixture(scope="module")
def scripted_server():
    with Engine(scripted_model(), max_concurrency=4) as engine:
        with Server(create_app(engine, "tiny-scripted"), engine) as server:
            yield server


# ---------------------------------------------------------------------------------------------- client helpers
def chat(client: openai.OpenAI, stream: bool, **kw) -> dict:
    """One chat completion, streamed or not, reduced to what both must agree on."""
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        return {"content": m.content or "", "reasoning": getattr(m, "reasoning_content", None) or "",
                "calls": [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []],
                "finish": r.choices[0].finish_reason, "usage": r.usage}
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None, "usage": None, "chunks": 0}
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        out["usage"] = chunk.usage or out["usage"]
        if not chunk.choices:
            continue
        out["chunks"] += 1
        delta = chunk.choices[0].delta
        out["content"] += delta.content or ""
        out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
        for tc in delta.tool_calls or []:
            call = out["calls"].setdefault(tc.index, [tc.id, "", ""])
            call[1] += tc.function.name or "" if tc.function else ""
            call[2] += tc.function.arguments or "" if tc.function else ""
        out["finish"] = chunk.choices[0].finish_reason or out["finish"]
    out["calls"] = [tuple(c) for _, c in sorted(out["calls"].items())]
    return out


def respond(client: openai.OpenAI, stream: bool, **kw):
    """A Responses API call; streamed through the SDK's strict stream helper, which rebuilds the response
    from the events and checks their consistency. Returns (response, event types, deltas by type)."""
    if not stream:
        return client.responses.create(**kw), [], {}
    deltas: dict[str, str] = {}
    with client.responses.stream(**kw) as events:
        types = []
        for event in events:
            types.append(event.type)
            if event.type.endswith(".delta"):
                deltas[event.type] = deltas.get(event.type, "") + event.delta
        return events.get_final_response(), types, deltas


def items(response, kind: str) -> list:
    return [item for item in response.output if item.type == kind]


# ---------------------------------------------------------------------------------------------- equal to greedy
def test_models_and_health(random_server):
    assert [m.id for m in random_server.client().models.list()] == ["tiny-random"]
    health = httpx.get(random_server.url + "/health").json()
    assert health["status"] == "ok" and health["max_concurrency"] == 32 and health["max_context"] == 2048


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_chat_completions_equal_greedy_output(random_server, effort):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Hi ({effort})"}]
    prompt = render([h.Message.developer("Answer briefly."), h.Message.user(f"Hi ({effort})")], effort)
    want = expected(random_model(), prompt, 24)
    for stream in (False, True):
        got = chat(random_server.client(), stream, model="tiny-random", messages=messages, reasoning_effort=effort,
                   temperature=0, max_tokens=24)
        assert (got["content"], got["reasoning"], got["finish"]) == (want["content"], want["reasoning"], want["finish"])
        assert (got["usage"].prompt_tokens, got["usage"].completion_tokens) == (len(prompt), len(want["tokens"]))


@pytest.mark.parametrize("stream", [False, True])
def test_responses_equal_greedy_output(random_server, stream):
    prompt = render([h.Message.developer("Be creative."), h.Message.user("Tell me a story.")], "low")
    want = expected(random_model(), prompt, 20)
    # the SDK's stream helper insists on response.completed; an incomplete one is streamed plainly below
    r, types, deltas = respond(random_server.client(), stream and want["finish"] != "length", model="tiny-random",
                               input="Tell me a story.", instructions="Be creative.", reasoning={"effort": "low"},
                               temperature=0, max_output_tokens=20)
    assert r.output_text == want["content"]
    assert "".join(c.text for item in items(r, "reasoning") for c in item.content or []) == want["reasoning"]
    assert r.status == ("incomplete" if want["finish"] == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(prompt), len(want["tokens"]))
    assert r.reasoning.effort == "low" and r.instructions == "Be creative."
    if types:
        assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
        assert deltas.get("response.output_text.delta", "") == want["content"]
    # The same, streamed through the plain iterator (works for incomplete responses too).
    events = list(random_server.client().responses.create(
        model="tiny-random", input="Tell me a story.", instructions="Be creative.", reasoning={"effort": "low"},
        temperature=0, max_output_tokens=20, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == want["content"] == events[-1].response.output_text
    assert events[-1].type == ("response.incomplete" if want["finish"] == "length" else "response.completed")


def test_seeded_sampling_equals_generate(random_server):
    prompt = render([h.Message.user("Pick a number.")])
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=3, stop_tokens=STOPS)
    tokens = generate_tokens(random_model(), prompt, params)
    want = "".join(m.text for m in h.parse_messages(tokens) if not is_call(m) and m.channel != "analysis")
    for stream in (False, True):
        got = chat(random_server.client(), stream, model="tiny-random", temperature=0.7, top_p=0.9, seed=3,
                   max_tokens=16, messages=[{"role": "user", "content": "Pick a number."}])
        assert got["content"] == want and got["usage"].completion_tokens == len(tokens)


def test_stop_strings_cut_the_content(random_server):
    prompt = render([h.Message.user("Hi")])
    want = expected(random_model(), prompt, 30)["content"]
    stop = want[10:13]
    for stream in (False, True):
        got = chat(random_server.client(), stream, model="tiny-random", temperature=0, max_tokens=30, stop=[stop, "@@"],
                   messages=[{"role": "user", "content": "Hi"}])
        assert got["content"] == want[:want.find(stop)] and got["finish"] == "stop"


def test_stop_strings_hold_back_a_possible_match():
    s = StopStrings(["o w", "xyz"])
    assert [s.feed("Hel"), s.feed("lo"), s.feed(" "), s.feed("wor"), s.feed("ld")] == ["Hel", "l", "", "", ""]
    assert s.hit
    s = StopStrings(["o w"])
    assert s.feed("Hello") + s.feed(" t") == "Hello t" and not s.hit and s.flush() == ""


def test_forced_tool_choice(random_server):
    # the order calls are rendered in (openai-harmony; test_server_hostile checks it against its renderer)
    forced = TOK.encode(" to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>",
                        allowed_special="all")
    prompt = render([h.Message.developer(h.DeveloperContent(None, [WEATHER_DEF])), h.Message.user("Weather?")])
    want = expected(random_model(), prompt, 12, forced)
    for stream in (False, True):
        got = chat(random_server.client(), stream, model="tiny-random", temperature=0, max_tokens=12, tools=[WEATHER],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                   messages=[{"role": "user", "content": "Weather?"}])
        assert [c[1] for c in got["calls"]] == ["get_weather"] and got["finish"] == want["finish"]
        assert got["usage"].prompt_tokens == len(prompt) + len(forced)
        if stream:  # arguments stream as generated (the non-streamed ones are repaired into JSON if need be)
            assert got["calls"][0][2] == want["calls"][0][1]
    got = chat(random_server.client(), False, model="tiny-random", temperature=0, max_tokens=12, tools=[WEATHER],
               tool_choice="none", messages=[{"role": "user", "content": "Weather?"}])
    assert got["content"] == expected(random_model(), render([h.Message.user("Weather?")]), 12)["content"]


# ---------------------------------------------------------------------------------------------- tool round trips
@pytest.mark.parametrize("stream", [False, True])
def test_chat_function_tool_round_trip(scripted_server, stream):
    client = scripted_server.client()
    messages = [{"role": "user", "content": QUESTION}]
    first = chat(client, stream, model="tiny-scripted", messages=messages, tools=[WEATHER], temperature=0)
    assert first["finish"] == "tool_calls" and first["reasoning"] == "Check the weather tool."
    assert first["content"] == ""
    [(call_id, name, arguments)] = first["calls"]
    assert (name, json.loads(arguments)) == ("get_weather", {"city": "Paris"}) and call_id.startswith("call_")
    messages += [{"role": "assistant", "content": None, "reasoning_content": first["reasoning"],
                  "tool_calls": [{"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT}]
    second = chat(client, stream, model="tiny-scripted", messages=messages, tools=[WEATHER], temperature=0)
    assert (second["content"], second["finish"], second["calls"]) == ("It is sunny and 21 °C in Paris.", "stop", [])
    if stream:
        assert second["chunks"] > 5  # token by token, not one lump


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_to_an_undeclared_function_is_returned_as_is(scripted_server, stream):
    """The model calls get_time, which the request did not declare: the client gets the call (not an empty
    reply) and can answer it with an error in its next request, which is accepted."""
    client = scripted_server.client()
    messages = [{"role": "user", "content": UNDECLARED_QUESTION}]
    first = chat(client, stream, model="tiny-scripted", messages=messages, tools=[WEATHER], temperature=0,
                 max_tokens=60)
    [(call_id, name, arguments)] = first["calls"]
    assert (name, json.loads(arguments), first["finish"]) == ("get_time", {"city": "Paris"}, "tool_calls")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call_id, "content": "error: no function named get_time"}]
    second = chat(client, stream, model="tiny-scripted", messages=messages, tools=[WEATHER], temperature=0,
                  max_tokens=5)
    assert second["finish"] in ("stop", "length", "tool_calls")


def test_which_calls_the_server_returns():
    from gptoss.server.generation import _kind

    declared = frozenset({"get_weather"})
    assert _kind("commentary", "functions.get_weather", declared) == ("tool_call", "get_weather")
    assert _kind("commentary", "functions.get_time", declared) == ("tool_call", "get_time")  # returned as is
    assert _kind("commentary", "functions.get_time", frozenset()) == ("dropped", "get_time")  # no call allowed
    assert _kind("commentary", "functions.get time", declared) == ("dropped", "get time")  # not a name OpenAI allows
    assert _kind("commentary", "browser.search", declared) == ("dropped", "browser.search")  # not a function
    assert _kind("analysis", None, declared) == ("reasoning", None)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_tool_round_trip(scripted_server, stream):
    client = scripted_server.client()
    tools = [{"type": "function", **WEATHER["function"]}]
    first, types, deltas = respond(client, stream, model="tiny-scripted", input=QUESTION, tools=tools, temperature=0)
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    assert first.output[0].content[0].text == "Check the weather tool."
    call = first.output[1]
    assert (call.name, call.arguments, first.status) == ("get_weather", CALL_ARGS, "completed")
    if stream:
        assert {"response.created", "response.output_item.added", "response.reasoning_text.delta",
                "response.function_call_arguments.delta", "response.output_item.done",
                "response.completed"} <= set(types)
        assert deltas["response.function_call_arguments.delta"] == CALL_ARGS
    second, types, deltas = respond(client, stream, model="tiny-scripted", previous_response_id=first.id, tools=tools,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": WEATHER_RESULT}], temperature=0)
    assert second.output_text == "It is sunny and 21 °C in Paris." and second.previous_response_id == first.id
    if stream:
        assert deltas["response.output_text.delta"] == second.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_reasoning_effort_reaches_the_model(scripted_server):
    """The script was learned at medium effort: other efforts render another system message, so the model
    answers differently; each answer equals the greedy output for its own prompt."""
    for effort in ("low", "medium", "high"):
        want = expected(scripted_model(), render([h.Message.user("Hello")], effort), 40)
        got = chat(scripted_server.client(), False, model="tiny-scripted", reasoning_effort=effort, temperature=0,
                   max_tokens=40, messages=[{"role": "user", "content": "Hello"}])
        assert (got["content"], got["reasoning"]) == (want["content"], want["reasoning"])
        if effort == "medium":
            assert (got["content"], got["reasoning"]) == ("Hello! How can I help?", "The user greets me.")


@pytest.mark.parametrize("stream", [False, True])
def test_a_message_on_an_undeclared_channel_is_shown_by_neither_server_nor_chat(scripted_server, stream):
    """`<|channel|>Too big.<|end|>` (no <|message|>: the parsers read channel "Too", text "big.") is malformed
    output: the server leaves it out of content and reasoning, as `gptoss chat` leaves it out of what it shows;
    the final answer after it is the content in both."""
    from gptoss.chat import ChatSession

    got = chat(scripted_server.client(), stream, model="tiny-scripted", temperature=0, max_tokens=40,
               messages=[{"role": "user", "content": "Malformed?"}])
    assert (got["content"], got["reasoning"]) == ("I don't know.", "")
    session = ChatSession(scripted_server.engine.complete, SamplingParams(temperature=0, max_tokens=40))
    events = list(session.send("Malformed?"))
    assert "".join(e.text for e in events if e.kind == "final") == "I don't know."
    assert [e.kind for e in events if e.kind not in ("final", "done")] == ["Too"]  # not shown by the CLI


# ---------------------------------------------------------------------------------------------- concurrency
def first_divergence_is_a_tie(model, prompt: list[int], solo: list[int], answer: str) -> None:
    """A batched answer differs from the solo one: show the first differing token was a near-tie (top-2 logits
    within 1e-5 along the solo path), not tokens of another request."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + solo]))[0, len(prompt) - 1:]
    content = lambda n: "".join(m.text for m in h.parse_messages(solo[:n]) if m.channel != "analysis")  # noqa: E731
    k = max(n for n in range(len(solo) + 1) if answer.startswith(content(n)))
    top2 = logits[min(k, len(solo) - 1)].topk(2).values
    assert float(top2[0] - top2[1]) < 1e-5, f"answer diverges at token {k} without a near-tie: {answer!r}"


def test_32_concurrent_streaming_clients_each_get_their_solo_answer(random_server):
    questions = [f"Question {i}: what comes after {i}?" for i in range(32)]
    prompts = [render([h.Message.user(q)]) for q in questions]
    solo = [expected(random_model(), p, 24) for p in prompts]  # one at a time, no batching
    ready = threading.Barrier(32)

    def ask(q: str) -> dict:
        client = random_server.client()
        ready.wait()  # all 32 streams open together
        return chat(client, True, model="tiny-random", temperature=0, max_tokens=24,
                    messages=[{"role": "user", "content": q}])

    steps_before = random_server.engine.steps
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, questions))
    assert len(answers) == 32 and all(a["finish"] and a["usage"] for a in answers)  # none lost
    for i, (a, s) in enumerate(zip(answers, solo)):
        if (a["content"], a["finish"], a["usage"].completion_tokens) != (s["content"], s["finish"], len(s["tokens"])):
            first_divergence_is_a_tie(random_model(), prompts[i], s["tokens"], a["content"])
    assert len({a["content"] for a in answers}) > 16  # distinct answers: a mix-up would show
    assert random_server.engine.max_batch >= 8  # decoded together
    assert random_server.engine.steps - steps_before < 32 * 24 / 4  # far fewer steps than one request at a time


def test_queue_full_is_503_and_a_disconnect_cancels_generation(caplog):
    caplog.set_level(logging.INFO, logger="gptoss.server")
    with Engine(random_model(), max_concurrency=1, max_queue=0) as engine, \
            Server(create_app(engine, "tiny-random"), engine) as server:
        body = {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
                "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as first:
            assert first.status_code == 200
            deadline = time.monotonic() + 30
            while engine.load != (1, 0):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json() == {"error": {
                "message": "server busy: 1 requests generating and 0 waiting (max_concurrency 1, max_queue 0); "
                           "retry later", "type": "server_error", "param": None, "code": "server_busy"}}
        # the client hung up mid-stream: its generation stops, freeing the row
        deadline = time.monotonic() + 10
        while engine.load != (0, 0):
            assert time.monotonic() < deadline, "the disconnected request kept generating"
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up: cancelled as well
            httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        deadline = time.monotonic() + 10
        while engine.load != (0, 0):
            assert time.monotonic() < deadline, "the abandoned request kept generating"
            time.sleep(0.01)
        ok = chat(server.client(), False, model="tiny-random", max_tokens=3, messages=USER)
        assert ok["usage"].completion_tokens <= 3
    lines = [r.getMessage() for r in caplog.records if r.name == "gptoss.server"]
    assert sum("chat.completions" in line and "finish=cancelled" in line for line in lines) == 2
    assert any(" in=" in line and " out=" in line and "tok/s" in line and "latency=" in line for line in lines)


# ---------------------------------------------------------------------------------------------- errors
CHAT, RESP = "/v1/chat/completions", "/v1/responses"
JSON = {"Content-Type": "application/json"}
ERRORS = [  # (case, path, body, status, param, code); every answer is {"error": {message, type, param, code}}
    ("malformed JSON", CHAT, b'{"model": "tiny-random", "messages": [', 400, None, "invalid_json"),
    ("body not an object", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("not UTF-8", CHAT, b'{"model": "\xff"}', 400, None, "invalid_json"),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": USER}, 400, "model", "model_not_found"),
    ("missing messages", CHAT, {"model": M}, 400, "messages", "missing_required_parameter"),
    ("no messages", CHAT, {"model": M, "messages": []}, 400, "messages", "invalid_value"),
    ("user message without content", CHAT, {"model": M, "messages": [{"role": "user"}]}, 400, "messages[0].content",
     "missing_required_parameter"),
    ("tool message without content", CHAT, {"model": M, "messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1"}]}, 400,
     "messages[2].content", "missing_required_parameter"),
    ("unknown role", CHAT, {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ("image content", CHAT, {"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0].type",
     "unsupported_content"),
    ("temperature > 2", CHAT, {"model": M, "messages": USER, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("temperature not a number", CHAT, {"model": M, "messages": USER, "temperature": "hot"}, 400, "temperature",
     "invalid_value"),
    ("top_p 0", CHAT, {"model": M, "messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("max_tokens 0", CHAT, {"model": M, "messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_completion_tokens < 0", CHAT, {"model": M, "messages": USER, "max_completion_tokens": -3}, 400,
     "max_completion_tokens", "invalid_value"),
    ("n = 2", CHAT, {"model": M, "messages": USER, "n": 2}, 400, "n", "invalid_value"),
    ("seed not an integer", CHAT, {"model": M, "messages": USER, "seed": "abc"}, 400, "seed", "invalid_value"),
    ("stream not a boolean", CHAT, {"model": M, "messages": USER, "stream": "often"}, 400, "stream", "invalid_value"),
    ("reasoning_effort", CHAT, {"model": M, "messages": USER, "reasoning_effort": "extreme"}, 400,
     "reasoning_effort", "invalid_value"),
    ("five stop strings", CHAT, {"model": M, "messages": USER, "stop": list("abcde")}, 400, "stop", "invalid_value"),
    ("logprobs", CHAT, {"model": M, "messages": USER, "logprobs": True}, 400, "logprobs", "invalid_value"),
    ("logit_bias", CHAT, {"model": M, "messages": USER, "logit_bias": {"1000": -100}}, 400, "logit_bias",
     "invalid_value"),
    ("stop not a string", CHAT, {"model": M, "messages": USER, "stop": 5}, 400, "stop", "invalid_value"),
    ("hosted tool", CHAT, {"model": M, "messages": USER, "tools": [{"type": "web_search"}]}, 400, "tools[0].type",
     "unsupported_tool_type"),
    ("tool without function", CHAT, {"model": M, "messages": USER, "tools": [{"type": "function"}]}, 400,
     "tools[0].function", "missing_required_parameter"),
    ("bad tool name", CHAT, {"model": M, "messages": USER, "tools": [
        {"type": "function", "function": {"name": "get weather!"}}]}, 400, "tools[0].function.name", "invalid_value"),
    ("tool parameters not an object schema", CHAT, {"model": M, "messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400,
     "tools[0].function.parameters", "invalid_function_parameters"),
    ("tool parameters not JSON object", CHAT, {"model": M, "messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": [1]}}]}, 400, "tools[0].function.parameters",
     "invalid_value"),
    ("duplicate tools", CHAT, {"model": M, "messages": USER, "tools": [WEATHER, WEATHER]}, 400, "tools",
     "invalid_value"),
    ("tool_choice of an unknown function", CHAT, {"model": M, "messages": USER, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", "invalid_value"),
    ("tool_choice required without tools", CHAT, {"model": M, "messages": USER, "tool_choice": "required"}, 400,
     "tool_choice", "invalid_value"),
    ("tool result answering no call", CHAT, {"model": M, "messages": USER + [
        {"role": "tool", "tool_call_id": "call_x", "content": "{}"}]}, 400, "messages[1].tool_call_id",
     "invalid_value"),
    ("prompt over the context", CHAT, {"model": M, "messages": [{"role": "user", "content": "word " * 2100}]}, 400,
     "messages", "context_length_exceeded"),
    ("prompt + max_tokens over the context", CHAT, {"model": M, "messages": USER, "max_tokens": 2000}, 400,
     "messages", "context_length_exceeded"),
    ("responses: missing input", RESP, {"model": M}, 400, "input", "missing_required_parameter"),
    ("responses: unknown model", RESP, {"model": "o3", "input": "Hi"}, 400, "model", "model_not_found"),
    ("responses: unknown previous_response_id", RESP, {"model": M, "input": "Hi", "previous_response_id": "resp_x"},
     400, "previous_response_id", "previous_response_not_found"),
    ("responses: unsupported item", RESP, {"model": M, "input": [{"type": "computer_call"}]}, 400, "input[0].type",
     "invalid_value"),
    ("responses: output without call", RESP, {"model": M, "input": [
        {"type": "function_call_output", "call_id": "c1", "output": "{}"}]}, 400, "input[0].call_id", "invalid_value"),
    ("responses: reasoning effort", RESP, {"model": M, "input": "Hi", "reasoning": {"effort": "max"}}, 400,
     "reasoning.effort", "invalid_value"),
    ("responses: hosted tool", RESP, {"model": M, "input": "Hi", "tools": [{"type": "web_search_preview"}]}, 400,
     "tools[0].type", "unsupported_tool_type"),
    ("responses: bad tool schema", RESP, {"model": M, "input": "Hi", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "array"}}]}, 400, "tools[0].parameters",
     "invalid_function_parameters"),
    ("responses: max_output_tokens over the context", RESP, {"model": M, "input": "Hi", "max_output_tokens": 10**6},
     400, "input", "context_length_exceeded"),
    ("unknown route", "/v1/embeddings", {"model": M, "input": "Hi"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("case,path,body,status,param,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_cases(random_server, case, path, body, status, param, code):
    kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(random_server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert param is None or param in error["message"] or code in ("model_not_found", "previous_response_not_found")


def test_the_server_still_answers_after_every_error(random_server):
    for _, path, body, *_ in ERRORS:
        kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
        httpx.post(random_server.url + path, timeout=30, **kw)
    assert httpx.get(random_server.url + "/v1/chat/completions").status_code == 405  # wrong method: still JSON
    want = expected(random_model(), render([h.Message.user("Hi")]), 8)
    assert chat(random_server.client(), False, model=M, messages=USER, temperature=0, max_tokens=8)["content"] == \
        want["content"]


def test_api_key(random_server):
    with Server(create_app(random_server.engine, "tiny-random", api_key="sk-test"), random_server.engine) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(server.url + CHAT, json={"model": M, "messages": USER}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert [m.id for m in server.client("sk-test").models.list()] == ["tiny-random"]
        assert httpx.get(server.url + "/health").status_code == 200  # the page and health need no key
        assert httpx.get(server.url + "/").status_code == 200


# ---------------------------------------------------------------------------------------------- `gptoss serve`
def test_serve_command_runs_a_server(tmp_path):
    path = tmp_path / "tiny-ckpt"
    gptoss.save(random_model(), path, dtype=torch.float32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from gptoss.server import main; sys.exit(main())",
                             "--model", str(path), "--port", str(port), "--dtype", "float32", "--device", "cpu", "-q",
                             "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        got = chat(client, False, model="tiny-ckpt", messages=USER, temperature=0, max_tokens=6)
        assert got["content"] == expected(random_model(), render([h.Message.user("Hi")]), 6)["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "tiny-ckpt on http://127.0.0.1" in err and "chat.completions in=" in err and "out=6" in err


def test_responses_truncation_auto_drops_the_oldest_turns_of_a_long_chain(random_server):
    """`truncation: "auto"` (OpenAI's Responses parameter): a previous_response_id chain past the context drops its
    oldest whole turns, never the latest input, and leaves room for max_output_tokens; "disabled" (the default)
    refuses the same request with 400 context_length_exceeded; a latest input too long on its own is a 400 either
    way, never a 500."""
    client = random_server.client()
    limit = random_server.engine.max_context
    ask = dict(model="tiny-random", temperature=0, max_output_tokens=8)
    previous, refused = None, False
    for k in range(12):
        text = f"turn {k}: " + "word " * 300
        if previous is not None and not refused:
            try:
                client.responses.create(input=text, previous_response_id=previous, **ask)
            except openai.BadRequestError as e:
                assert e.code == "context_length_exceeded" and e.status_code == 400
                refused = True
        r = client.responses.create(input=text, previous_response_id=previous, truncation="auto", **ask)
        assert r.truncation == "auto" and r.usage.input_tokens + 8 <= limit
        turns = random_server.app.state.gptoss.responses[r.id].turns.messages
        users = [m.text for m in turns if m.role == "user"]
        assert users[-1] == text  # the latest input is always there, whole
        assert [int(u.split(":")[0].split()[1]) for u in users] == list(range(k + 1 - len(users), k + 1))
        previous = r.id
    assert refused and len(users) < 12  # the chain outgrew the context, and auto kept it going
    for truncation in ("auto", "disabled"):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(input="word " * 3000, previous_response_id=previous, truncation=truncation, **ask)
        assert e.value.code == "context_length_exceeded"
    # a history longer in characters than any prompt of the context could be: dropped before it is tokenized
    items = [{"role": "user", "content": f"old {i}: " + "word " * 20_000} for i in range(40)] + \
        [{"role": "user", "content": "hi"}]
    r = client.responses.create(input=items, truncation="auto", **ask)
    assert r.usage.input_tokens + 8 <= limit
    assert [m.text for m in random_server.app.state.gptoss.responses[r.id].turns.messages if m.role == "user"] == ["hi"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input="hi", truncation="sometimes", **ask)
    assert e.value.status_code == 400 and "truncation" in str(e.value)
