"""The two GPT-oss checkpoint layouts, read and written with safetensors; experts stay MXFP4 throughout.

- "original": OpenAI's `original/` folder — config.json (num_experts, experts_per_token, ...) and
  *.safetensors with `block.N.attn.qkv.weight`, `block.N.mlp.mlp1_weight.blocks`, ... (our parameter names).
- "hf": Hugging Face — config.json (model_type gpt_oss, MXFP4 quantization_config), sharded
  model-0000i-of-0000n.safetensors + model.safetensors.index.json, q/k/v projections stored apart.
The expert bytes are identical in both; only names differ, and q/k/v are concatenated/split along rows.
"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import MXFP4Weight, Transformer
from .safetensors_io import DTYPES, SafetensorsFiles, save_file

LAYOUTS = ("hf", "original")
HF_INDEX = "model.safetensors.index.json"

# original name → Hugging Face name; {i} is the layer. q/k/v are handled apart (one original tensor, three HF).
GLOBAL_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "block.{i}.attn.norm.scale": "model.layers.{i}.input_layernorm.weight",
    "block.{i}.attn.sinks": "model.layers.{i}.self_attn.sinks",
    "block.{i}.attn.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "block.{i}.attn.out.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "block.{i}.mlp.norm.scale": "model.layers.{i}.post_attention_layernorm.weight",
    "block.{i}.mlp.gate.weight": "model.layers.{i}.mlp.router.weight",
    "block.{i}.mlp.gate.bias": "model.layers.{i}.mlp.router.bias",
    "block.{i}.mlp.mlp1_weight.blocks": "model.layers.{i}.mlp.experts.gate_up_proj_blocks",
    "block.{i}.mlp.mlp1_weight.scales": "model.layers.{i}.mlp.experts.gate_up_proj_scales",
    "block.{i}.mlp.mlp1_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "block.{i}.mlp.mlp2_weight.blocks": "model.layers.{i}.mlp.experts.down_proj_blocks",
    "block.{i}.mlp.mlp2_weight.scales": "model.layers.{i}.mlp.experts.down_proj_scales",
    "block.{i}.mlp.mlp2_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
}
VOCAB_IDS = "vocab_ids"  # optional int32 [vocab_size]: the o200k ids of the rows of a vocabulary subset (vocab.py)
QKV = "block.{i}.attn.qkv.{kind}"  # kind: weight | bias
HF_QKV = ("model.layers.{i}.self_attn.q_proj.{kind}", "model.layers.{i}.self_attn.k_proj.{kind}",
          "model.layers.{i}.self_attn.v_proj.{kind}")


def expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """original name → (shape, "float" | "uint8") for every tensor a checkpoint of this config holds."""
    c = config
    E, D, I, V = c.num_experts, c.hidden_size, c.intermediate_size, c.vocab_size
    spec = {"embedding.weight": ((V, D), "float"), "norm.scale": ((D,), "float"),
            "unembedding.weight": ((V, D), "float")}
    for i in range(c.num_hidden_layers):
        layer = {
            "attn.norm.scale": ((D,), "float"),
            "attn.qkv.weight": ((c.qkv_dim, D), "float"),
            "attn.qkv.bias": ((c.qkv_dim,), "float"),
            "attn.sinks": ((c.num_attention_heads,), "float"),
            "attn.out.weight": ((D, c.num_attention_heads * c.head_dim), "float"),
            "attn.out.bias": ((D,), "float"),
            "mlp.norm.scale": ((D,), "float"),
            "mlp.gate.weight": ((E, D), "float"),
            "mlp.gate.bias": ((E,), "float"),
            "mlp.mlp1_weight.blocks": ((E, 2 * I, D // 32, 16), "uint8"),
            "mlp.mlp1_weight.scales": ((E, 2 * I, D // 32), "uint8"),
            "mlp.mlp1_bias": ((E, 2 * I), "float"),
            "mlp.mlp2_weight.blocks": ((E, D, I // 32, 16), "uint8"),
            "mlp.mlp2_weight.scales": ((E, D, I // 32), "uint8"),
            "mlp.mlp2_bias": ((E, D), "float"),
        }
        spec.update({f"block.{i}.{k}": v for k, v in layer.items()})
    return spec


def qkv_split(config: ModelConfig) -> list[int]:
    c = config
    return [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim]


# ---------------------------------------------------------------- locating a checkpoint
def detect_layout(path: Path) -> str:
    """'hf' when config.json says model_type gpt_oss, 'original' for the OpenAI flavour."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with config.json "
                              "and .safetensors files)")
    if not config_file.exists():
        hint = " (it has an original/ folder: did you mean the folder above it?)" if (path / "original").is_dir() else ""
        raise CheckpointError(f"{path}: no config.json{hint}")
    try:
        d = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    return "hf" if isinstance(d, dict) and d.get("model_type") == "gpt_oss" else "original"


def _safetensors_files(path: Path, layout: str) -> list[Path]:
    index_file = path / HF_INDEX
    if layout == "hf" and index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: malformed index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                names = [n for n, v in weight_map.items() if path / v == f]
                raise CheckpointError(f"{f}: missing shard listed in {index_file.name} (holds {names[0]}"
                                      f"{f' and {len(names) - 1} more' if len(names) > 1 else ''})")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        extra = f"; found {', '.join(others)}, which gptoss does not read (never unpickles)" if others else ""
        raise CheckpointError(f"{path}: no .safetensors files{extra}")
    return files


class CheckpointReader:
    """A checkpoint on disk, presented under original names, tensors memory-mapped and in their stored dtype."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout = detect_layout(self.path)
        self.config = ModelConfig.from_json(self.path / "config.json")
        self.files = SafetensorsFiles(_safetensors_files(self.path, self.layout))
        self._check()

    def _stored_names(self, name: str) -> list[str]:
        """The names under which the original-named tensor is stored in this layout."""
        if self.layout == "original" or name == VOCAB_IDS:
            return [name]
        m = re.fullmatch(r"block\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if m:
            return [t.format(i=m[1], kind=m[2]) for t in HF_QKV]
        m = re.fullmatch(r"block\.(\d+)\.(.*)", name)
        if m:
            return [LAYER_NAMES["block.{i}." + m[2]].format(i=m[1])]
        return [GLOBAL_NAMES[name]]

    def _check(self) -> None:
        """Every expected tensor present with the right shape and dtype, and nothing unexpected."""
        spec = expected_tensors(self.config)
        seen: set[str] = set()
        for name, (shape, kind) in spec.items():
            stored = self._stored_names(name)
            parts = qkv_split(self.config) if len(stored) == 3 else [shape[0]]
            for stored_name, rows in zip(stored, parts):
                if stored_name not in self.files:
                    raise CheckpointError(f"{self.path}: tensor '{stored_name}' is missing "
                                          f"({self.layout} layout, config {self.path / 'config.json'})")
                info = self.files.index[stored_name]
                want = (rows, *shape[1:])
                if info.shape != want:
                    raise CheckpointError(f"{info.file}: tensor '{stored_name}' has shape {list(info.shape)}, "
                                          f"expected {list(want)} from config.json")
                ok = info.dtype == "U8" if kind == "uint8" else info.dtype in ("BF16", "F16", "F32")
                if not ok:
                    want_dtype = "U8" if kind == "uint8" else "BF16, F16 or F32"
                    raise CheckpointError(f"{info.file}: tensor '{stored_name}' has dtype {info.dtype}, "
                                          f"expected {want_dtype}")
                seen.add(stored_name)
        if VOCAB_IDS in self.files:  # a vocabulary subset: row r of the embeddings stands for id vocab_ids[r]
            from .vocab import check_vocab_ids

            info = self.files.index[VOCAB_IDS]
            if info.dtype not in ("I32", "I64"):
                raise CheckpointError(f"{info.file}: tensor '{VOCAB_IDS}' has dtype {info.dtype}, expected I32")
            check_vocab_ids(self.files.get(VOCAB_IDS), self.config.vocab_size, f"{info.file}: tensor '{VOCAB_IDS}'")
            seen.add(VOCAB_IDS)
        extra = sorted(set(self.files.names()) - seen)
        if extra:
            raise CheckpointError(f"{self.files.index[extra[0]].file}: unexpected tensor '{extra[0]}'"
                                  f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} for a "
                                  f"{self.config.num_hidden_layers}-layer GPT-oss config")

    def get(self, name: str) -> torch.Tensor:
        names = self._stored_names(name)
        if len(names) == 1:
            return self.files.get(names[0])
        # fused (HF q/k/v → qkv): read the parts into one buffer with file reads, not via the mmap
        parts = [self.files.get(n) for n in names]  # mmap'd views: only their shapes and dtypes are used here
        out = torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:], dtype=parts[0].dtype)
        row = 0
        for n, part in zip(names, parts):
            self.files.read_into(n, out[row:row + part.shape[0]])
            row += part.shape[0]
        return out

    def read(self, name: str) -> torch.Tensor:
        """The tensor in ordinary memory, read with file reads (get's mmap'd view can be evicted and re-read:
        streaming.py keeps everything but the experts resident this way)."""
        names = self._stored_names(name)
        if len(names) > 1:
            return self.get(name)  # already read into a buffer of its own
        info = self.files.index[names[0]]
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        self.files.read_into(names[0], out)
        return out

    def get_slice(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Only the region `index` of an original-named tensor, read without the rest (gptoss.parallel: each
        rank reads its shard). For the fused qkv of the HF layout, the row range must lie within q, k or v."""
        names = self._stored_names(name)
        if len(names) == 1:
            return self.files.get_slice(names[0], index)
        sizes = qkv_split(self.config)
        first, last, _ = (index[0] if index else slice(None)).indices(sum(sizes))
        start = 0
        for stored, size in zip(names, sizes):
            if start <= first and last <= start + size:
                return self.files.get_slice(stored, (slice(first - start, last - start), *index[1:]))
            start += size
        raise CheckpointError(f"{self.path}: rows {first}:{last} of '{name}' span more than one of "
                              f"{', '.join(names)}; read each part's rows separately")

    @property
    def vocab_ids(self) -> torch.Tensor | None:
        return self.files.get(VOCAB_IDS) if VOCAB_IDS in self.files else None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in expected_tensors(self.config):
            yield name, self.get(name)
        if self.vocab_ids is not None:
            yield VOCAB_IDS, self.vocab_ids


# ---------------------------------------------------------------- load
def load(path: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.bfloat16, progress: bool = False,
         expert_pool_bytes: int | None = None, dense_experts: bool | None = None) -> Transformer:
    """Load a checkpoint in either layout. Expert weights stay MXFP4 (uint8), memory-mapped on CPU.

    expert_pool_bytes: stream the experts from disk through a pool of that many bytes (streaming.py; a model
    larger than memory): then every other tensor but the embedding is read into ordinary memory, so that
    memory pressure evicts nothing the model needs on every token, and the experts are not loaded at all.

    dense_experts: dequantize the experts once, to `dtype` (exact: MXFP4 values fit in bf16 and fp32). None
    decides by device: on a GPU, yes when the dense copy takes at most half of its free memory (then a step
    runs one grouped GEMM per projection instead of dequantizing every chosen expert again: gpt-oss-20b on
    an H200 decoded 8 tok/s that way); on the CPU, no (its kernels read MXFP4 in place, at a quarter of the
    bytes).

    A checkpoint with `vocab_ids` (a vocabulary subset) loads as a vocab.VocabSubsetModel: callers keep
    using full o200k ids, and sampling never leaves the subset."""
    reader = CheckpointReader(path)
    config = reader.config
    streaming = expert_pool_bytes is not None
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
        if streaming:  # empty expert stacks: the pool holds the experts
            for block in model.block:
                block.mlp.mlp1_weight = MXFP4Weight(0, 2 * config.intermediate_size, config.hidden_size)
                block.mlp.mlp2_weight = MXFP4Weight(0, config.hidden_size, config.intermediate_size)
    state = model.state_dict()
    names = list(expected_tensors(config))
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc=f"loading {Path(path).name}", unit="tensor")
    loaded = {}
    for name in iterator:
        if streaming and name.endswith((".blocks", ".scales")):
            loaded[name] = torch.empty(state[name].shape, dtype=torch.uint8, device=device)
            continue
        resident = streaming and name != "embedding.weight"  # the embedding: a token reads its own row
        tensor = reader.read(name) if resident else reader.get(name)
        target = state[name].dtype  # uint8 for MXFP4, fp32 for norms/sinks, `dtype` for the rest
        if tensor.dtype != target:
            tensor = tensor.to(target)
        loaded[name] = tensor if device is None else tensor.to(device)
    model.load_state_dict(loaded, strict=True, assign=True)
    if not streaming and _want_dense_experts(dense_experts, model, dtype):
        model.dense_experts(dtype)
    model = model.eval().requires_grad_(False)
    if streaming:
        from .streaming import ExpertPool, expert_extents, expert_nbytes

        slots = expert_pool_bytes // expert_nbytes(config, torch.finfo(dtype).bits // 8)
        biases = [(block.mlp.mlp1_bias, block.mlp.mlp2_bias) for block in model.block]
        model.expert_pool = ExpertPool(config, expert_extents(reader), biases, slots, device=device)
        model.expert_pool.routers = [(block.mlp.norm, block.mlp.gate) for block in model.block]
        for i, block in enumerate(model.block):
            block.mlp.streamed = model.expert_pool.layer(i)
    if reader.vocab_ids is not None:
        from .vocab import VocabSubsetModel

        model = VocabSubsetModel(model, reader.vocab_ids)
    # The model's modules and tensors (and whatever was imported to build it) live as long as the process
    # typically does: keep them out of the cyclic GC's full collections, which otherwise walk them all a few
    # times a second while decoding (≈ 3 % of a 20b decode step on CPU, measured with perf).
    gc.freeze()
    return model


def _want_dense_experts(choice: bool | None, model: Transformer, dtype: torch.dtype) -> bool:
    """load's dense_experts=None rule: a GPU with room for the dense copy twice over."""
    if choice is not None:
        return choice
    device = model.embedding.weight.device
    if device.type != "cuda":
        return False
    values = sum(2 * block.mlp.mlp1_weight.blocks.numel() + 2 * block.mlp.mlp2_weight.blocks.numel()
                 for block in model.block)  # two FP4 values per byte
    free, _ = torch.cuda.mem_get_info(device)
    return values * (torch.finfo(dtype).bits // 8) <= free // 2


def resident_bytes(path: "str | Path | CheckpointReader",
                   dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(bytes kept in memory when streaming: all but the experts and the embedding, in `dtype` where they
    are not fp32; the experts' bytes; the whole checkpoint's bytes) from the headers."""
    reader = path if isinstance(path, CheckpointReader) else CheckpointReader(path)
    spec = expected_tensors(reader.config)
    resident = experts = total = 0
    for name, (shape, kind) in spec.items():
        n = math.prod(shape)
        stored = sum(reader.files.index[s].nbytes for s in reader._stored_names(name))
        total += stored
        if kind == "uint8":
            experts += stored
        elif name != "embedding.weight":
            fp32 = name.endswith(("norm.scale", "sinks"))
            resident += n * (4 if fp32 else torch.finfo(dtype).bits // 8)
    return resident, experts, total


# ---------------------------------------------------------------- save and convert
def _stored_items(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                  layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Original-named tensors → the names (and q/k/v split) of `layout`."""
    for name, t in tensors:
        m = re.fullmatch(r"block\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if layout == "original" or name == VOCAB_IDS:
            yield name, t
        elif m:
            for template, part in zip(HF_QKV, t.split(qkv_split(config), dim=0)):
                yield template.format(i=m[1], kind=m[2]), part
        elif name.startswith("block."):
            i, rest = name.split(".", 2)[1:]
            yield LAYER_NAMES["block.{i}." + rest].format(i=i), t
        else:
            yield GLOBAL_NAMES[name], t


def write_checkpoint(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     config: ModelConfig, path: str | Path, layout: str = "hf",
                     max_shard_bytes: int = 5 * 2**30, progress: bool = False,
                     save_shard: Callable[[dict[str, torch.Tensor], Path], None] | None = None) -> None:
    """Write original-named tensors (in their given dtypes) as a checkpoint folder in `layout`.

    Tensors may come from a generator: each shard is written as soon as it is full, so at most one shard
    is held in memory (a 12.8 GiB checkpoint can be generated on a 24 GiB machine). save_shard(tensors, file)
    writes one shard (default: safetensors_io.save_file).
    """
    save_shard = save_shard or save_file
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):  # a stale shard would be read as part of the new checkpoint
        old.unlink()
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"writing {path.name}", unit="B", unit_scale=True)
    parts: list[list[str]] = []  # tensor names per written shard
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_shard(shard, path / f"part-{len(parts):05d}.safetensors")
        parts.append(list(shard))
        shard.clear()

    for name, t in _stored_items(items, config, layout):
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size, total = size + n, total + n
        if bar is not None:
            bar.update(n)
    flush()
    if bar is not None:
        bar.close()
    count = len(parts)
    file_names = [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)] if count > 1 \
        else ["model.safetensors"]
    for k, file_name in enumerate(file_names):
        (path / f"part-{k:05d}.safetensors").rename(path / file_name)
    if layout == "hf":
        weight_map = {name: f for f, names in zip(file_names, parts) for name in names}
        (path / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    elif (path / HF_INDEX).exists():
        (path / HF_INDEX).unlink()
    config_dict = config.to_hf_dict() if layout == "hf" else config.to_original_dict()
    (path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")


def dense_experts_to_mxfp4(name: str, weight: torch.Tensor | Iterable[torch.Tensor]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """A dense expert stack "...mlpN_weight.weight" [E, out, in] (a GPU's dequantized copy, or training's), or
    its experts one at a time (LoRA's merged experts) → its ".blocks" and ".scales" on the CPU, quantized one
    expert at a time (mxfp4.quantize: values that came from MXFP4 come back exactly; the bytes may differ where
    a block's scale was larger than it needed)."""
    from . import mxfp4

    stem = name.removesuffix(".weight")
    pairs = [mxfp4.quantize(w, f"{name}[{e}]") for e, w in enumerate(weight)]
    yield stem + ".blocks", torch.stack([b for b, _ in pairs]).cpu()
    yield stem + ".scales", torch.stack([s for _, s in pairs]).cpu()


def save(model: Transformer, path: str | Path, layout: str = "hf", dtype: torch.dtype = torch.bfloat16,
         max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> None:
    """Save a model; floating tensors are written in `dtype` (bf16 like the released checkpoints). A
    VocabSubsetModel is saved as its inner model plus `vocab_ids`."""
    from .vocab import VocabSubsetModel

    subset = model.vocab_ids.to(torch.int32).cpu() if isinstance(model, VocabSubsetModel) else None
    model = model.model if isinstance(model, VocabSubsetModel) else model

    def tensors():  # a generator: one converted tensor at a time (a 20b model is not copied whole)
        for name, t in model.state_dict().items():
            if re.fullmatch(r".*_weight\.weight", name):  # dense experts: stored as MXFP4, as released
                yield from dense_experts_to_mxfp4(name, t.detach())
                continue
            yield name, (t.to(dtype) if t.is_floating_point() else t).detach().cpu()
        if subset is not None:
            yield VOCAB_IDS, subset

    write_checkpoint(tensors(), model.config, path, layout, max_shard_bytes, progress)


def convert(src: str | Path, dst: str | Path, layout: str, max_shard_bytes: int = 5 * 2**30,
            progress: bool = False) -> None:
    """Rewrite a checkpoint in another layout, tensor bytes unchanged (bit-exact, no dequantization)."""
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError(f"{dst}: output folder must differ from the input folder")
    reader = CheckpointReader(src)
    write_checkpoint(reader.tensors(), reader.config, dst, layout, max_shard_bytes, progress)


def expert_bytes_on_disk(path: str | Path) -> int:
    """Bytes of the MXFP4 expert tensors (blocks + scales) in a checkpoint, from its headers."""
    reader = CheckpointReader(path)
    return sum(info.nbytes for name, info in reader.files.index.items() if re.search(r"(blocks|scales)$", name))

