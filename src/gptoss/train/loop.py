"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, checkpoints, exact resume.

One optimizer step = `grad_accum` micro-batches of `batch_size` packed sequences. The loss is the sum of
token cross-entropies divided by the number of target tokens of the whole step, so accumulation (and later
data parallelism) gives the same gradient as one big batch. Weights are fp32 (the optimizer's master copy);
the forward may run under bf16 autocast.

On disk, out_dir/step-NNNNNN/ holds
  model/                      an inference checkpoint (gptoss.load reads it; experts quantized to MXFP4)
  adapter/                    with [lora] on qkv/out: the adapters alone, PEFT's format (train/lora.py)
  train_state.safetensors     fp32 weights, AdamW moments, RNG state: everything exact resume needs
  train_state.json            step, optimizer hyper-parameters, the resolved training config
and out_dir/metrics.jsonl gets one line per step.

With [lora], only the adapters train (train/lora.py) and the saved model/ has them merged; under torchrun the
step is split across ranks (train/distributed.py) and only rank 0 writes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import dense_experts_to_mxfp4, load, write_checkpoint
from ..errors import ConfigError
from ..model import Transformer
from .config import TrainConfig
from . import distributed, throughput
from .data import Batch, Document, PackedDataset, TokenMap, read_documents
from .distributed import DistInfo, full_tensor
from .lora import PEFT_MODULES, StackedLoRA, add_lora, lora_modules, merged_experts, save_peft_adapter
from .moe import LoadMeter, moe_layers, record_routing, router_losses, update_expert_bias
from .stability import SpikeMeter

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


def get_lr(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at the last step (nanoGPT)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------- model
def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2-style init: N(0, 0.02) matrices, residual output projections scaled by 1/√(2·layers), zero
    biases and sinks, unit norm scales. Deterministic in `seed`, independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif p.dim() == 1 or name.endswith("_bias") or name.endswith("sinks"):
                p.zero_()
            else:
                s = out_std if name.endswith(("attn.out.weight", "mlp2_weight.weight", "mlp.mlp2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s)


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """fp32 weights to train; with LoRA the frozen base may be bf16 ([lora] base_dtype)."""
    choice = cfg.lora.base_dtype if cfg.lora.rank else "float32"
    if choice == "auto":
        choice = "bfloat16" if cfg.train.dtype == "bfloat16" else "float32"
    return getattr(torch, choice)


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """A trainable model: fp32 weights, dense experts. From a checkpoint (init_from) or freshly initialised.
    With [lora]: the checkpoint frozen as loaded (experts stay MXFP4) plus trainable adapters."""
    if cfg.model.init_from is not None:
        model = load(cfg.path(cfg.model.init_from), dtype=base_dtype(cfg))
    else:
        model = Transformer(cfg.model_config(), device="meta", dtype=torch.float32)
        model = model.to_empty(device="cpu")
    if cfg.lora.rank:
        add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, seed=cfg.train.seed)
    else:
        model.dense_experts(torch.float32).requires_grad_(True)
    if cfg.model.init_from is None:
        init_weights(model, cfg.train.seed)
    for m in moe_layers(model):
        m.capacity_factor = cfg.moe.capacity_factor or None
        m.capacity_priority = cfg.moe.capacity_priority
        if cfg.moe.bias_update_rate > 0:
            m.expert_bias = torch.zeros(model.config.num_experts)
    record_routing(model, True)  # for the router losses and the load metrics
    model.checkpointing = cfg.train.checkpointing
    model = model.to(device).train()
    if cfg.train.compile:  # each block whole (no graph breaks: model.grouped_experts, trainable_sdpa_with_sinks)
        for block in model.block:
            block.compile(dynamic=False)
        model.compiled_head_loss = torch.compile(head_loss_sum)  # the fp32 logits fused into the cross-entropy
    return model


def export_tensors(model: Transformer, dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None):
    """(original name, tensor) of an inference checkpoint: dense experts quantized to MXFP4 blocks/scales,
    LoRA adapters merged into their base weights (as lora.merge_lora), MXFP4 experts passed through as they
    are. `state`: the model's full state dict when it is not the model's own (gathered FSDP shards)."""
    state = model.state_dict() if state is None else state
    scaling = {name: m.scaling for name, m in lora_modules(model).items()}
    stacked = {name: m.scaling for name, m in model.named_modules() if isinstance(m, StackedLoRA)}
    for name, t in state.items():
        owner, leaf = name.rsplit(".", 1)
        if leaf in ("lora_A", "lora_B"):
            continue
        adapter = re.sub(r"\.(mlp[12])_weight$", r".expert_lora.\1", owner)  # block.N.mlp.expert_lora.mlp1
        if adapter in stacked and leaf in ("blocks", "scales", "weight"):  # experts with adapters: merged,
            if leaf == "scales":  # re-quantized (lossy: lora.merge_lora), with their blocks
                continue
            base = (t, state[owner + ".scales"]) if leaf == "blocks" else t
            lora = (state[adapter + ".lora_A"], state[adapter + ".lora_B"], stacked[adapter])
            yield from dense_experts_to_mxfp4(owner + ".weight", merged_experts(base, lora))
            continue
        t = t.detach().cpu()
        if owner in scaling and leaf == "weight":  # W + (alpha/rank)·B·A, fp32 math, as LoRALinear.merged_weight
            B, A = state[owner + ".lora_B"].detach().cpu(), state[owner + ".lora_A"].detach().cpu()
            t = (t.float() + scaling[owner] * (B @ A)).to(t.dtype)
        if re.fullmatch(r".*_weight\.weight", name):
            yield from dense_experts_to_mxfp4(name, t)
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t


def save_model(model: Transformer, path: str | Path, layout: str = "hf", dtype: torch.dtype = torch.bfloat16,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a trained model as a gptoss/transformers checkpoint (experts MXFP4, other tensors in `dtype`,
    LoRA adapters merged)."""
    if not model.config.checkpoint_compatible:
        raise ConfigError("a model with qk_norm, LayerNorm, learned positions, a dense FFN or no sinks cannot be "
                          "written as a GPT-oss checkpoint (the layouts have no slot for those tensors); its "
                          "weights are in the step folder's train_state.safetensors")
    write_checkpoint(export_tensors(model, dtype, state), model.config, path, layout)


# ---------------------------------------------------------------- loss
def head_loss_sum(unembedding: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the unembedded hidden states h [n, D] against targets [n] (fp32 logits)."""
    return F.cross_entropy(unembedding(h).float(), targets, reduction="sum")


def lm_loss_sum(model: Transformer, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target tokens, and their count.

    Only the target positions go through the unembedding (the largest matmul, and with a 200k vocabulary
    the largest activation): assistant-only masks skip most of it. With [train] compile the model carries a
    compiled head_loss_sum (build_model)."""
    h = model.hidden_states(batch.tokens, batch.positions, segments=batch.segments)  # (B, L, D)
    h = h[batch.mask]  # (n, D)
    head = getattr(model, "compiled_head_loss", None) or head_loss_sum
    return head(model.unembedding, h, batch.targets[batch.mask]), int(batch.mask.sum())


def evaluate(model: Transformer, data: PackedDataset, batch_size: int, info: DistInfo, device: torch.device,
             amp) -> float:
    """Mean next-token loss over every sequence of `data` (validation), without gradients, in eval mode.

    Every rank runs the same batches (FSDP's collectives need it), each its slice: a last batch that does not
    split evenly is padded with copies of its first sequence whose targets are all masked."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    W = info.world_size
    with torch.no_grad():
        for start in range(0, data.num_samples, batch_size):
            ids = list(range(start, min(start + batch_size, data.num_samples)))
            pad = -len(ids) % W
            b = data.batch(ids + [ids[0]] * pad)
            if pad:
                b.mask[len(ids):] = False
            b = distributed.rank_slice(b, info).to(device)
            with amp:
                loss, n = lm_loss_sum(model, b)
            totals += torch.tensor([loss.item(), n], dtype=torch.float64)
    totals = distributed.all_reduce_sum(totals, info)
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))


class LMLoss(torch.nn.Module):
    """lm_loss_sum as a module: what DDP/FSDP wrap (their hooks run on a module's forward)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, mask, positions, segments) -> torch.Tensor:
        return lm_loss_sum(self.model, Batch(tokens, targets, mask, positions, segments))[0]


def param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- save / resume
def save_train_state(path: Path, model: Transformer, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                     weights: dict[str, torch.Tensor] | None = None, write: bool = True) -> None:
    """weights: the full state dict if not the model's own (FSDP); FSDP's AdamW moments are gathered here,
    so every rank calls this and only the one with `write` writes. A model with frozen parameters (LoRA) keeps
    only its trainable ones: the frozen base is the `init_from` checkpoint, rebuilt as it was at resume (the
    20b's base would add 13 GB to every save)."""
    from ..safetensors_io import save_file  # keeps the umask's file mode

    partial = any(not p.requires_grad for p in model.parameters())
    if weights is None:
        weights = model.state_dict()
    if partial:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in trainable}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    sd = opt.state_dict()
    for i, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = full_tensor(torch.as_tensor(v)).detach().cpu().contiguous()
    if not write:
        return
    path.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(moe_layers(model)):
        if m.expert_bias is not None:  # a buffer outside state_dict (no slot for it in GPT-oss checkpoints)
            tensors[f"expert_bias.{i}"] = m.expert_bias.detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, path / STATE_FILE)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"step": step, "param_groups": groups, "config": cfg.to_dict(),
            "model_config": model.config.to_original_dict(), "weights": "trainable" if partial else "all"}
    (path / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_train_state(path: Path, model: Transformer, opt: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG saved by save_train_state; returns the step to continue from."""
    from safetensors.torch import load_file

    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_FILE))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if meta.get("weights") == "trainable":  # the frozen base came from init_from; these are what trained
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise ConfigError(f"{path / STATE_FILE}: holds the trainable tensors of another setup "
                              f"({len(weights)} saved, {len(trainable)} trainable now; e.g. "
                              f"{sorted(set(weights) ^ trainable)[:3]}): resume with the [lora] section it had")
        named = dict(model.named_parameters())
        for name, value in weights.items():
            if value.shape != named[name].shape:
                raise ConfigError(f"{path / STATE_FILE}: {name} has shape {list(value.shape)}, the configured "
                                  f"model's is {list(named[name].shape)}: resume with the [lora] section it had")
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value)
    else:
        try:
            model.load_state_dict(distributed.shard_like(weights, model.state_dict()), strict=True)
        except RuntimeError as e:
            raise ConfigError(f"{path / STATE_FILE}: does not fit the configured model ({e})") from None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    distributed.shard_optimizer_state(opt)
    for i, m in enumerate(moe_layers(model)):
        if f"expert_bias.{i}" in tensors and m.expert_bias is not None:
            m.expert_bias.copy_(tensors[f"expert_bias.{i}"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


def saved_steps(out_dir: Path) -> list[Path]:
    """The run's complete step folders, oldest first (the JSON is written after the weights)."""
    return sorted(p for p in out_dir.glob("step-*") if (p / STATE_JSON).exists())


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = saved_steps(out_dir)
    return steps[-1] if steps else None


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: Transformer | None  # None after a run in a process group train() created (torchrun)
    losses: list[float] = field(default_factory=list)  # per step run in this call
    metrics: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None  # the last saved step folder (its model/ is the inference checkpoint)
    dataset: PackedDataset | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig, documents: Sequence[Document] | None = None, token_map: TokenMap | None = None,
          progress: bool = True, max_steps: int | None = None,
          on_step: Callable[[dict], None] | None = None,
          prepare: Callable[[Transformer], None] | None = None, dist: DistInfo | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`.

    documents: in-memory documents instead of cfg.data.files; token_map: full o200k_harmony ids → model ids,
    applied after tokenization; max_steps: stop after this step number (the schedule still spans
    cfg.train.steps — for tests of resume); on_step: called with each step's metrics dict; prepare: called
    with the freshly built model before training (e.g. a special initialisation; not re-run state on resume);
    dist: rank and world size (default: read from torchrun's environment, here and only here).
    """
    info = distributed.from_env() if dist is None else dist
    t = cfg.train
    threads = torch.get_num_threads()
    if t.threads:
        torch.set_num_threads(t.threads)
    try:
        return _train_joined(cfg, documents, token_map, progress, max_steps, on_step, prepare, info)
    finally:
        torch.set_num_threads(threads)


def _train_joined(cfg, documents, token_map, progress, max_steps, on_step, prepare, info: DistInfo) -> TrainResult:
    """train() inside the process group (joined here if torchrun started us and nobody did yet)."""
    t = cfg.train
    device = distributed.local_device(info, resolve_device(t.device))
    joined = info.enabled and not torch.distributed.is_initialized()
    distributed.init(info, device)
    if not joined:
        return _train(cfg, documents, token_map, progress, max_steps, on_step, prepare, info, device)
    try:
        result = _train(cfg, documents, token_map, progress, max_steps, on_step, prepare, info, device)
        # The sharded / DDP-wrapped model holds the process group (device mesh, reducer); drop it and collect
        # while the interpreter is whole, or gloo's worker threads die in finalization (SIGABRT, seen in CI).
        result.model = None
        return result
    finally:
        gc.collect()
        distributed.shutdown(info)


def _train(cfg, documents, token_map, progress, max_steps, on_step, prepare, info: DistInfo,
           device: torch.device) -> TrainResult:
    t = cfg.train
    out_dir = cfg.path(t.out_dir)
    torch.manual_seed(t.seed)
    model = build_model(cfg, device)
    if prepare is not None:
        prepare(model)
    if documents is None:
        if not cfg.data.files:
            raise ConfigError(f"{cfg.source}: [data] field 'files' is empty (give .txt/.jsonl files)")
        documents = read_documents([cfg.path(f) for f in cfg.data.files], txt_split=cfg.data.txt_split,
                                   append_eot=cfg.data.append_eot)
    data = PackedDataset(documents, cfg.data.seq_len, model.config.vocab_size, seed=t.seed,
                         shuffle=cfg.data.shuffle, token_map=token_map, source=cfg.source)
    val_data = None
    if cfg.data.val_files:
        val_docs = read_documents([cfg.path(f) for f in cfg.data.val_files], txt_split=cfg.data.txt_split,
                                  append_eot=cfg.data.append_eot)
        val_data = PackedDataset(val_docs, cfg.data.seq_len, model.config.vocab_size, shuffle=False,
                                 token_map=token_map, source=f"{cfg.source} [data] val_files")
    o, m_cfg = cfg.optim, cfg.moe
    if info.enabled and m_cfg.capacity_factor:  # capacity over the global micro-batch, as one process
        for m in moe_layers(model):
            m.capacity_gather = distributed.row_gather(info)
    step_loss = distributed.wrap(LMLoss(model), model.block, t.parallel, info, device)
    # AdamW's fused kernel with [train] compile (the fast path; also on CPU), else torch's foreach default
    fused = {"fused": True} if t.compile else {"fused": False} if device.type == "cpu" else {}
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            **fused)
    start, resumed_from = 0, None
    if t.resume:
        resumed_from = latest_checkpoint(out_dir)
        if resumed_from is not None:
            start = load_train_state(resumed_from, model, opt)
    metrics_file = out_dir / "metrics.jsonl"
    kept = []
    if start and metrics_file.exists():  # drop lines of steps after the checkpoint (they will be redone)
        kept = [line for line in metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text("".join(line + "\n" for line in kept))
    flops_token = throughput.flops_per_token(model.config, cfg.data.seq_len)
    peak = throughput.peak_tflops(device, t.peak_tflops)
    spikes = {"grad_norm": SpikeMeter(t.spike_window), "loss": SpikeMeter(t.spike_window)}
    for line in kept:  # the spike score's history continues across a resume
        row = json.loads(line)
        for key, meter in spikes.items():
            meter.add(row[key])

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
    per_step = cfg.data.batch_size * t.grad_accum
    end = min(t.steps, max_steps) if max_steps is not None else t.steps
    result = TrainResult(model, dataset=data, checkpoint=resumed_from)
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    W = info.world_size
    reduce = (lambda x: distributed.all_reduce_sum(x, info)) if info.enabled else None
    with (metrics_file.open("a") if info.is_main else open(os.devnull, "w")) as log:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = get_lr(step, o.lr, o.min_lr, o.warmup_steps, t.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            ids = data.indices(step * per_step, per_step)
            micro = [data.batch(ids[k:k + cfg.data.batch_size]) for k in range(0, per_step, cfg.data.batch_size)]
            n_targets = sum(int(b.mask.sum()) for b in micro)
            loss_sum = aux_sum = z_sum = 0.0
            meter = LoadMeter(model.config.num_hidden_layers, model.config.num_experts)
            for b in micro:
                b = distributed.rank_slice(b, info, cfg.source).to(device)
                with amp:
                    loss = step_loss(b.tokens, b.targets, b.mask, b.positions, b.segments)
                    aux, z = router_losses(model, reduce, m_cfg.aux_loss)
                # × W: DDP/FSDP average the ranks' gradients, the one-process gradient is their sum (the
                # ranks' aux losses add up to the global one; the z-loss is a mean, the ranks' average)
                total = loss * W / max(1, n_targets)
                if m_cfg.aux_loss_coef:  # router losses are per-micro-batch means, averaged over the step
                    total = total + m_cfg.aux_loss_coef * aux * W / len(micro)
                if m_cfg.z_loss_coef:
                    total = total + m_cfg.z_loss_coef * z / len(micro)
                total.backward()
                meter.add(model)
                loss_sum += loss.item()
                aux_sum += aux.item() / len(micro)
                z_sum += z.item() / len(micro)
            if info.enabled:  # the step's loss over all ranks; router losses and load counts too
                sums = distributed.all_reduce_sum(torch.tensor([loss_sum, aux_sum, z_sum / W]), info)
                loss_sum, aux_sum, z_sum = sums.tolist()
                meter.selected = distributed.all_reduce_sum(meter.selected, info)
                meter.dropped = distributed.all_reduce_sum(meter.dropped, info)
            clip = o.grad_clip if o.grad_clip > 0 else float("inf")
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if m_cfg.bias_update_rate:
                update_expert_bias(model, meter.selected, m_cfg.bias_update_rate)
            dt = time.perf_counter() - t0
            loss_value = loss_sum / max(1, n_targets)
            tokens = per_step * cfg.data.seq_len  # all processes together
            tflops = flops_token * tokens / dt / 1e12  # model FLOP/s achieved, all processes
            row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "targets": n_targets, "tokens": tokens, "tokens_per_s": tokens / dt, "time_s": dt,
                   "model_tflops": tflops, "mfu": tflops / (peak * info.world_size) if peak else None,
                   "peak_mem_gib": throughput.peak_memory_gib(device),
                   "aux_loss": aux_sum, "z_loss": z_sum, **meter.metrics()}
            row["spike_score_grad_norm"] = spikes["grad_norm"].add(grad_norm)
            row["spike_score_loss"] = spikes["loss"].add(loss_value)
            done = step + 1
            if val_data is not None and (done == end or (t.eval_every and done % t.eval_every == 0)):
                row["val_loss"] = evaluate(model, val_data, cfg.data.batch_size, info, device, amp)
            log.write(json.dumps(row) + "\n")
            log.flush()
            result.losses.append(loss_value)
            result.metrics.append(row)
            if on_step is not None and info.is_main:
                on_step(row)
            if bar is not None:
                bar.update(1)
                shown = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "val_loss" in row:
                    shown["val"] = f"{row['val_loss']:.4f}"
                if row["mfu"] is not None:
                    shown["mfu"] = f"{100 * row['mfu']:.1f}%"
                shown["mem"] = f"{row['peak_mem_gib']:.1f}G"
                bar.set_postfix(shown)
            if done == t.steps or (t.save_every and done % t.save_every == 0):
                result.checkpoint = save_checkpoint(out_dir, model, opt, done, cfg, info)
    if bar is not None:
        bar.close()
    return result


def save_checkpoint(out_dir: Path, model: Transformer, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, info: DistInfo = DistInfo()) -> Path:
    """Every rank calls this (FSDP shards are gathered); only rank 0 writes."""
    path = out_dir / f"step-{step:06d}"
    weights = {k: full_tensor(v) for k, v in model.state_dict().items()}
    if model.config.checkpoint_compatible and info.is_main:  # else: train state only
        save_model(model, path / "model", cfg.train.save_layout, getattr(torch, cfg.train.save_dtype), weights)
    lo = cfg.lora
    if lo.rank and info.is_main and all(t in PEFT_MODULES for t in lo.targets):  # the adapter alone, for PEFT
        save_peft_adapter(model, path / "adapter", lo.rank, lo.alpha, lo.targets, lo.dropout,
                          str(cfg.path(cfg.model.init_from)), weights)
    save_train_state(path, model, opt, step, cfg, weights, write=info.is_main)
    return path
