"""Write a random checkpoint with the exact shapes, dtypes and layout of a GPT-oss preset.

    python benchmarks/make_checkpoint.py --preset gpt-oss-20b OUT [--layout hf|original] [--seed 0]

gpt-oss-20b comes out at ≈ 12.8 GiB (MXFP4 experts, bf16 rest), streamed shard by shard, so the real
model's speed and memory can be measured without downloading it. The HF layout's config.json is the
real one's (model_type gpt_oss, MXFP4 quantization_config) and loads in transformers.
"""

import argparse
import sys
from pathlib import Path

from gptoss.checkpoint import write_checkpoint
from gptoss.config import PRESETS, preset
from gptoss.synthetic import random_tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="gpt-oss-20b", choices=list(PRESETS))
    p.add_argument("--layout", default="hf", choices=["hf", "original"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gib", type=float, default=4.0)
    args = p.parse_args(argv)
    config = preset(args.preset)
    write_checkpoint(random_tensors(config, args.seed), config, args.out, args.layout,
                     max_shard_bytes=int(args.max_shard_gib * 2**30), progress=True)
    print(f"wrote {args.preset} ({args.layout} layout) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
