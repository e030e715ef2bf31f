"""Two demo models on the same held-out items, paired per item (McNemar's exact test per category).

    python experiments/demo/paired.py MODEL_A MODEL_B --version 12 --out DIR

The items are the ones the recipe evaluates a run of data `version` on (`gptoss eval demo`'s sets: --n per kind
in the template family, --heldout-n per kind in held-out phrasing, excluding the training questions of
--train-n conversations; --seed draws other items from the same families). Each model's results are written
to DIR/A.jsonl and DIR/B.jsonl (and read back from there when present, so a second comparison costs nothing;
a run's own evaluation by the recipe, MODEL/results.jsonl, is taken when it was on these items).
`gptoss.demo.checkpoint_path()` is the shipped model.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from scipy.stats import binomtest

from gptoss.checkpoint import load
from gptoss.demo import eval as E

IN_SCOPE = ("arithmetic", "tools", "structured", "followup")


def category(r: dict) -> str:
    return next(f"{r['family']}/{c}" for c, kinds in E.CATEGORIES.items() if r["kind"] in kinds)


def results(path: Path, out: Path, args: argparse.Namespace, dtype: str = "bfloat16") -> list[dict]:
    """A model's results on the items: from `out` when present, else from the recipe's own evaluation
    (MODEL/results.jsonl, bf16) when it ran on exactly these items, else evaluated now (activations and
    non-expert weights in `dtype`, experts MXFP4)."""
    if out.exists():
        return [json.loads(line) for line in out.open()]
    own = path / "results.jsonl"
    if own.exists() and dtype == "bfloat16":
        rs = [json.loads(line) for line in own.open()]
        items = E.examples_for(args.n, args.heldout_n, args.seed, args.train_seed, args.train_n, args.version)
        if [(r["kind"], r["question"]) for r in rs] == [(ex.kind, ex.question) for _, ex in items]:
            out.write_text(own.read_text())
            return rs
    model = load(path, dtype=getattr(torch, dtype))  # bf16: as `gptoss chat` loads it
    rs = [asdict(r) for r in E.evaluate(model, args.n, args.seed, "medium", train_seed=args.train_seed,
                                        train_n=args.train_n, heldout_n=args.heldout_n, version=args.version)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return rs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs=2, type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", type=int, required=True, help="data version of the held-out items")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--heldout-n", type=int, default=E.HELDOUT_PHRASING_N)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--train-n", type=int, default=200000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="bfloat16,bfloat16", metavar="A,B",
                   help="each model's activation dtype (bfloat16 or float32; the same model twice compares dtypes)")
    p.add_argument("--seed", type=int, default=E.HELDOUT_SEED,
                   help=f"the items' seed (default {E.HELDOUT_SEED}, the evaluation's; another seed draws a "
                        "validation set from the same families, for choices that must not look at the held-out items)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtypes.split(",")
    if len(dtypes) != 2 or not set(dtypes) <= {"bfloat16", "float32"}:
        raise SystemExit(f"error: --dtypes {args.dtypes!r}: two of bfloat16/float32, comma-separated")
    a, b = (results(m, args.out / f"{tag}.jsonl", args, d) for tag, m, d in zip("AB", args.models, dtypes))
    assert [(r["kind"], r["question"]) for r in a] == [(r["kind"], r["question"]) for r in b], "different items"
    print(f"A = {args.models[0]} ({dtypes[0]})\nB = {args.models[1]} ({dtypes[1]})\n")
    print(f"| items | n | A | B | only A right | only B right | McNemar p |\n|---|---:|---:|---:|---:|---:|---:|")
    for cat in sorted({category(r) for r in a}) + ["all"]:
        idx = [i for i, r in enumerate(a) if cat == "all" or category(r) == cat]
        only_a = sum(a[i]["correct"] and not b[i]["correct"] for i in idx)
        only_b = sum(b[i]["correct"] and not a[i]["correct"] for i in idx)
        p_value = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
        print(f"| {cat} | {len(idx)} | {sum(a[i]['correct'] for i in idx)} | {sum(b[i]['correct'] for i in idx)} "
              f"| {only_a} | {only_b} | {p_value:.2g} |")
    for tag, rs in zip("AB", (a, b)):
        declined = sum(bool(E.REFUSAL.search(r["final"])) for r in rs
                       if any(r["kind"] in E.CATEGORIES[c] for c in IN_SCOPE))
        print(f"{tag}: {sum(r['stop'] in ('end', 'none') for r in rs)} not ended with <|return|>, "
              f"{sum(r['repeated'] for r in rs)} repeated, {declined} in-scope declined")


if __name__ == "__main__":
    main()
