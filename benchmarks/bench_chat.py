"""A multi-turn conversation through the real HTTP server and the official `openai` client, with and without
the prefix cache: per-turn time to the first token, decode tok/s and the prompt tokens served from the cache.

    python benchmarks/bench_chat.py                                    # tiny random GPT-oss, fp32
    python benchmarks/bench_chat.py --model /work/ckpt/gpt-oss-20b --dtype bfloat16 --rounds 2
    python benchmarks/bench_chat.py ... --llama-server http://127.0.0.1:8080   # the same prompts, llama-server

The conversation is scripted (a long developer message, then user turns, each answered in the history by a
fixed reply), so every run and every server sees the same prompts whatever the model generates — with
random weights, and as with a reasoning model whose analysis Harmony drops from the history, the reusable
prefix of turn n+1 ends where turn n's prompt ended. Runs with and without the prefix cache alternate in
each round (one variable changed), on fresh engines that share the loaded weights; greedy decoding.

--llama-server: an already running `llama-server -m MODEL.gguf` (its default `cache_prompt` keeps the
conversation's keys per slot); the same Harmony prompt text goes to its /completion endpoint, and its own
`timings` say how many prompt tokens it computed. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request

import openai
from bench_server import add_model_options, build_model  # this folder is on sys.path when run as a script

from gptoss.engine import Engine
from gptoss.server import create_app, serve_in_thread

DEVELOPER = ("You are the support assistant of a company that sells and repairs bicycles. " * 3 +
             "Answer in short paragraphs. Quote prices in euros. When a customer describes a fault, first ask "
             "which model and year the bicycle is, then suggest the most likely cause and what a repair costs. "
             "Never promise a delivery date: say that the shop will call back. " * 4)
TURNS = [
    ("My rear brake squeaks whenever it rains, and lately it also pulls to the left. What could that be?",
     "Which model and year is your bicycle? Squeaking in the rain usually means worn or glazed pads."),
    ("It is a 2021 city bike with rim brakes, about 4000 km on it. The pads look thin.",
     "Thin pads at 4000 km are normal wear. New pads and an adjustment cost about 35 euros in the shop."),
    ("Can I also have the chain checked at the same time? It skips in the highest gear.",
     "Yes. Skipping in one gear is often a stretched chain or a worn sprocket; a check is included."),
    ("Great, how long will all of this take, and do I need an appointment?",
     "Most repairs like this are done the same day. The shop will call you back to confirm a time."),
]


def conversation(turn: int) -> list[dict]:
    """The messages of turn `turn` (0-based): the developer message, earlier turns with their scripted
    replies, this turn's question."""
    messages = [{"role": "developer", "content": DEVELOPER}]
    for question, reply in TURNS[:turn]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": TURNS[turn][0]}]


def ask(client: openai.OpenAI, messages: list[dict], max_tokens: int, finishes: list) -> dict:
    """One streamed turn. Time to first token and decode rate as the engine saw them (its Finish: submit →
    first token, then tokens per second after it), the client's wall time, and the usage it was sent."""
    t0 = time.perf_counter()
    usage = None
    for chunk in client.chat.completions.create(model="bench", messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    wall = time.perf_counter() - t0
    finish = finishes.pop()
    details = getattr(usage, "prompt_tokens_details", None)
    if details is not None and details.cached_tokens is not None and details.cached_tokens != finish.cached_tokens:
        raise SystemExit(f"usage says {details.cached_tokens} cached tokens, the engine {finish.cached_tokens}")
    return {"ttft": finish.ttft_s, "wall": wall, "prompt": usage.prompt_tokens, "tokens": usage.completion_tokens,
            "cached": getattr(details, "cached_tokens", None) or 0, "engine_cached": finish.cached_tokens,
            "decode": finish.decode_tok_s}


def run_gptoss(model, prefix_cache: bool, max_tokens: int, turns: int) -> list[dict]:
    finishes: list = []
    engine = Engine(model, max_concurrency=4, prefix_cache_bytes=(2 * 2**30) if prefix_cache else 0,
                    on_finish=lambda request, finish: finishes.append(finish))
    with engine, serve_in_thread(create_app(engine, "bench")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=3600)
        return [ask(client, conversation(t), max_tokens, finishes) for t in range(turns)]


def harmony_prompts(turns: int) -> list[list[int]]:
    """The prompt token ids our server renders for each turn (Chat Completions defaults), for llama-server."""
    from gptoss.server.schemas import ChatMessage
    from gptoss.server.translate import ToolChoice, chat_turns, render_prompt
    from gptoss.tokenizer import get_tokenizer

    tok = get_tokenizer()
    out = []
    for t in range(turns):
        messages = [ChatMessage.model_validate(m) for m in conversation(t)]
        prompt, _ = render_prompt(tok, chat_turns(messages), [], "medium", ToolChoice("auto"), 131072, "messages")
        out.append(prompt)
    return out


def run_llama(url: str, max_tokens: int, turns: int) -> list[dict]:
    rows = []
    for prompt in harmony_prompts(turns):
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": True,
                           "stream": False}).encode()  # token ids: no second tokenizer in between
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url + "/completion", body,
                                                           {"Content-Type": "application/json"})) as r:
            reply = json.load(r)
        timings = reply["timings"]
        rows.append({"ttft": timings["prompt_ms"] / 1000, "wall": time.perf_counter() - t0,
                     "prompt": timings.get("prompt_n", 0) + timings.get("cache_n", 0),
                     "cached": timings.get("cache_n", 0), "tokens": timings["predicted_n"],
                     "decode": timings["predicted_per_second"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_options(p)
    p.add_argument("--turns", type=int, default=3, choices=range(1, len(TURNS) + 1))
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn (default 16)")
    p.add_argument("--rounds", type=int, default=1, help="with/without pairs, alternating order (default 1)")
    p.add_argument("--llama-server", default=None, metavar="URL", help="also run the prompts through llama-server")
    p.add_argument("--no-gptoss", action="store_true", help="only llama-server (the two may not fit in memory together)")
    args = p.parse_args(argv)

    runs: dict[str, list[list[dict]]] = {"prefix cache": [], "no prefix cache": [], "llama-server": []}
    model, name = (None, "llama-server only") if args.no_gptoss else build_model(args)
    if model is not None:
        with Engine(model, prefix_cache_bytes=0) as warm, serve_in_thread(create_app(warm, "warm")) as base:
            openai.OpenAI(base_url=base + "/v1", api_key="x").chat.completions.create(
                model="warm", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    for r in range(args.rounds):
        for cached in ((True, False) if r % 2 == 0 else (False, True)) if model is not None else ():
            runs["prefix cache" if cached else "no prefix cache"].append(
                run_gptoss(model, cached, args.max_tokens, args.turns))
        if args.llama_server:
            runs["llama-server"].append(run_llama(args.llama_server.rstrip("/"), args.max_tokens, args.turns))

    print(f"\n{name}, {args.device} {args.dtype}, {args.turns} turns × {args.max_tokens} tokens, {args.rounds} "
          f"round(s); medians over rounds (min–max)\n")
    print("| server | turn | prompt tokens | cached | time to first token s | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rounds in runs.items():
        for t in range(args.turns if rounds else 0):
            rows = [rnd[t] for rnd in rounds]
            ttft, decode = [x["ttft"] for x in rows], [x["decode"] for x in rows]
            cached = rows[0].get("engine_cached", rows[0]["cached"])  # llama-server: its own timings' cache_n
            print(f"| {label} | {t + 1} | {rows[0]['prompt']} | {cached} | {statistics.median(ttft):.2f} "
                  f"({min(ttft):.2f}–{max(ttft):.2f}) | {statistics.median(decode):.2f} "
                  f"({min(decode):.2f}–{max(decode):.2f}) |")
    if runs["prefix cache"] and args.turns > 1:
        later = range(1, args.turns)
        speedups = [nc[t]["ttft"] / c[t]["ttft"] for c, nc in zip(runs["prefix cache"], runs["no prefix cache"])
                    for t in later]
        print(f"\ntime to first token from turn 2 on, without / with the prefix cache: median "
              f"{statistics.median(speedups):.2f}× (min {min(speedups):.2f}×, {len(speedups)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
