"""The CUDA path: the same model, engine, streaming and training code on a GPU gives what it gives on the CPU.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
The CPU in fp32 is the reference: on the GPU, fp32 matmuls reduce in another order (and never in TF32 here:
torch's default), so logits agree to rounding and greedy tokens exactly on random weights whose top logits are
far apart."""

from __future__ import annotations

import pytest
import torch

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.engine import Engine, Finish
from gptoss.generate import SamplingParams, generate_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CONFIG = preset("tiny")  # sliding window 8: the prompts below wrap the ring
CUDA = torch.device("cuda")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model in the real file format (MXFP4 experts), original layout."""
    folder = tmp_path_factory.mktemp("cuda-ckpt")
    write_checkpoint(synthetic.random_tensors(CONFIG, seed=3), CONFIG, folder, "original")
    return folder


@pytest.fixture(scope="module")
def models(checkpoint):
    return (gptoss.load(checkpoint, device="cpu", dtype=torch.float32),
            gptoss.load(checkpoint, device=CUDA, dtype=torch.float32))


def logits_close(gpu: torch.Tensor, cpu: torch.Tensor) -> None:
    gpu = gpu.float().cpu()
    scale = cpu.abs().max().item()
    assert (gpu - cpu).abs().max().item() <= 1e-4 * max(scale, 1.0), ((gpu - cpu).abs().max().item(), scale)


def test_loaded_weights_live_on_the_gpu(models):
    _, gpu = models
    assert gpu.device.type == "cuda"
    assert all(t.device.type == "cuda" for t in list(gpu.parameters()) + list(gpu.buffers()))


def test_prompt_logits_equal_the_cpu(models):
    cpu, gpu = models
    tokens = torch.tensor([prompt(40, 1)])
    with torch.no_grad():
        logits_close(gpu(tokens.to(CUDA)), cpu(tokens))


def test_greedy_generation_equals_the_cpu(models):
    cpu, gpu = models
    p = prompt(23, 2)
    assert generate_tokens(gpu, p, greedy(24)) == generate_tokens(cpu, p, greedy(24))


def test_bf16_generation_runs_and_tracks_fp32(checkpoint, models):
    cpu, _ = models
    gpu = gptoss.load(checkpoint, device=CUDA, dtype=torch.bfloat16)
    tokens = torch.tensor([prompt(30, 4)])
    with torch.no_grad():
        ref = cpu(tokens)
        out = gpu(tokens.to(CUDA)).float().cpu()
    assert torch.isfinite(out).all()
    # bf16 weights/activations: a few percent of the logits' spread, not bit-equal
    assert (out - ref).abs().mean().item() < 0.05 * ref.std().item()
    assert len(generate_tokens(gpu, prompt(9, 5), greedy(8))) == 8


def test_experts_are_dense_on_the_gpu_and_equal_mxfp4_in_place(checkpoint, models):
    """A GPU with room dequantizes the experts once at load (checkpoint.load's default there); the MXFP4
    experts dequantized at every step (dense_experts=False, GPUs without room) give the same tokens."""
    from gptoss.model import DenseExpertWeight, MXFP4Weight

    _, gpu = models
    packed = gptoss.load(checkpoint, device=CUDA, dtype=torch.float32, dense_experts=False)
    assert isinstance(gpu.block[0].mlp.mlp1_weight, DenseExpertWeight)
    assert isinstance(packed.block[0].mlp.mlp1_weight, MXFP4Weight)
    p = prompt(27, 13)
    assert generate_tokens(packed, p, greedy(16)) == generate_tokens(gpu, p, greedy(16))
    with torch.no_grad():
        x = torch.tensor([p], device=CUDA)
        logits_close(packed(x), gpu(x).cpu())


def test_engine_batches_equal_solo_generation_with_prefix_reuse(models):
    """Continuous batching on the GPU: concurrent requests (two sharing a prefix, reused from the cache)
    each get the tokens the CPU's solo generate gives."""
    cpu, gpu = models
    shared = prompt(30, 6)
    prompts = [shared + prompt(5, 7), prompt(17, 8), shared + prompt(9, 9)]
    expected = [generate_tokens(cpu, p, greedy(12)) for p in prompts]
    with Engine(gpu, max_concurrency=4) as engine:
        first, finish = engine.generate(prompts[0], greedy(12))
        assert first == expected[0] and finish.reason == "length"
        results = {}
        import threading

        done = threading.Event()

        def outlet_for(i):
            toks = []

            def outlet(item):
                if isinstance(item, Finish):
                    results[i] = (toks, item)
                    if len(results) == 2:
                        done.set()
                else:
                    toks.append(item)
            return outlet

        engine.submit(prompts[1], greedy(12), outlet_for(1))
        engine.submit(prompts[2], greedy(12), outlet_for(2))
        assert done.wait(120)
    assert results[1][0] == expected[1]
    assert results[2][0] == expected[2]
    assert results[2][1].cached_tokens >= len(shared)  # the shared prefix came from the cache


def test_streamed_experts_equal_in_memory_on_the_gpu(checkpoint, models):
    """Experts streamed from disk through a small pool into GPU memory: the same logits as the GPU model
    holding every expert."""
    from gptoss.streaming import expert_nbytes

    _, gpu = models
    streamed = gptoss.load(checkpoint, device=CUDA, dtype=torch.float32,  # 3 of the 4 layers' experts
                           expert_pool_bytes=3 * CONFIG.num_experts * expert_nbytes(CONFIG, 4))
    p = prompt(21, 10)
    assert generate_tokens(streamed, p, greedy(10)) == generate_tokens(gpu, p, greedy(10))


def test_training_step_matches_the_cpu():
    """One forward/backward of the training loss on the GPU: the same loss and gradients as on the CPU."""
    from gptoss.train.data import Batch
    from gptoss.train.loop import lm_loss_sum

    import copy

    config = CONFIG.replace(num_hidden_layers=2, layer_types=())
    base = gptoss.Transformer(config, dtype=torch.float32)
    base.load_state_dict(dict(synthetic.random_tensors(config, seed=11, dtype=torch.float32)))
    base.dense_experts(torch.float32).requires_grad_(True)  # as train.loop.build_model: trainable experts
    g = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=g)
    batch = Batch(tokens, torch.roll(tokens, -1, 1), torch.ones_like(tokens, dtype=torch.bool),
                  torch.arange(24).expand(2, 24).contiguous(), torch.zeros_like(tokens))
    losses, grads = [], []
    for device in ("cpu", CUDA):
        model = copy.deepcopy(base).to(device).train()
        loss, n = lm_loss_sum(model, batch.to(device))
        (loss / n).backward()
        losses.append(loss.item() / n)
        grads.append({k: v.grad.float().cpu() for k, v in model.named_parameters() if v.grad is not None})
    assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0])
    assert grads[0].keys() == grads[1].keys() and any("mlp1" in k for k in grads[0])
    for k, cpu_grad in grads[0].items():
        assert (grads[1][k] - cpu_grad).abs().max().item() <= 1e-3 * cpu_grad.abs().max().item() + 1e-6, k
