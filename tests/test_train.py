"""The training stack: learning, exact resume, document masking, assistant-only loss masks, config errors, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import gptoss
from gptoss import harmony, synthetic
from gptoss.config import preset
from gptoss.errors import ConfigError
from gptoss.tokenizer import get_tokenizer
from gptoss.train import Document, PackedDataset, TrainConfig, load_config, render_for_training, train
from gptoss.train.loop import lm_loss_sum

V = 64  # vocabulary of the synthetic tasks


def permutation_task(n_docs: int = 200, length: int = 40, alphabet: int = 32, seed: int = 1) -> list[Document]:
    """Documents following a fixed random permutation of the alphabet from a random start: every token
    but the first is determined by the one before, while the unigram distribution is near uniform."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(alphabet, generator=g)
    docs = []
    for _ in range(n_docs):
        x = [int(torch.randint(0, alphabet, (1,), generator=g))]
        for _ in range(length - 1):
            x.append(int(perm[x[-1]]))
        docs.append(Document(x))
    return docs


def tiny_config(tmp_path, **train) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "tiny", "vocab_size": V, "num_hidden_layers": 2},
        "data": {"seq_len": 64, "batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "train": {"steps": 40, "out_dir": str(tmp_path / "run"), "device": "cpu", **train}})


def test_loss_falls_well_below_unigram_entropy(tmp_path):
    """40 steps (fp32; bf16 autocast runs in the CLI test): the loss ends below 30% of the unigram entropy
    (≈ 3.4 nats), which only a model that uses the previous token can reach."""
    result = train(tiny_config(tmp_path, dtype="float32"), documents=permutation_task(), progress=False)
    entropy = result.dataset.unigram_entropy()
    assert entropy > 3.3
    assert result.losses[0] > 0.9 * entropy  # starts near chance
    assert result.losses[-1] < 0.3 * entropy, (result.losses[-1], entropy)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))
    # the saved checkpoint is a real gptoss checkpoint (experts MXFP4) whose loss is close to the trained one
    model = gptoss.load(result.checkpoint / "model", dtype=torch.float32)
    batch = result.dataset.batch(range(4))
    with torch.no_grad():
        loss, n = lm_loss_sum(model, batch)
    assert loss.item() / n < 0.3 * entropy


def test_resume_reproduces_the_next_steps_exactly(tmp_path):
    docs = permutation_task(n_docs=40)
    cfg = tiny_config(tmp_path, steps=6, save_every=3, grad_accum=2, dtype="float32")
    cfg.data.batch_size = 2
    full = train(cfg, documents=docs, progress=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "step-000003", resumed_dir / "step-000003")
    cfg.train.out_dir, cfg.train.resume = str(resumed_dir), True
    again = train(cfg, documents=docs, progress=False)
    assert len(again.losses) == 3
    assert again.losses == full.losses[3:]  # bit-exact, not merely close
    for (name, a), b in zip(full.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def random_model(vocab: int = V):
    config = preset("tiny").replace(vocab_size=vocab)
    model = gptoss.Transformer(config, dtype=torch.float32)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=0, dtype=torch.float32)), strict=True)
    return model.dense_experts().eval()


def test_document_masking_equals_running_documents_separately():
    """Three documents (longer than the sliding window of 8) packed into one sequence give, position for
    position, the logits of each document run on its own; without the segment mask they do not."""
    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(0, V, (n,), generator=g).tolist()) for n in (13, 20, 8)]
    data = PackedDataset(docs, seq_len=40, vocab_size=V, shuffle=False)
    batch = data.batch([0])
    model = random_model()
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, segments=batch.segments)[0]
        leaked = model(batch.tokens, batch.positions)[0]
        start = 0
        for d in docs:
            n = min(len(d.tokens), 40 - start)  # the last document's last token is only a target
            alone = model(torch.tensor([d.tokens]))[0, :n]
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            if start:
                assert (leaked[start:start + n] - alone).abs().max() > 1e-2
            start += n
    # targets: within a document only; the first token of the next document is never a target
    assert batch.positions[0].tolist() == list(range(13)) + list(range(20)) + list(range(7))
    expected = [True] * 12 + [False] + [True] * 19 + [False] + [True] * 7
    assert batch.mask[0].tolist() == expected
    assert data.num_samples == 1  # 41 tokens = one sample of 40 inputs and 40 targets


def test_training_render_drops_only_earlier_turns_analysis():
    tok = get_tokenizer()
    messages = [
        harmony.Message.user("1+1?"),
        harmony.Message.assistant("Add them.", channel="analysis"),
        harmony.Message.assistant("2", channel="final"),
        harmony.Message.user("2+2?"),
        harmony.Message.assistant("Add again.", channel="analysis"),
        harmony.Message.assistant("4", channel="final"),
    ]
    doc = render_for_training(messages, tok)
    text = tok.decode(doc.tokens)
    assert "Add them." not in text and "Add again." in text  # the finished turn's reasoning is gone
    trained = tok.decode([t for t, f in zip(doc.tokens, doc.targets) if f])
    assert trained == ("<|channel|>final<|message|>2<|end|>"  # an earlier answer is still an assistant output
                       "<|channel|>analysis<|message|>Add again.<|end|><|start|>assistant"
                       "<|channel|>final<|message|>4<|return|>")


def test_assistant_only_loss_mask_on_a_rendered_conversation():
    tok = get_tokenizer()
    tools = [harmony.ToolDefinition("calculator", "Evaluate.", {"type": "object", "properties": {
        "expression": {"type": "string"}}})]
    messages = [
        harmony.Message.system(harmony.SystemContent(reasoning_effort="low")),
        harmony.Message.developer(harmony.DeveloperContent("Be brief.", tools)),
        harmony.Message.user("12*34?"),
        harmony.Message.assistant("Need the calculator.", channel="analysis"),
        harmony.Message.tool_call("calculator", {"expression": "12*34"}),
        harmony.Message.tool_result("calculator", '{"result": 408}'),
        harmony.Message.assistant("408.", channel="final"),
    ]
    doc = render_for_training(messages, tok)
    # the turn being trained keeps its analysis (openai-harmony's own rendering would drop it)
    assert doc.tokens == harmony.render_conversation_for_training(messages, tok, auto_drop_analysis=False)
    runs, current = [], []
    for t, flag in zip(doc.tokens, doc.targets):
        if flag:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    # the analysis and the tool call are one run: after its analysis <|end|> the model itself opens the next
    # message with <|start|>assistant; after the tool result the prompt supplies it
    assert [tok.decode(r) for r in runs] == [
        "<|channel|>analysis<|message|>Need the calculator.<|end|><|start|>assistant"
        ' to=functions.calculator<|channel|>commentary <|constrain|>json<|message|>{"expression": "12*34"}<|call|>',
        "<|channel|>final<|message|>408.<|return|>",
    ]
    assert doc.tokens[-1] == tok.return_
    # the same conversation given as JSONL is rendered identically
    line = {"messages": [
        {"role": "system", "content": {"reasoning_effort": "low"}},
        {"role": "developer", "content": {"instructions": "Be brief.", "tools": [
            {"name": "calculator", "description": "Evaluate.", "parameters": tools[0].parameters}]}},
        {"role": "user", "content": "12*34?"},
        {"role": "assistant", "channel": "analysis", "content": "Need the calculator."},
        {"role": "assistant", "channel": "commentary", "recipient": "functions.calculator", "content_type": "json",
         "content": {"expression": "12*34"}},
        {"role": "tool", "name": "functions.calculator", "recipient": "assistant", "channel": "commentary",
         "content": '{"result": 408}'},
        {"role": "assistant", "channel": "final", "content": "408."}]}
    from gptoss.train.data import _read_jsonl
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "chat.jsonl"
        f.write_text(json.dumps(line) + "\n")
        (from_file,) = _read_jsonl(f, tok, [tok.endoftext])
    assert from_file.tokens == doc.tokens and from_file.targets == doc.targets


def test_config_errors_name_the_field_and_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: \[optim\] field 'lr' = 'fast' must be of type float"):
        load_config(f)
    f.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: \[train\] unknown field 'stepz'"):
        load_config(f)
    f.write_text("[model]\npreset = 'tiny'\nhidden_size = 65\n")
    with pytest.raises(ConfigError, match=r"bad.toml: \[model\] field 'hidden_size' = 65"):
        load_config(f)
    f.write_text("[optim]\nlr = 1e-3\nmin_lr = 1e-2\n")
    with pytest.raises(ConfigError, match=r"bad.toml: \[optim\] field 'min_lr'"):
        load_config(f)
    f.write_text("[data]\nfiles = ['nothing.txt']\n[train]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=r"nothing.txt: data file not found"):
        train(load_config(f), progress=False)


def test_token_ids_outside_the_vocabulary_are_refused_and_token_map_fixes_them(tmp_path):
    cfg = tiny_config(tmp_path, steps=1)
    with pytest.raises(ConfigError, match=r"token id 100 is outside the model's vocabulary \(vocab_size = 64\)"):
        train(cfg, documents=[Document([1, 2, 100])], progress=False)
    result = train(cfg, documents=[Document([1, 2, 100])], token_map=lambda ids: [i % V for i in ids],
                   progress=False)
    assert result.dataset.tokens[:3].tolist() == [1, 2, 100 % V]


def test_gptoss_train_cli(tmp_path):
    """`gptoss train CONFIG.toml` on text + JSONL files with the full o200k_harmony vocabulary; then --resume."""
    (tmp_path / "a.txt").write_text("Hello world. " * 20)
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "channel": "final", "content": "Hello!"}]}) + "\n")
    (tmp_path / "c.toml").write_text(
        '[model]\npreset = "tiny"\nvocab_size = 201088\nnum_hidden_layers = 1\n'
        '[data]\nfiles = ["*.txt", "b.jsonl"]\nseq_len = 32\nbatch_size = 2\n'
        '[optim]\nwarmup_steps = 1\n'
        '[train]\nsteps = 2\nout_dir = "out"\nsave_layout = "original"\nsave_dtype = "float32"\n')
    done = subprocess.run([sys.executable, "-m", "gptoss", "train", str(tmp_path / "c.toml"), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    model = gptoss.load(tmp_path / "out" / "step-000002" / "model")
    assert model.config.vocab_size == 201088
    done = subprocess.run([sys.executable, "-m", "gptoss", "train", str(tmp_path / "c.toml"), "-q", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already at step 2" in done.stdout, done.stderr
    (tmp_path / "c.toml").write_text("[optim]\nbeta3 = 1\n")
    done = subprocess.run([sys.executable, "-m", "gptoss", "train", str(tmp_path / "c.toml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "c.toml: [optim] unknown field 'beta3'" in done.stderr
