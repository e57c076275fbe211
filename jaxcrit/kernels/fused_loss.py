"""Fused GPU kernels for the loss's hot spot: sum_v exp(h . w_v - shift), logits never written.

The XLA path writes each vocabulary chunk's f32 logits to memory and reads them back; for a
chunk of 256 ablations x 512 tokens on Qwen2.5-0.5B that is ~160 GB of traffic beside a 35.7
TFLOP matmul. Both kernels keep each logit tile in registers (half-precision inputs, f32
accumulation) and add exp(z - shift) into per-row sums:

* Hopper GPUs (sm_90): the persistent Mosaic GPU GEMM of kernels/hopper.py (warp-specialised
  TMA producer, two wgmma warpgroups, blocks side by side on the same rows in 2-block clusters
  that share the rows' loads) with an epilogue that writes one partial sum per row and
  128-column vocabulary tile, added afterwards. Needs the vocabulary a multiple of 128.
* Other GPUs and other vocabularies: a Pallas (Triton) kernel. Every program owns bm rows, loops
  over the vocabulary in bn-column tiles and the hidden size in bk-wide steps. Full vocabulary
  tiles run unmasked; only a last partial tile is masked.

On a mesh, `expsum_sharded` runs it under shard_map: rows over the rows' mesh axis, the
vocabulary over the axis the sharding rules give it (partial sums added by a psum). The tiles
passed pick the kernel (kernels/selection.py chooses them: `HOPPER` where it applies, else `TILES`).
Tile sizes come from sweeps on the H200 (the Triton kernel's: `python -m jaxcrit.bench kernels
--sweep`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxcrit.kernels import hopper
from jaxcrit.dist.sharding import spec


class Tiles(NamedTuple):
    """The kernel's shape: rows x vocab x hidden per step, warps per program, pipeline stages."""
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


TILES = Tiles(128, 256, 64, 8, 3)   # the Triton kernel's, on any GPU

HOPPER = hopper.Tiles(128, 128, 64, 4, 2, cluster=2, pingpong=True)   # the Hopper kernel's, on sm_90


def fits(d_model: int, vocab: int, tiles: Tiles | hopper.Tiles) -> bool:
    """Whether the kernel of these tiles computes this head: the Triton kernel's k-step divides
    d_model (a last partial vocabulary tile is masked); the Hopper kernel's tiles divide both."""
    if isinstance(tiles, hopper.Tiles):
        return vocab % tiles.tn == 0 and d_model % tiles.tk == 0
    return d_model % tiles.bk == 0


LOG2E = 1.4426950408889634


def _exp2(x: jax.Array, interpret: bool) -> jax.Array:
    """2**x by the hardware's ex2.approx (libdevice's expf is several more instructions per
    logit, in the epilogue every logit tile pays for); jnp.exp2 when interpreted."""
    if interpret:
        return jnp.exp2(x)
    from jax.experimental.pallas import triton as plt
    return plt.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _kernel(h_ref, w_ref, s_ref, o_ref, *, V: int, D: int, t: Tiles, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    rows = pl.ds(pl.program_id(0) * t.bm, t.bm)
    shift2 = s_ref[rows] * LOG2E   # exp(z - s) = 2**(z * log2 e - s * log2 e): one FMA and one ex2

    def logits(j, load):
        def k_step(k, z):
            hk = h_ref[rows, pl.ds(k * t.bk, t.bk)]
            wk = load(j, k)
            return z + jax.lax.dot_general(hk, wk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return jax.lax.fori_loop(0, D // t.bk, k_step, jnp.zeros((t.bm, t.bn), jnp.float32))

    exp = lambda z: _exp2(z * LOG2E - shift2[:, None], interpret)

    def full_tile(j, acc):
        return acc + exp(logits(j, lambda j, k: w_ref[pl.ds(j * t.bn, t.bn), pl.ds(k * t.bk, t.bk)])).sum(axis=1)

    def last_tile(j, acc):  # the partial one: columns past V masked
        col = j * t.bn + jnp.arange(t.bn)
        z = logits(j, lambda j, k: plt.load(w_ref.at[pl.ds(j * t.bn, t.bn), pl.ds(k * t.bk, t.bk)],
                                            mask=(col < V)[:, None], other=0.0))
        return acc + jnp.where(col[None, :] < V, exp(z), 0.0).sum(axis=1)

    acc = jax.lax.fori_loop(0, V // t.bn, full_tile, jnp.zeros((t.bm,), jnp.float32))
    o_ref[rows] = jax.lax.fori_loop(V // t.bn, pl.cdiv(V, t.bn), last_tile, acc)


def _hopper_partials(h: jax.Array, w: jax.Array, shift2: jax.Array, t: hopper.Tiles) -> jax.Array:
    """Per vocabulary tile n and row r: sum over the tile's columns v of 2**(h[r] . w[v] log2 e -
    shift2[r]); [V / tn, N] f32. h [N, D] with N a multiple of t.rows, w [V, D], shift2 [N] f32."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def setup(row, wg, extra, sc):   # the warpgroup's rows' shifts
        (s_ref,) = extra

        @pl.when(wg < 2)
        def _():
            plgpu.copy_gmem_to_smem(s_ref.at[pl.ds(row, t.tm)], sc["s_smem"].at[wg], sc["loaded"].at[wg])
            plgpu.barrier_wait(sc["loaded"].at[wg])

    def epilogue(z, tile: hopper.Tile, extra, outs, sc, part):
        s2 = plgpu.load(sc["s_smem"].at[tile.wg], layout=plgpu.Layout.WGMMA.reduce(1))
        sums = jnp.exp2(z * LOG2E - jax.lax.broadcast_in_dim(s2, z.shape, [0])).sum(axis=1)
        buf = sc["o_smem"].at[tile.wg, jax.lax.rem(tile.j, 2)]
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        buf[...] = sums
        plgpu.commit_smem()

        @pl.when(tile.real)
        def _():
            plgpu.copy_smem_to_gmem(buf, outs[0].at[tile.n, pl.ds(tile.row, t.tm)])

    return hopper.gemm("fused_loss_head", h, w, (shift2,), t=t, b_is_kn=False, setup=setup, epilogue=epilogue,
                       out_type=jax.ShapeDtypeStruct((w.shape[0] // t.tn, h.shape[0]), jnp.float32),
                       scratch=dict(s_smem=plgpu.SMEM((2, t.tm), jnp.float32),
                                    o_smem=plgpu.SMEM((2, 2, t.tm), jnp.float32),
                                    loaded=plgpu.Barrier(num_barriers=2)))


def shifted_expsum(h: jax.Array, w: jax.Array, shift: jax.Array, tiles: Tiles | hopper.Tiles,
                   interpret: bool = False) -> jax.Array:
    """sum_v exp(h @ w[v] - shift) per row. h [N, D], w [V, D] (same half dtype), shift [N] f32.
    tiles: the kernel and its shape (hopper.Tiles: the Hopper kernel; Tiles: the Triton kernel,
    which alone runs interpreted)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    N, D = h.shape
    if isinstance(tiles, hopper.Tiles):
        pad = (-N) % tiles.rows
        parts = _hopper_partials(jnp.pad(h, ((0, pad), (0, 0))), w, jnp.pad(shift, (0, pad)) * LOG2E, tiles)
        return parts.sum(axis=0)[:N]
    pad = (-N) % tiles.bm
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        shift = jnp.pad(shift, (0, pad))
    kern = functools.partial(_kernel, V=w.shape[0], D=D, t=tiles, interpret=interpret)
    params = {} if interpret else dict(
        compiler_params=plt.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages))
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((N + pad,), jnp.float32),
                         grid=((N + pad) // tiles.bm,), interpret=interpret, **params)(h, w, shift)
    return out[:N]


def expsum_sharded(hs: jax.Array, w: jax.Array, shift: jax.Array, mesh: Mesh, tiles: Tiles | hopper.Tiles,
                   interpret: bool = False) -> jax.Array:
    """sum_v exp(hs[r] @ w[v] - shift) [R, B, T] for hs [R, B, T, D], w [V, D], shift [B, T] f32.

    Each device runs the kernel on its rows (the rows' mesh axis) and its part of the
    vocabulary (the vocab's mesh axis by the sharding rules, if it divides V); the vocabulary
    parts' sums are added with a psum. On a one-device mesh this is the kernel itself.
    """
    rows = spec(("rows",), hs.shape[:1], mesh)
    vocab = spec(("vocab",), w.shape[:1], mesh)

    def local(h, w, s):
        R, B, T, D = h.shape
        s = jnp.broadcast_to(s, (R, B, T)).reshape(-1)
        out = shifted_expsum(h.reshape(-1, D), w, s, tiles, interpret).reshape(R, B, T)
        return jax.lax.psum(out, vocab[0]) if vocab[0] is not None else out

    return jax.shard_map(local, mesh=mesh, in_specs=(P(*rows, None, None, None), P(*vocab, None), P()),
                         out_specs=P(*rows, None, None), check_vma=False)(hs, w, shift)
