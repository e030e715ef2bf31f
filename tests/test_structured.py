"""Constrained decoding (constrain.py) in the engine and in `generate`: a random tiny model, whose free output is
noise, answers under 22 JSON schemas, greedy and sampled over several seeds, batched with unconstrained rows;
every answer is the final message of a well-formed Harmony completion and validates against its schema with
`jsonschema` (the reference validator). The unconstrained rows of the same batch equal their solo runs."""

from __future__ import annotations

import functools
import json
import queue

import jsonschema
import numpy as np
import pytest
import torch

import gptoss
from gptoss import harmony as h
from gptoss import synthetic
from gptoss.config import preset
from gptoss.constrain import Constraint, ConstraintError, Guide, ToolSpec, apply_bitmask, unpack_bitmask
from gptoss.engine import Engine, Finish
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.tokenizer import get_tokenizer

TOK = get_tokenizer()
STOPS = tuple(sorted(h.stop_tokens_for_assistant_actions(TOK) | {TOK.endoftext}))
CONFIG = preset("tiny").replace(vocab_size=201_088)

OBJ = {"type": "object", "additionalProperties": False}
SCHEMAS = [
    {**OBJ, "properties": {"answer": {"type": "integer"}}, "required": ["answer"]},
    {**OBJ, "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 130}},
     "required": ["name", "age"]},
    {**OBJ, "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {**OBJ, "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {**OBJ, "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
    {**OBJ, "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                    "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {**OBJ, "properties": {"point": {**OBJ, "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                            "lon": {"type": "number", "minimum": -180,
                                                                    "maximum": 180}},
                                     "required": ["lat", "lon"]}}, "required": ["point"]},
    {**OBJ, "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}, "required": ["code"]},
    {**OBJ, "properties": {"id": {"type": "integer"}, "note": {"type": "string"}}, "required": ["id"]},  # optional
    {**OBJ, "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10},
                                      "minItems": 2, "maxItems": 4}}, "required": ["scores"]},
    {**OBJ, "properties": {"status": {"type": "string", "enum": ["open", "closed"]},
                           "count": {"type": "integer", "exclusiveMinimum": 0}}, "required": ["status", "count"]},
    {**OBJ, "properties": {"user": {**OBJ, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "address": {**OBJ, "properties": {"city": {"type": "string", "maxLength": 10},
                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}}, "required": ["name", "address"]}}, "required": ["user"]},
    {**OBJ, "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        **OBJ, "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2,6}$"}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {**OBJ, "properties": {"value": {"type": ["integer", "null"]}}, "required": ["value"]},
    {**OBJ, "properties": {"kind": {"const": "event"}, "day": {"type": "string", "format": "date"}},
     "required": ["kind", "day"]},
    {**OBJ, "properties": {"choice": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}},
     "required": ["choice"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
    {**OBJ, "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["ratio"]},
    {**OBJ, "properties": {"a": {"type": "string", "maxLength": 6}, "b": {"type": "string", "maxLength": 6},
                           "c": {"type": "boolean"}}, "required": ["a", "c"]},
    {**OBJ, "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}}, "required": ["matrix"]},
    {"$defs": {"node": {**OBJ, "properties": {"label": {"type": "string", "maxLength": 6}}, "required": ["label"]}},
     **OBJ, "properties": {"root": {"$ref": "#/$defs/node"}, "leaf": {"$ref": "#/$defs/node"}},
     "required": ["root"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20}}, "required": ["title"]},
]
assert len(SCHEMAS) >= 20


@functools.lru_cache(maxsize=None)
def random_model() -> gptoss.Transformer:
    model = gptoss.Transformer(CONFIG, dtype=torch.float32)
    model.load_state_dict(dict(synthetic.random_tensors(CONFIG, seed=1, dtype=torch.float32)))
    return model


def prompt(text: str) -> list[int]:
    system = h.Message.system(h.SystemContent(reasoning_effort="low"))
    return h.render_conversation_for_completion([system, h.Message.user(text)], "assistant", TOK)


def final_json(tokens: list[int]):
    """The final message's content as JSON: the completion must be well-formed Harmony with one final answer."""
    messages = h.parse_messages(tokens)
    finals = [m for m in messages if m.channel == "final"]
    assert len(finals) == 1 and messages[-1] is finals[0], [(m.channel, m.text[:40]) for m in messages]
    assert all(m.channel == "analysis" for m in messages[:-1])
    return json.loads(finals[0].text)


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], Finish]]:
    """Submit every job at once (so they share decode steps), then collect each one's tokens and Finish."""
    queues = [queue.SimpleQueue() for _ in jobs]
    for q, (p, params) in zip(queues, jobs):
        engine.submit(p, params, q.put)
    out = []
    for q in queues:
        tokens = []
        while not isinstance(item := q.get(timeout=300), Finish):
            tokens.append(item)
        out.append((tokens, item))
    return out


def test_every_answer_validates_batched_with_unconstrained_rows():
    """22 schemas × (greedy + 2 sampling seeds), and 6 unconstrained rows, all in one engine (32 rows)."""
    model = random_model()
    jobs, kinds = [], []
    for i, schema in enumerate(SCHEMAS):
        constraint = Constraint.json_schema(schema, reasoning_budget=4, close_reserve=36)
        for seed in (None, 11 + i, 101 + i):
            # top_k on one seed: sampling's filters run after the mask (top_p sorts 201,088 logits: slow here)
            params = SamplingParams(temperature=0 if seed is None else 0.9, top_k=40 if seed and seed > 100 else None,
                                    seed=seed, max_tokens=64, stop_tokens=STOPS, constraint=constraint)
            jobs.append((prompt(f"Question {i}?"), params))
            kinds.append(schema)
    free = [(prompt(f"Free {j}"), SamplingParams(temperature=0, max_tokens=24, stop_tokens=STOPS)) for j in range(6)]
    with Engine(model, max_concurrency=32, max_queue=128, prefix_cache_bytes=0) as engine:
        results = run_all(engine, jobs + free)
        assert engine.max_batch == 32  # constrained and unconstrained rows decoded together
    reasons = []
    for schema, (tokens, finish) in zip(kinds, results):
        assert finish.reason in ("stop", "length"), finish.error
        assert tokens[-1] == TOK.return_
        jsonschema.validate(final_json(tokens), schema)
        reasons.append(finish.reason)
    assert "stop" in reasons  # some closed on their own, before the reserve
    for (p, params), (tokens, _) in zip(free, results[len(jobs):]):  # the neighbours are untouched
        assert tokens == generate_tokens(model, p, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_follows_the_constraint_and_its_reasoning_budget(seed):
    """`generate` with constraint=: the analysis is ended after the budget, the answer validates; with no budget
    the noise model reasons until the reserve before max_tokens, then the answer is closed ("length")."""
    schema = SCHEMAS[11]
    model = random_model()
    budget = 5
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=100, stop_tokens=STOPS,
                            constraint=Constraint.json_schema(schema, reasoning_budget=budget))
    tokens = generate_tokens(model, prompt("Who?"), params)
    jsonschema.validate(final_json(tokens), schema)
    messages = h.parse_messages(tokens)
    if messages[0].channel == "analysis":
        analysis_end = tokens.index(TOK.end)
        assert analysis_end - tokens.index(TOK.message) - 1 == budget
    unbounded = SamplingParams(temperature=1.0, seed=seed, max_tokens=100, stop_tokens=STOPS,
                               constraint=Constraint.json_schema(schema))
    with Engine(model, max_concurrency=1, prefix_cache_bytes=0) as engine:
        tokens, finish = engine.generate(prompt("Who?"), unbounded)
    jsonschema.validate(final_json(tokens), schema)
    assert len(tokens) <= 100 and finish.reason in ("stop", "length")


def test_raw_completion_constraint():
    """Without Harmony (gptoss generate): the whole completion is the JSON, then <|endoftext|>."""
    schema = SCHEMAS[6]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=60, stop_tokens=(TOK.endoftext,),
                            constraint=Constraint.json_schema(schema, harmony=False))
    tokens = generate_tokens(random_model(), TOK.encode("The point is "), params)
    assert tokens[-1] == TOK.endoftext
    jsonschema.validate(json.loads(TOK.decode(tokens[:-1])), schema)


def test_max_tokens_too_small_to_close_is_length():
    """With no reserve left (close_reserve=0) the answer stops where max_tokens falls: "length", cut JSON."""
    params = SamplingParams(temperature=0, max_tokens=12, stop_tokens=STOPS,
                            constraint=Constraint.json_schema(SCHEMAS[1], close_reserve=0))
    with Engine(random_model(), max_concurrency=1, prefix_cache_bytes=0) as engine:
        tokens, finish = engine.generate(prompt("Name?"), params)
    assert finish.reason == "length" and len(tokens) == 12


def test_forced_calls_keep_to_declared_names_and_strict_arguments():
    weather = {**OBJ, "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    tools = [ToolSpec("get_weather", weather, strict=True), ToolSpec("calculator", None, strict=False)]
    forced = TOK.encode_ordinary(" to=functions")
    model = random_model()
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=60, stop_tokens=STOPS,
                                constraint=Constraint.harmony(tools=tools, forced=" to=functions"))
        tokens = generate_tokens(model, prompt("Weather?") + forced, params)
        [call] = h.parse_messages(forced + tokens)
        assert call.recipient in ("functions.get_weather", "functions.calculator") and tokens[-1] == TOK.call
        if call.recipient == "functions.get_weather":
            jsonschema.validate(json.loads(call.text), weather)
    # auto: the model may answer or call; a strict call's arguments validate
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=80, stop_tokens=STOPS,
                            constraint=Constraint.harmony(tools=tools[:1], reasoning_budget=4))
    for seed in range(4):
        params.seed = seed
        messages = h.parse_messages(generate_tokens(model, prompt("Weather?"), params))
        last = messages[-1]
        assert last.channel == "final" or last.recipient == "functions.get_weather"
        if last.recipient:
            jsonschema.validate(json.loads(last.text), weather)


def test_unsupported_keywords_are_named():
    with pytest.raises(ConstraintError) as e:
        Constraint.json_schema({"type": "array", "uniqueItems": True}).check()
    assert e.value.keyword == "uniqueItems" and "uniqueItems" in str(e.value)
    with pytest.raises(ConstraintError) as e:
        Constraint.json_schema({"type": "string", "pattern": "(?=a)b"}).check()
    assert e.value.keyword == "pattern"
    Constraint.json_schema({"type": "array", "uniqueItems": True}, strict=False).check()  # lenient: ignored


def test_bitmask_unpacking_matches_the_library():
    """unpack_bitmask reads llguidance's bits as the library's own torch helper does."""
    import llguidance.numpy as lln

    g = Guide(Constraint.json_schema(SCHEMAS[3], harmony=False), 50)
    g.matcher.unsafe_compute_mask_ptr(g.bits.data_ptr(), g.bits.numel() * 4)
    ours = apply_bitmask(torch.zeros(CONFIG.vocab_size), g.bits)
    theirs = np.zeros((1, CONFIG.vocab_size), dtype=np.float32)
    lln.apply_token_bitmask_inplace(theirs, g.bits[None].numpy().copy())
    assert torch.equal(ours, torch.from_numpy(theirs[0]))
    allowed = unpack_bitmask(g.bits, CONFIG.vocab_size).nonzero().flatten().tolist()
    texts = [TOK.decode([t]) for t in allowed]  # tokens that begin the object, nothing else
    assert "{" in texts and all(t.startswith("{") for t in texts) and '{"' in texts and "[" not in texts
