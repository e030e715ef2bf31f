"""Tensor- and expert-parallel inference on torch.distributed: the same Transformer, its modules sharded.

    torchrun --nproc-per-node 2 -m gptoss generate --model M --tp 2 --ep 2 "prompt"

A `Layout` says how the world's ranks split the model (rank and world size are passed in, never read here):
- tp: attention and vocabulary split `tp` ways (1 or the world size). Each rank keeps its KV heads and their
  query heads and sinks (the fused qkv rows of those heads: column-parallel), the matching columns of the out
  projection (row-parallel: partial sums, one all-reduce, the bias added on one rank only), and a contiguous
  range of embedding/unembedding rows (the lookup masks ids it does not own and all-reduces; the logits are
  all-gathered).
- ep: experts partitioned into `ep` groups of consecutive experts (an expert count that does not divide is
  split unevenly, 5 → 3 + 2); the world_size/ep ranks of a group split each expert's width on MXFP4 block
  boundaries (mlp1 rows 2i, 2i+1 stay together, mlp2 is cut along its input in 32-value blocks).
The router, the norms and the residual stream are replicated: after the attention's all-reduce every rank
holds every token, so dispatching a token to the rank owning its expert costs nothing, and combining the
expert outputs is one all-reduce of [tokens, hidden] over the world (each (token, expert) pair is computed on
its owner ranks only, other ranks add zeros). With replicated activations this moves less data than an
all-to-all dispatch + combine + all-gather would (vLLM does the same for EP inside a TP group).

Each rank reads only its slices of the safetensors files (`CheckpointReader.get_slice`). Rank 0 talks to the
user: it runs generate/chat/serve with a `Leader`, which broadcasts every forward (tokens, positions, which KV
cache) before running its own shard; the other ranks `follow`, running the same forwards on their shards with
mirrored caches (the engine's batched cache broadcasts its row operations too). Sampling happens on rank 0
only; its decisions reach the others as the next forward's tokens. Not implemented: 1 < tp < world size
(replicated TP groups), data-parallel attention with an all-to-all expert dispatch, pipeline parallelism.
"""

from __future__ import annotations

import gc
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import kernels, mxfp4
from .cache import KVCache, SlotCache
from .checkpoint import CheckpointReader, expected_tensors
from .config import ModelConfig
from .errors import ConfigError, GenerationError, GptOssError
from .model import Linear, MoE, MXFP4Weight, Transformer, fused_experts_fit, swiglu


class ShardingError(ConfigError):
    """A model cannot be split as asked (too few heads, experts or MXFP4 blocks for the ranks)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1  # attention heads and vocabulary split this many ways: 1 (replicated) or world_size
    ep: int = 1  # expert groups; each group's experts are width-split world_size // ep ways
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        W = self.world_size
        if self.tp not in (1, W):
            raise ShardingError(f"--tp {self.tp}: must be 1 or the number of processes ({W}); replicated "
                                "TP groups (data-parallel serving) are not implemented")
        if self.ep < 1 or W % self.ep:
            raise ShardingError(f"--ep {self.ep}: must divide the number of processes ({W})")
        if not 0 <= self.rank < W:
            raise ShardingError(f"rank {self.rank} outside world size {W}")

    @property
    def width_shards(self) -> int:
        """Ranks that split one expert's width."""
        return self.world_size // self.ep


def split(n: int, parts: int, i: int) -> range:
    """Part i of 0..n-1 cut into `parts` contiguous ranges, the first n % parts one longer (5 / 2 → 3 + 2)."""
    size, extra = divmod(n, parts)
    start = i * size + min(i, extra)
    return range(start, start + size + (i < extra))


def layout_from(tp: int | None, ep: int | None, environ: Mapping[str, str] = os.environ) -> Layout | None:
    """The layout of a CLI run: torchrun's RANK / WORLD_SIZE, --tp (default: all ranks) and --ep (default 1).
    None for one process without the options."""
    rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if (tp or 1) > 1 or (ep or 1) > 1:
            raise ShardingError(f"--tp {tp or 1} --ep {ep or 1} needs one process per rank: "
                                f"torchrun --nproc-per-node {max(tp or 1, ep or 1)} -m gptoss ...")
        return None
    return Layout(tp=world if tp is None else tp, ep=ep or 1, rank=rank, world_size=world)


# ---------------------------------------------------------------- which slice of every tensor a rank holds
@dataclass(frozen=True)
class Plan:
    """Which part of the model one rank holds: ranges of heads, vocabulary rows, experts and expert width,
    and from them the region of every checkpoint tensor (`pieces`)."""
    config: ModelConfig  # the whole model's
    layout: Layout
    kv_heads: range
    heads: range  # query heads: the G query heads of each local kv head, sinks with them
    vocab: range  # embedding / unembedding rows
    experts: range
    width: range  # expert width columns (a multiple of 32 long: whole MXFP4 blocks)

    @classmethod
    def make(cls, config: ModelConfig, layout: Layout) -> "Plan":
        c, L = config, layout
        if c.mlp_type != "moe":
            raise ShardingError(f"parallel inference shards GPT-oss MoE models; this config has mlp_type "
                                f"{c.mlp_type!r}")
        tp_rank = L.rank if L.tp > 1 else 0
        if c.num_key_value_heads < L.tp:
            raise ShardingError(f"--tp {L.tp}: the model has {c.num_key_value_heads} KV heads; each rank needs "
                                "at least one (query heads and sinks follow their KV head)")
        kv = split(c.num_key_value_heads, L.tp, tp_rank)
        heads = range(kv.start * c.q_per_kv, kv.stop * c.q_per_kv)
        if c.num_experts < L.ep:
            raise ShardingError(f"--ep {L.ep}: the model has only {c.num_experts} experts")
        group, width_rank = divmod(L.rank, L.width_shards)
        blocks = c.intermediate_size // mxfp4.BLOCK
        if blocks < L.width_shards:
            raise ShardingError(f"expert width {c.intermediate_size} is {blocks} MXFP4 block(s) of {mxfp4.BLOCK} "
                                f"values: it cannot be split {L.width_shards} ways on block boundaries (use a "
                                f"larger --ep, so that fewer ranks share an expert)")
        b = split(blocks, L.width_shards, width_rank)
        return cls(c, L, kv, heads, split(c.vocab_size, L.tp, tp_rank), split(c.num_experts, L.ep, group),
                   range(b.start * mxfp4.BLOCK, b.stop * mxfp4.BLOCK))

    @property
    def local_config(self) -> ModelConfig:
        """The config of this rank's attention (and hence of its KV cache) and expert width."""
        return self.config.replace(num_attention_heads=len(self.heads), num_key_value_heads=len(self.kv_heads),
                                   intermediate_size=len(self.width))

    def pieces(self, name: str) -> list[tuple[slice, ...]]:
        """The regions of the original-named tensor this rank holds, concatenated along dim 0 ([()] = all)."""
        c, Dh, all_ = self.config, self.config.head_dim, slice(None)
        if name in ("embedding.weight", "unembedding.weight"):
            return [(_slice(self.vocab),)]
        kind = name.split(".", 2)[2] if name.startswith("block.") else name
        h, kv, e, w = self.heads, self.kv_heads, _slice(self.experts), self.width
        if kind in ("attn.qkv.weight", "attn.qkv.bias"):  # fused rows: all q heads, then k heads, then v heads
            H, K = c.num_attention_heads, c.num_key_value_heads
            return [(slice(h.start * Dh, h.stop * Dh),), (slice((H + kv.start) * Dh, (H + kv.stop) * Dh),),
                    (slice((H + K + kv.start) * Dh, (H + K + kv.stop) * Dh),)]
        if kind == "attn.sinks":
            return [(_slice(h),)]
        if kind == "attn.out.weight":  # [D, H·Dh]: the input columns of the local heads
            return [(all_, slice(h.start * Dh, h.stop * Dh))]
        if kind in ("mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias"):
            return [(e, slice(2 * w.start, 2 * w.stop))]  # interleaved gate/linear rows 2i, 2i+1 stay together
        if kind in ("mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales"):
            return [(e, all_, slice(w.start // mxfp4.BLOCK, w.stop // mxfp4.BLOCK))]  # input dim, in blocks
        if kind == "mlp.mlp2_bias":
            return [(e,)]
        return [()]  # replicated: norms, router, out bias

    def zeroed(self, name: str) -> bool:
        """Biases of partial sums are added on one rank of the reduction only (the others hold zeros)."""
        if name.endswith("attn.out.bias"):
            return self.layout.tp > 1 and self.layout.rank > 0
        return name.endswith("mlp.mlp2_bias") and self.layout.rank % self.layout.width_shards > 0

    def local(self, name: str, read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> torch.Tensor:
        parts = [read(name, index) for index in self.pieces(name)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        return torch.zeros_like(t) if self.zeroed(name) else t

    def nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes this rank holds for the model (MXFP4 uint8, norms and sinks fp32, the rest `dtype`), from
        shapes alone: the same slicing as loading, so it holds for presets too large to load here."""
        spec = expected_tensors(self.config)
        total = 0
        for name, (shape, kind) in spec.items():
            local = self.local(name, lambda n, index: torch.empty(spec[n][0], device="meta")[index])
            size = 1 if kind == "uint8" else 4 if name.endswith(("norm.scale", "sinks")) else dtype.itemsize
            total += local.numel() * size
        return total


def _slice(r: range) -> slice:
    return slice(r.start, r.stop)


# ---------------------------------------------------------------- sharded modules (same parameter names)
def _all_reduce_fp32(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in fp32: bf16 partial sums would be rounded twice (and gloo's bf16 support is patchy)."""
    y = x.float()
    dist.all_reduce(y)
    return y.to(x.dtype)


class VocabParallelEmbedding(nn.Embedding):
    """Rows `rows` of the embedding; an id owned elsewhere looks up zeros, and the all-reduce fills it in."""

    def __init__(self, rows: range, dim: int, dtype: torch.dtype, device=None):
        super().__init__(len(rows), dim, device=device, dtype=dtype)
        self.first = rows.start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight).masked_fill(~mine[..., None], 0)
        return _all_reduce_fp32(x)  # exact: one rank holds each row, the others add zeros


class VocabParallelUnembedding(Linear):
    """Rows `rows` of the unembedding: local logits [.., V_r], all-gathered into [.., V] (sampling and greedy
    both need the whole distribution on the rank that samples)."""

    def __init__(self, rows: range, sizes: list[int], dim: int, dtype: torch.dtype, device=None):
        super().__init__(dim, len(rows), bias=False, device=device, dtype=dtype)
        self.sizes = sizes  # rows of every rank, in rank order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x).float()
        width = max(self.sizes)
        if local.shape[-1] < width:  # all_gather wants equal shapes: pad, gather, trim
            local = F.pad(local, (0, width - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in self.sizes]
        dist.all_gather(parts, local.contiguous())
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)


class RowParallelLinear(Linear):
    """The out projection over the local heads' columns: partial sums all-reduced (bias zero but on rank 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce_fp32(super().forward(x))


class ParallelMoE(MoE):
    """The MoE with the experts `experts` (global ids) and expert width `width` of this rank. The router is
    replicated; each rank computes the (token, expert) pairs it owns and the outputs are summed over ranks."""

    def __init__(self, config: ModelConfig, experts: range, width: range, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        local = config.replace(intermediate_size=len(width))
        super().__init__(local, device=device, dtype=dtype)
        E, D, I = len(experts), config.hidden_size, len(width)
        self.first_expert = experts.start
        self.mlp1_weight = MXFP4Weight(E, 2 * I, D, device=device)
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I, device=device, dtype=dtype))
        self.mlp2_weight = MXFP4Weight(E, D, I, device=device)
        self.mlp2_bias = nn.Parameter(torch.zeros(E, D, device=device, dtype=dtype))

    def _experts(self, t: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(t)  # (N, k) global ids, identical on every rank
        local = experts - self.first_expert
        local = torch.where((local >= 0) & (local < self.mlp1_bias.shape[0]), local, -1)  # −1: owned elsewhere
        if t.device.type == "cpu" and t.dtype != torch.float64 and fused_experts_fit(experts.numel(),
                                                                                     self.config.num_experts, t.dtype):
            out = self._owned_pairs(t, local, weights)
        else:
            out = self._grouped(t, local, weights)  # skips −1 as it skips capacity drops
        dist.all_reduce(out)  # fp32 (N, D)
        return out

    def _owned_pairs(self, t: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode: the fused MXFP4 kernel on the owned (token, expert) pairs only."""
        c = self.config
        out = torch.zeros(t.shape[0], c.hidden_size, dtype=torch.float32, device=t.device)
        token, slot = (local >= 0).nonzero(as_tuple=True)
        if token.numel():
            rows = local[token, slot]
            h = kernels.mxfp4_linear(t[token], self.mlp1_weight.blocks, self.mlp1_weight.scales, self.mlp1_bias,
                                     rows)  # (n, 2I) fp32
            h = swiglu(h, c.swiglu_alpha, c.swiglu_limit).to(t.dtype)
            y = kernels.mxfp4_linear(h, self.mlp2_weight.blocks, self.mlp2_weight.scales, self.mlp2_bias, rows)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


# ---------------------------------------------------------------- building a rank's model
def _build(plan: Plan, read: Callable[[str, tuple[slice, ...]], torch.Tensor], device=None,
           dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """A Transformer of this rank's shapes (built on meta, parallel modules swapped in), filled by `read`."""
    c, L = plan.config, plan.layout
    with torch.device("meta"):
        model = Transformer(plan.local_config, dtype=dtype)
        if L.tp > 1:
            sizes = [len(split(c.vocab_size, L.tp, r)) for r in range(L.tp)]
            model.embedding = VocabParallelEmbedding(plan.vocab, c.hidden_size, dtype)
            model.unembedding = VocabParallelUnembedding(plan.vocab, sizes, c.hidden_size, dtype)
            for block in model.block:
                block.attn.out = RowParallelLinear(len(plan.heads) * c.head_dim, c.hidden_size, bias=True,
                                                   dtype=dtype)
        if L.world_size > 1:
            for block in model.block:
                block.mlp = ParallelMoE(c, plan.experts, plan.width, dtype=dtype)
    state = model.state_dict()
    loaded = {}
    for name in expected_tensors(c):
        t = plan.local(name, read)
        if t.shape != state[name].shape:  # a bug in the plan, not in the checkpoint
            raise ShardingError(f"{name}: rank {L.rank} read {list(t.shape)}, expected {list(state[name].shape)}")
        loaded[name] = t.to(device=device, dtype=state[name].dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(path: str | Path, layout: Layout, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """This rank's shard of a checkpoint (either layout), reading only its slices of the files."""
    reader = CheckpointReader(path)
    return _build(Plan.make(reader.config, layout), reader.get_slice, device, dtype)


def shard(model: Transformer, layout: Layout, device: torch.device | str | None = None) -> Transformer:
    """This rank's shard of a model held in memory (every rank holding the same whole model)."""
    state = model.state_dict()
    return _build(Plan.make(model.config, layout), lambda name, index: state[name][index].clone(), device,
                  model.dtype)


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a rank holds (what `Plan.nbytes` predicts)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------- rank 0 leads, the other ranks follow
# Messages from rank 0: a fixed-size int64 header, then the tensors it announces.
_STOP, _FORWARD, _NEW_SLOTS, _SLOT_OP = range(4)
_INSERT, _MOVE, _CLEAR, _BEGIN_STEP = range(4)  # SlotCache methods (the engine's batched cache)
_HEADER = 9
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class Leader(nn.Module):
    """Rank 0's model: every forward is broadcast to the followers before this rank runs its shard, so
    generate, chat and the engine use it like a Transformer. KV caches are mirrored: a KVCache's first forward
    tells the followers to allocate its twin, one garbage-collected here is freed there too; the engine's
    SlotCache is a `MirroredSlotCache`, whose mutations (insert, move, clear, begin_step) are broadcast."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self._keys: dict[int, int] = {}  # id(cache) → key, while the cache lives
        self._freed: list[int] = []
        self._next = 0

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def send(self, *header: int) -> None:
        _send(self.device, *header)

    def key(self, cache, new: bool = False) -> int:
        """The followers' name for a cache; new=True registers it (freed there when collected here)."""
        if id(cache) not in self._keys:
            if not new:
                raise GenerationError(f"{type(cache).__name__}: a cache the other ranks have not seen (only "
                                      "KVCache and MirroredSlotCache are mirrored across ranks)")
            self._keys[id(cache)] = self._next
            weakref.finalize(cache, self._release, id(cache), self._next)
            self._next += 1
        return self._keys[id(cache)]

    def _release(self, cache_id: int, key: int) -> None:  # runs at garbage collection: only queue it
        self._keys.pop(cache_id, None)
        self._freed.append(key)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False) -> torch.Tensor:
        key, batch, spec = -1, 0, 0
        if type(cache) is KVCache:  # allocated by generate / the engine's prefill: the followers make a twin
            first = cache.layers[0]
            key, batch, spec = self.key(cache, new=True), first.k.shape[0], _spec(first.max_len, first.k.dtype)
        elif cache is not None:
            key = self.key(cache)
        freed, self._freed = self._freed, []
        B, T = tokens.shape
        self.send(_FORWARD, B, T, int(last_only), positions is not None, key, batch, spec, len(freed))
        if freed:
            dist.broadcast(torch.tensor(freed, dtype=torch.long, device=self.device), src=0)
        dist.broadcast(tokens.contiguous(), src=0)
        if positions is not None:
            dist.broadcast(positions.contiguous(), src=0)
        return self.model(tokens, positions, cache, last_only=last_only)

    def close(self) -> None:
        """Release the followers (they return from `follow`)."""
        self.send(_STOP)


def _send(device: torch.device, *header: int) -> None:
    dist.broadcast(torch.tensor([*header] + [0] * (_HEADER - len(header)), dtype=torch.long, device=device), src=0)


def _spec(max_len: int, dtype: torch.dtype) -> int:
    return max_len * len(_DTYPES) + _DTYPES.index(dtype)


class MirroredSlotCache(SlotCache):
    """The engine's batched cache on rank 0: each mutation is broadcast first, so the followers' twin (of their
    own heads) stays in step. Install it on an Engine before the engine starts."""

    seedable = False  # the followers' twins are not seeded from rank 0's prefix cache

    def __init__(self, leader: Leader, slots: int, max_len: int, dtype: torch.dtype):
        super().__init__(leader.config, slots, max_len, leader.device, dtype)
        self.leader = leader
        self.key = leader.key(self, new=True)
        leader.send(_NEW_SLOTS, self.key, slots, _spec(max_len, dtype))

    def insert(self, row: int, source: KVCache, source_row: int) -> None:
        self.leader.send(_SLOT_OP, self.key, _INSERT, row, self.leader.key(source), source_row)
        super().insert(row, source, source_row)

    def move(self, src: int, dst: int) -> None:
        self.leader.send(_SLOT_OP, self.key, _MOVE, src, dst)
        super().move(src, dst)

    def clear(self) -> None:
        self.leader.send(_SLOT_OP, self.key, _CLEAR)
        super().clear()

    def begin_step(self, max_position: int) -> None:
        self.leader.send(_SLOT_OP, self.key, _BEGIN_STEP, max_position)
        super().begin_step(max_position)


@torch.no_grad()
def follow(model: Transformer) -> None:
    """Ranks > 0: run rank 0's forwards and cache operations on this shard until it stops (the logits are not
    used here: rank 0 samples, and its choices arrive as the next forward's tokens)."""
    device = model.device
    caches: dict[int, KVCache | SlotCache] = {}
    while True:
        header = torch.empty(_HEADER, dtype=torch.long, device=device)
        dist.broadcast(header, src=0)
        op, *f = header.tolist()
        if op == _STOP:
            return
        if op == _NEW_SLOTS:
            key, slots, spec = f[:3]
            max_len, dtype = divmod(spec, len(_DTYPES))
            caches[key] = SlotCache(model.config, slots, max_len, device, _DTYPES[dtype])
            continue
        if op == _SLOT_OP:
            key, method, a, b, c = f[:5]
            slot_cache = caches[key]
            if method == _INSERT:
                slot_cache.insert(a, caches[b], c)
            elif method == _MOVE:
                slot_cache.move(a, b)
            elif method == _CLEAR:
                slot_cache.clear()
            else:
                slot_cache.begin_step(a)
            continue
        B, T, last_only, has_positions, key, batch, spec, n_freed = f
        if n_freed:
            freed = torch.empty(n_freed, dtype=torch.long, device=device)
            dist.broadcast(freed, src=0)
            for k in freed.tolist():
                caches.pop(k, None)
        tokens = torch.empty(B, T, dtype=torch.long, device=device)
        dist.broadcast(tokens, src=0)
        positions = None
        if has_positions:
            positions = torch.empty(B, T, dtype=torch.long, device=device)
            dist.broadcast(positions, src=0)
        if key >= 0 and key not in caches:  # a new KVCache
            max_len, dtype = divmod(spec, len(_DTYPES))
            caches[key] = KVCache(model.config, batch, max_len=max_len, device=device, dtype=_DTYPES[dtype])
        try:
            model(tokens, positions, caches[key] if key >= 0 else None, last_only=bool(last_only))
        except GptOssError:  # e.g. a full cache: rank 0 meets the same error at the same point and reports it
            pass


def mirror_engine_cache(engine) -> None:
    """`gptoss serve` on rank 0 (server.serve_command's before_start): the engine's batched cache becomes a
    MirroredSlotCache, so the followers' twins of it stay in step."""
    from .vocab import unwrap

    engine.cache = MirroredSlotCache(unwrap(engine.model), engine.max_concurrency, engine.max_context,
                                     engine.cache_dtype)


# ---------------------------------------------------------------- the command line under torchrun
def init(layout: Layout, device: torch.device) -> None:
    """Join the process group (torchrun's MASTER_ADDR/PORT, env://): NCCL on CUDA, gloo on CPU."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=layout.rank,
                                world_size=layout.world_size)


def shutdown() -> None:
    if dist.is_initialized():
        gc.collect()  # gloo work objects freed at interpreter exit can abort the process (seen in CI)
        dist.destroy_process_group()


def local_device(layout: Layout, device: str | None) -> torch.device:
    """One GPU per rank (LOCAL_RANK = rank on one node); CPUs are shared."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", layout.rank % torch.cuda.device_count())
    return d


def release_followers(device: torch.device) -> None:
    """Rank 0 is done: the followers return from `follow`."""
    _send(device, _STOP)


def load_for_rank(path: str | Path, layout: Layout, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """What `gptoss.loading.load_model` returns under torchrun: rank 0 a Leader (inside a VocabSubsetModel when
    the checkpoint has a vocabulary subset), the other ranks their plain shard."""
    reader = CheckpointReader(path)
    model = _build(Plan.make(reader.config, layout), reader.get_slice, device, dtype)
    if layout.rank > 0:
        return model
    leader = Leader(model)
    if reader.vocab_ids is not None:
        from .vocab import VocabSubsetModel

        return VocabSubsetModel(leader, reader.vocab_ids)
    return leader
