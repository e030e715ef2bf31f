"""`gptoss chat` (piped, as a user types) against the evaluation's engine sessions, item by item.

    python experiments/demo/chat_agreement.py RESULTS.jsonl [--model DIR]

RESULTS.jsonl is an evaluation's per-item output (`gptoss eval demo --out`, or the recipe's
export/results.jsonl) of the model the chat loads (the shipped demo model unless --model). Every single-question
item asked without tools (arithmetic, refusals; not follow-ups, JSON or tool items, which need history or
declarations) goes through one `gptoss chat --temperature 0 -q` process, `/reset` between questions; the
printed answer must equal the engine's final answer. tests/test_demo_model.py checks one held-out item of each of
these five kinds (with the calculator declared); this checks them all.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

SINGLE = ("add", "sub", "mul", "general", "too_big")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--model", default=None)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.results.open()]
    items = [r for r in rows if r["kind"] in SINGLE and not r["tools"]]
    stdin = "\n/reset\n".join(r["question"] for r in items) + "\n"
    cmd = [sys.executable, "-m", "gptoss", "chat", "--temperature", "0", "-q"] + (["--model", args.model] if args.model else [])
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: gptoss chat exited {done.returncode}: {done.stderr[-2000:]}")
    turns = [t for t in done.stdout.split(">>> ")[1:] if not t.startswith("/reset")]
    if len(turns) != len(items):
        raise SystemExit(f"error: {len(turns)} turns printed for {len(items)} questions")
    differ = []
    for r, turn in zip(items, turns):
        question, _, shown = turn.partition("\n")
        if question != r["question"] or shown.strip() != r["final"].strip():
            differ.append((r["family"], r["question"], shown.strip(), r["final"].strip()))
    for fam in ("heldout", "template"):
        n = sum(r["family"] == fam for r in items)
        print(f"{fam}: {n - sum(d[0] == fam for d in differ)} of {n} chat answers equal the engine's")
    for d in differ[:20]:
        print("differs:", d)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
