"""experiments/demo/decline_probe.py counts declines from the first tokens of each answer: on the shipped model
it must call an answer declined exactly when the full answer (the evaluation's 512 tokens) is a refusal.

The questions mix ones the shipped model answers with in-scope questions models of its recipe have declined
(held-out validation items) and out-of-scope ones it declines by design, so that both outcomes are checked
whichever way the shipped model goes on each."""

import random
from dataclasses import asdict

import pytest
import repo_scripts
import torch

from gptoss import demo
from gptoss.demo import data as D
from gptoss.demo import eval as E

pytestmark = pytest.mark.skipif(not (demo.folder() / "model.safetensors").exists(),
                                reason="the demo model has not been shipped in this checkout")

QUESTIONS = [  # (kind, question, answer): declined by some of runs 28-38 on validation items, answered, out of scope
    ("add", "so 7545+ 797?? i need it for homework.", "8342"),
    ("add", "Hello, Result Of 7+4? Thx", "11"),
    ("mul", "Question: multiply 839 with 9 Thanks!", "7551"),
    ("mul", "Hi there, multiply 2 with 585...", "1170"),
    ("sub", "Please calculate 4195 - 1932", "2263"),
    ("too_big", "What is 48213 * 77?", None),
    ("general", "What is the capital of France?", None),
]


def test_the_probe_finds_a_decline_exactly_where_the_full_answer_is_one():
    probe = repo_scripts.load("experiments/demo/decline_probe.py")
    thoughts = probe.decline_thoughts()
    assert D.thoughts(11)["followup_none"]["medium"] in thoughts and D.thoughts(11)["too_big"]["low"] in thoughts
    model = demo.load(dtype=torch.bfloat16)
    items = [("heldout", D.Example(kind, "medium", (), q, [], answer)) for kind, q, answer in QUESTIONS]
    # a follow-up with an earlier answer in the history, as the evaluation asks it
    prev = D.make_example(random.Random(0), "sub", version=11)
    items.append(("heldout", D.Example("followup", "medium", (), "UM, AND NOW MINUS 24?? THANKS!", [],
                                       str(int(prev.answer) - 24), None, D.earlier_turn(prev))))
    short = E.evaluate_items(model, items, max_tokens=40)
    full = E.evaluate_items(model, items, max_tokens=512)
    got = [probe.declined(asdict(r), thoughts) for r in short]
    want = [bool(E.REFUSAL.search(r.final)) for r in full]
    assert got == want, [(ex.question, g, w) for (_, ex), g, w in zip(items, got, want)]
    assert any(want) and not all(want)  # both outcomes checked (the out-of-scope ones are declined)
