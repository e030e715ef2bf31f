"""A user's first request against the second, through `gptoss serve`, for two versions of the code, alternating.

    git worktree add /tmp/old-gptoss <commit>
    python benchmarks/bench_first_request.py /work/ckpt/gpt-oss-20b --rounds 5 --old /tmp/old-gptoss/src

Each round starts a server per version (bench_served_decode.served: a 446-token prompt, 48 greedy tokens, two
requests) and reports both requests' mean decode rate and median step from the server's log lines. Work that
is done lazily, at the first step, shows as a first request slower than the second.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_served_decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--old", required=True, help="the other version's src/ folder")
    p.add_argument("--new", default=str(Path(__file__).resolve().parent.parent / "src"))
    args = p.parse_args()
    for r in range(args.rounds):
        versions = [("old", args.old), ("new", args.new)]
        for name, src in versions if r % 2 == 0 else versions[::-1]:
            os.environ["PYTHONPATH"] = src  # the server process imports gptoss from there
            got = bench_served_decode.served(args.model, "bfloat16", 384, 48)
            print(json.dumps({"round": r + 1, "code": name, **got}), flush=True)


if __name__ == "__main__":
    main()
