"""The texts the engine scores: a right-padded batch of token sequences."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxcrit.errors import JaxcritError


@dataclasses.dataclass(frozen=True)
class Texts:
    """A right-padded batch of token sequences and what the loss is taken over."""
    tokens: np.ndarray   # [B, T] int32
    valid: np.ndarray    # [B, T] bool

    @staticmethod
    def from_ids(seqs: Sequence[Sequence[int]]) -> "Texts":
        if not seqs:
            raise JaxcritError("no text given")
        short = [len(s) for s in seqs if len(s) < 2]
        if short:
            raise JaxcritError(f"a text has {short[0]} token(s); the loss needs at least 2 tokens per text")
        T = max(len(s) for s in seqs)
        tok = np.zeros((len(seqs), T), np.int32)
        val = np.zeros((len(seqs), T), bool)
        for i, s in enumerate(seqs):
            tok[i, :len(s)] = s
            val[i, :len(s)] = True
        return Texts(tok, val)

    @property
    def n_tokens(self) -> int:
        """Predicted tokens (each text's first token is context only)."""
        return int((self.valid[:, 1:] & self.valid[:, :-1]).sum())
