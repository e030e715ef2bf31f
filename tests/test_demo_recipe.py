"""The demo recipe end to end at toy size: data, training, MXFP4 export, evaluation and its records.

The real recipe (experiments/demo/*.toml) trains for about an hour; this runs the same code path with a model
of a few thousand parameters for two steps, so it checks the plumbing, not the model's skill."""

import json
import types

import pytest
import repo_scripts
import torch
from safetensors.torch import load_file

from gptoss.demo import eval as E
from gptoss.demo import recipe

TOML = """
[demo]
data_seed = 0
number_init = true
data_n = 300
data_version = 11
eval_n = 1
heldout_eval_n = 1

[model]
preset = "tiny"
vocab_size = 1600
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
num_experts = 4
experts_per_token = 2
intermediate_size = 32
sliding_window = 128
initial_context_length = 256
max_position_embeddings = 4096

[data]
seq_len = 384
batch_size = 2
shuffle = false

[optim]
lr = 3e-3
warmup_steps = 1

[train]
steps = 2
save_every = 1
seed = 0
out_dir = "unused"
dtype = "float32"
save_layout = "original"
save_dtype = "bfloat16"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    (tmp / "recipe.toml").write_text(TOML)
    assert recipe.main([str(tmp / "recipe.toml"), "--run-dir", str(tmp / "run")]) == 0
    return tmp / "run" / "export"


def test_recipe_exports_a_model_with_its_evaluation_and_each_items_result(run):
    info = json.loads((run / "training.json").read_text())
    assert (info["data_seed"], info["data_n"], info["data_version"], info["steps"]) == (0, 300, 11, 2)
    assert "held-out" in (run / "EVAL.md").read_text().lower()
    rows = [json.loads(line) for line in (run / "results.jsonl").open()]
    items = E.examples_for(1, 1, E.HELDOUT_SEED, 0, 300, 11)
    assert [(r["family"], r["kind"], r["question"]) for r in rows] == [(f, ex.kind, ex.question) for f, ex in items]
    # the counts EVAL.md states are the rows' own
    arithmetic = [r for r in rows if r["family"] == "heldout" and r["kind"] in E.CATEGORIES["arithmetic"]]
    right = sum(r["correct"] for r in arithmetic)
    assert f"| arithmetic, final answer exact | {len(arithmetic)} | {right} |" in (run / "EVAL.md").read_text()


def test_paired_reuses_the_recipes_results_only_on_the_same_items(run, tmp_path, monkeypatch):
    paired = repo_scripts.load("experiments/demo/paired.py")
    args = types.SimpleNamespace(n=1, heldout_n=1, train_seed=0, train_n=300, version=11,
                                 seed=E.HELDOUT_SEED)
    monkeypatch.setattr(paired, "load", lambda *a, **k: pytest.fail("evaluated again instead of reusing"))
    rs = paired.results(run, tmp_path / "B.jsonl", args)
    assert rs == [json.loads(line) for line in (run / "results.jsonl").open()]
    assert (tmp_path / "B.jsonl").read_text() == (run / "results.jsonl").read_text()
    # other items (here two per kind instead of one): the run's file is not taken
    evaluated = []
    monkeypatch.setattr(paired, "load", lambda *a, **k: evaluated.append(a) or object())
    monkeypatch.setattr(paired.E, "evaluate", lambda *a, **k: [])
    paired.results(run, tmp_path / "C.jsonl", types.SimpleNamespace(**{**vars(args), "n": 2}))
    assert evaluated


def test_average_last_exports_the_mean_of_the_saved_steps_weights(run, tmp_path):
    """--average-last 2: the exported model holds the mean of steps 1 and 2's fp32 training weights, non-expert
    tensors in bf16 and the experts quantized from the mean (not the mean of two quantizations)."""
    from gptoss.checkpoint import dense_experts_to_mxfp4

    toml, run_dir = run.parent.parent / "recipe.toml", run.parent
    out = tmp_path / "avg"
    assert recipe.main([str(toml), "--run-dir", str(run_dir), "--skip-train", "--average-last", "2",
                        "--export-dir", str(out), "--eval-n", "1"]) == 0
    steps = [load_file(str(run_dir / "train" / f"step-00000{i}" / "train_state.safetensors")) for i in (1, 2)]
    mean = {k[len("model."):]: (steps[0][k].double() + steps[1][k].double()).div(2).float()
            for k in steps[0] if k.startswith("model.")}
    got = load_file(str(out / "model.safetensors"))
    name = "block.1.attn.qkv.weight"
    assert not torch.equal(steps[0]["model." + name], steps[1]["model." + name])  # the steps differ
    assert torch.equal(got[name], mean[name].to(torch.bfloat16))
    want = dict(dense_experts_to_mxfp4("block.0.mlp.mlp1_weight.weight", mean["block.0.mlp.mlp1_weight.weight"]))
    assert torch.equal(got["block.0.mlp.mlp1_weight.blocks"], want["block.0.mlp.mlp1_weight.blocks"])
    assert torch.equal(got["block.0.mlp.mlp1_weight.scales"], want["block.0.mlp.mlp1_weight.scales"])
    assert json.loads((out / "training.json").read_text())["averaged_steps"] == ["step-000001", "step-000002"]
    with pytest.raises(SystemExit, match="average_last = 3, but .* holds 2 saved steps"):
        recipe.main([str(toml), "--run-dir", str(run_dir), "--skip-train", "--average-last", "3",
                     "--export-dir", str(tmp_path / "avg3"), "--eval-n", "1"])
    # a run that would save fewer steps than it is asked to average is refused before it trains
    with pytest.raises(SystemExit, match=r"average_last = 3, but \[train\] steps = 2 with save_every = 1 saves 2"):
        recipe.main([str(toml), "--run-dir", str(tmp_path / "never"), "--average-last", "3"])
    assert not (tmp_path / "never").exists()


def test_init_from_continues_training_from_an_exported_demo_model(run, tmp_path):
    """[demo] init_from: the fresh model is overwritten with the export's weights (bf16 tensors widened, MXFP4
    experts dequantized from the stored blocks and scales), and the run records where it started; data with
    tokens the export lacks grows its vocabulary (each new token starts as its unknown row: the same logits); an
    export of another vocabulary or shape is refused with what differs."""
    from gptoss.checkpoint import load
    from gptoss.demo import data
    from gptoss.model import Transformer
    from gptoss.mxfp4 import dequantize
    from gptoss.tokenizer import get_tokenizer
    from gptoss.vocab import VocabSubsetModel
    from gptoss.train import TrainConfig

    import tomllib
    raw = tomllib.loads(TOML)
    raw.pop("demo")
    cfg = TrainConfig.from_dict(raw, source="test")
    ids = recipe.vocab_ids(list(data.generate(0, 300, version=11)))
    cfg.model.overrides["vocab_size"] = int(ids.numel())
    model = Transformer(cfg.model_config(), device="cpu", dtype=torch.float32).dense_experts(torch.float32)
    recipe.continue_from(run, ids)(model)
    stored = load_file(str(run / "model.safetensors"))
    state = model.state_dict()
    assert torch.equal(state["block.1.attn.qkv.weight"], stored["block.1.attn.qkv.weight"].float())
    assert torch.equal(state["unembedding.weight"], stored["unembedding.weight"].float())
    name = "block.0.mlp.mlp2_weight"
    dense = dequantize(stored[name + ".blocks"], stored[name + ".scales"], torch.float32)
    assert torch.equal(state[name + ".weight"], dense.reshape(state[name + ".weight"].shape))

    other_ids = recipe.vocab_ids(list(data.generate(0, 30, version=11)))
    with pytest.raises(SystemExit, match="vocabulary rows are not the data's"):
        recipe.continue_from(run, other_ids)
    wide = Transformer(cfg.model_config().replace(hidden_size=64), device="cpu").dense_experts(torch.float32)
    with pytest.raises(SystemExit, match="another model shape"):
        recipe.continue_from(run, ids)(wide)

    # a data vocabulary that is the export's and more: its new tokens start as the export's unknown row
    tok = get_tokenizer()
    added = [t for w in ("Product", "FROM") for t in tok.encode_ordinary(w) if t not in set(ids.tolist())]
    assert added
    grown = torch.tensor(sorted({*ids.tolist(), *added}), dtype=torch.int32)  # -1 (the unknown row) stays first
    cfg.model.overrides["vocab_size"] = int(grown.numel())
    big = Transformer(cfg.model_config(), device="cpu", dtype=torch.float32).dense_experts(torch.float32)
    recipe.continue_from(run, grown)(big)
    exported = load(run, dtype=torch.float32, dense_experts=True)
    continued = VocabSubsetModel(big, grown)
    prompt = torch.tensor([tok.encode_ordinary("Product of 12 and 3? FROM 4")])
    want, got = exported(prompt), continued(prompt)  # full-vocabulary logits (ids outside a subset: -inf)
    known = exported.known_ids
    assert torch.allclose(got[..., known], want[..., known], atol=1e-5)  # the new tokens are read as unknown was
    rows = [int((grown == t).nonzero()) for t in added]
    assert torch.equal(big.embedding.weight[rows], big.embedding.weight[[0] * len(rows)])
    assert torch.equal(big.unembedding.weight[rows], big.unembedding.weight[[0] * len(rows)])
    with pytest.raises(SystemExit, match="nor a subset"):  # the data lacks tokens the export has
        recipe.continue_from(run, grown[grown != ids[5]])

    toml = tmp_path / "continue.toml"
    toml.write_text(TOML.replace("number_init = true", f'init_from = "{run}"\nshuffle_seed = 7')
                    .replace("steps = 2", "steps = 1"))
    assert recipe.main([str(toml), "--run-dir", str(tmp_path / "run"), "--eval-n", "1"]) == 0
    info = json.loads((tmp_path / "run" / "export" / "training.json").read_text())
    assert info["init_from"]["path"] == str(run) and info["init_from"]["steps"] == 2
    assert info["shuffle_seed"] == 7


def test_soup_exports_the_weighted_mean_of_runs_mapped_onto_the_last_runs_vocabulary(run, tmp_path):
    """experiments/demo/soup.py: each run's fp32 weights (its last saved step when its export averaged none),
    weighted, non-expert tensors in bf16 and experts quantized once from the mean; a run whose vocabulary has
    tokens the last one lacks (or bad weights) is refused with what is wrong, and a finished run is required."""
    import shutil

    from gptoss.checkpoint import dense_experts_to_mxfp4
    from safetensors.torch import save_file

    soup = repo_scripts.load("experiments/demo/soup.py")
    a = run.parent
    # run b: run a's last step with other weights and two tokens a lacks (appended ids, rows of their own)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    step = b / "train" / "step-000002" / "train_state.safetensors"
    state = load_file(str(step))
    ids_a = load_file(str(a / "export" / "model.safetensors"))["vocab_ids"]
    new = [i for i in range(100000, 100100) if i not in set(ids_a.tolist())][:2]
    ids_b = torch.cat([ids_a, torch.tensor(new, dtype=ids_a.dtype)])
    g = torch.Generator().manual_seed(0)
    for k, v in list(state.items()):
        if k.startswith("model."):
            state[k] = v * 2 + torch.randn(v.shape, generator=g) * 0.01
    for k in ("model.embedding.weight", "model.unembedding.weight"):
        state[k] = torch.cat([state[k], torch.randn(2, state[k].shape[1], generator=g)])
    save_file({k: v.contiguous() for k, v in state.items()}, str(step))
    save_file({"vocab_ids": ids_b}, str(b / "export" / "model.safetensors"))
    info = json.loads((b / "export" / "training.json").read_text())
    info["config"]["model"]["vocab_size"] = int(ids_b.numel())
    (b / "export" / "training.json").write_text(json.dumps(info))

    out = tmp_path / "soup" / "export"
    assert soup.main([str(a), str(b), "--out", str(out), "--weights", "1,3"]) == 0
    got = load_file(str(out / "model.safetensors"))
    sa = {k[len("model."):]: v for k, v in load_file(str(a / "train" / "step-000002" / "train_state.safetensors")).items()
          if k.startswith("model.")}
    sb = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    mean = {k: (sa[k].double() * 0.25 + sb[k].double() * 0.75).float() for k in sa if "embedding" not in k}
    assert torch.equal(got["vocab_ids"], ids_b)
    name = "block.1.attn.qkv.weight"
    assert torch.equal(got[name], mean[name].to(torch.bfloat16))
    want = dict(dense_experts_to_mxfp4("block.0.mlp.mlp1_weight.weight", mean["block.0.mlp.mlp1_weight.weight"]))
    assert torch.equal(got["block.0.mlp.mlp1_weight.blocks"], want["block.0.mlp.mlp1_weight.blocks"])
    emb_a, emb_b = sa["embedding.weight"].double(), sb["embedding.weight"].double()
    rows = torch.cat([emb_a, emb_a[[0, 0]]])  # run a reads the two tokens it lacks as its unknown row
    assert torch.equal(got["embedding.weight"], (rows * 0.25 + emb_b * 0.75).float().to(torch.bfloat16))
    rec = json.loads((out / "training.json").read_text())
    assert [(p["run"], p["weight"]) for p in rec["soup"]] == [(str(a), 0.25), (str(b), 0.75)]
    assert rec["vocab_rows"] == ids_b.numel() and rec["data_version"] == info["data_version"]

    with pytest.raises(SystemExit, match=r"b: its \d+ vocabulary rows are not .*run's \d+, nor a subset"):
        soup.main([str(b), str(a), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="two or more runs and one weight each"):
        soup.main([str(a), str(b), "--out", str(tmp_path / "x"), "--weights", "1"])
    with pytest.raises(SystemExit, match="--weights 1,x: comma-separated numbers"):
        soup.main([str(a), str(b), "--out", str(tmp_path / "x"), "--weights", "1,x"])
    with pytest.raises(SystemExit, match="must be positive"):
        soup.main([str(a), str(b), "--out", str(tmp_path / "x"), "--weights", "1,0"])
    with pytest.raises(SystemExit, match="not a finished recipe run"):
        soup.main([str(a), str(tmp_path), "--out", str(tmp_path / "x")])


def test_every_committed_recipe_reads_with_a_defined_data_version_and_known_demo_keys():
    """experiments/demo/*.toml, as the recipe reads them before an hour of training (read_recipe)."""
    from pathlib import Path

    from gptoss.demo import data

    tomls = sorted((Path(__file__).resolve().parents[1] / "experiments" / "demo").glob("*.toml"))
    assert len(tomls) > 30
    for path in tomls:
        cfg, demo = recipe.read_recipe(path)
        assert set(demo) <= set(recipe.DEMO_KEYS) and 1 <= demo.get("data_version", 1) <= data.LATEST_VERSION
        assert cfg.train.steps > 0, path


def test_a_misspelt_demo_key_a_non_integer_count_or_an_undefined_data_version_is_refused_naming_it(tmp_path):
    from gptoss.demo import data

    path = tmp_path / "r.toml"
    path.write_text(TOML.replace("data_seed = 0", "data_sed = 0"))
    with pytest.raises(SystemExit, match=r"\[demo\] data_sed: not a \[demo\] key"):
        recipe.read_recipe(path)
    path.write_text(TOML.replace("data_version = 11", f"data_version = {data.LATEST_VERSION + 1}"))
    with pytest.raises(SystemExit, match=rf"data_version = {data.LATEST_VERSION + 1}: defined versions are 1 to"):
        recipe.read_recipe(path)
    path.write_text(TOML.replace("data_version = 11", 'data_version = "eleven"'))
    with pytest.raises(SystemExit, match=r"\[demo\] data_version = 'eleven': must be an integer"):
        recipe.read_recipe(path)
    path.write_text(TOML.replace("data_n = 300", "data_n = 3e5"))
    with pytest.raises(SystemExit, match=r"\[demo\] data_n = 300000.0: must be an integer"):
        recipe.read_recipe(path)
    with pytest.raises(ValueError, match="data version 0"):
        next(data.generate(0, 1, version=0))
