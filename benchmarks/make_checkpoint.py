"""Write a random checkpoint with the exact shapes, dtypes and layout of a GPT-oss preset.

    python benchmarks/make_checkpoint.py --preset gpt-oss-20b OUT [--layout hf|original] [--seed 0]
    python benchmarks/make_checkpoint.py --preset gpt-oss-120b OUT --sparse-experts   # 61 GiB, ≈ 4 GiB on disk

gpt-oss-20b comes out at ≈ 12.8 GiB (MXFP4 experts, bf16 rest), streamed shard by shard, so the real
model's speed and memory can be measured without downloading it. The HF layout's config.json is the
real one's (model_type gpt_oss, MXFP4 quantization_config) and loads in transformers.

--sparse-experts: every expert weight is zero and left as a hole in a sparse file, so a checkpoint of the
120b's shape and size fits a disk that cannot hold 61 GiB. Its expert reads come from holes, not the
disk: it shows that a model of that shape loads, plans its memory and runs, never how fast.
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from gptoss.checkpoint import write_checkpoint
from gptoss.config import PRESETS, preset
from gptoss.safetensors_io import DTYPES
from gptoss.synthetic import random_tensors

TAGS = {dtype: tag for tag, dtype in DTYPES.items()}


def save_sparse(tensors: dict, path) -> None:
    """A safetensors file whose all-zero broadcast tensors (stride 0) are holes: seeked over, never written."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.dim() and all(s == 0 for s in t.stride()):
                f.seek(t.numel() * t.element_size(), 1)
            else:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="gpt-oss-20b", choices=list(PRESETS))
    p.add_argument("--layout", default="hf", choices=["hf", "original"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gib", type=float, default=4.0)
    p.add_argument("--sparse-experts", action="store_true",
                   help="expert weights all zero, as holes of sparse files (shape and size, not speed)")
    args = p.parse_args(argv)
    config = preset(args.preset)
    write_checkpoint(random_tensors(config, args.seed, zero_experts=args.sparse_experts), config, args.out,
                     args.layout, max_shard_bytes=int(args.max_shard_gib * 2**30), progress=True,
                     save_shard=save_sparse if args.sparse_experts else None)
    print(f"wrote {args.preset} ({args.layout} layout) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
