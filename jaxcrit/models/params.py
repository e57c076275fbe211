"""The parameter table: every parameter's shape and logical axes, in one place.

Kernels are stored [in, out] (x @ W); layer parameters are stacked with the layer axis first,
so running layers L..N is a slice and the forward scans over layers.
"""
from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import Mesh

from jaxcrit.models.config import ModelConfig
from jaxcrit.dist.sharding import DEFAULT_RULES, named

Shape = tuple[int, ...]
Axes = tuple[str, ...]


def param_table(cfg: ModelConfig) -> dict[str, tuple[Shape, Axes]]:
    """name -> (shape, logical axes) for every parameter the decoder reads."""
    L, D, F, Q, KV = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.q_dim, cfg.kv_dim
    fam = cfg.family
    t: dict[str, tuple[Shape, Axes]] = {
        "embed": ((cfg.vocab_size, D), ("vocab", "embed")),
        "final_norm": ((D,), ("norm",)),
        "input_norm": ((L, D), ("layers", "norm")),
        "q_w": ((L, D, Q), ("layers", "embed", "heads")),
        "k_w": ((L, D, KV), ("layers", "embed", "kv")),
        "v_w": ((L, D, KV), ("layers", "embed", "kv")),
        "o_w": ((L, Q, D), ("layers", "heads", "embed")),
        "post_norm": ((L, D), ("layers", "norm")),
        "gate_w": ((L, D, F), ("layers", "embed", "mlp")),
        "up_w": ((L, D, F), ("layers", "embed", "mlp")),
        "down_w": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if not cfg.tie_embeddings:
        t["lm_head"] = ((cfg.vocab_size, D), ("vocab", "embed"))
    if fam.qkv_bias or cfg.attention_bias:
        t["q_b"] = ((L, Q), ("layers", "heads"))
        t["k_b"] = ((L, KV), ("layers", "kv"))
        t["v_b"] = ((L, KV), ("layers", "kv"))
    if cfg.attention_bias:
        t["o_b"] = ((L, D), ("layers", "norm"))
    if fam.qk_norm:
        t["q_norm"] = ((L, cfg.head_dim), ("layers", "norm"))
        t["k_norm"] = ((L, cfg.head_dim), ("layers", "norm"))
    return t



def shard(cfg: ModelConfig, params: Mapping[str, jax.Array], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Places in-memory params (e.g. random ones) on the mesh by the table's logical axes."""
    table = param_table(cfg)
    return {k: jax.device_put(v, named(table[k][1], v.shape, mesh, rules)) for k, v in params.items()}
