"""Batch-1 decode with and without a JSON-schema constraint, through the engine, on a real-size checkpoint.

    python benchmarks/bench_structured_decode.py /work/ckpt/gpt-oss-20b --rounds 7 --tokens 24

Each round runs the same prompt twice on one Engine (prefix cache off, so both prefill alike): once
unconstrained, once under `Constraint.json_schema` with reasoning_budget=0 (the final header is forced at
once, so every later step is inside the JSON, where masks are dearest: object keys, numbers, strings); the
order alternates between rounds. A run's decode rate is Finish.decode_tok_s (tokens after the first over
the time after the first). Reported: each run's rate, the per-round ratio constrained / unconstrained,
their median and spread, and the Wilcoxon signed-rank p-value of the paired rates (scipy), a sign test
without it. With random weights the text is noise, which is what a mask costs the most on (long strings).

A third run per round, "text", is under a constraint that allows any text (special tokens aside): greedy
then writes the same tokens as the unconstrained run, so text / free is the cost of the constrained path
itself (mask, apply, advance) with the routing held equal, while json / free also changes the tokens, and
with them which experts each step reads (on a random model, from a cache shared with other jobs).

A fourth, "replay", is under a grammar that allows exactly the JSON run's tokens, one at a time: the same
tokens as "json" at the cheapest mask there is, so json / replay is the JSON mask's own cost, and replay /
free what the different tokens alone cost.

On a machine shared with other jobs the run-to-run spread of decode rates can exceed the effect, so the
constrained runs also time the guide's own work directly (Guide.mask + Guide.advance, per token, on the
engine thread): `guide_ms_per_token` against the unconstrained step time bounds the ratio from the cost
side, independently of the drift between runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import gptoss
from gptoss import harmony as h
from gptoss import constrain
from gptoss.constrain import Constraint
from gptoss.engine import Engine
from gptoss.generate import SamplingParams
from gptoss.tokenizer import get_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "summary"],
          "properties": {"city": {"type": "string"}, "summary": {"type": "string"},
                         "days": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                             "required": ["high", "low", "sky"],
                                                             "properties": {"high": {"type": "number"},
                                                                            "low": {"type": "number"},
                                                                            "sky": {"enum": ["sun", "rain"]}}}}}}


def sign_test(diffs: list[float]) -> float:
    """Two-sided sign test p-value (no ties counted)."""
    from math import comb

    n = sum(1 for d in diffs if d != 0)
    k = min(sum(1 for d in diffs if d > 0), sum(1 for d in diffs if d < 0))
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=24, help="max_tokens of each run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (on a GPU the masks are still computed on the CPU)")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = get_tokenizer()
    t = time.perf_counter()
    model = gptoss.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    print(f"loaded {args.model} in {time.perf_counter() - t:.1f} s; {torch.get_num_threads()} threads")
    prompt = h.render_conversation_for_completion([h.Message.system(h.SystemContent()),
                                                   h.Message.user("The weather in Paris this week, as JSON?")],
                                                  "assistant", tok)
    stops = tuple(sorted(h.stop_tokens_for_assistant_actions(tok)))
    constraint = Constraint.json_schema(SCHEMA, reasoning_budget=0, close_reserve=0)
    any_text = Constraint(f"start: TEXT\nTEXT: {constrain.FREE_TEXT}\n", close_reserve=0)
    runs = {"free": SamplingParams(temperature=0, max_tokens=args.tokens, stop_tokens=stops),
            "json": SamplingParams(temperature=0, max_tokens=args.tokens, stop_tokens=stops, constraint=constraint),
            "text": SamplingParams(temperature=0, max_tokens=args.tokens, stop_tokens=stops, constraint=any_text)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens_of: dict[str, list[int]] = {}
    guide_s: dict[str, list[float]] = {"json": [], "text": [], "warm-up": []}  # Guide.mask + .advance calls
    current = ["warm-up"]

    def timed(f):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                guide_s[current[0]].append(time.perf_counter() - t0)
        return wrapper

    constrain.Guide.mask = timed(constrain.Guide.mask)
    constrain.Guide.advance = timed(constrain.Guide.advance)
    with Engine(model, max_concurrency=1, prefix_cache_bytes=0) as engine:
        engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))  # warm-up (kernels, llguidance)
        json_tokens, _ = engine.generate(prompt, runs["json"])
        # llguidance's numeric token syntax: <[id]> is exactly that token
        replay = Constraint("start: " + " ".join(f"<[{t}]>" for t in json_tokens) + "\n", close_reserve=0)
        runs["replay"] = SamplingParams(temperature=0, max_tokens=args.tokens, stop_tokens=stops, constraint=replay)
        rates["replay"] = []
        guide_s["replay"] = []
        for r in range(args.rounds):
            kinds = ["free", "json", "text", "replay"]
            order = kinds[r % 4:] + kinds[:r % 4]
            for name in order:
                current[0] = name
                tokens, finish = engine.generate(prompt, runs[name])
                rates[name].append(finish.decode_tok_s)
                tokens_of[name] = tokens
                print(f"round {r} {name:4s} {finish.completion_tokens:3d} tokens {finish.decode_tok_s:6.3f} tok/s "
                      f"({finish.reason})" + (f"  {tok.decode(tokens)[-60:]!r}" if name == "json" else ""))
    text_ratios = [c / u for c, u in zip(rates["text"], rates["free"])]
    replay_ratios = [c / u for c, u in zip(rates["replay"], rates["free"])]
    json_replay = [c / u for c, u in zip(rates["json"], rates["replay"])]
    ratios = [c / u for c, u in zip(rates["json"], rates["free"])]
    diffs = [c - u for c, u in zip(rates["json"], rates["free"])]
    try:
        from scipy.stats import wilcoxon

        pvalue, test = float(wilcoxon(rates["json"], rates["free"]).pvalue), "Wilcoxon signed-rank"
        text_p = float(wilcoxon(rates["text"], rates["free"]).pvalue)
        out_p = {"replay_vs_free_p": float(wilcoxon(rates["replay"], rates["free"]).pvalue),
                 "json_vs_replay_p": float(wilcoxon(rates["json"], rates["replay"]).pvalue)}
    except ImportError:
        pvalue, test = sign_test(diffs), "sign test"
        text_p = sign_test([c - u for c, u in zip(rates["text"], rates["free"])])
        out_p = {"replay_vs_free_p": sign_test([c - u for c, u in zip(rates["replay"], rates["free"])]),
                 "json_vs_replay_p": sign_test([c - u for c, u in zip(rates["json"], rates["replay"])])}
    guide_ms = 1e3 * sum(guide_s["json"]) / max(1, len(guide_s["json"]) // 2)  # mask + advance: 2 calls a token
    step_ms = 1e3 / statistics.median(rates["free"])
    out = {"guide_ms_per_token": guide_ms, "free_step_ms_median": step_ms,
           "ratio_bound_from_guide_cost": step_ms / (step_ms + guide_ms), "free_tok_s": rates["free"],
           "text_tok_s": rates["text"], "text_ratio_per_round": text_ratios,
           "text_ratio_median": statistics.median(text_ratios), "text_p_value": text_p,
           "text_tokens_equal_free": tokens_of.get("text") == tokens_of.get("free"),
           "replay_tok_s": rates["replay"], "replay_tokens_equal_json": tokens_of.get("replay") == tokens_of.get("json"),
           "replay_over_free_median": statistics.median(replay_ratios),
           "json_over_replay_median": statistics.median(json_replay), "json_tok_s": rates["json"], "ratio_per_round": ratios,
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "free_median": statistics.median(rates["free"]), "json_median": statistics.median(rates["json"]),
           "p_value": pvalue, "test": test}
    out.update(out_p)
    out["device"] = args.device
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"guide (mask + advance) {guide_ms:.3f} ms/token vs an unconstrained step of {step_ms:.0f} ms: "
          f"ratio >= {out['ratio_bound_from_guide_cost']:.4f} from its cost alone")
    print(f"any-text constraint / unconstrained (same tokens: {out['text_tokens_equal_free']}): median ratio "
          f"{out['text_ratio_median']:.3f} (range {min(text_ratios):.3f}-{max(text_ratios):.3f}), p = {text_p:.3g}")
    print(f"replay (the JSON run's tokens, trivial mask) / unconstrained: median {out['replay_over_free_median']:.3f} "
          f"(p = {out['replay_vs_free_p']:.3g}); JSON / replay (same tokens): median "
          f"{out['json_over_replay_median']:.3f} (p = {out['json_vs_replay_p']:.3g})")
    print(f"JSON constraint / unconstrained decode at batch 1: median ratio {out['ratio_median']:.3f} "
          f"(range {out['ratio_min']:.3f}-{out['ratio_max']:.3f} over {args.rounds} rounds), {test} p = {pvalue:.3g}")


if __name__ == "__main__":
    main()
