"""A persistent, warp-specialised GEMM for Hopper (sm_90) in Pallas Mosaic GPU, for GEMMs whose
output never needs to exist: each [tm, tn] f32 tile goes to an epilogue (the loss head's exp-sum,
the MLP's SiLU(gate)·up) that writes what the caller keeps.

a [M, K] (rows) times b's tn-column tiles, K in tk steps. A block holds two wgmma warpgroups of
tm rows each and a producer warpgroup whose TMA loads run `stages` steps ahead. Blocks are
persistent, one per SM: `groups` blocks sit side by side on the same rows, each on its own range
of b's tiles, and all blocks move through the rows together, in rounds, so the rows' tiles and
b's stay in L2 (with a grid of row blocks, 132 blocks on different rows fell out of L2: 485
against 631-658 TFLOP/s on the head, docs/benchmarks.md). With cluster 2, pairs of those blocks
form a cluster and each loads half of the rows' tile for both (TMA multicast): half the rows'
traffic from L2. Mosaic GPU needs a GPU to compile, so these kernels are tested on one
(tests/test_fused_*.py, GPU-only cases) and in the benchmark call.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Tiles(NamedTuple):
    """rows per compute warpgroup (a block has two), b columns per tile, K per pipeline step,
    pipeline stages, blocks side by side on the same rows, blocks per cluster (1 or 2)."""
    tm: int
    tn: int
    tk: int
    stages: int
    groups: int
    cluster: int = 1


class Tile(NamedTuple):
    """Where an epilogue's tile sits: b's tile index n, the block's tile count j so far in this
    row block (for alternating buffers), the warpgroup's first row and index, and whether the
    tile is real (a cluster's last tile of a range may be a repeat whose output is dropped)."""
    n: jax.Array
    j: jax.Array
    row: jax.Array
    wg: jax.Array
    real: jax.Array


def on_hopper() -> bool:
    """Whether the first local device is an sm_90 GPU and this jax has Pallas Mosaic GPU."""
    import importlib.util
    dev = jax.local_devices()[0]
    return (getattr(dev, "compute_capability", None) == "9.0"
            and importlib.util.find_spec("jax.experimental.pallas.mosaic_gpu") is not None)


def swizzled(cols: int, dtype) -> dict:
    """SMEM transforms for a tile `cols` elements wide: 8-row tiles, the widest swizzle."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    size = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * size * 8)
    return dict(transforms=(plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle)))


def gemm(name: str, a: jax.Array, b: jax.Array, extra: tuple[jax.Array, ...], *, t: Tiles, b_is_kn: bool,
         out_type, scratch: dict, epilogue: Callable, setup: Callable | None = None):
    """Runs the kernel (named `name` in profiles); returns out_type's arrays, written by the epilogue.

    a [M, K] with M a multiple of 2 tm; b [K, Nb] (b_is_kn) or [Nb, K], Nb a multiple of tn.
    extra: more inputs, passed as refs. scratch: name -> SMEM/Barrier shapes every warpgroup sees.
    epilogue(z [tm, tn] f32, tile: Tile, extra_refs, out_refs, scratch_refs) writes the tile's
    results (only when tile.real). setup(row0, wg, extra_refs, scratch_refs) runs at the start
    of each block of 2 tm rows, in all three warpgroups.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    M, K = a.shape
    n_tiles, k_steps, n_row_blocks = (b.shape[1] if b_is_kn else b.shape[0]) // t.tn, K // t.tk, M // (2 * t.tm)
    ranges = t.groups // t.cluster                 # column ranges; a cluster shares one
    in_flight = jax.local_devices()[0].core_count // t.groups   # row blocks in flight
    per_range = pl.cdiv(n_tiles, ranges)
    per_block = pl.cdiv(per_range, t.cluster)
    spec = lambda shape, index, **kw: plgpu.BlockSpec(shape, index, memory_space=plgpu.SMEM, delay_release=1,
                                                     **swizzled(min(t.tk, t.tn), a.dtype), **kw)
    multicast = dict(collective_axes=("cluster",)) if t.cluster > 1 else {}
    b_spec = spec((t.tk, t.tn), lambda k: (k, 0)) if b_is_kn else spec((t.tn, t.tk), lambda k: (0, k))

    def pipeline(body, context):   # one tile: k_steps TMA stages of the block's rows and b's tile
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=t.stages, compute_context=context,
            in_specs=[spec((2 * t.tm, t.tk), lambda k: (0, k), **multicast), b_spec])

    def b_tile(b_ref, n):
        cols = pl.ds(n * t.tn, t.tn)
        return b_ref.at[:, cols] if b_is_kn else b_ref.at[cols]

    def kernel(a_ref, b_ref, *refs):
        extra_refs, out_refs = refs[:len(extra)], refs[len(extra):]
        block = jax.lax.axis_index("block")
        member = jax.lax.axis_index("cluster") if t.cluster > 1 else 0
        rng, slot = jax.lax.rem(block, ranges), jax.lax.div(block, ranges)
        first = rng * per_range
        last = jnp.minimum(first + per_range, n_tiles)
        unused = lambda *_, **__: None

        @functools.partial(pl.run_scoped, allocs=pipeline(unused, unused).get_allocations(
                               a_ref.at[pl.ds(0, 2 * t.tm)], b_tile(b_ref, 0)), **scratch, collective_axes="wg")
        def scope(allocs, **sc):
            wg = jax.lax.axis_index("wg")

            def row_block(row0):
                if setup is not None:
                    setup(row0, wg, extra_refs, sc)

                @pl.loop(0, per_block)
                def _tile(j):
                    n = first + j * t.cluster + member
                    real = n < last
                    n = jnp.minimum(n, last - 1)   # a repeat keeps a cluster's pair in step

                    def mma(_, a_smem, b_smem, acc):
                        plgpu.wgmma(acc, a_smem.at[pl.ds(wg * t.tm, t.tm)],
                                    b_smem if b_is_kn else b_smem.transpose((1, 0)))
                        plgpu.wgmma_wait(1)
                        return acc

                    def context(run):
                        @functools.partial(pl.run_scoped, acc=plgpu.ACC((t.tm, t.tn), jnp.float32))
                        def _(acc):
                            run(acc)
                            epilogue(acc[...], Tile(n, j, row0 + wg * t.tm, wg, real), extra_refs, out_refs, sc)

                    pipeline(mma, context)(a_ref.at[pl.ds(row0, 2 * t.tm)], b_tile(b_ref, n), allocations=allocs)

            @pl.loop(0, pl.cdiv(n_row_blocks, in_flight))
            def _round(i):   # every block moves to its next rows together: b's tiles stay in step
                m = i * in_flight + slot

                @pl.when(m < n_row_blocks)
                def _():
                    row_block(m * 2 * t.tm)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel.__name__ = name   # Mosaic GPU names the kernel after its body
    cluster = dict(cluster=(t.cluster,), cluster_names=("cluster",)) if t.cluster > 1 else {}
    return plgpu.kernel(kernel, out_type=out_type, grid=(in_flight * ranges,), grid_names=("block",),
                        num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        **cluster)(a, b, *extra)
