"""KV caches: the per-layer keys and values a generation attends to, and the prefix cache that reuses them.

Every entry carries its position, and the attention mask is built from positions, so a cache never has to
be in order: a ring slot is simply overwritten, and an empty slot (position −1) is masked out.

- `KVCache` (LayerCache per layer): one batch of rows that started together and write in step (one shared
  `length`): `generate`, and the engine's prefill. Sliding layers keep a ring of `sliding_window` entries
  (or every entry with keep_history=True, so that a prompt's keys can be stored for reuse), full layers
  a growing buffer. Rows may sit at different positions (left-padded prompts: pads have position −1).
- `SlotCache` (SlotLayerCache per layer): the engine's batched decode cache, one row per request, each row
  of its own age: row r holds position p at index p % window (sliding layers) or p (full layers).
- `PrefixCache`: keys and values of prompts (and finished conversations) kept after their request, so
  that a request whose tokens start the same way prefills only the rest (the next turn of a chat, a shared
  system prompt). Bounded in bytes, least recently used evicted first.

Both layer caches give the fused decode kernels the same thing: `decode_slots(positions)` says where each
row's new key goes without writing anything, the kernel writes it there, and `commit()` records it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import GenerationError


def _grown(t: torch.Tensor, capacity: int, fill: float | int) -> torch.Tensor:
    """t [rows, old, ...] extended along dim 1 to `capacity` entries filled with `fill`."""
    pad = t.new_full((t.shape[0], capacity - t.shape[1], *t.shape[2:]), fill)
    return torch.cat([t, pad], dim=1)


class _RowsCache:
    """Keys k/v [rows, capacity, K, Dh] and positions pos [rows, capacity] (−1: empty) of one layer."""

    def __init__(self, rows: int, num_kv_heads: int, head_dim: int, capacity: int, ring: bool, max_len: int,
                 device, dtype: torch.dtype):
        self.ring = ring  # sliding layer: a fixed capacity, the oldest entry overwritten
        self.max_len = max_len
        self.k = torch.zeros(rows, capacity, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((rows, capacity), -1, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, needed: int) -> None:
        """Non-ring layers: room for `needed` entries per row (doubling, up to max_len)."""
        if self.ring or needed <= self.capacity:
            return
        new = min(max(needed, 2 * self.capacity), self.max_len)
        self.k, self.v, self.pos = _grown(self.k, new, 0), _grown(self.v, new, 0), _grown(self.pos, new, -1)

    def fusable(self) -> bool:
        """Whether the fused decode kernels can write this cache (contiguous fp32 on CPU)."""
        return self.k.dtype == torch.float32 and self.k.device.type == "cpu"

    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


class LayerCache(_RowsCache):
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, ring: bool,
                 max_len: int, device, dtype: torch.dtype):
        super().__init__(batch_size, num_kv_heads, head_dim, capacity, ring, max_len, device, dtype)
        self.length = 0  # tokens written so far (same for every row)

    def _check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise GenerationError(f"context limit exceeded: {self.length} cached + {T} new tokens > {self.max_len}")

    def decode_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Where each row's next token goes [B] (the same slot for all rows: they write in step); nothing is
        written or reserved until commit()."""
        self._check_room(1)
        if self.ring:  # the overwritten entry is `capacity` positions old: outside the window already
            slot = self.length % self.capacity
        else:
            self.reserve(self.length + 1)
            slot = self.length
        return torch.full((positions.shape[0],), slot, dtype=torch.long)

    def commit(self) -> None:
        """A kernel has written one token per row at decode_slots()."""
        self.length += 1

    def seed(self, rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]) -> None:
        """Start from stored entries (the prefix cache): rows[i] = (k [n_i, K, Dh], v, positions [n_i]) or None;
        shorter rows are padded with empty slots. Only on an empty cache that keeps every entry."""
        if self.length or self.ring:
            raise GenerationError("LayerCache.seed: only an empty cache that keeps every entry can be seeded")
        n = max((row[2].numel() for row in rows if row is not None), default=0)
        self._check_room(n)
        self.reserve(n)
        for i, row in enumerate(rows):
            if row is not None:
                m = row[2].numel()
                self.k[i, :m], self.v[i, :m], self.pos[i, :m] = row
        self.length = n

    def entries(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row `row`'s stored keys, values and positions (empty slots left out), in slot order."""
        keep = self.pos[row, :min(self.length, self.capacity)] >= 0
        n = keep.shape[0]
        return self.k[row, :n][keep], self.v[row, :n][keep], self.pos[row, :n][keep]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Add k/v [B, T, K, Dh] at `positions` [B, T]; return the keys, values and positions to attend to."""
        T = k.shape[1]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self._check_room(T)
        if self.ring:
            # Attend over the old ring plus all new keys (a long prefill chunk needs keys it will evict),
            # then keep only the newest `capacity` entries.
            keys, values, pos = (torch.cat([self.k, k], 1), torch.cat([self.v, v], 1),
                                 torch.cat([self.pos, positions], 1))
            capacity = self.capacity
            keep = min(T, capacity)
            slots = torch.arange(self.length + T - keep, self.length + T, device=k.device) % capacity
            self.k[:, slots], self.v[:, slots], self.pos[:, slots] = k[:, -keep:], v[:, -keep:], positions[:, -keep:]
        else:
            self.reserve(self.length + T)
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
    """Per-layer caches for one batch of sequences, passed explicitly to `Transformer.forward`.
    keep_history: sliding layers keep every entry too (the engine's prefill, whose keys the prefix cache
    stores); the attention mask still applies the window."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, device=None,
                 dtype: torch.dtype = torch.bfloat16, initial_capacity: int = 256, keep_history: bool = False):
        max_len = max_len or config.max_position_embeddings
        self.layers = []
        for i in range(config.num_hidden_layers):
            ring = config.is_sliding(i) and not keep_history
            capacity = config.sliding_window if ring else min(initial_capacity, max_len)
            self.layers.append(LayerCache(batch_size, config.num_key_value_heads, config.head_dim, capacity, ring,
                                          max_len, device, dtype))

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class SlotLayerCache(_RowsCache):
    """One layer's keys and values for `slots` independent rows: row r holds the key of position p at index
    p % capacity on sliding layers (a ring of exactly the window) and at index p on full layers (grown on
    demand, shared capacity). Entries are [slots, capacity, K, Dh]; `pos` [slots, capacity] is −1 when empty."""

    def __init__(self, slots: int, num_kv_heads: int, head_dim: int, capacity: int, ring: bool, max_len: int,
                 device, dtype: torch.dtype):
        super().__init__(slots, num_kv_heads, head_dim, capacity, ring, max_len, device, dtype)
        self.span = capacity  # keys the next decode step attends to (full layers: highest position + 1)

    def _index(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.capacity if self.ring else positions

    def insert(self, row: int, source: LayerCache, source_row: int) -> None:
        """Copy a prefilled request (row `source_row` of a KVCache layer, any padding, ring or history) into `row`."""
        pos = source.pos[source_row]
        keep = pos >= 0  # pad slots and unused capacity hold position −1
        if keep.any():
            last = int(pos.max())
            self.reserve(last + 1)
            if self.ring:  # a history source holds older positions too: only the newest ring's worth
                keep &= pos > last - self.capacity
        p = pos[keep]
        self.pos[row].fill_(-1)  # the previous occupant's keys must not leak into this request
        idx = self._index(p)
        self.k[row, idx] = source.k[source_row, keep].to(self.k.dtype)
        self.v[row, idx] = source.v[source_row, keep].to(self.v.dtype)
        self.pos[row, idx] = p

    def entries(self, row: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row `row`'s keys, values and positions below `end`, in position order (copies)."""
        if self.ring:
            pos = self.pos[row]
            keep = (pos >= 0) & (pos < end)
            order = torch.argsort(pos[keep])
            return self.k[row, keep][order], self.v[row, keep][order], pos[keep][order]
        return self.k[row, :end].clone(), self.v[row, :end].clone(), self.pos[row, :end].clone()

    def move(self, src: int, dst: int) -> None:
        self.k[dst], self.v[dst], self.pos[dst] = self.k[src], self.v[src], self.pos[src]
        self.pos[src].fill_(-1)

    def clear(self) -> None:
        self.pos.fill_(-1)

    def decode_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Where row r's next token goes [n] (its own index: every row is of its own age); writes nothing."""
        return self._index(positions.reshape(-1))

    def commit(self) -> None:
        """Nothing to record: positions, not a length, say what a row holds."""

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Decode: k/v [n, 1, K, Dh] of rows 0..n-1 at `positions` [n, 1] (all ≥ 0); returns what they attend to."""
        n, T = positions.shape
        if T != 1:
            raise GenerationError(f"SlotCache takes one token per row (decode), got {T}; prefill into a KVCache")
        p = positions[:, 0]
        rows = torch.arange(n, device=p.device)
        idx = self._index(p)
        self.k[rows, idx] = k[:, 0].to(self.k.dtype)
        self.v[rows, idx] = v[:, 0].to(self.v.dtype)
        self.pos[rows, idx] = p
        end = self.capacity if self.ring else self.span
        return self.k[:n, :end], self.v[:n, :end], self.pos[:n, :end]  # views: rows 0..n-1 are contiguous


class SlotCache:
    """Per-layer SlotLayerCaches: the batched cache of the engine's decode step (the model's `cache` argument)."""

    seedable = True  # the engine may prefill from the prefix cache into it (not parallel's mirrored twin)

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32, initial_capacity: int = 256):
        self.slots = slots
        self.layers = [
            SlotLayerCache(slots, config.num_key_value_heads, config.head_dim,
                           config.sliding_window if config.is_sliding(i) else min(initial_capacity, max_len),
                           config.is_sliding(i), max_len, device, dtype)
            for i in range(config.num_hidden_layers)
        ]

    def layer(self, i: int) -> SlotLayerCache:
        return self.layers[i]

    def begin_step(self, max_position: int) -> None:
        """Before a decode step whose highest query position is `max_position`: full layers attend to
        indices 0..max_position only (shorter rows see −1 there), however long earlier requests were."""
        for layer in self.layers:
            layer.reserve(max_position + 1)
            layer.span = max_position + 1

    def insert(self, row: int, source: KVCache, source_row: int) -> None:
        for mine, theirs in zip(self.layers, source.layers):
            mine.insert(row, theirs, source_row)

    def move(self, src: int, dst: int) -> None:
        for layer in self.layers:
            layer.move(src, dst)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ---------------------------------------------------------------------------------------------- prefix cache
def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading token ids a and b share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: halve (list slices compare in C)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _spans(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted distinct positions → maximal runs [start, end)."""
    p = positions.tolist()
    spans: list[tuple[int, int]] = []
    for x in p:
        if spans and x == spans[-1][1]:
            spans[-1] = (spans[-1][0], x + 1)
        else:
            spans.append((x, x + 1))
    return spans


@dataclass(eq=False)
class CachedPrefix:
    """Keys and values for positions of `tokens`: per layer k/v [n, K, Dh] and their positions pos [n],
    ascending. Full layers hold every position 0..len(tokens)−1; sliding layers those in `spans` (a prompt's
    every position, a finished conversation's last window too: what its decode ring still held)."""
    tokens: list[int]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: list[torch.Tensor]
    spans: list[tuple[int, int]]  # the sliding layers' positions, as runs [start, end)
    window: int
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.pos))

    def below(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `layer`'s stored keys, values and positions below position n (views)."""
        count = int(torch.searchsorted(self.pos[layer], n))  # positions ascend
        return self.k[layer][:count], self.v[layer][:count], self.pos[layer][:count]

    def reusable(self, n: int) -> int:
        """The longest prefix ≤ n of `tokens` whose keys this entry can give exactly: every full layer has
        them, and each sliding layer has the window before it (positions max(0, P − window) .. P − 1)."""
        n = min(n, len(self.tokens))
        best = 0
        for start, end in self.spans:
            lowest = start + self.window if start > 0 else 0  # a window wholly inside the run
            if lowest <= min(n, end):
                best = max(best, min(n, end))
        return best

    def covers(self, other: "CachedPrefix") -> bool:
        """Whether every reuse `other` offers, this entry offers too."""
        if len(other.tokens) > len(self.tokens) or self.tokens[:len(other.tokens)] != other.tokens:
            return False
        return all(any(s <= a and b <= e for s, e in self.spans) for a, b in other.spans)


class PrefixCache:
    """Stored prefixes, least recently used evicted first while their bytes exceed `max_bytes`.

    One entry per conversation at a time: an entry that a newer one covers (the turn before, extended by the
    turn's answer and the next message) is dropped when the newer one is stored."""

    def __init__(self, config: ModelConfig, max_bytes: int):
        self.window = config.sliding_window
        self.sliding = [config.is_sliding(i) for i in range(config.num_hidden_layers)]
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()
        self._ids = itertools.count()
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[CachedPrefix | None, int]:
        """The entry and length P of the longest reusable prefix of `prompt`, at most len(prompt) − 1 (the
        last prompt token is always run: its logits give the first new token); (None, 0) when none."""
        self.lookups += 1
        best, best_len, best_key = None, 0, None
        for key, entry in self._entries.items():
            n = entry.reusable(common_prefix(entry.tokens, prompt))
            n = min(n, len(prompt) - 1)
            if n > best_len:
                best, best_len, best_key = entry, n, key
        if best_key is not None:
            self._entries.move_to_end(best_key)
            self.hits += 1
        return best, best_len

    def seed(self, cache: KVCache, reuse: list[tuple[CachedPrefix | None, int]]) -> None:
        """Fill an empty keep_history KVCache: row i starts with entry i's keys below its reuse length
        (sliding layers: every stored position below it, so the new entry keeps them too)."""
        for i, layer in enumerate(cache.layers):
            rows = [None if entry is None or n == 0 else entry.below(i, n) for entry, n in reuse]
            if any(row is not None for row in rows):
                layer.seed(rows)

    def entry_from_prefill(self, cache: KVCache, row: int, tokens: list[int]) -> CachedPrefix:
        """Row `row` of a prefilled keep_history KVCache (seeded or not) as an entry for `tokens`."""
        ks, vs, ps = zip(*(layer.entries(row) for layer in cache.layers))  # boolean indexing copies
        return self._entry(tokens, list(ks), list(vs), list(ps))

    def entry_from_slots(self, prompt_entry: CachedPrefix, cache: SlotCache, row: int,
                         tokens: list[int]) -> CachedPrefix:
        """A finished request as an entry: full layers from its SlotCache row (positions below len(tokens)),
        sliding layers the prompt's stored positions plus what the ring still holds after them."""
        end, prompt_len = len(tokens), len(prompt_entry.tokens)
        ks, vs, ps = [], [], []
        for i, layer in enumerate(cache.layers):
            k, v, p = layer.entries(row, end)
            if self.sliding[i]:
                newer = p >= prompt_len
                k, v, p = (torch.cat([mine[i], theirs[newer]]) for mine, theirs in
                           ((prompt_entry.k, k), (prompt_entry.v, v), (prompt_entry.pos, p)))
            ks.append(k)
            vs.append(v)
            ps.append(p)
        return self._entry(tokens, ks, vs, ps)

    def _entry(self, tokens, ks, vs, ps) -> CachedPrefix:
        sliding = next((i for i, s in enumerate(self.sliding) if s), None)
        spans = _spans(ps[sliding]) if sliding is not None else [(0, len(tokens))]
        return CachedPrefix(list(tokens), ks, vs, ps, spans, self.window)

    def store(self, entry: CachedPrefix) -> None:
        """Keep `entry` (dropping the entries it covers), then evict the least recently used over budget."""
        if entry.nbytes > self.max_bytes or not entry.tokens:
            return
        for key in [key for key, old in self._entries.items() if entry.covers(old)]:
            self._drop(key)
        self._entries[next(self._ids)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
