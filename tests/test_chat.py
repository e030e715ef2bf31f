"""Chat: the session's tool loop on a scripted engine, and `gptoss chat` driven through piped stdin on a real
(tiny, trained-to-script) GPT-oss checkpoint that answers with a calculator tool call."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import gptoss
from gptoss import harmony as h
from gptoss import synthetic
from gptoss.chat import ChatSession
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.generate import SamplingParams
from gptoss.tokenizer import get_tokenizer
from gptoss.tools import BUILTIN_TOOLS, evaluate, load_tools, run_tool, ToolError

TOK = get_tokenizer()
SCRIPT = [  # (user turn, completions of the model for that turn: one per model call)
    ("What is 12*34?", ['<|channel|>analysis<|message|>Use the calculator.<|end|>'
                        '<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>'  # a preamble
                        '<|start|>assistant<|channel|>commentary to=functions.calculator <|constrain|>json'
                        '<|message|>{"expression": "12*34"}<|call|>',
                        '<|channel|>final<|message|>12 × 34 = 408.<|return|>']),
    ("Thanks!", ["<|channel|>final<|message|>You're welcome.<|return|>"]),
]


class Scripted:
    """An engine that replays fixed completions and records the prompts it was given."""

    def __init__(self, completions: list[str]):
        self.completions = [TOK.encode(c, allowed_special="all") for c in completions]
        self.prompts: list[list[int]] = []

    def __call__(self, prompt, params):
        self.prompts.append(list(prompt))
        completion = self.completions[len(self.prompts) - 1]
        for t in completion[:params.max_tokens]:
            yield t
            if t in params.stop_tokens:
                return


def scripted_session():
    engine = Scripted([c for _, cs in SCRIPT for c in cs])
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=100), TOK, "low",
                          tools=[BUILTIN_TOOLS["calculator"]])
    events = [[(e.kind, e.text, e.name) for e in session.send(user)] for user, _ in SCRIPT]
    return engine, session, events


def test_session_runs_the_tool_and_feeds_back_its_result():
    engine, session, events = scripted_session()
    first = events[0]
    assert ("tool_call", '{"expression": "12*34"}', "calculator") in first
    assert ("tool_result", '{"result": 408}', "calculator") in first
    assert "".join(t for k, t, _ in first if k == "final") == "12 × 34 = 408."
    assert "".join(t for k, t, _ in first if k == "commentary") == "Let me check."  # the preamble, before the call
    assert [k for k, _, _ in first if k in ("tool_call", "tool_result", "done")] == ["tool_call", "tool_result", "done"]
    # the second model call sees the call and the tool's result, rendered as Harmony prescribes
    second_prompt = TOK.decode(engine.prompts[1])
    assert second_prompt.endswith('<|start|>functions.calculator to=assistant<|channel|>commentary<|message|>'
                                  '{"result": 408}<|end|><|start|>assistant')
    assert "Use the calculator." in second_prompt  # this turn's reasoning is still visible mid-turn
    # the next turn: previous reasoning dropped, the answer kept, the tool declared in the developer message
    third_prompt = TOK.decode(engine.prompts[2])
    assert "Use the calculator." not in third_prompt and "12 × 34 = 408." in third_prompt
    assert "type calculator = (_: {" in third_prompt and "Reasoning: low" in third_prompt
    assert "Let me check." in third_prompt  # a preamble is not reasoning: it stays
    assert [m.role for m in session.messages] == ["user", "assistant", "assistant", "tool", "assistant", "user",
                                                  "assistant"]


@pytest.mark.parametrize("completion, max_tokens, notice", [
    ("<|channel|>analysis<|message|>1,326 - 1,326<|end|>", 100, "ended its turn without a final message"),
    ("<|channel|>analysis<|message|>" + "1 2 3 4 5 6 7 8 9 " * 20 + "<|end|>", 30, "limit of 30 tokens"),
])
def test_a_turn_without_a_final_answer_says_so(completion, max_tokens, notice):
    """A turn that ends in the analysis channel (the demo model does that now and then for a follow-up with
    nothing to follow) or runs out of tokens there prints a notice, not an empty line; a turn with an answer
    prints none."""
    session = ChatSession(Scripted([completion, "<|channel|>final<|message|>4<|return|>"]),
                          SamplingParams(temperature=0, max_tokens=max_tokens), TOK, "low")
    events = [(e.kind, e.text) for e in session.send("what is 1,326 minus that?")]
    assert not [k for k, _ in events if k == "final"] and events[-1][0] == "done" and notice in events[-1][1]
    assert [(e.kind, e.text) for e in session.send("2+2?")][-2:] == [("final", "4"), ("done", "")]


def test_unknown_tool_and_bad_arguments_reach_the_model_as_errors():
    assert json.loads(run_tool(BUILTIN_TOOLS["calculator"], '{"expression": "1/0"}'))["error"].startswith("cannot")
    assert "not valid JSON" in json.loads(run_tool(BUILTIN_TOOLS["calculator"], '{"expression": '))["error"]
    engine = Scripted(['<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}<|call|>',
                       "<|channel|>final<|message|>Sorry.<|return|>"])
    session = ChatSession(engine, SamplingParams(temperature=0), TOK, tools=[BUILTIN_TOOLS["calculator"]])
    events = list(session.send("hi"))
    assert any(e.kind == "tool_result" and "no tool named nope; available: calculator" in e.text for e in events)


def test_calculator_is_arithmetic_only():
    assert evaluate("1234 * 5678") == 7006652
    assert evaluate("2^10 + sqrt(16)") == 1028.0
    for bad in ["__import__('os')", "open('x')", "a.b", "9**9**9", "[1, 2]"]:
        with pytest.raises(ToolError):
            evaluate(bad)


def test_tools_file_validation(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "string"}}}]))
    with pytest.raises(ToolError, match=r"tools.json\[0\].parameters: must be a JSON schema of type object"):
        load_tools(f)
    f.write_text(json.dumps({"tools": [{"name": "a b"}]}))
    with pytest.raises(ToolError, match=r"\[0\].name"):
        load_tools(f)
    f.write_text(json.dumps([{"name": "echo", "description": "Echo.", "command": [sys.executable, "-c",
                              "import sys, json; print(json.load(sys.stdin)['x'])"]}]))
    (tool,) = load_tools(f)
    assert run_tool(tool, '{"x": "hello"}') == "hello"


# ---------------------------------------------------------------- the CLI, on a real checkpoint
def train_to_script(prompts: list[list[int]], completions: list[list[int]], steps: int = 300):
    """A tiny GPT-oss (real architecture, MXFP4 experts, full o200k vocabulary) fitted to answer each prompt
    with its scripted completion under greedy decoding: a real model that plays the test's part."""
    config = preset("tiny").replace(vocab_size=201_088, hidden_size=64, max_position_embeddings=4096)
    model = gptoss.Transformer(config, dtype=torch.float32)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=0, dtype=torch.float32)), strict=True)
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters()], lr=1e-2)
    seqs = [torch.tensor(p + c) for p, c in zip(prompts, completions)]
    for step in range(steps):
        loss = 0
        for seq, p in zip(seqs, prompts):
            logits = model.unembedding(model.hidden_states(seq[None, :-1])[0, len(p) - 1:])
            loss = loss + torch.nn.functional.cross_entropy(logits, seq[len(p):])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            with torch.no_grad():
                ok = all((model(s[None, :-1])[0, len(p) - 1:].argmax(-1) == s[len(p):]).all()
                         for s, p in zip(seqs, prompts))
            if ok:
                break
    assert ok, f"the script was not learned (loss {loss.item():.3f})"
    print(f"script learned in {step} steps")
    return model


@pytest.fixture(scope="module")
def scripted_checkpoint(tmp_path_factory):
    engine, _, _ = scripted_session()
    model = train_to_script(engine.prompts, engine.completions)
    path = tmp_path_factory.mktemp("chat") / "scripted"
    gptoss.save(model, path, dtype=torch.float32)
    return path


def test_chat_cli_multi_turn_with_tool_call(scripted_checkpoint):
    stdin = "What is 12*34?\n/reasoning\nThanks!\n/exit\n"
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", "-m", str(scripted_checkpoint), "--calculator",
                           "--reasoning-effort", "low", "--temperature", "0", "--dtype", "float32", "-q"],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        ">>> What is 12*34?\n"
        "Let me check.\n"  # a preamble is for the user: shown without /reasoning, as the server returns it
        '[tool call] calculator({"expression": "12*34"})\n'
        '[tool result] {"result": 408}\n'
        "12 × 34 = 408.\n"
        ">>> /reasoning\n"
        "(reasoning shown)\n"
        ">>> Thanks!\n"
        "You're welcome.\n"
        ">>> /exit\n"
    )


def test_chat_cli_goes_on_after_a_message_too_long_for_the_context(scripted_checkpoint):
    """A message longer than the model's context (4096 here) is answered with an error that gives the sizes, and
    the chat goes on with the next question, from the conversation as it was (it used to exit)."""
    stdin = "word " * 5000 + "\nWhat is 12*34?\n"
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", "-m", str(scripted_checkpoint), "--calculator",
                           "--reasoning-effort", "low", "--temperature", "0", "--dtype", "float32", "-q"],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert re.fullmatch(r"error: the message does not fit: with it the conversation takes 5\d{3} tokens, and the "
                        r"model's context is 4096; /reset or write a shorter message", out[1]), out[1]
    assert out[2:] == [">>> What is 12*34?", "Let me check.", '[tool call] calculator({"expression": "12*34"})',
                       '[tool result] {"result": 408}', "12 × 34 = 408."]


def test_a_broken_call_is_repaired_as_the_server_returns_it():
    """A function call whose JSON the model left unclosed: the chat runs the tool on the arguments the server
    would return (gptoss.harmony.call_arguments: the object closed) and keeps those in the conversation, so a
    chat and an API client continue from the same call."""
    from gptoss.server.generation import Piece

    broken = '{"expression": "2 + 2"'
    replies = [f"<|channel|>commentary to=functions.calculator <|constrain|>json<|message|>{broken}<|call|>",
               "<|channel|>final<|message|>2 + 2 = 4<|return|>"]
    prompts = []

    def complete(prompt, params):
        prompts.append(list(prompt))
        return iter(TOK.encode(replies[len(prompts) - 1], allowed_special="all"))

    session = ChatSession(complete, SamplingParams(temperature=0, max_tokens=64), tools=[BUILTIN_TOOLS["calculator"]])
    events = list(session.send("What is 2 + 2?"))
    repaired = Piece("tool_call", "calculator", text=broken).arguments
    assert json.loads(repaired) == {"expression": "2 + 2"}
    assert [(e.kind, e.text) for e in events if e.kind in ("tool_call", "tool_result")] == [
        ("tool_call", repaired), ("tool_result", run_tool(BUILTIN_TOOLS["calculator"], repaired))]
    assert json.loads(events[1].text) == {"result": 4}
    assert TOK.decode(prompts[1]).count(f"<|message|>{repaired}<|call|>") == 1  # the second prompt holds it


def test_chat_and_server_show_the_same_preamble(scripted_checkpoint):
    """One rule for what the user sees: the server returns the preamble (commentary to no one) as the message's
    content beside its tool call, and `gptoss chat` prints that same text (test above)."""
    openai = pytest.importorskip("openai")
    from gptoss.checkpoint import load
    from gptoss.engine import Engine
    from gptoss.server import create_app, serve_in_thread

    model = load(scripted_checkpoint, dtype=torch.float32)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in [BUILTIN_TOOLS["calculator"]]]
    with Engine(model) as engine, serve_in_thread(create_app(engine, "scripted")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-")
        r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "What is 12*34?"}],
                                           tools=tools, reasoning_effort="low", temperature=0)
    message = r.choices[0].message
    assert message.content == "Let me check."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == \
        [("calculator", '{"expression": "12*34"}')]


def test_a_long_conversation_drops_its_oldest_turns_and_a_message_too_long_fails_alone():
    """Past the model's context the session drops whole turns, oldest first, never the turn in progress, and
    says so; generation is cut to the room left. A message that cannot fit even alone fails with an error that
    gives both sizes, and leaves the conversation as it was (the next turn goes on from it)."""
    answer = "<|channel|>final<|message|>ok<|return|>"
    engine = Scripted([answer] * 12)
    limit = 160
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=64), TOK, "low", context_limit=limit)
    notices = []
    for k in range(8):
        events = list(session.send(f"turn {k}: " + "word " * 10))
        notices += [e.text for e in events if e.kind == "notice"]
        assert events[-1].kind == "done" and len(engine.prompts[-1]) + 64 <= limit  # room for max_tokens
        assert TOK.decode(engine.prompts[-1]).count(f"turn {k}:") == 1  # the turn in progress is always there
    assert notices and all("oldest turn" in n and "160-token context" in n for n in notices)
    users = [m.content for m in session.messages if m.role == "user"]
    assert users[-1].startswith("turn 7:") and not users[0].startswith("turn 0:")
    assert [int(u.split(":")[0].split()[1]) for u in users] == list(range(8 - len(users), 8))  # oldest went first
    kept = list(session.messages)
    with pytest.raises(gptoss.GptOssError, match=r"takes \d+ tokens, and the model's context is 160"):
        list(session.send("word " * 200))
    assert session.messages == kept
    # a prompt that leaves less room than max_tokens (the turn alone is long): generation is cut to what is left
    asked = []
    session.complete = lambda prompt, params: asked.append((len(prompt), params.max_tokens)) or engine(prompt, params)
    session.reset()
    list(session.send("word " * 100))
    (prompt_tokens, max_tokens), = asked
    assert prompt_tokens > limit - 64 and max_tokens == limit - prompt_tokens
