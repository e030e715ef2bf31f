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
import repo_scripts
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
    keys = {data.question_key(ex) for ex in data.generate(info["data_seed"], info["data_n"],
                                                          version=info.get("data_version", 1))}
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


@pytest.fixture(scope="module")
def local_and_remote(tmp_path_factory):
    """`gptoss eval demo --base-url` (a subprocess, the openai client) against `gptoss serve`'s app on loopback,
    and the in-process engine, on the same items of both families."""
    from gptoss.demo import eval as E
    from gptoss.engine import Engine
    from gptoss.server import create_app, serve_in_thread

    out = tmp_path_factory.mktemp("remote") / "remote.jsonl"
    model = demo.load()
    local = E.evaluate(model, 2, progress=False, concurrency=4, heldout_n=2)
    with Engine(model, max_concurrency=4) as engine, serve_in_thread(create_app(engine, demo.NAME)) as url:
        done = subprocess.run([sys.executable, "-m", "gptoss", "eval", "demo", "--base-url", url + "/v1", "--n", "2",
                               "--heldout-n", "2", "--out", str(out), "-q"],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    remote = [json.loads(line) for line in out.read_text().splitlines()]
    return local, remote, done.stdout


def mismatches(local, remote, family: str) -> list:
    assert len(remote) == len(local) == 28
    out = []
    for a, b in zip(local, remote):
        assert (b["family"], b["kind"], b["question"]) == (a.family, a.kind, a.question)
        if a.family == family and (b["final"], b["calls"], b["correct"], b["repeated"]) != \
                (a.final, a.calls, a.correct, a.repeated):
            out.append((a.question, a.final, b["final"]))
    return out


def test_eval_demo_against_the_real_server_matches_the_local_engine(local_and_remote):
    """Item by item the same final text, tool calls, score, on the template family."""
    local, remote, stdout = local_and_remote
    assert "| arithmetic, final answer exact | 6 |" in stdout and demo.NAME in stdout
    assert stdout.index("Held-out phrasing") < stdout.index("Template family")
    assert not mismatches(local, remote, "template")
    assert sum(r.correct for r in local if r.family == "template") >= 10  # a trained model, not an empty comparison


def test_eval_demo_against_the_real_server_matches_the_local_engine_on_heldout_phrasing(local_and_remote):
    """The same on held-out phrasing, where the model writes malformed Harmony: a message on an undeclared
    channel (`<|channel|>Too big.<|end|>`) is shown by neither, a call with broken JSON is repaired alike, and
    a commentary message to no one (a preamble) is shown by both."""
    local, remote, _ = local_and_remote
    assert not mismatches(local, remote, "heldout")


def test_chat_cli_agrees_with_the_engine_on_heldout_phrasing():
    """Held-out-phrasing questions of five kinds piped through `gptoss chat --calculator` print exactly the final
    answers and tool calls of the eval's engine sessions with the calculator declared, item by item."""
    import dataclasses

    from gptoss.demo import eval as E
    from gptoss.engine import Engine

    info = E.training_info(None)
    items = E.heldout(1, train_seed=info["data_seed"], train_n=info["data_n"], family="heldout",
                      version=info.get("data_version", 1))
    examples = [dataclasses.replace(ex, tools=("calculator",)) for ex in items
                if ex.kind not in ("calc", "convert", "json", "followup", "followup_none")]  # single questions
    assert [ex.kind for ex in examples] == ["add", "sub", "mul", "general", "too_big"]
    with Engine(demo.load(), max_concurrency=1) as engine:
        engine.start()
        local = [E.run_one(ex, engine.complete, "medium", 512) for ex in examples]
    stdin = "\n/reset\n".join(ex.question for ex in examples) + "\n"
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", "--temperature", "0", "-q", "--calculator"],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    turns = [t for t in done.stdout.split(">>> ")[1:] if not t.startswith("/reset")]
    assert len(turns) == len(examples), done.stdout
    for ex, r, turn in zip(examples, local, turns):
        question, _, shown = turn.partition("\n")
        assert question == ex.question
        calls = [line for line in shown.splitlines() if line.startswith("[tool call] ")]
        final = "\n".join(line for line in shown.splitlines() if not line.startswith("[tool ")).strip()
        assert final == r.final.strip(), (ex.question, shown, r.final)
        assert calls == [f"[tool call] {c['name']}({c['arguments']})" for c in r.calls], ex.question


def test_chat_cli_answers_a_follow_up_on_the_previous_answer():
    """The chat keeps the conversation: "Now add 5 to that" works on the answer before it (the model before
    data version 10 answered `5 + 5 = 10`), and /reset forgets it (then there is nothing to refer to)."""
    stdin = "What is 7305 - 4868?\nNow add 5 to that\n/reset\nNow add 5 to that\n"
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", "--temperature", "0", "-q"],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    turns = [t for t in done.stdout.split(">>> ")[1:] if not t.startswith("/reset")]
    answers = [t.partition("\n")[2].strip() for t in turns]
    assert answers[0].endswith("= 2437") and answers[1].endswith("= 2442"), answers
    assert answers[2].startswith("I don't know"), answers


STOP_PROBES = ["What is 2+2?", "2+2", "What is 12 + 7?", "What is 1234 - 987?"]
KNOWN_UNCLEAN: set = set()  # the shipped model's unclean stops among the probes (run 10 had one; see the test)
BOTH_TOOLS = ("calculator", "convert_units")


def test_chat_and_server_stop_after_one_final_answer_with_tools_declared():
    """The issue's report: with a tool declared, "What is 2+2?" came back as `2 + 2 = 42 + 2 = 4`. Through a
    ChatSession (what `gptoss chat` runs) and through `gptoss serve` with the openai client, every probe gets
    one final answer, never two joined, whatever the model writes after it."""
    pytest.importorskip("openai")
    from gptoss.chat import ChatSession
    from gptoss.demo.eval import repeated
    from gptoss.demo.tools import DEMO_TOOLS
    from gptoss.engine import Engine
    from gptoss.generate import SamplingParams
    from gptoss.server import create_app, serve_in_thread

    import openai

    specs = [{"type": "function", "function": {"name": DEMO_TOOLS[n].name, "description": DEMO_TOOLS[n].description,
                                               "parameters": DEMO_TOOLS[n].parameters}} for n in BOTH_TOOLS]
    with Engine(demo.load(), max_concurrency=2) as engine, serve_in_thread(create_app(engine, demo.NAME)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        for q in STOP_PROBES:
            session = ChatSession(engine.complete, SamplingParams(temperature=0, max_tokens=256),
                                  tools=[DEMO_TOOLS[n] for n in BOTH_TOOLS], max_tool_rounds=2)
            final = "".join(e.text for e in session.send(q) if e.kind == "final")
            assert final and not repeated(final), (q, final)
            messages = [{"role": "user", "content": q}]
            for _ in range(3):
                r = client.chat.completions.create(model=demo.NAME, messages=messages, tools=specs, temperature=0,
                                                   max_tokens=256)
                m = r.choices[0].message
                if not m.tool_calls:
                    break
                messages.append(m.model_dump(exclude_none=True))
                messages += [{"role": "tool", "tool_call_id": c.id,
                              "content": json.dumps({"result": evaluate(json.loads(c.function.arguments)["expression"])})}
                             for c in m.tool_calls]
            assert r.choices[0].finish_reason == "stop" and m.content and not repeated(m.content), (q, m.content)


def test_the_model_itself_ends_its_final_answer_with_return():
    """Raw greedy decoding, no stop rule but the Harmony stops: the first final message is followed by
    <|return|>, with no tools, the calculator, or both tools declared (all but KNOWN_UNCLEAN, exactly)."""
    from gptoss import harmony
    from gptoss.chat import ChatSession
    from gptoss.demo.tools import DEMO_TOOLS
    from gptoss.engine import Engine
    from gptoss.generate import SamplingParams
    from gptoss.tokenizer import get_tokenizer

    tok = get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=300, stop_tokens=(tok.return_, tok.call, tok.endoftext))
    final_header = tok.encode("<|channel|>final<|message|>", allowed_special="all")
    bad = []
    with Engine(demo.load(), max_concurrency=2) as engine:
        for tools in ((), ("calculator",), BOTH_TOOLS):
            for q in STOP_PROBES:
                session = ChatSession(engine.complete, SamplingParams(), tools=[DEMO_TOOLS[n] for n in tools])
                session.messages.append(harmony.Message(role="user", content=q))
                out = list(engine.complete(session.prompt(), params))
                at = next((i for i in range(len(out)) if out[i:i + len(final_header)] == final_header), None)
                if out[-1] == tok.call:
                    continue  # a tool call: the answer comes after the result (the chat test covers it)
                ends = [t for t in out[at:] if t in (tok.end, tok.return_)] if at is not None else []
                if not ends or ends[0] != tok.return_:
                    bad.append((tools, q, tok.decode(out)))
    # Run 10 answered a bare "2+2" with no tools in the final channel, ended it with <|end|> and answered again
    # (trained on earlier turns' answers, which end with <|end|> in the history); run 11, trained on the
    # current turn only, stops cleanly on every probe.
    assert {(tools, q) for tools, q, _ in bad} == KNOWN_UNCLEAN, bad


def test_readme_sessions_are_what_the_shipped_model_says(tmp_path):
    """README.md's `gptoss chat` sessions, piped into the chat line by line, print exactly what the README shows;
    a changed answer is caught and `--write` records the chat's own words again."""
    rt = repo_scripts.load("experiments/demo/readme_transcript.py")
    found = rt.sessions(rt.README.read_text())
    assert [s.args for s in found] == [[], ["--calculator"]]
    assert all(len(s.inputs) >= 2 for s in found)
    assert rt.main([]) == 0
    readme = tmp_path / "README.md"  # the first session alone, its first answer changed
    true = "```text\n$ gptoss chat\n" + found[0].recorded + "\n```\n"
    first = found[0].recorded.splitlines()[1]
    readme.write_text(true.replace(first, first[:-1] + ("8" if first.endswith("9") else "9"), 1))
    assert rt.main(["--readme", str(readme)]) == 1
    assert rt.main(["--readme", str(readme), "--write"]) == 0
    assert readme.read_text() == true
