"""Demo models on each held-out operation frame in words, n questions each.

    python experiments/demo/frame_probe.py MODEL [MODEL ...] --out DIR [--n 20] [--seed 8]

The held-out evaluation phrases 20 % of its arithmetic in words, spread over 15 held-out frames (`Product of {a}
and {b}?`, `From {a}, subtract {b}.` ...): about 7 questions per frame, too few to see a frame the model cannot
read. This probe draws `--n` held-out questions per frame (held-out glue, case and separators as the evaluation
draws them, rejection-sampled on the frame) and reports each model's right answers and declines per frame.
Each model's results go to DIR/<i>.jsonl (read back when present).
"""

import random
import re

from comma_probe import arguments, model_results  # experiments/demo/comma_probe.py, beside this script
from gptoss.demo import data as D
from gptoss.demo import eval as E
from gptoss.demo import phrasing as P


def frame_pattern(frame: str) -> re.Pattern:
    """A held-out frame as a case-insensitive pattern: its words as written, any number for {a} and {b}, its own
    end punctuation optional (the glue may replace it)."""
    number = f"(?:{P.NUMBER.pattern})"
    text = re.escape(frame.rstrip("?.!")).replace(r"\{a\}", number).replace(r"\{b\}", number)
    return re.compile(text, re.I)


def probe_items(n: int, seed: int, version: int = 11) -> list[tuple[str, D.Example]]:
    """(frame, example): n held-out questions for each held-out word frame of add, sub and mul."""
    rng = random.Random(seed)
    trained = P.training_skeletons(version)
    out = []
    for kind in ("add", "sub", "mul"):
        want = {frame: n for frame in P.HELDOUT.words[kind]}
        patterns = {frame: frame_pattern(frame) for frame in want}
        tries = 0
        while any(want.values()):
            tries += 1
            if tries > 5_000 * n:
                raise SystemExit(f"error: cannot draw {n} held-out questions for each of {list(want)}")
            ex = D.make_example(rng, kind, heldout=True, phrasing="heldout", version=version)
            # the longest frame that matches (`{a} take away {b}` is inside `How much is {a} take away {b}?`)
            frame = max((f for f, pat in patterns.items() if pat.search(ex.question)), key=len, default=None)
            if frame and want[frame] and P.skeleton(ex.question) not in trained:
                want[frame] -= 1
                out.append((frame, ex))
    return out


def main() -> None:
    args = arguments(__doc__, n=20, seed=8)
    items = probe_items(args.n, args.seed)
    runs = model_results(args.models, [ex for _, ex in items], args.out)
    print("right (declined) of", args.n, "per frame\n")
    print("| frame | " + " | ".join(str(m) for m in args.models) + " |")
    print("|---|" + "---:|" * len(args.models))
    for frame in dict.fromkeys(f for f, _ in items):
        idx = [j for j, (f, _) in enumerate(items) if f == frame]
        cells = [f"{sum(rs[j]['correct'] for j in idx)} ({sum(bool(E.REFUSAL.search(rs[j]['final'])) for j in idx)})"
                 for rs in runs]
        print(f"| `{frame}` | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{sum(r['correct'] for r in rs)} of {len(rs)}" for rs in runs) + " |")


if __name__ == "__main__":
    main()
