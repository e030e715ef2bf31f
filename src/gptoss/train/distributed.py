"""Data parallelism under torchrun: DDP (weights replicated) or FSDP2 (`fully_shard`: weights, gradients and
AdamW moments sharded across ranks); gloo on CPU, nccl on CUDA.

    torchrun --nproc-per-node 2 -m gptoss train CONFIG.toml      # [train] parallel = "ddp" or "fsdp"

The run is the same as one process's: every rank builds the same global batch (batch_size × grad_accum
sequences per step) and takes its contiguous slice of each micro-batch; the loss of a rank is its summed token
cross-entropy over the target count of the whole global step, times the world size, so the gradient average
that DDP/FSDP perform gives exactly the one-process gradient. Rank and world size are read once from the
environment in train() (`from_env`) and passed explicitly; only rank 0 writes metrics, progress and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .data import Batch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env(environ: Mapping[str, str] = os.environ) -> DistInfo:
    """Rank and world size as torchrun sets them (RANK, WORLD_SIZE); one process without them."""
    return DistInfo(int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (MASTER_ADDR/PORT come from torchrun's environment via init_method env://)."""
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears its gloo connections down while another still uses them (rank 0 saving)
        dist.destroy_process_group()


def local_device(info: DistInfo, device: torch.device) -> torch.device:
    """One GPU per rank (LOCAL_RANK = rank on a single node); CPUs are shared."""
    if device.type == "cuda" and info.enabled and device.index is None:
        return torch.device("cuda", info.rank % torch.cuda.device_count())
    return device


def rank_slice(batch: Batch, info: DistInfo, source: str = "config") -> Batch:
    """This rank's contiguous share of a global micro-batch."""
    B, W = len(batch), info.world_size
    if B % W:
        raise ConfigError(f"{source}: [data] field 'batch_size' = {B} must be a multiple of the world size {W}")
    n = B // W
    sl = slice(info.rank * n, (info.rank + 1) * n)
    return Batch(*(getattr(batch, f)[sl] for f in ("tokens", "targets", "mask", "positions", "segments")))


def wrap(module: nn.Module, blocks: nn.ModuleList, mode: str, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around `module`, or FSDP2: each transformer block its own shard group, the rest (embedding,
    final norm, unembedding) in the root group. The identity with one process."""
    if not info.enabled:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def row_gather(info: DistInfo):
    """For MoE.capacity_gather: t [n, ...] of every rank → ([world·n, ...] in rank order, this rank's first row).
    Rank slices are contiguous (rank_slice), so the concatenation is the global micro-batch's rows in order."""

    def gather(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        parts = [torch.empty_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts), info.rank * t.shape[0]

    return gather


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors (a saved state) → shards placed as the DTensors of `like` (a FSDP2 model's state dict);
    plain tensors pass through. A collective where `like` holds DTensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, t in full.items():
        ref = like.get(name)
        out[name] = distribute_tensor(t.to(ref.dtype), ref.device_mesh, ref.placements) \
            if isinstance(ref, DTensor) else t
    return out


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After loading full AdamW moments: shard each like its parameter (FSDP2); nothing to do otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
