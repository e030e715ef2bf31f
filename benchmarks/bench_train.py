"""Training-step time of the `small` preset: this tree against a baseline commit, paired step by step.

The baseline's `src/gptoss` (git archive of --baseline) is imported beside this tree's as a second package,
`gptoss_old`, in the same process. Each side builds its trainable model with its own `train.loop.build_model`
(the `small` preset: 6 layers, hidden 256, 8 experts top-2, vocab 4096; fp32 weights, bf16 autocast as `gptoss
train` runs) and AdamW, and a step is its own forward (`lm_loss_sum` + `router_losses`, Switch aux 0.01),
backward, gradient clipping and optimizer step on the same batch of random tokens. Steps alternate old, new,
new, old, … so that each pair shares the minute (this machine is shared, its load moves by 3× within minutes);
after --warmup steps per side, the ratio old/new is taken per pair. Reported: median step times with their
range, the median ratio with its range, and a paired t-test on the log step times (two-sided p).
The metrics/logging/checkpoint parts of the loop are not in the timed step.

    python benchmarks/bench_train.py --baseline ff4b1e2 --pairs 12
    python benchmarks/bench_train.py --baseline ff4b1e2 --new-train '{"checkpointing": true}'

On a machine without the git history (a GPU machine that gets a copy of the working tree), export the baseline
here first and name the folder there:

    python benchmarks/bench_train.py --baseline ff4b1e2 --export-baseline bench_baseline     # here
    python benchmarks/bench_train.py --baseline-dir bench_baseline --device cuda --pairs 12    # there
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def export_baseline(rev: str, folder: Path) -> Path:
    """The baseline's package as folder/gptoss_old (its imports inside the package are relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/gptoss"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    shutil.move(str(folder / "src" / "gptoss"), str(folder / "gptoss_old"))
    shutil.rmtree(folder / "src")
    return folder


def import_baseline(folder: Path):
    sys.path.insert(0, str(folder))
    return importlib.import_module("gptoss_old")


class Side:
    """One version's model, optimizer and step."""

    def __init__(self, pkg: str, args: argparse.Namespace, extra_train: dict, tmp: Path):
        train_mod = importlib.import_module(f"{pkg}.train")
        self.loop = importlib.import_module(f"{pkg}.train.loop")
        self.moe = importlib.import_module(f"{pkg}.train.moe")
        data_mod = importlib.import_module(f"{pkg}.train.data")
        cfg = train_mod.TrainConfig.from_dict({
            "model": {"preset": "small"}, "data": {"seq_len": args.seq, "batch_size": args.batch},
            "moe": {"aux_loss_coef": 0.01},
            "train": {"out_dir": str(tmp / pkg), "device": args.device, **extra_train}})
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        self.model = self.loop.build_model(cfg, self.device)
        self.loop.init_weights(self.model, 0)
        # as `gptoss train` builds it: AdamW's fused kernel with [train] compile, else the foreach default
        self.opt = torch.optim.AdamW(self.loop.param_groups(self.model, 0.1), lr=1e-4,
                                     fused=bool(extra_train.get("compile")))
        g = torch.Generator().manual_seed(0)
        docs = [data_mod.Document(torch.randint(0, 4096, (args.seq + 1,), generator=g).tolist())
                for _ in range(args.batch)]
        self.batch = data_mod.PackedDataset(docs, args.seq, self.model.config.vocab_size, shuffle=False).batch(
            list(range(args.batch))).to(self.device)
        self.times: list[float] = []

    def step(self) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss, n = self.loop.lm_loss_sum(self.model, self.batch)
            aux, _ = self.moe.router_losses(self.model)
        (loss / n + 0.01 * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        self.times.append(time.perf_counter() - t0)


def paired_t(log_ratios: list[float]) -> float:
    """Two-sided p of a paired t-test (mean of log(old/new) against 0)."""
    from scipy import stats

    if len(log_ratios) < 2 or statistics.stdev(log_ratios) == 0:
        return float("nan")
    return float(stats.ttest_1samp(log_ratios, 0.0).pvalue)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="main", help="git revision of the old side (default main)")
    p.add_argument("--pairs", type=int, default=12, help="timed (old, new) step pairs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-train", default="{}", help="JSON [train] fields for the new side only (e.g. checkpointing)")
    p.add_argument("--old-train", default="{}", help="JSON [train] fields for the old side (one change at a time: "
                   "the same options on both sides when the baseline has them)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides)")
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="a folder holding the baseline as gptoss_old (from --export-baseline) instead of git")
    p.add_argument("--export-baseline", type=Path, default=None, help="write --baseline's package there and exit")
    args = p.parse_args(argv)
    if args.export_baseline:
        print(f"baseline {args.baseline} written to {export_baseline(args.baseline, args.export_baseline)}")
        return 0
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))  # the new side is this tree, not whatever `pip install -e` points at
    with tempfile.TemporaryDirectory() as tmp:
        import_baseline(args.baseline_dir or export_baseline(args.baseline, Path(tmp) / "baseline"))
        old = Side("gptoss_old", args, json.loads(args.old_train), Path(tmp))
        new = Side("gptoss", args, json.loads(args.new_train), Path(tmp))
        print(f"old: {sys.modules['gptoss_old'].__file__}\nnew: {sys.modules['gptoss'].__file__}", flush=True)
        for _ in range(args.warmup):
            old.step()
            new.step()
        old.times.clear()
        new.times.clear()
        for i in range(args.pairs):
            for side in ((old, new) if i % 2 == 0 else (new, old)):
                side.step()
            print(f"pair {i + 1}: old {old.times[-1]:.3f} s, new {new.times[-1]:.3f} s, "
                  f"{old.times[-1] / new.times[-1]:.2f}×  ({time.strftime('%H:%M:%S')})", flush=True)
    ratios = [a / b for a, b in zip(old.times, new.times)]
    p_value = paired_t([math.log(x) for x in ratios])
    print(f"\nsmall preset, batch {args.batch} × {args.seq} tokens, bf16 autocast, {args.device}, "
          f"{args.threads} thread(s), {args.pairs} alternating pairs after {args.warmup} warm-up steps; "
          f"baseline {args.baseline_dir or args.baseline}; [train] options old {args.old_train}, new {args.new_train}")
    print(f"old step {statistics.median(old.times):.3f} s ({min(old.times):.3f}–{max(old.times):.3f}), new "
          f"{statistics.median(new.times):.3f} s ({min(new.times):.3f}–{max(new.times):.3f}); old/new median "
          f"{statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}×), paired t-test on log "
          f"times p = {p_value:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
