"""Vocabulary subsets (gptoss.vocab): a model over a few o200k ids that callers drive with full ids.

A tiny random GPT-oss whose embedding rows stand for a handful of ids (+ an unknown row): its full-vocabulary
logits equal the inner model's on the subset and are -inf elsewhere, sampling never leaves the subset, ids
outside it read as the unknown row, and `vocab_ids` survives save/load/convert in both layouts, validated.
"""

from __future__ import annotations

import pytest
import torch

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import VOCAB_IDS, CheckpointReader, write_checkpoint
from gptoss.config import preset
from gptoss.engine import Engine
from gptoss.errors import CheckpointError, GenerationError
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.safetensors_io import save_file
from gptoss.tokenizer import VOCAB_SIZE, get_tokenizer
from gptoss.vocab import VocabSubsetModel, unwrap

TOK = get_tokenizer()
SUBSET = sorted({*TOK.encode("What is 12 + 34? The answer is 46."), *range(199998, 200013)})
IDS = torch.tensor([-1, *SUBSET], dtype=torch.int32)  # row 0: the unknown row
CONFIG = preset("tiny").replace(vocab_size=len(IDS))


def inner_model(seed: int = 0) -> gptoss.Transformer:
    model = gptoss.Transformer(CONFIG, dtype=torch.float32)
    model.load_state_dict(dict(synthetic.random_tensors(CONFIG, seed=seed, dtype=torch.float32)))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> VocabSubsetModel:
    return VocabSubsetModel(inner_model(), IDS)


def test_logits_cover_the_subset_only(model):
    prompt = TOK.encode("What is 12 + 34?")
    rows = [SUBSET.index(t) + 1 for t in prompt]
    full = model(torch.tensor([prompt]))
    inner = unwrap(model)(torch.tensor([rows]))
    assert full.shape == (1, len(prompt), VOCAB_SIZE) and model.config.vocab_size == VOCAB_SIZE
    torch.testing.assert_close(full[..., SUBSET], inner[..., 1:], rtol=0, atol=0)
    outside = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    outside[SUBSET] = False
    assert torch.isneginf(full[..., outside]).all()  # including whatever the unknown row scores


def test_ids_outside_the_subset_read_as_the_unknown_row(model):
    unknown = TOK.encode(" zebra")[0]
    assert unknown not in SUBSET
    a = model(torch.tensor([[SUBSET[3], unknown]]))
    b = unwrap(model)(torch.tensor([[4, 0]]))
    torch.testing.assert_close(a[..., SUBSET], b[..., 1:])
    no_unknown = VocabSubsetModel(gptoss.Transformer(CONFIG.replace(vocab_size=len(SUBSET)), dtype=torch.float32),
                                  torch.tensor(SUBSET, dtype=torch.int32))
    with pytest.raises(GenerationError, match=f"token id {unknown} is not in this model's vocabulary subset"):
        no_unknown.rows(torch.tensor([[SUBSET[0], unknown]]))
    with pytest.raises(GenerationError, match="outside o200k_harmony"):
        model.rows(torch.tensor([VOCAB_SIZE]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=20),
                                    SamplingParams(temperature=1.5, max_tokens=60, seed=3),
                                    SamplingParams(temperature=2.0, top_k=50, top_p=0.99, max_tokens=60, seed=4)])
def test_sampling_never_leaves_the_subset(model, params):
    tokens = generate_tokens(model, TOK.encode("What is 12 + 34?"), params)
    assert len(tokens) == params.max_tokens and set(tokens) <= set(SUBSET)
    if params.temperature == 0:  # greedy on the wrapper = greedy on the inner model, mapped back
        rows = generate_tokens(unwrap(model), [SUBSET.index(t) + 1 for t in TOK.encode("What is 12 + 34?")], params)
        assert tokens == [SUBSET[r - 1] for r in rows]


def test_engine_serves_full_ids(model):
    prompt = TOK.encode("What is 12 + 34? zebra")  # " zebra" is outside the subset: the unknown row
    params = SamplingParams(temperature=0, max_tokens=10)
    with Engine(model, max_concurrency=2) as engine:
        tokens, finish = engine.generate(prompt, params)
    assert tokens == generate_tokens(model, prompt, params) and finish.reason == "length"


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_save_load_convert_keep_vocab_ids(model, tmp_path, layout):
    gptoss.save(model, tmp_path / "a", layout=layout, dtype=torch.float32)
    loaded = gptoss.load(tmp_path / "a", dtype=torch.float32)
    assert isinstance(loaded, VocabSubsetModel) and torch.equal(loaded.vocab_ids, IDS.long())
    prompt = torch.tensor([TOK.encode("What is 12 + 34?")])
    torch.testing.assert_close(loaded(prompt), model(prompt))
    other = "original" if layout == "hf" else "hf"
    gptoss.convert(tmp_path / "a", tmp_path / "b", layout=other)
    assert torch.equal(CheckpointReader(tmp_path / "b").vocab_ids, IDS)


def bad_checkpoint(path, ids: torch.Tensor):
    tensors = dict(synthetic.random_tensors(CONFIG, seed=0, dtype=torch.float32))
    write_checkpoint(tensors, CONFIG, path, "original")
    tensors[VOCAB_IDS] = ids
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.parametrize("ids, message", [
    (torch.cat([IDS, IDS[-1:]]), r"shape \[%d\], expected \[%d\]" % (len(IDS) + 1, len(IDS))),
    (torch.cat([IDS[:-1], IDS[1:2]]), f"id {int(IDS[1])} appears twice"),
    (torch.cat([IDS[:-1], torch.tensor([VOCAB_SIZE], dtype=torch.int32)]), f"id {VOCAB_SIZE} is outside o200k_harmony"),
    (torch.cat([IDS[:-1], torch.tensor([-1], dtype=torch.int32)]), "more than one unknown row"),
    (IDS.float(), "dtype F32, expected I32"),
])
def test_bad_vocab_ids_are_named(tmp_path, ids, message):
    path = bad_checkpoint(tmp_path / "bad", ids)
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor 'vocab_ids'.*{message}"):
        gptoss.load(path)
