"""Held-out follow-up results by the question's frame, for demo models evaluated by paired.py.

    python experiments/demo/frames.py DIR [DIR ...] [--labels run11 run16 ...]

Each DIR holds paired.py's A.jsonl and B.jsonl; every file's held-out follow-ups ("followup" kind, held-out
family) are matched to the frame of gptoss.demo.phrasing.HELDOUT that phrased them, and the misses counted per
frame. A file that an earlier DIR already listed (the same model, paired twice) is skipped by content.
"""

import argparse
import hashlib
import json
import re
from pathlib import Path

from gptoss.demo.phrasing import HELDOUT, NUMBER


def frame_pattern(frame: str) -> re.Pattern:
    """A held-out frame as a case-insensitive pattern: {n} any number, its own end punctuation optional."""
    body = re.escape(frame.rstrip(".?!")).replace(re.escape("{n}"), f"(?:{NUMBER.pattern})")
    return re.compile(body, re.I)


FRAMES = [(f, frame_pattern(f)) for fs in HELDOUT.followups.values() for f in fs]


def frame_of(question: str) -> str:
    hits = [f for f, pat in FRAMES if pat.search(question)]
    return max(hits, key=len) if hits else "(no frame)"  # the longest frame that matches is the one asked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", default=None, help="one label per distinct model file, in order")
    args = p.parse_args()
    runs, seen = [], set()
    for d in args.dirs:
        for name in ("A.jsonl", "B.jsonl"):
            data = (d / name).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            rows = [json.loads(line) for line in data.decode().splitlines()]
            runs.append((f"{d.name}/{name}", [r for r in rows if r["kind"] == "followup" and r["family"] == "heldout"]))
    labels = args.labels or [name for name, _ in runs]
    questions = [r["question"] for r in runs[0][1]]
    assert all([r["question"] for r in rows] == questions for _, rows in runs), "different items"
    asked = [frame_of(q) for q in questions]
    frames = sorted(set(asked), key=lambda f: -asked.count(f))
    print("| frame | n | " + " | ".join(f"{label} misses" for label in labels) + " |")
    print("|---|---:|" + "---:|" * len(runs))
    for f in frames:
        idx = [i for i, a in enumerate(asked) if a == f]
        misses = [sum(not rows[i]["correct"] for i in idx) for _, rows in runs]
        print(f"| `{f}` | {len(idx)} | " + " | ".join(map(str, misses)) + " |")
    print(f"| all | {len(questions)} | " + " | ".join(str(sum(not r['correct'] for r in rows)) for _, rows in runs) + " |")


if __name__ == "__main__":
    main()
