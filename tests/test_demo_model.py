"""The shipped demo model (src/gptoss/data/demo): it loads, its hashes are checked, `gptoss chat` with no
--model answers held-out arithmetic through the full CLI path (seeded, greedy), and a function-tool round
trip works through `gptoss serve`'s app driven by the official `openai` client.

These tests skip only when the model file is absent from the checkout (before the training recipe has
shipped one); a present but damaged model fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from gptoss import demo
from gptoss.checkpoint import CheckpointReader
from gptoss.demo.data import CALCULATOR_DEF
from gptoss.errors import CheckpointError
from gptoss.tools import evaluate
from gptoss.vocab import VocabSubsetModel

pytestmark = pytest.mark.skipif(not (demo.folder() / "model.safetensors").exists(),
                                reason="the demo model has not been shipped in this checkout "
                                       "(python -m gptoss.demo.recipe experiments/demo/train_demo.toml --ship)")

# Held-out questions: none of them is in the training set (data seed 0, checked in test_questions_are_held_out).
QUESTIONS = [("What is 4821 + 937?", "5758"), ("What is 7305 - 4868?", "2437"), ("What is 2947 * 6?", "17682")]


def test_questions_are_held_out():
    from gptoss.demo import data

    info = json.loads((demo.folder() / "training.json").read_text())
    keys = {data.question_key(ex) for ex in data.generate(info["data_seed"], info["data_n"])}
    kinds = {"+": "add", "-": "sub", "*": "mul"}
    for q, _ in QUESTIONS:
        assert f"{kinds[q.split()[3]]}|()|{q}" not in keys


def test_shipped_model_loads_hash_checked_and_small():
    path = demo.checkpoint_path()  # verifies both files' sha256
    assert set(demo.SHA256) == set(demo.FILES)
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    model = demo.load()
    assert isinstance(model, VocabSubsetModel) and model.config.vocab_size == 201_088
    c = model.model.config  # the real GPT-oss block, small
    assert c.layer_types[0] == "sliding_attention" and "full_attention" in c.layer_types
    assert c.num_attention_heads > c.num_key_value_heads and c.rope_scaling_factor > 1 and c.num_experts > c.experts_per_token
    assert model.model.block[0].mlp.mlp1_weight.blocks.dtype == torch.uint8  # experts in MXFP4
    assert bool((model.model.block[0].attn.sinks != 0).any())  # trained sinks
    ids = set(CheckpointReader(path).vocab_ids.tolist())
    assert {200002, 200003, 200005, 200006, 200007, 200008, 200012, 199999} <= ids and -1 in ids


def test_damaged_model_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "demo"
    shutil.copytree(demo.folder(), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(demo, "folder", lambda: copy)
    with pytest.raises(CheckpointError, match="sha256 .* does not match the demo model's recorded hash"):
        demo.checkpoint_path()


def test_chat_cli_answers_heldout_arithmetic():
    stdin = "\n/reset\n".join(q for q, _ in QUESTIONS) + "\n"
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", "--temperature", "0", "--seed", "0", "-q"],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.splitlines() if not line.startswith(">>> ") and "=" in line]
    assert len(answers) == 3, done.stdout
    for (q, want), line in zip(QUESTIONS, answers):
        assert line.rstrip().endswith(f"= {want}"), (q, done.stdout)


def test_server_tool_call_round_trip_with_the_openai_client():
    """The first three calculator questions of the held-out set (a fixed draw, not picked), through
    `gptoss serve`'s app with the official client: a valid call, the result sent back, the answer quoting it."""
    pytest.importorskip("openai")
    from gptoss.demo.eval import final_number, heldout, same_number
    from gptoss.engine import Engine
    from gptoss.server import create_app
    from test_server import Server

    info = json.loads((demo.folder() / "training.json").read_text())
    questions = [ex for ex in heldout(3, train_seed=info["data_seed"], train_n=info["data_n"]) if ex.kind == "calc"]
    tools = [{"type": "function", "function": CALCULATOR_DEF}]
    with Engine(demo.load(), max_concurrency=2) as engine, \
            Server(create_app(engine, demo.NAME), engine) as server:
        client = server.client()
        assert [m.id for m in client.models.list()] == [demo.NAME]
        for ex in questions:
            messages = [{"role": "user", "content": ex.question}]
            r = client.chat.completions.create(model=demo.NAME, messages=messages, tools=tools, temperature=0, seed=0)
            assert r.choices[0].finish_reason == "tool_calls", (ex.question, r)
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "calculator"
            expression = json.loads(call.function.arguments)["expression"]
            assert evaluate(expression) == evaluate(ex.call["arguments"]["expression"]), ex.question
            messages += [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id,
                          "content": json.dumps({"result": evaluate(expression)})}]
            r = client.chat.completions.create(model=demo.NAME, messages=messages, tools=tools, temperature=0, seed=0)
            assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
            assert same_number(final_number(r.choices[0].message.content), ex.answer), (ex.question, r)


def test_eval_demo_against_the_real_server_matches_the_local_engine(tmp_path):
    """`gptoss eval demo --base-url` (a subprocess, the openai client) against `gptoss serve`'s app on
    loopback gives, item by item, what the in-process engine gives: same final text, tool calls, score."""
    from gptoss.demo import eval as E
    from gptoss.engine import Engine
    from gptoss.server import create_app, serve_in_thread

    model = demo.load()
    local = E.evaluate(model, 2, progress=False, concurrency=4)
    with Engine(model, max_concurrency=4) as engine, serve_in_thread(create_app(engine, demo.NAME)) as url:
        done = subprocess.run([sys.executable, "-m", "gptoss", "eval", "demo", "--base-url", url + "/v1", "--n", "2",
                               "--out", str(tmp_path / "remote.jsonl"), "-q"],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| arithmetic, final answer exact | 6 |" in done.stdout and demo.NAME in done.stdout
    remote = [json.loads(line) for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert len(remote) == len(local) == 14
    for a, b in zip(local, remote):
        assert (b["kind"], b["question"]) == (a.kind, a.question)
        assert (b["final"], b["calls"], b["correct"]) == (a.final, a.calls, a.correct), a.question
    assert sum(r.correct for r in local) >= 10  # a trained model, not an empty comparison
