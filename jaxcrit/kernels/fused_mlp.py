"""The MLP's hidden activations act(s * (x @ gate)) * (s * (x @ up)) as one Hopper GEMM
(kernels/hopper.py): gate and up never go to memory. With the norms folded (kernels/selection.py's
`norms`), x is the post-attention residual itself and s its rows' RMSNorm scales (the norm's gain
folded into the weights, `decoder.folded`), so no normed copy of the residual is written either;
each warpgroup loads its rows' scales while its tile's k-steps run (hopper's prologue).

XLA runs gate and up as two cuBLAS GEMMs, writes both [N, F] outputs and reads them back in one
elementwise pass for SiLU·mul. Here each tile of the GEMM holds tn/2 gate columns beside the same
tn/2 up columns (the weights interleaved per tile, once per call: a copy of the two weights), and
the epilogue writes only the product. Rounding as transformers' MLP rounds in PyTorch: gate and up
rounded to the activation dtype as GEMM outputs, SiLU computed in f32 and rounded once, the product
rounded once. (XLA's program of the same jnp code rounds more often inside SiLU: its products
differ from these in about a third of the elements, by up to 2^-6 relative.) The folded norms
round otherwise than transformers' RMSNorm: with them, engine losses move by bf16 rounding (at
most 1.7e-3 nats, mean 3e-4, over 24 chunks of a bf16 scan). On one H100, at 229,376 x 896 x
2 x 4,864 (one engine chunk of Qwen2.5-0.5B), it takes 5.78 ms where cuBLAS's two GEMMs and XLA's
pass take 7.38 (docs/benchmarks.md).

The engine runs it in the layers no row of a chunk edits, where nothing needs gate or up themselves.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxcrit.kernels import hopper

TILES = hopper.Tiles(64, 256, 64, 3, 2, cluster=2)   # per warpgroup 64 rows x (128 gate + 128 up) columns;
                                                    # 2-block clusters share the rows' loads
STORE = 64                                # columns per TMA store of the product

ACTS = ("silu",)   # activations the epilogue computes (Gemma's gelu_tanh stays on XLA)


def fits(act: str, d_model: int, d_ff: int, tiles: hopper.Tiles) -> bool:
    """Whether the kernel computes this MLP: an activation of ACTS, d_model a multiple of the
    tiles' k-step and d_ff of their gate (or up) columns."""
    return act in ACTS and d_model % tiles.tk == 0 and d_ff % (tiles.tn // 2) == 0


def _product(x: jax.Array, scale: jax.Array | None, gate_w: jax.Array, up_w: jax.Array, t: hopper.Tiles
             ) -> jax.Array:
    """silu(s * (x @ gate_w)) * (s * (x @ up_w)) [N, F] for x [N, D] (N a multiple of t.rows),
    weights [D, F] and each row's scale s (scale [N] f32; None: 1, no prologue: the form Pallas's
    interpreter runs, which cannot load into a register layout)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    (N, D), F, half = x.shape, gate_w.shape[1], t.tn // 2
    w = jnp.stack([gate_w.reshape(D, F // half, half), up_w.reshape(D, F // half, half)], 2).reshape(D, 2 * F)
    dt, f32, parts = x.dtype, jnp.float32, half // STORE

    def prologue(tile: hopper.Tile, extra):   # the rows' scales, loaded while the k-steps run
        return plgpu.load(extra[0], (pl.ds(tile.row, t.tm),), layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)

    def finish(z, early):   # gate and up as the GEMMs' outputs: scaled by the rows' scales, rounded
        if early is not None:
            z = z * jax.lax.broadcast_in_dim(early, z.shape, [0])
        return z.astype(dt)

    def epilogue(y, tile: hopper.Tile, extra, outs, sc, part):   # the product's columns part * STORE + [0, STORE)
        g, u = (y[:, c + part * STORE:c + (part + 1) * STORE].astype(f32) for c in (0, half))
        buf = sc["o_smem"].at[tile.wg, part]
        plgpu.wait_smem_to_gmem(parts - 1, wait_read_only=True)   # buf's last store (parts stores ago) has read it
        buf[...] = ((g / (1.0 + jnp.exp(-g))).astype(dt).astype(f32) * u).astype(dt)
        plgpu.commit_smem()

        @pl.when(tile.real)
        def _():
            plgpu.copy_smem_to_gmem(buf, outs[0].at[pl.ds(tile.row, t.tm), pl.ds(tile.n * half + part * STORE, STORE)])

    return hopper.gemm("fused_mlp_swiglu", x, w, () if scale is None else (scale,), t=t, b_is_kn=True,
                       epilogue=epilogue, prologue=None if scale is None else prologue, finish=finish,
                       parts=parts,
                       out_type=jax.ShapeDtypeStruct((N, F), dt),
                       scratch=dict(o_smem=plgpu.SMEM((2, half // STORE, t.tm, STORE), dt,
                                                      **hopper.swizzled(STORE, dt))))


@functools.cache
def swiglu_for(tiles: hopper.Tiles) -> Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """The kernel with these tiles as swiglu(x, scale, gate_w, up_w) -> silu(s * (x @ gate_w)) *
    (s * (x @ up_w)) [..., F] for x [..., D], each row's scale s (scale [...] f32: RMSNorm's, its
    gain folded into the weights; ones when it is not) and weights [D, F]. Under vmap (the engine's
    rows) the rows fold into the kernel's: one launch for the chunk. One function per tiles (cached),
    so equal tiles give the same function and a program that holds it compiles once."""

    @jax.custom_batching.custom_vmap
    def swiglu(x: jax.Array, scale: jax.Array, gate_w: jax.Array, up_w: jax.Array) -> jax.Array:
        lead, D = x.shape[:-1], x.shape[-1]
        x, scale = x.reshape(-1, D), scale.reshape(-1)
        pad = (-x.shape[0]) % tiles.rows
        out = _product(jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(scale, (0, pad)), gate_w, up_w, tiles)
        return out[:x.shape[0]].reshape(*lead, -1)

    @swiglu.def_vmap
    def batched(axis_size, in_batched, x, scale, gate_w, up_w):
        if any(in_batched[2:]):
            raise NotImplementedError("fused_mlp.swiglu: weights batched under vmap; use the XLA MLP (mlp='xla')")
        if in_batched[0] != in_batched[1]:   # rows and their scales batched together (the engine's case)
            x, scale = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                        for a, b in zip((x, scale), in_batched[:2]))
        return swiglu(x, scale, gate_w, up_w), True

    return swiglu


swiglu = swiglu_for(TILES)   # the kernel with its own tiles
