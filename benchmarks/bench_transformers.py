"""gptoss vs transformers' GptOssForCausalLM on one shared checkpoint: decode tok/s (each in bf16, its best CPU
mode) and greedy tokens in fp32 (must be identical).

    python benchmarks/bench_transformers.py [--layers 2] [--tokens 16]

The shared model has gpt-oss-20b's layer shapes (hidden 2880, 32 experts of width 2880, 64/8 heads, the
full 201,088 vocabulary) with fewer layers, because transformers dequantizes MXFP4 experts to bf16 on CPU
(`Mxfp4Config(dequantize=True)`): the full 20b would need ≈ 40 GB there. Per layer both do the same work,
so the per-token ratio carries over.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.generate import SamplingParams, generate


def ours_decode(path: Path, prompt: list[int], tokens: int, dtype: torch.dtype) -> tuple[list[int], float]:
    model = gptoss.load(path, dtype=dtype)
    times, out = [], []
    t = time.perf_counter()
    for _, token in generate(model, [prompt], SamplingParams(temperature=0, max_tokens=tokens)):
        now = time.perf_counter()
        times.append(now - t)
        t = now
        out.append(token)
    return out, 1 / statistics.median(times[1:])  # the first interval is the prefill


def transformers_decode(path: Path, prompt: list[int], tokens: int, dtype: torch.dtype) -> tuple[list[int], float]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=dtype).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        t = time.perf_counter()
        one = model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
        total = time.perf_counter() - t
    del one
    return out[0, len(prompt):].tolist(), (tokens - 1) / (total - prefill)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--out", type=Path, default=None, help="keep the shared checkpoint here")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"],
                   help="fp32 doubles transformers' copy (8 layers in fp32 were killed for memory in 24 GiB)")
    args = p.parse_args()
    config = preset("gpt-oss-20b").replace(num_hidden_layers=args.layers, layer_types=())
    folder = args.out or Path(tempfile.mkdtemp(prefix="gptoss-shared-"))
    write_checkpoint(synthetic.random_tensors(config, seed=0), config, folder, "hf")
    prompt = torch.randint(0, 200_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {"layers": args.layers, "threads": torch.get_num_threads()}
    for name in args.dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours_tokens, ours_tps = ours_decode(folder, prompt, args.tokens, dtype)
        gc.collect()
        theirs_tokens, theirs_tps = transformers_decode(folder, prompt, args.tokens, dtype)
        gc.collect()
        results[name] = {"gptoss_tok_s": ours_tps, "transformers_tok_s": theirs_tps,
                         "speedup": ours_tps / theirs_tps, "same_greedy_tokens": ours_tokens == theirs_tokens,
                         "gptoss_tokens": ours_tokens, "transformers_tokens": theirs_tokens}
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
