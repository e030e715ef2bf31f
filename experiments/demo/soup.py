"""A weighted mean of finished demo recipe runs' weights, exported as a demo model (a "model soup").

    python experiments/demo/soup.py RUN_A RUN_B [...] --out DIR [--weights 1,1] [--eval]

Each RUN is a `python -m gptoss.demo.recipe ... --run-dir RUN` folder (RUN/train with its saved steps, RUN/export
with training.json and vocab_ids). The soup takes each run's fp32 weights as its export averaged them (the mean of
its `averaged_steps`), maps the vocabularies onto the last run's, averages with --weights (equal by default: the
uniform soup of Wortsman et al. 2022, §2), quantizes the experts to MXFP4 once and exports into DIR, with a
training.json that records the runs and weights (data seed, count and version: the last run's, the newest data
the soup saw; `gptoss eval demo` avoids those questions). It trains nothing. --eval then writes EVAL.md and
results.jsonl as the recipe does (the held-out seed); without it, nothing is evaluated, so that a rule can use
other items first.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from gptoss.demo import recipe
from gptoss.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soup.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="recipe run folders (RUN/train + RUN/export), two or more")
    p.add_argument("--out", type=Path, required=True, help="export folder for the soup")
    p.add_argument("--weights", default=None, help="comma-separated positive weights, one per run (default: equal)")
    p.add_argument("--eval", action="store_true", help="evaluate the export (EVAL.md, results.jsonl) as the recipe does")
    args = p.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(args.runs)
    except ValueError:
        raise SystemExit(f"error: --weights {args.weights}: comma-separated numbers, one per run") from None
    out = args.out.expanduser().resolve()
    try:
        step_dir, ids, parts = recipe.souped_checkpoint([r.expanduser().resolve() for r in args.runs], weights,
                                                        out.parent / f"{out.name}-average")
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    last = list(parts.values())[-1]
    total = sum(weights)
    info = {"data_seed": last["data_seed"], "data_n": last["data_n"], "data_version": last["data_version"],
            "steps": last["steps"], "train_seconds": last["train_seconds"], "final_loss": None,
            "soup": [{"run": run, "weight": w / total, "data_version": i.get("data_version"), "steps": i.get("steps"),
                      "train_seconds": i.get("train_seconds"), "averaged_steps": i.get("averaged_steps"),
                      "init_from": i.get("init_from")} for (run, i), w in zip(parts.items(), weights)],
            "vocab_rows": int(ids.numel()), "config": last["config"], "torch_threads": torch.get_num_threads()}
    recipe.export(step_dir, ids, out, info)
    print(f"soup of {', '.join(parts)} (weights {', '.join(f'{w / total:.3g}' for w in weights)}) exported to {out}",
          file=sys.stderr)
    if args.eval:
        print(recipe.evaluate_export(out, info["data_seed"], info["data_n"], info["data_version"],
                                     made="A soup of " + ", ".join(f"{r} ({w / total:.3g})" for r, w in
                                                                   zip(parts, weights)) + "."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
