"""cuDNN's fused flash attention (GPUs, bf16/fp16): the [T, T] scores never reach memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcrit.models.config import ModelConfig


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Causal GQA attention as decoder.attend computes it: q [B, T, H, hd], k/v [B, T, KV, hd] ->
    [B, T, H, hd]; valid [B, T] marks the keys (None: no padding, and no sequence lengths given:
    cuDNN's faster kernel on the H200)."""
    lengths = None if valid is None else valid.sum(-1).astype(jnp.int32)
    window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, local_window_size=window,
                                        implementation="cudnn")
