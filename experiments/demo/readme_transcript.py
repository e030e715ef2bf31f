"""The demo sessions in README.md, replayed through `gptoss chat` (piped, as a user types them): check or re-record.

    python experiments/demo/readme_transcript.py           # exit 1 with a diff where the README differs
    python experiments/demo/readme_transcript.py --write   # re-record README.md's sessions from the shipped model

A session is a `$ gptoss chat [ARGS]` line in a ```text block and what follows it up to the next such line or
the block's end; its `>>> ` lines are the input, and everything the chat prints (stdout) must equal the rest.
The chat is greedy with the demo model, so a session is a function of the shipped model and the code: after a
new model ships, `--write` records what it says (tests/test_demo_model.py fails until then).
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
# a session's transcript ends at its last printed line: the blank lines before the next session stay README's
SESSION = re.compile(r"^\$ gptoss chat(?P<args>[^\n]*)\n(?P<body>.*?)\n*(?=^\$ gptoss chat|^```)", re.S | re.M)


@dataclass
class Session:
    args: list[str]
    recorded: str  # the transcript as the README has it
    start: int  # where the transcript lies in README.md's text
    end: int

    @property
    def inputs(self) -> list[str]:
        return [line[4:] for line in self.recorded.splitlines() if line.startswith(">>> ")]


def sessions(text: str) -> list[Session]:
    """The chat sessions of the README's ```text blocks, in order."""
    out = []
    for block in re.finditer(r"^```text\n(.*?)^```", text, re.S | re.M):
        for m in SESSION.finditer(text, block.start(1), block.end(1) + 3):
            out.append(Session(m["args"].split(), m["body"], m.start("body"), m.end("body")))
    return out


def replay(session: Session, timeout: float = 300) -> str:
    """What `gptoss chat ARGS` prints for the session's input."""
    done = subprocess.run([sys.executable, "-m", "gptoss", "chat", *session.args],
                          input="".join(q + "\n" for q in session.inputs), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"gptoss chat {' '.join(session.args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout.rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="re-record the sessions into README.md")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    text = args.readme.read_text()
    found = sessions(text)
    if not found:
        print(f"{args.readme}: no `$ gptoss chat` session in a ```text block", file=sys.stderr)
        return 1
    differ = 0
    for s in reversed(found):  # from the end, so that earlier offsets stay valid while writing
        said = replay(s)
        if said != s.recorded:
            differ += 1
            sys.stdout.writelines(difflib.unified_diff(s.recorded.splitlines(True), said.splitlines(True),
                                                       f"README: gptoss chat {' '.join(s.args)}", "replayed"))
            text = text[:s.start] + said + text[s.end:]
    if args.write and differ:
        args.readme.write_text(text)
    print(f"{len(found)} sessions, {differ} differ{' (README.md re-recorded)' if args.write and differ else ''}",
          file=sys.stderr)
    return 1 if differ and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
