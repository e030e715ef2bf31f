"""`gptoss eval TASK --data FILE.jsonl`: run a task against an OpenAI-compatible endpoint (ours or any),
grade, cache per item (resumable), summarise with 95% confidence intervals, plot accuracy vs effort.

    gptoss eval aime --data aime.jsonl --model path/to/gpt-oss-20b --reasoning-effort low,medium,high
    gptoss eval gpqa --data gpqa.jsonl --base-url http://127.0.0.1:8000/v1 --samples 4 --concurrency 8
    gptoss eval healthbench --data hb.jsonl --base-url URL --grader-base-url URL2 --grader-model gpt-4.1

`--model` serves the checkpoint in-process (the same server as `gptoss serve`, on a loopback port) so the
local engine and remote endpoints go through one client path. Output folder: results.jsonl (one line per
item × effort × sample, appended as they finish: a rerun skips them), summary.md, and
accuracy_vs_effort.png when several efforts ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GptOssError
from . import graders
from .graders import Item

EFFORTS = ("low", "medium", "high")


@dataclass
class Endpoint:
    """An OpenAI-compatible chat completions endpoint."""

    base_url: str
    model: str
    api_key: str = "unused"
    timeout: float = 600.0

    def client(self):
        try:
            import openai
        except ImportError:
            raise GptOssError("gptoss eval talks to the endpoint with the openai package, which is not installed: "
                              "pip install 'gptoss[eval]' (or pip install openai)") from None

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=2)

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
    import torch

    from ..checkpoint import load
    from ..engine import Engine
    from ..server import create_app, model_name_for, serve_in_thread

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_path is None:
        from .. import demo

        model, name = demo.load(device=device), "gptoss-demo"
    else:
        model = load(model_path, device=device, dtype=getattr(torch, dtype), progress=progress)
        name = model_name_for(model_path)
    with Engine(model, max_concurrency=max(1, concurrency)) as engine, \
            serve_in_thread(create_app(engine, name)) as url:
        yield Endpoint(url + "/v1", name)


# ---------------------------------------------------------------- one item
@dataclass
class Settings:
    task: str
    max_tokens: int = 4096
    temperature: float = 1.0
    seed: int = 0
    grader: Endpoint | None = None


def ask(client, model: str, messages: list[dict[str, str]], effort: str, s: Settings, sample: int) -> dict[str, Any]:
    r = client.chat.completions.create(model=model, messages=messages, reasoning_effort=effort,
                                       max_tokens=s.max_tokens, temperature=s.temperature,
                                       seed=s.seed * 1000 + sample)
    choice = r.choices[0]
    return {"final": choice.message.content, "reasoning": getattr(choice.message, "reasoning_content", None),
            "finish_reason": choice.finish_reason,
            "completion_tokens": r.usage.completion_tokens if r.usage else None}


def grade(item: Item, reply: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Score in [0, 1] (healthbench may go below 0 or above per example; clipped only in the mean)."""
    if s.task == "aime":
        got = graders.extract_integer(reply["final"])
        return {"extracted": got, "expected": item.reference, "score": float(got == item.reference)}
    if s.task == "gpqa":
        got = graders.extract_letter(reply["final"])
        return {"extracted": got, "expected": item.reference, "score": float(got == item.reference)}
    if s.task == "healthbench":
        if s.grader is None:
            raise GptOssError("healthbench needs a grader model: pass --grader-base-url (and --grader-model)")
        client, model = s.grader.client(), s.grader.resolve_model()
        met = []
        for rubric in item.reference:
            prompt = graders.grader_prompt(item.messages, reply["final"] or "", rubric["criterion"])
            verdict = None
            for _ in range(3):  # the grader must answer in JSON; ask again when it does not
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   temperature=0, max_tokens=512)
                verdict = graders.parse_grader_verdict(r.choices[0].message.content)
                if verdict is not None:
                    break
            if verdict is None:
                raise GptOssError(f"grader gave no JSON verdict for item {item.id}, criterion {rubric['criterion']!r}")
            met.append(verdict)
        return {"criteria_met": met, "score": graders.rubric_score(item.reference, met)}
    raise GptOssError(f"unknown task {s.task!r}")


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
                continue  # a line cut short by an interrupted run: that item runs again
    return done


def run(task: str, data: str | Path, endpoint: Endpoint, out: str | Path, efforts: tuple[str, ...] = ("medium",),
        samples: int = 1, concurrency: int = 4, settings: Settings | None = None, limit: int | None = None,
        progress: bool = True) -> list[dict[str, Any]]:
    """Every (item, effort, sample) not yet in out/results.jsonl, graded and appended; returns all rows."""
    s = settings or Settings(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = read_done(results_path)
    jobs = []
    for sample in range(samples):
        items = graders.load_items(task, data, seed=s.seed, sample=sample)[:limit]
        for effort in efforts:
            jobs += [(item, effort, sample) for item in items if key(item.id, effort, sample) not in done]
    model = endpoint.resolve_model() if jobs else endpoint.model
    client = endpoint.client() if jobs else None
    lock = threading.Lock()

    def one(item: Item, effort: str, sample: int) -> dict[str, Any]:
        t = time.perf_counter()
        reply = ask(client, model, item.messages, effort, s, sample)
        row = {"id": item.id, "effort": effort, "sample": sample, **reply, **grade(item, reply, s),
               "seconds": time.perf_counter() - t}
        with lock, open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"eval {task}", unit="item")
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(one, *job) for job in jobs]
        for future in as_completed(futures):
            row = future.result()
            done[key(row["id"], row["effort"], row["sample"])] = row
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return list(done.values())


# ---------------------------------------------------------------- summary
def confidence_interval(scores: list[float], binary: bool) -> tuple[float, float]:
    """95% interval of the mean: Wilson for right/wrong scores, normal approximation otherwise."""
    n = len(scores)
    mean = sum(scores) / n
    z = 1.959964
    if binary:
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half
    sd = statistics.stdev(scores) if n > 1 else 0.0
    return mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def summarize(task: str, rows: list[dict[str, Any]], efforts: tuple[str, ...]) -> list[dict[str, Any]]:
    table = []
    for effort in efforts:
        mine = [r for r in rows if r["effort"] == effort]
        if not mine:
            continue
        scores = [r["score"] for r in mine]
        mean = sum(scores) / len(scores)
        lo, hi = confidence_interval(scores, binary=task != "healthbench")
        if task == "healthbench":  # the benchmark clips the mean over examples to [0, 1]
            mean, lo, hi = graders.clip01(mean), graders.clip01(lo), graders.clip01(hi)
        tokens = [r["completion_tokens"] for r in mine if r.get("completion_tokens") is not None]
        table.append({"effort": effort, "n": len(mine), "score": mean, "ci_low": lo, "ci_high": hi,
                      "mean_tokens": sum(tokens) / len(tokens) if tokens else float("nan"),
                      "no_answer": sum(1 for r in mine if r.get("extracted", 0) is None),
                      "seconds": sum(r.get("seconds", 0.0) for r in mine)})
    return table


def write_summary(task: str, table: list[dict[str, Any]], out: Path, command: str) -> str:
    metric = "score" if task == "healthbench" else "accuracy"
    lines = [f"# gptoss eval {task}", "", f"`{command}`", "",
             f"| effort | n | {metric} | 95% CI | mean completion tokens | no answer extracted | time (s, summed) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['effort']} | {r['n']} | {r['score']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['mean_tokens']:.0f} | {r['no_answer']} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text


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
    err = [[r["score"] - r["ci_low"] for r in table], [r["ci_high"] - r["score"] for r in table]]
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
    p.add_argument("--data", required=False, help="the task's JSONL file (see gptoss.evals.graders for fields)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--served-model", default=None, help="model id at --base-url (default: its first model)")
    p.add_argument("--samples", type=int, default=1, help="answers per item (gpqa reshuffles options per sample)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--grader-base-url", default=None, help="healthbench: the grader model's endpoint")
    p.add_argument("--grader-model", default=None)
    p.add_argument("--grader-api-key", default="unused")


def parse_efforts(text: str) -> tuple[str, ...]:
    efforts = tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in efforts if e not in EFFORTS]
    if bad or not efforts:
        raise GptOssError(f"--reasoning-effort: {', '.join(bad) or text!r} is not one of low, medium, high")
    return efforts


def eval_command(args: argparse.Namespace) -> None:
    if not args.data:
        raise GptOssError(f"gptoss eval {args.task} needs --data FILE.jsonl (datasets are never downloaded)")
    efforts = parse_efforts(args.reasoning_effort)
    graders.load_items(args.task, args.data)  # fail on a bad file before loading a model
    if args.samples < 1 or args.concurrency < 1:
        raise GptOssError("--samples and --concurrency must be ≥ 1")
    grader = None
    if args.task == "healthbench":
        if not args.grader_base_url:
            raise GptOssError("healthbench needs --grader-base-url (an OpenAI-compatible grader model)")
        grader = Endpoint(args.grader_base_url, args.grader_model, args.grader_api_key)
    settings = Settings(args.task, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed or 0,
                        grader=grader)
    out = Path(args.out or f"eval-{args.task}")
    with contextlib.ExitStack() as stack:
        if args.base_url:
            endpoint = Endpoint(args.base_url, args.served_model, args.api_key)
        else:
            endpoint = stack.enter_context(local_endpoint(args.model, args.device, args.dtype, args.concurrency,
                                                          progress=not args.quiet))
        t = time.perf_counter()
        rows = run(args.task, args.data, endpoint, out, efforts, args.samples, args.concurrency, settings,
                   args.limit, progress=not args.quiet)
    table = summarize(args.task, rows, efforts)
    text = write_summary(args.task, table, out, "gptoss " + " ".join(sys.argv[1:]))
    figure = plot(args.task, table, out)
    print(text + f"\n{len(rows)} results in {out / 'results.jsonl'} ({time.perf_counter() - t:.0f} s this run)"
          + (f"; plot {figure}" if figure else ""))
