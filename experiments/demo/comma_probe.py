"""Demo models on the held-out questions that put a comma right after a number with thousands separators.

    python experiments/demo/comma_probe.py MODEL [MODEL ...] --out DIR [--n 200] [--seed 7]

The held-out family's `From {a}, subtract {b}.` types `a` with separators 10 % of the time (`From 5,427,
subtract 2829.`), and run 29 declined two of those as seven-digit numbers. The held-out evaluation asks about
three of them, too few to tell models apart; this probe draws `--n` such subtractions (held-out phrasing, glue and
case as the evaluation draws them, rejection-sampled on the pattern) and, as a control that the comma did not
make the models read every separated number as small, `--n` held-out out-of-scope questions with a separated
number of seven or more digits (to be declined). Each model's results go to DIR/<i>.jsonl; the table pairs
every model with the first (McNemar's exact test). `gptoss.demo.checkpoint_path()` is the shipped model.
"""

import argparse
import json
import random
import re
from dataclasses import asdict
from pathlib import Path

import torch
from scipy.stats import binomtest

from gptoss.checkpoint import load
from gptoss.demo import data as D
from gptoss.demo import eval as E
from gptoss.demo import phrasing as P

SEPARATED_THEN_COMMA = re.compile(r"\d,\d{3}, ")  # `5,427, subtract`: a 4-digit number, then a comma and a space
SEPARATED_BIG = re.compile(r"\d{1,3}(?:,\d{3}){2,}")  # `5,427,123`


def probe_items(n: int, seed: int, version: int = 11) -> list[D.Example]:
    """n held-out subtractions matching SEPARATED_THEN_COMMA and n held-out too-big questions matching
    SEPARATED_BIG, none a training skeleton of data `version`."""
    rng = random.Random(seed)
    trained = P.training_skeletons(version)
    out: list[D.Example] = []
    for kind, pattern in (("sub", SEPARATED_THEN_COMMA), ("too_big", SEPARATED_BIG)):
        got = tries = 0
        while got < n:
            tries += 1
            if tries > 2_000 * n:
                raise SystemExit(f"error: found {got} of {n} held-out {kind!r} questions matching {pattern.pattern}")
            ex = D.make_example(rng, kind, heldout=True, phrasing="heldout", version=version)
            if pattern.search(ex.question) and P.skeleton(ex.question) not in trained:
                out.append(ex)
                got += 1
    return out


def arguments(doc: str, n: int, seed: int) -> argparse.Namespace:
    """The probes' command line: models, --out, --n, --seed, --threads (torch's threads set)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=n, help=f"questions of each kind or frame (default {n})")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def model_results(models: list[Path], items: list[D.Example], out: Path, max_tokens: int = 512) -> list[list[dict]]:
    """Each model's results on the held-out-phrased items (bf16, as `gptoss chat` loads it; at most max_tokens
    generated per answer), from out/<i>.jsonl when present and about the same questions, else evaluated now and
    written there."""
    runs = []
    for i, path in enumerate(models):
        file = out / f"{i}.jsonl"
        if not file.exists():
            rs = E.evaluate_items(load(path, dtype=torch.bfloat16), [("heldout", ex) for ex in items],
                                  max_tokens=max_tokens)
            file.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rs))
        rs = [json.loads(line) for line in file.open()]
        if [r["question"] for r in rs] != [ex.question for ex in items]:
            raise SystemExit(f"error: {file} holds other questions (another --n or --seed): remove it or use "
                             "another --out")
        runs.append(rs)
    return runs


def main() -> None:
    args = arguments(__doc__, n=200, seed=7)
    runs = model_results(args.models, probe_items(args.n, args.seed), args.out)
    print("| model | kind | n | right | declined | only first right | only this right | McNemar p |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path, rs in zip(args.models, runs):
        for kind in ("sub", "too_big"):
            idx = [j for j, r in enumerate(rs) if r["kind"] == kind]
            first = runs[0]
            only_a = sum(first[j]["correct"] and not rs[j]["correct"] for j in idx)
            only_b = sum(rs[j]["correct"] and not first[j]["correct"] for j in idx)
            p_value = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
            declined = sum(bool(E.REFUSAL.search(rs[j]["final"])) for j in idx)
            print(f"| {path} | {kind} | {len(idx)} | {sum(rs[j]['correct'] for j in idx)} | {declined} | {only_a} "
                  f"| {only_b} | {p_value:.2g} |")


if __name__ == "__main__":
    main()
