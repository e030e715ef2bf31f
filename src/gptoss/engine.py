"""Continuous batching: one background thread owns the model and generates for many requests at once.

Each iteration the engine

1. admits waiting requests into free rows (at most `max_concurrency` rows generate at a time) and prefills
   them together: left-padded into a KVCache of their own, as `generate.generate` does, then each
   request's keys/values are copied, by position, into its row of one batched `SlotCache`;
2. runs one decode step for every active request in a single forward pass over rows 0..n-1.

Why a SlotCache and not one KVCache per request: decoding is memory-bound (every step reads the weights
once), so n requests stepped in one forward cost little more than one. KVCache shares one write index
(`length`) across its rows, which only works for rows that started together; here every row is a request
of its own age, so each row writes the key of position p at index p (full layers) or p % window (sliding
layers, a ring), and positions, not indices, drive the attention mask (an empty slot has position −1).
Active requests always occupy rows 0..n-1 (a finished request's row is refilled with the last row), so
the forward takes a view of the cache, never a gathered copy, and empty rows cost nothing: they would
route to experts and make the MoE read expert weights nobody needs.

A request's logits never depend on its neighbours (rows only meet in matmuls), and each request samples
with its own seeded generator, so its tokens equal a solo `generate_tokens` run up to fp32 summation order
(a different batch size may change the last bits of a logit, which can flip a near-tie under greedy).

Prefix caching: after its prefill, each prompt's keys and values (every layer, every position) go into a
`PrefixCache`, and so does each finished conversation (prompt + answer); a new request whose prompt starts
with tokens found there prefills only the rest, into a cache seeded with the stored keys. The reusable
prefix is found by comparing token ids (Harmony drops earlier analysis messages, so a chat's next turn
matches only up to where the renders differ), and it is exact: the seeded keys are the ones a fresh prefill
computes, and sliding layers reuse a prefix only where the window before it is stored.

Requests stream their tokens through an `outlet` callback run on the engine thread; `TokenStream` turns it
into an async iterator for asyncio servers, `Engine.complete` into a plain iterator (chat.Complete).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .cache import CachedPrefix, KVCache, PrefixCache, SlotCache, default_cache_dtype
from .config import ModelConfig
from .constrain import Guide
from .errors import GenerationError, GptOssError
from .generate import PREFILL_CHUNK, SamplingParams, decode_step, left_pad, prefill, sample
from .loading import DEFAULT_PREFIX_CACHE_GIB
from .model import Transformer

log = logging.getLogger("gptoss.engine")


DEFAULT_PREFIX_CACHE_BYTES = int(DEFAULT_PREFIX_CACHE_GIB * 2**30)


class EngineBusy(GptOssError):
    """Every row is generating and the waiting queue is full: try again later (HTTP 503)."""


class EngineClosed(GptOssError):
    """The engine has been shut down."""


class ContextLengthError(GenerationError):
    """prompt + max_tokens exceeds the context limit."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(f"the context limit is {limit} tokens, but {prompt_tokens + max_tokens} were requested "
                         f"({prompt_tokens} in the prompt, {max_tokens} to generate)")


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Finish:
    """The last event of a request. reason: "stop" (a stop token, included in the tokens), "length"
    (max_tokens), "cancelled" or "error" (then `error` says what failed)."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (not prefilled)
    queued_s: float = 0.0  # submit → prefill start
    ttft_s: float = 0.0  # submit → first token
    total_s: float = 0.0  # submit → finish
    error: str | None = None
    step_median_s: float = 0.0  # median time between consecutive tokens (bench_decode's statistic; 0: < 2 tokens)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (the decode rate this request saw)."""
        dt = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / dt if self.completion_tokens > 1 and dt > 0 else 0.0


Outlet = Callable[["int | Finish"], None]  # receives each token id, then one Finish; runs on the engine thread
StopRule = Callable[[list[int]], bool]  # the tokens so far → whether the answer is complete (engine thread)


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    outlet: Outlet
    stop_rule: StopRule | None = None  # beyond params.stop_tokens: True ends the request with reason "stop"
    tokens: list[int] = field(default_factory=list)
    reuse: tuple[CachedPrefix | None, int] = (None, 0)  # a prefix cache entry and how many prompt tokens it gives
    prompt_entry: CachedPrefix | None = None  # this prompt's keys, stored after the prefill
    finish_reason: str | None = None
    cancelled: bool = False  # set by any thread; the engine drops the request at its next step
    admitted: bool = False  # left the waiting queue for a row
    finished: bool = False
    generator: torch.Generator | None = None
    guide: Guide | None = None  # params.constraint's state: masks this request's logits, follows its tokens
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    token_times: list[float] = field(default_factory=list)  # perf_counter at each token (the decode's pace)

    @property
    def first_token(self) -> float:
        """When the first token was emitted (0.0: none yet)."""
        return self.token_times[0] if self.token_times else 0.0

    @property
    def next_position(self) -> int:
        """Position of the token to feed next (the last sampled one)."""
        return len(self.prompt) + len(self.tokens) - 1


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Serves many generation requests at once from one model, on a background thread.

    max_concurrency: requests decoding together (rows of the batch); max_queue: requests waiting beyond
    those (submit raises EngineBusy past it); max_context: prompt + max_tokens limit (default: the model's);
    max_prefill_tokens: padded prompt tokens prefilled in one iteration (long prompts then run alone);
    prefill_chunk: chunk size within a prefill; prefix_cache_bytes: bound of the prefix cache (0: off);
    on_finish(request, finish): called on the engine thread as each request ends (metrics, benchmarks).
    """

    def __init__(self, model: Transformer, max_concurrency: int = 16, max_queue: int = 64,
                 max_context: int | None = None, max_prefill_tokens: int = 4096, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 on_finish: Callable[[Request, Finish], None] | None = None):
        if max_concurrency < 1 or max_queue < 0:
            raise GenerationError(f"max_concurrency must be >= 1 and max_queue >= 0, got {max_concurrency}, "
                                  f"{max_queue}")
        self.model = model
        self.config = model.config
        self.device = model.device
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        limit = self.config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.max_prefill_tokens, self.prefill_chunk = max_prefill_tokens, prefill_chunk
        self.cache_dtype = default_cache_dtype(model.dtype, self.device)
        self.cache = SlotCache(self.config, max_concurrency, self.max_context, self.device, self.cache_dtype)
        self.prefix_cache = PrefixCache(self.config, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.on_finish = on_finish
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # row i of the cache belongs to _active[i]
        self._prefilling: list[Request] = []
        self._running_count = 0  # admitted, not finished (read under the lock by submit)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.max_batch = 0  # the most rows seen in one decode step

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if not self.cache.seedable:  # parallel.MirroredSlotCache
            self.prefix_cache = None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30) -> None:
        """Stop the thread; requests still waiting or running end with Finish("cancelled")."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def load(self) -> tuple[int, int]:
        """(requests generating or being prefilled, requests waiting)."""
        with self._cond:
            return self._running_count, len(self._waiting)

    # ------------------------------------------------------------------ submitting
    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise GenerationError (ContextLengthError for a too-long request) if it cannot be served."""
        params.validate()
        if not prompt:
            raise GenerationError("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise GenerationError(f"token id {bad} is outside the vocabulary (0 ≤ id < {self.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextLengthError(len(prompt), params.max_tokens, self.max_context)

    def submit(self, prompt: Sequence[int], params: SamplingParams, outlet: Outlet,
               request_id: str | None = None, stop_rule: StopRule | None = None) -> Request:
        """Queue a request; its tokens go to `outlet` from the engine thread. Raises EngineBusy, EngineClosed
        or GenerationError at once, never later. stop_rule(tokens) runs after each token (e.g. "a final
        message has ended"); True finishes the request with reason "stop"."""
        self.check(prompt, params)
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else random.randrange(2**63)
            generator = torch.Generator(device=self.device).manual_seed(seed)  # as generate(): row 0 gets seed + 0
        else:
            generator = None
        guide = Guide(params.constraint, params.max_tokens) if params.constraint is not None else None
        request = Request(request_id or f"req-{next(self._ids)}", list(prompt), params, outlet, stop_rule=stop_rule,
                          generator=generator, guide=guide)
        with self._cond:
            if self._closed or self._thread is None:
                raise EngineClosed("the engine is not running")
            if self._running_count + len(self._waiting) >= self.max_concurrency + self.max_queue:
                raise EngineBusy(f"server busy: {self._running_count} requests generating and {len(self._waiting)} "
                                 f"waiting (max_concurrency {self.max_concurrency}, max_queue {self.max_queue}); "
                                 "retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away); safe from any thread, a no-op once it has finished."""
        with self._cond:
            if request.finished:
                return
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
            self._cond.notify_all()

    def complete(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """The generated token ids, blocking (chat.Complete). Closing the iterator early cancels the request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        request = self.submit(prompt, params, q.put)
        try:
            while not isinstance(item := q.get(), Finish):
                yield item
            if item.reason == "error":
                raise GenerationError(f"generation failed: {item.error}")
        finally:
            self.cancel(request)

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> tuple[list[int], Finish]:
        """All tokens and the Finish of one request (blocking)."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(prompt, params, q.put)
        tokens = []
        while not isinstance(item := q.get(), Finish):
            tokens.append(item)
        return tokens, item

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        # Grad mode is per thread: turn autograd off here, where the model runs.
        with torch.inference_mode():
            while self._iteration():
                pass
        with self._cond:  # closed: nobody is left waiting for an answer
            for r in [*self._waiting, *self._prefilling, *self._active]:
                self._finish(r, "cancelled")
            self._waiting.clear()
            self._active.clear()

    def _iteration(self) -> bool:
        """Admit, prefill, decode once. False when closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return False
            new = self._admit()
        try:
            if new:
                self._prefill(new)
            if self._active:
                self._decode()
        except Exception as e:  # a failed forward (out of memory, a bug) fails its requests, not the server
            log.exception("engine step failed")
            with self._cond:
                for r in [*self._prefilling, *self._active]:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self._prefilling, self._active = [], []
                self.cache.clear()
        return True

    def _admit(self) -> list[Request]:
        """Under the lock: waiting requests that fit in free rows and the prefill token budget (FIFO)."""
        new: list[Request] = []
        longest = 0
        while self._waiting and len(self._active) + len(new) < self.max_concurrency:
            r = self._waiting[0]
            if self.prefix_cache is not None:  # again at each try: a request just prefilled may match better
                r.reuse = self.prefix_cache.lookup(r.prompt)
            longest_if = max(longest, len(r.prompt) - r.reuse[1])
            if new and longest_if * (len(new) + 1) > self.max_prefill_tokens:  # left padding counts too
                break
            self._waiting.popleft()
            new.append(r)
            longest = longest_if
            r.admitted = True
            self._running_count += 1
        self._prefilling = new
        return new

    def _prefill(self, new: list[Request]) -> None:
        """Prefill the new requests together (each from the end of its reused prefix), store their prompts'
        keys for later requests, sample each one's first token and give it a row of the SlotCache."""
        now = time.perf_counter()
        for r in new:
            r.started = now
        reused = [r.reuse[1] for r in new]
        tokens, positions = left_pad([r.prompt[n:] for r, n in zip(new, reused)], self.device)
        positions = torch.where(positions >= 0, positions + torch.tensor(reused, device=self.device)[:, None], -1)
        store = self.prefix_cache
        cache = KVCache(self.config, len(new), max_len=max(reused) + tokens.shape[1], device=self.device,
                        dtype=self.cache_dtype, keep_history=store is not None)
        if store is not None and any(reused):
            store.seed(cache, [r.reuse for r in new])
        logits = prefill(self.model, tokens, positions, cache, self.prefill_chunk)  # (B, V)
        if store is not None:
            for i, r in enumerate(new):
                r.prompt_entry = store.entry_from_prefill(cache, i, r.prompt)
                store.store(r.prompt_entry)
        greedy = logits.argmax(-1).tolist()
        with self._cond:
            for i, r in enumerate(new):
                r.reuse = (None, r.reuse[1])  # the count stays for Finish; the entry may be evicted now
                if r.cancelled:
                    self._finish(r, "cancelled")
                    continue
                if r.params.max_tokens == 0:
                    self._finish(r, "length")
                    continue
                if self._step_row(r, logits[i], greedy[i]):
                    r.prompt_entry = None  # no answer to store with it
                    continue
                self.cache.insert(len(self._active), cache, i)
                self._active.append(r)
            self._prefilling = []  # only now: should anything above fail, the error path finishes them all

    def _decode(self) -> None:
        with self._cond:  # drop cancelled requests before paying for their step
            active = list(self._active)
            cancelled = [i for i, r in enumerate(active) if r.cancelled]
            for i in cancelled:
                self._finish(active[i], "cancelled")
        if cancelled:  # their keys are as good as a finished request's (a chat stops reading at its answer's end)
            active = self._retire(active, cancelled)
        if not active:
            return
        n = len(active)
        tokens = torch.tensor([[r.tokens[-1]] for r in active], device=self.device)  # (n, 1)
        positions = torch.tensor([[r.next_position] for r in active], device=self.device)  # (n, 1)
        self.cache.begin_step(int(positions.max()))
        # rows that are greedy or plain temperature sampling get their tokens from decode_step (bounds on the
        # logits, the unembedding read mostly as int8), the same tokens as from all logits
        logits, chosen = decode_step(self.model, tokens, positions, self.cache,
                                     [(r.params, r.generator) for r in active])
        greedy = chosen if logits is None else logits.argmax(-1).tolist()
        self.steps += 1
        self.max_batch = max(self.max_batch, n)
        with self._cond:
            done = [i for i, r in enumerate(active)
                    if self._step_row(r, None if logits is None else logits[i], greedy[i])]
        self._retire(active, done)

    def _retire(self, active: list[Request], rows: list[int]) -> list[Request]:
        """Finished requests in rows `rows` (ascending) of `active`: store them in the prefix cache, free their
        rows; returns the requests still active."""
        self._store_finished(active, rows)  # rows are still in place: only this thread moves them
        with self._cond:
            for i in reversed(rows):  # from the end, so earlier rows keep their index while we compact
                self._remove(i, None)
            return list(self._active)

    def _store_finished(self, active: list[Request], done: list[int]) -> None:
        """Finished conversations into the prefix cache: prompt + answer, less the last token (never fed, so
        it has no keys; a chat's next turn renders it as <|end|> anyway where the model wrote <|return|>)."""
        if self.prefix_cache is None:
            return
        for i in done:
            r = active[i]
            entry, r.prompt_entry = r.prompt_entry, None
            if entry is None or r.finish_reason == "error" or len(r.tokens) < 2:
                continue
            try:
                self.prefix_cache.store(self.prefix_cache.entry_from_slots(entry, self.cache, i,
                                                                           r.prompt + r.tokens[:-1]))
            except Exception:  # losing a cache entry costs a later prefill, never this request
                log.exception("storing request %s in the prefix cache failed", r.id)

    # ------------------------------------------------------------------ bookkeeping (under the lock)
    def _step_row(self, r: Request, logits: torch.Tensor | None, greedy: int) -> bool:
        """Sample row r's next token and emit it; True if the request is now finished. Whatever fails here
        (sampling, the stop rule, a bug) ends this request with an error, never its neighbours in the batch.
        A constrained request masks its own row of logits first (the batch's argmax is then not its own).
        logits None: `greedy` is the row's token already (decode_step chose it, sampled or greedy)."""
        try:
            if logits is None:
                return self._emit(r, greedy)
            if r.guide is not None:
                logits = r.guide.mask(logits.float())
                greedy = int(logits.argmax())
            token = greedy if r.generator is None else sample(logits, r.params, r.generator)
            if r.guide is not None:
                r.guide.advance(token)
            return self._emit(r, token)
        except Exception as e:
            log.exception("request %s failed", r.id)
            self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return True

    def _emit(self, r: Request, token: int) -> bool:
        """Hand a token to the request's outlet; True if the request is now finished."""
        r.tokens.append(token)
        r.token_times.append(time.perf_counter())
        self._send(r, token)
        if token in r.params.stop_tokens or (r.stop_rule is not None and r.stop_rule(r.tokens)):
            # an answer the constraint had to close early, near max_tokens, was cut: "length", as OpenAI
            self._finish(r, "length" if r.guide is not None and r.guide.cut else "stop")
        elif len(r.tokens) >= r.params.max_tokens or len(r.prompt) + len(r.tokens) >= self.max_context:
            self._finish(r, "length")
        elif r.cancelled:
            self._finish(r, "cancelled")
        return r.finished

    def _remove(self, i: int, reason: str | None) -> None:
        """Free row i: the last active row moves into it, so rows 0..n-1 stay the active ones."""
        r = self._active[i]
        if reason is not None:
            self._finish(r, reason)
        last = len(self._active) - 1
        if i != last:
            self.cache.move(last, i)
            self._active[i] = self._active[last]
        self._active.pop()

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished, r.finish_reason = True, reason
        if r.admitted:
            self._running_count -= 1
        now = time.perf_counter()
        first = r.first_token or now
        gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
        finish = Finish(reason, len(r.prompt), len(r.tokens), cached_tokens=r.reuse[1] if r.started else 0,
                        queued_s=(r.started or now) - r.submitted, ttft_s=first - r.submitted,
                        total_s=now - r.submitted, error=error,
                        step_median_s=statistics.median(gaps) if gaps else 0.0)
        self._send(r, finish)
        if self.on_finish is not None:
            try:
                self.on_finish(r, finish)
            except Exception:
                log.exception("on_finish failed for %s", r.id)

    def _send(self, r: Request, item: int | Finish) -> None:
        try:
            r.outlet(item)
        except Exception:  # a consumer that went away (its event loop closed) must not stop the engine
            log.debug("outlet of %s failed; cancelling it", r.id, exc_info=True)
            r.cancelled = True


class TokenStream:
    """A request's token ids as an async iterator, for asyncio servers; `finish` is set once it ends.

    Create it inside the event loop; the engine thread hands tokens over with call_soon_threadsafe.
    Call `cancel()` when the consumer stops early (a client disconnected)."""

    def __init__(self, engine: Engine, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None,
                 stop_rule: StopRule | None = None):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[int | Finish] = asyncio.Queue()
        self.engine = engine
        self.finish: Finish | None = None
        self.request = engine.submit(prompt, params, self._put, request_id, stop_rule)

    def _put(self, item: int | Finish) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        if self.finish is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Finish):
            self.finish = item
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        self.engine.cancel(self.request)
