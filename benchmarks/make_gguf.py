"""Convert a GPT-oss checkpoint (HF layout) to GGUF for the llama.cpp comparisons in RESULTS.md.

    python benchmarks/make_gguf.py /work/ckpt/gpt-oss-20b /path/to/llama.cpp gpt-oss-20b.gguf

llama.cpp's `convert_hf_to_gguf.py` reads the tokenizer from a `tokenizer.json`, which our checkpoints
(generated, or the real ones without their tokenizer files) do not carry. This writes one from our shipped
o200k_harmony with transformers' TikTokenConverter (what `convert_tiktoken_to_fast` runs), drops the added
tokens it numbers at or past the model's vocabulary (the converter would reject them), and runs the converter
on a staging folder of symlinks to the checkpoint, `--outtype bf16` (experts stay MXFP4, as in the real GGUFs).
Nothing of llama.cpp is in this repository: pass the folder of its sources (e.g. the one vendored in the
`llama_cpp_python` sdist).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    # transformers' convert_tiktoken_to_fast, less its blobfile dependency: the ranks file is written here.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptoss.tokenizer import o200k_harmony

    encoding = o200k_harmony()
    ranks_file = folder / "o200k_harmony.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                  for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1])))
    converted = TikTokenConverter(vocab_file=str(ranks_file), pattern=encoding._pat_str,
                                  extra_special_tokens=encoding._special_tokens).converted()
    tokenizer = json.loads(converted.to_str())
    kept = [t for t in tokenizer["added_tokens"] if t["id"] < vocab_size]
    dropped = [t["content"] for t in tokenizer["added_tokens"] if t["id"] >= vocab_size]
    tokenizer["added_tokens"] = kept
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    if dropped:
        print(f"tokenizer.json: dropped {len(dropped)} added token(s) past the vocabulary: {dropped[:4]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a GPT-oss checkpoint in HF layout (config.json, *.safetensors)")
    p.add_argument("llama_cpp", type=Path, help="llama.cpp's source folder (holds convert_hf_to_gguf.py)")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--outtype", default="bf16")
    args = p.parse_args()

    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    if not converter.exists():
        sys.exit(f"{converter}: not found; pass llama.cpp's source folder")
    config_path = args.checkpoint / "config.json"
    if not config_path.exists():
        sys.exit(f"{config_path}: not found; the converter needs the HF layout (make_checkpoint.py --layout hf)")
    vocab_size = json.loads(config_path.read_text())["vocab_size"]

    with tempfile.TemporaryDirectory(prefix="gguf-stage-", dir=args.out.parent.resolve()) as stage:
        stage = Path(stage)
        for f in args.checkpoint.iterdir():
            if f.suffix in (".json", ".safetensors"):
                (stage / f.name).symlink_to(f.resolve())
        write_tokenizer(stage, vocab_size)
        env_path = str(args.llama_cpp / "gguf-py")
        cmd = [sys.executable, str(converter), str(stage), "--outfile", str(args.out), "--outtype", args.outtype]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": env_path})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
