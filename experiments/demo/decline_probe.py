"""Demo models' in-scope declines, counted on many held-out questions at a fraction of an evaluation's cost.

    python experiments/demo/decline_probe.py MODEL [MODEL ...] --out DIR [--n 1000] [--seed 9] [--max-tokens 40]

Issue 23 asks that no in-scope question be declined. The held-out evaluation has 1,190 in-scope items and the
models decline about one of them, so a count there cannot tell two models apart (0, 1 and 2 are all likely for
either). Every in-scope decline seen in the evaluations so far is decided in the first lines of the analysis: the
dangling-follow-up thought (`The question refers to an earlier answer, and there is none.`), or a misread
restatement followed by the too-big thought (`754754 + 797` / `This is beyond what I can compute by hand ...`).
So the probe asks --n held-out-phrased questions of each in-scope kind without tools (4-digit addition and
subtraction, multiplication by one digit, follow-ups on an earlier answer; the evaluation's generator, seed
--seed; those with a calculator declared left out, since there a too-big reading calls it instead of declining) and generates only the first --max-tokens tokens of each answer (bf16, greedy, reasoning medium, as the
evaluation). An answer counts as declined when that beginning holds one of the training data's decline thoughts
(any effort) or, when it got that far, a final message the evaluation would call a refusal. `--seed 103 --n 170`
asks exactly the held-out in-scope questions of paired.py's seed-103 validation, whose full evaluations say
whether the probe finds the same declines (experiments/demo/RESULTS.md). A lower bound where the restatement runs
long: a separated number read as a longer one (`From 8,498, subtract 189` → `8,498,498 = 8 4 9 8 4 9 8` / ...)
can reach its decline thought after 40 tokens; comma_probe.py (full answers) measures that shape.

Each model's results go to DIR/<i>.jsonl (read back when present); the table pairs every model with the first
(McNemar's exact test on the items only one of the two declines), and DIR/declined.md lists each declined question.
"""

import argparse
from pathlib import Path

import torch
from scipy.stats import binomtest

from comma_probe import model_results  # experiments/demo/comma_probe.py, beside this script
from gptoss.demo import data as D
from gptoss.demo import eval as E

KINDS = ("add", "sub", "mul", "followup")  # in scope, answered by hand when no tool is declared
DECLINE_KINDS = ("too_big", "followup_none", "general")  # the training data's thoughts before a refusal


def decline_thoughts(version: int = 11) -> tuple[str, ...]:
    """Every effort's analysis sentence before a refusal, as the training data writes it."""
    return tuple(t for kind in DECLINE_KINDS for t in D.thoughts(version)[kind].values())


def probe_items(n: int, seed: int, version: int = 11) -> list[D.Example]:
    """n held-out-phrased questions of each in-scope kind, no calculator declared, none in the training data (seed 0,
    200,000 conversations, `version`), drawn as the evaluation draws its held-out family."""
    items = E.heldout(n, seed, 0, 200_000, "heldout", version)
    return [ex for ex in items if ex.kind in KINDS and "calculator" not in ex.tools]


def declined(result: dict, thoughts: tuple[str, ...]) -> bool:
    return any(t in result["reasoning"] for t in thoughts) or bool(E.REFUSAL.search(result["final"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=1000, help="questions of each in-scope kind (default 1000)")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--max-tokens", type=int, default=40, help="tokens generated per answer (default 40)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    items = probe_items(args.n, args.seed)
    thoughts = decline_thoughts()
    runs = [[declined(r, thoughts) for r in rs]
            for rs in model_results(args.models, items, args.out, max_tokens=args.max_tokens)]
    print(f"{len(items)} held-out in-scope questions (seed {args.seed}; "
          + ", ".join(f"{k} {sum(ex.kind == k for ex in items)}" for k in KINDS)
          + f"), first {args.max_tokens} tokens of each answer\n")
    print("| model | declined | of | only first declined | only this declined | McNemar p |")
    print("|---|---:|---:|---:|---:|---:|")
    lines = []
    for path, dec in zip(args.models, runs):
        only_a = sum(a and not b for a, b in zip(runs[0], dec))
        only_b = sum(b and not a for a, b in zip(runs[0], dec))
        p_value = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
        print(f"| {path} | {sum(dec)} | {len(dec)} | {only_a} | {only_b} | {p_value:.2g} |")
        lines += [f"- {path}: {ex.kind}: `{ex.question}`" for ex, d in zip(items, dec) if d]
    (args.out / "declined.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
