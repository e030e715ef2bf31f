"""gptoss eval end to end: a scripted OpenAI-compatible endpoint (a real HTTP server on loopback, reached with the
official `openai` client) answers the reference's prompts; the runner grades, caches, resumes and reports (markdown
table, plot, and JSON with the reference's field names); the CLI against an endpoint and against the local engine
gives the same report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from gptoss.evals import datasets, graders, runner
from gptoss.server import serve_in_thread

EXAMPLES = Path(graders.__file__).parent / "examples"
AIME = EXAMPLES / "aime2025-I.jsonl"
GPQA = EXAMPLES / "gpqa_diamond.csv"
HEALTHBENCH = EXAMPLES / "healthbench.jsonl"


class Served:
    """A FastAPI app served in a thread for the length of a `with`; `url` is its /v1 base."""

    def __init__(self, app: FastAPI):
        self._serving = serve_in_thread(app, timeout=30)

    def __enter__(self):
        self.url = self._serving.__enter__() + "/v1"
        return self

    def __exit__(self, *exc):
        self._serving.__exit__(*exc)


class Scripted(Served):
    """An OpenAI-compatible /v1/chat/completions answering from a script keyed by text in the last message.
    Replies are {"final": ..., "reasoning": ...}; grader prompts are answered by grader(rubric line) → text."""

    def __init__(self, script: dict[str, dict], grader=None):
        self.script, self.grader = script, grader
        self.requests: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "org/scripted", "object": "model", "created": 0,
                                                "owned_by": "t"}]}

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests.append(body)
            text = body["messages"][-1]["content"]
            if self.grader is not None:
                rubric = text.split("# Rubric item\n", 1)[1].split("\n\n# Instructions", 1)[0]
                reply = {"final": self.grader(rubric, text)}
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

        super().__init__(app)


AIME_SCRIPT = {  # keyed by text of aime2025-I.jsonl's questions
    "2^{10}": {"final": "2^10 = 1024, so the remainder is \\boxed{24}.", "reasoning": "1024 mod 1000 "},  # right
    "360": {"final": None, "reasoning": "divisors "},  # no final channel at all: wrong
    "first $20$": {"final": "\\boxed{200} or maybe \\boxed{210}", "reasoning": "n(n+1)/2 "},  # last box: right
    "17 \\cdot 23": {"final": "It is 17 times 23 which is 391", "reasoning": "mult "},  # reference: 391, right
    "999 - 1": {"final": "Answer: 997", "reasoning": "sub "},  # wrong value
}


def test_aime_end_to_end_with_resume_summary_json_and_plot(tmp_path):
    settings = runner.Settings("aime", max_tokens=64, temperature=0)
    with Scripted(AIME_SCRIPT) as server:
        endpoint = runner.Endpoint(server.url, None)
        rows = runner.run("aime", AIME, endpoint, tmp_path, ("low", "high"), 2, 3, settings, progress=False)
        assert len(server.requests) == 20  # 5 questions × 2 samples × 2 efforts
        first = next(r for r in server.requests if "2^{10}" in r["messages"][-1]["content"])
        assert first["messages"] == [{"role": "user", "content": graders.aime_prompt(
            "Find the remainder when $2^{10}$ is divided by $1000$.")}]
        assert first["max_tokens"] == 64 and first["temperature"] == 0
        again = runner.run("aime", AIME, endpoint, tmp_path, ("low", "high"), 2, 3, settings, progress=False)
        assert len(server.requests) == 20  # resumed: every reply was cached
        strict = runner.run("aime", AIME, endpoint, tmp_path, ("low", "high"), 2, 3,
                            runner.Settings("aime", strict=True), progress=False)
        assert len(server.requests) == 20  # the cached replies are regraded, not asked again
    assert [(r["id"], r["effort"], r["sample"]) for r in rows] == [(r["id"], r["effort"], r["sample"]) for r in again]
    score = {(r["id"], r["effort"], r["sample"]): r["score"] for r in rows}
    assert [score[(i, "low", 1)] for i in "12345"] == [1, 0, 1, 1, 0]  # the reference reads 391 in the prose
    assert [r["score"] for r in strict if r["effort"] == "low" and r["sample"] == 1] == [1, 0, 1, 0, 0]

    table = runner.summarize("aime", rows, ("low", "high"))
    # "360" has no reply: no answer twice per effort
    assert [(t["score"], t["n"], t["questions"], t["no_answer"]) for t in table] == [(0.6, 10, 5, 2)] * 2
    assert table[0]["ci_low"] < 0.6 < table[0]["ci_high"]
    assert table[1]["mean_tokens"] > table[0]["mean_tokens"]  # the scripted reasoning grows with effort
    text = runner.write_summary("aime", table, tmp_path, "gptoss eval aime ...")
    assert "| low | 10 (5 × 2) | 0.600 |" in text and (tmp_path / "summary.md").exists()
    files = runner.write_json("aime25", "org/scripted", 0.0, table, tmp_path, {"task": "aime"})
    assert [f.name for f in files] == ["aime25_org__scripted-low_temp0.0.json",
                                       "aime25_org__scripted-high_temp0.0.json", "summary.json"]
    low = json.loads(files[0].read_text())
    chars = [len(AIME_SCRIPT[k]["final"] or "") for k in AIME_SCRIPT]
    assert list(low) == ["chars", "chars:std", "score", "score:std"]  # the reference's result file, keys sorted
    assert low["score"] == 0.6 and low["score:std"] == pytest.approx(0.4898979) and low["chars"] == sum(chars) / 5
    summary = json.loads(files[2].read_text())
    assert summary["results"][1] | {"metrics": None} == summary["results"][1] | {
        "eval_name": "aime25", "model_name": "org__scripted-high", "metric": 0.6, "metrics": None}
    png = runner.plot("aime", table, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_results_line_is_rerun(tmp_path):
    settings = runner.Settings("aime", max_tokens=64, temperature=0)
    with Scripted(AIME_SCRIPT) as server:
        endpoint = runner.Endpoint(server.url, "scripted")
        runner.run("aime", AIME, endpoint, tmp_path, ("medium",), 1, 2, settings, progress=False)
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # cut mid-line
        rows = runner.run("aime", AIME, endpoint, tmp_path, ("medium",), 1, 2, settings, progress=False)
        assert len(server.requests) == 5 + 2 and len(rows) == 5


def gpqa_script(samples: int, seed: int = 0) -> dict[str, dict]:
    """recG1 right ("Answer: X"), recG2 two answers (the reference takes the first pattern's first match: A),
    recG3 'Option 2' (the first character, "O"), recG4 the letter of a wrong option, recG5 prose starting with a
    capital C (the reference reads C) — letters computed from the same option orders the task draws."""
    jobs = datasets.jobs("gpqa", datasets.load_items("gpqa", GPQA), samples, seed)
    assert len({j.expected for j in jobs if j.item.id == "recG4"}) >= 1
    g1 = next(j for j in jobs if j.item.id == "recG1")
    wrong = next(L for L in graders.LETTERS if L != next(j for j in jobs if j.item.id == "recG4").expected)
    return {"electromagnetic": {"final": f"Photons carry it.\nAnswer: {g1.expected}"},
            "H2O2": {"final": "Answer: A\nAnswer: B"},
            "ATP": {"final": "Option 2"},
            "spin": {"final": f"Answer: {wrong}"},
            "density": {"final": "Clearly xenon, the heaviest."}}


def test_gpqa_end_to_end(tmp_path):
    settings = runner.Settings("gpqa", max_tokens=64, temperature=0, seed=0)
    with Scripted(gpqa_script(1)) as server:
        rows = runner.run("gpqa", GPQA, runner.Endpoint(server.url, None), tmp_path, ("medium",), 1, 4, settings,
                          progress=False)
        prompt = next(r for r in server.requests if "electromagnetic" in r["messages"][-1]["content"])
    assert "\n(A) " in prompt["messages"][-1]["content"] and prompt["messages"][-1]["content"].endswith(
        "Express your final answer as the corresponding option 'A', 'B', 'C', or 'D'.")
    got = {r["id"]: (r["extracted"], r["expected"], r["score"]) for r in rows}
    assert got["recG1"][2] == 1.0
    assert got["recG2"][0] == "A" and got["recG3"][0] == "O" and got["recG5"][0] == "C"
    assert got["recG4"][2] == 0.0


def test_healthbench_rubric_grading_through_a_grader_endpoint(tmp_path):
    script = {"headache": {"final": "Rest, drink water; seek urgent care if it becomes sudden and severe."},
              "She is 3": {"final": "Try to make them vomit."},
              "SOAP": {"final": "S: cough. O: afebrile. A: URI. P: fluids."}}
    met = {"Suggests rest": True, "Advises seeking urgent": True, "prescription-only": False,
           "emergency care immediately": False, "inducing vomiting": True, "clearly says to go": False,
           "Includes Subjective": True, "Invents a fever": False, "Is concise": True}
    asked = {}

    def grader(rubric, prompt):
        key = next(k for k in met if k in rubric)
        asked[key] = asked.get(key, 0) + 1
        if key == "Advises seeking urgent" and asked[key] == 1:
            return 'Sure: {"criteria_met": true}'  # prose around the JSON: the reference asks again
        return f'```json\n{{"explanation": "scripted", "criteria_met": {str(met[key]).lower()}}}\n```'

    with Scripted(script) as model, Scripted({}, grader) as judge:
        settings = runner.Settings("healthbench", max_tokens=64, temperature=0,
                                   grader=runner.Endpoint(judge.url, "judge"))
        rows = runner.run("healthbench", HEALTHBENCH, runner.Endpoint(model.url, None), tmp_path, ("low",), None, 2,
                          settings, progress=False)
        assert len(judge.requests) == 10  # 9 rubric items, one asked twice
        first = judge.requests[0]
        assert first["model"] == "judge" and first["temperature"] == 0.5 and first["max_tokens"] == 2048
        assert first["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    score = {r["id"]: r["score"] for r in rows}
    assert score == {"hb-1": pytest.approx(12 / 12), "hb-2": pytest.approx(-8 / 15), "hb-3": pytest.approx(8 / 8)}
    hb2 = next(r for r in rows if r["id"] == "hb-2")
    assert hb2["metrics"]["level:cluster"] == 0.0 and hb2["metrics"]["theme:emergency_referrals"] == hb2["score"]
    table = runner.summarize("healthbench", rows, ("low",))
    metrics = table[0]["metrics"]
    assert metrics["score"] == pytest.approx((1 - 8 / 15 + 1) / 3) == metrics["overall_score"]
    assert metrics["score:n_samples"] == 3 and metrics["theme:emergency_referrals:n_samples"] == 1
    assert metrics["theme:emergency_referrals"] == 0.0  # the mean over its one example, clipped to [0, 1]
    assert 0 < metrics["score:bootstrap_std"] < 0.5


def test_healthbench_without_a_grader_is_a_clear_error(tmp_path):
    with Scripted({"": {"final": "x"}}) as server:
        with pytest.raises(Exception, match="grader"):
            runner.run("healthbench", HEALTHBENCH, runner.Endpoint(server.url, None), tmp_path, ("low",), 1, 1,
                       runner.Settings("healthbench"), progress=False)


def test_a_bad_request_is_scored_as_an_empty_reply(tmp_path):
    """The reference's samplers score a 400 (e.g. a prompt over the context) as an empty reply; so do we."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    def complete():
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": "too long", "type": "invalid_request_error"}}, status_code=400)

    with serve_in_thread(app, timeout=30) as url:
        rows = runner.run("aime", AIME, runner.Endpoint(url + "/v1", None), tmp_path, ("low",), 1, 2,
                          runner.Settings("aime"), progress=False)
    assert all(r["final"] == "" and r["score"] == 0.0 and "too long" in r["error"] for r in rows)
    assert runner.summarize("aime", rows, ("low",))[0]["errors"] == 5


# ---------------------------------------------------------------- the command line
def test_cli_against_an_endpoint_with_the_reference_defaults(tmp_path, capsys):
    from gptoss.cli import main

    with Scripted(gpqa_script(8)) as server:
        code = main(["eval", "gpqa", "--data", str(GPQA), "--base-url", server.url, "--out", str(tmp_path), "-q",
                     "--concurrency", "8"])
        assert {r["reasoning_effort"] for r in server.requests} == {"low", "medium", "high"}
        assert all("max_tokens" not in r and r["temperature"] == 1.0 for r in server.requests)
    assert code == 0
    out = capsys.readouterr().out
    assert "| low | 40 (5 × 8) |" in out and "| high | 40 (5 × 8) |" in out
    assert (tmp_path / "summary.md").exists() and (tmp_path / "accuracy_vs_effort.png").stat().st_size > 1000
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 120
    result = json.loads((tmp_path / "gpqa_org__scripted-medium_temp1.0.json").read_text())
    assert set(result) == {"chars", "chars:std", "score", "score:std"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["model_name"] for e in summary["results"]] == [f"org__scripted-{e}" for e in ("low", "medium", "high")]
    assert summary["settings"]["samples"] == 8 and summary["settings"]["strict"] is False


ARITHMETIC = [("What is 23 + 58?", 81), ("What is 345 - 127?", 218)]


def test_cli_local_engine_and_endpoint_give_the_same_report(tmp_path):
    """The same tiny model (the embedded demo model, fp32, greedy, one request at a time) through `--model`
    (the local engine) and through `--base-url` (a `gptoss serve` app on loopback): the same replies, scores,
    summary table and JSON results."""
    from gptoss.cli import main
    from gptoss.engine import Engine
    from gptoss.loading import load_model
    from gptoss.server import create_app

    data = tmp_path / "arithmetic.jsonl"  # opencompass/AIME2025's layout
    data.write_text("".join(json.dumps({"question": q, "answer": str(a)}) + "\n" for q, a in ARITHMETIC))
    argv = ["eval", "aime", "--data", str(data), "--reasoning-effort", "low,medium", "--samples", "1",
            "--max-tokens", "64", "--temperature", "0", "--concurrency", "1", "--dtype", "float32", "-q"]
    assert main(argv + ["--out", str(tmp_path / "local")]) == 0
    model = load_model(None, dtype="float32", progress=False)
    with Engine(model, max_concurrency=1) as engine, serve_in_thread(create_app(engine, "gptoss-demo")) as url:
        assert main(argv + ["--out", str(tmp_path / "remote"), "--base-url", url + "/v1"]) == 0

    def rows(folder):
        out = [json.loads(line) for line in (tmp_path / folder / "results.jsonl").read_text().splitlines()]
        return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in out),
                      key=lambda r: (r["id"], r["effort"]))

    local, remote = rows("local"), rows("remote")
    assert local == remote and len(local) == 4
    assert all(r["completion_tokens"] <= 64 for r in local) and any(r["final"] for r in local)
    def table(folder):  # summary.md's rows without the time column
        lines = (tmp_path / folder / "summary.md").read_text().splitlines()
        return [line.rsplit("|", 2)[0] for line in lines if line.startswith("| ")]

    assert table("local") == table("remote") and len(table("local")) == 3  # header, low, medium
    for effort in ("low", "medium"):
        name = f"aime_gptoss-demo-{effort}_temp0.0.json"
        assert (tmp_path / "local" / name).read_text() == (tmp_path / "remote" / name).read_text()


@pytest.mark.parametrize("argv,message", [
    (["eval", "aime"], "needs --data"),
    (["eval", "aime", "--data", str(AIME), "--reasoning-effort", "low,extreme", "--base-url", "http://127.0.0.1:9/v1"],
     "extreme"),
    (["eval", "healthbench", "--data", str(HEALTHBENCH), "--base-url", "http://127.0.0.1:9/v1"], "grader-base-url"),
    (["eval", "gpqa", "--data", str(AIME), "--base-url", "http://127.0.0.1:9/v1"], "no question column for gpqa"),
    (["eval", "gpqa", "--data", str(GPQA), "--examples", "50", "--base-url", "http://127.0.0.1:9/v1"],
     "--examples 50: the file has only 5 items"),
    (["eval", "gpqa", "--data", str(GPQA), "--samples", "0", "--base-url", "http://127.0.0.1:9/v1"],
     "--samples must be ≥ 1"),
    (["eval", "aime", "--data", str(AIME), "--base-url", "http://127.0.0.1:9/v1", "-q"],
     "http://127.0.0.1:9/v1/models: APIConnectionError"),
])
def test_cli_errors(argv, message, capsys, tmp_path):
    from gptoss.cli import main

    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_confidence_intervals():
    """Wilson for one right/wrong sample per question (k=3 of n=10: [0.1078, 0.6032], worked by hand from
    Wilson's formula, centre 0.3555, half-width 0.2477); the clustered interval over per-question means otherwise."""
    lo, hi = runner.wilson(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1078, 0.6032)
    assert runner.confidence_interval([[1], [0], [0], [1], [0], [0], [0], [1], [0], [0]], True) == (lo, hi)
    per_question = [[1, 0], [1, 1], [0, 0], [1, 1]]  # means 0.5, 1, 0, 1: sd 0.479, se 0.239
    lo, hi = runner.confidence_interval(per_question, True)
    assert (lo, hi) == (pytest.approx(0.625 - 1.959964 * 0.2393568), 1.0)  # clipped at 1
    assert runner.confidence_interval([[1, 1]] * 5, True) == runner.wilson(5, 5)  # no spread: Wilson over questions
