"""Data parallelism: 2-process gloo runs under torchrun (DDP and FSDP2) follow the 1-process loss curve, expert
capacity included (decided over the global micro-batch, as one process decides it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptoss.train import load_config, train
from gptoss.train.data import Batch
from gptoss.train.distributed import DistInfo, from_env, rank_slice
from gptoss.errors import ConfigError
from test_train import permutation_task
from test_train_lora import random_checkpoint

RTOL = 1e-5  # fp32; measured ≈ 1e-7 (summation order of the gradient reduction)


def write_run(tmp_path, parallel: str, lora: bool) -> None:
    docs = permutation_task(n_docs=40, alphabet=32)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"tokens": d.tokens}) + "\n" for d in docs))
    model = '[model]\npreset = "tiny"\nvocab_size = 64\nnum_hidden_layers = 2\n'
    capacity = ""
    if lora:  # adapters on a random MXFP4 checkpoint
        model = '[model]\ninit_from = "base"\n[lora]\nrank = 4\ntargets = ["qkv", "out", "gate"]\n'
        random_checkpoint(tmp_path / "base")
    else:  # capacity that drops: each rank's local drops would differ from the global ones. Positional order:
        # the score order depends on router logits, which drift by ~1e-7 between the runs from step 2 on (the
        # gradient reduction's summation order) and reorder near-ties; it is checked in-process in
        # test_train_formulas.test_capacity_over_ranks_equals_one_process.
        capacity = 'capacity_factor = 1.0\n'
    # FSDP with activation checkpointing: the recomputed forward gathers the other rank's routing again
    checkpointing = "checkpointing = true\n" if parallel == "fsdp" and not lora else ""
    (tmp_path / f"{parallel}.toml").write_text(model + f"""
[data]
files = ["d.jsonl"]
seq_len = 32
batch_size = 4
[optim]
lr = 3e-3
warmup_steps = 1
[moe]
aux_loss_coef = 0.01
z_loss_coef = 1e-3
{capacity}[train]
{checkpointing}steps = 4
grad_accum = 2
device = "cpu"
dtype = "float32"
save_dtype = "float32"
save_every = 2
parallel = "{parallel}"
out_dir = "out-{parallel}"
""")


def torchrun(tmp_path, parallel: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gptoss", "train", str(tmp_path / f"{parallel}.toml"), "-q", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("parallel,lora", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, parallel, lora):
    write_run(tmp_path, parallel, lora)
    cfg = load_config(tmp_path / f"{parallel}.toml")
    cfg.train.out_dir = "out-one"
    one = train(cfg, progress=False, dist=DistInfo())  # same global batch (4 × 2 sequences per step), 1 process
    done = torchrun(tmp_path, parallel)
    assert done.returncode == 0, done.stderr[-3000:]
    ref, two = metrics(tmp_path / "out-one" / "metrics.jsonl"), metrics(tmp_path / f"out-{parallel}" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone wrote the metrics
    assert ref[-1]["loss"] < ref[0]["loss"] - (0.2 if lora else 0.5)  # a curve worth comparing
    for key in ("loss", "grad_norm", "aux_loss", "z_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in ref]),
                                   rtol=RTOL, atol=0, msg=key)
    assert [r["expert_load"] for r in two] == [r["expert_load"] for r in ref]  # counts reduced over ranks
    assert [r["dropped_pct"] for r in two] == [r["dropped_pct"] for r in ref]
    if not lora:
        assert any(max(r["dropped_pct"]) > 1 for r in ref)  # capacity did drop
    assert [r["targets"] for r in two] == [r["targets"] for r in ref]
    # the checkpoint holds full (gathered) weights and AdamW moments, equal to the 1-process ones up to the
    # drift of 4 Adam steps (near-zero gradients differ in relative terms; measured ≤ 8e-5 of each tensor's max)
    a = load_file(str(one.checkpoint / "train_state.safetensors"))
    b = load_file(str(tmp_path / f"out-{parallel}" / "step-000004" / "train_state.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith(("model.", "optim.")):
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-4 * a[name].abs().max().item(), msg=name)


def test_rank_slices_partition_the_global_batch():
    t = torch.arange(12).view(6, 2)
    batch = Batch(t, t + 1, t > 3, t, t)
    parts = [rank_slice(batch, DistInfo(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([p.tokens for p in parts]), t)
    with pytest.raises(ConfigError, match=r"'batch_size' = 6 must be a multiple of the world size 4"):
        rank_slice(batch, DistInfo(0, 4))
    assert from_env({"RANK": "1", "WORLD_SIZE": "2"}) == DistInfo(1, 2) and from_env({}) == DistInfo(0, 1)


def test_fsdp_resume_continues_exactly(tmp_path):
    """A 2-rank FSDP2 run resumed from its step-2 folder (full tensors, re-sharded on load) redoes steps 3-4
    with the losses of the uninterrupted run."""
    write_run(tmp_path, "fsdp", lora=False)
    assert torchrun(tmp_path, "fsdp").returncode == 0
    full = tmp_path / "out-fsdp"
    full.rename(tmp_path / "full")
    full.mkdir()
    shutil.copytree(tmp_path / "full" / "step-000002", full / "step-000002")
    done = torchrun(tmp_path, "fsdp", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    again, ref = metrics(full / "metrics.jsonl"), metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in ref[2:]]
