"""Loading a model, and the options every model-running command shares (generate, chat, serve, eval).

A module of its own so that chat, the server and the evals load models the way the CLI does without
importing the CLI (which imports them: `cli` is the top floor, this is a utility below it).
Heavy imports (torch) happen inside the functions: the argparse helpers must stay cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import GptOssError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .generate import SamplingParams

DTYPES = ("bfloat16", "float32")
# Keys and values kept between requests (Engine's prefix cache). gpt-oss-20b holds 96 KiB per token in the
# fp32 CPU cache: 2 GiB keep ~21k tokens of conversations (a few long chats, or many sharing a system prompt).
DEFAULT_PREFIX_CACHE_GIB = 2.0
# Memory left beside the weights when a checkpoint streams (streaming.py): the key/value caches, activations
# (a long prompt's chunk), the Python/torch runtime.
STREAMING_HEADROOM_GIB = 1.0
STREAMING_PREFIX_CACHE_GIB = 0.25  # the prefix cache's default bound then (a few thousand tokens of a chat)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path(path: str | Path | None) -> str:
    """`path`, or the embedded demo model's folder (hash-checked) when None."""
    if path is not None:
        return str(path)
    from .demo import checkpoint_path

    return str(checkpoint_path())


def plan_memory(path: str | Path, dtype: "torch.dtype", memory_budget_gib: float | None = None,
                available: int | None = None, reserve: int = 0) -> tuple[int | None, str | None]:
    """(bytes of the expert pool, or None to map the whole checkpoint; a message for the user, or None).

    memory_budget_gib: the memory the weights may take (resident weights + expert pool; a budget as large as
    the checkpoint maps it whole, as a machine with room for it does). None: the checkpoint
    is mapped whole if it fits in the available memory (cgroup limits included) with STREAMING_HEADROOM_GIB
    to spare, else the experts stream with a budget of the available memory less that headroom and `reserve`
    (bytes the caller will take besides: the prefix cache)."""
    import torch

    from .checkpoint import CheckpointReader, resident_bytes
    from .streaming import available_memory, expert_nbytes, measure_read_bandwidth

    reader = CheckpointReader(path)  # headers only, read once for the sizes and the config
    resident, experts, total = resident_bytes(reader, dtype)
    available = available_memory() if available is None else available
    headroom = int(STREAMING_HEADROOM_GIB * 2**30)
    if memory_budget_gib is None:
        if total + headroom <= available:
            return None, None
        budget = available - headroom - reserve
    else:
        if not memory_budget_gib > 0:
            raise GptOssError(f"--memory-budget must be > 0 GiB, got {memory_budget_gib}")
        budget = int(min(memory_budget_gib, 2**40) * 2**30)
        if budget >= total:  # everything fits: map the checkpoint whole
            return None, None
    config = reader.config
    one = expert_nbytes(config, torch.finfo(dtype).bits // 8)
    k, layers, E = config.experts_per_token, config.num_hidden_layers, config.num_experts
    pool = budget - resident
    if pool < k * one:
        need = f"the weights kept in memory take {_size(resident)} and the experts at least {_size(k * one)} more"
        if reserve:
            need += f" (and {_size(reserve)} is kept for the prefix cache: --prefix-cache-gib)"
        if memory_budget_gib is None:
            raise GptOssError(f"{path}: not enough memory to run this model: {_size(available)} is "
                              f"available, {need}, beside {STREAMING_HEADROOM_GIB:g} GiB for the rest")
        raise GptOssError(f"{path}: --memory-budget {memory_budget_gib:g} GiB is too little: {need}")
    slots = min(pool // one, E * layers)
    share = slots / (E * layers)
    per_token = layers * k * one * (1 - share)  # uniform routing: real models reuse experts more than this
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*/*.safetensors"))
    bandwidth = measure_read_bandwidth(files[-1]) if files else 0.0
    speed = bandwidth / per_token if per_token else float("inf")
    why = (f"{total / 2**30:.1f} GiB does not fit in the {available / 2**30:.1f} GiB of memory available"
           if memory_budget_gib is None else f"--memory-budget {memory_budget_gib:g} GiB")
    message = (f"streaming experts from disk ({why}): {_size(resident)} of weights stay in memory, "
               f"{slots} of {E * layers} experts ({share:.0%}) are kept in a {_size(slots * one)} pool; "
               f"about {per_token / 1e6:.0f} MB read per token at the {bandwidth / 1e9:.2f} GB/s measured: "
               f"≈ {speed:.1f} tokens/s at most")
    return slots * one, message


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def load_model(path: str | Path | None = None, *, device: "str | torch.device | None" = None,
               dtype: "str | torch.dtype" = "bfloat16", int8_unembedding: bool = False, progress: bool = True,
               layout=None, memory_budget_gib: float | None = None, memory_reserve: int = 0,
               bounded_argmax: bool | None = None) -> "nn.Module":
    """A model ready for inference: the checkpoint folder `path` (either layout; None: the embedded demo model,
    hash-checked) on `device` (None: cuda if available, else cpu), non-expert weights in `dtype` (experts stay
    MXFP4). int8_unembedding: quantize the unembedding rows (Transformer.quantize_unembedding). layout: a
    parallel.Layout under torchrun (this rank's shard; rank 0 gets a parallel.Leader). memory_budget_gib: see
    plan_memory (memory_reserve: its `reserve`); a model that does not fit streams its experts from disk
    (streaming.py), said once on stderr. bounded_argmax: decode steps on the CPU (greedy, plain temperature
    sampling) read the unembedding mostly as int8, with the same tokens (model.BoundedArgmax, built here), where
    its int8 copy (vocab × hidden bytes) fits in memory beside the checkpoint without streaming; None: only where the unembedding is large enough for it to pay (≥ BOUNDED_ARGMAX_MIN_BYTES)."""
    import torch

    path = model_path(path)
    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GptOssError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if layout is not None:
        from .parallel import load_for_rank

        if int8_unembedding:
            raise GptOssError("--int8-unembedding does not combine with --tp/--ep (the unembedding is sharded)")
        if memory_budget_gib is not None:
            raise GptOssError("--memory-budget does not combine with --tp/--ep yet (each rank maps its shard)")
        return load_for_rank(path, layout, device=device, dtype=dtype)
    from .checkpoint import load
    from .model import Transformer

    pool_bytes, message = plan_memory(path, dtype, memory_budget_gib, reserve=memory_reserve)
    if message:
        print(f"gptoss: {message}", file=sys.stderr, flush=True)
    model = load(path, device=device, dtype=dtype, progress=progress, expert_pool_bytes=pool_bytes)
    if int8_unembedding:
        from .vocab import unwrap

        unwrap(model).quantize_unembedding()
    elif (bounded_argmax is not False and pool_bytes is None and isinstance(model, Transformer)  # not a subset
          and torch.device(device).type == "cpu" and dtype == torch.bfloat16
          and (bounded_argmax or 2 * model.config.vocab_size * model.config.hidden_size >= BOUNDED_ARGMAX_MIN_BYTES)
          and _room_for_int8_unembedding(path, dtype, memory_budget_gib, model.config)):
        # built now (1-3 s on gpt-oss), not at the first decode step: that step is a user's first request
        model.bounded_argmax_wanted = model.enable_bounded_argmax()
    return model


# Below this many bytes of bf16 unembedding the bounds cost more than the bytes they save (a 4,096 × 64 model:
# 0.8 against 0.6 ms a step); gpt-oss's is 1.16 GB (benchmarks/RESULTS.md: 1.13× per decode step on the 20b).
BOUNDED_ARGMAX_MIN_BYTES = 64 * 2**20


def _room_for_int8_unembedding(path: Path, dtype, memory_budget_gib: float | None, config) -> bool:
    """Whether the checkpoint still maps whole with an int8 copy of the unembedding beside it (BoundedArgmax)."""
    from .streaming import available_memory

    extra = config.vocab_size * (config.hidden_size + 12)  # int8 rows + three fp32 per row
    if memory_budget_gib is not None:
        left = memory_budget_gib - extra / 2**30
        return left > 0 and plan_memory(path, dtype, left)[0] is None
    return plan_memory(path, dtype, available=available_memory() - extra)[0] is None


def load_model_from_args(args: argparse.Namespace) -> "nn.Module":
    """load_model with the options of add_model_args. Sets args.model to the folder loaded (the demo model's
    path when none was given), which callers name the model by."""
    args.model = model_path(args.model)
    # A streamed model's prefix cache must fit beside it: its bound is reserved, and unless it was given it
    # shrinks to STREAMING_PREFIX_CACHE_GIB (prefix_cache_bytes reads args.streaming_experts).
    reserve = 0
    if hasattr(args, "prefix_cache_gib"):
        given = args.prefix_cache_gib is not None
        reserve = prefix_cache_bytes(args) if given else int(STREAMING_PREFIX_CACHE_GIB * 2**30)
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       int8_unembedding=getattr(args, "int8_unembedding", False),
                       bounded_argmax=getattr(args, "bounded_argmax", None),
                       progress=not getattr(args, "quiet", False), layout=getattr(args, "layout", None),
                       memory_budget_gib=getattr(args, "memory_budget", None), memory_reserve=reserve)
    from .vocab import unwrap

    args.streaming_experts = getattr(unwrap(model), "expert_pool", None) is not None
    return model


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, metavar="PATH",
                   help="checkpoint folder (Hugging Face layout, or the OpenAI original/ folder); default: the "
                        "embedded demo model (tiny, arithmetic and tool calls)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="activation and non-expert weight dtype (experts stay MXFP4)")
    p.add_argument("--int8-unembedding", action="store_true",
                   help="quantize the unembedding to int8 rows after loading: half its bytes per decoded token "
                        "(gpt-oss-20b: 3.7 -> 3.1 GB), at a small logit error (benchmarks/RESULTS.md); off by default")
    p.add_argument("--no-bounded-argmax", dest="bounded_argmax", action="store_false", default=None,
                   help="greedy decoding computes every logit (by default, on the CPU, it reads the unembedding "
                        "as int8 and recomputes only the rows that can win: the same tokens, fewer bytes)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="memory the weights may take; a checkpoint larger than that streams its experts from disk "
                        "through a pool of the most recently used ones (default: the memory available, less "
                        f"{STREAMING_HEADROOM_GIB:g} GiB; a checkpoint that fits is mapped whole)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-gib", type=float, default=None, metavar="GIB",
                   help="memory for keys and values kept between requests, so that a conversation's next turn "
                        f"(or a shared system prompt) is not prefilled again; 0 turns it off (default "
                        f"{DEFAULT_PREFIX_CACHE_GIB:g}; {STREAMING_PREFIX_CACHE_GIB:g} when experts stream from disk)")


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    """The bytes of add_prefix_cache_arg's option (its default where the namespace lacks it)."""
    gib = getattr(args, "prefix_cache_gib", None)
    if gib is None:
        gib = STREAMING_PREFIX_CACHE_GIB if getattr(args, "streaming_experts", False) else DEFAULT_PREFIX_CACHE_GIB
    if not gib >= 0:
        raise GptOssError(f"--prefix-cache-gib must be >= 0, got {gib}")
    return int(gib * 2**30)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default 1.0 as OpenAI advises; 0 for the embedded demo model)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_params(args: argparse.Namespace, stop_tokens: Sequence[int] = ()) -> "SamplingParams":
    """SamplingParams from the options of add_sampling_args; a bad value is a GptOssError naming it."""
    from .generate import SamplingParams

    temperature = args.temperature
    if temperature is None:  # the tiny demo model shows its skills greedily; real checkpoints sample at 1.0
        temperature = 0.0 if getattr(args, "model", None) is None else 1.0
    params = SamplingParams(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop_tokens=tuple(stop_tokens))
    try:
        params.validate()
    except ValueError as e:
        raise GptOssError(f"bad sampling option: {e}") from None
    return params
