"""KV cache: a ring buffer of `sliding_window` entries on sliding layers, a growing buffer on full layers.

Every entry carries its position, and the attention mask is built from positions, so the cache never has
to be in order: a ring slot is simply overwritten, and an empty slot (position −1) is masked out. Rows of
a batch may sit at different positions (left-padded prompts: pad tokens get position −1).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import GenerationError


class LayerCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, ring: bool,
                 max_len: int, device, dtype: torch.dtype):
        self.ring = ring  # sliding layer: fixed capacity, overwrite the oldest slot
        self.max_len = max_len
        self.length = 0  # tokens written so far (same for every row)
        self.k = torch.zeros(batch_size, capacity, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)

    def _grow(self, needed: int) -> None:
        capacity = self.k.shape[1]
        if needed <= capacity:
            return
        new = min(max(needed, 2 * capacity), self.max_len)
        pad = new - capacity
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], pad, *self.k.shape[2:])], dim=1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], pad, *self.v.shape[2:])], dim=1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], dim=1)

    def next_slot(self) -> int:
        """Reserve the slot of one new token per row (a kernel then writes k, v and pos there itself)."""
        if self.length + 1 > self.max_len:
            raise GenerationError(f"context limit exceeded: {self.length} cached + 1 new token > {self.max_len}")
        if self.ring:  # the overwritten entry is `capacity` positions old: outside the window already
            slot = self.length % self.k.shape[1]
        else:
            self._grow(self.length + 1)
            slot = self.length
        self.length += 1
        return slot

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Add k/v [B, T, K, Dh] at `positions` [B, T]; return the keys, values and positions to attend to."""
        T = k.shape[1]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if self.length + T > self.max_len:
            raise GenerationError(f"context limit exceeded: {self.length} cached + {T} new tokens > {self.max_len}")
        if self.ring:
            # Attend over the old ring plus all new keys (a long prefill chunk needs keys it will evict),
            # then keep only the newest `capacity` entries.
            keys, values, pos = (torch.cat([self.k, k], 1), torch.cat([self.v, v], 1),
                                 torch.cat([self.pos, positions], 1))
            capacity = self.k.shape[1]
            keep = min(T, capacity)
            slots = torch.arange(self.length + T - keep, self.length + T, device=k.device) % capacity
            self.k[:, slots], self.v[:, slots], self.pos[:, slots] = k[:, -keep:], v[:, -keep:], positions[:, -keep:]
        else:
            self._grow(self.length + T)
            end = self.length + T
            self.k[:, self.length:end], self.v[:, self.length:end], self.pos[:, self.length:end] = k, v, positions
            keys, values, pos = self.k[:, :end], self.v[:, :end], self.pos[:, :end]
        self.length += T
        return keys, values, pos


def default_cache_dtype(model_dtype: torch.dtype, device) -> torch.dtype:
    """fp32 on CPU: attention runs in fp32, and converting a bf16 cache every step costs more (≈3× at 4k
    context) than the doubled cache memory; the model's dtype elsewhere (GPUs have bf16 math and less memory)."""
    return torch.float32 if torch.device(device or "cpu").type == "cpu" else model_dtype


class KVCache:
    """Per-layer caches for one batch of sequences, passed explicitly to `Transformer.forward`."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, device=None,
                 dtype: torch.dtype = torch.bfloat16, initial_capacity: int = 256):
        max_len = max_len or config.max_position_embeddings
        self.layers = [
            LayerCache(batch_size, config.num_key_value_heads, config.head_dim,
                       config.sliding_window if config.is_sliding(i) else min(initial_capacity, max_len),
                       config.is_sliding(i), max_len, device, dtype)
            for i in range(config.num_hidden_layers)
        ]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)
