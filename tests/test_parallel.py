"""Tensor and expert parallel inference: 2-process gloo runs give the 1-process logits and greedy tokens.

The HF export side of issue 10 (our HF checkpoints load in transformers with the same logits) is
test_model_parity.py; here: the shards, their collectives, their bytes, and the CLI under torchrun.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gptoss
from gptoss import parallel, synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import ModelConfig, preset
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.parallel import Layout, Plan, ShardingError

SMALL = dict(hidden_size=64, num_hidden_layers=2, head_dim=16, experts_per_token=4, sliding_window=8,
             initial_context_length=64, max_position_embeddings=256)
CONFIGS = {
    "even": ModelConfig(**SMALL, vocab_size=512, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                        intermediate_size=64),
    # nothing divides by 2: vocabulary rows, KV heads (2 + 1), experts (3 + 2), expert width (2 + 1 blocks)
    "odd": ModelConfig(**SMALL, vocab_size=515, num_attention_heads=6, num_key_value_heads=3, num_experts=5,
                       intermediate_size=96),
}
LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2), "tp2+ep2": (2, 2)}
T = 24  # 3× the sliding window
PROMPT = list(range(3, 15))
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    paths = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        paths[name] = root / name
        write_checkpoint(dict(synthetic.random_tensors(config, seed=i, dtype=torch.float32)), config, paths[name],
                         layout="hf" if name == "even" else "original")
    return paths


def _worker(rank: int, world: int, rendezvous: str, paths: dict, tokens: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    results = {}
    for cname, path in paths.items():
        for lname, (tp, ep) in LAYOUTS.items():
            layout = Layout(tp, ep, rank, world)
            model = parallel.load(path, layout, dtype=torch.float32)
            with torch.no_grad():
                logits = model(tokens)
                sharded = parallel.shard(gptoss.load(path, dtype=torch.float32), layout)(tokens)  # in memory
            if rank == 0:  # rank 0 decides, rank 1 runs the same forwards on its shard
                leader = parallel.Leader(model)
                greedy = generate_tokens(leader, PROMPT, GREEDY)
                leader.close()
            else:
                parallel.follow(model)
                greedy = None
            results[cname, lname] = dict(logits=logits, sharded=sharded, greedy=greedy,
                                         nbytes=parallel.weight_nbytes(model),
                                         planned=Plan.make(CONFIGS[cname], layout).nbytes(torch.float32))
    torch.save(results, f"{out}/rank{rank}.pt")
    del model
    gc.collect()  # before tearing gloo down: its worker threads otherwise may abort at interpreter exit
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    tokens = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(0))
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), checkpoints, tokens, str(out)), nprocs=2)
    return tokens, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_ranks_give_the_one_process_logits_and_greedy_tokens(checkpoints, two_ranks, config, layout):
    tokens, ranks = two_ranks
    model = gptoss.load(checkpoints[config], dtype=torch.float32)
    with torch.no_grad():
        ref = model(tokens)
    for r in ranks:
        logits = r[config, layout]["logits"]
        err = (logits - ref).abs().max().item()
        print(f"\n{config} {layout}: max |Δlogit| = {err:.2e} (max |logit| {ref.abs().max():.2f})")
        assert err <= 1e-4 * ref.abs().max().item(), err
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))
        assert torch.equal(r[config, layout]["sharded"], logits)  # shard() in memory == load() from the files
    assert ranks[0][config, layout]["greedy"] == generate_tokens(model, PROMPT, GREEDY)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_holds_about_half_the_weights(checkpoints, two_ranks, layout):
    tokens, ranks = two_ranks
    total = parallel.weight_nbytes(gptoss.load(checkpoints["even"], dtype=torch.float32))
    held = [r["even", layout]["nbytes"] for r in ranks]
    assert held == [r["even", layout]["planned"] for r in ranks]  # measured = what the plan predicts
    print(f"\n{layout}: rank bytes {held} of {total} ({[round(h / total, 3) for h in held]})")
    # tp2: everything split but norms, router and two biases; ep2: attention and vocabulary replicated
    assert max(held) <= total * (0.55 if layout != "ep2" else 0.9)
    assert sum(held) >= total


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sliced_reads_equal_slices_of_the_whole_tensor(checkpoints, config):
    """A rank's reads: first-dimension ranges (one file read) and inner ranges (from the memory map), q/k/v of
    the HF layout addressed in fused rows."""
    from gptoss.checkpoint import CheckpointReader
    from gptoss.errors import CheckpointError

    reader = CheckpointReader(checkpoints[config])
    for name, index in [("embedding.weight", (slice(3, 200),)), ("block.1.attn.qkv.weight", (slice(64, 80),)),
                        ("block.0.attn.out.weight", (slice(None), slice(16, 48))),
                        ("block.1.mlp.mlp2_weight.blocks", (slice(1, 3), slice(None), slice(1, 2))),
                        ("block.0.mlp.mlp1_bias", ()), ("norm.scale", ())]:
        assert torch.equal(reader.get_slice(name, index), reader.get(name)[index]), name
    if reader.layout == "hf":
        with pytest.raises(CheckpointError, match="span more than one of"):
            reader.get_slice("block.0.attn.qkv.bias", (slice(60, 70),))


def test_splits_of_odd_counts():
    config = CONFIGS["odd"]
    a, b = (Plan.make(config, Layout(2, 2, r, 2)) for r in range(2))
    assert (a.experts, b.experts) == (range(0, 3), range(3, 5))
    assert (a.kv_heads, b.kv_heads, a.heads, b.heads) == (range(0, 2), range(2, 3), range(0, 4), range(4, 6))
    assert (a.vocab, b.vocab) == (range(0, 258), range(258, 515))
    a, b = (Plan.make(config, Layout(2, 1, r, 2)) for r in range(2))
    assert (a.width, b.width) == (range(0, 64), range(64, 96))  # whole 32-value blocks: 2 + 1


@pytest.mark.parametrize("change, layout, message", [
    (dict(intermediate_size=32), (2, 1), "expert width 32 is 1 MXFP4 block(s) of 32 values: it cannot be split 2 ways"),
    (dict(num_key_value_heads=1), (2, 2), "--tp 2: the model has 1 KV heads"),
    (dict(num_experts=1, experts_per_token=1), (1, 2), "--ep 2: the model has only 1 experts"),
])
def test_impossible_splits_are_refused(change, layout, message):
    with pytest.raises(ShardingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Plan.make(CONFIGS["even"].replace(**change), Layout(*layout, 0, 2))


def test_bad_layouts_are_refused():
    with pytest.raises(ShardingError, match="must divide the number of processes"):
        Layout(tp=1, ep=3, rank=0, world_size=2)
    with pytest.raises(ShardingError, match="torchrun --nproc-per-node 2"):
        parallel.layout_from(2, None, environ={})
    assert parallel.layout_from(None, None, environ={"RANK": "1", "WORLD_SIZE": "2"}) == Layout(2, 1, 1, 2)


def test_120b_plan_bytes_per_rank():
    """The per-rank bytes of docs/SCALING.md, from the same slicing rules as loading."""
    c = preset("gpt-oss-120b")
    total = Plan.make(c, Layout()).nbytes()
    assert abs(total / 2**30 - 60.77) < 0.01
    for n in (2, 4, 8):
        tp = max(Plan.make(c, Layout(n, 1, r, n)).nbytes() for r in range(n))
        ep_tp = max(Plan.make(c, Layout(n, n, r, n)).nbytes() for r in range(n))
        assert ep_tp < total / n * 1.01  # 128 experts and 8 KV heads divide by 2, 4, 8
        blocks = c.intermediate_size // 32  # 90: the widest rank has ⌈90 / n⌉ blocks (23 of 22.5 at n = 4)
        assert tp < total / n * math.ceil(blocks / n) / (blocks / n) * 1.01


@pytest.fixture(scope="module")
def tiny_o200k(tmp_path_factory):
    """A random checkpoint with the o200k vocabulary, for the commands (they tokenize text)."""
    config = preset("tiny").replace(vocab_size=201_088, num_hidden_layers=2, layer_types=())
    path = tmp_path_factory.mktemp("cli") / "tiny"
    write_checkpoint(dict(synthetic.random_tensors(config, seed=5, dtype=torch.float32)), config, path, "hf")
    return path


def gptoss_command(*args: str, ranks: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "gptoss", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two shared cores


def test_generate_under_torchrun(tiny_o200k):
    """`torchrun --nproc-per-node 2 -m gptoss generate --tp 2 --ep 2` prints the 1-process greedy completion."""
    from gptoss.tokenizer import get_tokenizer

    tok, prompt = get_tokenizer(), "The capital of France is"
    expected = generate_tokens(gptoss.load(tiny_o200k, dtype=torch.float32), tok.encode(prompt),
                               SamplingParams(temperature=0, max_tokens=8, stop_tokens=(tok.endoftext,)))
    two = subprocess.run(gptoss_command("generate", "-m", str(tiny_o200k), prompt, "--temperature", "0",
                                        "--max-tokens", "8", "--dtype", "float32", "-q", "--tp", "2", "--ep", "2",
                                        ranks=2), env=ENV, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == tok.decode(expected) + "\n"


def test_serve_under_torchrun(tiny_o200k):
    """Two servers, 1 process and 2 ranks (tp 2: the engine's batched cache mirrored), answer alike."""
    import httpx

    servers = []
    for ranks in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = gptoss_command("serve", "-m", str(tiny_o200k), "--port", str(port), "--dtype", "float32", "-q",
                                 *(["--tp", "2"] if ranks > 1 else []), ranks=ranks)
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        servers.append((proc, f"http://127.0.0.1:{port}"))
    try:
        answers = []
        for proc, url in servers:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            request = {"model": "tiny", "temperature": 0, "max_tokens": 6}
            replies = [httpx.post(url + "/v1/chat/completions", timeout=60,
                                  json={**request, "messages": [{"role": "user", "content": text}]})
                       for text in ("Hi", "What is 2 + 2?")]  # the second reuses the first one's cache row
            answers.append([r.json()["choices"][0]["message"] for r in replies])
        assert answers[0] == answers[1] and all(m["content"] or m["reasoning_content"] for m in answers[0]), answers
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            print(err[-1500:])


def test_exported_hf_checkpoint_loads_in_transformers(checkpoints, tmp_path):
    """What vLLM/SGLang read: `gptoss.save(model, layout="hf")` of a model loaded from the original layout
    (odd counts) loads in transformers with the same fp32 logits (test_model_parity.py: the other direction)."""
    from hf_reference import load_with_transformers

    model = gptoss.load(checkpoints["odd"], dtype=torch.float32)
    gptoss.save(model, tmp_path / "hf", layout="hf", dtype=torch.float32, max_shard_bytes=2**20)
    hf = load_with_transformers(tmp_path / "hf")
    tokens = torch.randint(0, CONFIGS["odd"].vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * ours.abs().max().item(), err
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
