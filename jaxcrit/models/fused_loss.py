"""A fused GPU kernel for the loss's hot spot: sum_v exp(h . w_v - shift), logits never written.

The XLA path writes each vocabulary chunk's f32 logits to memory and reads them back; for a
chunk of 256 ablations x 512 tokens on Qwen2.5-0.5B that is ~160 GB of traffic beside a 35.7
TFLOP matmul. This Pallas (Triton) kernel keeps each [128, 256] logit tile in registers: every
program owns 128 rows, loops over the vocabulary in 256-column tiles and the hidden size in
64-wide steps (bf16 inputs, f32 accumulation), and adds exp(z - shift) into a per-row sum.
Tile sizes were chosen by a sweep on an H100 (docs/benchmarks.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BM, BN, BK = 128, 256, 64


def supported(d_model: int, dtype) -> bool:
    """Whether the kernel applies: a GPU, half-precision activations, d_model a multiple of BK."""
    return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and d_model % BK == 0


def _kernel(h_ref, w_ref, s_ref, o_ref, *, V: int, D: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    rows = pl.ds(pl.program_id(0) * BM, BM)
    shift = s_ref[rows]

    def vocab_tile(j, acc):
        col = j * BN + jnp.arange(BN)

        def k_step(k, z):
            hk = h_ref[rows, pl.ds(k * BK, BK)]
            wk = plt.load(w_ref.at[pl.ds(j * BN, BN), pl.ds(k * BK, BK)], mask=(col < V)[:, None], other=0.0)
            return z + jax.lax.dot_general(hk, wk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        z = jax.lax.fori_loop(0, D // BK, k_step, jnp.zeros((BM, BN), jnp.float32))
        return acc + jnp.where(col[None, :] < V, jnp.exp(z - shift[:, None]), 0.0).sum(axis=1)

    o_ref[rows] = jax.lax.fori_loop(0, pl.cdiv(V, BN), vocab_tile, jnp.zeros((BM,), jnp.float32))


def shifted_expsum(h: jax.Array, w: jax.Array, shift: jax.Array, interpret: bool = False) -> jax.Array:
    """sum_v exp(h @ w[v] - shift) per row. h [N, D], w [V, D] (same half dtype), shift [N] f32."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    N, D = h.shape
    pad = (-N) % BM
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        shift = jnp.pad(shift, (0, pad))
    kern = functools.partial(_kernel, V=w.shape[0], D=D)
    params = {} if interpret else dict(compiler_params=plt.CompilerParams(num_warps=8, num_stages=3))
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((N + pad,), jnp.float32), grid=((N + pad) // BM,),
                         interpret=interpret, **params)(h, w, shift)
    return out[:N]
