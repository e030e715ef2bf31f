"""Demo models on held-out arithmetic and follow-ups asked after K earlier turns, as a chat session keeps them
(each earlier turn another held-out question with its right answer), paired per item (McNemar's exact test).

    python experiments/demo/long_history.py --turns 3 --n 40 MODEL_A MODEL_B

`gptoss eval demo` asks single questions alone and follow-ups after the one turn they refer to; a user's
session holds more. Follow-ups keep their own turn last.
"""

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from scipy.stats import binomtest

from gptoss.checkpoint import load
from gptoss.demo import data as D
from gptoss.demo import eval as E
from gptoss.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs=2, type=Path)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--n", type=int, default=40, help="held-out items per kind (add, sub, mul, followup)")
    p.add_argument("--version", type=int, default=10, help="data version of the held-out items")
    p.add_argument("--train-n", type=int, default=200000, help="the training set the items exclude (data_n)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    items = E.heldout(args.n, E.HELDOUT_SEED, 0, args.train_n, "heldout", args.version)
    asked = [ex for ex in items if ex.kind in ("add", "sub", "mul", "followup")]
    earlier = [ex for ex in items if ex.kind in ("add", "sub", "mul") and ex.answer is not None]
    rng = random.Random(0)
    histories = [[m for prev in rng.sample([e for e in earlier if e is not ex], args.turns)
                  for m in D.earlier_turn(prev)]
                 + list(ex.history if ex.kind == "followup" else []) for ex in asked]
    results = []
    for path in args.models:
        model = load(path, dtype=torch.bfloat16)
        with Engine(model, max_concurrency=4, max_queue=16) as engine:
            engine.start()
            with ThreadPoolExecutor(4) as pool:
                out = list(pool.map(lambda job: E.run_one(job[0], engine.complete, "medium", 1024, "heldout", job[1]),
                                    zip(asked, histories)))
        results.append(out)
        by = {k: sum(bool(r.correct) for r in out if r.kind == k) for k in ("add", "sub", "mul", "followup")}
        print(f"{path}: {sum(bool(r.correct) for r in out)} of {len(out)} right {by}, "
              f"{sum(r.stop != 'return' for r in out)} not ended with <|return|>")
    a, b = results
    only_a = sum(bool(x.correct) and not y.correct for x, y in zip(a, b))
    only_b = sum(bool(y.correct) and not x.correct for x, y in zip(a, b))
    p_value = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    print(f"only the first right: {only_a}, only the second: {only_b}, McNemar p = {p_value:.2g}")


if __name__ == "__main__":
    main()
