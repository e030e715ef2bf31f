"""The `gptoss` command. Heavy imports (torch) happen inside the subcommands, not at import time."""

from __future__ import annotations

import argparse
import sys

from .errors import GptOssError
from .loading import add_model_args, add_prefix_cache_arg, add_sampling_args, load_model_from_args, sampling_params
from .tools import PYTHON_TIMEOUT


def cmd_params(args: argparse.Namespace) -> None:
    """Parameter table (GPT-oss model card, Table 1) of presets or checkpoint folders, from shapes/headers."""
    from .params import params_command

    print(params_command(args.targets))


def cmd_convert(args: argparse.Namespace) -> None:
    """Rewrite a checkpoint in the other layout; tensor bytes are copied unchanged (experts stay MXFP4)."""
    from .checkpoint import convert

    convert(args.input, args.output, layout=args.to, max_shard_bytes=int(args.max_shard_gib * 2**30),
            progress=not args.quiet)
    print(f"wrote {args.to} checkpoint to {args.output}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Raw text completion (no chat format), streamed to stdout as it is sampled."""
    import codecs

    from .generate import generate
    from .tokenizer import get_tokenizer
    from .vocab import unwrap

    tok = get_tokenizer()
    params = sampling_params(args, stop_tokens=(tok.endoftext,))
    if args.json_schema:  # the whole completion is JSON of the schema, then <|endoftext|>
        from .constrain import Constraint, ConstraintError, read_schema

        params.constraint = Constraint.json_schema(read_schema(args.json_schema), harmony=False)
        try:
            params.constraint.check(tok)
        except ConstraintError as e:
            raise GptOssError(f"--json-schema {args.json_schema}: {e}") from None
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = tok.encode(prompt, allowed_special="all")
    if not ids:
        raise GptOssError("the prompt is empty")
    model = load_model_from_args(args)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    if args.echo:
        sys.stdout.write(prompt)
    for _, token in generate(model, [ids], params):
        if token == tok.endoftext and params.constraint is not None:
            break  # the end of a constrained completion, not text
        sys.stdout.write(decoder.decode(tok.decode_bytes([token])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    pool = getattr(unwrap(model), "expert_pool", None)
    if pool is not None and not args.quiet:  # what streaming the experts cost
        print(f"gptoss: {pool.stats.summary()}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat in the Harmony format: reasoning effort, function tools, multi-turn; /help lists commands."""
    from .chat import run_chat

    run_chat(args)


def cmd_serve(args: argparse.Namespace) -> None:
    """OpenAI-compatible server (Chat Completions, Responses, streaming, tools) with a chat page at /."""
    from .server import serve_command

    try:
        serve_command(args)
    except KeyboardInterrupt:
        pass


def cmd_train(args: argparse.Namespace) -> None:
    """Pretrain or fine-tune from a TOML config (see examples/train_tiny.toml); logs to OUT_DIR/metrics.jsonl."""
    from .train import load_config, train
    from .train.distributed import from_env

    cfg = load_config(args.config)
    if args.resume:
        cfg.train.resume = True
    if args.threads is not None:
        cfg.train.threads = args.threads
    dist = from_env()  # torchrun sets RANK / WORLD_SIZE; read here once and passed down
    result = train(cfg, progress=not args.quiet, dist=dist)
    if result.checkpoint is not None and dist.is_main:
        saved = result.checkpoint / "model"  # absent where the layouts cannot hold the model (e.g. QK-norm)
        saved = saved if saved.exists() else result.checkpoint / "train_state.safetensors"
        print(f"saved {saved} (final loss {result.losses[-1]:.4f})" if result.losses
              else f"nothing to do: {result.checkpoint} is already at step {cfg.train.steps}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model: demo (the embedded model's held-out skills), or aime / gpqa / healthbench from the
    datasets' own files, prompted and graded as openai/gpt-oss's evals, against the local engine (--model) or
    any OpenAI-compatible endpoint (--base-url)."""
    if args.task == "demo":
        from .demo.eval import eval_command

        args.reasoning_effort = args.reasoning_effort or "medium"
        if args.reasoning_effort not in ("low", "medium", "high"):
            raise GptOssError("gptoss eval demo: --reasoning-effort must be one of low, medium, high")
        args.max_tokens = args.max_tokens or 512
    else:
        from .evals.runner import eval_command  # the reference's defaults: all efforts, no output limit
    eval_command(args)


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run a small seeded training experiment (routing, capacity) and write a markdown table and PNG plots."""
    from .experiments import run_experiment

    budget = 5.0 if args.quick else args.budget_minutes
    out = args.out or f"experiments/{args.name}"
    command = "gptoss " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    path = run_experiment(args.name, out, budget_minutes=budget, seeds=tuple(args.seeds), steps=args.steps,
                          start=args.start, progress=not args.quiet, command=command, threads=args.threads)
    print(f"wrote {path}")


# ---------------------------------------------------------------- the parallel launcher (torchrun)
def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="under torchrun: split attention heads and vocabulary N ways (1 or the process count; "
                        "default: the process count)")
    p.add_argument("--ep", type=int, default=None, metavar="M",
                   help="under torchrun: split the experts into M groups (default 1: every expert's width is "
                        "split across all processes)")


def run_parallel(args: argparse.Namespace, layout) -> None:
    """`gptoss generate/chat/serve` on one rank under torchrun: rank 0 runs the command with a `Leader`
    (load_model_from_args sees args.layout), the others load their shard and follow until rank 0 is done."""
    from . import parallel

    device = parallel.local_device(layout, args.device)
    args.device, args.layout = str(device), layout
    parallel.init(layout, device)
    try:
        if layout.rank == 0:
            try:
                if args.command == "serve":
                    from .server import serve_command

                    serve_command(args, before_start=parallel.mirror_engine_cache,
                                  note=f"{layout.world_size} ranks, tp {layout.tp}, ep {layout.ep}")
                else:
                    args.func(args)
            finally:
                parallel.release_followers(device)  # whatever happened here
        else:
            parallel.follow(load_model_from_args(args))
    finally:
        parallel.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="OpenAI's GPT-oss, exact and fast on CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help=cmd_params.__doc__, description=cmd_params.__doc__)
    p.add_argument("targets", nargs="+", metavar="PRESET|PATH",
                   help="a preset (gpt-oss-20b, gpt-oss-120b, ...) or a checkpoint folder")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    p.add_argument("input", help="checkpoint folder (Hugging Face or OpenAI original/ layout)")
    p.add_argument("output", help="folder to write")
    p.add_argument("--to", required=True, choices=["hf", "original"], help="layout to write")
    p.add_argument("--max-shard-gib", type=float, default=5.0, help="largest .safetensors shard (default 5 GiB)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    add_model_args(p)
    add_sampling_args(p, max_tokens=128)
    add_parallel_args(p)
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the completion is JSON matching this schema (docs/STRUCTURED.md)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    add_model_args(p)
    add_sampling_args(p, max_tokens=2048)
    add_parallel_args(p)
    p.add_argument("--reasoning-effort", default="medium", choices=["low", "medium", "high"])
    p.add_argument("--system", default=None, help="model identity line of the system message")
    p.add_argument("--developer", default=None, help="developer instructions (the 'system prompt' of OpenAI's API)")
    p.add_argument("--tools", default=None, metavar="FILE", help="JSON file of function tools (OpenAI format)")
    p.add_argument("--calculator", action="store_true", help="offer the built-in calculator function tool")
    p.add_argument("--python", action="store_true",
                   help="offer the built-in python tool: the model's code runs in a sandbox (docs/SANDBOX.md)")
    p.add_argument("--python-unsafe", action="store_true",
                   help="offer the python tool WITHOUT the sandbox: the model's code can read and write your files "
                        "and use the network (for machines that cannot make one)")
    p.add_argument("--python-timeout", type=float, default=PYTHON_TIMEOUT, metavar="S",
                   help=f"time limit of one python call in seconds (default {PYTHON_TIMEOUT:g})")
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel as it streams")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="every answer is JSON matching this schema; reasoning stays free (docs/STRUCTURED.md)")
    add_prefix_cache_arg(p)
    p.set_defaults(func=cmd_chat)

    from .server import add_serve_args  # argparse only: fastapi is imported when the server starts

    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    add_model_args(p)
    add_serve_args(p)
    add_parallel_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help=cmd_eval.__doc__.split(":")[0], description=cmd_eval.__doc__)
    p.add_argument("task", choices=["demo", "aime", "gpqa", "healthbench"],
                   help="demo: the embedded model's skills on a held-out set; aime, gpqa, healthbench: --data FILE")
    add_model_args(p)
    p.add_argument("--n", type=int, default=None, help="demo: template-family questions per kind (default 100)")
    p.add_argument("--heldout-n", type=int, default=None,
                   help="demo: held-out-phrasing questions per kind (default 170: 510 arithmetic)")
    p.add_argument("--seed", type=int, default=None, help="demo: held-out set seed; others: sampling/shuffle seed")
    p.add_argument("--reasoning-effort", default=None,
                   help="low, medium or high (demo default: medium); aime/gpqa/healthbench take a list (default: "
                        "low,medium,high, as the reference)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per model call (default: demo 512, else up to the context, as the reference)")
    p.add_argument("--out", default=None, help="demo: write per-question results (JSONL) here; other tasks: "
                                               "the output folder (default eval-TASK; rerunning resumes)")
    from .evals.runner import add_eval_args

    add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument("config", help="training config (.toml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: [train] threads, else torch's own setting)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    from .experiments import EXPERIMENTS  # a dict of names: no torch import

    p = sub.add_parser("experiment", help=cmd_experiment.__doc__, description=cmd_experiment.__doc__)
    p.add_argument("name", choices=list(EXPERIMENTS))
    p.add_argument("--budget-minutes", type=float, default=30.0, help="wall-clock budget (default 30)")
    p.add_argument("--quick", action="store_true", help="a 5-minute budget")
    p.add_argument("--out", default=None, help="output folder (default experiments/NAME)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="training seeds (default 0 1 2 3 4: five, the least a claim on a difference rests on)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: from the budget)")
    p.add_argument("--start", default="natural", choices=["natural", "collapsed", "staggered"],
                   help="router init: natural (default), collapsed onto experts 0 and 1, or staggered (layer i "
                        "onto experts i·k … i·k + k − 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run log lines")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layout = None
        if hasattr(args, "tp"):  # generate, chat, serve: under torchrun every rank runs this
            from .parallel import layout_from

            layout = layout_from(args.tp, args.ep)
        if layout is None:
            args.func(args)
        else:
            run_parallel(args, layout)  # rank 0 runs the command, the others follow it
    except GptOssError as e:
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
