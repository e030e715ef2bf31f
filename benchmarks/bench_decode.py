"""Decode and prefill speed, memory, and the bandwidth limit, on a real-size checkpoint.

    python benchmarks/make_checkpoint.py --preset gpt-oss-20b /data/gpt-oss-20b      # once, ≈ 4 min
    python benchmarks/bench_decode.py /data/gpt-oss-20b --contexts 128 4096

Decode at batch 1 is memory-bound: every token reads the attention weights, k of E experts per layer, the
router and the unembedding. `bytes/token` counts exactly those (the KV cache aside); the limit is the
machine's read bandwidth (a 1 GiB reduction, measured in the same run) divided by it. Contexts are set up
by writing random keys/values into the cache (a 4096-token prefill would only measure prefill), so the
decode cost can be read per layer type: sliding-window layers must not grow with the context.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import gptoss
from gptoss.cache import KVCache, default_cache_dtype
from gptoss.generate import SamplingParams, decode_step, prefill

GREEDY = SamplingParams(temperature=0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large reduction: what streaming weights from the device's memory can reach."""
    a = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    a.sum()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / min(times)


def bytes_per_token(model: gptoss.Transformer) -> int:
    """Weight bytes one decode step reads: all but the embedding table and the unchosen experts."""
    c = model.config
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        n = t.numel() * t.element_size()
        if name == "embedding.weight":
            n = c.hidden_size * t.element_size()  # one row
        elif ".mlp.mlp" in name:  # expert weights and biases: k of E
            n = n * c.experts_per_token // c.num_experts
        elif name == "unembedding.weight" and getattr(model, "bounded_argmax", None) is not None:
            n = 0  # read for the few candidate rows only (bounded_argmax.* count instead)
        total += n
    return total


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def touch_weights(model: gptoss.Transformer) -> float:
    """Read every weight page once (mmap faults them in), so decode timings show the steady state rather
    than the first pass over 12.8 GB of page faults. Returns the seconds it took."""
    t = time.perf_counter()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one element per 4 KiB page
    return time.perf_counter() - t


def fill_cache(model: gptoss.Transformer, context: int) -> KVCache:
    """A cache holding `context` positions of random keys/values (as after a prefill of that length)."""
    c = model.config
    cache = KVCache(c, 1, max_len=context + 64, device=model.device, dtype=default_cache_dtype(model.dtype, model.device))
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(cache.layers):
        n = min(context, c.sliding_window) if c.is_sliding(i) else context
        k = torch.randn(1, n, c.num_key_value_heads, c.head_dim, generator=g)
        layer.update(k.to(model.device), torch.randn_like(k).to(model.device),
                     torch.arange(context - n, context, device=model.device)[None])
        layer.length = context
    return cache


class LayerTimer:
    """Wall time spent in blocks with sliding vs full attention (forward pre/post hooks on whole blocks:
    the fused decode step runs a block's attention and MoE as one unit; the MoE costs the same in both)."""

    def __init__(self, model: gptoss.Transformer):
        self.times = {"sliding": 0.0, "full": 0.0}
        self._start = 0.0
        if model.device.type != "cpu":  # asynchronous devices: a host timer per block would time the launches
            return
        for block in model.block:
            kind = "sliding" if block.attn.sliding_window else "full"
            block.register_forward_pre_hook(self._pre)
            block.register_forward_hook(lambda m, a, o, kind=kind: self._post(kind))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, kind: str):
        self.times[kind] += time.perf_counter() - self._start


@torch.no_grad()
def decode_speed(model, context: int, steps: int, timer: LayerTimer) -> dict:
    cache = fill_cache(model, context)
    token = torch.tensor([[1000]], device=model.device)
    per_token, candidates = [], []
    timer.times = {"sliding": 0.0, "full": 0.0}
    for s in range(steps):
        if s == 1:  # the first step pays page faults / the kernel build: timed neither here nor per block
            timer.times = {"sliding": 0.0, "full": 0.0}
        sync(model.device)
        t = time.perf_counter()
        # as generate() takes a greedy step: all logits, or BoundedArgmax's token where it is wanted
        logits, chosen = decode_step(model, token, torch.tensor([[context + s]], device=model.device), cache,
                                     [(GREEDY, None)])
        token = logits.argmax(-1, keepdim=True) if chosen is None else torch.tensor([chosen], device=model.device)
        sync(model.device)
        per_token.append(time.perf_counter() - t)
        if model.bounded_argmax is not None:
            candidates.append(model.bounded_argmax.last_candidates)
    per_token = per_token[1:]
    n_layers = {"sliding": sum(1 for b in model.block if b.attn.sliding_window),
                "full": sum(1 for b in model.block if not b.attn.sliding_window)}
    return {"context": context, "ms_per_token": 1e3 * statistics.median(per_token),
            "ms_per_token_mean": 1e3 * statistics.mean(per_token),
            "tok_s": 1 / statistics.median(per_token),
            **({"bounded_argmax_candidates_median": statistics.median(candidates)} if candidates else {}),
            "block_ms_per_layer": {k: 1e3 * v / max(steps - 1, 1) / max(n_layers[k], 1) for k, v in timer.times.items()}}


@torch.no_grad()
def prefill_speed(model, length: int) -> dict:
    """A random prompt through generate.prefill (the chunked path `gptoss generate` runs). Its result is the
    first new token's logits, so the time to first token is this time (plus one argmax)."""
    cache = KVCache(model.config, 1, max_len=length + 1, device=model.device, dtype=default_cache_dtype(model.dtype, model.device))
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(model.device)
    sync(model.device)
    t = time.perf_counter()
    prefill(model, tokens, torch.arange(length, device=model.device)[None], cache).argmax(-1).tolist()
    seconds = time.perf_counter() - t
    return {"length": length, "tok_s": length / seconds, "ttft_s": seconds}


@torch.no_grad()
def quantize_unembedding(model, positions: int = 64) -> dict:
    """model.quantize_unembedding(), and the logit error it costs on the hidden states of a random prompt:
    max and mean |Δlogit| against the bf16 unembedding, the same relative to the logits' spread, and how often
    the top-1 token stays the same."""
    tokens = torch.randint(0, model.config.vocab_size, (1, positions), generator=torch.Generator().manual_seed(2))
    h = model.hidden_states(tokens)[0]  # (T, D), after the final norm
    before = torch.cat([model.unembedding(h[i:i + 4]).float() for i in range(0, positions, 4)])
    model.quantize_unembedding()
    after = torch.cat([model.unembedding(h[i:i + 4]).float() for i in range(0, positions, 4)])
    err = (after - before).abs()
    return {"positions": positions, "max_abs": err.max().item(), "mean_abs": err.mean().item(),
            "mean_abs_over_logit_std": (err.mean() / before.std()).item(),
            "top1_same": (after.argmax(-1) == before.argmax(-1)).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 2048],
                   help="prompt lengths to time prefill and time to first token for (0 = skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (weights and cache live there)")
    p.add_argument("--experts", default="auto", choices=["auto", "mxfp4", "dense"],
                   help="GPUs: keep the experts MXFP4 (dequantized per step) or dense (checkpoint.load's "
                        "dense_experts; auto: its default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--cold", action="store_true", help="do not touch all weight pages before timing")
    p.add_argument("--no-bf16-kernel", action="store_true", help="dense bf16 layers through F.linear (A/B)")
    p.add_argument("--fp32-prefill-attention", action="store_true",
                   help="prefill attention in fp32 even where the CPU has bf16 math (A/B)")
    p.add_argument("--hugepages", action="store_true",
                   help="copy the CPU weights into anonymous memory on transparent huge pages after loading "
                        "(gptoss.hugepages; A/B against the checkpoint's 4 KiB page-cache pages)")
    p.add_argument("--int8-unembedding", action="store_true",
                   help="quantize the unembedding to int8 (the opt-in mode) and report its logit error")
    p.add_argument("--bounded-argmax", action="store_true",
                   help="greedy steps through model.BoundedArgmax (what gptoss chat/generate/serve do on the CPU "
                        "by default): the unembedding read as int8, candidates recomputed exactly; same tokens")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fp32_prefill_attention:
        from gptoss import model as model_module

        model_module._CPU_BF16_NATIVE = False
    if args.no_bf16_kernel:
        from gptoss import kernels

        kernels.BF16_MAX_ROWS = 0

    device = torch.device(args.device)
    bandwidth = read_bandwidth(device)
    t = time.perf_counter()
    dense = {"auto": None, "mxfp4": False, "dense": True}[args.experts]
    model = gptoss.load(args.model, device=device, dtype=getattr(torch, args.dtype), dense_experts=dense)
    load_s = time.perf_counter() - t
    hugepages_s = None
    if args.hugepages:
        from gptoss import hugepages

        if not hugepages.supported():
            raise SystemExit("--hugepages: this kernel gives no transparent huge pages on request "
                             "(/sys/kernel/mm/transparent_hugepage/enabled is neither always nor madvise)")
        t = time.perf_counter()
        moved = hugepages.to_hugepages(model)
        hugepages_s = time.perf_counter() - t
        print(f"hugepages: {moved / 2**30:.2f} GiB copied in {hugepages_s:.1f} s, "
              f"{hugepages.anonymous_huge_bytes() / 2**30:.2f} GiB on huge pages", flush=True)
    rss_loaded = rss_gib()
    warm_s = touch_weights(model) if not args.cold else 0.0
    int8_error = quantize_unembedding(model) if args.int8_unembedding else None
    bounded_s = None
    if args.bounded_argmax:
        if args.int8_unembedding:
            raise SystemExit("--bounded-argmax and --int8-unembedding exclude each other")
        t = time.perf_counter()
        if not model.enable_bounded_argmax():
            raise SystemExit("--bounded-argmax: needs a bf16 unembedding on the CPU")
        bounded_s = time.perf_counter() - t
        model.bounded_argmax_wanted = True
    per_token_bytes = bytes_per_token(model)
    checkpoint_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    timer = LayerTimer(model)
    results = {"model": str(args.model), "device": str(device), "threads": torch.get_num_threads(),
               "dtype": args.dtype, "experts": type(model.block[0].mlp.mlp1_weight).__name__,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "read_bandwidth_GBs": bandwidth / 1e9, "load_s": load_s, "hugepages_s": hugepages_s,
               "rss_after_load_GiB": rss_loaded,
               "touch_all_pages_s": warm_s,
               "checkpoint_GiB": checkpoint_bytes / 2**30, "bytes_per_token_GB": per_token_bytes / 1e9,
               "limit_tok_s": bandwidth / per_token_bytes, "int8_unembedding": int8_error,
               "bounded_argmax_build_s": bounded_s, "decode": []}
    for context in args.contexts:
        r = decode_speed(model, context, args.steps, timer)
        r["fraction_of_limit"] = r["tok_s"] / results["limit_tok_s"]
        results["decode"].append(r)
        print(json.dumps(r), flush=True)
    results["prefill"] = []
    for length in [n for n in args.prefill if n > 0]:
        results["prefill"].append(prefill_speed(model, length))
        print(json.dumps(results["prefill"][-1]), flush=True)
    results["peak_rss_GiB"] = peak_rss_gib()
    if device.type == "cuda":
        results["peak_device_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
