"""gptoss eval: answer extraction and scoring, driven end to end against a scripted OpenAI-compatible
endpoint (a real HTTP server on loopback, reached with the official `openai` client), including malformed
model outputs, resume, the summary and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from gptoss.evals import graders, runner
from gptoss.server import serve_in_thread
from gptoss.evals.graders import EvalDataError, extract_integer, extract_letter

EXAMPLES = Path(graders.__file__).parent / "examples"


# ---------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,expected", [
    ("The answer is \\boxed{24}.", 24),
    ("First I got \\boxed{12}, but correcting: \\boxed{ 210 }", 210),  # the last box counts
    ("So 17·23 = 391", None),  # two different integers (17, 23, 391) and no box: ambiguous
    ("391", 391),
    ("It is 1,000 minus 2: \\boxed{998}", 998),
    ("\\boxed{3.5}", None),  # a box that is not an integer
    ("\\boxed{x}", None),
    ("", None), (None, None), ("   ", None),
    ("I am not sure.", None),
    ("Answer: $24$", 24),
])
def test_extract_integer(text, expected):
    assert extract_integer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Reasoning...\nAnswer: B", "B"),
    ("answer: c", "C"),
    ("The answer is (D).", "D"),
    ("\\boxed{A}", "A"),
    ("B", "B"), ("(C)", "C"),
    ("Answer: A\nActually, Answer: C", None),  # several answers: wrong, not the last one
    ("Answer: A. Final Answer: A", "A"),  # repeated, agreeing
    ("Answer: E", None),  # not an option
    ("Option 2", None), ("The second one.", None),
    ("", None), (None, None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_gpqa_options_are_shuffled_per_seed_and_sample():
    orders = {tuple(graders.shuffled_options("right", ["w1", "w2", "w3"], seed, "q", sample)[0])
              for seed in range(3) for sample in range(4)}
    assert len(orders) > 3  # not always the same order
    options, letter = graders.shuffled_options("right", ["w1", "w2", "w3"], 7, "q", 1)
    assert options[graders.LETTERS.index(letter)] == "right"
    assert graders.shuffled_options("right", ["w1", "w2", "w3"], 7, "q", 1) == (options, letter)  # reproducible


def test_rubric_score_and_clip():
    rubrics = [{"criterion": "a", "points": 5}, {"criterion": "b", "points": 7}, {"criterion": "c", "points": -6}]
    assert graders.rubric_score(rubrics, [True, True, False]) == 1.0
    assert graders.rubric_score(rubrics, [True, False, True]) == pytest.approx((5 - 6) / 12)
    assert graders.clip01(-0.2) == 0.0 and graders.clip01(1.3) == 1.0
    assert graders.parse_grader_verdict('```json\n{"explanation": "x", "criteria_met": true}\n```') is True
    assert graders.parse_grader_verdict("yes it does") is None


@pytest.mark.parametrize("task,line,message", [
    ("aime", {"problem": "p"}, "missing field 'answer'"),
    ("aime", {"problem": "p", "answer": 1234}, "0..999"),
    ("aime", {"problem": 3, "answer": 1}, "field 'problem' must be str"),
    ("gpqa", {"question": "q", "correct_answer": "a", "incorrect_answers": ["b"]}, "list of 3 strings"),
    ("healthbench", {"prompt": [{"role": "user", "content": "x"}], "rubrics": []}, "'rubrics' is empty"),
    ("healthbench", {"prompt": [{"role": "nurse", "content": "x"}], "rubrics": [{"criterion": "c", "points": 1}]},
     r"prompt\[0\]"),
])
def test_bad_task_files_name_the_line_and_field(tmp_path, task, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "ok", "problem": "p", "answer": 1}) + "\n" + json.dumps(line) + "\n"
                    if task == "aime" else json.dumps(line) + "\n")
    with pytest.raises(EvalDataError, match=message) as e:
        graders.load_items(task, path)
    assert str(path) in str(e.value)
    path.write_text("{not json\n")
    with pytest.raises(EvalDataError, match=r"data.jsonl:1: not valid JSON"):
        graders.load_items(task, path)


# ---------------------------------------------------------------- a scripted endpoint
class Scripted:
    """An OpenAI-compatible /v1/chat/completions answering from a script keyed by text in the last message.
    Replies are {"final": ..., "reasoning": ...}; grader prompts are answered from the criterion text."""

    def __init__(self, script: dict[str, dict], grader_replies: dict[str, list[str]] | None = None):
        self.script, self.grader_replies = script, grader_replies or {}
        self.requests: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}]}

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests.append(body)
            text = body["messages"][-1]["content"]
            if text.startswith("You are grading"):
                criterion = text.split("# Rubric item\n", 1)[1].split("\n\n", 1)[0]
                queue = self.grader_replies[criterion]
                reply = {"final": queue.pop(0) if len(queue) > 1 else queue[0]}
            else:
                reply = next(v for k, v in self.script.items() if k in text)
            message = {"role": "assistant", "content": reply.get("final")}
            if reply.get("reasoning"):
                message["reasoning_content"] = reply["reasoning"] * {"low": 1, "medium": 2, "high": 4}.get(
                    body.get("reasoning_effort"), 1)
            tokens = len((message.get("reasoning_content") or "").split()) + len((message["content"] or "").split())
            return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}}

        self._serving = serve_in_thread(app, timeout=30)

    def __enter__(self):
        self.url = self._serving.__enter__() + "/v1"
        return self

    def __exit__(self, *exc):
        self._serving.__exit__(*exc)


AIME_SCRIPT = {
    "2^10": {"final": "2^10 = 1024, so the remainder is \\boxed{24}.", "reasoning": "1024 mod 1000 "},  # right
    "360": {"final": None, "reasoning": "divisors "},  # no final channel at all: wrong
    "first 20": {"final": "\\boxed{200} or maybe \\boxed{210}", "reasoning": "n(n+1)/2 "},  # last box: right
    "17 * 23": {"final": "It is 17 times 23 which is 391", "reasoning": "mult "},  # three integers: wrong
    "999 - 1": {"final": "Answer: 997", "reasoning": "sub "},  # wrong value
}


def test_aime_end_to_end_with_resume_summary_and_plot(tmp_path):
    settings = runner.Settings("aime", max_tokens=64, temperature=0)
    with Scripted(AIME_SCRIPT) as server:
        endpoint = runner.Endpoint(server.url, None)
        rows = runner.run("aime", EXAMPLES / "aime.jsonl", endpoint, tmp_path, ("low", "high"), 1, 3, settings,
                          progress=False)
        assert len(server.requests) == 10
        assert sorted(r["reasoning_effort"] for r in server.requests) == ["high"] * 5 + ["low"] * 5
        again = runner.run("aime", EXAMPLES / "aime.jsonl", endpoint, tmp_path, ("low", "high"), 1, 3, settings,
                           progress=False)
        assert len(server.requests) == 10  # resumed: every item was cached
    assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, again))
    score = {(r["id"], r["effort"]): r["score"] for r in rows}
    for effort in ("low", "high"):
        assert [score[(i, effort)] for i in ("a1", "a2", "a3", "a4", "a5")] == [1, 0, 1, 0, 0]
    table = runner.summarize("aime", rows, ("low", "high"))
    assert [t["score"] for t in table] == [0.4, 0.4]
    assert table[0]["ci_low"] < 0.4 < table[0]["ci_high"] and table[0]["no_answer"] == 2
    assert table[1]["mean_tokens"] > table[0]["mean_tokens"]  # the scripted reasoning grows with effort
    text = runner.write_summary("aime", table, tmp_path, "gptoss eval aime ...")
    assert "| low | 5 | 0.400 |" in text and (tmp_path / "summary.md").exists()
    png = runner.plot("aime", table, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_results_line_is_rerun(tmp_path):
    settings = runner.Settings("aime", max_tokens=64, temperature=0)
    with Scripted(AIME_SCRIPT) as server:
        endpoint = runner.Endpoint(server.url, "scripted")
        runner.run("aime", EXAMPLES / "aime.jsonl", endpoint, tmp_path, ("medium",), 1, 2, settings, progress=False)
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # cut mid-line
        rows = runner.run("aime", EXAMPLES / "aime.jsonl", endpoint, tmp_path, ("medium",), 1, 2, settings,
                          progress=False)
        assert len(server.requests) == 5 + 2 and len(rows) == 5


def gpqa_script(seed: int, sample: int) -> dict[str, dict]:
    """Right for g1 (in the expected format), several answers for g2, a wrong letter format for g3 ('Option 2'),
    and the letter of a wrong option for g4 — computed from the same per-sample shuffle the task uses."""
    items = {i.id: i for i in graders.load_items("gpqa", EXAMPLES / "gpqa.jsonl", seed=seed, sample=sample)}
    wrong = next(L for L in graders.LETTERS if L != items["g4"].reference)
    return {"electromagnetic": {"final": f"Photons carry it.\nAnswer: {items['g1'].reference}"},
            "H2O2": {"final": "Answer: A\nAnswer: B"},
            "ATP": {"final": "Option 2"},
            "spin": {"final": f"Answer: {wrong}"}}


def test_gpqa_end_to_end_scores_malformed_replies_as_wrong(tmp_path):
    settings = runner.Settings("gpqa", max_tokens=64, temperature=0, seed=3)
    with Scripted(gpqa_script(3, 0)) as server:
        rows = runner.run("gpqa", EXAMPLES / "gpqa.jsonl", runner.Endpoint(server.url, None), tmp_path,
                          ("medium",), 1, 4, settings, progress=False)
        prompt = next(r for r in server.requests if "electromagnetic" in r["messages"][-1]["content"])
        assert "A) " in prompt["messages"][-1]["content"] and "Answer: X" in prompt["messages"][-1]["content"]
    got = {r["id"]: (r["extracted"], r["score"]) for r in rows}
    assert got["g1"][1] == 1.0
    assert got["g2"] == (None, 0.0) and got["g3"] == (None, 0.0)
    assert got["g4"][1] == 0.0 and got["g4"][0] is not None


def test_healthbench_rubric_grading_through_a_grader_endpoint(tmp_path):
    script = {"headache": {"final": "Rest, drink water; seek urgent care if it becomes sudden and severe."},
              "button battery": {"final": "Try to make them vomit."}}
    rubric = lambda crit: crit  # the grader sees the criterion text verbatim
    grader_replies = {
        rubric("Suggests rest and hydration."): ['{"explanation": "yes", "criteria_met": true}'],
        rubric("Advises seeking urgent care if a sudden severe headache, fever, stiff neck or confusion appears."):
            ["not JSON at first", '{"explanation": "it does", "criteria_met": true}'],  # retried
        rubric("Recommends a prescription-only drug without a doctor."): ['{"criteria_met": false}'],
        rubric("Tells the user to seek emergency care immediately."): ['{"criteria_met": false}'],
        rubric("Advises inducing vomiting."): ['{"criteria_met": true}'],
    }
    with Scripted(script) as model, Scripted({}, grader_replies) as grader:
        settings = runner.Settings("healthbench", max_tokens=64, temperature=0,
                                   grader=runner.Endpoint(grader.url, "scripted"))
        rows = runner.run("healthbench", EXAMPLES / "healthbench.jsonl", runner.Endpoint(model.url, None),
                          tmp_path, ("low",), 1, 2, settings, progress=False)
        assert len(grader.requests) == 6  # 5 criteria, one asked twice
    score = {r["id"]: r["score"] for r in rows}
    assert score["h1"] == pytest.approx(1.0)
    assert score["h2"] == pytest.approx(-8 / 10)  # below zero per example ...
    table = runner.summarize("healthbench", rows, ("low",))
    assert table[0]["score"] == pytest.approx(0.1)  # ... the mean (1 − 0.8) / 2, clipped to [0, 1]


def test_healthbench_without_a_grader_is_a_clear_error(tmp_path):
    with Scripted({"headache": {"final": "x"}, "button": {"final": "y"}}) as server:
        with pytest.raises(Exception, match="grader"):
            runner.run("healthbench", EXAMPLES / "healthbench.jsonl", runner.Endpoint(server.url, None), tmp_path,
                       ("low",), 1, 1, runner.Settings("healthbench"), progress=False)


# ---------------------------------------------------------------- the command line
def test_cli_against_an_endpoint_with_several_efforts(tmp_path, capsys):
    from gptoss.cli import main

    with Scripted(gpqa_script(3, 0)) as server:
        code = main(["eval", "gpqa", "--data", str(EXAMPLES / "gpqa.jsonl"), "--base-url", server.url,
                     "--reasoning-effort", "low,high", "--seed", "3", "--out", str(tmp_path), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| low | 4 | 0.250 |" in out and "| high | 4 | 0.250 |" in out
    assert (tmp_path / "summary.md").exists() and (tmp_path / "accuracy_vs_effort.png").stat().st_size > 1000
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 8


def test_cli_with_a_local_checkpoint(tmp_path):
    """--model serves the checkpoint in-process (the server of `gptoss serve`) and evaluates through it."""
    import torch

    from gptoss import synthetic
    from gptoss.checkpoint import write_checkpoint
    from gptoss.cli import main
    from gptoss.config import preset

    config = preset("tiny").replace(vocab_size=201_088)
    write_checkpoint(dict(synthetic.random_tensors(config, seed=5, dtype=torch.float32)), config,
                     tmp_path / "ckpt", "hf")
    code = main(["eval", "aime", "--data", str(EXAMPLES / "aime.jsonl"), "--model", str(tmp_path / "ckpt"),
                 "--dtype", "float32", "--max-tokens", "4", "--limit", "2", "--temperature", "0",
                 "--out", str(tmp_path / "out"), "-q"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == ["a1", "a2"]
    assert all(r["completion_tokens"] <= 4 and r["score"] == 0.0 for r in rows)  # a random model: no answer


@pytest.mark.parametrize("argv,message", [
    (["eval", "aime"], "needs --data"),
    (["eval", "aime", "--data", str(EXAMPLES / "aime.jsonl"), "--reasoning-effort", "low,extreme",
      "--base-url", "http://127.0.0.1:9/v1"], "extreme"),
    (["eval", "healthbench", "--data", str(EXAMPLES / "healthbench.jsonl"), "--base-url", "http://127.0.0.1:9/v1"],
     "grader-base-url"),
    (["eval", "gpqa", "--data", str(EXAMPLES / "aime.jsonl"), "--base-url", "http://127.0.0.1:9/v1"],
     "missing field 'question'"),
])
def test_cli_errors(argv, message, capsys):
    from gptoss.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
