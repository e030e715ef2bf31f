"""The embedded demo model: a tiny GPT-oss trained by gptoss itself (experiments/demo), shipped in MXFP4.

`gptoss chat`, `gptoss generate` and `gptoss serve` use it when no --model is given. It does multi-digit
arithmetic step by step, calls function tools (calculator, convert_units) and says "I don't know" to the
rest; its vocabulary is the subset of o200k_harmony that its training data uses (see gptoss.vocab).
The files are sha256-checked on every load, against the hashes recorded here by the training recipe.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError

NAME = "gptoss-demo"
FILES = ("config.json", "model.safetensors")
# Written by `python -m gptoss.demo.recipe` when it ships a newly trained model.
SHA256 = {
    "config.json": "f708893f7e9f65391e6b43d8182d2a576ccc95f7fbfc69e16d9ee76183b7172d",
    "model.safetensors": "09e55a8c53f8b17b1d3f96087a7ec8894890c1c42d6f6f258b90b8b65677401d",
}


def folder() -> Path:
    return Path(str(resources.files("gptoss") / "data" / "demo"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_path(verify: bool = True) -> Path:
    """The demo checkpoint folder, its files checked against the recorded sha256 hashes."""
    path = folder()
    for name in FILES:
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: the embedded demo model is missing from this installation "
                                  "(train it with `python -m gptoss.demo.recipe`, or give --model PATH)")
        if verify:
            want = SHA256.get(name)
            got = sha256(f)
            if got != want:
                raise CheckpointError(f"{f}: sha256 {got} does not match the demo model's recorded hash "
                                      f"{want}; the file is damaged or was replaced — reinstall gptoss")
    return path


def load(device=None, dtype=None, progress: bool = False):
    """The demo model (a VocabSubsetModel), hash-checked."""
    import torch

    from ..checkpoint import load as load_checkpoint

    return load_checkpoint(checkpoint_path(), device=device, dtype=dtype or torch.bfloat16, progress=progress)
