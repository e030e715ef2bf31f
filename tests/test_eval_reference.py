"""Equal grading: gptoss.evals scores recorded replies exactly as openai/gpt-oss's eval code does.

The oracle is tests/eval_reference.py, the reference's grading logic reproduced from gpt-oss 0.0.9's source (file
and function cited there); where the `gpt-oss` package is importable, its own modules are compared too. Per task:
≥ 50 recorded replies (hand-written: right, wrong, malformed, several answers, boxed and unboxed, empty) plus a
seeded fuzz of a few hundred replies glued from answer-like fragments; the templates' sha256 against the
reference's; GPQA's option orders and prompts in the reference's order; HealthBench's grader prompts, retries,
per-example metrics and clipped means.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request

import eval_reference as ref
from gptoss.evals import datasets, graders, runner
from test_evals import Served

EXAMPLES = Path(graders.__file__).parent / "examples"
PACKAGE = ref.PACKAGE
needs_package = pytest.mark.skipif(PACKAGE is None, reason="the gpt-oss package is not importable here "
                                                           "(Requires-Python >= 3.12); the reproduction is used")

# sha256 of the reference's templates, computed from gpt-oss 0.0.9's gpt_oss/evals/{healthbench,aime,gpqa}_eval.py
REFERENCE_SHA256 = {
    "GRADER_TEMPLATE": "beb23489068bae9daa7f68c49cf0d374040c5d6af4ccab89f4e83e276532e954",
    "AIME_TEMPLATE": "280a9b4fb598f2230f0af213e55ae25ab09825608fda924bced3a0651fa57d83",
    "GPQA_TEMPLATE": "d3cf5fc746599bb69a5760b4fcf430663d650d7109951b1124f69c11bf791685",
}


@pytest.mark.parametrize("name", REFERENCE_SHA256)
def test_templates_are_the_references(name):
    assert hashlib.sha256(getattr(graders, name).encode()).hexdigest() == REFERENCE_SHA256[name]


# ---------------------------------------------------------------- AIME
AIME_REPLIES = [  # (reply, correct answer)
    ("The answer is \\boxed{24}.", 24),
    ("\\boxed{24}", 25),
    ("First \\boxed{12}, then correcting: \\boxed{ 210 }", 210),
    ("\\boxed{210} or maybe \\boxed{200}", 210),  # the last box wins
    ("So 17·23 = 391", 391),  # no box: the last number
    ("17 times 23 is 391, so 391 it is. Checked in 2 ways.", 391),  # the last number is 2
    ("391", 391),
    ("", 0), ("   ", 0), ("I am not sure.", 5),
    ("It is 1,000 minus 2: \\boxed{998}", 998),
    ("\\boxed{1,000}", 0),  # the text after the box's last comma: "000"
    ("\\boxed{1,000}", 1000),
    ("\\boxed{3.5}", 3),
    ("\\boxed{x}", 5),
    ("Answer: $24$", 24),
    ("\\boxed{$24$}", 24),  # int("$24$") fails: no answer
    ("\\boxed{}", 7),  # an empty box is skipped: no digits at all either
    ("\\boxed{} and 7", 7),
    ("\\boxed{\\frac{1}{2}}", 1),  # the lazy match stops at the first }: "\frac{1"
    ("\\framebox{42}", 42),
    ("\\boxed{41} then \\framebox{42}", 42),
    ("\\fbox{42}", 42),  # not a box it knows: the last number, 42
    ("\\boxed{\\text{42}}", 42),
    ("\\boxed{ -5 }", -5),
    ("\\boxed{+7}", 7),
    ("The answer is -5", 5),  # digits only: 5
    ("\\boxed{042}", 42),
    ("\\boxed{4_2}", 42),  # int() accepts the underscore
    ("\\boxed{٤٢}", 42),  # Arabic-Indic digits: int() reads them
    ("٤٢", 42),
    ("\\boxed{12}\n\nWait, that is wrong. The final answer is 13.", 13),
    ("Final answer: 13. \\boxed{12}", 13),
    ("\\boxed\n{12}", 12),  # "boxed{" must be adjacent: the last number
    ("\\boxed {12}", 12),
    ("\\boxed{1\n2}", 12),  # DOTALL: the box spans the newline, int() refuses "1\n2"
    ("unboxed{7}", 7),
    ("\\boxed{boxed{5}}", 5),
    ("x = 2^{10} = 1024, remainder \\boxed{24}", 24),
    ("1024 mod 1000 = 24", 24),
    ("The remainder is 24.", 24),
    ("The remainder is 024", 24),
    ("Answer: 998.0", 998),  # the last digits are "0"
    ("\\boxed{998.0}", 998),
    ("\\boxed{ 998 }.", 998),
    ("We get 10^3 = 1000 so \\boxed{1000}", 1000),
    ("\\boxed{24}\\boxed{}", 24),
    ("**24**", 24),
    ("$\\boxed{\\textbf{24}}$", 24),
    ("The value is twenty-four.", 24),
    ("\\boxed{2,4}", 4),
    ("\\boxed{24,}", 24),  # the text after the last comma is empty
    ("999999999999999999999999", 999999999999999999999999),
    ("1" * 5000, 1),  # more digits than int() converts by default: no answer
    ("Problem 7: the answer is \\boxed{70}", 70),
    ("\\boxed{70} (mod 1000)", 70),
]


def test_aime_has_enough_recorded_replies():
    assert len(AIME_REPLIES) >= 50


def _aime_ours(reply: str, answer: int) -> tuple[int | None, float]:
    g = runner.grade_answer("aime", reply, answer, strict=False)
    return g["extracted"], g["score"]


@pytest.mark.parametrize("reply,answer", AIME_REPLIES)
def test_aime_grading_equals_the_reference(reply, answer):
    assert _aime_ours(reply, answer) == ref.aime_score(reply, answer)


def fragments(rng: random.Random, pieces: list[str], n: int) -> list[str]:
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) for _ in range(n)]


AIME_PIECES = ["\\boxed{", "\\framebox{", "}", "{", "42", "7", "1,000", ",", " ", "\n", "$", "answer: ", "x", "-",
               ".", "\\frac{1}{2}", "0", "boxed", "٣", "**", "\\text{", "_"]


def test_aime_fuzz_equals_the_reference():
    rng = random.Random(0)
    for reply in fragments(rng, AIME_PIECES, 400):
        assert _aime_ours(reply, 42) == ref.aime_score(reply, 42), repr(reply)


def test_aime_answer_column_is_read_as_the_reference_reads_it():
    for text in ("070", "33 (mod 1000)", "7", "0"):
        assert datasets.parse_answer(text, "f:1", "answer") == int(ref.normalize_number(text))


# ---------------------------------------------------------------- GPQA
GPQA_REPLIES = [  # (reply, correct letter)
    ("Reasoning...\nAnswer: B", "B"),
    ("answer: c", "C"),
    ("The answer is (D).", "D"),
    ("\\boxed{A}", "A"),
    ("B", "B"), ("(C)", "C"), ("C.", "C"), ("D)", "D"),
    ("Answer: A\nActually, Answer: C", "C"),  # several answers: the first pattern's first match, A
    ("Answer: A. Final Answer: A", "A"),
    ("Answer: E", "A"),  # no option E: the first character, "A"
    ("Option 2", "B"), ("The second one.", "B"),
    ("", "A"),
    ("**Answer:** B", "B"),
    ("**Answer**: C", "C"),
    ("__Answer__ - D", "D"),
    ("*Answers* – A", "A"),
    ("Answer: Because the photon is massless, C", "C"),  # "Answer: B" from "Because": the line pattern
    ("answer: because", "B"),  # case-insensitive: "b" from "because", upper-cased
    ("The correct choice is B", "B"),
    ("Choice: D", "D"),
    ("option (a)", "A"),  # no pattern takes "(a)" lower-case after option: the first character "o"
    ("\\boxed{\\text{C}}", "C"),
    ("\\boxed{\\textbf{D}}", "D"),
    ("\\boxed{\\text{A } 2.08\\times10^{-6}\\,\\mathrm{m}}", "A"),
    ("\\boxed{c}", "C"),
    ("Hence [B].", "B"),
    ("Hence (B) and not (C).", "B"),
    ("It must be **D**.", "D"),
    ("It must be *A*", "A"),
    ("\\textbf{C} is right", "C"),
    ("**D) Xenon**", "D"),
    ("__B) Gluon__", "B"),
    ("All four are plausible, but the photon is right.", "C"),  # the line pattern: "A" from "All"
    ("Clearly the photon.", "C"),  # "C" from "Clearly"
    ("Because the mitochondrion makes ATP.", "C"),
    ("Definitely.", "D"),
    ("the photon", "C"),  # nothing: the first character "t"
    ("**", "A"),
    ("**B", "B"),
    ("I think it's c.", "C"),
    ("Final: D", "D"),
    ("Answer:\n\nD", "D"),
    ("Answer - (B)", "B"),
    ("Answers: (A)", "A"),
    ("ANSWER: d", "D"),
    ("The answer:C", "C"),
    ("My answer is B", "B"),  # "answer is B": no pattern has "is"; the line pattern finds nothing: "M"
    ("Answer: (E)", "A"),
    ("Answer: AB", "A"),
    ("A or B", "A"),
    ("Either (A) or [D]", "A"),
    ("Options A and C are wrong; B is right.", "B"),
    ("Let me think.\n\nB. Gluon", "B"),
    ("Let me think.\n\n**C**: Photon", "C"),
    ("$\\boxed{B}$", "B"),
    ("\\boxed{}", "A"),
    ("ABCD", "A"),
]


def test_gpqa_has_enough_recorded_replies():
    assert len(GPQA_REPLIES) >= 50


def _gpqa_ours(reply: str, correct: str) -> tuple[str | None, float]:
    g = runner.grade_answer("gpqa", reply, correct, strict=False)
    return g["extracted"], g["score"]


def _gpqa_ref(reply: str, correct: str) -> tuple[str | None, float]:
    got = ref.extract_abcd(reply)
    return got, 1.0 if got == correct else 0.0


@pytest.mark.parametrize("reply,correct", GPQA_REPLIES)
def test_gpqa_grading_equals_the_reference(reply, correct):
    assert _gpqa_ours(reply, correct) == _gpqa_ref(reply, correct)


GPQA_PIECES = ["Answer", "answer", "Answers", ":", " ", "\n", "**", "*", "_", "__", "(", ")", "[", "]", "A", "B",
               "c", "D", "E", "\\boxed{", "\\text{", "\\textbf{", "}", "Option", "Choice", " is ", "–", "-", ".",
               "Because", "the ", "x"]


def test_gpqa_fuzz_equals_the_reference():
    rng = random.Random(1)
    for reply in fragments(rng, GPQA_PIECES, 600):
        assert _gpqa_ours(reply, "B") == _gpqa_ref(reply, "B"), repr(reply)


def test_gpqa_options_prompts_and_letters_in_the_reference_order():
    path = EXAMPLES / "gpqa_diamond.csv"
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    want = ref.gpqa_layout(rows, n_repeats=8)
    jobs = datasets.jobs("gpqa", datasets.load_items("gpqa", path), samples=8, seed=0)
    assert [(j.messages[0]["content"], j.expected) for j in jobs] == want
    assert len({tuple(j.extra["permutation"]) for j in jobs}) > 8  # orders vary across items and samples
    # --limit keeps the first items with the orders of the full run
    limited = datasets.jobs("gpqa", datasets.load_items("gpqa", path), samples=8, seed=0, limit=2)
    assert [(j.messages[0]["content"], j.expected) for j in limited] == [w for i, w in enumerate(want) if i % 5 < 2]


def test_strict_mode_keeps_our_stricter_extraction():
    # the reference takes the last number / the first character; --strict refuses to guess
    assert runner.grade_answer("aime", "x = 17, y = 23", 23, strict=False)["score"] == 1.0
    assert runner.grade_answer("aime", "x = 17, y = 23", 23, strict=True) == {"extracted": None, "score": 0.0}
    assert runner.grade_answer("gpqa", "Because it is massless.", "B", strict=False)["score"] == 1.0
    assert runner.grade_answer("gpqa", "Because it is massless.", "B", strict=True) == {"extracted": None,
                                                                                         "score": 0.0}
    assert runner.grade_answer("gpqa", "Answer: A\nAnswer: C", "C", strict=True)["extracted"] is None


# ---------------------------------------------------------------- HealthBench
GRADER_FORMS = [  # how a grader may answer: (text, accepted by the reference's parser)
    ('```json\n{{\n  "explanation": "x",\n  "criteria_met": {b}\n}}\n```', True),
    ('{{"explanation": "x", "criteria_met": {b}}}', True),
    ('  ```json{{"criteria_met": {b}}}```  ', True),
    ('{{"criteria_met": {b}, "explanation": "no explanation key needed"}}', True),
    ('Here it is: {{"criteria_met": {b}}}', False),  # prose around the object: asked again
    ('```\n{{"criteria_met": {b}}}\n```', False),  # a fence without "json": not stripped at the start
    ('{{"criteria_met": "{b}"}}', False),  # a string, not a boolean
    ('{{"criteria_met": 1}}', False),
    ('{{"explanation": "forgot the verdict"}}', False),
    ("criteria_met: {b}", False),
    ("", False),
    ("[true]", False),
]


def recorded_healthbench(n_replies: int = 54, seed: int = 0):
    """(example, reply, grader queue per grader prompt) for n_replies replies to the fixture's examples: each
    rubric item's verdict drawn at random, preceded by 0-2 replies the parser must refuse."""
    rng = random.Random(seed)
    examples = [json.loads(line) for line in (EXAMPLES / "healthbench.jsonl").read_text().splitlines()]
    replies = ["Rest and drink water; seek urgent care for a sudden severe headache.", "", "Call 911 now.",
               "Try to make them vomit.", "S: cough 3 days. O: afebrile, lungs clear. A: viral URI. P: fluids.",
               "I cannot help with that.", "**Go to the emergency department.**\n\nDo not induce vomiting."]
    out = []
    for i in range(n_replies):
        example = examples[i % len(examples)]
        reply = rng.choice(replies) + ("" if i < len(replies) else f" ({i})")
        queues = {}
        for rubric in example["rubrics"]:
            prompt = graders.grader_prompt(example["prompt"], reply, rubric)
            met = rng.random() < 0.5
            bad = [f.format(b=str(met).lower()) for f, ok in rng.sample(GRADER_FORMS, len(GRADER_FORMS)) if not ok]
            good = [f.format(b=str(met).lower()) for f, ok in GRADER_FORMS if ok]
            queues[prompt] = bad[:rng.randint(0, 2)] + [rng.choice(good)]
        out.append((example, reply, queues))
    return out


class ScriptedGrader(Served):
    """An OpenAI-compatible grader endpoint answering each grader prompt from its recorded queue."""

    def __init__(self, queues: dict[str, list[str]]):
        self.queues, self.sent = {k: list(v) for k, v in queues.items()}, []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            assert body["messages"][0] == {"role": "system", "content": graders.GRADER_SYSTEM_MESSAGE}
            assert body["temperature"] == 0.5 and body["max_tokens"] == 2048
            prompt = body["messages"][-1]["content"]
            self.sent.append(prompt)
            text = self.queues[prompt].pop(0)
            return {"id": "g", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}]}

        super().__init__(app)


def test_healthbench_grading_equals_the_reference():
    recorded = recorded_healthbench()
    assert len(recorded) >= 50
    all_queues = {}
    for _, _, queues in recorded:
        all_queues.update(queues)  # a prompt recurs only for the same (example, reply): the same queue
    ours, theirs = [], []
    with ScriptedGrader(all_queues) as grader:
        settings = runner.Settings("healthbench", grader=runner.Endpoint(grader.url, "scripted-grader"))
        for example, reply, queues in recorded:
            grader.queues.update({k: list(v) for k, v in queues.items()})
            job = datasets.Job(datasets.Item(example["prompt_id"], "recorded", {}), 0, example["prompt"],
                               example["rubrics"], {"example_tags": example["example_tags"]})
            sent_before = len(grader.sent)
            got = runner.grade_rubrics(job, reply, settings)
            copy = {k: list(v) for k, v in queues.items()}
            metrics, sent = ref.grade_sample(example["prompt"], reply, example["example_tags"], example["rubrics"],
                                             lambda prompt: copy[prompt].pop(0))
            assert grader.sent[sent_before:] == sent  # the same prompts, the same retries
            assert got["metrics"] == metrics
            ours.append(got["metrics"])
            theirs.append(metrics)
    assert {m["overall_score"] < 0 for m in theirs} == {True, False}  # examples below zero and not
    agg = graders.healthbench_metrics(ours, np.random.default_rng(0))
    for name in {k for m in theirs for k in m}:
        assert agg[name] == ref.clipped_mean([m[name] for m in theirs if name in m]), name
        assert agg[f"{name}:n_samples"] == sum(name in m for m in theirs)
    assert agg["score"] == agg["overall_score"]


# ---------------------------------------------------------------- the package itself, where it installs
@needs_package
def test_reproduction_equals_the_package():
    rng = random.Random(2)
    for reply in [r for r, _ in AIME_REPLIES] + fragments(rng, AIME_PIECES, 400):
        assert ref.extract_boxed_text(reply) == PACKAGE["aime"].extract_boxed_text(reply)
    for reply in [r for r, _ in GPQA_REPLIES] + fragments(rng, GPQA_PIECES, 600):
        assert ref.extract_abcd(reply) == PACKAGE["abcd"].extract_abcd(reply)
        assert ref.parse_json_to_dict(reply) == PACKAGE["healthbench"].parse_json_to_dict(reply)
    assert PACKAGE["healthbench"].GRADER_TEMPLATE == graders.GRADER_TEMPLATE
    assert PACKAGE["aime"].AIME_TEMPLATE == graders.AIME_TEMPLATE
    assert PACKAGE["gpqa"].QUERY_TEMPLATE_MULTICHOICE == graders.GPQA_TEMPLATE


class _Sampler:
    """A gpt_oss.evals sampler that answers from a list of recorded replies, keyed by the prompt."""

    def __init__(self, reply_for):
        self.reply_for, self.prompts = reply_for, []

    def _pack_message(self, role, content):
        return {"role": role, "content": content}

    def __call__(self, messages):
        from gpt_oss.evals.types import SamplerResponse

        self.prompts.append(messages[-1]["content"])
        return SamplerResponse(self.reply_for(messages[-1]["content"]), messages, {})


@needs_package
def test_package_evals_score_recorded_replies_as_we_do(monkeypatch):
    """The reference's own AIME25Eval and GPQAEval, their data read from our fixtures instead of the network,
    answered from recorded replies: the same per-item scores and the same mean as ours."""
    import pandas

    aime_mod, gpqa_mod = PACKAGE["aime"], PACKAGE["gpqa"]
    aime_file = EXAMPLES / "aime2025-I.jsonl"
    read_json, read_csv = pandas.read_json, pandas.read_csv
    monkeypatch.setattr(aime_mod.pandas, "read_json", lambda url, lines: read_json(aime_file, lines=True, dtype=False))
    items = datasets.load_items("aime", aime_file)
    replies = {graders.aime_prompt(it.fields["question"]): AIME_REPLIES[i * 7][0] for i, it in enumerate(items)}
    theirs = aime_mod.AIME25Eval(n_repeats=1)(_Sampler(lambda p: replies[p]))
    ours = [runner.grade_answer("aime", replies[j.messages[0]["content"]], j.expected, False)["score"]
            for j in datasets.jobs("aime", items, 1)]
    # AIME25Eval reads I and II: our one file twice
    assert theirs.score == pytest.approx(np.mean(ours)) and len(theirs.htmls) == 2 * len(ours)

    gpqa_file = EXAMPLES / "gpqa_diamond.csv"
    monkeypatch.setattr(gpqa_mod.pandas, "read_csv", lambda url: read_csv(gpqa_file))
    jobs = datasets.jobs("gpqa", datasets.load_items("gpqa", gpqa_file), 8)
    by_prompt = {j.messages[0]["content"]: GPQA_REPLIES[i % len(GPQA_REPLIES)][0] for i, j in enumerate(jobs)}
    sampler = _Sampler(lambda p: by_prompt[p])
    evaluation = gpqa_mod.GPQAEval(n_repeats=8)
    assert [e["permutation"] for e in evaluation.examples] == [j.extra["permutation"] for j in jobs]
    theirs = evaluation(sampler)
    # the same prompts (each as often): the same option orders
    assert sorted(sampler.prompts) == sorted(j.messages[0]["content"] for j in jobs)
    ours = [runner.grade_answer("gpqa", by_prompt[j.messages[0]["content"]], j.expected, False)["score"]
            for j in jobs]
    assert theirs.score == pytest.approx(np.mean(ours))


@needs_package
def test_package_healthbench_grade_sample_equals_ours(monkeypatch):
    """HealthBenchEval.grade_sample itself (the grader a recorded-reply sampler): the same per-example metrics.
    With $debug set its report.map_with_progress runs in order: otherwise it collects the verdicts with
    ThreadPool.imap_unordered and pairs them with the rubric items in the order the grader calls finish (a bug of
    gpt-oss's copy; simple-evals' common.map_with_progress keeps the order with imap, as we do)."""
    from gpt_oss.evals.types import SamplerResponse

    monkeypatch.setenv("debug", "1")
    hb = PACKAGE["healthbench"]
    for example, reply, queues in recorded_healthbench(n_replies=54, seed=3):
        copy = {k: list(v) for k, v in queues.items()}

        class Grader:
            def __call__(self, messages):
                return SamplerResponse(copy[messages[-1]["content"]].pop(0), messages, {})

        stub = type("Stub", (), {"grader_model": Grader()})()
        rubric_items = [hb.RubricItem.from_dict(r) for r in example["rubrics"]]
        theirs, _, graded = hb.HealthBenchEval.grade_sample(stub, example["prompt"], reply, example["example_tags"],
                                                            rubric_items)
        met = [g["criteria_met"] for g in graded]
        assert graders.example_metrics(example["rubrics"], met, example["example_tags"]) == theirs
        ours, _ = ref.grade_sample(example["prompt"], reply, example["example_tags"], example["rubrics"],
                                   lambda p, q={k: list(v) for k, v in queues.items()}: q[p].pop(0))
        assert ours == theirs
