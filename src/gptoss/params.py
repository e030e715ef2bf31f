"""Parameter accounting as in the GPT-oss model card (Table 1), from tensor shapes alone.

Counting rules of the published table: an MXFP4 tensor of `blocks` [..., G, 16] holds G·32 parameters per
row (two per byte) and its `scales` count as storage, not parameters; "MLP" is experts + router + the MoE
norm; "Attention" includes its norm and sinks; "Active" counts k of E experts per layer, the whole router,
attention, norms and the unembedding — not the embedding, which is a table lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .checkpoint import CheckpointReader, expected_tensors
from .config import PRESETS, ModelConfig, preset
from .errors import ConfigError

_ITEMSIZE = {"float": 2, "uint8": 1}  # a preset is counted as stored by OpenAI: bf16 + MXFP4


@dataclass(frozen=True)
class ParamTable:
    name: str
    mlp: int  # experts + router + MoE norm
    attention: int  # qkv, out, sinks, attention norm
    embed_unembed: int
    active: int
    total: int
    checkpoint_bytes: int  # tensor bytes as stored (MXFP4 experts, bf16 elsewhere for presets)

    def row(self) -> list[str]:
        size = (f"{self.checkpoint_bytes / 2**30:.1f} GiB" if self.checkpoint_bytes >= 2**30
                else f"{self.checkpoint_bytes / 2**20:.1f} MiB")
        # The card's style: one unit per row (B for the real models), two decimals.
        unit, scale = next(((u, s) for u, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if self.total >= s), ("", 1))
        counts = (self.mlp, self.attention, self.embed_unembed, self.active, self.total)
        return [self.name, *(f"{n / scale:.2f}{unit}" for n in counts), size]


def component(name: str) -> str:
    """Which column an (original-named) tensor belongs to: expert | mlp | attention | embedding | unembedding | other."""
    if re.fullmatch(r"block\.\d+\.mlp\.mlp[12]_(weight\.blocks|weight\.scales|bias)", name):
        return "expert"
    if re.fullmatch(r"block\.\d+\.mlp\..*", name):
        return "mlp"
    if re.fullmatch(r"block\.\d+\.attn\..*", name):
        return "attention"
    if name in ("embedding.weight", "unembedding.weight"):
        return name.split(".")[0]
    return "other"


def num_params(name: str, shape: tuple[int, ...]) -> int:
    if name.endswith(".scales"):
        return 0  # one shared exponent per 32 values: storage, not a parameter
    n = 1
    for s in shape:
        n *= s
    return 2 * n if name.endswith(".blocks") else n  # two FP4 values per byte


def tabulate(name: str, config: ModelConfig, tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> ParamTable:
    """tensors: (original name, shape, stored bytes)."""
    by = {k: 0 for k in ("expert", "mlp", "attention", "embedding", "unembedding", "other")}
    total_bytes = 0
    for tensor_name, shape, nbytes in tensors:
        by[component(tensor_name)] += num_params(tensor_name, shape)
        total_bytes += nbytes
    active_experts = by["expert"] * config.experts_per_token // config.num_experts
    return ParamTable(
        name=name,
        mlp=by["expert"] + by["mlp"],
        attention=by["attention"],
        embed_unembed=by["embedding"] + by["unembedding"],
        active=active_experts + by["mlp"] + by["attention"] + by["unembedding"] + by["other"],
        total=sum(by.values()),
        checkpoint_bytes=total_bytes,
    )


def count_params(config: ModelConfig, name: str = "model") -> ParamTable:
    """The table for a config, as OpenAI stores it (bf16, experts MXFP4)."""
    def tensors():
        for tensor_name, (shape, kind) in expected_tensors(config).items():
            n = 1
            for s in shape:
                n *= s
            yield tensor_name, shape, n * _ITEMSIZE[kind]
    return tabulate(name, config, tensors())


def count_checkpoint(path: str | Path) -> ParamTable:
    """The table for a checkpoint folder (either layout), read from safetensors headers only."""
    reader = CheckpointReader(path)  # validates names, shapes and dtypes against config.json

    def tensors():
        for tensor_name in expected_tensors(reader.config):
            infos = [reader.files.index[n] for n in reader._stored_names(tensor_name)]
            rows = sum(i.shape[0] for i in infos)  # q/k/v are stored apart in the HF layout
            yield tensor_name, (rows, *infos[0].shape[1:]), sum(i.nbytes for i in infos)
    return tabulate(Path(path).name, reader.config, tensors())


def format_table(rows: list[ParamTable]) -> str:
    header = ["model", "MLP", "Attention", "Embed + Unembed", "Active", "Total", "Checkpoint"]
    cells = [header] + [r.row() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    line = lambda c: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                                       for i, (x, w) in enumerate(zip(c, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(c) for c in cells[1:]])


def params_command(targets: list[str]) -> str:
    """A preset name or a checkpoint folder per target → the markdown table."""
    rows = []
    for t in targets:
        if t in PRESETS:
            rows.append(count_params(preset(t), t))
        elif Path(t).exists():
            rows.append(count_checkpoint(t))
        else:
            raise ConfigError(f"{t!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")
    return format_table(rows)
