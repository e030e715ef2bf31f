"""`gptoss eval TASK --data FILE`: ask an OpenAI-compatible endpoint (ours or any), grade as openai/gpt-oss's eval
code does, cache per (item, effort, sample) so that a rerun resumes, and report per reasoning effort.

    gptoss eval aime --data aime2025-I.jsonl --model path/to/gpt-oss-20b
    gptoss eval gpqa --data gpqa_diamond.csv --base-url http://127.0.0.1:8000/v1 --concurrency 64
    gptoss eval healthbench --data hard_2025-05-08-21-00-10.jsonl --base-url URL \
        --grader-base-url https://api.openai.com/v1

Defaults are the reference's (gpt_oss/evals/__main__.py): efforts low, medium and high; temperature 1.0; 8 samples
per question for aime and gpqa, 1 for healthbench; no output limit below the context (the reference asks for
131,072 tokens); gpt-4.1-2025-04-14 as the HealthBench grader. `--model` serves a checkpoint in-process (the server
of `gptoss serve`, on a loopback port), so the local engine and a remote endpoint go through one client path.

Output folder: results.jsonl (one line per item × effort × sample, appended as they finish), summary.md (the
table), summary.json and one `{eval}_{model}-{effort}_temp{T}.json` per effort with the reference's field names
(so its result files and ours compare by script), accuracy_vs_effort.png when several efforts ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GptOssError
from . import datasets, graders
from .datasets import Job

EFFORTS = ("low", "medium", "high")
SAMPLES = {"aime": 8, "gpqa": 8, "healthbench": 1}  # the reference's n_repeats
GRADER_ATTEMPTS = 10  # the reference asks the grader again without end; we stop and name the item


@dataclass
class Endpoint:
    """An OpenAI-compatible chat completions endpoint. api_key None: $OPENAI_API_KEY, else a placeholder."""

    base_url: str
    model: str | None
    api_key: str | None = None
    timeout: float = 24 * 3600.0  # long reasoning at high effort; the reference waits a day too

    def client(self):
        try:
            import openai
        except ImportError:
            raise GptOssError("gptoss eval talks to the endpoint with the openai package, which is not installed: "
                              "pip install 'gptoss[eval]' (or pip install openai)") from None

        key = self.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        return openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=2)

    def resolve_model(self) -> str:
        """The model id to send: as given, or the endpoint's first model when none was given."""
        if self.model:
            return self.model
        models = self.client().models.list().data
        if not models:
            raise GptOssError(f"{self.base_url}: /models lists no model; pass --served-model")
        return models[0].id


@contextlib.contextmanager
def local_endpoint(model_path: str | None, device=None, dtype: str = "bfloat16", concurrency: int = 8,
                   progress: bool = True) -> Iterator[Endpoint]:
    """Serve a checkpoint (or the embedded demo model when None) on 127.0.0.1 for the duration."""
    from ..engine import Engine
    from ..loading import load_model, model_path as resolve
    from ..server import create_app, model_name_for, serve_in_thread

    path = resolve(model_path)
    model = load_model(path, device=device, dtype=dtype, progress=progress)
    name = "gptoss-demo" if model_path is None else model_name_for(path)
    with Engine(model, max_concurrency=max(1, concurrency)) as engine, \
            serve_in_thread(create_app(engine, name)) as url:
        yield Endpoint(url + "/v1", name)


# ---------------------------------------------------------------- one job
@dataclass
class Settings:
    """How to ask and grade. max_tokens None: not sent (the endpoint allows up to its context)."""

    task: str
    max_tokens: int | None = None
    temperature: float = 1.0
    seed: int = 0
    strict: bool = False
    grader: Endpoint | None = None
    grader_temperature: float = graders.GRADER_TEMPERATURE
    grader_max_tokens: int = graders.GRADER_MAX_TOKENS


def ask(client, model: str, messages: list[dict[str, str]], effort: str, s: Settings, sample: int) -> dict[str, Any]:
    """One completion. A 400 from the endpoint (e.g. a prompt over the context) is scored as an empty reply, as
    the reference's samplers do, with the error kept in the row."""
    import openai

    kwargs = {"max_tokens": s.max_tokens} if s.max_tokens is not None else {}
    try:
        r = client.chat.completions.create(model=model, messages=messages, reasoning_effort=effort,
                                           temperature=s.temperature, seed=s.seed * 1000 + sample, **kwargs)
    except openai.BadRequestError as e:
        return {"final": "", "reasoning": None, "finish_reason": None, "completion_tokens": None, "error": str(e)}
    choice = r.choices[0]
    message = choice.message
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    return {"final": message.content, "reasoning": reasoning, "finish_reason": choice.finish_reason,
            "completion_tokens": r.usage.completion_tokens if r.usage else None}


def grade_answer(task: str, final: str | None, expected: Any, strict: bool) -> dict[str, Any]:
    """aime and gpqa: the extracted answer and a score of 1 or 0 (pure: rerun on cached rows when the mode changes)."""
    if task == "aime":
        got = graders.extract_integer(final) if strict else graders.reference_aime_answer(final)
    else:
        got = graders.extract_letter(final) if strict else graders.reference_letter(final)
    return {"extracted": got, "score": float(got == expected)}


def grade_rubrics(job: Job, reply: str, s: Settings) -> dict[str, Any]:
    """healthbench: one grader call per rubric item (asked again while its reply has no JSON boolean)."""
    if s.grader is None:
        raise GptOssError("healthbench needs a grader model: pass --grader-base-url (and --grader-model)")
    client, model = s.grader.client(), s.grader.resolve_model()
    graded = []
    for rubric in job.expected:
        messages = [{"role": "system", "content": graders.GRADER_SYSTEM_MESSAGE},
                    {"role": "user", "content": graders.grader_prompt(job.messages, reply, rubric)}]
        for _ in range(GRADER_ATTEMPTS):
            r = client.chat.completions.create(model=model, messages=messages, temperature=s.grader_temperature,
                                               max_tokens=s.grader_max_tokens)
            parsed = graders.parse_grader_reply(r.choices[0].message.content)
            met = graders.verdict(parsed)
            if met is not None:
                break
        else:
            raise GptOssError(f"{job.item.where}: the grader gave no JSON criteria_met in {GRADER_ATTEMPTS} tries "
                              f"for the rubric item {graders.rubric_line(rubric)[:80]!r}")
        graded.append({**rubric, "criteria_met": met, "explanation": parsed.get("explanation",
                                                                                "No explanation provided")})
    met = [g["criteria_met"] for g in graded]
    metrics = graders.example_metrics(job.expected, met, job.extra["example_tags"])
    return {"rubric_items": graded, "metrics": metrics, "score": metrics["overall_score"]}


# ---------------------------------------------------------------- the run
def key(item_id: str, effort: str, sample: int) -> str:
    return f"{item_id}|{effort}|{sample}"


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[key(row["id"], row["effort"], row["sample"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run: that job runs again
    return done


def run(task: str, data: str | Path, endpoint: Endpoint, out: str | Path, efforts: tuple[str, ...] = EFFORTS,
        samples: int | None = None, concurrency: int = 4, settings: Settings | None = None,
        limit: int | None = None, examples: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Every (item, effort, sample) not yet in out/results.jsonl, asked, graded and appended; returns the rows of
    this layout (aime and gpqa rows regraded with the current extraction mode)."""
    s = settings or Settings(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = read_done(results_path)
    layout = datasets.jobs(task, datasets.load_items(task, data), samples or SAMPLES[task], s.seed, examples, limit)
    todo = [(job, effort) for effort in efforts for job in layout
            if key(job.item.id, effort, job.sample) not in done]
    model = endpoint.resolve_model() if todo else endpoint.model
    client = endpoint.client() if todo else None
    lock = threading.Lock()

    def one(job: Job, effort: str) -> dict[str, Any]:
        t = time.perf_counter()
        reply = ask(client, model, job.messages, effort, s, job.sample)
        final = reply["final"] or ""
        row = {"id": job.item.id, "effort": effort, "sample": job.sample, "model": model, **reply,
               "chars": len(final), "expected": job.expected if task != "healthbench" else None, **job.extra}
        row.update(grade_rubrics(job, final, s) if task == "healthbench"
                   else grade_answer(task, reply["final"], job.expected, s.strict))
        row["seconds"] = time.perf_counter() - t
        with lock, open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"eval {task}", unit="reply")
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(one, *t) for t in todo]
        for future in as_completed(futures):
            row = future.result()
            done[key(row["id"], row["effort"], row["sample"])] = row
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    rows = []
    for effort in efforts:
        for job in layout:
            row = dict(done[key(job.item.id, effort, job.sample)])
            if task != "healthbench":
                row.update(grade_answer(task, row["final"], row["expected"], s.strict))
            rows.append(row)
    return rows


# ---------------------------------------------------------------- summary
Z95 = 1.959964


def wilson(k: float, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval for k successes in n (E. B. Wilson, JASA 22(158), 1927, eq. for the
    "probable limits")."""
    p, z = k / n, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def confidence_interval(per_question: list[list[float]], binary: bool) -> tuple[float, float]:
    """95% interval of the mean score. One right/wrong sample per question: Wilson. Several samples per question
    are not independent draws: the interval comes from the per-question means, n = questions (clustered
    standard error; E. Miller, "Adding Error Bars to Evals", arXiv:2411.00640, sections 2 and 3)."""
    n = len(per_question)
    if binary and all(len(q) == 1 for q in per_question):
        return wilson(sum(q[0] for q in per_question), n)
    means = np.array([np.mean(q) for q in per_question])
    if binary and means.min() == means.max() in (0.0, 1.0):  # all right or all wrong: no spread to measure
        return wilson(float(means.sum()), n)
    se = float(np.std(means, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    lo, hi = float(means.mean()) - Z95 * se, float(means.mean()) + Z95 * se
    return (max(0.0, lo), min(1.0, hi)) if binary else (lo, hi)  # an accuracy lies in [0, 1]


def summarize(task: str, rows: list[dict[str, Any]], efforts: tuple[str, ...], seed: int = 0
              ) -> list[dict[str, Any]]:
    """Per effort: our table's fields and, under "metrics", the reference's result fields."""
    table = []
    for effort in efforts:
        mine = [r for r in rows if r["effort"] == effort]
        if not mine:
            continue
        by_question: dict[str, list[float]] = defaultdict(list)
        for r in mine:
            by_question[r["id"]].append(r["score"])
        if task == "healthbench":
            metrics = graders.healthbench_metrics([r["metrics"] for r in mine], np.random.default_rng(seed))
            score = metrics["score"]
            lo, hi = (graders.clipped_mean([x]) for x in confidence_interval(list(by_question.values()), False))
        else:
            metrics = graders.binary_metrics([r["score"] for r in mine], [r["chars"] for r in mine])
            score = metrics["score"]
            lo, hi = confidence_interval(list(by_question.values()), True)
        tokens = [r["completion_tokens"] for r in mine if r.get("completion_tokens") is not None]
        table.append({"effort": effort, "n": len(mine), "questions": len(by_question), "score": score,
                      "ci_low": lo, "ci_high": hi,
                      "mean_tokens": sum(tokens) / len(tokens) if tokens else float("nan"),
                      "no_answer": sum(1 for r in mine if task != "healthbench" and r.get("extracted") is None),
                      "errors": sum(1 for r in mine if r.get("error")),
                      "seconds": sum(r.get("seconds", 0.0) for r in mine), "metrics": metrics})
    return table


def write_summary(task: str, table: list[dict[str, Any]], out: Path, command: str, strict: bool = False) -> str:
    metric = "score" if task == "healthbench" else "accuracy"
    grading = "--strict extraction" if strict else "the reference's extraction (openai/gpt-oss gpt_oss/evals)"
    lines = [f"# gptoss eval {task}", "", f"`{command}`", "", f"Graded with {grading}.", "",
             f"| effort | n (questions × samples) | {metric} | 95% CI | mean completion tokens | no answer extracted "
             "| errors | time (s, summed) |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in table:
        samples = r["n"] // max(1, r["questions"])
        lines.append(f"| {r['effort']} | {r['n']} ({r['questions']} × {samples}) | {r['score']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['mean_tokens']:.0f} | {r['no_answer']} | "
                     f"{r['errors']} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text


def reference_model_name(model: str, effort: str) -> str:
    """The reference's model_name: "{model}-{effort}", "/" replaced by "__" (gpt_oss/evals/__main__.py)."""
    return f"{model}-{effort}".replace("/", "__")


def write_json(eval_name: str, model: str, temperature: float, table: list[dict[str, Any]], out: Path,
               settings: dict[str, Any]) -> list[Path]:
    """Per effort, `{eval}_{model}-{effort}_temp{T}.json` holding what the reference writes to its result file
    (its metrics and "score", keys sorted); and summary.json: one entry per effort with the fields of the
    reference's merge_metrics (eval_name, model_name, metric) plus ours."""
    paths, entries = [], []
    for r in table:
        name = reference_model_name(model, r["effort"])
        path = out / f"{eval_name}_{name}_temp{temperature}.json"
        path.write_text(json.dumps(dict(sorted(r["metrics"].items())), indent=2), encoding="utf-8")
        paths.append(path)
        entries.append({"eval_name": eval_name, "model_name": name, "metric": r["score"],
                        "metrics": dict(sorted(r["metrics"].items())), "reasoning_effort": r["effort"],
                        **{k: r[k] for k in ("n", "questions", "ci_low", "ci_high", "mean_tokens", "no_answer",
                                             "errors")}})
    summary = out / "summary.json"
    summary.write_text(json.dumps({"settings": settings, "results": entries}, indent=2, default=_json_number),
                       encoding="utf-8")
    return [*paths, summary]


def _json_number(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def plot(task: str, table: list[dict[str, Any]], out: Path) -> Path | None:
    """Accuracy (with its interval) against mean completion tokens, one point per effort."""
    if len(table) < 2:
        return None
    try:
        import matplotlib
    except ImportError:
        print("gptoss eval: no plot: matplotlib is not installed (pip install 'gptoss[eval]')", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["mean_tokens"] for r in table]
    y = [r["score"] for r in table]
    err = [[max(0.0, r["score"] - r["ci_low"]) for r in table], [max(0.0, r["ci_high"] - r["score"]) for r in table]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
    for r in table:
        ax.annotate(r["effort"], (r["mean_tokens"], r["score"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("mean completion tokens")
    ax.set_ylabel("score" if task == "healthbench" else "accuracy")
    ax.set_title(f"{task}: accuracy vs reasoning effort")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    path = out / "accuracy_vs_effort.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line
def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=False, help="the task's file as published (JSONL, JSON, CSV or Parquet; "
                                                  "the columns read are listed in gptoss.evals.datasets)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="the endpoint's key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--served-model", default=None, help="model id at --base-url (default: its first model)")
    p.add_argument("--samples", type=int, default=None,
                   help="answers per question (default as the reference: aime and gpqa 8, healthbench 1); gpqa "
                        "draws a new option order for each")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the reference's: 1.0)")
    p.add_argument("--strict", action="store_true",
                   help="aime/gpqa: our stricter extraction (no answer when the reply has none or several) instead "
                        "of the reference's (last number; first pattern, else the first character)")
    p.add_argument("--examples", type=int, default=None,
                   help="a seeded random subset of N questions, drawn as the reference's --examples")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (option orders as in the "
                                                          "full run)")
    p.add_argument("--eval-name", default=None, help="the name in the JSON result files (default: the task; the "
                                                     "reference's are aime25, gpqa, healthbench, healthbench_hard, "
                                                     "healthbench_consensus)")
    p.add_argument("--grader-base-url", default=None, help="healthbench: the grader model's endpoint")
    p.add_argument("--grader-model", default=graders.GRADER_MODEL,
                   help=f"healthbench: the grader model (default: the reference's, {graders.GRADER_MODEL})")
    p.add_argument("--grader-api-key", default=None, help="the grader endpoint's key (default: $OPENAI_API_KEY)")


def parse_efforts(text: str | None) -> tuple[str, ...]:
    if text is None:
        return EFFORTS
    efforts = tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in efforts if e not in EFFORTS]
    if bad or not efforts:
        raise GptOssError(f"--reasoning-effort: {', '.join(bad) or text!r} is not one of low, medium, high")
    return efforts


@contextlib.contextmanager
def _endpoint_errors(api_error, out: Path) -> Iterator[None]:
    """An endpoint that cannot be reached or refuses (wrong URL, key, model id) as one line naming its URL."""
    try:
        yield
    except api_error as e:
        url = getattr(getattr(e, "request", None), "url", None)
        status = getattr(e, "status_code", None)
        raise GptOssError(f"{url or 'the endpoint'}: {type(e).__name__}{f' ({status})' if status else ''}: "
                          f"{getattr(e, 'message', e)}; replies so far are kept in {out / 'results.jsonl'}, a rerun "
                          "resumes") from None


def eval_command(args: argparse.Namespace) -> None:
    if not args.data:
        raise GptOssError(f"gptoss eval {args.task} needs --data FILE (datasets are never downloaded; "
                          "gptoss.evals.datasets lists the files it reads)")
    efforts = parse_efforts(args.reasoning_effort)
    for name in ("samples", "concurrency", "max_tokens", "examples", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GptOssError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    seed = args.seed or 0
    datasets.jobs(args.task, datasets.load_items(args.task, args.data), 1, seed, args.examples,
                  args.limit)  # a bad file or --examples fails before a model loads
    grader = None
    if args.task == "healthbench":
        if not args.grader_base_url:
            raise GptOssError("healthbench needs --grader-base-url (an OpenAI-compatible grader model; the "
                              f"reference grades with {graders.GRADER_MODEL} at https://api.openai.com/v1)")
        grader = Endpoint(args.grader_base_url, args.grader_model, args.grader_api_key)
    settings = Settings(args.task, max_tokens=args.max_tokens, temperature=args.temperature, seed=seed,
                        strict=args.strict, grader=grader)
    samples = args.samples or SAMPLES[args.task]
    out = Path(args.out or f"eval-{args.task}")
    try:
        import openai

        api_error: type[Exception] | tuple = openai.APIError
    except ImportError:  # Endpoint.client names the missing extra
        api_error = ()
    with contextlib.ExitStack() as stack, _endpoint_errors(api_error, out):
        if args.base_url:
            endpoint = Endpoint(args.base_url, args.served_model, args.api_key)
        else:
            endpoint = stack.enter_context(local_endpoint(args.model, args.device, args.dtype, args.concurrency,
                                                          progress=not args.quiet))
        t = time.perf_counter()
        model = endpoint.resolve_model()
        rows = run(args.task, args.data, Endpoint(endpoint.base_url, model, endpoint.api_key), out, efforts,
                   samples, args.concurrency, settings, args.limit, args.examples, progress=not args.quiet)
    table = summarize(args.task, rows, efforts, seed)
    text = write_summary(args.task, table, out, "gptoss " + " ".join(sys.argv[1:]), args.strict)
    files = write_json(args.eval_name or args.task, model, args.temperature, table, out,
                       {"task": args.task, "data": str(args.data), "model": model, "efforts": list(efforts),
                        "samples": samples, "temperature": args.temperature, "max_tokens": args.max_tokens,
                        "seed": seed, "strict": args.strict, "examples": args.examples, "limit": args.limit,
                        "grader_model": args.grader_model if grader else None})
    figure = plot(args.task, table, out)
    print(text + f"\n{len(rows)} results in {out / 'results.jsonl'} ({time.perf_counter() - t:.0f} s this run); "
          f"JSON: {', '.join(p.name for p in files)}" + (f"; plot {figure}" if figure else ""))
