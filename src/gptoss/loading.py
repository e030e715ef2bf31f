"""Loading a model, and the options every model-running command shares (generate, chat, serve, eval).

A module of its own so that chat, the server and the evals load models the way the CLI does without
importing the CLI (which imports them: `cli` is the top floor, this is a utility below it).
Heavy imports (torch) happen inside the functions: the argparse helpers must stay cheap.
"""

from __future__ import annotations

import argparse
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


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path(path: str | Path | None) -> str:
    """`path`, or the embedded demo model's folder (hash-checked) when None."""
    if path is not None:
        return str(path)
    from .demo import checkpoint_path

    return str(checkpoint_path())


def load_model(path: str | Path | None = None, *, device: "str | torch.device | None" = None,
               dtype: "str | torch.dtype" = "bfloat16", int8_unembedding: bool = False, progress: bool = True,
               layout=None) -> "nn.Module":
    """A model ready for inference: the checkpoint folder `path` (either layout; None: the embedded demo model,
    hash-checked) on `device` (None: cuda if available, else cpu), non-expert weights in `dtype` (experts stay
    MXFP4). int8_unembedding: quantize the unembedding rows (Transformer.quantize_unembedding). layout: a
    parallel.Layout under torchrun (this rank's shard; rank 0 gets a parallel.Leader)."""
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
        return load_for_rank(path, layout, device=device, dtype=dtype)
    from .checkpoint import load

    model = load(path, device=device, dtype=dtype, progress=progress)
    if int8_unembedding:
        from .vocab import unwrap

        unwrap(model).quantize_unembedding()
    return model


def load_model_from_args(args: argparse.Namespace) -> "nn.Module":
    """load_model with the options of add_model_args. Sets args.model to the folder loaded (the demo model's
    path when none was given), which callers name the model by."""
    args.model = model_path(args.model)
    return load_model(args.model, device=args.device, dtype=args.dtype,
                      int8_unembedding=getattr(args, "int8_unembedding", False),
                      progress=not getattr(args, "quiet", False), layout=getattr(args, "layout", None))


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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-gib", type=float, default=DEFAULT_PREFIX_CACHE_GIB, metavar="GIB",
                   help="memory for keys and values kept between requests, so that a conversation's next turn "
                        f"(or a shared system prompt) is not prefilled again; 0 turns it off (default "
                        f"{DEFAULT_PREFIX_CACHE_GIB:g})")


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    """The bytes of add_prefix_cache_arg's option (its default where the namespace lacks it)."""
    gib = getattr(args, "prefix_cache_gib", DEFAULT_PREFIX_CACHE_GIB)
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
