"""Models larger than memory: the experts streamed from the checkpoint into a fixed pool of slots.

A GPT-oss MoE layer reads experts_per_token of its num_experts experts per token (4 of 128 in gpt-oss-120b),
and the experts are 97 % of the checkpoint. So a model larger than RAM runs if everything else stays resident
(attention, router, norms, unembedding; the embedding stays memory-mapped: a token reads its own row) and the
experts come from disk as the router picks them:

- An ExpertPool holds `slots` experts (both MXFP4 matrices with their scales and biases) in ordinary memory,
  least-recently-used first out. Its size is the memory budget less the resident weights, so the process's
  anonymous memory is bounded whatever the model's size, and the page cache is left to the kernel.
- A missing expert is read with plain positional reads (os.preadv) straight into its slot, its four tensors
  in parallel threads: large sequential reads at the disk's bandwidth, not 4 KiB page faults through an mmap.
  The files are opened with POSIX_FADV_RANDOM (no readahead into the neighbouring experts, which the router
  did not pick), and the pages read are dropped from the page cache afterwards (POSIX_FADV_DONTNEED) so that
  an expert is not held twice, once in its slot and once in the cache (keep_page_cache=True keeps them).
- A batch's experts are resident together when the pool holds them (decode, short prompts: the fused MXFP4
  kernel on the slots); otherwise a prompt's chunk goes through the grouped path in waves of as many experts
  as fit, each expert read once per chunk.

The slots hold the checkpoint's bytes unchanged, and the same kernels run on them in the same order, so a
streamed model computes exactly what the in-memory one does (tests/test_streaming.py checks it bit for bit).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import GptOssError
from .model import ExpertWeights, MXFP4Weight

# The four expert tensors of a layer, in original names (checkpoint.LAYER_NAMES gives the HF ones).
EXPERT_TENSORS = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp2_weight.blocks", "mlp2_weight.scales")


@dataclass(frozen=True)
class ExpertExtent:
    """Where one layer's stack of one expert tensor lies: expert e's bytes are [offset + e·stride, + stride)."""
    file: Path
    offset: int
    stride: int


@dataclass
class StreamStats:
    """What the pool did since it was made (or since reset): the disk traffic that streaming costs."""
    hits: int = 0  # experts asked for that were resident
    misses: int = 0  # experts read from disk
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time spent waiting for reads
    prefetched: int = 0  # experts read ahead on a guess (predict_next)
    prefetch_hits: int = 0  # of those, asked for by the next layer
    prefetch_wasted: int = 0  # evicted before anyone asked for them
    tokens: int = 0  # tokens run through the MoE layers (counted at layer 0)
    started: float = field(default_factory=time.perf_counter)

    def bytes_per_token(self) -> float:
        return self.bytes_read / max(self.tokens, 1)

    def summary(self) -> str:
        asked = self.hits + self.misses + self.prefetch_hits
        return (f"experts read from disk: {self.bytes_read / 1e9:.2f} GB for {self.tokens} tokens "
                f"({self.bytes_per_token() / 1e6:.0f} MB/token; of the experts asked for, {self.hits / max(asked, 1):.0%} "
                f"were resident, {self.prefetch_hits / max(asked, 1):.0%} prefetched, "
                f"{self.misses / max(asked, 1):.0%} read on demand)")


def expert_extents(reader) -> dict[tuple[int, str], ExpertExtent]:
    """(layer, tensor) → ExpertExtent from a checkpoint.CheckpointReader's headers (either layout)."""
    extents = {}
    for i in range(reader.config.num_hidden_layers):
        for kind in EXPERT_TENSORS:
            (stored,) = reader._stored_names(f"block.{i}.mlp.{kind}")
            info = reader.files.index[stored]
            extents[i, kind] = ExpertExtent(info.file, info.offset, info.nbytes // info.shape[0])
    return extents


def expert_nbytes(config: ModelConfig, bias_itemsize: int = 2) -> int:
    """Bytes of one expert in a slot: both MXFP4 matrices, their scales and biases."""
    D, I = config.hidden_size, config.intermediate_size
    return (2 * I * D + D * I) // 2 + (2 * I * D + D * I) // 32 + (2 * I + D) * bias_itemsize


class ExpertPool:
    """`slots` experts of any layer, resident, filled from the checkpoint on demand, least recently used out.

    Slot tensors are MXFP4Weight stacks [slots, ...] like a layer's own, so the MoE runs its usual kernels on
    them with expert ids mapped to slots (model.ExpertWeights)."""

    def __init__(self, config: ModelConfig, extents: dict[tuple[int, str], ExpertExtent],
                 biases: list[tuple[torch.Tensor, torch.Tensor]], slots: int, *,
                 device: torch.device | str | None = None, threads: int = 4, direct_io: bool = True,
                 keep_page_cache: bool = False):
        if slots < config.experts_per_token:
            raise GptOssError(f"the expert pool needs at least {config.experts_per_token} slots "
                              f"(experts_per_token), got {slots}: raise --memory-budget")
        E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.config, self.extents, self.biases = config, extents, biases
        self.slots = min(slots, E * config.num_hidden_layers)
        self.device = torch.device(device or "cpu")
        dtype = biases[0][0].dtype
        # torch.empty: pages are touched (and counted) only when a slot is first filled
        self.mlp1 = _empty_mxfp4(self.slots, 2 * I, D, self.device)
        self.mlp2 = _empty_mxfp4(self.slots, D, I, self.device)
        self.mlp1_bias = torch.zeros(self.slots, 2 * I, dtype=dtype, device=self.device)
        self.mlp2_bias = torch.zeros(self.slots, D, dtype=dtype, device=self.device)
        self.targets = {"mlp1_weight.blocks": self.mlp1.blocks, "mlp1_weight.scales": self.mlp1.scales,
                        "mlp2_weight.blocks": self.mlp2.blocks, "mlp2_weight.scales": self.mlp2.scales}
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) → slot, oldest first
        self.free = list(range(self.slots - 1, -1, -1))
        self.direct_io, self.keep_page_cache = direct_io, keep_page_cache
        self.stats = StreamStats()
        self._fds: dict[Path, tuple[int, bool]] = {}  # file → (descriptor, opened for direct I/O)
        self._local = threading.local()
        self._inflight: dict[tuple[int, int], list] = {}  # prefetched experts whose reads may not be done
        self._prefetched: set[tuple[int, int]] = set()  # prefetched and not asked for yet
        self.busy: set[tuple[int, int]] = set()  # the experts of the last lookup: the kernel may be reading them
        # (norm, router) of each layer, for predict_next (set by checkpoint.load); predict: whether to guess
        self.routers: list | None = None
        self.predict = True
        self._readers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gptoss-experts")
        self._lock = threading.Lock()  # one batch's lookups at a time (the engine is one thread; be safe)
        for extent in extents.values():
            self._fd(extent.file)

    def close(self) -> None:
        for jobs in self._inflight.values():
            for job in jobs:
                job.result()
        self._readers.shutdown(wait=True)
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.targets.values(), self.mlp1_bias, self.mlp2_bias))

    def layer(self, i: int) -> "LayerExperts":
        return LayerExperts(self, i)

    # ------------------------------------------------------------ lookups
    def lookup(self, layer: int, experts: list[int]) -> torch.Tensor:
        """Make `experts` (distinct ids, at most `slots`) of `layer` resident → rows (E,) for ExpertWeights.
        Blocks until they are read; they stay put until the next lookup (the kernel is reading them)."""
        E = self.config.num_experts
        if len(experts) > self.slots:
            raise ValueError(f"{len(experts)} experts asked at once, the pool has {self.slots} slots")
        with self._lock:
            wanted = {(layer, e) for e in experts}
            self.busy = wanted
            waiting, loads = [], []
            for e in experts:
                key = (layer, e)
                if key in self.lru:
                    self.lru.move_to_end(key)
                    if key in self._prefetched:  # read ahead on a guess (maybe still arriving)
                        waiting += self._inflight.pop(key, [])
                        self._prefetched.discard(key)
                        self.stats.prefetch_hits += 1
                    else:
                        self.stats.hits += 1
                else:
                    loads.append((e, self._take_slot(key)))
            start = time.perf_counter()
            jobs = self._submit(layer, loads)
            for job in jobs + waiting:
                job.result()  # re-raises a failed read here
            self.stats.read_seconds += time.perf_counter() - start
            self.stats.misses += len(loads)
            self.stats.bytes_read += sum(job.result() for job in jobs)
            rows = torch.full((E,), -1, dtype=torch.long)
            for e in experts:
                rows[e] = self.lru[layer, e]
        return rows.to(self.device)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading `experts` of `layer` (a guess at what it will ask for) without waiting; never evicts
        the experts in use or other prefetches still in flight."""
        with self._lock:
            loads = []
            for e in experts:
                key = (layer, e)
                if key in self.lru:
                    continue
                slot = self._take_slot(key, prefetch=True)
                if slot is None:
                    break
                loads.append((e, slot))
            for (e, _), jobs in zip(loads, _chunks(self._submit(layer, loads), len(EXPERT_TENSORS))):
                self._inflight[layer, e] = jobs
            self.stats.prefetched += len(loads)
            self.stats.bytes_read += sum(self.extents[layer, kind].stride for _ in loads for kind in EXPERT_TENSORS)

    def _take_slot(self, key: tuple[int, int], prefetch: bool = False) -> int | None:
        """A slot for `key` (now the most recently used): a free one, else the least recently used expert's
        that is not in use (a prefetch also spares the prefetched experts nobody asked for yet, its own
        included; None if nothing can go)."""
        if self.free:
            slot = self.free.pop()
        else:
            victim = next((k for k in self.lru if k not in self.busy and not (prefetch and k in self._prefetched)),
                          None)
            if victim is None:
                if prefetch:
                    return None
                raise RuntimeError("expert pool: every slot is in use")  # lookup checks len(experts) ≤ slots
            for job in self._inflight.pop(victim, ()):  # a wrong guess still being read into this slot
                job.result()
            if victim in self._prefetched:
                self._prefetched.discard(victim)
                self.stats.prefetch_wasted += 1
            slot = self.lru.pop(victim)
        self._prefetched.discard(key)
        if prefetch:
            self._prefetched.add(key)
        self.lru[key] = slot
        return slot

    def _submit(self, layer: int, loads: list[tuple[int, int]]) -> list:
        """Start the reads of each (expert, slot)'s four tensors; copy its biases now."""
        jobs = [self._readers.submit(self._read_one, layer, kind, e, slot)
                for e, slot in loads for kind in EXPERT_TENSORS]
        mlp1_bias, mlp2_bias = self.biases[layer]
        for e, slot in loads:
            self.mlp1_bias[slot] = mlp1_bias[e]
            self.mlp2_bias[slot] = mlp2_bias[e]
        return jobs

    def predict_next(self, layer: int, x: torch.Tensor) -> None:
        """Prefetch what layer+1's router would pick for the residual stream `x` [.., D] as it enters layer
        `layer`'s MoE: it changes little over one layer, so the guess is mostly right, and the reads overlap
        this layer's experts and the next layer's attention (Eliseev & Mazur 2023, "Fast Inference of
        Mixture-of-Experts Language Models with Offloading", §3.2; Hwang et al. 2024, "Pre-gated MoE")."""
        if self.routers is None or layer + 1 >= len(self.routers) or not self.predict:
            return
        norm, gate = self.routers[layer + 1]
        with torch.no_grad():
            t = norm(x.reshape(-1, x.shape[-1])).to(gate.weight.dtype)
            guess = torch.topk(gate(t), self.config.experts_per_token, dim=-1).indices
        experts = guess.unique().tolist()
        room = self.slots - len(self.busy)
        self.prefetch(layer + 1, experts[:max(room, 0)])

    def _read_one(self, layer: int, kind: str, e: int, slot: int) -> int:
        extent = self.extents[layer, kind]
        target = self.targets[kind][slot]
        offset, n = extent.offset + e * extent.stride, extent.stride
        fd, direct = self._fds[extent.file]
        if direct:  # aligned reads into this thread's staging buffer, then one copy into the slot
            start = offset - offset % _ALIGN
            length = -(-(offset + n - start) // _ALIGN) * _ALIGN
            staging = self._staging(length)
            got = _pread_full(fd, memoryview(staging)[:length], start)
            if got < offset + n - start:
                raise GptOssError(f"{extent.file}: truncated while reading expert {e} of layer {layer} ({kind})")
            source = torch.frombuffer(staging, dtype=torch.uint8, count=n, offset=offset - start)
            target.view(-1).copy_(source)
            return n
        staging = target if target.device.type == "cpu" else torch.empty_like(target, device="cpu")
        if _pread_full(fd, memoryview(staging.numpy()).cast("B"), offset) < n:
            raise GptOssError(f"{extent.file}: truncated while reading expert {e} of layer {layer} ({kind})")
        if not self.keep_page_cache:  # the slot holds it now: don't keep a second copy in the page cache
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        if staging is not target:
            target.copy_(staging)
        return n

    def _staging(self, length: int) -> mmap.mmap:
        """This reader thread's page-aligned buffer of at least `length` bytes (O_DIRECT needs alignment)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < length:
            self._local.buffer = buffer = mmap.mmap(-1, length)
        return buffer

    def _fd(self, file: Path) -> None:
        """Open `file` for direct reads (no page cache: the slot is the only copy, and nothing is charged to a
        memory cgroup's page cache), or buffered with POSIX_FADV_RANDOM where direct I/O is not supported."""
        if file in self._fds:
            return
        if self.direct_io and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
                _pread_full(fd, memoryview(mmap.mmap(-1, _ALIGN)), 0)  # tmpfs and some others refuse here
                self._fds[file] = (fd, True)
                return
            except OSError:
                try:
                    os.close(fd)
                except (OSError, UnboundLocalError):
                    pass
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into experts nobody asked for
        self._fds[file] = (fd, False)


_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in whole (logical) blocks; a page covers them


def _pread_full(fd: int, buffer: memoryview, offset: int) -> int:
    """preadv until `buffer` is full or the file ends (large reads may return short); bytes read."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _empty_mxfp4(n: int, out_features: int, in_features: int, device: torch.device) -> MXFP4Weight:
    with torch.device("meta"):
        w = MXFP4Weight(n, out_features, in_features)
    w.blocks = torch.empty(w.blocks.shape, dtype=torch.uint8, device=device)
    w.scales = torch.empty(w.scales.shape, dtype=torch.uint8, device=device)
    return w


class LayerExperts:
    """One MoE layer's view of the pool (model.MoE.streamed)."""

    def __init__(self, pool: ExpertPool, layer: int):
        self.pool, self.layer = pool, layer

    def _weights(self, rows: torch.Tensor) -> ExpertWeights:
        p = self.pool
        return ExpertWeights(p.mlp1, p.mlp1_bias, p.mlp2, p.mlp2_bias, rows)

    def _count(self, experts: torch.Tensor) -> None:
        if self.layer == 0:
            self.pool.stats.tokens += experts.shape[0]

    def resident(self, experts: torch.Tensor, hint: torch.Tensor | None = None) -> ExpertWeights | None:
        """All of `experts` [N, k] resident at once (the fused kernel's way), or None if the pool is too small.
        hint: the residual stream entering this MoE, to prefetch the next layer's likely experts."""
        ids = [e for e in experts.unique().tolist() if e >= 0]
        if len(ids) > self.pool.slots:
            return None
        self._count(experts)
        rows = self.pool.lookup(self.layer, ids)
        self._predict(hint)
        return self._weights(rows)

    def token_groups(self, experts: torch.Tensor, hint: torch.Tensor | None = None
                     ) -> Iterator[tuple[torch.Tensor | None, ExpertWeights]]:
        """(tokens, weights) such that each group's experts are resident together: one group (tokens None) when
        the pool holds all of `experts` [N, k], else consecutive runs of tokens (the fused kernel's rounding
        then differs slightly from one call over the whole batch: it tiles each expert's rows)."""
        whole = self.resident(experts, hint)
        if whole is not None:
            yield None, whole
            return
        self._count(experts)
        rows = experts.tolist()
        start, seen = 0, set()
        for n, row in enumerate(rows + [None]):
            if row is not None and len(seen | set(row)) <= self.pool.slots:
                seen |= set(row)
                continue
            tokens = torch.arange(start, n, device=experts.device)
            yield tokens, self._weights(self.pool.lookup(self.layer, sorted(seen)))
            start, seen = n, set(row or ())

    def waves(self, experts: torch.Tensor, hint: torch.Tensor | None = None) -> Iterator[ExpertWeights]:
        """The experts of `experts` in ascending order, as many at a time as the pool holds; the next wave's
        experts are read while this one computes."""
        self._count(experts)
        ids = [e for e in experts.unique().tolist() if e >= 0]
        step = max(self.pool.slots // 2, 1)  # half the pool computes, the other half is being read
        waves = [ids[i:i + step] for i in range(0, len(ids), step)]
        for n, wave in enumerate(waves):
            rows = self.pool.lookup(self.layer, wave)
            if n + 1 < len(waves):
                self.pool.prefetch(self.layer, waves[n + 1])
            else:
                self._predict(hint)
            yield self._weights(rows)

    def _predict(self, hint: torch.Tensor | None) -> None:
        if hint is not None:
            self.pool.predict_next(self.layer, hint)


# ---------------------------------------------------------------- how much memory there is
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("max", "") else int(text)


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup still allows beyond its anonymous memory (v2 or v1), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, stat_key = _read_int(base / "memory.max"), "anon"
            stat = base / "memory.stat"
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, stat_key = _read_int(base / "memory.limit_in_bytes"), "total_rss"
            stat = base / "memory.stat"
        else:
            continue
        if limit is None or limit >= 2**60:
            continue
        used = 0
        try:
            for row in stat.read_text().splitlines():
                key, value = row.split()
                if key == stat_key:
                    used = int(value)
        except (OSError, ValueError):
            pass
        return max(limit - used, 0)
    return None


def available_memory() -> int:
    """Bytes this process can still take: MemAvailable, or less where a cgroup limit says so."""
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    except OSError:
        pass
    if room is None:
        try:
            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            room = 2**62
    cgroup = _cgroup_room()
    return room if cgroup is None else min(room, cgroup)


def measure_read_bandwidth(file: Path, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of one large read from `file` bypassing what the page cache holds of it (dropped first)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        nbytes = min(nbytes, size)
        offset = max(size - nbytes, 0)  # the end of the file: experts, not the header the loader just read
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(min(nbytes, 64 * 2**20))
        start, done = time.perf_counter(), 0
        while done < nbytes:
            n = os.preadv(fd, [buffer], offset + done)
            if n == 0:
                break
            done += n
        seconds = time.perf_counter() - start
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return done / max(seconds, 1e-9)
