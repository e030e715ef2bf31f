"""Throughput metrics of a training run: model FLOPs per token, MFU, peak memory.

FLOPs per token follow PaLM (Chowdhery et al. 2022, Appendix B): 6·N for the matmul weights a token passes
through (2 per multiply-add, ×3 for forward + backward) plus 12·Σ_layers H·Dh·S for attention scores and
values, S the keys a query attends to — the sequence length on full layers (PaLM counts the whole square, not
the causal half) and at most the window on sliding ones. For an MoE, N counts the router and only the k experts
a token is routed to (the "active" weights); the embedding lookup is no matmul and is left out.
MFU = achieved model FLOP/s ÷ the hardware's peak (PaLM §4.1). The peak must come from the user on CPUs
([train] peak_tflops); for a few GPUs it is known (dense bf16 tensor-core peak from the vendor's datasheet).
"""

from __future__ import annotations

import resource
import sys

import torch

from ..config import ModelConfig

# Dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def matmul_params_per_token(c: ModelConfig) -> int:
    """Weights of the matmuls one token passes through (biases, norms and sinks left out)."""
    attn = c.hidden_size * c.qkv_dim + c.num_attention_heads * c.head_dim * c.hidden_size
    D, I = c.hidden_size, c.intermediate_size
    if c.mlp_type == "moe":
        ffn = D * c.num_experts + c.experts_per_token * (D * 2 * I + I * D)
    elif c.mlp_type == "swiglu":
        ffn = D * 2 * I + I * D
    else:  # gelu
        ffn = 2 * D * I
    return c.num_hidden_layers * (attn + ffn) + D * c.vocab_size


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len (module docstring)."""
    attention = sum(12 * c.num_attention_heads * c.head_dim * (min(seq_len, c.sliding_window) if c.is_sliding(i)
                                                                else seq_len)
                    for i in range(c.num_hidden_layers))
    return 6.0 * matmul_params_per_token(c) + attention


def peak_tflops(device: torch.device, configured: float = 0.0) -> float | None:
    """The configured peak, else the datasheet peak of a known GPU, else None (MFU then stays unreported)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory on CUDA; on CPU the process's peak resident set (all its memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
