"""Generation: prefill in one pass (chunked for long prompts), then one token per step with the KV cache.

Several prompts of different lengths decode together: they are left-padded, pad slots get position −1
(masked everywhere), and each row counts its own positions from 0, so a row's logits do not depend on
what it is batched with. Each row samples from its own seeded generator, so batched sampling reproduces
one-at-a-time sampling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .cache import KVCache, default_cache_dtype
from .errors import GenerationError
from .model import Transformer

if TYPE_CHECKING:
    from .constrain import Constraint


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop_tokens: Sequence[int] = field(default_factory=tuple)
    constraint: Constraint | None = None  # the completion must follow it (constrain.py): JSON schemas, Harmony

    # The smallest temperature and top_p that fp32 sampling honours. Dividing logits by a temperature of
    # 1e-45 overflows them to inf (softmax then gives NaN); a top_p below fp32's smallest normal number
    # rounds to 0 and drops every token. Both bounds leave a wide margin: temperature 1e-6 already samples
    # the top token alone, top_p 1e-6 keeps only the top token (use temperature 0 for greedy).
    MIN_TEMPERATURE = 1e-6
    MIN_TOP_P = 1e-6
    MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer

    def validate(self) -> None:
        """Raise GenerationError, naming the parameter and its valid range, for what sampling cannot honour."""
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and (t == 0 or t >= self.MIN_TEMPERATURE)):
            raise GenerationError(f"temperature must be >= 0: 0 (greedy) or a finite number >= "
                                  f"{self.MIN_TEMPERATURE:g} (smaller ones overflow fp32 logits), got {t}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if not (isinstance(self.top_p, (int, float)) and self.MIN_TOP_P <= self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1] and >= {self.MIN_TOP_P:g} (fp32 sampling rounds smaller "
                                  f"ones to 0), got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= self.MAX_SEED):
            raise GenerationError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed}")
        if self.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {self.max_tokens}")


def gumbel_noise(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n standard Gumbel variates −log(−log U), U uniform on (0, 1) from `generator` (fp32).

    The Gumbel-max trick (Gumbel 1954; Maddison, Tarlow & Minka, "A* Sampling", NeurIPS 2014, §2):
    argmax_i(x_i + G_i) is distributed as softmax(x). `sample` draws this way, so a token can be chosen from
    bounds on the logits (model.BoundedArgmax) with the same noise, and so the same token, as from all of them."""
    u = torch.rand(n, generator=generator, device=device).clamp_min_(torch.finfo(torch.float32).tiny)
    return u.log_().neg_().log_().neg_()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> int:
    """One token id from logits [V] (fp32): greedy at temperature 0, else top-k, then top-p (nucleus), then
    a draw from the softmax of what is left (by the Gumbel-max trick: gumbel_noise from `generator`, or the
    `noise` [V] given, already drawn from it)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    if noise is None:
        noise = gumbel_noise(logits.shape[-1], generator, logits.device)
    return int((logits + noise).argmax())


def bounded_ok(params: SamplingParams) -> bool:
    """Whether a row with these parameters can take its token from bounds on the logits (model.BoundedArgmax):
    greedy, or plain temperature sampling (top-k and nucleus need the logits themselves), unconstrained."""
    return params.constraint is None and (params.temperature == 0 or (params.top_k is None and params.top_p >= 1))


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] left-padded with 0, and positions [B, T] (−1 on padding, 0.. on the prompt)."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, T - len(p):] = torch.tensor(list(p), device=device)
            positions[i, T - len(p):] = torch.arange(len(p), device=device)
    return tokens, positions


# Prompt tokens per row in one forward. Each chunk dequantizes every expert it routes to once, so bigger
# chunks amortize that; attention is tiled either way. 20b, 2048-token prompt: chunks of 512 / 1024 / 2048
# took 29.6 / 21.2 / 18.6 s with peak RSS 12.49 / 12.60 / 12.88 GiB.
PREFILL_CHUNK = 2048


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
            chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model in chunks; return the last position's logits [B, V]."""
    logits = None
    for start in range(0, tokens.shape[1], chunk_size):
        end = start + chunk_size
        logits = model(tokens[:, start:end], positions[:, start:end], cache, last_only=True)[:, -1]
        _return_freed_memory()
    return logits


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """After each prefill chunk: hand glibc's freed buffers back to the OS. A chunk's temporaries otherwise
    stay in malloc's heaps (20b, 2048-token prompt in chunks of 512: peak RSS 14.10–14.15 -> 13.94–13.99 GiB;
    in one chunk of 2048, 0.5 GiB held through the decode that follows)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
             chunk_size: int = PREFILL_CHUNK) -> Iterator[tuple[int, int]]:
    """Stream (row, token id) pairs as they are sampled; a row stops at a stop token or max_tokens.

    The stop token itself is yielded, so callers can tell a tool call (<|call|>) from an answer (<|return|>).
    """
    params = params or SamplingParams()
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    device = model.device
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + params.max_tokens > limit:
        raise GenerationError(f"prompt of {longest} tokens + max_tokens {params.max_tokens} exceeds the context "
                         f"limit of {limit}")
    tokens, positions = left_pad(prompts, device)
    cache = KVCache(model.config, B, max_len=tokens.shape[1] + params.max_tokens, device=device,
                    dtype=default_cache_dtype(model.dtype, device))
    generators = None
    if params.seed is not None:
        generators = [torch.Generator(device=device).manual_seed(params.seed + i) for i in range(B)]
    guides = None
    if params.constraint is not None:
        from .constrain import Guide

        guides = [Guide(params.constraint, params.max_tokens) for _ in range(B)]
    logits = prefill(model, tokens, positions, cache, chunk_size)
    chosen = None  # where decode_step gives the tokens themselves, not logits
    next_pos = positions[:, -1] + 1
    active = [True] * B
    stop = set(params.stop_tokens)
    for _ in range(params.max_tokens):
        step = torch.zeros(B, dtype=torch.long, device=device)
        for i in range(B):
            if active[i]:
                if chosen is not None:
                    token = chosen[i]
                else:
                    row = logits[i] if guides is None else guides[i].mask(logits[i].float())
                    token = sample(row, params, generators[i] if generators else None)
                if guides is not None:
                    guides[i].advance(token)
                step[i] = token
                yield i, token
                if token in stop:
                    active[i] = False
        if not any(active):
            return
        # Finished rows keep stepping with a masked position so shapes stay fixed; their output is ignored.
        pos = torch.where(torch.tensor(active, device=device), next_pos, torch.full_like(next_pos, -1))
        logits, chosen = decode_step(model, step[:, None], pos[:, None], cache,
                                     [(params, generators[i] if generators else None) if active[i] else None
                                      for i in range(B)])
        next_pos = next_pos + 1


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache,
                rows: Sequence[tuple[SamplingParams, torch.Generator | None] | None] | None = None,
                ) -> tuple[torch.Tensor | None, list[int] | None]:
    """One decode step for tokens [B, 1]: (logits [B, V], None); or, where every row can take its token from
    bounds on the logits (bounded_ok) on a model with `bounded_argmax_wanted`, (None, the B tokens) exactly as
    `sample` would draw them from the logits (greedy, or Gumbel noise from the row's generator), through
    Transformer.sample_tokens (the unembedding read mostly as int8). rows: each row's (params, generator), None
    for a row whose token is not wanted (no noise is drawn for it)."""
    if rows is not None and getattr(model, "bounded_argmax_wanted", False) and \
            all(r is None or bounded_ok(r[0]) for r in rows):
        h = model.hidden_states(tokens, positions, cache)[:, -1]
        return None, model.sample_tokens(h, [None if r is None or r[0].temperature == 0 else r for r in rows])
    return model(tokens, positions, cache)[:, -1], None


def generate_tokens(model: Transformer, prompt: Sequence[int], params: SamplingParams | None = None) -> list[int]:
    """Convenience: the generated ids for one prompt."""
    return [t for _, t in generate(model, [prompt], params)]
