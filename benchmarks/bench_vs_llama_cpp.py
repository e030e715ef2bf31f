"""Decode and 128-token prefill against llama.cpp's llama-bench, paired rounds on the same weights.

    python benchmarks/make_gguf.py /work/ckpt/gpt-oss-20b $LLAMA_CPP /work/ckpt/gpt-oss-20b.gguf   # once
    python benchmarks/bench_vs_llama_cpp.py /work/ckpt/gpt-oss-20b /work/ckpt/gpt-oss-20b.gguf \\
        --llama-bench $LLAMA_CPP/build/bin/llama-bench --rounds 5

Each round runs llama.cpp first, then gptoss (`bench_decode.py`, greedy steps as `gptoss chat` takes them:
`--bounded-argmax`), each as a process of its own, the page cache dropped before each where this process
may (root): the two checkpoints do not fit in a 24 GiB machine's memory together, and neither program
should find the other's pages. Decode is 16 tokens after a 128-token context (`llama-bench -p 0 -n 16 -d 128`
against `--contexts 128 --steps 16`), prefill a 128-token prompt (`-p 128 -n 0` against `--prefill 128`).
llama-bench reports the mean of its repetitions, bench_decode the median step; the per-round ratio is
gptoss / llama.cpp, summarised by the median, the range and a t-test of the log ratios against 0. The host's
read bandwidth, measured by bench_decode before loading, is printed per round: on shared hosts it moves more
than the differences measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_streaming import drop_caches  # this folder is on sys.path when run as a script
from bench_train import paired_t


def drop_page_cache() -> bool:
    """bench_streaming.drop_caches, or False where this process may not (not root)."""
    try:
        drop_caches()
        return True
    except OSError:
        return False


def llama_bench(binary: str, gguf: str, threads: int, repetitions: int) -> dict[str, float]:
    cmd = [binary, "-m", gguf, "-t", str(threads), "-r", str(repetitions), "-o", "json",
           "-p", "128", "-n", "16", "-d", "0,128"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = {}
    for test in json.loads(out):
        # Four tests (pp128 and tg16, each at depth 0 and 128). Compared: pp128 from an empty context, as our
        # prefill; tg16 at depth 128, as our decode. pp128 at depth 128 is kept for the earlier tables' form.
        if test["n_prompt"] == 128 and test["n_gen"] == 0 and test["n_depth"] == 0:
            result["prefill_tok_s"], result["prefill_sd"] = test["avg_ts"], test["stddev_ts"]
        if test["n_prompt"] == 128 and test["n_gen"] == 0 and test["n_depth"] == 128:
            result["prefill_d128_tok_s"] = test["avg_ts"]
        if test["n_prompt"] == 0 and test["n_gen"] == 16 and test["n_depth"] == 128:
            result["decode_tok_s"], result["decode_sd"] = test["avg_ts"], test["stddev_ts"]
    if len(result) != 5:
        raise SystemExit(f"llama-bench gave no pp128 / tg16@d128 result: {out[:500]}")
    return result


def gptoss_bench(model: str, threads: int, extra: list[str]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(Path(__file__).with_name("bench_decode.py")), model, "--contexts", "128",
               "--steps", "16", "--prefill", "128", "--threads", str(threads), "--json", f.name, *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(Path(f.name).read_text())
    return {"decode_tok_s": r["decode"][0]["tok_s"], "prefill_tok_s": r["prefill"][0]["tok_s"],
            "read_bandwidth_GBs": r["read_bandwidth_GBs"]}


def summary(name: str, ratios: list[float]) -> str:
    line = f"{name}: gptoss / llama.cpp median {statistics.median(ratios):.3f} (range {min(ratios):.2f}-{max(ratios):.2f})"
    if len(ratios) >= 3:
        line += f", t-test of log ratios vs 0: p = {paired_t([math.log(r) for r in ratios]):.2g}"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the GPT-oss checkpoint (HF layout)")
    p.add_argument("gguf", help="the same weights as GGUF (benchmarks/make_gguf.py)")
    p.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench binary")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repetitions", type=int, default=2, help="llama-bench -r")
    p.add_argument("--gptoss-args", default="--bounded-argmax",
                   help="extra bench_decode.py arguments (quoted; default: the greedy path users run)")
    p.add_argument("--json", type=Path, default=None, help="also write the rounds here")
    args = p.parse_args()

    rounds = []
    print("| round | llama.cpp tg16 @ d128 | gptoss decode | ratio | llama.cpp pp128 | gptoss prefill 128 | ratio "
          "| read bw GB/s |\n|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for i in range(1, args.rounds + 1):
        dropped = drop_page_cache()
        lc = llama_bench(args.llama_bench, args.gguf, args.threads, args.repetitions)
        drop_page_cache()
        go = gptoss_bench(args.model, args.threads, args.gptoss_args.split())
        r = {"round": i, "page_cache_dropped": dropped, "llama_cpp": lc, "gptoss": go,
             "decode_ratio": go["decode_tok_s"] / lc["decode_tok_s"],
             "prefill_ratio": go["prefill_tok_s"] / lc["prefill_tok_s"]}
        rounds.append(r)
        print(f"| {i} | {lc['decode_tok_s']:.2f} ± {lc['decode_sd']:.2f} | {go['decode_tok_s']:.2f} | "
              f"{r['decode_ratio']:.2f} | {lc['prefill_tok_s']:.2f} ± {lc['prefill_sd']:.2f} | "
              f"{go['prefill_tok_s']:.2f} | {r['prefill_ratio']:.2f} | {go['read_bandwidth_GBs']:.0f} |", flush=True)
    if not rounds[0]["page_cache_dropped"]:
        print("note: the page cache could not be dropped (not root): the programs may find each other's pages")
    print(summary("decode", [r["decode_ratio"] for r in rounds]))
    print(summary("prefill 128", [r["prefill_ratio"] for r in rounds]))
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
