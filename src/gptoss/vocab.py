"""Vocabulary subsets: a model whose embedding/unembedding rows cover only some o200k_harmony ids.

A small model (the embedded demo) need not carry 201,088 embedding rows for the few thousand ids it ever
reads or writes. Its checkpoint then holds `vocab_ids`, an int32 tensor [vocab_size]: row r of the embedding
and unembedding stands for the full id `vocab_ids[r]`. At most one row may be -1: the *unknown* row, which
every id outside the subset is read as (a word the model never learned still reaches it as "something I
do not know", so it can say so). Without an unknown row, a prompt id outside the subset is an error.

`VocabSubsetModel` wraps such a model at the boundary so that every caller (generate, chat, the engine and
the server) keeps speaking full o200k ids: input ids are mapped full → row before the embedding, and the
logits come back over the full vocabulary [.., 201088] with -inf outside the subset (the unknown row has
no full id, so it is dropped). Greedy decoding, temperature, top-k and top-p therefore never produce an id
outside the subset, and the logits of the subset's ids equal the inner model's.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError, GenerationError
from .tokenizer import VOCAB_SIZE

UNKNOWN = -1  # the vocab_ids entry of the unknown row


def check_vocab_ids(ids: torch.Tensor, rows: int, where: str = "vocab_ids", full: int = VOCAB_SIZE) -> None:
    """Raise CheckpointError (naming `where`) unless ids is a valid subset map for a model with `rows` rows."""
    if ids.dim() != 1 or ids.numel() != rows:
        raise CheckpointError(f"{where}: shape {list(ids.shape)}, expected [{rows}] (the config's vocab_size)")
    if ids.dtype not in (torch.int32, torch.int64):
        raise CheckpointError(f"{where}: dtype {ids.dtype}, expected int32")
    bad = ids[(ids < UNKNOWN) | (ids >= full)]
    if bad.numel():
        raise CheckpointError(f"{where}: id {int(bad[0])} is outside o200k_harmony (0 ≤ id < {full}, or -1 for "
                              "the unknown row)")
    if int((ids == UNKNOWN).sum()) > 1:
        raise CheckpointError(f"{where}: more than one unknown row (-1)")
    known = ids[ids != UNKNOWN]
    if known.unique().numel() != known.numel():
        values, counts = known.unique(return_counts=True)
        raise CheckpointError(f"{where}: id {int(values[counts > 1][0])} appears twice")


class VocabSubsetModel(nn.Module):
    """A Transformer over a vocabulary subset, presented with the full o200k_harmony vocabulary.

    `config` is the inner model's with vocab_size = 201088 (what callers check prompt ids against); the
    inner model is `.model`, its row → full id map `.vocab_ids`.
    """

    def __init__(self, model: nn.Module, vocab_ids: torch.Tensor, full_vocab: int = VOCAB_SIZE):
        super().__init__()
        check_vocab_ids(vocab_ids, model.config.vocab_size, full=full_vocab)
        self.model = model
        self.full_vocab = full_vocab
        self.config = model.config.replace(vocab_size=full_vocab)
        ids = vocab_ids.long().cpu()
        unknown = (ids == UNKNOWN).nonzero().flatten()
        self.unknown_row = int(unknown[0]) if unknown.numel() else None
        rows = (ids != UNKNOWN).nonzero().flatten()
        to_row = torch.full((full_vocab,), UNKNOWN if self.unknown_row is None else self.unknown_row, dtype=torch.long)
        to_row[ids[rows]] = rows
        device = model.device
        self.register_buffer("vocab_ids", ids.to(device), persistent=False)
        self.register_buffer("to_row", to_row.to(device), persistent=False)  # full id → row
        self.register_buffer("known_rows", rows.to(device), persistent=False)  # rows with a full id ...
        self.register_buffer("known_ids", ids[rows].to(device), persistent=False)  # ... and those ids

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full ids → model rows (ids outside the subset → the unknown row, or GenerationError without one)."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.full_vocab):
            bad = tokens[(tokens < 0) | (tokens >= self.full_vocab)][0]
            raise GenerationError(f"token id {int(bad)} is outside o200k_harmony (0 ≤ id < {self.full_vocab})")
        rows = self.to_row[tokens]
        if self.unknown_row is None and rows.numel() and int(rows.min()) < 0:
            raise GenerationError(f"token id {int(tokens[rows < 0][0])} is not in this model's vocabulary subset "
                                  f"({len(self.known_ids)} ids) and the model has no unknown token")
        return rows

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[.., rows] → [.., 201088]: the subset's logits in place, -inf everywhere else."""
        out = logits.new_full((*logits.shape[:-1], self.full_vocab), float("-inf"))
        out[..., self.known_ids] = logits[..., self.known_rows]
        return out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False, **kwargs) -> torch.Tensor:
        return self.full_logits(self.model(self.rows(tokens), positions, cache, last_only=last_only, **kwargs))

    def hidden_states(self, tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model.hidden_states(self.rows(tokens), *args, **kwargs)

    def expert_nbytes(self) -> int:
        return self.model.expert_nbytes()


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a VocabSubsetModel (or the model itself)."""
    return model.model if isinstance(model, VocabSubsetModel) else model
