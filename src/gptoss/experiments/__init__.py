"""Small, seeded training experiments that test published claims on the real training stack (issue 9).

    gptoss experiment routing  --budget-minutes 30 --out experiments/routing
    gptoss experiment capacity --quick
    gptoss experiment stability | ladder | sliding-window

Each experiment is a module here with `NAME`, `DESCRIPTION`, `RUNS` (training runs at the default seeds) and
`run(ctx) -> str` (the markdown summary); runner.py holds what they share: the synthetic task, the base model
config, the step budget, one training run, tables and plots. Outputs land in the --out folder:
results.md (tables), *.png (matplotlib), runs.json (every run's per-step metrics, for re-plotting).
"""

from pathlib import Path

EXPERIMENTS = {
    "routing": "gptoss.experiments.routing",    # router collapse: none vs Switch aux loss vs DeepSeek-V3 bias
    "routing-layers": "gptoss.experiments.routing_layers",  # layers collapsed apart: aux loss per layer vs pooled
    "capacity": "gptoss.experiments.capacity",  # capacity factor 1.0 / 1.25 / 2.0 / ∞: drops, loss, tokens/s
    "stability": "gptoss.experiments.stability",  # pre/post-norm × QK-norm at a high lr: OLMo-2's spike score
    "ladder": "gptoss.experiments.ladder",  # GPT-2 → GPT-oss, one architecture change at a time
    "sliding-window": "gptoss.experiments.sliding_window",  # window 128 + sinks vs full: loss, decode cost
}


def get(name: str):
    import importlib

    from ..errors import GptOssError

    if name not in EXPERIMENTS:
        raise GptOssError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(name: str, out: str, budget_minutes: float = 30.0, seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
                   steps: int | None = None, start: str = "natural", size: str = "default",
                   progress: bool = True, command: str = "", threads: int | None = 1) -> Path:
    """Run one experiment and write results.md, runs.json and its plots to `out`; returns results.md.

    threads: torch's intra-op threads for the run (None: leave as is). One by default: these models are too
    small to gain from more, and two threads on two busy cores oversubscribe them (measured: 0.05 s/step
    with one thread, 4 s/step with two while another process held a core)."""
    import shutil
    from pathlib import Path

    import torch

    from .runner import STARTS, Context, write_outputs
    from ..errors import GptOssError

    module = get(name)
    if start not in STARTS:
        raise GptOssError(f"unknown start {start!r}; known: {', '.join(STARTS)}")
    ctx = Context(out=Path(out), budget_minutes=budget_minutes, seeds=tuple(seeds), steps=steps, size=size,
                  start=start, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        summary = module.run(ctx)
    finally:
        torch.set_num_threads(before)
    write_outputs(ctx, name, summary, command or f"gptoss experiment {name} --out {out}")
    shutil.rmtree(ctx.out / "work", ignore_errors=True)  # per-run metrics.jsonl: all of it is in runs.json
    return ctx.out / "results.md"
