"""Experts streamed from disk (gptoss/streaming.py): the same logits and tokens as the model in memory, on every
path (decode, short and long prompts, batched engine decode, pools smaller than a layer), anonymous memory
bounded by the budget, and the memory plan's decisions and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptoss import model as model_module
from gptoss import synthetic
from gptoss.cache import KVCache
from gptoss.checkpoint import load, resident_bytes, write_checkpoint
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.errors import GptOssError
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.loading import STREAMING_HEADROOM_GIB, load_model, plan_memory
from gptoss.streaming import expert_nbytes

CONFIG = preset("tiny").replace(num_experts=8, experts_per_token=4)


@pytest.fixture(scope="module", params=["hf", "original"])
def checkpoint(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / request.param
    write_checkpoint(dict(synthetic.random_tensors(CONFIG, seed=3)), CONFIG, path, request.param,
                     max_shard_bytes=200_000)  # several shards: experts of one layer in different files
    return path


def streamed(path: Path, slots: int, dtype=torch.float32, predict: bool = True):
    model = load(path, dtype=dtype, expert_pool_bytes=slots * expert_nbytes(CONFIG, torch.finfo(dtype).bits // 8))
    assert model.expert_pool.slots == slots
    model.expert_pool.predict = predict
    return model


def decode_logits(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy: the prefill's logits, then one decode step at a time through the KV cache."""
    cache = KVCache(model.config, 1)
    tokens = torch.tensor([prompt])
    out, logits = [], []
    with torch.no_grad():
        x = model(tokens, cache=cache)
        for _ in range(steps):
            logits.append(x[0, -1])
            out.append(int(x[0, -1].argmax()))
            positions = torch.tensor([[cache.length]])
            x = model(torch.tensor([[out[-1]]]), positions=positions, cache=cache)
    return out, torch.stack(logits)


@pytest.mark.parametrize("predict", [True, False])
def test_streamed_decode_equals_in_memory_bit_for_bit(checkpoint, predict):
    reference = load(checkpoint, dtype=torch.float32)
    model = streamed(checkpoint, slots=CONFIG.num_experts, predict=predict)  # 8 of 32: evictions every layer
    prompt = list(range(5, 45))
    want_tokens, want = decode_logits(reference, prompt, 24)
    got_tokens, got = decode_logits(model, prompt, 24)
    assert got_tokens == want_tokens
    assert torch.equal(got, want)  # fp32 logits, every step
    stats = model.expert_pool.stats
    assert stats.misses > 0 and stats.bytes_read > 0  # really streamed
    if predict:
        assert stats.prefetched > 0


def test_streamed_bf16_generation_and_batched_engine_decode_match(checkpoint):
    reference = load(checkpoint, dtype=torch.bfloat16)
    model = streamed(checkpoint, slots=2 * CONFIG.num_experts, dtype=torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=16)
    prompts = [[1, 2, 3], list(range(100, 130)), [7] * 11]
    want = [generate_tokens(reference, p, params) for p in prompts]
    assert [generate_tokens(model, p, params) for p in prompts] == want
    with Engine(model, max_concurrency=3) as engine:  # three rows decoding in one batch
        requests = [engine.complete(p, params) for p in prompts]
        assert [list(r) for r in requests] == want


def test_long_prompts_stream_in_waves_exactly(checkpoint, monkeypatch):
    """Prompts past the fused kernel's bound take the grouped path: the pool reads each expert once per chunk,
    half the pool at a time while the other half is read, in the in-memory order of experts."""
    monkeypatch.setattr(model_module, "FUSED_ROWS_PER_EXPERT", 0)  # every prompt grouped
    reference = load(checkpoint, dtype=torch.float32)
    tokens = torch.arange(10, 74)[None]
    want = reference(tokens)
    for slots in (CONFIG.num_experts, CONFIG.experts_per_token):  # a layer at once; waves of 2 experts
        model = streamed(checkpoint, slots=slots)
        assert torch.equal(model(tokens), want), slots


def test_a_pool_smaller_than_a_batch_runs_token_groups(checkpoint):
    """With fewer slots than a batch's experts, the fused kernel runs on runs of tokens: the same experts and
    arithmetic, tiled differently (fp32 sums in another order), so equal to rounding, not to the bit."""
    reference = load(checkpoint, dtype=torch.float32)
    model = streamed(checkpoint, slots=CONFIG.experts_per_token)
    tokens = torch.arange(200, 240)[None]
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


def test_plan_memory_maps_what_fits_and_streams_what_does_not(checkpoint):
    resident, experts, total = resident_bytes(checkpoint, torch.bfloat16)
    assert experts > 0 and resident + experts < total  # the embedding is neither
    headroom = int(STREAMING_HEADROOM_GIB * 2**30)
    assert plan_memory(checkpoint, torch.bfloat16, available=total + headroom) == (None, None)
    one = expert_nbytes(CONFIG, 2)
    budget = resident + 10 * one
    pool, message = plan_memory(checkpoint, torch.bfloat16, memory_budget_gib=budget / 2**30)
    assert pool == 10 * one
    assert "streaming experts from disk" in message and "10 of 32 experts" in message
    pool, message = plan_memory(checkpoint, torch.bfloat16, available=total + headroom - 1)  # 1 byte short
    assert pool is not None and "does not fit" in message
    with pytest.raises(GptOssError, match="not enough memory to run this model"):
        plan_memory(checkpoint, torch.bfloat16, available=headroom + resident)
    with pytest.raises(GptOssError, match="--memory-budget"):
        plan_memory(checkpoint, torch.bfloat16, memory_budget_gib=resident / 2**30)
    assert plan_memory(checkpoint, torch.bfloat16, memory_budget_gib=total / 2**30) == (None, None)  # fits
    with pytest.raises(GptOssError, match="must be > 0"):
        plan_memory(checkpoint, torch.bfloat16, memory_budget_gib=0)


def test_load_model_with_a_budget_streams_and_says_so(checkpoint, capsys):
    resident, _, _ = resident_bytes(checkpoint, torch.float32)
    budget = (resident + 12 * expert_nbytes(CONFIG, 4)) / 2**30
    model = load_model(checkpoint, device="cpu", dtype="float32", progress=False, memory_budget_gib=budget)
    assert model.expert_pool.slots == 12
    assert "streaming experts from disk" in capsys.readouterr().err
    params = SamplingParams(temperature=0, max_tokens=8)
    assert generate_tokens(model, [4, 5, 6], params) == generate_tokens(load(checkpoint, dtype=torch.float32),
                                                                        [4, 5, 6], params)


BIG = preset("tiny").replace(hidden_size=512, intermediate_size=512, num_experts=32, experts_per_token=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64)

RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from gptoss.loading import load_model
    from gptoss.generate import SamplingParams, generate_tokens

    def status():
        fields = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

    torch.ones(1).sum()  # torch's own start-up memory before the baseline
    base = status()
    budget = None if sys.argv[2] == "none" else float(sys.argv[2])
    model = load_model(sys.argv[1], device="cpu", dtype="bfloat16", progress=False, memory_budget_gib=budget)
    peak = status()
    for _ in range(2):
        generate_tokens(model, list(range(1, 40)), SamplingParams(temperature=0, max_tokens=8))
        now = status()
        peak = {k: max(peak[k], now[k]) for k in peak}
    pool = getattr(model, "expert_pool", None)
    print(json.dumps({"anon": peak["RssAnon"] - base["RssAnon"], "file": peak["RssFile"] - base["RssFile"],
                      "read": pool.stats.bytes_read if pool else 0}))
""")


def test_anonymous_memory_stays_within_the_budget(tmp_path):
    """A model with 51 MB of experts under a budget of its resident weights + 6 MB: streamed, the process's
    anonymous memory grows by what it grows in memory (the runtime: kernels, threads, caches) plus at most the
    budget, and the experts are not mapped either (the in-memory model's file-backed RSS grows by all of them,
    the streamed one's by the embedding rows and libraries it touches)."""
    path = tmp_path / "big"
    write_checkpoint(synthetic.random_tensors(BIG, seed=1), BIG, path, "hf")
    resident, experts, _ = resident_bytes(path, torch.bfloat16)
    assert experts > 50e6
    budget = resident + 6 * 2**20

    def run(budget_arg: str) -> dict:
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), budget_arg], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    in_memory, stream = run("none"), run(str(budget / 2**30))
    assert stream["read"] > experts / 4  # the experts really came from disk
    assert stream["anon"] <= in_memory["anon"] + budget + 16 * 2**20, (stream, in_memory, budget)
    assert in_memory["file"] > experts * 0.9  # mapped whole (this is what streaming avoids) ...
    assert stream["file"] < in_memory["file"] - 0.75 * experts, (stream, in_memory)  # ... and streamed, not


def test_sparse_expert_checkpoints_read_as_zero_experts(tmp_path):
    """benchmarks/make_checkpoint.py --sparse-experts (a 120b-shaped checkpoint on a disk without 61 GiB): the
    expert weights are holes of sparse files. The safetensors library reads them as zeros and every other
    tensor as random_tensors(zero_experts=True) draws it, and gptoss, streaming its experts, computes what
    the same tensors written the ordinary way compute."""
    import repo_scripts
    from safetensors import safe_open

    make = repo_scripts.load("benchmarks/make_checkpoint.py")
    config = preset("tiny")
    sparse, plain = tmp_path / "sparse", tmp_path / "plain"
    assert make.main([str(sparse), "--preset", "tiny", "--sparse-experts"]) == 0
    write_checkpoint(synthetic.random_tensors(config, zero_experts=True), config, plain, "hf")

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                out.update({name: st.get_tensor(name) for name in st.keys()})
        return out

    got, want = tensors(sparse), tensors(plain)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(k.endswith("_blocks") for k in got) and not any(got[k].any() for k in got if k.endswith("_blocks"))
    tokens = torch.tensor([[1, 5, 9, 2]])
    streamed = load(sparse, dtype=torch.float32, expert_pool_bytes=4 * expert_nbytes(config, 4))
    assert torch.equal(streamed(tokens), load(plain, dtype=torch.float32)(tokens))
