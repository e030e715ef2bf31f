"""The `gptoss` command. Heavy imports (torch) happen inside the subcommands, not at import time."""

from __future__ import annotations

import argparse
import sys

from .errors import GptOssError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GptOssError as e:
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
