"""Checkpoint layouts: bit-exact conversion, mmap loading, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import HF_INDEX, CheckpointReader, expected_tensors, write_checkpoint
from gptoss.config import ModelConfig, preset
from gptoss.errors import CheckpointError, ConfigError

TINY = preset("tiny")


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(synthetic.random_tensors(config, seed))


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


@pytest.fixture()
def hf_checkpoint(tmp_path) -> Path:
    path = tmp_path / "hf"
    write_checkpoint(random_tensors(TINY), TINY, path, "hf", max_shard_bytes=100_000)
    return path


def test_hf_original_hf_round_trip_is_bit_exact(hf_checkpoint, tmp_path):
    gptoss.convert(hf_checkpoint, tmp_path / "orig", "original")
    gptoss.convert(tmp_path / "orig", tmp_path / "hf2", "hf", max_shard_bytes=100_000)
    a, b = all_tensors(hf_checkpoint), all_tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b) and len(a) == len(expected_tensors(TINY)) + 4 * TINY.num_hidden_layers
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].view(torch.uint8).equal(b[name].view(torch.uint8)), name
    orig = all_tensors(tmp_path / "orig")
    assert "block.0.attn.qkv.weight" in orig and "block.3.mlp.mlp1_weight.blocks" in orig
    assert orig["block.1.mlp.mlp2_weight.blocks"].equal(a["model.layers.1.mlp.experts.down_proj_blocks"])
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["num_experts"] == TINY.num_experts
    index = json.loads((hf_checkpoint / HF_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert ModelConfig.from_json(tmp_path / "hf2" / "config.json") == TINY


def test_save_then_load_round_trip(hf_checkpoint, tmp_path):
    model = gptoss.load(hf_checkpoint)
    for layout in ("hf", "original"):
        gptoss.save(model, tmp_path / layout, layout=layout)
        again = gptoss.load(tmp_path / layout)
        for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2), n1


def test_convert_cli(hf_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "gptoss", "convert", str(hf_checkpoint), str(tmp_path / "o"),
                          "--to", "original", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "model.safetensors").exists()
    bad = subprocess.run([sys.executable, "-m", "gptoss", "convert", str(tmp_path / "nope"), str(tmp_path / "x"),
                          "--to", "hf"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_load_is_memory_mapped(tmp_path):
    """A checkpoint with ~200 MiB of experts loads without reading them into RAM."""
    config = TINY.replace(hidden_size=1024, intermediate_size=1024, num_experts=32)
    tensors = random_tensors(config)
    write_checkpoint(tensors, config, tmp_path / "big", "hf")
    expert_mib = gptoss.checkpoint.expert_bytes_on_disk(tmp_path / "big") / 2**20
    del tensors
    before = rss_mib()
    model = gptoss.load(tmp_path / "big")
    grown = rss_mib() - before
    assert expert_mib > 100 and grown < 0.25 * expert_mib, (grown, expert_mib)
    with torch.no_grad():  # and it runs
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_weights_moved_to_huge_pages_are_the_same_weights(tmp_path):
    """gptoss.hugepages: every CPU tensor of ≥ 2 MiB copied into anonymous memory starting on a 2 MiB boundary,
    no longer a view of the checkpoint's files, and the logits bit for bit the same."""
    from gptoss import hugepages

    config = TINY.replace(hidden_size=512, intermediate_size=512, num_experts=16)
    write_checkpoint(random_tensors(config), config, tmp_path / "m", "hf")
    reference, model = gptoss.load(tmp_path / "m"), gptoss.load(tmp_path / "m")
    big = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()] if t.nbytes >= 2 << 20}
    moved = hugepages.to_hugepages(model)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert big and moved == sum(after[n].nbytes for n in big)
    for name, ptr in big.items():
        assert after[name].data_ptr() != ptr and after[name].data_ptr() % (2 << 20) == 0, name
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))

# ---------------------------------------------------------------- bad input, one clear error each
def rewrite_shard_without(path: Path, name: str, replacement: torch.Tensor | None = None) -> Path:
    """Rewrite the shard holding `name` without it (or with `replacement` in its place)."""
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            tensors = {k: h.get_tensor(k).clone() for k in h.keys()} if name in h.keys() else None
        if tensors is not None:
            del tensors[name]
            if replacement is not None:
                tensors[name] = replacement
            save_file(tensors, str(f))
            return f
    raise AssertionError(name)


def test_missing_tensor_named(hf_checkpoint):
    rewrite_shard_without(hf_checkpoint, "model.layers.2.mlp.experts.down_proj_scales")
    index = json.loads((hf_checkpoint / HF_INDEX).read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.down_proj_scales"]
    (hf_checkpoint / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model.layers.2.mlp.experts.down_proj_scales' is missing"):
        gptoss.load(hf_checkpoint)


def test_wrong_shape_named(hf_checkpoint):
    f = rewrite_shard_without(hf_checkpoint, "model.layers.1.self_attn.k_proj.weight", torch.zeros(16, 64).bfloat16())
    with pytest.raises(CheckpointError, match=rf"{f.name}.*'model.layers.1.self_attn.k_proj.weight' has shape "
                                              r"\[16, 64\], expected \[32, 64\]"):
        gptoss.load(hf_checkpoint)


def test_wrong_dtype_named(hf_checkpoint):
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    shape = expected_tensors(TINY)["block.0.mlp.mlp1_weight.blocks"][0]
    rewrite_shard_without(hf_checkpoint, name, torch.zeros(shape, dtype=torch.float16))
    with pytest.raises(CheckpointError, match=rf"'{name}' has dtype F16, expected U8"):
        gptoss.load(hf_checkpoint)


def test_truncated_file_named(hf_checkpoint):
    f = sorted(hf_checkpoint.glob("*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated — tensor '.*' ends at byte"):
        gptoss.load(hf_checkpoint)


def test_non_safetensors_file_and_pickles_refused(hf_checkpoint, tmp_path):
    f = sorted(hf_checkpoint.glob("*.safetensors"))[0]
    f.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a pickle under a .safetensors name
    with pytest.raises(CheckpointError, match=rf"{f.name}: not a safetensors file"):
        gptoss.load(hf_checkpoint)
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text(json.dumps(TINY.to_original_dict()))
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(CheckpointError, match="no .safetensors files; found pytorch_model.bin, which gptoss does "
                                              "not read"):
        gptoss.load(only_bin)


def test_config_field_out_of_range_named(hf_checkpoint):
    config_file = hf_checkpoint / "config.json"
    for field, value, message in [("num_local_experts", 0, "'num_experts' = 0 must be a positive integer"),
                                  ("num_experts_per_tok", 9, "'experts_per_token' = 9 must be <= num_experts = 8"),
                                  ("hidden_size", 65, "'hidden_size' = 65 must be a multiple of 32"),
                                  ("rms_norm_eps", "1e-5", "'rms_norm_eps' = '1e-5' must be a positive finite"),
                                  ("num_key_value_heads", 3, "'num_attention_heads' = 4 must be a multiple of"),
                                  ("layer_types", ["sliding_attention"] * 3 + ["local"], r"'layer_types\[3\]'")]:
        good = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**good, field: value}))
        with pytest.raises(ConfigError, match=rf"{config_file}: field {message}"):
            gptoss.load(hf_checkpoint)
        config_file.write_text(json.dumps(good))
    config_file.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        gptoss.load(hf_checkpoint)


def test_config_disagreeing_with_tensors(hf_checkpoint):
    config_file = hf_checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_hidden_layers": 3,
                                       "layer_types": None}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.3.*3-layer"):
        gptoss.load(hf_checkpoint)


def test_missing_shard_and_wrong_folder(hf_checkpoint, tmp_path):
    f = sorted(hf_checkpoint.glob("*.safetensors"))[1]
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"{f.name}: missing shard listed in {HF_INDEX}"):
        gptoss.load(hf_checkpoint)
    (tmp_path / "repo" / "original").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no config.json .*original/ folder"):
        gptoss.load(tmp_path / "repo/original/..")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        gptoss.load(tmp_path / "nowhere")


def test_reader_sees_original_names_in_both_layouts(hf_checkpoint, tmp_path):
    gptoss.convert(hf_checkpoint, tmp_path / "o", "original")
    a, b = CheckpointReader(hf_checkpoint), CheckpointReader(tmp_path / "o")
    assert (a.layout, b.layout) == ("hf", "original")
    assert a.get("block.2.attn.qkv.bias").equal(b.get("block.2.attn.qkv.bias"))
    assert math.prod(a.get("block.2.attn.qkv.weight").shape) == TINY.qkv_dim * TINY.hidden_size


def test_written_shards_get_the_umask_mode_not_private(hf_checkpoint):
    # safetensors' own writer leaves 0600 files: a checkpoint written for a server or container user
    # must be as readable as the config.json beside it.
    expected = (hf_checkpoint / "config.json").stat().st_mode & 0o777
    shards = sorted(hf_checkpoint.glob("*.safetensors"))
    assert len(shards) > 1
    assert {f.name: f.stat().st_mode & 0o777 for f in shards} == {f.name: expected for f in shards}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_experts_equal_the_mxfp4_experts(hf_checkpoint, dtype):
    """load(dense_experts=True) (what GPUs with room get by default) dequantizes every expert once, exactly:
    the weights equal mxfp4.dequantize's, and the model generates what the MXFP4 model generates."""
    from gptoss import mxfp4
    from gptoss.generate import SamplingParams, generate_tokens
    from gptoss.model import DenseExpertWeight, MXFP4Weight

    packed = gptoss.load(hf_checkpoint, dtype=dtype)
    dense = gptoss.load(hf_checkpoint, dtype=dtype, dense_experts=True)
    assert isinstance(packed.block[0].mlp.mlp1_weight, MXFP4Weight)  # the CPU default: MXFP4 in place
    for a, b in zip(packed.block, dense.block):
        for name in ("mlp1_weight", "mlp2_weight"):
            w, d = getattr(a.mlp, name), getattr(b.mlp, name)
            assert isinstance(d, DenseExpertWeight) and not d.weight.requires_grad
            assert torch.equal(d.weight, mxfp4.dequantize(w.blocks, w.scales, dtype)), name
    prompt = torch.randint(0, TINY.vocab_size, (19,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(temperature=0, max_tokens=12)
    if dtype == torch.float32:  # bf16 rounds the expert GEMMs' outputs where the MXFP4 kernel keeps fp32
        assert generate_tokens(dense, prompt, params) == generate_tokens(packed, prompt, params)
        with torch.no_grad():
            x = torch.tensor([prompt])
            torch.testing.assert_close(dense(x), packed(x), rtol=1e-5, atol=1e-5)


def test_a_model_with_dense_experts_saves_mxfp4_experts(hf_checkpoint, tmp_path):
    """gptoss.save of a model loaded with dense experts (a GPU's default) writes MXFP4 experts again, whose
    values are the loaded ones exactly, in both layouts."""
    from gptoss import mxfp4

    packed = gptoss.load(hf_checkpoint, dtype=torch.float32)
    dense = gptoss.load(hf_checkpoint, dtype=torch.float32, dense_experts=True)
    for layout in ("hf", "original"):
        gptoss.save(dense, tmp_path / layout, layout=layout, dtype=torch.float32)
        again = gptoss.load(tmp_path / layout, dtype=torch.float32)
        for a, b in zip(packed.block, again.block):
            for name in ("mlp1_weight", "mlp2_weight"):
                w, v = getattr(a.mlp, name), getattr(b.mlp, name)
                assert torch.equal(mxfp4.dequantize(v.blocks, v.scales, torch.float32),
                                   mxfp4.dequantize(w.blocks, w.scales, torch.float32)), name
