"""The demo model's training recipe, end to end, in one command:

    python -m gptoss.demo.recipe experiments/demo/train_demo.toml [--ship]

1. generate the synthetic Harmony conversations (gptoss.demo.data, seed and count from [demo] below) and the
   vocabulary subset they use (+ one unknown row, which every other id is read as);
2. train with `gptoss.train` on the TOML's [model]/[data]/[optim]/[train] sections, the conversations
   rendered with the current turn's analysis kept and the loss on assistant tokens only, ids mapped to rows;
3. export the trained step (dense experts quantized to MXFP4 by the trainer) with `vocab_ids`, as an
   `original`-layout checkpoint, into [demo].export_dir; with [demo] average_last = K (or --average-last K),
   the uniform average of the last K saved steps' fp32 weights instead of the last step alone;
4. evaluate the exported MXFP4 model with `gptoss eval demo` (bf16, greedy, the held-out seed) and write
   the markdown summary (EVAL.md) and each item's result (results.jsonl) next to it; with --ship, copy it
   into src/gptoss/data/demo and record its sha256.

The TOML is a `gptoss train` config plus a [demo] table (data_seed, data_n, data_version, number_init,
export_dir, eval_n, heldout_eval_n, average_last, init_from, shuffle_seed), which this module reads and removes
before handing the rest to the trainer. With [demo] init_from = an exported demo model (its vocabulary rows must be
a subset of the data's: tokens new to it start as its unknown row), training continues from its weights instead of a
fresh initialization (`continue_from`).
`--run-dir DIR` puts the training run (DIR/train) and the export (DIR/export) outside the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data

if TYPE_CHECKING:
    from ..train import TrainConfig

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "demo"
HASHES_FILE = Path(__file__).resolve().parent / "__init__.py"


def fitted(ex: data.Example, tok, seq_len: int, version: int) -> tuple[list[int], list[bool]]:
    """The conversation rendered for training; in data version 12 a conversation longer than seq_len loses
    its earliest turns until it fits (version 12 gives 30 % of conversations up to 4 earlier turns: left out
    whole, the longest histories would be the ones never trained)."""
    tokens, mask = data.to_document(ex, tok, current_turn_only=version >= 11)
    while data.long_histories(version) and len(tokens) > seq_len and ex.history:
        ex = data.without_earliest_turn(ex)
        tokens, mask = data.to_document(ex, tok, current_turn_only=True)
    return tokens, mask


def documents(examples: list[data.Example], seq_len: int, samples: int, seed: int = 0, version: int = 1):
    """Training documents laid out so that no conversation is cut between two training samples.

    The trainer packs documents into one stream cut every seq_len tokens; a conversation cut in two would
    continue in the next sample without its question. So conversations are binned (first fit, shuffled)
    into groups of at most seq_len tokens, each group topped up to exactly seq_len by a filler document
    (<|endoftext|> tokens, no loss), and handed over in order (the TOML sets [data] shuffle = false):
    sample i is then exactly bin i. Enough epochs, each re-shuffled, to cover `samples` samples. From data
    `version` 11 only the current turn is a target (data.to_document's current_turn_only); from 12 a long
    conversation is shortened by its earliest turns (`fitted`)."""
    import random

    from ..tokenizer import get_tokenizer
    from ..train.data import Document

    tok = get_tokenizer()
    docs = [Document(*fitted(ex, tok, seq_len, version)) for ex in examples]
    fits = [d for d in docs if len(d.tokens) <= seq_len]
    if len(fits) < len(docs):
        print(f"note: {len(docs) - len(fits)} conversations longer than seq_len {seq_len} left out", file=sys.stderr)
    rng = random.Random(seed)
    out: list[Document] = []
    bins_total = 0
    while bins_total < samples:
        rng.shuffle(fits)
        bins: list[list[Document]] = []
        room: list[int] = []
        for d in fits:
            n = len(d.tokens)
            k = next((i for i in range(max(0, len(bins) - 8), len(bins)) if room[i] >= n), None)  # first fit, 8 open
            if k is None:
                bins.append([])
                room.append(seq_len)
                k = len(bins) - 1
            bins[k].append(d)
            room[k] -= n
        for b, left in zip(bins, room):
            out += b
            if left:
                out.append(Document([tok.endoftext] * left, [False] * left))
        bins_total += len(bins)
    return out


def vocab_ids(examples: list[data.Example]) -> torch.Tensor:
    """Row 0: the unknown row (-1); rows 1..: the subset's o200k ids, ascending."""
    from ..vocab import UNKNOWN

    return torch.tensor([UNKNOWN, *data.build_vocab(examples)], dtype=torch.int32)


def token_map(ids: torch.Tensor):
    """full ids → rows, for the trainer (ids outside the subset → the unknown row 0)."""
    from ..tokenizer import VOCAB_SIZE

    to_row = torch.zeros(VOCAB_SIZE, dtype=torch.long)
    known = ids >= 0
    to_row[ids[known].long()] = torch.nonzero(known).flatten()
    return lambda tokens: to_row[torch.tensor(tokens, dtype=torch.long)].tolist()


def number_init(model: torch.nn.Module, ids: torch.Tensor, seed: int = 0, std: float = 0.02) -> int:
    """Give the digit tokens ("0" … "999") compositional embedding and unembedding rows: the sum of a random
    vector per (slot in the chunk, digit) and one per chunk length. A 3-digit token is otherwise a symbol the
    model sees a few hundred times; spelling "482" as 4 8 2, copying it, and writing 4 8 2 back as "482"
    then start from a linear code instead of a per-token memory (run 1 failed exactly there). Independent
    codes for the two matrices (they are not tied). Returns the number of rows set."""
    from ..tokenizer import get_tokenizer

    tok = get_tokenizer()
    g = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    rows = [(r, tok.decode([int(i)])) for r, i in enumerate(ids.tolist()) if i >= 0]
    rows = [(r, s) for r, s in rows if s.isascii() and s.isdigit() and len(s) <= 3]
    with torch.no_grad():
        for weight in (model.embedding.weight, model.unembedding.weight):
            slot = torch.randn(3, 10, D, generator=g) * std  # (slot, digit) codes
            length = torch.randn(4, D, generator=g) * std
            for r, s in rows:
                v = length[len(s)] + sum(slot[k, int(c)] for k, c in enumerate(s))
                weight[r].copy_(v.to(weight.dtype))
    return len(rows)


def export(step_dir: Path, ids: torch.Tensor, out: Path, info: dict) -> Path:
    """The trainer's inference checkpoint (MXFP4 experts) + vocab_ids → an original-layout folder."""
    from ..checkpoint import load, save
    from ..vocab import VocabSubsetModel

    model = load(step_dir / "model", dtype=torch.float32)
    save(VocabSubsetModel(model, ids), out, layout="original", dtype=torch.bfloat16)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def mean_state(step_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform mean (fp64) of several saved steps' fp32 weights (train_state.safetensors, without the AdamW
    moments beside them), keyed as the model's state dict."""
    from safetensors import safe_open

    from ..errors import CheckpointError
    from ..train.loop import STATE_FILE

    total: dict[str, torch.Tensor] = {}
    first: set[str] = set()
    for d in step_dirs:
        with safe_open(str(d / STATE_FILE), "pt") as f:
            names = {k for k in f.keys() if k.startswith("model.")}
            first = first or names
            if names != first:
                raise CheckpointError(f"{d / STATE_FILE}: holds other weights than {step_dirs[0] / STATE_FILE} "
                                      f"(e.g. {sorted(names ^ first)[:3]})")
            for name in names:
                key, t = name[len("model."):], f.get_tensor(name).double()
                total[key] = total[key] + t if key in total else t
    return {k: v / len(step_dirs) for k, v in total.items()}


def write_state(state: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> Path:
    """fp32 weights as an inference checkpoint in out/model (experts quantized to MXFP4 once, here)."""
    from ..model import Transformer
    from ..train.loop import save_model

    model = Transformer(cfg.model_config(), device="meta", dtype=torch.float32)
    save_model(model, out / "model", "original", torch.float32, {k: v.float() for k, v in state.items()})
    return out


def averaged_checkpoint(step_dirs: list[Path], cfg: TrainConfig, out: Path) -> Path:
    """The uniform average of several saved steps' fp32 weights (train_state.safetensors), written as an
    inference checkpoint (experts re-quantized to MXFP4 from the averaged dense weights) into out/model.

    Stochastic weight averaging with a constant learning rate and one model per cycle (Izmailov et al. 2018,
    "Averaging Weights Leads to Wider Optima and Better Generalization", Algorithm 1: w_SWA ← (w_SWA·n + w)/(n+1))
    over the tail of one run (the "latest weight averaging" of Kaddour 2022, "Stop Wasting My Time! Saving Days
    of ImageNet and BERT Training with Latest Weight Averaging")."""
    return write_state(mean_state(step_dirs), cfg, out)


def rows_onto(old: torch.Tensor, ids: torch.Tensor, whose: str = "the data's") -> torch.Tensor | None:
    """For each of the vocabulary ids `ids`, the row of a model with vocabulary `old` that reads it: its own
    row, or the unknown row 0 for a token new to that model (so that it reads and scores the token exactly as
    it did when the token was unknown). None when the vocabularies are equal. ValueError when `old` has tokens
    `ids` lacks, or another unknown row: those weights would be lost."""
    old, ids = old.cpu().long(), ids.cpu().long()
    if torch.equal(old, ids):
        return None
    lost = set(old[1:].tolist()) - set(ids.tolist())
    if int(ids[0]) != int(old[0]) or lost:
        raise ValueError(f"its {old.numel()} vocabulary rows are not {whose} {ids.numel()}, nor a subset of them "
                         f"({len(lost)} of its tokens are not among them)")
    row_of = {int(i): r for r, i in enumerate(old.tolist())}
    return torch.tensor([row_of.get(int(i), 0) for i in ids.tolist()])


VOCAB_ROWS = ("embedding.weight", "unembedding.weight")


def souped_checkpoint(runs: list[Path], weights: list[float], out: Path) -> tuple[Path, torch.Tensor, dict]:
    """A weighted mean of several finished recipe runs' weights (a "uniform soup" when the weights are equal:
    Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time", §2), for runs fine-tuned from one start (one's `init_from` chain holds the other).

    Each run is RUN/train (its saved steps) + RUN/export (its training.json and vocab_ids): its weights are the
    fp32 mean of the steps its export averaged (`averaged_steps`; the last saved step if none), not the bf16/MXFP4
    export, so the experts are quantized once, from the soup. Vocabularies are mapped onto the last run's
    (`rows_onto`); model shapes must agree. Returns (out with out/model written, the vocab ids, the runs'
    training.json records)."""
    from safetensors import safe_open

    from ..errors import CheckpointError
    from ..train import TrainConfig
    from ..train.loop import saved_steps

    if len(runs) != len(weights) or len(runs) < 2:
        raise ValueError(f"a soup needs two or more runs and one weight each (got {len(runs)} runs, "
                         f"{len(weights)} weights)")
    if any(w <= 0 for w in weights):
        raise ValueError(f"soup weights must be positive: {weights}")
    infos, idss, states = [], [], []
    for run in runs:
        export_dir, train_dir = run / "export", run / "train"
        for need in (export_dir / "training.json", export_dir / "model.safetensors"):
            if not need.exists():
                raise CheckpointError(f"{run}: not a finished recipe run (no {need.relative_to(run)})")
        info = json.loads((export_dir / "training.json").read_text())
        with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
            if "vocab_ids" not in f.keys():
                raise CheckpointError(f"{export_dir}: not a demo export (no vocab_ids tensor)")
            idss.append(f.get_tensor("vocab_ids"))
        names = info.get("averaged_steps") or [p.name for p in saved_steps(train_dir)[-1:]]  # else its last step
        if not names:
            raise CheckpointError(f"{run}: no saved steps in {train_dir}")
        missing = [n for n in names if not (train_dir / n).is_dir()]
        if missing:
            raise CheckpointError(f"{run}: its export averaged {', '.join(missing)}, not in {train_dir}")
        states.append(mean_state([train_dir / n for n in names]))
        infos.append(info)
    ids = idss[-1]
    shapes = [{k: tuple(v.shape) for k, v in st.items() if k not in VOCAB_ROWS} for st in states]
    for run, shape in zip(runs, shapes):
        if shape != shapes[-1]:
            raise CheckpointError(f"{run}: another model shape than {runs[-1]} "
                                  f"(e.g. {sorted(set(shape.items()) ^ set(shapes[-1].items()))[:2]})")
    total = sum(weights)
    soup: dict[str, torch.Tensor] = {}
    for run, old, state, w in zip(runs, idss, states, weights):
        try:
            source = rows_onto(old, ids, f"{runs[-1]}'s")
        except ValueError as e:
            raise CheckpointError(f"{run}: {e}") from None
        for k, v in state.items():
            v = v[source] if source is not None and k in VOCAB_ROWS else v
            soup[k] = soup[k] + v * (w / total) if k in soup else v * (w / total)
    cfg = TrainConfig.from_dict(infos[-1]["config"], source=str(runs[-1] / "export" / "training.json"))
    return write_state(soup, cfg, out), ids, {str(r): i for r, i in zip(runs, infos)}


def continue_from(path: Path, ids: torch.Tensor):
    """The `prepare` hook that starts training from an exported demo model's weights (experts dequantized from
    MXFP4 exactly, the rest widened from bf16 to fp32): the weight-averaging phase of stochastic weight
    averaging, which starts from pretrained weights ŵ (Izmailov et al. 2018, Algorithm 1). The export's shape
    must be the [model] section's. Its vocabulary rows must be the data's, or a subset of them: a token the
    export does not know gets the embedding and unembedding of its unknown row (row 0), so that the model reads
    and scores it at first exactly as it did when that token was unknown, and training then tells it apart."""
    from ..checkpoint import load
    from ..vocab import VocabSubsetModel

    src = load(path, dtype=torch.float32, dense_experts=True)
    if not isinstance(src, VocabSubsetModel):
        raise SystemExit(f"error: [demo] init_from = {path}: not a demo export (no vocab_ids tensor)")
    old = src.vocab_ids.cpu().long()
    state = src.model.state_dict()
    try:
        source = rows_onto(old, ids)
    except ValueError as e:
        raise SystemExit(f"error: [demo] init_from = {path}: {e}: another data seed, count or version") from None
    if source is not None:
        for name in VOCAB_ROWS:
            state[name] = state[name][source].clone()
        print(f"note: [demo] init_from = {path}: {ids.numel() - old.numel()} tokens new to it start as its unknown "
              "row", file=sys.stderr)

    def prepare(model: torch.nn.Module) -> None:
        try:
            model.load_state_dict(state)  # strict: every tensor present, each of its shape (torch names any other)
        except RuntimeError as e:
            raise SystemExit(f"error: [demo] init_from = {path}: another model shape than [model]: {e}") from None
    return prepare


DEMO_KEYS = ("data_seed", "data_n", "data_version", "number_init", "export_dir", "eval_n", "heldout_eval_n",
             "average_last", "init_from", "shuffle_seed")
INTEGER_KEYS = ("data_seed", "data_n", "data_version", "eval_n", "heldout_eval_n", "average_last", "shuffle_seed")


def read_recipe(path: Path) -> tuple[TrainConfig, dict]:
    """A recipe TOML as the trainer's config and its [demo] table, checked: a misspelt [demo] key or an undefined
    data version is an error naming the file, not a silent default."""
    from ..train import TrainConfig

    raw = tomllib.loads(path.read_text())
    demo = raw.pop("demo", {})
    unknown = sorted(set(demo) - set(DEMO_KEYS))
    if unknown:
        raise SystemExit(f"error: {path}: [demo] {', '.join(unknown)}: not a [demo] key "
                         f"(known: {', '.join(DEMO_KEYS)})")
    for key in INTEGER_KEYS:  # else int() fails later with a traceback, or a float is silently truncated
        if key in demo and (isinstance(demo[key], bool) or not isinstance(demo[key], int)):
            raise SystemExit(f"error: {path}: [demo] {key} = {demo[key]!r}: must be an integer")
    if not 1 <= demo.get("data_version", 1) <= data.LATEST_VERSION:
        raise SystemExit(f"error: {path}: [demo] data_version = {demo['data_version']}: defined versions are 1 to "
                         f"{data.LATEST_VERSION}")
    return TrainConfig.from_dict(raw, source=str(path), base_dir=path.parent), demo


def evaluate_export(out: Path, seed: int, n: int, version: int, eval_n: int = 100, heldout_n: int | None = None,
                    made: str = "") -> str:
    """`gptoss eval demo` on an export as chat loads it (bf16, MXFP4 experts, greedy, the held-out seed),
    questions avoiding the data (seed, n, version): the markdown summary into out/EVAL.md (returned) and each
    item's result into out/results.jsonl (so that experiments/demo/paired.py reuses them)."""
    from dataclasses import asdict

    from . import eval as E
    from ..checkpoint import load

    heldout_n = E.HELDOUT_PHRASING_N if heldout_n is None else heldout_n
    model = load(out, dtype=torch.bfloat16)
    t2 = time.perf_counter()
    results = E.evaluate(model, eval_n, E.HELDOUT_SEED, "medium", train_seed=seed, train_n=n, heldout_n=heldout_n,
                         version=version)
    header = (f"## gptoss eval demo — {out.name}\n\n`gptoss eval demo --model {out} --n {eval_n} --heldout-n "
              f"{heldout_n}` (held-out seed {E.HELDOUT_SEED}, reasoning medium, greedy, bf16 + MXFP4 experts; "
              f"{time.perf_counter() - t2:.0f} s). {made}".rstrip())
    tf = E.teacher_forced(model, min(eval_n, 20), E.HELDOUT_SEED, train_seed=seed, train_n=n, family="heldout",
                          version=version)
    slips = "; ".join(f"`{c!r}` → {want!r} (wrote {got!r})" for c, want, got in tf["errors"][:6])
    md = E.report(results, header) + (
        f"\n\nTeacher-forced on {tf['conversations']} held-out-phrasing arithmetic conversations: {tf['all_right']} without a "
        f"slip, {tf['token_errors']} wrong tokens of {tf['tokens']} the model writes. First slips: {slips}")
    (out / "EVAL.md").write_text(md + "\n")
    (out / "results.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in results))
    return md


def ship(src: Path) -> dict[str, str]:
    """Copy an exported model into the package and record its hashes in gptoss/demo/__init__.py."""
    from . import FILES, sha256

    SHIPPED.mkdir(parents=True, exist_ok=True)
    for name in (*FILES, "training.json", "EVAL.md"):
        if (src / name).exists():
            shutil.copyfile(src / name, SHIPPED / name)
    hashes = {name: sha256(SHIPPED / name) for name in FILES}
    text = HASHES_FILE.read_text()
    block = "SHA256 = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in hashes.items()) + "}"
    HASHES_FILE.write_text(re.sub(r"SHA256 = \{[^}]*\}", block, text, count=1))
    return hashes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss.demo.recipe", description=__doc__.split("\n")[0])
    p.add_argument("config", help="the recipe TOML (a gptoss train config + a [demo] table)")
    p.add_argument("--ship", action="store_true", help="copy the result into src/gptoss/data/demo, record sha256")
    p.add_argument("--steps", type=int, default=None, help="override [train] steps (quick trials)")
    p.add_argument("--resume", action="store_true", help="continue from the newest step-* checkpoint of out_dir")
    p.add_argument("--eval-n", type=int, default=None, help="override [demo] eval_n and heldout_eval_n (quick trials)")
    p.add_argument("--skip-train", action="store_true", help="export/evaluate the existing last step of out_dir")
    p.add_argument("--average-last", type=int, default=None, metavar="K",
                   help="export the average of the last K saved steps (overrides [demo] average_last; 1: the last)")
    p.add_argument("--export-dir", default=None, help="export here (overrides [demo] export_dir and --run-dir's)")
    p.add_argument("--run-dir", default=None, help="train into RUN_DIR/train and export to RUN_DIR/export "
                                                   "(instead of the TOML's out_dir and export_dir)")
    args = p.parse_args(argv)

    from ..train import train
    from ..train.loop import latest_checkpoint, saved_steps

    path = Path(args.config)
    cfg, demo = read_recipe(path)
    if args.steps:
        cfg.train.steps = args.steps
    cfg.train.resume = cfg.train.resume or args.resume
    seed, n = int(demo.get("data_seed", 0)), int(demo.get("data_n", 60000))
    version = int(demo.get("data_version", 1))
    out = cfg.path(demo.get("export_dir", "runs/demo/export"))
    if args.run_dir:
        run_dir = Path(args.run_dir).expanduser().resolve()
        cfg.train.out_dir, out = str(run_dir / "train"), run_dir / "export"
    if args.export_dir:
        out = Path(args.export_dir).expanduser().resolve()
    average_last = args.average_last if args.average_last is not None else int(demo.get("average_last", 1))
    if average_last < 1:
        raise SystemExit(f"error: average_last = {average_last}: the number of last saved steps to average, ≥ 1")
    every = cfg.train.save_every
    saves = len({*(range(every, cfg.train.steps + 1, every) if every else ()), cfg.train.steps})
    if not args.skip_train and saves < average_last:  # say so before an hour of training, not after
        raise SystemExit(f"error: average_last = {average_last}, but [train] steps = {cfg.train.steps} with "
                         f"save_every = {cfg.train.save_every} saves {saves} steps")

    init_from = cfg.path(demo["init_from"]) if demo.get("init_from") else None
    shuffle_seed = int(demo.get("shuffle_seed", seed))
    t0 = time.perf_counter()
    examples = list(data.generate(seed, n, version=version))
    ids = vocab_ids(examples)
    if ids.numel() != cfg.model_config().vocab_size:
        print(f"note: [model] vocab_size = {cfg.model_config().vocab_size}, the data's subset has {ids.numel()} rows;"
              " using the data's", file=sys.stderr)
        cfg.model.overrides["vocab_size"] = int(ids.numel())
    cfg.data.shuffle = False  # documents() lays out whole samples; the trainer must keep their order
    docs = documents(examples, cfg.data.seq_len, cfg.train.steps * cfg.data.batch_size * cfg.train.grad_accum,
                     shuffle_seed, version)
    targets = sum(sum(d.targets) for d in docs)
    print(f"data: {n} conversations (seed {seed}, version {version}), {sum(len(d.tokens) for d in docs)} tokens, "
          f"{targets} targets, vocabulary {ids.numel()} rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    t1 = time.perf_counter()
    if not args.skip_train:
        if init_from is not None:
            prepare = continue_from(init_from, ids)
        elif demo.get("number_init", False):
            prepare = lambda m: number_init(m, ids, cfg.train.seed)  # noqa: E731
        else:
            prepare = None
        result = train(cfg, documents=docs, token_map=token_map(ids), progress=True, prepare=prepare)
        step_dir = result.checkpoint
    else:
        step_dir = latest_checkpoint(cfg.path(cfg.train.out_dir))
    averaged = []
    if average_last > 1:
        steps = saved_steps(cfg.path(cfg.train.out_dir))
        if len(steps) < average_last:
            raise SystemExit(f"error: average_last = {average_last}, but {cfg.path(cfg.train.out_dir)} holds "
                             f"{len(steps)} saved steps")
        averaged = steps[-average_last:]
        step_dir = averaged_checkpoint(averaged, cfg, out.parent / f"{out.name}-average")
        print(f"averaged {', '.join(p.name for p in averaged)}", file=sys.stderr)
    train_s = time.perf_counter() - t1
    metrics = cfg.path(cfg.train.out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if rows:  # the steps' own times: a resumed run's total, not just this invocation's
        train_s = sum(r["time_s"] for r in rows)
    info = {"data_seed": seed, "data_n": n, "data_version": version, "steps": cfg.train.steps,
            "train_seconds": round(train_s), "shuffle_seed": shuffle_seed,
            "final_loss": rows[-1]["loss"] if rows else None,
            "loss_last_50": sum(r["loss"] for r in rows[-50:]) / max(1, len(rows[-50:])) if rows else None,
            "averaged_steps": [p.name for p in averaged],
            "vocab_rows": int(ids.numel()), "config": cfg.to_dict(), "torch_threads": torch.get_num_threads()}
    if init_from is not None:  # what the starting point cost: the whole recipe's training time is the sum
        before = json.loads((init_from / "training.json").read_text()) if (init_from / "training.json").exists() else {}
        info["init_from"] = {"path": str(init_from), "steps": before.get("steps"),
                             "train_seconds": before.get("train_seconds"), "data_seed": before.get("data_seed")}
    export(step_dir, ids, out, info)
    print(f"trained in {train_s:.0f} s (loss {info['final_loss']}), exported to {out}", file=sys.stderr)

    from . import eval as E

    print(evaluate_export(out, seed, n, version, eval_n=args.eval_n or int(demo.get("eval_n", 100)),
                          heldout_n=args.eval_n or int(demo.get("heldout_eval_n", E.HELDOUT_PHRASING_N)),
                          made=f"Trained {info['steps']} steps in {train_s / 60:.1f} min of step time, final loss "
                               f"{info['final_loss']}."))
    if args.ship:
        print(f"shipped: {ship(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
