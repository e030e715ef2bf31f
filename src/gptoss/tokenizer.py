"""o200k_harmony, the GPT-oss tokenizer, through tiktoken — offline.

tiktoken knows the o200k_harmony special-token table but downloads the o200k_base ranks at run time;
we ship those ranks as package data (gzip, sha256-checked against the hash tiktoken itself expects)
and build the same `tiktoken.Encoding` from them, so nothing touches the network.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from importlib import resources
from typing import AbstractSet, Collection, Iterable, Literal

import tiktoken

from .errors import GptOssError

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_FILE = "o200k_base.tiktoken.gz"

# The o200k_base pre-tokenizer regex (tiktoken_ext.openai_public), shared by o200k_harmony.
PAT_STR = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

VOCAB_SIZE = 201_088

# Harmony control tokens (https://github.com/openai/harmony); every other id ≥ 200013 is reserved.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 199999,
    "<|endofprompt|>": 200018,  # o200k_base's, later shadowed by <|reserved_200018|> as in tiktoken
    "<|startoftext|>": 199998,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
} | {f"<|reserved_{i}|>": i for i in range(200013, VOCAB_SIZE)}


class TokenizerError(GptOssError):
    pass


def load_o200k_base_ranks(data: bytes | None = None) -> dict[bytes, int]:
    """The o200k_base BPE ranks from the shipped file (or `data`, the decompressed file), hash-checked."""
    if data is None:
        packed = resources.files("gptoss.data").joinpath(VOCAB_FILE).read_bytes()
        data = gzip.decompress(packed)
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerError(f"gptoss/data/{VOCAB_FILE}: sha256 {digest} does not match o200k_base "
                             f"({O200K_BASE_SHA256}); the package's vocabulary file is damaged, reinstall gptoss")
    fields = data.split()  # "token rank" pairs, whitespace separated
    return dict(zip(map(base64.b64decode, fields[0::2]), map(int, fields[1::2])))


@functools.lru_cache(maxsize=1)
def o200k_harmony() -> tiktoken.Encoding:
    """The tiktoken Encoding equal to `tiktoken.get_encoding("o200k_harmony")`, built offline."""
    return tiktoken.Encoding(name="o200k_harmony", pat_str=PAT_STR, mergeable_ranks=load_o200k_base_ranks(),
                             special_tokens=SPECIAL_TOKENS)


class Tokenizer:
    """Text ↔ token ids for GPT-oss. Special tokens in text are refused unless allowed (tiktoken's rule)."""

    def __init__(self, encoding: tiktoken.Encoding | None = None):
        self.encoding = encoding or o200k_harmony()
        self.n_vocab = VOCAB_SIZE
        self.special_tokens = {name: i for name, i in SPECIAL_TOKENS.items() if not name.startswith("<|reserved")}
        self.start, self.end, self.message = (SPECIAL_TOKENS[n] for n in ("<|start|>", "<|end|>", "<|message|>"))
        self.channel, self.constrain = SPECIAL_TOKENS["<|channel|>"], SPECIAL_TOKENS["<|constrain|>"]
        self.return_, self.call = SPECIAL_TOKENS["<|return|>"], SPECIAL_TOKENS["<|call|>"]
        self.endoftext = SPECIAL_TOKENS["<|endoftext|>"]

    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        try:
            return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        except ValueError as e:  # tiktoken's message names the special token found in the text
            raise TokenizerError(f"cannot encode text: {e}") from None

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with special-token strings treated as plain text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is not in o200k_harmony (0 ≤ id < {self.n_vocab})")
        return self.encoding.decode_bytes(ids)

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    def is_special(self, i: int) -> bool:
        return i >= 199998


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
