"""HF safetensors checkpoint -> stacked, sharded params. The name map of each family lives here."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from jaxcrit.convert.safetensors_io import Checkpoint
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig, from_hf_config
from jaxcrit.models.params import param_table
from jaxcrit.dist.sharding import DEFAULT_RULES, make_mesh, named

LAYER = "model.layers.{i}."
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Source:
    """Where one param comes from: a HF tensor (per layer for stacked params), optionally a row
    range of a fused tensor, transposed to [in, out] for kernels."""

    def __init__(self, key: str, transpose: bool = False, rows: tuple[int, int] | None = None,
                 fused_rows: int | None = None):
        self.key, self.transpose, self.rows, self.fused_rows = key, transpose, rows, fused_rows

    def read(self, ckpt: Checkpoint, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        """The part `index` (slices over the param's dims, per layer) of this param, read from the
        checkpoint: only that part's rows and columns of the HF tensor."""
        raw = index[::-1] if self.transpose else index
        if self.rows is not None:
            lo, hi = self.rows
            r = raw[0]
            raw = (slice(lo + (r.start or 0), lo + (hi - lo if r.stop is None else r.stop)), *raw[1:])
        t = ckpt.read(self.key.format(i=layer), raw)
        return t.T if self.transpose else t

    def raw_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape implied by config.json for a param slice of this shape."""
        raw = shape[::-1] if self.transpose else shape
        return (self.fused_rows, *raw[1:]) if self.fused_rows else tuple(raw)


def name_map(cfg: ModelConfig) -> dict[str, Source]:
    """param name -> Source, for every param of the table."""
    Q, KV, F = cfg.q_dim, cfg.kv_dim, cfg.d_ff
    m = {
        "embed": Source("model.embed_tokens.weight"),
        "final_norm": Source("model.norm.weight"),
        "lm_head": Source("lm_head.weight"),
        "input_norm": Source(LAYER + "input_layernorm.weight"),
        "post_norm": Source(LAYER + "post_attention_layernorm.weight"),
        "o_w": Source(LAYER + "self_attn.o_proj.weight", True),
        "down_w": Source(LAYER + "mlp.down_proj.weight", True),
        "q_b": Source(LAYER + "self_attn.q_proj.bias"),
        "k_b": Source(LAYER + "self_attn.k_proj.bias"),
        "v_b": Source(LAYER + "self_attn.v_proj.bias"),
        "o_b": Source(LAYER + "self_attn.o_proj.bias"),
        "q_norm": Source(LAYER + "self_attn.q_norm.weight"),
        "k_norm": Source(LAYER + "self_attn.k_norm.weight"),
    }
    if cfg.family.fused:
        qkv, gu = LAYER + "self_attn.qkv_proj.weight", LAYER + "mlp.gate_up_proj.weight"
        m |= {
            "q_w": Source(qkv, True, (0, Q), Q + 2 * KV),
            "k_w": Source(qkv, True, (Q, Q + KV), Q + 2 * KV),
            "v_w": Source(qkv, True, (Q + KV, Q + 2 * KV), Q + 2 * KV),
            "gate_w": Source(gu, True, (0, F), 2 * F),
            "up_w": Source(gu, True, (F, 2 * F), 2 * F),
        }
    else:
        m |= {n + "_w": Source(LAYER + f"{mod}.{n}_proj.weight", True)
              for n, mod in [("q", "self_attn"), ("k", "self_attn"), ("v", "self_attn"),
                             ("gate", "mlp"), ("up", "mlp")]}
    return {k: m[k] for k in param_table(cfg)}


def read_config(directory: Path) -> ModelConfig:
    d = Path(directory)
    if not d.is_dir():
        raise JaxcritError(f"{d}: no such checkpoint directory")
    p = d / "config.json"
    if not p.exists():
        raise JaxcritError(f"{p}: missing; a Hugging Face checkpoint dir holds config.json and *.safetensors")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise JaxcritError(f"{p}: not valid JSON ({e})") from None
    return from_hf_config(raw, str(p))


def place(cfg: ModelConfig, read: Mapping[str, callable], mesh: Mesh, rules, dtype) -> dict[str, jax.Array]:
    """Builds every param of the table straight onto its devices.

    read[name](layer, index) returns that param's host slab for one layer (None for unstacked
    params), only the part `index` names (slices over the per-layer dims); each device's callback
    reads only what that device holds, and a process only its own devices' parts; devices holding
    the same part (replicas) share one read.
    """
    out = {}
    for name, (shape, axes) in param_table(cfg).items():
        stacked = axes[0] == "layers"
        slabs: dict[tuple, np.ndarray] = {}   # this param's parts read so far, by index

        def cb(index, name=name, shape=shape, stacked=stacked, slabs=slabs):
            key = tuple((s.start, s.stop) for s in _full(index, shape))
            if key not in slabs:
                slabs[key] = read_part(index, name, shape, stacked)
            return slabs[key]

        def read_part(index, name, shape, stacked):
            if stacked:
                layers = range(cfg.n_layers)[index[0]]
                slab = None  # filled layer by layer: one layer's read buffer alive at a time
                for j, i in enumerate(layers):
                    part = read[name](i, _full(index[1:], shape[1:]))
                    if slab is None:
                        slab = np.empty((len(layers), *part.shape), dtype)
                    slab[j] = part
            else:
                slab = read[name](None, _full(index, shape))
            return np.ascontiguousarray(slab.astype(dtype, copy=False))  # slab is already a fresh array

        out[name] = jax.make_array_from_callback(shape, named(axes, shape, mesh, rules), cb)
        # jax drops its reference to a transferred host slab only from a gc callback: wait for the
        # transfer, then run it, so only this param's host parts are alive beyond the placed params
        out[name].block_until_ready()
        slabs.clear()
        gc.collect(0)
    return out


def _full(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """index with one slice per dim of shape (jax may give fewer)."""
    return tuple(index) + (slice(None),) * (len(shape) - len(index))


def load_hf(directory: str | Path, dtype=np.float32, mesh: Mesh | None = None,
            rules=DEFAULT_RULES) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Reads a HF checkpoint dir into (ModelConfig, params), params placed on `mesh`."""
    d = Path(directory)
    cfg = read_config(d)
    ckpt = Checkpoint(d)
    table, sources = param_table(cfg), name_map(cfg)
    used = set()
    for name, (shape, axes) in table.items():
        src = sources[name]
        per = shape[1:] if axes[0] == "layers" else shape
        keys = [src.key.format(i=i) for i in range(cfg.n_layers)] if axes[0] == "layers" else [src.key]
        for k in keys:
            if k not in ckpt.where:
                raise JaxcritError(f"{d}: tensor {k} is missing; the checkpoint does not match its "
                                   f"config.json (model_type {cfg.model_type})")
            if ckpt.shape(k) != src.raw_shape(per):
                raise JaxcritError(f"{d}: tensor {k} has shape {ckpt.shape(k)} but config.json implies "
                                   f"{src.raw_shape(per)}; the checkpoint and config.json disagree")
        used.update(keys)
    extra = sorted(k for k in ckpt.names() - used
                   if not k.endswith(IGNORED_SUFFIXES) and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if extra:
        raise JaxcritError(f"{d}: {len(extra)} checkpoint tensors have no place in a {cfg.model_type} model "
                           f"(e.g. {', '.join(extra[:3])}); is model_type right?")
    read = {name: (lambda i, index, s=sources[name]: s.read(ckpt, i, index)) for name in table}
    return cfg, place(cfg, read, mesh or make_mesh(), rules, dtype)
