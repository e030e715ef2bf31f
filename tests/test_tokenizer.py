"""The offline o200k_harmony tokenizer against tiktoken's own, on a varied ≥ 10,000-line corpus, network blocked."""

from __future__ import annotations

import gzip
import hashlib
import random
import socket
import sysconfig
from importlib import resources
from pathlib import Path

import pytest

from gptoss import tokenizer as tk
from gptoss.tokenizer import Tokenizer, TokenizerError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="module")
def no_network():
    """Any connection attempt fails the test: both tokenizers must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, no_network):
    """tiktoken's o200k_harmony, its download cache seeded with the shipped ranks (tiktoken checks the hash)."""
    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    data = gzip.decompress(resources.files("gptoss.data").joinpath(tk.VOCAB_FILE).read_bytes())
    (cache / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tiktoken.registry.ENCODINGS.pop("o200k_harmony", None)
    enc = tiktoken.get_encoding("o200k_harmony")
    yield enc
    mp.undo()


@pytest.fixture(scope="module")
def ours(tmp_path_factory, no_network):
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty-cache")))  # nothing to fall back on
    tk.o200k_harmony.cache_clear()
    yield Tokenizer()
    mp.undo()


def code_lines(n: int) -> list[str]:
    """Real source code: the first lines of the standard library's modules, in a fixed order."""
    lines: list[str] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines += f.read_text(encoding="utf-8", errors="replace").splitlines()[:200]
        if len(lines) >= n:
            break
    return lines[:n]


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """Scripts, emoji, whitespace runs, numbers, contractions, JSON, and special-token strings, mixed."""
    rng = random.Random(seed)
    ranges = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0600, 0x06FF), (0x0900, 0x097F),
              (0x0400, 0x04FF), (0x0370, 0x03FF), (0x0E00, 0x0E7F), (0x00C0, 0x024F), (0x1F300, 0x1FAFF)]
    emoji = ["👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🧑‍💻", "😀", "🤖", "☕", "🏳️‍🌈", "🫠"]
    words = ["Hello", "world", "GPT-oss", "don't", "WE'LL", "it's", "I'M", "naïve", "café", "straße", "ΑΒΓ",
             "mixtureOfExperts", "snake_case", "HTTPServer", "x86_64", "e=mc²", "http://example.com/a?b=1&c=2"]
    specials = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
                "<|endoftext|>", "<|reserved_200100|>", "<|notatoken|>", "<|", "|>"]
    spaces = [" ", "  ", "   ", "\t", "\t\t", "    ", " \t ", "\u00a0", "\u3000", "\r", "\r\n", "\n\n"]

    def piece() -> str:
        kind = rng.randrange(8)
        if kind == 0:
            lo, hi = rng.choice(ranges)
            return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))
        if kind == 1:
            return "".join(rng.choice(emoji) for _ in range(rng.randint(1, 4)))
        if kind == 2:
            return rng.choice(spaces) * rng.randint(1, 5)
        if kind == 3:
            return str(rng.randint(0, 10 ** rng.randint(1, 20))) + rng.choice(["", ".5", ",000", "e-3", "%"])
        if kind == 4:
            return rng.choice(specials)
        if kind == 5:
            return '{"key": [1, 2.5, null, "v\\u00e9"], "n": {"deep": true}}'
        if kind == 6:
            return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 20)))
        return rng.choice(words)

    return ["".join(piece() + rng.choice(["", " "]) for _ in range(rng.randint(1, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    lines = code_lines(6000) + synthetic_lines(6000)
    assert len(lines) >= 10_000
    return lines


def test_vocabulary_shape(ours, reference):
    assert ours.n_vocab == reference.n_vocab == 201_088
    names = {"<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|channel|>": 200005,
             "<|constrain|>": 200003, "<|return|>": 200002, "<|call|>": 200012, "<|endoftext|>": 199999}
    for name, i in names.items():
        assert ours.encode(name, allowed_special="all") == reference.encode(name, allowed_special="all") == [i]


def test_encode_equals_tiktoken_line_by_line(ours, reference, corpus):
    for line in corpus:
        assert ours.encode(line, allowed_special="all") == reference.encode(line, allowed_special="all"), line
        assert ours.encode_ordinary(line) == reference.encode_ordinary(line), line


def test_encode_equals_tiktoken_on_multiline_chunks(ours, reference, corpus):
    """Newlines and whitespace runs across line boundaries are where pre-tokenizers differ."""
    for i in range(0, len(corpus), 40):
        chunk = "\n".join(corpus[i:i + 40])
        ids = ours.encode(chunk, allowed_special="all")
        assert ids == reference.encode(chunk, allowed_special="all")
        assert ours.decode(ids) == reference.decode(ids) == chunk


def test_disallowed_special_tokens_refused_like_tiktoken(ours, reference):
    text = "say <|end|> now"
    with pytest.raises(ValueError):
        reference.encode(text)
    with pytest.raises(TokenizerError, match="<\\|end\\|>"):
        ours.encode(text)
    allowed = {"<|end|>"}
    assert ours.encode(text, allowed_special=allowed) == reference.encode(text, allowed_special=allowed)
    assert ours.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


def test_decode_equals_tiktoken(ours, reference):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(201_088) for _ in range(rng.randint(1, 30))]
        assert ours.decode_bytes(ids) == reference.decode_bytes(ids)
    with pytest.raises(TokenizerError, match="token id 201088"):
        ours.decode([5, 201_088])


def test_corrupted_vocabulary_is_refused():
    data = gzip.decompress(resources.files("gptoss.data").joinpath(tk.VOCAB_FILE).read_bytes())
    with pytest.raises(TokenizerError, match="sha256 .* does not match"):
        tk.load_o200k_base_ranks(data.replace(b" 100\n", b" 101\n", 1))
