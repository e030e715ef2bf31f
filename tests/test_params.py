"""`gptoss params` against the published table (GPT-oss model card, Table 1) and against transformers' counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptoss.checkpoint import write_checkpoint
from gptoss.config import ModelConfig, preset
from gptoss.errors import ConfigError
from gptoss.params import count_checkpoint, count_params, params_command
from hf_reference import make_reference, random_hf_model

# As printed in the model card: MLP, attention, embed + unembed, active, total, checkpoint size.
PUBLISHED = {
    "gpt-oss-120b": ["114.71B", "0.96B", "1.16B", "5.13B", "116.83B", "60.8 GiB"],
    "gpt-oss-20b": ["19.12B", "0.64B", "1.16B", "3.61B", "20.91B", "12.8 GiB"],
}


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_cli_reproduces_published_table():
    out = subprocess.run([sys.executable, "-m", "gptoss", "params", "gpt-oss-120b", "gpt-oss-20b"],
                         capture_output=True, text=True, check=True).stdout
    assert table_rows(out) == PUBLISHED


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="'gpt-oss-7b' is neither a preset"):
        params_command(["gpt-oss-7b"])


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_total_equals_transformers_parameter_count(name):
    """transformers holds experts dense ([E, in, out]); its numel is the parameter count the card uses."""
    config = preset(name)
    model = random_hf_model(config) if name == "tiny" else _hf_model_meta(config)
    assert count_params(config).total == sum(p.numel() for p in model.parameters())


def _hf_model_meta(config: ModelConfig):
    from transformers import GptOssForCausalLM

    from hf_reference import hf_config

    with torch.device("meta"):
        return GptOssForCausalLM(hf_config(config))


def test_active_counts_k_of_e_experts_and_not_the_embedding():
    c = preset("tiny")
    t = count_params(c)
    expert = c.num_hidden_layers * c.num_experts * (3 * c.hidden_size * c.intermediate_size
                                                    + 2 * c.intermediate_size + c.hidden_size)
    embedding = c.vocab_size * c.hidden_size
    assert t.total - t.active == embedding + expert * (c.num_experts - c.experts_per_token) // c.num_experts


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_checkpoint_counts_match_config_and_file_bytes(tmp_path, layout):
    config = preset("tiny")
    path = tmp_path / layout
    make_reference(config, path, layout=layout, max_shard_bytes=2**17)
    from_files, from_config = count_checkpoint(path), count_params(config)
    for field in ("mlp", "attention", "embed_unembed", "active", "total"):
        assert getattr(from_files, field) == getattr(from_config, field), field
    # make_reference writes fp32 non-expert tensors: bytes on disk = tensor data, headers aside
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert from_files.checkpoint_bytes < on_disk < from_files.checkpoint_bytes + 64 * 1024
    assert from_files.checkpoint_bytes > from_config.checkpoint_bytes  # fp32 vs the bf16 the preset assumes


def test_cli_on_checkpoint_folder(tmp_path):
    from gptoss import synthetic

    config = preset("tiny")
    write_checkpoint(dict(synthetic.random_tensors(config, 0)), config, tmp_path / "m", "hf")
    out = subprocess.run([sys.executable, "-m", "gptoss", "params", str(tmp_path / "m"), "tiny"],
                         capture_output=True, text=True, check=True).stdout
    rows = table_rows(out)
    assert rows["m"][:5] == rows["tiny"][:5]
