"""Model configuration: one frozen dataclass, named presets, and both config.json flavours.

Field names follow the OpenAI `original/config.json`; the Hugging Face names
(`num_local_experts`, `num_experts_per_tok`, `rope_scaling`/`rope_parameters`, ...) are mapped on read/write.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Architecture options of the training stack; GPT-oss is every default. The first two keep the checkpoint's
# tensor list (post-norm, dropout); the others add or remove tensors the GPT-oss layouts have no slot for.
VARIANTS = ("norm_placement", "dropout", "qk_norm", "norm_type", "position_embedding", "mlp_type", "attention_sinks")
QK_NORMS = (False, "olmo2", "per_head")
SLIDING = "sliding_attention"
FULL = "full_attention"
MXFP4_BLOCK = 32  # values per MXFP4 block (OCP Microscaling spec)


def alternating_layer_types(num_hidden_layers: int) -> tuple[str, ...]:
    """GPT-oss alternates attention types, starting with a sliding-window layer at layer 0."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_hidden_layers))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    intermediate_size: int = 2880  # expert width; the fused gate/linear projection is 2x this
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    sliding_window: int = 128
    initial_context_length: int = 4096  # YaRN's "original" context
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    rope_truncate: bool = False  # the real checkpoints do not round the YaRN correction range
    rms_norm_eps: float = 1e-5
    layer_types: tuple[str, ...] = field(default=())  # empty = alternating, sliding first
    # Training variants (not in GPT-oss; written to config.json only when they differ from it):
    norm_placement: str = "pre"  # "pre" (GPT-oss) or "post" (OLMo-2: norm on each sublayer's output)
    # QK-norm, before RoPE: "olmo2" = RMSNorm over the whole q and k projections (num_heads·head_dim, OLMo-2),
    # "per_head" = RMSNorm of each head over head_dim (Qwen3); False = none (GPT-oss)
    qk_norm: bool | str = False
    # GPT-2-style ablations (one code path from GPT-2 to GPT-oss; MHA is num_key_value_heads =
    # num_attention_heads, all-global attention is layer_types of "full_attention" only):
    dropout: float = 0.0  # on attention weights, each residual branch and the embeddings, in training (GPT-2: 0.1)
    norm_type: str = "rms"  # "rms" (GPT-oss) or "layer" (LayerNorm: centred, with a bias; GPT-2)
    position_embedding: str = "rope"  # "rope" (YaRN RoPE, GPT-oss) or "learned" (absolute, GPT-2)
    mlp_type: str = "moe"  # "moe" (GPT-oss), "swiglu" (one dense clamped-SwiGLU FFN) or "gelu" (dense, GPT-2)
    attention_sinks: bool = True  # GPT-oss's learned per-head sink logit; false = plain softmax

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", alternating_layer_types(self.num_hidden_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- derived values ----
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_dim(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def checkpoint_compatible(self) -> bool:
        """Whether the GPT-oss checkpoint layouts hold every tensor of this model (see VARIANTS)."""
        return all(getattr(self, name) == getattr(ModelConfig, name) for name in VARIANTS[2:])

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first field that is out of range."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{name}' = {getattr(self, name)!r} {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_experts", "experts_per_token",
                     "intermediate_size", "sliding_window", "initial_context_length",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("swiglu_limit", "swiglu_alpha", "rope_theta", "rope_scaling_factor",
                     "rope_ntk_alpha", "rope_ntk_beta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise bad(name, "must be a positive finite number")
        if self.rope_scaling_factor < 1:
            raise bad("rope_scaling_factor", "must be >= 1 (1 disables YaRN)")
        if self.rope_ntk_beta <= self.rope_ntk_alpha:
            raise bad("rope_ntk_beta", f"(beta_fast) must exceed rope_ntk_alpha (beta_slow) = {self.rope_ntk_alpha}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE rotates half-dimension pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"must be a multiple of num_key_value_heads = {self.num_key_value_heads}")
        if self.experts_per_token > self.num_experts:
            raise bad("experts_per_token", f"must be <= num_experts = {self.num_experts}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                raise bad(name, f"must be a multiple of {MXFP4_BLOCK} (MXFP4 block size)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: field 'layer_types' has {len(self.layer_types)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        if self.norm_placement not in ("pre", "post"):
            raise bad("norm_placement", "must be 'pre' or 'post'")
        if not isinstance(self.attention_sinks, bool):
            raise bad("attention_sinks", "must be true or false")
        if self.qk_norm is True:
            raise bad("qk_norm", "is ambiguous: use 'olmo2' (RMSNorm over the whole q and k projections, OLMo-2) "
                                 "or 'per_head' (RMSNorm of each head, Qwen3)")
        if self.qk_norm not in QK_NORMS:
            raise bad("qk_norm", "must be false, 'olmo2' or 'per_head'")
        for name, allowed in (("norm_type", ("rms", "layer")), ("position_embedding", ("rope", "learned")),
                              ("mlp_type", ("moe", "swiglu", "gelu"))):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(map(repr, allowed))}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise bad("dropout", "must be in [0, 1)")
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise ConfigError(f"{source}: field 'layer_types[{i}]' = {kind!r} must be '{SLIDING}' or '{FULL}'")

    # ---- config.json flavours ----
    def to_original_dict(self) -> dict[str, Any]:
        """The OpenAI `original/config.json` flavour."""
        d = {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window, "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha, "rope_ntk_beta": self.rope_ntk_beta,
        }
        # Fields the original format does not carry are written only when they differ from GPT-oss.
        for name in ("swiglu_alpha", "rms_norm_eps", "max_position_embeddings", "rope_truncate", *VARIANTS):
            if getattr(self, name) != getattr(ModelConfig, name):
                d[name] = getattr(self, name)
        if self.layer_types != alternating_layer_types(self.num_hidden_layers):
            d["layer_types"] = list(self.layer_types)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` flavour (model_type gpt_oss, MXFP4 experts)."""
        d = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "num_local_experts": self.num_experts,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn", "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta, "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": self.rope_truncate,
            },
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },
        }
        d |= {name: getattr(self, name) for name in VARIANTS if getattr(self, name) != getattr(ModelConfig, name)}
        if self.vocab_size > 200002:  # the o200k_harmony ids of <|return|> and <|endoftext|>
            d |= {"eos_token_id": 200002, "pad_token_id": 199999}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read either flavour; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ConfigError(f"{source}: field 'model_type' = {d['model_type']!r}, expected 'gpt_oss'")
        hf = d.get("model_type") == "gpt_oss"
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        if hf:
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if rope.get("rope_type", "yarn") != "yarn":
                raise ConfigError(f"{source}: field 'rope_scaling.rope_type' = {rope['rope_type']!r}, expected 'yarn'")
            renames = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
            kw.update({new: d[old] for old, new in renames.items() if old in d})
            rope_map = {"factor": "rope_scaling_factor", "beta_fast": "rope_ntk_beta", "beta_slow": "rope_ntk_alpha",
                        "original_max_position_embeddings": "initial_context_length",
                        "truncate": "rope_truncate", "rope_theta": "rope_theta"}
            kw.update({new: rope[old] for old, new in rope_map.items() if old in rope})
            if d.get("tie_word_embeddings"):
                raise ConfigError(f"{source}: field 'tie_word_embeddings' is true; GPT-oss has an untied unembedding")
        missing = [n for n in ("num_hidden_layers", "hidden_size", "vocab_size") if n not in kw]
        if missing:
            raise ConfigError(f"{source}: required field(s) missing: {', '.join(missing)}")
        if "layer_types" in kw and kw["layer_types"] is not None:
            kw["layer_types"] = tuple(kw["layer_types"])
        else:
            kw.pop("layer_types", None)
        return _build(cls, kw, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))


def _build(cls: type[ModelConfig], kw: dict[str, Any], source: str) -> ModelConfig:
    """Construct and validate, reporting errors against the file they came from."""
    # Floats in JSON may arrive as ints (rope_theta: 150000) and vice versa; normalise the numeric types.
    for f in dataclasses.fields(cls):
        if f.name in kw and f.type == "float" and isinstance(kw[f.name], int) and not isinstance(kw[f.name], bool):
            kw[f.name] = float(kw[f.name])
        if f.name in kw and f.type == "int" and isinstance(kw[f.name], float) and kw[f.name].is_integer():
            kw[f.name] = int(kw[f.name])
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    # Small shapes for tests and experiments; same architecture, every feature exercised.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts=8, experts_per_token=4,
                        intermediate_size=64, sliding_window=8, initial_context_length=64,
                        max_position_embeddings=2048),
    # GPT-2's architecture on the same code path (LayerNorm, learned positions, dense GELU FFN of width 4D,
    # multi-head attention, every layer global, no sinks, dropout 0.1); trainable, saved in the train state only.
    "tiny-gpt2": ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, head_dim=16, intermediate_size=256, sliding_window=8,
                             initial_context_length=64, max_position_embeddings=1024,
                             layer_types=("full_attention",) * 4, dropout=0.1, norm_type="layer",
                             position_embedding="learned", mlp_type="gelu", attention_sinks=False),
    "small": ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, num_experts=8, experts_per_token=2,
                         intermediate_size=256, sliding_window=32, initial_context_length=256,
                         max_position_embeddings=8192),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
