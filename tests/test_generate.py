"""KV cache and generation: cached == uncached, greedy == transformers' generate, batched == one at a time."""

from __future__ import annotations

import pytest
import torch

import gptoss
from gptoss.cache import KVCache
from gptoss.config import ModelConfig
from gptoss.generate import SamplingParams, generate, generate_tokens, left_pad, sample
from hf_reference import make_reference

CONFIG = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_experts=8, experts_per_token=2, intermediate_size=64,
                     sliding_window=8, initial_context_length=64, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf = make_reference(CONFIG, path, seed=3)
    return path, hf


@pytest.fixture(scope="module")
def model(checkpoint):
    return gptoss.load(checkpoint[0], dtype=torch.float32)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prompt_len", [1, 7, 8, 13, 30])
def test_cached_decoding_equals_full_recompute(model, prompt_len):
    """Decode 3+ windows past the prompt, one token at a time, against recomputing the whole sequence."""
    seq = torch.tensor([random_prompt(prompt_len + 3 * CONFIG.sliding_window + 3, prompt_len)])
    full = model(seq)
    cache = KVCache(CONFIG, 1, device="cpu", dtype=torch.float32, initial_capacity=4)  # forces buffer growth
    pos = torch.arange(seq.shape[1])[None]
    step_logits = [model(seq[:, :prompt_len], pos[:, :prompt_len], cache)]
    for t in range(prompt_len, seq.shape[1]):
        step_logits.append(model(seq[:, t:t + 1], pos[:, t:t + 1], cache))
    cached = torch.cat(step_logits, dim=1)
    assert (cached - full).abs().max() <= 1e-4 * full.abs().max()


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("chunk", [6, 20], ids=["chunk<window", "chunk>window"])
def test_chunked_prefill_equals_one_pass(model, chunk, grad):
    """With autograd on, attention materializes its scores; in inference (generate) it is the flash path."""
    seq = torch.tensor([random_prompt(50, 1)])
    pos = torch.arange(50)[None]
    cache = KVCache(CONFIG, 1, dtype=torch.float32)
    with torch.set_grad_enabled(grad):
        chunks = [model(seq[:, s:s + chunk], pos[:, s:s + chunk], cache) for s in range(0, 50, chunk)]
        one_pass = model(seq)
    torch.testing.assert_close(torch.cat(chunks, 1), one_pass, rtol=0, atol=1e-4)
    ring = cache.layer(0)
    assert ring.k.shape[1] == CONFIG.sliding_window  # the ring holds exactly the window
    assert sorted(ring.pos[0].tolist()) == list(range(50 - CONFIG.sliding_window, 50))


def test_greedy_matches_transformers_generate(checkpoint, model):
    _, hf = checkpoint
    for n, seed in ((5, 11), (12, 12)):
        prompt = random_prompt(n, seed)
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                             pad_token_id=0, eos_token_id=None)[0, n:].tolist()
        ours = generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=40))
        assert ours == theirs


def test_batched_equals_one_at_a_time(model):
    prompts = [random_prompt(n, 100 + n) for n in (3, 17, 9, 1)]
    for params in (SamplingParams(temperature=0, max_tokens=25),
                   SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=25, seed=5)):
        batched: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        for row, token in generate(model, prompts, params):
            batched[row].append(token)
        for i, prompt in enumerate(prompts):
            single_params = SamplingParams(**{**params.__dict__, "seed": None if params.seed is None
                                              else params.seed + i})
            assert generate_tokens(model, prompt, single_params) == batched[i], i


def test_padding_does_not_leak_into_logits(model):
    short, long = random_prompt(4, 1), random_prompt(20, 2)
    tokens, positions = left_pad([short, long], "cpu")
    batched = model(tokens, positions)[0, -1]
    alone = model(torch.tensor([short]))[0, -1]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_stop_tokens_and_seed(model):
    prompt = random_prompt(6, 3)
    free = generate_tokens(model, prompt, SamplingParams(temperature=1.0, max_tokens=30, seed=1))
    assert len(free) == 30
    assert free == generate_tokens(model, prompt, SamplingParams(temperature=1.0, max_tokens=30, seed=1))
    assert free != generate_tokens(model, prompt, SamplingParams(temperature=1.0, max_tokens=30, seed=2))
    stop = free[10]
    stopped = generate_tokens(model, prompt, SamplingParams(temperature=1.0, max_tokens=30, seed=1,
                                                            stop_tokens=[stop]))
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_filters():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(top_k=2), g) for _ in range(300)}
    assert draws == {0, 1}
    p = torch.softmax(logits, -1)  # p ≈ [.66, .24, .09, ...]: top_p .8 keeps exactly the first two
    assert p[0] < 0.8 < p[0] + p[1]
    draws = {sample(logits, SamplingParams(top_p=0.8), g) for _ in range(300)}
    assert draws == {0, 1}
    assert sample(logits, SamplingParams(temperature=0)) == 0
    draws = [sample(logits, SamplingParams(temperature=1.0), g) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 4000
    assert (freq - p).abs().max() < 0.03


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_tokens=-2)])
def test_bad_sampling_params(model, bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        generate_tokens(model, [1, 2], SamplingParams(**bad))


def test_context_limit(model):
    with pytest.raises(ValueError, match="exceeds the context limit of 4096"):
        generate_tokens(model, [1] * 4000, SamplingParams(max_tokens=200))
