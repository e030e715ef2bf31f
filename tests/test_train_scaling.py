"""Training at scale (issue 22): grouped-GEMM experts and fused attention against the plain paths they replace,
gradients included; activation checkpointing; validation files; throughput, MFU and memory metrics."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from gptoss.config import preset
from gptoss.model import attention_mask, grouped_experts, materialized_sdpa_with_sinks, swiglu, trainable_sdpa_with_sinks


def loop_experts(t, experts, weights, w1, b1, w2, b2, alpha, limit):
    """The reference: one expert at a time, as the prefill path did before grouped GEMMs."""
    out = torch.zeros(t.shape[0], w2.shape[1], dtype=torch.float32)
    for e in range(w1.shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)
        h = swiglu(torch.nn.functional.linear(t[token], w1[e], b1[e]), alpha, limit)
        y = torch.nn.functional.linear(h, w2[e], b2[e])
        out = out.index_add(0, token, y.float() * weights[token, slot, None])
    return out


@pytest.mark.parametrize("multiple", [1, 3, 32])  # groups padded to multiples of 1, 3 or 32 rows
def test_grouped_experts_equal_the_per_expert_loop_with_gradients(multiple):
    g = torch.Generator().manual_seed(0)
    N, k, E, D, I = 40, 2, 4, 32, 32
    params = [torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, 2 * I, generator=g) * 0.1,
              torch.randn(E, D, I, generator=g) * 0.2, torch.randn(E, D, generator=g) * 0.1]
    t = torch.randn(N, D, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    experts[3, 1] = experts[7, 0] = -1  # dropped for capacity
    experts[:, 0][experts[:, 0] == 3] = 2  # expert 3 gets only second choices: uneven group sizes
    weights = torch.softmax(torch.randn(N, k, generator=g), -1)
    grad = torch.randn(N, D, generator=g)
    outs, grads = [], []
    for fn in (loop_experts, functools.partial(grouped_experts, group_rows_multiple=multiple)):
        leaves = [p.clone().requires_grad_(True) for p in [t, *params]]
        out = fn(leaves[0], experts, weights, *leaves[1:], 1.702, 7.0)
        out.backward(grad)
        outs.append(out.detach())
        grads.append([p.grad for p in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads[1][1][:, ::2].abs().sum() > 0  # gradients reach the experts' gate columns


@pytest.mark.parametrize("window,sinks,segments", [(8, True, True), (None, True, False), (None, False, True)])
def test_fused_training_attention_equals_the_materialized_one(window, sinks, segments):
    g = torch.Generator().manual_seed(1)
    B, T, K, G, Dh = 2, 150, 2, 2, 16  # T spans three query tiles, the last one partial
    q = torch.randn(B, T, K, G, Dh, generator=g, requires_grad=True)
    k = torch.randn(B, T, K, Dh, generator=g, requires_grad=True)
    v = torch.randn(B, T, K, Dh, generator=g, requires_grad=True)
    s = torch.randn(K * G, generator=g, requires_grad=True) if sinks else None
    pos = torch.arange(T).expand(B, T)
    seg = (torch.arange(T) >= 70).long().expand(B, T) if segments else None
    if segments:  # packed documents: positions restart in the second one
        pos = torch.where(seg == 1, torch.arange(T) - 70, torch.arange(T)).expand(B, T)
    mask = attention_mask(pos, pos, window, seg)
    inputs = [x for x in (q, k, v, s) if x is not None]
    grad = torch.randn(B, T, K * G * Dh, generator=g)
    ref = materialized_sdpa_with_sinks(q, k, v, s, mask)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    out = trainable_sdpa_with_sinks(q, k, v, s, mask)
    grads = torch.autograd.grad(out, inputs, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    """Same loss and gradients (fp32) with `checkpointing`, and the forward keeps less for the backward: the
    bytes autograd saves, counted through saved-tensor hooks."""
    import gptoss
    from gptoss import synthetic

    config = preset("tiny").replace(vocab_size=64)
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = gptoss.Transformer(config, dtype=torch.float32)
        model.load_state_dict(dict(synthetic.random_tensors(config, seed=0, dtype=torch.float32)))
        model.dense_experts().train().requires_grad_(True)
        model.checkpointing = checkpointing
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}, saved[0]))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = results
    assert loss1 == loss0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved1 < saved0 / 3, (saved1, saved0)


def test_flops_per_token_of_the_tiny_preset_by_hand():
    """tiny: D 64, 4 layers, 4 query / 2 kv heads of 16, 8 experts top-4 of width 64, vocab 512, window 8.
    Per layer: qkv 64·(4+2+2)·16 = 8192, out 64·64 = 4096, router 64·8 = 512, 4 experts × (64·128 + 64·64)
    = 49152 → 61952; 4 layers 247808, + unembedding 64·512 = 32768 → N = 280576, 6N = 1683456.
    Attention at 64 tokens: 12·4·16 = 768 per key; keys 8 (sliding layers 0, 2) and 64 (layers 1, 3) →
    768·144 = 110592. Total 1794048."""
    from gptoss.train.throughput import flops_per_token, matmul_params_per_token

    assert matmul_params_per_token(preset("tiny")) == 280576
    assert flops_per_token(preset("tiny"), 64) == 1794048


def test_validation_metrics_threads_and_checkpointing_in_a_run(tmp_path):
    from gptoss.train import TrainConfig, train
    from gptoss.train.data import PackedDataset, read_documents
    from gptoss.train.loop import lm_loss_sum
    from test_train import permutation_task

    docs = permutation_task(n_docs=40, alphabet=32)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"tokens": d.tokens}) + "\n" for d in docs[:30]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"tokens": d.tokens}) + "\n" for d in docs[30:]))

    def run(out: str, **train_opts):
        cfg = TrainConfig.from_dict({
            "model": {"preset": "tiny", "vocab_size": 64, "num_hidden_layers": 2},
            "data": {"files": ["train.jsonl"], "val_files": ["val.jsonl"], "seq_len": 32, "batch_size": 3},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"steps": 4, "eval_every": 2, "out_dir": out, "device": "cpu", "dtype": "float32",
                      **train_opts}}, base_dir=tmp_path)
        threads = []
        result = train(cfg, progress=False, on_step=lambda row: threads.append(torch.get_num_threads()))
        return cfg, result, threads

    before = torch.get_num_threads()
    cfg, plain, _ = run("plain")
    _, ckpt, threads = run("ckpt", checkpointing=True, threads=1, peak_tflops=2.0)
    assert threads == [1] * 4 and torch.get_num_threads() == before
    assert [m["loss"] for m in ckpt.metrics] == [m["loss"] for m in plain.metrics]
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    assert rows[3]["val_loss"] == plain.metrics[3]["val_loss"]
    for r in rows:
        assert r["model_tflops"] > 0 and r["peak_mem_gib"] > 0.05
        assert r["mfu"] == pytest.approx(r["model_tflops"] / 2.0)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["time_s"])
    assert plain.metrics[0]["mfu"] is None  # CPU, no configured peak
    # the logged validation loss is the model's mean token loss over the whole validation file
    model = ckpt.model.eval()
    val = PackedDataset(read_documents([tmp_path / "val.jsonl"]), 32, 64, shuffle=False)
    with torch.no_grad():
        total, n = lm_loss_sum(model, val.batch(list(range(val.num_samples))))
    assert rows[3]["val_loss"] == pytest.approx(total.item() / n, rel=1e-5)


def test_eval_every_needs_val_files_and_the_cli_takes_threads():
    from gptoss.cli import build_parser
    from gptoss.train import TrainConfig

    with pytest.raises(Exception, match=r"\[train\] field 'eval_every' = 5 needs \[data\] val_files"):
        TrainConfig.from_dict({"train": {"eval_every": 5}})
    assert build_parser().parse_args(["train", "x.toml", "--threads", "2"]).threads == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_blocks_train_as_the_eager_ones(tmp_path, dtype):
    """[train] compile = true: every block compiled (under bf16 autocast whole: no data-dependent shapes left
    in the grouped experts or the tiled attention, packed documents, a sliding window and capacity drops
    included; in fp32 the grouped GEMMs run eagerly between graphs); the losses, and in fp32 the trained
    weights, equal eager training's to float tolerance (inductor fuses and reorders roundings)."""
    import torch._dynamo
    from gptoss.train import TrainConfig, train
    from test_train import permutation_task

    docs = permutation_task(n_docs=30, alphabet=32)

    def run(out: str, compile: bool):
        cfg = TrainConfig.from_dict({
            "model": {"preset": "tiny", "vocab_size": 64, "num_hidden_layers": 2, "sliding_window": 8},
            "data": {"seq_len": 32, "batch_size": 3}, "optim": {"lr": 3e-3, "warmup_steps": 1},
            "moe": {"aux_loss_coef": 0.01, "capacity_factor": 1.0},  # drops: the grouped GEMMs' padded rows
            "train": {"steps": 3, "out_dir": str(tmp_path / out), "device": "cpu", "dtype": dtype,
                      "compile": compile}})
        return train(cfg, documents=docs, progress=False)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = run("eager", False), run("compiled", True)
    assert all(b._compiled_call_impl is not None for b in compiled.model.block)
    assert max(m["dropped_pct"][0] for m in eager.metrics) > 0
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert breaks == 0 if dtype == "bfloat16" else breaks > 0
    for a, b in zip(eager.metrics, compiled.metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4 if dtype == "float32" else 1e-2)
    if dtype == "float32":
        for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    import shutil

    from gptoss.train import TrainConfig

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(Exception, match=r"\[train\] field 'compile' = True needs a C\+\+ compiler"):
        TrainConfig.from_dict({"train": {"compile": True, "device": "cpu"}})
