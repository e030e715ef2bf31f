"""The demo model's calculator calls when the calculator is declared in words its training never used.

The training data declares each tool one way (`gptoss.demo.data.TOOL_DEFS`). This asks the held-out-phrasing
`calc` questions of `gptoss eval demo` (the model's data version, held-out seed 1: the calculator items of its
tool category) with the calculator declared as in training and in five other ways, one change each, and counts
first calls that go to the declared name with the declared parameter and an expression worth the expected one,
and right final answers after the round trip. Greedy, medium effort, as the evaluation asks.

    python experiments/demo/tool_declarations.py [--model DIR] [--n 170]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from gptoss.chat import ChatSession
from gptoss.demo import data, eval as demo_eval
from gptoss.demo.tools import DEMO_TOOLS
from gptoss.engine import Engine
from gptoss.generate import SamplingParams
from gptoss.tools import Tool


def variants() -> dict[str, tuple[Tool, str]]:
    """name → (the calculator as declared, its parameter's name); each changes one thing of the trained one."""
    base = DEMO_TOOLS["calculator"]

    def with_parameter(name: str, description: str | None) -> dict[str, Any]:
        schema = copy.deepcopy(base.parameters)
        prop = schema["properties"].pop("expression")
        if description is None:
            prop.pop("description", None)
        else:
            prop["description"] = description
        schema["properties"][name] = prop
        schema["required"] = [name]
        return schema

    def renamed_parameter(arguments: dict[str, Any]) -> str:  # the calculator, reading `expr`
        return base.function({"expression": arguments.get("expr", "")})

    return {
        "as trained": (base, "expression"),
        "tool description reworded": (replace(base, description="Does arithmetic."), "expression"),
        "parameter description removed": (replace(base, parameters=with_parameter("expression", None)), "expression"),
        "parameter description reworded": (replace(base, parameters=with_parameter(
            "expression", "The arithmetic expression to evaluate.")), "expression"),
        "parameter renamed expr": (replace(base, parameters=with_parameter(
            "expr", base.parameters["properties"]["expression"].get("description")), function=renamed_parameter),
            "expr"),
        "tool renamed calc": (replace(base, name="calc"), "expression"),
    }


def ask(engine: Engine, ex: data.Example, tool: Tool, parameter: str) -> tuple[bool, bool]:
    """(first call right, final answer right) for one question with `tool` in place of the calculator."""
    tools = [tool if name == "calculator" else DEMO_TOOLS[name] for name in ex.tools]
    session = ChatSession(engine.complete, SamplingParams(temperature=0, max_tokens=512), reasoning_effort="medium",
                          tools=tools, max_tool_rounds=2)
    calls, final = [], ""
    for event in session.send(ex.question):
        if event.kind in ("final", "commentary"):
            final += event.text
        elif event.kind == "tool_call":
            calls.append((event.name, event.text))
            final = ""
    call_ok = False
    if calls and calls[0][0] == tool.name:
        try:
            args = json.loads(calls[0][1])
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and set(args) == {parameter}:  # read back as the trained call to compare
            trained = {"name": "calculator", "arguments": json.dumps({"expression": args[parameter]})}
            call_ok = demo_eval.call_matches(trained, ex.call)
    return call_ok, demo_eval.same_number(demo_eval.final_number(final), ex.answer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a demo export folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=170, help="held-out-phrasing questions per kind, as the evaluation")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    import gptoss.demo
    from gptoss.checkpoint import load

    model = gptoss.demo.load() if args.model is None else load(args.model)
    info = demo_eval.training_info(args.model)  # the held-out items avoid the model's own training questions
    version = info.get("data_version", 1)
    items = [ex for ex in demo_eval.heldout(args.n, train_seed=info.get("data_seed", demo_eval.TRAIN_SEED),
                                            train_n=info.get("data_n", demo_eval.TRAIN_N), family="heldout",
                                            version=version)
             if ex.kind == "calc" and ex.call is not None and ex.call["name"] == "calculator"]
    print(f"{len(items)} held-out calculator questions (data version {version}, seed {demo_eval.HELDOUT_SEED})")
    print("| calculator declared | first call right | final answer right |\n|---|---:|---:|")
    with Engine(model, max_concurrency=args.concurrency, max_queue=4 * args.concurrency) as engine:
        engine.start()
        for name, (tool, parameter) in variants().items():
            with ThreadPoolExecutor(args.concurrency) as pool:
                got = list(pool.map(lambda ex: ask(engine, ex, tool, parameter), items))
            calls, finals = sum(c for c, _ in got), sum(f for _, f in got)
            print(f"| {name} | {calls} / {len(items)} | {finals} / {len(items)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
