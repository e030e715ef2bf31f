"""LoRA fine-tuning of a GPT-oss-shaped random checkpoint on a Harmony chat JSONL: peak RSS, tokens/s, and the
merged model loading and generating. For gpt-oss-20b this needs most of a 24 GiB machine; run it alone.

    python benchmarks/bench_lora.py --preset gpt-oss-20b --work /tmp/lora20b --steps 4 --seq-len 512
    python benchmarks/bench_lora.py --preset gpt-oss-20b --work /tmp/lora20b --steps 4 --seq-len 512 \
        --targets qkv out experts                                   # adapters on every expert too
    python benchmarks/bench_lora.py --preset tiny --vocab-size 201088 --work /tmp/lora-tiny --steps 3 --seq-len 128
                                                                      # a quick check of the script

Writes (once) WORK/base, a random checkpoint with the preset's exact shapes and layout (experts MXFP4, the rest
bf16; ≈ 12.8 GiB for the 20b), and WORK/chats.jsonl, synthetic Harmony conversations (user question, analysis,
final answer; loss on the assistant's tokens). Then `gptoss train` runs as its own process with LoRA (rank 8 on
qkv and out by default; --targets), the base frozen (experts MXFP4, everything else bf16: [lora] base_dtype "auto" under bf16
autocast), activation checkpointing, batch 1; its peak RSS is the child's ru_maxrss. Finally `gptoss generate`
loads the merged checkpoint (step-N/model) and generates a few tokens, and the PEFT adapter's files are listed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    r = random.Random(seed)
    words = ["river", "copper", "lantern", "orbit", "meadow", "signal", "harbor", "prism", "cedar", "engine"]
    with path.open("w") as f:
        for _ in range(n):
            a, b = r.sample(words, 2)
            x, y = r.randint(2, 99), r.randint(2, 99)
            msgs = [{"role": "user", "content": f"What do a {a} and a {b} have in common? Also, what is {x} + {y}?"},
                    {"role": "assistant", "channel": "analysis",
                     "content": f"Compare {a} and {b}; then add {x} and {y}, which gives {x + y}."},
                    {"role": "assistant", "channel": "final",
                     "content": f"Both a {a} and a {b} are nouns in this list. {x} + {y} = {x + y}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def run(cmd: list[str], label: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run a child; returns it and the largest peak RSS (GiB) of any child waited for so far."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(f"{label}: exit {done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return done, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, data and run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["qkv", "out"],
                   help="[lora] targets (default qkv out; add experts for adapters on every expert)")
    p.add_argument("--chats", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="override the preset's vocabulary (small presets need 201088 for Harmony chats)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    if not (base / "config.json").exists():  # as make_checkpoint.py, streamed shard by shard
        from gptoss.checkpoint import write_checkpoint
        from gptoss.config import preset
        from gptoss.synthetic import random_tensors

        config = preset(args.preset)
        if args.vocab_size:
            config = config.replace(vocab_size=args.vocab_size)
        write_checkpoint(random_tensors(config, 0), config, base, "hf", max_shard_bytes=4 * 2**30)
    chats = args.work / "chats.jsonl"
    write_chats(chats, args.chats)
    (args.work / "lora.toml").write_text(f"""[model]
init_from = "base"
[data]
files = ["chats.jsonl"]
seq_len = {args.seq_len}
batch_size = 1
[optim]
lr = 1e-3
warmup_steps = 1
[lora]
rank = {args.rank}
alpha = {2.0 * args.rank}
targets = {json.dumps(args.targets)}
[train]
steps = {args.steps}
out_dir = "run"
dtype = "bfloat16"
checkpointing = true
threads = {args.threads}
""")
    run_dir = args.work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    _, train_rss = run([sys.executable, "-m", "gptoss", "train", str(args.work / "lora.toml"), "-q"], "gptoss train")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = sorted(run_dir.glob("step-*"))[-1]
    done, gen_rss = run([sys.executable, "-m", "gptoss", "generate", "--model", str(step / "model"), "-q",
                         "--max-tokens", "8", "--temperature", "0", "The river"], "gptoss generate (merged)")
    tok_s = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    adapter = sorted(f.name for f in (step / "adapter").iterdir())
    print(f"\n{args.preset} LoRA rank {args.rank} ({', '.join(args.targets)}), seq {args.seq_len}, batch 1, {args.steps} steps, "
          f"checkpointing, bf16 base")
    print(f"peak RSS of `gptoss train`: {train_rss:.2f} GiB (the largest child so far; the trainer's own "
          f"peak_mem_gib: {max(r['peak_mem_gib'] for r in rows):.2f})")
    print(f"tokens/s after the first step: median {statistics.median(tok_s):.1f} "
          f"(range {min(tok_s):.1f}–{max(tok_s):.1f}); loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}")
    print(f"merged model generated: {done.stdout.strip()[:120]!r}; peak RSS including generate {gen_rss:.2f} GiB")
    print(f"adapter files: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
