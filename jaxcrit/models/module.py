"""The decoder as a Flax NNX module: a checkpoint's params as nnx.Params over the pure forward.

Its own module so the command line, which runs the pure functions of decoder.py, never imports
flax (~1 s at start-up).
"""
from __future__ import annotations

from typing import Mapping

from flax import nnx
from jax import Array

from jaxcrit.models.config import ModelConfig
from jaxcrit.models.decoder import embed, forward, logits


class Decoder(nnx.Module):
    """Holds a checkpoint's params as nnx.Params; `params` gives the pytree the pure forward takes."""

    def __init__(self, cfg: ModelConfig, arrays: Mapping[str, Array]):
        self.cfg = cfg
        self.names = tuple(sorted(arrays))
        for k in self.names:
            setattr(self, k, nnx.Param(arrays[k]))

    @property
    def params(self) -> dict[str, Array]:
        return {k: getattr(self, k)[...] for k in self.names}

    def __call__(self, tokens: Array, valid: Array | None = None) -> Array:
        """Logits [B, T, V] in f32 of a clean forward."""
        p = self.params
        h, _ = forward(self.cfg, p, embed(self.cfg, p, tokens), valid)
        return logits(self.cfg, p, h)
