"""Training-step time of the `small` preset: this tree against a baseline commit, paired.

Each round runs one process per side (old/new order alternating between rounds) that trains the `small` preset
(6 layers, hidden 256, 8 experts top-2, vocab 4096) on random tokens with `gptoss.train.train` — the public
loop, so each side measures its own code — and reports its median step time over `--steps` steps after one
warm-up step, both in process CPU time (with one thread: the work done, little moved by other tenants of a
shared machine) and in wall time. The ratio old/new is taken per round (same minutes); the summary gives the
median ratio, its range, and a paired t-test on the log step times (two-sided p).

    python benchmarks/bench_train.py --baseline ff4b1e2 --rounds 6 --steps 4
    python benchmarks/bench_train.py --baseline ff4b1e2 --new-train '{"checkpointing": true}'

--new-train / --new-model: JSON of [train] / [model] fields given to the new side only (options the baseline
lacks, e.g. checkpointing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from gptoss.train import TrainConfig, train
    from gptoss.train.data import Document

    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(0, 4096, (args.seq + 1,), generator=g).tolist())
            for _ in range(args.batch * (args.steps + 2))]
    with tempfile.TemporaryDirectory() as out:
        d = {"model": {"preset": "small", **json.loads(args.model_json)},
             "data": {"seq_len": args.seq, "batch_size": args.batch},
             "optim": {"lr": 1e-3, "warmup_steps": 1},
             "moe": {"aux_loss_coef": 0.01},
             "train": {"steps": args.steps + 2, "out_dir": out, "device": "cpu", **json.loads(args.train_json)}}
        cfg = TrainConfig.from_dict(d)
        cpu = []  # process CPU time at the end of each step: with one thread, the work done, whatever the load
        result = train(cfg, documents=docs, progress=False, max_steps=args.steps + 1,
                       on_step=lambda row: cpu.append(time.process_time()))
    wall = [m["time_s"] for m in result.metrics[1:]]
    cpu_steps = [b - a for a, b in zip(cpu, cpu[1:])]
    print(json.dumps({"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu_steps)}))


def run_side(src: Path, args: argparse.Namespace, train_json: str, model_json: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads), "--train-json", train_json,
           "--model-json", model_json]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"worker on {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired_t(log_ratios: list[float]) -> float:
    """Two-sided p of a paired t-test (mean of log(old/new) against 0)."""
    from scipy import stats

    if len(log_ratios) < 2 or statistics.stdev(log_ratios) == 0:
        return float("nan")
    return float(stats.ttest_1samp(log_ratios, 0.0).pvalue)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="main", help="git revision of the old side (default main)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-train", default="{}", help="JSON [train] fields for the new side only")
    p.add_argument("--new-model", default="{}", help="JSON [model] fields for the new side only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train-json", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--model-json", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "old"
        old_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
        sides = {"old": (old_src / "src", "{}", "{}"), "new": (ROOT / "src", args.new_train, args.new_model)}
        rows = []
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            t = {name: run_side(*sides[name][:1], args, *sides[name][1:]) for name in order}
            rows.append(t)
            print(f"round {r + 1}: CPU s/step old {t['old']['cpu_s']:.3f} new {t['new']['cpu_s']:.3f} "
                  f"({t['old']['cpu_s'] / t['new']['cpu_s']:.2f}×); wall s/step old {t['old']['wall_s']:.3f} "
                  f"new {t['new']['wall_s']:.3f} ({t['old']['wall_s'] / t['new']['wall_s']:.2f}×)  "
                  f"({time.strftime('%H:%M:%S')})", flush=True)
    print(f"\nsmall preset, batch {args.batch} × {args.seq} tokens, {args.threads} thread(s), {args.rounds} rounds × "
          f"{args.steps} steps (medians per process); new-side options train={args.new_train} model={args.new_model}")
    for key, what in (("cpu_s", "process CPU time per step"), ("wall_s", "wall time per step")):
        old, new = [t["old"][key] for t in rows], [t["new"][key] for t in rows]
        ratios = [a / b for a, b in zip(old, new)]
        p_value = paired_t([math.log(x) for x in ratios])
        print(f"{what}: old {statistics.median(old):.3f} s ({min(old):.3f}–{max(old):.3f}), new "
              f"{statistics.median(new):.3f} s ({min(new):.3f}–{max(new):.3f}); old/new median "
              f"{statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}×), paired t-test on "
              f"log times p = {p_value:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
