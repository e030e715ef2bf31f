"""gptoss vs transformers' GptOssForCausalLM on one shared checkpoint: decode tok/s (each in bf16, its best CPU
mode) and greedy tokens in fp32 (must be identical), with the largest logit difference on the prompt.

    python benchmarks/bench_transformers.py [--layers 2] [--tokens 16] [--device cuda]

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
from bench_decode import sync  # this folder is on sys.path when run as a script

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.generate import SamplingParams, generate


def ours_decode(path: Path, prompt: list[int], tokens: int, dtype: torch.dtype,
                device: torch.device) -> tuple[list[int], float, torch.Tensor]:
    model = gptoss.load(path, device=device, dtype=dtype)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device)).float().cpu()
    times, out = [], []
    t = time.perf_counter()
    for _, token in generate(model, [prompt], SamplingParams(temperature=0, max_tokens=tokens)):
        now = time.perf_counter()
        times.append(now - t)
        t = now
        out.append(token)  # an int: the step has finished on any device
    return out, 1 / statistics.median(times[1:]), logits  # the first interval is the prefill


def transformers_decode(path: Path, prompt: list[int], tokens: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[list[int], float, torch.Tensor]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=dtype).to(device=device, dtype=dtype).eval()
    # (.to(dtype): transformers 5.x leaves the dequantized experts in bf16 when asked for fp32)
    ids = torch.tensor([prompt], device=device)

    def timed(**kwargs) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        out = model.generate(ids, do_sample=False, **kwargs)
        sync(device)
        return out, time.perf_counter() - t

    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
        timed(max_new_tokens=2)  # warm-up
        _, prefill = timed(max_new_tokens=1)
        out, total = timed(max_new_tokens=tokens, min_new_tokens=tokens)
    return out[0, len(prompt):].tolist(), (tokens - 1) / (total - prefill), logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--out", type=Path, default=None, help="keep the shared checkpoint here")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (both models run there)")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"],
                   help="fp32 doubles transformers' copy (8 layers in fp32 were killed for memory in 24 GiB)")
    args = p.parse_args()
    config = preset("gpt-oss-20b").replace(num_hidden_layers=args.layers, layer_types=())
    folder = args.out or Path(tempfile.mkdtemp(prefix="gptoss-shared-"))
    write_checkpoint(synthetic.random_tensors(config, seed=0), config, folder, "hf")
    prompt = torch.randint(0, 200_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    device = torch.device(args.device)
    results = {"layers": args.layers, "threads": torch.get_num_threads(), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    for name in args.dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours_tokens, ours_tps, ours_logits = ours_decode(folder, prompt, args.tokens, dtype, device)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        theirs_tokens, theirs_tps, theirs_logits = transformers_decode(folder, prompt, args.tokens, dtype, device)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        diff = (ours_logits - theirs_logits).abs()
        results[name] = {"gptoss_tok_s": ours_tps, "transformers_tok_s": theirs_tps,
                         "speedup": ours_tps / theirs_tps, "same_greedy_tokens": ours_tokens == theirs_tokens,
                         "prompt_logits_max_abs_diff": diff.max().item(),
                         "prompt_logits_max_abs": theirs_logits.abs().max().item(),
                         "same_prompt_argmax": bool((ours_logits.argmax(-1) == theirs_logits.argmax(-1)).all()),
                         "gptoss_tokens": ours_tokens, "transformers_tokens": theirs_tokens}
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
