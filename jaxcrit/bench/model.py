"""Random models for the benchmarks and tests: Qwen2.5 shapes, random params drawn on the devices,
random texts. Timing does not depend on the values, so no checkpoint is needed to measure."""
from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxcrit.dist.sharding import make_mesh, named, rules
from jaxcrit.engine import Texts
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.params import param_table

QWEN_05B = ModelConfig(model_type="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                       n_kv_heads=2, head_dim=64, d_ff=4864, norm_eps=1e-6, rope_theta=1e6,
                       tie_embeddings=True, max_position_embeddings=32768)

_QWEN = dict(model_type="qwen2", vocab_size=152064, head_dim=128, norm_eps=1e-6, rope_theta=1e6,
             tie_embeddings=False, max_position_embeddings=32768)
SHAPES: dict[str, ModelConfig] = {   # Qwen2.5 shapes by size, as their config.json files give them
    "0.5b": QWEN_05B,
    "7b": ModelConfig(**_QWEN, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944),
    "32b": ModelConfig(**_QWEN, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8, d_ff=27648),
    "72b": ModelConfig(**_QWEN, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=29568),
    # a Qwen2 shape that runs every benchmark on a CPU in seconds (the tests'); no power-of-two widths
    "tiny": ModelConfig(model_type="qwen2", vocab_size=211, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                        head_dim=12, d_ff=88, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True,
                        max_position_embeddings=256),
}


def moments(cfg: ModelConfig, name: str, scale: float) -> tuple[float, float]:
    """(mean, std) of a random param: weights N(0, scale^2), norm weights their identity plus N(0, 0.01)."""
    return ((0.0 if cfg.family.norm_plus_one else 1.0), 0.1) if "norm" in name else (0.0, scale)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "scale", "mesh", "layout"))
def _draw(key: jax.Array, *, cfg: ModelConfig, dtype, scale: float, mesh: Mesh, layout: str) -> dict[str, jax.Array]:
    """Every param of the table in one program: the stacked ones one layer at a time (a layer's
    params are slices of one f32 draw), the others whole; each laid out by the layout's rules."""
    table = sorted(param_table(cfg).items())
    stacked = [(name, shape[1:]) for name, (shape, axes) in table if axes[0] == "layers"]
    ends = np.cumsum([math.prod(shape) for _, shape in stacked])

    def scaled(name: str, z: jax.Array) -> jax.Array:   # standard normals -> the param's moments and dtype
        mean, std = moments(cfg, name, scale)
        return (mean + std * z).astype(dtype)

    def layer(k: jax.Array) -> tuple[jax.Array, ...]:
        parts = jnp.split(jax.random.normal(k, (int(ends[-1]),), jnp.float32), ends[:-1])
        return tuple(scaled(name, part.reshape(shape)) for (name, shape), part in zip(stacked, parts))

    out = dict(zip([name for name, _ in stacked], jax.lax.map(layer, jax.random.split(key, cfg.n_layers))))
    for i, (name, (shape, axes)) in enumerate(table):
        if axes[0] != "layers":
            out[name] = scaled(name, jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
    return {name: jax.lax.with_sharding_constraint(out[name], named(axes, shape, mesh, rules(layout)))
            for name, (shape, axes) in table}


def random_params(cfg: ModelConfig, dtype=jnp.float32, *, seed: int = 0, scale: float = 0.02,
                  mesh: Mesh | None = None, layout: str = "replicated") -> dict[str, jax.Array]:
    """Random params of the table (`moments`), drawn on the mesh's devices (default: all, 'data'
    over them) in the places of a params layout (dist.sharding.LAYOUTS), the stacked ones one layer
    at a time, so the peak stays at the params plus one layer's f32 draw even for the 32B and 72B
    shapes. One compiled program per model shape, dtype, scale, mesh and layout."""
    return _draw(jax.random.key(seed), cfg=cfg, dtype=jnp.dtype(dtype), scale=scale, mesh=mesh or make_mesh(),
                 layout=layout)


def add_model_arguments(ap: argparse.ArgumentParser, shape: str = "0.5b") -> None:
    """The flags that pick a benchmark's random model: --shape (a key of SHAPES) and --dtype."""
    ap.add_argument("--shape", default=shape, choices=SHAPES)
    ap.add_argument("--dtype", default="bfloat16", help="the params' dtype")


def random_tokens(cfg: ModelConfig, n: int, seed: int = 0) -> np.ndarray:
    """[n] int32 token ids uniform over the vocabulary: a text whose content timing does not see."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).astype(np.int32)


def random_text(cfg: ModelConfig, n: int, seed: int = 0) -> Texts:
    """One random text of n tokens, as the engine takes texts."""
    return Texts.from_ids([random_tokens(cfg, n, seed).tolist()])
