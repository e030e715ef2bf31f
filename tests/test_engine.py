"""The continuous-batching engine: every request's tokens equal a solo `generate_tokens` run, whatever it is
batched with, however requests arrive, finish, wait or get cancelled; the slot cache equals a KVCache."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

import gptoss
from gptoss import synthetic
from gptoss.cache import KVCache, SlotCache
from gptoss.config import preset
from gptoss.engine import ContextLengthError, Engine, EngineBusy, Finish
from gptoss.generate import SamplingParams, generate_tokens, left_pad, prefill

CONFIG = preset("tiny")  # sliding window 8: prompts and answers below wrap the ring several times


@pytest.fixture(scope="module")
def model():
    m = gptoss.Transformer(CONFIG, dtype=torch.float32)
    m.load_state_dict(dict(synthetic.random_tensors(CONFIG, seed=1, dtype=torch.float32)))
    return m


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


class Collector:
    """An outlet that records tokens and the Finish; `on_token` runs on the engine thread."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.finish: Finish | None = None
        self.done = threading.Event()
        self.on_token = on_token

    def __call__(self, item) -> None:
        if isinstance(item, Finish):
            self.finish = item
            self.done.set()
        else:
            self.tokens.append(item)
            if self.on_token:
                self.on_token(len(self.tokens))


def test_slot_cache_decode_equals_kv_cache(model):
    """Rows of different ages in one SlotCache give the logits each row gets alone in a KVCache."""
    prompts = [prompt(n, n) for n in (3, 11, 20)]
    slot = SlotCache(CONFIG, 4, 256, dtype=torch.float32)
    solo = []
    for row, p in enumerate(prompts):
        cache = KVCache(CONFIG, 1, dtype=torch.float32)
        tokens, positions = left_pad([p], "cpu")
        prefill(model, tokens, positions, cache)
        slot.insert(row, cache, 0)
        solo.append(cache)
    for step in range(2 * CONFIG.sliding_window + 3):  # past two ring wraps
        next_tokens = torch.tensor([[(7 * step + r) % CONFIG.vocab_size] for r in range(3)])
        pos = torch.tensor([[len(p) + step] for p in prompts])
        slot.begin_step(int(pos.max()))
        batched = model(next_tokens, pos, slot)
        alone = torch.cat([model(next_tokens[r:r + 1], pos[r:r + 1], solo[r]) for r in range(3)])
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_slot_cache_reused_row_forgets_its_previous_request(model):
    slot = SlotCache(CONFIG, 2, 256, dtype=torch.float32)
    long, short = prompt(30, 1), prompt(4, 2)
    for row, p in ((0, long), (1, long), (0, short)):  # row 0: a long request, then a short one
        cache = KVCache(CONFIG, 1, dtype=torch.float32)
        prefill(model, *left_pad([p], "cpu"), cache)
        slot.insert(row, cache, 0)
    for layer in slot.layers:
        assert sorted(p for p in layer.pos[0].tolist() if p >= 0) == [0, 1, 2, 3]
    slot.move(1, 0)  # compaction: the last row's request moves into the freed row
    assert all((layer.pos[1] == -1).all() for layer in slot.layers)
    assert sorted(p for p in slot.layers[1].pos[0].tolist() if p >= 0) == list(range(30))  # a full layer


def test_concurrent_requests_equal_solo_generation(model):
    """14 requests through 4 rows: they queue, arrive mid-flight (submitted from another request's outlet),
    finish at different steps (rows compacted), with prompts and answers longer than the window."""
    specs = [(prompt(3 + 5 * i % 37, i), 4 + (7 * i) % 23) for i in range(14)]
    solo = [generate_tokens(model, p, greedy(m)) for p, m in specs]
    with Engine(model, max_concurrency=4, max_queue=32) as engine:
        out = [Collector() for _ in specs]
        late = list(range(10, 14))

        def submit_late(n_tokens: int) -> None:  # runs on the engine thread, mid-step
            if n_tokens in (2, 5, 9, 12) and late:
                i = late.pop(0)
                engine.submit(specs[i][0], greedy(specs[i][1]), out[i])

        out[3].on_token = submit_late  # request 3 generates 25 tokens
        for i in range(10):
            engine.submit(specs[i][0], greedy(specs[i][1]), out[i])
        for c in out:
            assert c.done.wait(60)
        assert not late
        for i, c in enumerate(out):
            assert c.tokens == solo[i], f"request {i}"
            assert (c.finish.reason, c.finish.prompt_tokens, c.finish.completion_tokens) == \
                ("length", len(specs[i][0]), specs[i][1])
        assert engine.max_batch == 4  # batching happened, and never beyond max_concurrency
        assert engine.load == (0, 0)


def test_seeded_sampling_equals_generate(model):
    p = prompt(12, 5)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=1234)
    with Engine(model, max_concurrency=3) as engine:
        results = [engine.generate(p, params) for _ in range(2)]
        others = [Collector() for _ in range(2)]
        for c in others:  # the same request batched with unrelated sampled ones
            engine.submit(prompt(9, 6), SamplingParams(temperature=1.0, max_tokens=20), c)
        batched = engine.generate(p, params)
        for c in others:
            c.done.wait(30)
    expected = generate_tokens(model, p, params)
    assert [r[0] for r in results] == [expected, expected] and batched[0] == expected


def test_stop_token_ends_a_request_and_is_included(model):
    p = prompt(10, 7)
    solo = generate_tokens(model, p, greedy(30))
    stop = solo[6]
    first = solo.index(stop)
    with Engine(model) as engine:
        tokens, finish = engine.generate(p, greedy(30, stop_tokens=(stop,)))
    assert tokens == solo[:first + 1] and finish.reason == "stop"


def test_cancel_running_and_waiting_requests(model):
    with Engine(model, max_concurrency=1, max_queue=4) as engine:
        started = threading.Event()
        running = Collector(on_token=lambda n: started.set())
        r1 = engine.submit(prompt(5, 1), greedy(500), running)
        waiting = Collector()
        r2 = engine.submit(prompt(5, 2), greedy(5), waiting)
        assert started.wait(30)
        engine.cancel(r2)  # still queued behind r1: finishes at once, never generates
        assert waiting.done.wait(5) and waiting.finish.reason == "cancelled" and waiting.tokens == []
        engine.cancel(r1)
        assert running.done.wait(30) and running.finish.reason == "cancelled"
        assert 0 < len(running.tokens) < 500
        tokens, finish = engine.generate(prompt(6, 3), greedy(4))  # the engine carries on
        assert finish.reason == "length" and tokens == generate_tokens(model, prompt(6, 3), greedy(4))
        engine.cancel(r1)  # cancelling a finished request is a no-op


def test_closing_an_iterator_cancels_its_request(model):
    with Engine(model, max_concurrency=2) as engine:
        it = engine.complete(prompt(5, 1), greedy(1000))
        first = [next(it) for _ in range(3)]
        it.close()
        assert first == generate_tokens(model, prompt(5, 1), greedy(3))
        for _ in range(100):
            if engine.load == (0, 0):
                break
            threading.Event().wait(0.05)
        assert engine.load == (0, 0)


def test_busy_and_context_errors_are_raised_at_submit(model):
    with Engine(model, max_concurrency=1, max_queue=1, max_context=64) as engine:
        with pytest.raises(ContextLengthError, match="context limit is 64 tokens, but 70 were requested"):
            engine.submit(prompt(40, 1), greedy(30), Collector())
        with pytest.raises(ValueError, match="temperature"):
            engine.submit(prompt(4, 1), SamplingParams(temperature=-1), Collector())
        started = threading.Event()
        a = Collector(on_token=lambda n: started.set())
        ra = engine.submit(prompt(4, 1), greedy(60), a)
        assert started.wait(30)
        rb = engine.submit(prompt(4, 2), greedy(5), Collector())  # the one queue place
        with pytest.raises(EngineBusy, match="max_concurrency 1, max_queue 1"):
            engine.submit(prompt(4, 3), greedy(5), Collector())
        engine.cancel(ra), engine.cancel(rb)


def test_a_failing_step_fails_its_requests_not_the_engine(model, monkeypatch):
    with Engine(model, max_concurrency=2) as engine:
        original = model.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated out of memory")
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", flaky)
        tokens, finish = engine.generate(prompt(5, 1), greedy(10))
        assert finish.reason == "error" and "simulated out of memory" in finish.error
        monkeypatch.setattr(model, "forward", original)
        assert engine.generate(prompt(5, 1), greedy(10))[0] == generate_tokens(model, prompt(5, 1), greedy(10))


def test_one_failing_row_ends_only_its_request(model, monkeypatch):
    """Nine requests stream together; one fails while sampling (an injected error, as an inf/NaN row would),
    another in its stop rule: those two end with an error, the seven others finish with their solo answers."""
    import gptoss.engine as engine_module

    specs = [(prompt(4 + 3 * i, 50 + i), 12) for i in range(9)]
    solo = [generate_tokens(model, p, greedy(m)) for p, m in specs]
    poisoned = SamplingParams(temperature=0.5, max_tokens=12, seed=1)  # sampled, so it reaches sample()
    real_sample = engine_module.sample

    def sample(logits, params, generator=None):
        if params is poisoned:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)

    def bad_rule(tokens: list[int]) -> bool:
        if len(tokens) == 3:
            raise ValueError("stop rule failed")
        return False

    outs = [Collector() for _ in specs]
    with Engine(model, max_concurrency=9) as engine:
        for i, ((p, m), out) in enumerate(zip(specs, outs)):
            engine.submit(p, poisoned if i == 2 else greedy(m), out, stop_rule=bad_rule if i == 6 else None)
        for out in outs:
            assert out.done.wait(60)
        assert engine.max_batch >= 7 and engine.load == (0, 0)
        assert engine.generate(specs[0][0], greedy(specs[0][1]))[0] == solo[0]  # and the engine carries on
    for i, out in enumerate(outs):
        if i == 2:
            assert out.finish.reason == "error" and "inf, nan" in out.finish.error and out.tokens == []
        elif i == 6:
            assert out.finish.reason == "error" and "stop rule failed" in out.finish.error
            assert out.tokens == solo[6][:3]
        else:
            assert (out.finish.reason, out.tokens) == ("length", solo[i]), f"request {i}"


def test_close_cancels_what_is_left(model):
    engine = Engine(model, max_concurrency=1, max_queue=2).start()
    q: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(prompt(4, 1), greedy(2000), q.put)
    engine.submit(prompt(4, 2), greedy(5), q.put)
    q.get(timeout=30)  # the first is generating
    engine.close()
    items = []
    while not q.empty():
        items.append(q.get())
    finishes = [i for i in items if isinstance(i, Finish)]
    assert sorted(f.reason for f in finishes) == ["cancelled", "cancelled"]


def test_finish_reports_the_decode_pace(model):
    """Finish.step_median_s is the median gap between consecutive tokens (what bench_decode reports), within
    the decode's span; 0 for a one-token answer."""
    with Engine(model) as engine:
        tokens, finish = engine.generate(prompt(12, 40), greedy(9))
        _, one = engine.generate(prompt(12, 41), greedy(1))
    assert len(tokens) == 9 and finish.completion_tokens == 9
    span = finish.total_s - finish.ttft_s
    assert 0 < finish.step_median_s <= span
    assert finish.decode_tok_s >= 8 / span * 0.999
    assert one.step_median_s == 0.0
