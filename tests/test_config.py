"""Config presets and both config.json flavours, checked against the published files and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss.config import FULL, SLIDING, ModelConfig, preset
from gptoss.errors import ConfigError

DATA = Path(__file__).parent / "data"


def test_published_config_files_give_the_presets():
    assert ModelConfig.from_json(DATA / "gpt-oss-20b.hf.config.json") == preset("gpt-oss-20b")
    assert ModelConfig.from_json(DATA / "gpt-oss-120b.original.config.json") == preset("gpt-oss-120b")


def test_presets_have_the_real_shapes():
    c = preset("gpt-oss-120b")
    assert (c.num_hidden_layers, c.num_experts, c.experts_per_token, c.hidden_size) == (36, 128, 4, 2880)
    assert c.layer_types[:3] == (SLIDING, FULL, SLIDING) and c.sliding_window == 128
    assert (c.rope_theta, c.rope_scaling_factor, c.rope_ntk_beta, c.rope_ntk_alpha) == (150000, 32, 32, 1)
    assert c.qkv_dim == 5120 and c.q_per_kv == 8
    assert preset("gpt-oss-20b").num_experts == 32


def test_written_flavours_read_back_and_load_in_transformers(tmp_path):
    from transformers import AutoConfig

    for name in ("gpt-oss-20b", "tiny"):
        c = preset(name)
        assert ModelConfig.from_dict(c.to_hf_dict()) == c
        assert ModelConfig.from_dict(c.to_original_dict()) == c
        (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
        theirs = AutoConfig.from_pretrained(tmp_path)
        assert theirs.model_type == "gpt_oss" and theirs.num_local_experts == c.num_experts
        assert list(theirs.layer_types) == list(c.layer_types)
        assert theirs.rope_parameters["factor"] == c.rope_scaling_factor


def test_nonstandard_fields_survive_the_original_flavour():
    c = preset("tiny").replace(layer_types=(FULL,) * 4, swiglu_alpha=1.5)
    assert ModelConfig.from_dict(c.to_original_dict()) == c


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "'model_type' = 'llama', expected 'gpt_oss'"),
    ({"tie_word_embeddings": True}, "'tie_word_embeddings' is true"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'rope_scaling.rope_type' = 'linear'"),
    ({"sliding_window": -1}, "'sliding_window' = -1 must be a positive integer"),
    ({"head_dim": 63}, "'head_dim' = 63 must be even"),
    ({"rope_theta": float("nan")}, "'rope_theta' = nan must be a positive finite number"),
])
def test_bad_fields_named(change, message):
    d = json.loads((DATA / "gpt-oss-20b.hf.config.json").read_text()) | change
    with pytest.raises(ConfigError, match=f"my.json: field {message}" if "field" not in message else message):
        ModelConfig.from_dict(d, source="my.json")


def test_missing_required_field_and_unknown_preset():
    with pytest.raises(ConfigError, match="required field.*hidden_size"):
        ModelConfig.from_dict({"num_hidden_layers": 2, "vocab_size": 10})
    with pytest.raises(ConfigError, match="unknown preset 'gpt-oss-7b'; known presets: gpt-oss-20b"):
        preset("gpt-oss-7b")
