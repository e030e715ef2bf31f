"""Structured outputs through `gptoss serve`'s app, driven by the official `openai` client: its `.parse()`
helpers with pydantic models (Chat Completions and Responses, streamed and not), strict function tools,
json_object, the 400 for a schema the grammar library cannot compile, and "length" when max_tokens cuts an
answer. The model is random (its free output is noise): every answer parses because it is constrained."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from gptoss import harmony as h
from gptoss.engine import Engine
from gptoss.server import create_app
from test_server import Server, random_model

M = "tiny-random"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(pydantic.BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int
    sunny: bool


class Forecast(pydantic.BaseModel):
    days: list[Weather] = pydantic.Field(max_length=2)
    note: str = pydantic.Field(max_length=12)


class GetWeather(pydantic.BaseModel):
    city: Literal["Paris", "Rome"]
    unit: Literal["C", "F"]


class Convert(pydantic.BaseModel):
    value: float
    to: Literal["km", "mi"]


@pytest.fixture(scope="module")
def server():
    with Engine(random_model(), max_concurrency=8, max_queue=32) as engine:
        with Server(create_app(engine, M, reasoning_budget=8), engine) as s:
            yield s


@pytest.mark.parametrize("model", [Weather, Forecast])
def test_chat_parse_with_pydantic_models(server, model):
    client = server.client()
    for seed in range(2):
        r = client.chat.completions.parse(model=M, messages=USER, response_format=model, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "stop"
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, model) and parsed == model.model_validate_json(r.choices[0].message.content)
    # streamed: the SDK's stream helper rebuilds the message from the deltas and parses it
    with client.chat.completions.stream(model=M, messages=USER, response_format=model, seed=5,
                                        max_tokens=300) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 3 and isinstance(final.choices[0].message.parsed, model)
    assert "".join(deltas) == final.choices[0].message.content


def test_responses_parse_with_pydantic_models(server):
    client = server.client()
    r = client.responses.parse(model=M, input="Weather in Paris?", text_format=Weather, max_output_tokens=300,
                               temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, Weather)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"
    assert [i.type for i in r.output][-1] == "message"
    with client.responses.stream(model=M, input="Weather in Paris?", text_format=Forecast,
                                 max_output_tokens=300) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types[-1] == "response.completed" and isinstance(final.output_parsed, Forecast)


def test_the_schema_is_declared_to_the_model(server):
    """The developer message carries the format (# Response Formats), as the Harmony guide lays it out."""
    fmt = h.ResponseFormat("Weather", {"type": "object"}, "Today's weather")
    text = h.DeveloperContent("Be brief.", [], fmt).render_text()
    assert text == ('# Instructions\n\nBe brief.\n\n# Response Formats\n\n## Weather\n\n// Today\'s weather\n'
                    '{"type":"object"}')
    r = server.client().chat.completions.create(
        model=M, messages=USER, max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "Weather", "schema": Weather.model_json_schema(),
                                                                "strict": True}})
    assert r.usage.prompt_tokens > server.client().chat.completions.create(
        model=M, messages=USER, max_tokens=1, temperature=0).usage.prompt_tokens


def test_json_object(server):
    for stream in (False, True):
        kw = dict(model=M, messages=USER, response_format={"type": "json_object"}, max_tokens=80, seed=3)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in server.client().chat.completions.create(
                stream=True, **kw) if c.choices)
        else:
            text = server.client().chat.completions.create(**kw).choices[0].message.content
        assert isinstance(json.loads(text), dict)


def test_strict_tools_arguments_validate(server):
    client = server.client()
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Convert)]
    names = set()
    for seed in range(3):
        r = client.chat.completions.parse(model=M, messages=USER, tools=tools, tool_choice="required", seed=seed,
                                          max_tokens=200)
        [call] = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        model = {"GetWeather": GetWeather, "Convert": Convert}[call.function.name]
        assert isinstance(call.function.parsed_arguments, model)
        jsonschema.validate(json.loads(call.function.arguments), tools[model is Convert]["function"]["parameters"])
        names.add(call.function.name)
    # a named function, streamed: the arguments arrive as deltas and validate
    chunks = list(client.chat.completions.create(model=M, messages=USER, tools=tools, seed=1, max_tokens=200,
                                                 tool_choice={"type": "function", "function": {"name": "Convert"}},
                                                 stream=True))
    arguments = "".join(tc.function.arguments or "" for c in chunks if c.choices
                        for tc in c.choices[0].delta.tool_calls or [] if tc.function)
    Convert.model_validate_json(arguments)
    # Responses: a strict function tool, forced
    r = client.responses.create(model=M, input="Weather?", max_output_tokens=200, tool_choice="required", tools=[
        {"type": "function", "name": "GetWeather", "parameters": GetWeather.model_json_schema(), "strict": True}])
    [call] = [i for i in r.output if i.type == "function_call"]
    assert r.tools[0].strict is True
    GetWeather.model_validate_json(call.arguments)


@pytest.mark.parametrize("where, body, param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ("responses", {"text": {"format": {"type": "json_schema", "name": "x", "strict": True,
                                       "schema": {"type": "array", "uniqueItems": True}}}}, "text.format.schema"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]}, "tools[0]"),
])
def test_unsupported_keyword_is_a_400_that_names_it(server, where, body, param):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        if where == "chat":
            client.chat.completions.create(model=M, messages=USER, **body)
        else:
            client.responses.create(model=M, input="Hi", **body)
    error = e.value.body
    assert error["param"] == param and error["code"] == "invalid_json_schema"
    assert "unsupported JSON-Schema keyword 'uniqueItems'" in error["message"]
    # not strict: the keyword is ignored, the rest enforced
    if where == "chat" and "response_format" in body:
        body["response_format"]["json_schema"]["strict"] = False
        r = client.chat.completions.create(model=M, messages=USER, max_tokens=300, seed=0, **body)
        assert isinstance(json.loads(r.choices[0].message.content), list)


def test_missing_schema_name_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=M, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    assert e.value.body["param"] == "response_format.json_schema.name"


def test_max_tokens_cuts_the_answer_length(server):
    """Too few tokens to finish: the answer is closed (it parses) but cut, so finish_reason is "length" and the
    SDK's parse() raises, as it does against OpenAI."""
    client = server.client()
    r = client.chat.completions.create(model=M, messages=USER, max_tokens=40, seed=0, response_format={
        "type": "json_schema", "json_schema": {"name": "Forecast", "schema": Forecast.model_json_schema(),
                                               "strict": True}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=M, messages=USER, response_format=Forecast, max_tokens=40, seed=0)
    r = client.responses.create(model=M, input="Hi", max_output_tokens=40, temperature=0, text={"format": {
        "type": "json_schema", "name": "Forecast", "schema": Forecast.model_json_schema(), "strict": True}})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
