"""Decoding through model.BoundedArgmax: int8 proxy logits, a bound per vocabulary row, and the exact logits of the
candidates only. The token must be the full logits' argmax in every case, ties and near-ties included, and with
temperature the token generate.sample draws from all logits with the same Gumbel noise; generate() and the engine
must give the same tokens with it as without, and actually take it. The Gumbel-max sampler itself must draw
from softmax(logits / temperature)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import gptoss
from gptoss import kernels, synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.generate import SamplingParams, generate_tokens, gumbel_noise, sample
from gptoss.loading import load_model
from gptoss.model import BoundedArgmax, Int8Linear, Linear

needs_kernels = pytest.mark.skipif(kernels.load_kernels() is None, reason="the compiled CPU kernels did not build")


def unembedding(V: int = 5000, D: int = 256, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(D, V, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    lin.requires_grad_(False)
    return lin


def full_argmax(lin: Linear, h: torch.Tensor) -> torch.Tensor:
    return lin(h).float().argmax(-1)  # what Transformer.forward's logits give


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_the_token_is_the_full_argmax(rows):
    lin = unembedding()
    bounded = BoundedArgmax(lin)
    used = 0
    for seed in range(40):
        h = (torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed)) * (1 + seed % 5)).bfloat16()
        got = bounded(h, lin)
        if got is not None:
            used += 1
            assert torch.equal(got, full_argmax(lin, h)), seed
    assert used >= 30  # the fast path, not the fallback, was what got checked


@needs_kernels
def test_ties_and_near_ties_pick_what_argmax_picks():
    """Rows equal to the winner (an exact tie: the first index wins), and rows one bf16 step away from it, in
    every order: the candidates must hold all of them and their exact logits decide."""
    lin = unembedding(V=3000)
    h = torch.randn(1, 256, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        top = int(full_argmax(lin, h))
        w = lin.weight[top].clone()
        lin.weight[100] = w  # an exact tie before the winner: argmax takes 100
        lin.weight[2900] = w  # and one after it
        j = int(((h[0].float() * w.float()) > 0).nonzero()[0])  # a weight whose growth raises the logit
        up, down = w.clone(), w.clone()
        up.view(torch.int16)[j] += 1  # one bf16 step away from zero: up slightly above the winner's logit
        down.view(torch.int16)[j] -= 1
        lin.weight[50], lin.weight[60] = up, down  # near-ties, maybe equal once rounded to bf16
    bounded = BoundedArgmax(lin)
    got = bounded(h, lin)
    assert got is not None and torch.equal(got, full_argmax(lin, h))
    scores = lin(h).float()[0]
    assert scores[100] == scores[2900] == scores[top]
    assert int(got) == min(i for i in (50, 60, 100, top, 2900) if scores[i] == scores.max())


@needs_kernels
def test_many_candidates_or_non_finite_states_fall_back():
    """Rows so alike that the bound admits most of the vocabulary, or a hidden state with an inf, give None
    (the caller computes the full logits); Transformer.greedy_tokens still returns the full argmax."""
    lin = unembedding(V=2000)
    with torch.no_grad():  # every row the same up to noise far below int8's step
        lin.weight.copy_(lin.weight[:1].float() * (1 + 1e-3 * torch.randn(2000, 256)))
    bounded = BoundedArgmax(lin)
    h = torch.randn(1, 256).bfloat16()
    assert bounded(h, lin) is None
    model = gptoss.Transformer(preset("tiny"), dtype=torch.bfloat16)
    model.unembedding = Linear(256, 2000, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        model.unembedding.weight.copy_(lin.weight)
    assert model.enable_bounded_argmax() and torch.equal(model.greedy_tokens(h), full_argmax(lin, h))
    lin = unembedding(V=2000)
    bounded = BoundedArgmax(lin)
    bad = torch.randn(1, 256).bfloat16()
    bad[0, 3] = float("inf")
    assert bounded(bad, lin) is None
    assert bounded(torch.randn(5, 256).bfloat16(), lin) is None  # more rows than the streaming kernel takes


@needs_kernels
def test_proxy_rows_are_the_int8_unembeddings():
    """The C++ quantization (one pass) gives Int8Linear.from_linear's rows and scales, bit for bit."""
    lin = unembedding(V=3000, D=2880)
    bounded, reference = BoundedArgmax(lin), Int8Linear.from_linear(lin)
    assert torch.equal(bounded.weight_int8, reference.weight_int8) and torch.equal(bounded.scale, reference.scale)
    err = (lin.weight.float() - reference.weight_int8.float() * reference.scale[:, None]).norm(dim=1)
    assert torch.all(bounded.row_bound >= err)


def test_only_bf16_unembeddings_on_the_cpu():
    lin = Linear(16, 100, bias=False)  # fp32
    with pytest.raises(ValueError, match="bf16"):
        BoundedArgmax(lin)
    m = gptoss.Transformer(preset("tiny"), dtype=torch.float32)
    assert m.enable_bounded_argmax() is False and m.bounded_argmax is None


def bf16_model() -> gptoss.Transformer:
    config = preset("tiny")
    m = gptoss.Transformer(config, dtype=torch.bfloat16)
    m.load_state_dict(dict(synthetic.random_tensors(config, seed=3, dtype=torch.bfloat16)))
    return m.requires_grad_(False)


def count_fast_path(monkeypatch) -> list[int]:
    hits = [0]
    forward = BoundedArgmax.forward

    def counted(self, *args):
        out = forward(self, *args)
        hits[0] += out is not None
        return out

    monkeypatch.setattr(BoundedArgmax, "forward", counted)
    return hits


@needs_kernels
def test_generate_and_the_engine_give_the_same_tokens_with_it(monkeypatch):
    hits = count_fast_path(monkeypatch)
    model = bf16_model()
    prompts = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 14)]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    plain = [generate_tokens(model, p, greedy) for p in prompts]
    model.bounded_argmax_wanted = True
    assert [generate_tokens(model, p, greedy) for p in prompts] == plain
    assert hits[0] >= 3 * 11  # every decode step after the first token (which comes from the prefill's logits)
    before = hits[0]
    with Engine(model, max_concurrency=3) as engine, ThreadPoolExecutor(3) as pool:  # three rows per step
        engine.start()
        got = list(pool.map(lambda p: engine.generate(p, greedy)[0], prompts))
    assert got == plain
    assert hits[0] > before
    # a constrained-like request that needs its logits (top-k): no fast path, the same tokens as generate()
    before = hits[0]
    top_k = SamplingParams(temperature=1.0, top_k=5, max_tokens=12, seed=0)
    with Engine(model, max_concurrency=3) as engine:
        engine.start()
        assert generate_tokens(model, prompts[0], top_k) == engine.generate(prompts[0], top_k)[0]
    assert hits[0] == before


def test_load_model_turns_it_on_for_cpu_bf16_and_off_when_asked(tmp_path):
    config = preset("tiny")
    write_checkpoint(synthetic.random_tensors(config), config, tmp_path, "hf")
    on = load_model(tmp_path, progress=False, device="cpu", bounded_argmax=True)
    assert on.bounded_argmax_wanted is True and on.bounded_argmax is not None  # built at load, not in a request
    # by default only where the unembedding is large enough to pay (gpt-oss's: 1.16 GB; this one 64 KiB)
    assert load_model(tmp_path, progress=False, device="cpu").bounded_argmax_wanted is False
    assert load_model(tmp_path, progress=False, device="cpu", bounded_argmax=False).bounded_argmax_wanted is False
    assert load_model(tmp_path, progress=False, device="cpu", dtype="float32",
                      bounded_argmax=True).bounded_argmax_wanted is False
    # the demo model reads a vocabulary subset (its own argmax order): not taken there
    assert not getattr(load_model(None, progress=False, device="cpu"), "bounded_argmax_wanted", False)


@needs_kernels
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_sampled_tokens_are_what_sample_draws_from_all_logits(temperature):
    """Rows mixing greedy and temperature sampling: BoundedArgmax with the rows' Gumbel noise gives, row by row,
    the token generate.sample draws from the full logits with a generator in the same state."""
    lin = unembedding(V=4000)
    bounded = BoundedArgmax(lin)
    params = SamplingParams(temperature=temperature)
    for seed in range(30):
        h = torch.randn(3, 256, generator=torch.Generator().manual_seed(100 + seed)).bfloat16()
        temps = [temperature, 0.0, temperature]
        noise = torch.stack([gumbel_noise(4000, torch.Generator().manual_seed(seed)), torch.zeros(4000),
                             gumbel_noise(4000, torch.Generator().manual_seed(seed + 1))])
        got = bounded(h, lin, temps, noise)
        assert got is not None
        logits = lin(h).float()
        want = [sample(logits[0], params, torch.Generator().manual_seed(seed)), int(logits[1].argmax()),
                sample(logits[2], params, torch.Generator().manual_seed(seed + 1))]
        assert got.tolist() == want, seed


def test_gumbel_max_draws_from_the_softmax():
    """generate.sample at temperature 2 on fixed logits: 20,000 draws against softmax(logits / 2), Pearson's
    chi-square (fixed seed: the test is deterministic; p is far from any threshold)."""
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits.double() / 2, dim=0)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(temperature=2.0), g) for _ in range(20000)]),
                            minlength=6)
    expected = probs.double() / probs.double().sum() * 20000
    assert chisquare(counts.double().numpy(), expected.numpy()).pvalue > 0.01
    top_k = [sample(logits, SamplingParams(temperature=2.0, top_k=2), g) for _ in range(2000)]
    assert set(top_k) == {0, 1}  # top-k still keeps only the k best


@needs_kernels
def test_temperature_sampling_in_generate_and_the_engine_takes_it(monkeypatch):
    """Seeded temperature sampling: the same tokens with BoundedArgmax as from all logits, in generate() and
    in the engine's batch; top-p and top-k rows keep the full logits (the bounded path is not taken)."""
    hits = count_fast_path(monkeypatch)
    model = bf16_model()
    prompts = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 11)]
    sampled = SamplingParams(temperature=0.8, max_tokens=10, seed=5)
    plain = [generate_tokens(model, p, sampled) for p in prompts]
    model.bounded_argmax_wanted = True
    assert [generate_tokens(model, p, sampled) for p in prompts] == plain
    assert hits[0] >= 2 * 9
    before = hits[0]
    greedy = SamplingParams(temperature=0, max_tokens=10)
    with Engine(model, max_concurrency=2) as engine, ThreadPoolExecutor(2) as pool:  # sampled + greedy rows
        engine.start()
        got = list(pool.map(lambda a: engine.generate(*a)[0], [(prompts[0], sampled), (prompts[1], greedy)]))
    assert got[0] == plain[0] and got[1] == generate_tokens(model, prompts[1], greedy)
    assert hits[0] > before
    before = hits[0]
    nucleus = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=5)
    generate_tokens(model, prompts[0], nucleus)
    assert hits[0] == before
