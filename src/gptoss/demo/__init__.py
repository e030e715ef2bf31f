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
    "config.json": "81dad43933c8ec8d945cce5f45bc7eeba9eb5de6212f58337e4f19bf3ddc0866",
    "model.safetensors": "606c457aad66455300806c9b94c3bb032d2651051f301ec86a646dc8b6d1b81b",
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
