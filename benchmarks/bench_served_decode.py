"""Served single-stream decode against bench_decode, paired: what `gptoss serve` gives one client, as a
fraction of the model's decode speed measured alone, in the same window.

    python benchmarks/bench_served_decode.py /work/ckpt/gpt-oss-20b --rounds 4

Each round runs, in alternating order, (a) `gptoss serve` as a process of its own (prefix cache off), with one
client in this process sending a streamed Chat Completion (the official `openai` client) of --max-tokens greedy
tokens after a prompt of about --context tokens, twice (the first warms up; the second counts); and (b)
`bench_decode.py` at that context for the same number of steps. The served figure is the engine's own (from the
server's log line: the median time between consecutive tokens, and the mean rate after the first token);
bench_decode's is its median (and mean) step. Nothing else should run on the machine meanwhile.

The served greedy step picks its token through model.BoundedArgmax on the CPU (the default since 2026-12-05), so
bench_decode runs with --bounded-argmax too (--full-logits-reference: without, as the rounds before that date).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILLER = ("You are the support assistant of a company that sells and repairs bicycles. Answer in short paragraphs, "
          "quote prices in euros, and never promise a delivery date. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_stream(port: int, body: dict) -> None:
    """The same streamed request read as bytes, parsed by nobody: a client that costs the machine no CPU."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    while response.read(65536):
        pass
    conn.close()


def served(model: str, dtype: str, context: int, max_tokens: int, raw: bool = False) -> dict:
    import openai

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "gptoss", "serve", "--model", model, "--dtype", dtype, "-q",
                               "--prefix-cache-gib", "0", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"gptoss serve exited: {Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        developer = FILLER * max(1, context // 30)
        body = {"model": client.models.list().data[0].id,
                "messages": [{"role": "developer", "content": developer},
                             {"role": "user", "content": "My brake squeaks. What could it be?"}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        for _ in range(2):
            if raw:
                raw_stream(port, body)
            else:
                for _ in client.chat.completions.create(**body):
                    pass
        time.sleep(0.5)  # the log line is written as the response ends
        lines = [line for line in Path(log.name).read_text().splitlines() if "step_median=" in line]
        first, m = (re.search(r"in=(\d+) out=(\d+).*decode=([\d.]+)tok/s step_median=([\d.]+)ms", line)
                    for line in lines[-2:])
        return {"prompt_tokens": int(m[1]), "tokens": int(m[2]), "tok_s_mean": float(m[3]),
                "ms_median": float(m[4]),  # the second request's; the first request's beside it (a user's first)
                "first_request": {"tok_s_mean": float(first[3]), "ms_median": float(first[4])}}
    finally:
        server.terminate()
        server.wait(30)
        os.unlink(log.name)


def bench_decode(model: str, dtype: str, context: int, steps: int, bounded: bool = True) -> dict:
    """bench_decode.py at `context` (the served prompt's length) for `steps` steps: its median and mean step."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, str(HERE / "bench_decode.py"), model, "--dtype", dtype, "--contexts",
                        str(context), "--steps", str(steps), "--prefill", "0", "--json", f.name,
                        *(["--bounded-argmax"] if bounded else [])],
                       check=True, stdout=subprocess.DEVNULL)
        r = json.loads(Path(f.name).read_text())["decode"][0]
    return {"ms_median": r["ms_per_token"], "tok_s_mean": 1e3 / r["ms_per_token_mean"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--context", type=int, default=384, help="prompt tokens, about (default 384)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--full-logits-reference", action="store_true",
                   help="bench_decode without --bounded-argmax (the served step still uses it)")
    p.add_argument("--raw-client", action="store_true",
                   help="read the stream as bytes instead of through the openai client (its parsing costs CPU)")
    args = p.parse_args()
    rows = []
    context = None  # bench_decode's: the served prompt's length (round 1 serves first)
    for r in range(args.rounds):
        order = ("served", "bench") if r % 2 == 0 else ("bench", "served")
        got = {}
        for what in order:
            if what == "served":
                got[what] = served(args.model, args.dtype, args.context, args.max_tokens, args.raw_client)
                context = context or got[what]["prompt_tokens"]
            else:
                got[what] = bench_decode(args.model, args.dtype, context, args.max_tokens,
                                         bounded=not args.full_logits_reference)
        ratio = got["bench"]["ms_median"] / got["served"]["ms_median"]
        ratio_mean = got["served"]["tok_s_mean"] / got["bench"]["tok_s_mean"]
        rows.append((ratio, ratio_mean))
        print(json.dumps({"round": r + 1, "first": order[0], **{k: v for k, v in got.items()},
                          "served_over_bench_median": ratio, "served_over_bench_mean": ratio_mean}), flush=True)
    for i, name in enumerate(("median step", "mean rate")):
        ratios = [row[i] for row in rows]
        logs = [math.log(x) for x in ratios]
        line = f"served / bench_decode ({name}): median {statistics.median(ratios):.3f}, " \
               f"range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} rounds"
        if len(logs) > 1:
            try:
                from scipy import stats

                line += f"; t-test of log ratios vs 0: p = {stats.ttest_1samp(logs, 0.0).pvalue:.3g}"
            except ImportError:
                pass
        print(line)


if __name__ == "__main__":
    main()
