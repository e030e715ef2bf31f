"""Training data: documents → o200k_harmony tokens → fixed-length packed sequences with document masking.

A document is a token list plus a per-token "is a target" flag (all true for text; for a Harmony
conversation only the tokens the assistant produces). Documents are concatenated into one stream and cut
into samples of seq_len + 1 tokens (inputs [:-1], targets [1:]); inside a sample each token carries its
document id (`segments`: attention stays within a document) and its position within the document (RoPE
restarts at 0). A target counts only when it belongs to the same document as its input and is flagged.
The order of samples is a pure function of (seed, step), so resuming needs only the step number.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import harmony
from ..errors import ConfigError
from ..tokenizer import Tokenizer, get_tokenizer

TokenMap = Callable[[list[int]], list[int]]  # full o200k_harmony ids → model ids (e.g. a vocabulary subset)


class DataError(ConfigError):
    """A data file that cannot be read: names the file (and line)."""


@dataclass
class Document:
    tokens: list[int]
    targets: list[bool] | None = None  # per token: is it a training target? None: every token is


# ---------------------------------------------------------------- Harmony conversations
def message_from_dict(d: Any, where: str) -> harmony.Message:
    """A JSON message {role, content, channel?, recipient?, content_type?, name?} → harmony.Message.

    system content: a string (the model identity) or an object of SystemContent fields; developer content: a
    string (instructions) or {instructions, tools: [{name, description, parameters}]}; a non-string content
    of an assistant tool call is JSON-encoded.
    """
    if not isinstance(d, dict) or "role" not in d:
        raise DataError(f"{where}: a message must be an object with a 'role'")
    known = {"role", "content", "channel", "recipient", "content_type", "name"}
    extra = sorted(set(d) - known)
    if extra:
        raise DataError(f"{where}: unknown message field '{extra[0]}' (known: {', '.join(sorted(known))})")
    role, content = d["role"], d.get("content", "")
    try:
        if role == "system":
            content = harmony.SystemContent(model_identity=content) if isinstance(content, str) \
                else harmony.SystemContent(**content)
        elif role == "developer":
            if isinstance(content, dict):
                tools = [harmony.ToolDefinition(**t) for t in content.get("tools", [])]
                content = harmony.DeveloperContent(content.get("instructions"), tools)
            else:
                content = harmony.DeveloperContent(content)
        elif not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
    except TypeError as e:
        raise DataError(f"{where}: bad {role} content ({e})") from None
    return harmony.Message(role=role, content=content, channel=d.get("channel"), recipient=d.get("recipient"),
                           content_type=d.get("content_type"), name=d.get("name"))


def render_for_training(messages: Sequence[harmony.Message], tokenizer: Tokenizer | None = None) -> Document:
    """Harmony tokens of a conversation and its loss mask: true on what the assistant produces.

    What the model writes is everything after `<|start|>assistant` up to and including the message's end
    token (`<|channel|>`, the channel, ` to=…`, `<|message|>`, content, `<|end|>`/`<|call|>`/`<|return|>`),
    and also `<|start|>assistant` itself when it follows another assistant message (after its analysis
    `<|end|>` the model opens its next message; after a user or tool message the prompt supplies it).
    The chain of thought of the turn being trained is kept (it is what the model must learn to write);
    analysis messages of earlier, finished turns (before the last user message) are dropped, as they
    would be from a prompt — unlike openai-harmony's rendering, which also drops the last turn's."""
    tok = tokenizer or get_tokenizer()
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    kept = [m for i, m in enumerate(messages) if not (i < last_user and m.role == "assistant" and m.channel == "analysis")]
    tokens = harmony.render_conversation_for_training(kept, tok, auto_drop_analysis=False)
    targets = [False] * len(tokens)
    has_tools = harmony.Conversation(kept).has_function_tools()
    head = 1 + len(tok.encode_ordinary("assistant"))  # <|start|> + role
    pos = 0
    for i, m in enumerate(kept):
        part = harmony.render_message(m, tok, has_function_tools=has_tools)
        if tokens[pos:pos + len(part) - 1] != part[:-1]:  # the last end token may have become <|return|>
            raise harmony.HarmonyError("internal: could not align the rendered conversation with its messages")
        if m.role == "assistant" and m.name is None:
            follows_assistant = i > 0 and kept[i - 1].role == "assistant" and kept[i - 1].name is None
            start = pos if follows_assistant else pos + head
            targets[start:pos + len(part)] = [True] * (pos + len(part) - start)
        pos += len(part)
    if pos != len(tokens):
        raise harmony.HarmonyError("internal: could not align the rendered conversation with its messages")
    return Document(tokens, targets)


# ---------------------------------------------------------------- files
def read_documents(files: Iterable[str | Path], tokenizer: Tokenizer | None = None, txt_split: str = "file",
                   append_eot: bool = True) -> list[Document]:
    """Every document of the given files (glob patterns allowed), in file order."""
    tok = tokenizer or get_tokenizer()
    eot = [tok.endoftext] if append_eot else []
    docs: list[Document] = []
    for pattern in files:
        paths = sorted(glob.glob(str(pattern))) if any(c in str(pattern) for c in "*?[") else [pattern]
        if not paths:
            raise DataError(f"data file pattern {str(pattern)!r} matches no file")
        for path in map(Path, paths):
            if not path.is_file():
                raise DataError(f"{path}: data file not found")
            if path.suffix == ".jsonl":
                docs += _read_jsonl(path, tok, eot)
            elif path.suffix in (".txt", ".md", ".text"):
                text = path.read_text(encoding="utf-8")
                pieces = {"file": [text], "paragraph": text.split("\n\n"), "line": text.splitlines()}[txt_split]
                docs += [Document(tok.encode_ordinary(p) + eot) for p in pieces if p.strip()]
            else:
                raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .txt or .jsonl)")
    return docs


def _read_jsonl(path: Path, tok: Tokenizer, eot: list[int]) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a JSON object with 'text', 'messages' or 'tokens'")
            if isinstance(d.get("text"), str):
                docs.append(Document(tok.encode_ordinary(d["text"]) + eot))
            elif isinstance(d.get("messages"), list):
                messages = [message_from_dict(m, f"{where}: messages[{i}]") for i, m in enumerate(d["messages"])]
                try:
                    docs.append(render_for_training(messages, tok))
                except harmony.HarmonyError as e:
                    raise DataError(f"{where}: {e}") from None
            elif isinstance(d.get("tokens"), list):
                targets = d.get("targets")
                if targets is not None and len(targets) != len(d["tokens"]):
                    raise DataError(f"{where}: 'targets' has {len(targets)} entries, 'tokens' {len(d['tokens'])}")
                docs.append(Document([int(t) for t in d["tokens"]], None if targets is None else
                                     [bool(t) for t in targets]))
            else:
                raise DataError(f"{where}: expected a 'text' string, a 'messages' list or a 'tokens' list")
    return docs


# ---------------------------------------------------------------- packing
@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] int64 inputs
    targets: torch.Tensor  # [B, L] int64 next tokens
    mask: torch.Tensor  # [B, L] bool: the target counts in the loss
    positions: torch.Tensor  # [B, L] position within the document
    segments: torch.Tensor  # [B, L] document id (-1: padding)

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in ("tokens", "targets", "mask", "positions", "segments")))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class PackedDataset:
    """Documents packed into samples of seq_len + 1 tokens; the last sample is padded (no loss on padding)."""

    def __init__(self, documents: Sequence[Document], seq_len: int, vocab_size: int, seed: int = 0,
                 shuffle: bool = True, token_map: TokenMap | None = None, source: str = "data"):
        if not documents:
            raise DataError(f"{source}: no documents")
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        order = list(range(len(documents)))
        if shuffle:  # the document order inside the stream, fixed by the seed
            order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
        tokens, flags, docs = [], [], []
        for i in order:
            d = documents[i]
            ids = list(d.tokens) if token_map is None else list(token_map(list(d.tokens)))
            if len(ids) != len(d.tokens):
                raise DataError(f"{source}: token_map changed the length of document {i} "
                                f"({len(d.tokens)} → {len(ids)} tokens)")
            tokens += ids
            flags += [True] * len(ids) if d.targets is None else list(d.targets)
            docs += [i] * len(ids)
        stream = torch.tensor(tokens, dtype=torch.int64)
        if stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= vocab_size):
            bad = int(stream[(stream < 0) | (stream >= vocab_size)][0])
            raise DataError(f"{source}: token id {bad} is outside the model's vocabulary (vocab_size = {vocab_size});"
                            " raise [model] vocab_size or map ids with a token_map")
        L = seq_len
        n = max(1, -(-(stream.numel() - 1) // L))  # samples; each shares its last token with the next one
        total = n * L + 1
        pad = total - stream.numel()
        self.tokens = torch.cat((stream, torch.zeros(pad, dtype=torch.int64)))
        self.flags = torch.cat((torch.tensor(flags, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)))
        self.docs = torch.cat((torch.tensor(docs, dtype=torch.int64), torch.full((pad,), -1, dtype=torch.int64)))
        self.num_samples = n
        self.num_tokens = stream.numel()

    def sample(self, i: int) -> tuple[torch.Tensor, ...]:
        L = self.seq_len
        sl = slice(i * L, i * L + L + 1)
        tok, flag, doc = self.tokens[sl], self.flags[sl], self.docs[sl]
        inputs, targets = tok[:-1], tok[1:]
        segments = doc[:-1]
        mask = flag[1:] & (doc[1:] == doc[:-1]) & (doc[1:] >= 0)
        # position within the document, restarting at each document start and at the sample start
        idx = torch.arange(L)
        start = torch.ones(L, dtype=torch.bool)
        start[1:] = segments[1:] != segments[:-1]
        first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=0).values
        return inputs, targets, mask, idx - first, segments

    def indices(self, first: int, count: int) -> list[int]:
        """Sample ids number first .. first+count-1 of the seeded stream of epochs (each a permutation)."""
        out = []
        for g in range(first, first + count):
            epoch, k = divmod(g, self.num_samples)
            if self.shuffle:
                out.append(int(self._perm(epoch)[k]))
            else:
                out.append(k)
        return out

    def _perm(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._perm_cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm_cache[1]

    def batch(self, ids: Sequence[int]) -> Batch:
        parts = [self.sample(i) for i in ids]
        return Batch(*(torch.stack(x) for x in zip(*parts)))

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the target tokens' unigram distribution: the loss of a context-free model."""
        t = self.tokens[1:][self.flags[1:] & (self.docs[1:] >= 0)]
        p = torch.bincount(t).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())
