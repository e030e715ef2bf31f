"""`gptoss eval demo`: the demo model's skills on held-out questions, through the path users take.

    gptoss eval demo [--model M | --base-url URL] [--n 100] [--heldout-n 170] [--seed 1]
                     [--reasoning-effort medium] [--out FILE]

Two held-out sets, both from the training data generator (gptoss.demo.data) with another seed and with
every question of the training set removed:

- template family (--n per kind): questions phrased the way the training data phrases them;
- held-out phrasing (--heldout-n per kind, the measure the README quotes): questions phrased from
  gptoss.demo.phrasing's held-out family, frames and glue that training never sees (the skeleton of each
  question, its numbers taken out, is checked against every skeleton the training family can produce).
 Each question runs in its own ChatSession (the `gptoss chat` session:
Harmony prompt, greedy decoding, tool calls executed by the built-in tools and fed back) on the
continuous-batching engine that `gptoss serve` uses, several sessions at a time; with --base-url, through an
OpenAI-compatible server instead (Chat Completions with the tools declared, tool calls run here). Scores:

- arithmetic: the last number of the final answer equals the exact result (and no tool was called);
- tool calls: the first call names the right function with JSON arguments equal to the expected ones (for
  the calculator: an expression of the same value), and the final answer states the tool's result;
- refusals: out-of-scope questions answered with "I don't know" / "I can't", no tool called;
- in-scope questions refused, and repeated answers (a final answer stated twice or two answers joined,
  e.g. `2 + 2 = 42 + 2 = 4`), counted over every question.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

# imported here, not in run_one: evaluate() runs run_one in threads, and threads racing to import a module
# can see it half initialized
from .. import harmony
from ..chat import ChatSession
from ..generate import SamplingParams
from . import data, phrasing
from .tools import DEMO_TOOLS

HELDOUT_SEED = 1
HELDOUT_PHRASING_N = 170  # per kind: 510 arithmetic questions
TRAIN_SEED, TRAIN_N = 0, 120000  # the recipe's defaults; a shipped model's training.json says what it used
CATEGORIES = {"arithmetic": ("add", "sub", "mul"), "tools": ("calc", "convert"), "refusal": ("general", "too_big"),
              "structured": ("json",),  # data version 4 on: an arithmetic question with a declared response format
              "followup": ("followup",),  # data version 10 on: arithmetic on the previous turn's answer,
              "dangling": ("followup_none",)}  # and the same with no answer to refer to (declined)
SINCE_VERSION = {"structured": 4, "followup": 10, "dangling": 10}

REFUSAL = re.compile(r"I don't know|I can't|I cannot")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def evaluated_kinds(version: int) -> list[str]:
    """The kinds asked, in order: structured answers and follow-ups only where the data teaches them."""
    return [k for cat, kinds in CATEGORIES.items() for k in kinds if version >= SINCE_VERSION.get(cat, 1)]


@dataclass
class Result:
    kind: str
    family: str  # "template" | "heldout" (phrasing)
    question: str
    tools: list[str]
    expected: str | None
    expected_call: dict[str, Any] | None
    final: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)  # {"name", "arguments"}
    reasoning: str = ""
    correct: bool = False
    repeated: bool = False  # the final answer stated twice / two answers joined
    stop: str | None = None  # what the model wrote after its final answer: "return" | "end" | "none"; None: no
    #                          final answer, or not observable (through a server)
    call_ok: bool | None = None  # tool examples: a valid call with the right arguments
    seconds: float = 0.0


@functools.lru_cache(maxsize=4)
def training_keys(train_seed: int, train_n: int, version: int = 1) -> frozenset[str]:
    return frozenset(data.question_key(ex) for ex in data.generate(train_seed, train_n, version=version))


def heldout(n: int, seed: int = HELDOUT_SEED, train_seed: int = TRAIN_SEED, train_n: int = TRAIN_N,
            family: str = "template", version: int = 1) -> list[data.Example]:
    """n examples of every evaluated kind, none of whose questions is in the training set (data `version`).
    family "template": phrased as the training data is; "heldout": phrased from the held-out family, and
    no question whose skeleton the training family can produce."""
    exclude = set(training_keys(train_seed, train_n, version))
    style = {"template": None if version == 1 else "train", "heldout": "heldout"}[family]
    trained = phrasing.training_skeletons(version) if family == "heldout" else frozenset()
    rng = random.Random(seed if family == "template" else seed + 1000)
    out: list[data.Example] = []
    for kind in evaluated_kinds(version):
        got = tries = 0
        while got < n:
            tries += 1
            if tries > 100 * n:
                raise ValueError(f"cannot find {n} held-out '{kind}' questions outside the training set")
            ex = data.make_example(rng, kind, heldout=True, phrasing=style, version=version)
            key = data.question_key(ex)
            if key in exclude or phrasing.skeleton(ex.question) in trained:
                continue
            exclude.add(key)
            out.append(ex)
            got += 1
    return out


def final_number(text: str) -> str | None:
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def call_matches(call: dict[str, str], expected: dict[str, Any]) -> bool:
    from ..tools import ToolError, evaluate

    if call["name"] != expected["name"]:
        return False
    try:
        args = json.loads(call["arguments"])
    except json.JSONDecodeError:
        return False
    want = expected["arguments"]
    if not isinstance(args, dict) or set(args) != set(want):
        return False
    if expected["name"] == "calculator":
        try:
            return evaluate(str(args["expression"])) == evaluate(want["expression"])
        except ToolError:
            return False
    return all(args[k] == want[k] if isinstance(want[k], str) else same_number(str(args[k]), str(want[k]))
               for k in want)


def repeated(text: str) -> bool:
    """A final answer said twice: two equations (`2 + 2 = 42 + 2 = 4`), two refusals, or a sentence or line
    that occurs twice."""
    t = text.strip()
    if t.count("=") > 1 or len(REFUSAL.findall(t)) > 1:
        return True
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n", t) if p.strip()]
    return len(parts) != len(set(parts))


def json_answer(ex: data.Example, text: str) -> bool:
    """A structured answer: the final message is one JSON object whose integer field holds the exact result."""
    schema = response_format(ex)["schema"]
    field_ = next(k for k, v in schema["properties"].items() if v["type"] == "integer")
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(answer, dict) and set(answer) == set(schema["properties"]) and type(answer[field_]) is int
            and str(answer[field_]) == ex.answer)


def response_format(ex: data.Example) -> dict[str, Any]:
    """The response format the example's developer message declares ({name, schema, description?})."""
    return next(m["content"]["response_format"] for m in ex.messages if m["role"] == "developer")


def score(ex: data.Example, r: Result) -> Result:
    r.repeated = repeated(r.final)
    number = final_number(r.final)
    if ex.kind in CATEGORIES["structured"]:
        r.correct = not r.calls and json_answer(ex, r.final)
    elif ex.kind in CATEGORIES["arithmetic"] + CATEGORIES["followup"]:
        r.correct = not r.calls and same_number(number, ex.answer)
    elif ex.kind in CATEGORIES["tools"]:
        r.call_ok = bool(r.calls) and call_matches(r.calls[0], ex.call)
        r.correct = r.call_ok and same_number(number, ex.answer)
    else:
        r.correct = not r.calls and bool(REFUSAL.search(r.final))
    return r


class _Recorded:
    """A completion stream that keeps the tokens it hands out (to see how the model ended its final answer)."""

    def __init__(self, stream, sink: list[int]):
        self.stream, self.sink = stream, sink

    def __iter__(self):
        for token in self.stream:
            self.sink.append(token)
            yield token

    def close(self) -> None:
        getattr(self.stream, "close", lambda: None)()


def final_stop(tokens: Sequence[int], tok) -> str | None:
    """How the first final message of a completion ends: "return" (<|return|>, the turn's end, as trained),
    "end" (<|end|>: the model would go on with another message; the chat and the server cut there), "none"
    (no end token: max_tokens or <|endoftext|>); None when the completion has no final message."""
    header = tok.encode("<|channel|>final<|message|>", allowed_special="all")
    starts = [i for i in range(len(tokens) - len(header) + 1) if list(tokens[i:i + len(header)]) == header]
    if not starts:
        return None
    for t in tokens[starts[0] + len(header):]:
        if t == tok.return_:
            return "return"
        if t in (tok.end, tok.call):
            return "end"
    return "none"


def run_one(ex: data.Example, complete, effort: str, max_tokens: int, family: str = "template",
            history: list[dict[str, Any]] | None = None) -> Result:
    """One question through a ChatSession; history: earlier turns to put before it (default: a follow-up's
    own turn, none for other kinds)."""
    tools = [DEMO_TOOLS[name] for name in ex.tools]
    completions: list[list[int]] = []

    def recorded(prompt, params):
        completions.append([])
        return _Recorded(complete(prompt, params), completions[-1])

    # a structured answer is declared and enforced (constrain.py) as `gptoss chat --json-schema` does
    fmt = harmony.ResponseFormat(**response_format(ex)) if ex.kind in CATEGORIES["structured"] else None
    session = ChatSession(recorded, SamplingParams(temperature=0, max_tokens=max_tokens), reasoning_effort=effort,
                          tools=tools, max_tool_rounds=2, response_format=fmt)
    if history is None and ex.kind in CATEGORIES["followup"] + CATEGORIES["dangling"]:
        history = ex.history  # the turn it refers to, as the chat keeps it (other kinds alone, as evaluations so far)
    if history:
        session.messages = [data.message(m) for m in history]
    r = Result(ex.kind, family, ex.question, list(ex.tools), ex.answer, ex.call)
    t0 = time.perf_counter()
    for event in session.send(ex.question):
        if event.kind in ("final", "commentary"):  # what the user sees (the server's content: preambles too)
            r.final += event.text
        elif event.kind == "analysis":
            r.reasoning += event.text
        elif event.kind == "tool_call":  # the text of a round that ends in a call is not the answer
            r.calls.append({"name": event.name, "arguments": event.text})
            r.final = ""
    r.seconds = time.perf_counter() - t0
    r.stop = final_stop(completions[-1], session.tok) if completions else None
    return score(ex, r)


def run_one_remote(ex: data.Example, client, model: str, effort: str, max_tokens: int,
                   family: str = "template") -> Result:
    """The same question through an OpenAI-compatible server (Chat Completions with the tools declared),
    the tool calls executed here and sent back as `tool` messages, as an application would."""
    from ..tools import run_tool

    tools = [DEMO_TOOLS[name] for name in ex.tools]
    specs = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in tools]
    earlier = ex.history if ex.kind in CATEGORIES["followup"] + CATEGORIES["dangling"] else []  # as run_one
    messages: list[dict[str, Any]] = [*({"role": m["role"], "content": m["content"]} for m in earlier),
                                      {"role": "user", "content": ex.question}]
    r = Result(ex.kind, family, ex.question, list(ex.tools), ex.answer, ex.call)
    t0 = time.perf_counter()
    for _ in range(3):  # the question, then at most two tool rounds (as run_one)
        extra: dict[str, Any] = {"tools": specs} if specs else {}
        if ex.kind in CATEGORIES["structured"]:
            fmt = response_format(ex)
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt["name"], "schema": fmt["schema"], "strict": True,
                **({"description": fmt["description"]} if "description" in fmt else {})}}
        reply = client.chat.completions.create(model=model, messages=messages, reasoning_effort=effort,
                                               temperature=0, seed=0, max_tokens=max_tokens, **extra)
        message = reply.choices[0].message
        r.reasoning += getattr(message, "reasoning_content", None) or ""
        if not message.tool_calls:
            r.final = message.content or ""
            break
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            r.calls.append({"name": call.function.name, "arguments": call.function.arguments})
            tool = DEMO_TOOLS.get(call.function.name) if call.function.name in ex.tools else None
            result = (run_tool(tool, call.function.arguments) if tool
                      else json.dumps({"error": f"no tool named {call.function.name}"}))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    r.seconds = time.perf_counter() - t0
    return score(ex, r)


def examples_for(n: int, heldout_n: int, seed: int, train_seed: int, train_n: int, version: int
                 ) -> list[tuple[str, data.Example]]:
    """(family, example) pairs: n per kind phrased as in training, heldout_n per kind in held-out phrasing."""
    return [*(("template", ex) for ex in (heldout(n, seed, train_seed, train_n, "template", version) if n else [])),
            *(("heldout", ex) for ex in (heldout(heldout_n, seed, train_seed, train_n, "heldout", version)
                                         if heldout_n else []))]


def evaluate(model, n: int = 100, seed: int = HELDOUT_SEED, effort: str = "medium", max_tokens: int = 512,
             concurrency: int = 16, progress: bool = True, train_seed: int = TRAIN_SEED,
             train_n: int = TRAIN_N, heldout_n: int = 0, version: int = 1) -> list[Result]:
    """Run the held-out sets through ChatSessions on an Engine; results in held-out order (template family
    first, then held-out phrasing)."""
    return evaluate_items(model, examples_for(n, heldout_n, seed, train_seed, train_n, version), effort, max_tokens,
                          concurrency, progress)


def evaluate_items(model, items: Sequence[tuple[str, data.Example]], effort: str = "medium", max_tokens: int = 512,
                   concurrency: int = 16, progress: bool = True) -> list[Result]:
    """(family, example) pairs through ChatSessions on an Engine; results in the items' order."""
    from ..engine import Engine

    with Engine(model, max_concurrency=concurrency, max_queue=4 * concurrency) as engine:
        engine.start()
        return _run_all(list(items), lambda fx: run_one(fx[1], engine.complete, effort, max_tokens, fx[0]),
                        concurrency, progress)


def evaluate_remote(endpoint, n: int = 100, seed: int = HELDOUT_SEED, effort: str = "medium", max_tokens: int = 512,
                    concurrency: int = 8, progress: bool = True, train_seed: int = TRAIN_SEED,
                    train_n: int = TRAIN_N, heldout_n: int = 0, version: int = 1) -> list[Result]:
    """The held-out sets against an OpenAI-compatible server (gptoss.evals.runner.Endpoint)."""
    items = examples_for(n, heldout_n, seed, train_seed, train_n, version)
    client, model = endpoint.client(), endpoint.resolve_model()
    return _run_all(items, lambda fx: run_one_remote(fx[1], client, model, effort, max_tokens, fx[0]), concurrency,
                    progress)


def _run_all(examples: list, run, concurrency: int, progress: bool) -> list[Result]:
    results: list[Result | None] = [None] * len(examples)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="eval demo", unit="q", file=sys.stderr)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(run, ex): i for i, ex in enumerate(examples)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]


def teacher_forced(model, n: int = 20, seed: int = HELDOUT_SEED, kinds: Sequence[str] = CATEGORIES["arithmetic"],
                   train_seed: int = TRAIN_SEED, train_n: int = TRAIN_N, family: str = "template",
                   version: int = 1) -> dict[str, Any]:
    """Where the model slips when it is fed the right conversation: every assistant token of n held-out
    conversations per kind (rendered as for training) predicted greedily from the true prefix. A recipe
    diagnostic: a generated answer fails at its first slip, this counts them all and shows their context."""
    import torch

    from ..tokenizer import get_tokenizer

    tok = get_tokenizer()
    errors: list[tuple[str, str, str]] = []  # (context, expected, predicted)
    total = whole = 0
    examples = [ex for ex in heldout(n, seed, train_seed, train_n, family, version) if ex.kind in kinds]
    for ex in examples:
        tokens, mask = data.to_document(ex, tok, current_turn_only=True)  # earlier turns: not written now
        with torch.no_grad():
            pred = model(torch.tensor([tokens], device=model.device))[0].argmax(-1).tolist()
        slips = [i for i in range(len(tokens) - 1) if mask[i + 1] and pred[i] != tokens[i + 1]]
        total += sum(mask[1:])
        whole += not slips
        errors += [(tok.decode(tokens[max(0, i - 8):i + 1]), tok.decode([tokens[i + 1]]), tok.decode([pred[i]]))
                   for i in slips]
    return {"conversations": len(examples), "all_right": whole, "tokens": total, "token_errors": len(errors),
            "errors": errors}


def summary(results: Sequence[Result]) -> dict[str, Any]:
    def rate(rs: list[Result], attr: str = "correct") -> dict[str, Any]:
        ok = sum(bool(getattr(r, attr)) for r in rs)
        return {"n": len(rs), "correct": ok, "accuracy": ok / len(rs) if rs else 0.0}

    by_kind = {k: rate([r for r in results if r.kind == k]) for k in sorted({r.kind for r in results})}
    arith = [r for r in results if r.kind in CATEGORIES["arithmetic"]]
    tools = [r for r in results if r.kind in CATEGORIES["tools"]]
    refusal = [r for r in results if r.kind in CATEGORIES["refusal"]]
    structured = [r for r in results if r.kind in CATEGORIES["structured"]]
    followups = [r for r in results if r.kind in CATEGORIES["followup"]]
    dangling = [r for r in results if r.kind in CATEGORIES["dangling"]]
    in_scope = arith + tools + structured + followups
    return {
        "arithmetic_exact": rate(arith),
        **({"json_exact": rate(structured)} if structured else {}),
        **({"followup_exact": rate(followups)} if followups else {}),
        **({"dangling_refused": rate(dangling)} if dangling else {}),
        "tool_call_valid_args": rate(tools, "call_ok"),
        "tool_round_trip": rate(tools),
        "refusal_rate": rate(refusal),
        "false_refusals": {"n": len(in_scope), "count": sum(bool(REFUSAL.search(r.final)) for r in in_scope)},
        "repeated": {"n": len(results), "count": sum(r.repeated for r in results)},
        "unclean_stops": {"n": sum(r.stop is not None for r in results),
                          "count": sum(r.stop in ("end", "none") for r in results)},
        "by_kind": by_kind,
    }


FAMILY_TITLES = {"heldout": "Held-out phrasing (frames and glue training never sees)",
                 "template": "Template family (phrased as in training, questions held out)"}


def markdown(s: dict[str, Any], header: str = "") -> str:
    def row(name: str, d: dict[str, Any]) -> str:
        return f"| {name} | {d['n']} | {d['correct']} | {100 * d['accuracy']:.1f}% |"

    lines = [header, "", "| metric | n | correct | accuracy |", "|---|---:|---:|---:|",
             row("arithmetic, final answer exact", s["arithmetic_exact"]),
             row("tool call valid, correct arguments", s["tool_call_valid_args"]),
             row("tool round trip (call + answer)", s["tool_round_trip"]),
             row("refusal of out-of-scope questions", s["refusal_rate"]),
             row("JSON answer (declared response format), exact result", s["json_exact"]) if "json_exact" in s
             else None,
             row("follow-up on the previous answer, exact", s["followup_exact"]) if "followup_exact" in s
             else None,
             row("follow-up with no answer to refer to, declined", s["dangling_refused"])
             if "dangling_refused" in s else None]
    lines += [row(f"  {k}", d) for k, d in s["by_kind"].items()]
    fr = s["false_refusals"]
    lines.append(f"\nIn-scope questions refused: {fr['count']} of {fr['n']}.")
    if "repeated" in s:
        lines.append(f"Answers repeated or joined: {s['repeated']['count']} of {s['repeated']['n']}.")
    if s.get("unclean_stops", {}).get("n"):
        u = s["unclean_stops"]
        lines.append(f"Final answers not ended with <|return|> (the chat and the server cut them): {u['count']} of "
                     f"{u['n']}.")
    return "\n".join(line for line in lines if line is not None).strip()


def report(results: Sequence[Result], header: str = "") -> str:
    """Markdown: held-out phrasing first (the measure), then the template family."""
    parts = [header] if header else []
    for family in ("heldout", "template"):
        rs = [r for r in results if r.family == family]
        if rs:
            parts.append(markdown(summary(rs), f"### {FAMILY_TITLES[family]}"))
    return "\n\n".join(parts)


def training_info(model_path: str | Path | None) -> dict[str, Any]:
    """The recipe's record next to a shipped model (data seed and size: the held-out set avoids them)."""
    if model_path is None:  # the embedded model
        from . import folder

        model_path = folder()
    f = Path(model_path) / "training.json"
    return json.loads(f.read_text()) if f.exists() else {}


def eval_command(args: argparse.Namespace) -> None:
    n = 100 if args.n is None else args.n
    heldout_n = HELDOUT_PHRASING_N if getattr(args, "heldout_n", None) is None else args.heldout_n
    seed = HELDOUT_SEED if args.seed is None else args.seed
    t0 = time.perf_counter()
    if args.base_url:  # a server does not say what its model saw: the held-out set avoids the recipe's default data
        from ..evals.runner import Endpoint

        endpoint = Endpoint(args.base_url, args.served_model, args.api_key)
        results = evaluate_remote(endpoint, n, seed, args.reasoning_effort, args.max_tokens, args.concurrency,
                                  progress=not args.quiet, heldout_n=heldout_n)
        where = f"{args.base_url} ({endpoint.resolve_model()})"
    else:
        from ..loading import load_model_from_args

        model = load_model_from_args(args)
        info = training_info(args.model)
        results = evaluate(model, n, seed, args.reasoning_effort, args.max_tokens, progress=not args.quiet,
                           train_seed=info.get("data_seed", TRAIN_SEED), train_n=info.get("data_n", TRAIN_N),
                           heldout_n=heldout_n, version=info.get("data_version", 1))
        where = args.model
    header = (f"## gptoss eval demo — {where}\n\nheld-out seed {seed}, {heldout_n} held-out-phrasing and {n} "
              f"template-family questions per kind, reasoning {args.reasoning_effort}, greedy, "
              f"{time.perf_counter() - t0:.0f} s")
    print(report(results, header))
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(asdict(r)) + "\n")
