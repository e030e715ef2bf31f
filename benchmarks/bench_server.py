"""Serving throughput: N streaming clients served together (continuous batching) vs the same N requests one
after another, through the real HTTP server and the official `openai` client. Prints a markdown row.

    python benchmarks/bench_server.py                       # tiny random GPT-oss (full vocabulary), fp32
    python benchmarks/bench_server.py --preset small        # a larger random model
    python benchmarks/bench_server.py --model path/to/gpt-oss-20b --dtype bfloat16 --clients 8

Greedy decoding, so both runs produce the same tokens (checked): the ratio compares equal work.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

import gptoss
from gptoss import synthetic
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.server import create_app, serve_in_thread


def build_model(args: argparse.Namespace) -> tuple[gptoss.Transformer, str]:
    dtype = getattr(torch, args.dtype)
    if args.model:
        return gptoss.load(args.model, device=args.device, dtype=dtype), args.model
    config = preset(args.preset).replace(vocab_size=201_088)  # the Harmony tokenizer needs the full vocabulary
    model = gptoss.Transformer(config, device=args.device, dtype=dtype)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=0, dtype=dtype)))
    return model, f"{args.preset} (random)"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model / --preset / --dtype / --device, as build_model reads them (bench_chat shares them)."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")


def ask(url: str, i: int, max_tokens: int) -> tuple[str, int]:
    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    text, tokens = "", 0
    for chunk in client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"Request {i}: tell me about the number {i}."}],
            temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            delta = chunk.choices[0].delta
            text += (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_options(p)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--header", action="store_true", help="print the table header too")
    args = p.parse_args(argv)

    model, name = build_model(args)
    # No prefix cache: both runs send the same prompts, and the second would reuse the first's keys; this
    # measures batching (benchmarks/bench_chat.py measures the prefix cache).
    with Engine(model, max_concurrency=args.clients, max_queue=args.clients, prefix_cache_bytes=0) as engine, \
            serve_in_thread(create_app(engine, "bench")) as base:
        url = base + "/v1"
        ask(url, -1, 4)  # warm-up (kernels, allocator)

        t0 = time.perf_counter()
        sequential = [ask(url, i, args.max_tokens) for i in range(args.clients)]
        t_seq = time.perf_counter() - t0

        steps = engine.steps
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            concurrent = list(pool.map(lambda i: ask(url, i, args.max_tokens), range(args.clients)))
        t_con = time.perf_counter() - t0
        batch_steps = engine.steps - steps

    same = sum(a == b for a, b in zip(sequential, concurrent))
    tokens = sum(t for _, t in concurrent)
    seq_rate, con_rate = sum(t for _, t in sequential) / t_seq, tokens / t_con
    if args.header:
        print("| model | device, dtype | clients × max tokens | tokens | one by one tok/s | together tok/s | speedup "
              "| decode steps together | same answers |")
        print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.device}, {args.dtype} | {args.clients} × {args.max_tokens} | {tokens} | {seq_rate:.1f} "
          f"| {con_rate:.1f} | {con_rate / seq_rate:.2f}× | {batch_steps} | {same}/{args.clients} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
