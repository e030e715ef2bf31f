"""The training config: a TOML file with sections [model], [data], [optim], [train] (and [moe]).

    [model]
    preset = "tiny"            # a gptoss preset; every ModelConfig field may override it (vocab_size = 1024)
    # init_from = "ckpt/dir"   # fine-tune: start from a checkpoint (either layout) instead of random weights
    [data]
    files = ["corpus/*.txt", "chats.jsonl"]   # .txt, or .jsonl lines with "text", "messages" or "tokens"
    seq_len = 256
    batch_size = 8             # sequences per micro-batch
    [optim]
    lr = 3e-3
    min_lr = 3e-4              # cosine decays lr to min_lr at the last step, after warmup_steps of linear warmup
    # val_files = ["heldout.jsonl"]          # validation loss every [train] eval_every steps and at the end
    [train]
    steps = 500
    out_dir = "runs/tiny"
    # eval_every = 100
    # checkpointing = true     # activation checkpointing (recompute each block in the backward)
    # compile = true           # torch.compile each block (faster steps after a slower first one)
    [lora]                     # optional: LoRA fine-tuning of an init_from checkpoint
    rank = 8

Relative paths (data files, out_dir, init_from) are relative to the TOML file's folder. Unknown fields and
wrong types are errors that name the field and the file.
"""

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, preset
from ..errors import ConfigError


@dataclass
class ModelSection:
    preset: str | None = "tiny"  # None: start from ModelConfig's defaults (gpt-oss-20b's shape)
    init_from: str | None = None  # checkpoint folder to fine-tune
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields given in [model]


@dataclass
class DataSection:
    files: list[str] = field(default_factory=list)
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch, all processes together (each rank takes its slice)
    txt_split: str = "file"  # a .txt file is one document ("file"), one per blank-line paragraph, or per line
    append_eot: bool = True  # end each text document with <|endoftext|> (a learned document boundary)
    shuffle: bool = True  # shuffle documents once (seeded) and sequences every epoch
    val_files: list[str] = field(default_factory=list)  # held-out documents: val_loss every [train] eval_every steps


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (nanoGPT): not on biases, norm scales or sinks
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping (the norm is still logged)


@dataclass
class MoESection:
    """MoE training options; every default leaves routing exactly as GPT-oss does it (see train/moe.py)."""
    aux_loss_coef: float = 0.0  # Switch load-balancing loss α, added per MoE layer; 0.01 is Switch's choice
    aux_loss: str = "per_layer"  # "per_layer" (Switch) or "pooled" (transformers' load_balancing_loss_func)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss, added per MoE layer; 1e-3 is ST-MoE's choice
    bias_update_rate: float = 0.0  # DeepSeek-V3 selection-bias step γ per optimizer step (0: off; 1e-3 theirs)
    capacity_factor: float = 0.0  # expert capacity ⌈tokens·k/E · factor⌉, overflow dropped (0: unlimited)
    capacity_priority: str = "position"  # who is dropped first: later tokens ("position") or low-score ("score")


@dataclass
class LoRASection:
    """LoRA fine-tuning (train/lora.py): rank 0 = off. Needs [model] init_from; experts stay MXFP4, frozen."""
    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # also "gate" (the router) and "experts" (every expert's mlp1/mlp2, over their frozen MXFP4 weights)
    targets: list[str] = field(default_factory=lambda: ["qkv", "out"])
    dropout: float = 0.0  # on the adapter's input only
    # dtype of the frozen base weights outside the experts: "auto" = bfloat16 under bf16 autocast ([train] dtype;
    # the forward rounds them to bf16 anyway, and the 20b's 1.8B of them then take 3.6 GB, not 7.2), else float32
    base_dtype: str = "auto"


@dataclass
class TrainSection:
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    out_dir: str = "runs/train"
    save_every: int = 0  # also save every N steps (0: only at the end)
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "bfloat16"  # autocast dtype of the forward; "float32" = no autocast. Weights stay fp32.
    save_layout: str = "hf"  # layout of the saved inference checkpoint: "hf" or "original"
    save_dtype: str = "bfloat16"  # dtype of its dense tensors (experts are always MXFP4)
    resume: bool = False  # continue from the newest step-* folder in out_dir
    spike_window: int = 1000  # rolling window of the OLMo-2 spike score (steps; train/stability.py)
    eval_every: int = 0  # validation loss on [data] val_files every N steps (0: only at the last step)
    checkpointing: bool = False  # activation checkpointing: keep each block's input, recompute its inside
    # torch.compile each block and the loss (inductor: fused elementwise work; on CPU it needs a C++ compiler),
    # and AdamW's fused kernel. The first step compiles (tens of seconds on CPU): for long runs, not a few steps.
    compile: bool = False
    threads: int = 0  # torch intra-op threads for the run (0: leave torch's setting; `gptoss train --threads`)
    peak_tflops: float = 0.0  # the hardware's peak, for MFU (0: known GPUs only; train/throughput.py)
    parallel: str = "ddp"  # under torchrun (world size > 1): "ddp" (replicated) or "fsdp" (sharded, FSDP2)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would use on the CPU (CXX, else g++/c++/clang++ on PATH), or None."""
    import os
    import shutil

    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    moe: MoESection = field(default_factory=MoESection)
    lora: LoRASection = field(default_factory=LoRASection)
    train: TrainSection = field(default_factory=TrainSection)
    source: str = "config"  # the file it came from, for error messages
    base_dir: str = "."  # relative paths are resolved against this folder

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    def model_config(self) -> ModelConfig:
        """The model shape: the preset with [model] overrides applied (not used with init_from)."""
        base = preset(self.model.preset) if self.model.preset else ModelConfig()
        kw = dict(self.model.overrides)
        if "layer_types" in kw:
            kw["layer_types"] = tuple(kw["layer_types"])
        elif "num_hidden_layers" in kw:  # re-derive for the new depth: all-global stays all-global
            n, kinds = kw["num_hidden_layers"], set(base.layer_types)
            kw["layer_types"] = (base.layer_types[0],) * n if len(kinds) == 1 and isinstance(n, int) else ()
        try:
            return base.replace(**kw)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: [model] {str(e).removeprefix('config: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        overrides = d["model"].pop("overrides")
        d["model"].update(overrides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", base_dir: str | Path = ".") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a table of sections")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section [{unknown[0]}]; known sections: {', '.join(SECTIONS)}")
        model = dict(d.get("model", {}))
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        overrides = {k: model.pop(k) for k in list(model) if k in model_fields}
        sections = {name: _section(SECTIONS[name], d.get(name, {}), source, name) for name in SECTIONS if name != "model"}
        sections["model"] = _section(ModelSection, model, source, "model", extra_known=model_fields)
        sections["model"].overrides = overrides
        cfg = cls(**sections, source=source, base_dir=str(base_dir))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(section: str, name: str, why: str) -> ConfigError:
            value = getattr(getattr(self, section), name)
            return ConfigError(f"{self.source}: [{section}] field '{name}' = {value!r} {why}")

        if self.model.init_from is not None and self.model.overrides:
            raise ConfigError(f"{self.source}: [model] field '{next(iter(self.model.overrides))}' cannot be "
                              "combined with init_from (the checkpoint's config.json fixes the shape)")
        if self.model.init_from is None:
            self.model_config()  # shape errors surface now, naming the field
        for section, name in (("data", "seq_len"), ("data", "batch_size"), ("train", "steps"),
                              ("train", "grad_accum"), ("train", "spike_window")):
            if getattr(getattr(self, section), name) <= 0:
                raise bad(section, name, "must be a positive integer")
        for name in ("warmup_steps",):
            if self.optim.warmup_steps < 0:
                raise bad("optim", name, "must be >= 0")
        for name in ("lr", "beta1", "beta2", "eps"):
            if not getattr(self.optim, name) > 0:
                raise bad("optim", name, "must be > 0")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if getattr(self.optim, name) < 0:
                raise bad("optim", name, "must be >= 0")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            if getattr(self.moe, name) < 0:
                raise bad("moe", name, "must be >= 0")
        if self.lora.rank < 0:
            raise bad("lora", "rank", "must be >= 0 (0: no LoRA)")
        if self.lora.rank:
            from .lora import TARGETS

            if self.model.init_from is None:
                raise ConfigError(f"{self.source}: [lora] needs [model] init_from (a checkpoint to adapt)")
            if not self.lora.targets or any(t not in TARGETS for t in self.lora.targets):
                raise bad("lora", "targets", f"must be a non-empty list of {', '.join(map(repr, TARGETS))}")
            if not self.lora.alpha > 0:
                raise bad("lora", "alpha", "must be > 0")
            if not 0 <= self.lora.dropout < 1:
                raise bad("lora", "dropout", "must be in [0, 1)")
            if self.lora.dropout and "experts" in self.lora.targets:
                raise bad("lora", "dropout", "must be 0 with target 'experts' (PEFT's adapters on expert "
                                             "parameters have no dropout)")
            if self.lora.base_dtype not in ("auto", "bfloat16", "float32"):
                raise bad("lora", "base_dtype", "must be one of 'auto', 'bfloat16', 'float32'")
        if self.optim.min_lr > self.optim.lr:
            raise bad("optim", "min_lr", f"must be <= lr = {self.optim.lr}")
        for name in ("save_every", "eval_every", "threads", "peak_tflops"):
            if getattr(self.train, name) < 0:
                raise bad("train", name, "must be >= 0")
        if self.train.compile and self.train.device != "cuda" and not cpp_compiler():
            raise bad("train", "compile", "needs a C++ compiler on the CPU (torch.compile's inductor builds C++): "
                                          "install g++ (or set CXX), or set compile = false")
        if self.train.eval_every and not self.data.val_files:
            raise bad("train", "eval_every", "needs [data] val_files (the held-out documents)")
        choices = {("data", "txt_split"): ("file", "paragraph", "line"),
                   ("train", "dtype"): ("bfloat16", "float32"),
                   ("train", "save_layout"): ("hf", "original"),
                   ("train", "save_dtype"): ("bfloat16", "float32"),
                   ("train", "parallel"): ("ddp", "fsdp"),
                   ("moe", "aux_loss"): ("per_layer", "pooled"),
                   ("moe", "capacity_priority"): ("position", "score")}
        for (section, name), allowed in choices.items():
            if getattr(getattr(self, section), name) not in allowed:
                raise bad(section, name, f"must be one of {', '.join(map(repr, allowed))}")
        if self.model.preset is not None:
            try:
                preset(self.model.preset)
            except ConfigError as e:
                raise ConfigError(f"{self.source}: [model] field 'preset': {e}") from None


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
                             "moe": MoESection, "lora": LoRASection, "train": TrainSection}


def _check_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return any(_check_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_check_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _section(cls: type, d: Any, source: str, name: str, extra_known: set[str] = frozenset()):
    """Build one section's dataclass, refusing unknown fields and wrong types by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "overrides"}
    for key, value in d.items():
        if key not in known:
            extra = " or a ModelConfig field" if extra_known else ""
            raise ConfigError(f"{source}: [{name}] unknown field '{key}' (known: {', '.join(sorted(known))}{extra})")
        if not _check_type(value, hints[key]):
            raise ConfigError(f"{source}: [{name}] field '{key}' = {value!r} must be of type "
                              f"{getattr(hints[key], '__name__', None) or str(hints[key])}")
    kw = {k: float(v) if hints[k] is float else v for k, v in d.items()}
    return cls(**kw)


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config TOML; errors name the field and the file."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return TrainConfig.from_dict(d, source=str(path), base_dir=path.parent)
