"""Prefix caching: a prompt that starts with tokens whose keys the engine still holds prefills only the rest,
with the logits and tokens of a fresh prefill (fp32), across sliding-window boundaries; the cache stays
within its byte bound; and the engine's batched decode runs the fused kernels."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

import gptoss
from gptoss import kernels, synthetic
from gptoss.cache import KVCache, PrefixCache, common_prefix
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.generate import SamplingParams, generate_tokens, left_pad, prefill

CONFIG = preset("tiny")  # sliding window 8, layers alternate sliding / full
W = CONFIG.sliding_window


def make_model(dtype: torch.dtype) -> gptoss.Transformer:
    m = gptoss.Transformer(CONFIG, dtype=dtype)
    m.load_state_dict(dict(synthetic.random_tensors(CONFIG, seed=1, dtype=dtype)))
    return m


@pytest.fixture(scope="module")
def model():
    return make_model(torch.float32)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def fresh_logits(model, tokens: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits of a fresh prefill of `tokens`, then of decoding `steps` one by one (a plain KVCache)."""
    cache = KVCache(CONFIG, 1, dtype=torch.float32)
    out = [prefill(model, *left_pad([tokens], "cpu"), cache)]
    for i, t in enumerate(steps):
        out.append(model(torch.tensor([[t]]), torch.tensor([[len(tokens) + i]]), cache)[:, -1])
    return out


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0
    a = list(range(1000))
    assert common_prefix(a, a[:637] + [-1] + a[638:]) == 637


@pytest.mark.parametrize("shared", [3, W - 1, W, W + 1, 2 * W + 5, 29])
def test_reuse_equals_fresh_prefill(model, shared):
    """A stored 30-token prompt, then a prompt sharing its first `shared` tokens (below, at and past the
    window): the seeded prefill reuses exactly `shared` tokens and gives a fresh prefill's logits, and so do
    the decode steps after it."""
    first, new = prompt(30, 1), prompt(9, 2)
    store = PrefixCache(CONFIG, 2**30)
    cache = KVCache(CONFIG, 1, dtype=torch.float32, keep_history=True)
    prefill(model, *left_pad([first], "cpu"), cache)
    store.store(store.entry_from_prefill(cache, 0, first))
    second = first[:shared] + new
    entry, n = store.lookup(second)
    assert n == shared
    cache = KVCache(CONFIG, 1, dtype=torch.float32, keep_history=True)
    store.seed(cache, [(entry, n)])
    tokens, positions = left_pad([second[n:]], "cpu")
    reused = [prefill(model, tokens, positions + n, cache)]
    steps = prompt(2 * W, 3)
    for i, t in enumerate(steps):  # decode across two windows in the seeded cache
        reused.append(model(torch.tensor([[t]]), torch.tensor([[len(second) + i]]), cache)[:, -1])
    for a, b in zip(reused, fresh_logits(model, second, steps)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_a_finished_conversation_is_reusable_where_its_window_is_stored(model):
    """After prompt + answer, the stored entry gives every prompt position, and the end of the answer (the
    next chat turn), but not a point inside the answer whose window the decode ring has overwritten: there
    it falls back to the longest exact point (the prompt's end)."""
    p1 = prompt(20, 1)
    with Engine(model, max_concurrency=2) as engine:
        answer, finish = engine.generate(p1, greedy(3 * W))
        assert finish.cached_tokens == 0
        turn2 = p1 + answer[:-1] + prompt(7, 2)  # the answer's last token was never fed: it has no keys
        tokens, finish = engine.generate(turn2, greedy(12))
        assert finish.cached_tokens == len(p1) + len(answer) - 1
        assert tokens == generate_tokens(model, turn2, greedy(12))
        inside = p1 + answer[:5] + prompt(5, 3)
        tokens, finish = engine.generate(inside, greedy(12))
        assert finish.cached_tokens == len(p1)
        assert tokens == generate_tokens(model, inside, greedy(12))


def test_shared_system_prompt_and_concurrent_requests(model):
    """Requests sharing a 25-token prefix, in flight together with unrelated ones: each reuses exactly the
    shared part once it is stored, and every request's tokens equal a solo run."""
    system = prompt(25, 7)
    specs = [(system + prompt(4 + i, 10 + i), 6 + i) for i in range(5)] + [(prompt(11, 40 + i), 5) for i in range(3)]
    solo = [generate_tokens(model, p, greedy(m)) for p, m in specs]
    with Engine(model, max_concurrency=3) as engine:
        _, first = engine.generate(*specs[0][:1], greedy(specs[0][1]))
        results = [None] * len(specs)

        def run(i):
            results[i] = engine.generate(specs[i][0], greedy(specs[i][1]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert first.cached_tokens == 0
    for i in range(1, len(specs)):
        tokens, finish = results[i]
        assert tokens == solo[i], f"request {i}"
        assert finish.cached_tokens == (len(system) if i < 5 else 0), f"request {i}"


def test_eviction_keeps_the_byte_bound(model):
    """Entries beyond the budget go least recently used first; one larger than the whole budget is not kept."""
    prompts = [prompt(16, 100 + i) for i in range(4)]
    entries = []
    for p in prompts:
        cache = KVCache(CONFIG, 1, dtype=torch.float32, keep_history=True)
        prefill(model, *left_pad([p], "cpu"), cache)
        entries.append(PrefixCache(CONFIG, 1).entry_from_prefill(cache, 0, p))
    size = entries[0].nbytes
    store = PrefixCache(CONFIG, int(2.5 * size))
    store.store(entries[0])
    store.store(entries[1])
    assert store.lookup(prompts[0] + [1])[1] == 16  # entry 0 is now the most recently used
    store.store(entries[2])  # over budget: entry 1 goes
    assert store.nbytes <= store.max_bytes and len(store) == 2
    assert store.lookup(prompts[1] + [1]) == (None, 0)
    assert store.lookup(prompts[0] + [1])[1] == 16 and store.lookup(prompts[2] + [1])[1] == 16
    tiny = PrefixCache(CONFIG, size - 1)
    tiny.store(entries[3])
    assert len(tiny) == 0 and tiny.nbytes == 0
    with Engine(model, max_concurrency=2, prefix_cache_bytes=int(1.5 * size)) as engine:
        for p in prompts:
            engine.generate(p, greedy(4))
            assert engine.prefix_cache.nbytes <= int(1.5 * size)
        assert len(engine.prefix_cache) == 1


def test_prefix_cache_off(model):
    p = prompt(20, 1)
    with Engine(model, prefix_cache_bytes=0) as engine:
        engine.generate(p, greedy(4))
        _, finish = engine.generate(p + [5, 6], greedy(4))
    assert engine.prefix_cache is None and finish.cached_tokens == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_engine_decode_runs_the_fused_kernels(monkeypatch, dtype):
    """Every decode step of the engine's batched SlotCache (1 to 3 rows of different ages) takes the fused
    kernels: the whole block in bf16, the attention kernel in fp32 (whose weights the block kernel does not
    read); the tokens equal solo runs. Fails if the engine falls back to the torch attention."""
    if not kernels.kernels_available():
        pytest.skip("the compiled kernels are not available here")
    model = make_model(dtype)
    specs = [(prompt(5 + 7 * i, i), 10 + 6 * i) for i in range(3)]
    solo = [generate_tokens(model, p, greedy(m)) for p, m in specs]
    calls = {"block": 0, "attention": 0}

    def counted(real, key):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            calls[key] += out is not None
            return out
        return call

    monkeypatch.setattr(kernels, "decode_attention_block", counted(kernels.decode_attention_block, "block"))
    monkeypatch.setattr(kernels, "decode_attention", counted(kernels.decode_attention, "attention"))
    with Engine(model, max_concurrency=3, prefix_cache_bytes=0) as engine:
        outs = [queue.SimpleQueue() for _ in specs]
        for (p, m), q in zip(specs, outs):
            engine.submit(p, greedy(m), q.put)
        results = []
        for q in outs:
            tokens = []
            while isinstance(item := q.get(timeout=60), int):
                tokens.append(item)
            results.append(tokens)
    steps = engine.steps
    assert engine.max_batch == 3 and steps > 0
    expected = steps * CONFIG.num_hidden_layers
    assert calls == ({"block": expected, "attention": 0} if dtype == torch.bfloat16
                     else {"block": 0, "attention": expected})
    if dtype == torch.float32:  # bf16: a different batch size may round a near-tie the other way
        assert results == solo


def test_chat_turns_reuse_the_conversation():
    """`gptoss chat`'s completer (the demo model in fp32, greedy, a tool declared): from the second turn on
    the prompt's start comes from the prefix cache (the previous prompt, and the previous answer where no
    analysis was dropped), and every turn's answer equals the one computed without the prefix cache."""
    from gptoss.chat import ChatSession, model_completer
    from gptoss.loading import load_model
    from gptoss.tools import BUILTIN_TOOLS

    demo = load_model(None, device="cpu", dtype="float32", progress=False)
    questions = ["What is 4821 + 937?", "What is 7305 - 4868?", "What is the capital of Germany?",
                 "Calculate 82666 x 74", "What is 12 + 7?"]

    prompts: list[list[int]] = []

    def converse(cache_bytes: int) -> tuple[list[list[tuple[str, str]]], list[tuple[int, int]]]:
        prefills = []
        prompts.clear()
        with model_completer(demo, cache_bytes) as complete:
            engine = complete.__self__
            real_prefill = engine._prefill

            def spy(new):
                prefills.extend((len(r.prompt), r.reuse[1]) for r in new)
                prompts.extend(list(r.prompt) for r in new)
                return real_prefill(new)

            engine._prefill = spy
            session = ChatSession(complete, SamplingParams(temperature=0, max_tokens=400),
                                  tools=[BUILTIN_TOOLS["calculator"]], reasoning_effort="high")
            turns = [[(e.kind, e.text) for e in session.send(q)] for q in questions]
        return turns, prefills

    cached, reused = converse(2**30)
    cached_prompts = list(prompts)
    fresh, not_reused = converse(0)
    assert cached == fresh
    assert all(n == 0 for _, n in not_reused) and reused[0][1] == 0
    # Every later model call (a turn, or the call after a tool result) reuses at least the first prompt
    # (system, developer with the tool, first question); where Harmony dropped an earlier analysis message
    # the renders differ from there on, so that is all some turns can reuse.
    assert all(n >= reused[0][0] for _, n in reused[1:]), reused
    # and never less than the longest start it shares with an earlier prompt (all of them are stored; stored
    # answers can add more): the reuse is found by comparing token ids, whatever the model wrote
    for i, (_, n) in enumerate(reused[1:], 1):
        shared = max(common_prefix(cached_prompts[j], cached_prompts[i]) for j in range(i))
        assert n >= min(shared, len(cached_prompts[i]) - 1), (i, n, shared)


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_server_turns_reuse_the_conversation(endpoint):
    """Through the real server and the official client (the demo model in fp32, greedy): a conversation's
    next turn — Chat Completions with the history resent, Responses with previous_response_id — reports the
    reused prompt tokens in usage and answers exactly as a server without the prefix cache."""
    import openai

    from gptoss.loading import load_model
    from gptoss.server import create_app, serve_in_thread

    demo = load_model(None, device="cpu", dtype="float32", progress=False)
    questions = ["What is 4821 + 937?", "What is 7305 - 4868?", "What is 12 + 7?"]

    def converse(cache_bytes: int) -> list[tuple[str, int, int]]:
        out = []
        with Engine(demo, prefix_cache_bytes=cache_bytes) as engine, \
                serve_in_thread(create_app(engine, "demo")) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            messages, previous = [], None
            for q in questions:
                if endpoint == "chat":
                    messages.append({"role": "user", "content": q})
                    r = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=300)
                    text = r.choices[0].message.content
                    messages.append({"role": "assistant", "content": text})
                    usage = (r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens)
                else:
                    r = client.responses.create(model="demo", input=q, previous_response_id=previous,
                                                temperature=0, max_output_tokens=300)
                    text, previous = r.output_text, r.id
                    usage = (r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens)
                out.append((text, *usage))
        return out

    cached, fresh = converse(2**30), converse(0)
    assert [t for t, _, _ in cached] == [t for t, _, _ in fresh]
    assert [p for _, p, _ in cached] == [p for _, p, _ in fresh]
    assert all(c == 0 for _, _, c in fresh) and cached[0][2] == 0
    for (_, previous_prompt, _), (_, prompt, reused) in zip(cached, cached[1:]):
        assert previous_prompt <= reused < prompt  # at least the previous turn's whole prompt
