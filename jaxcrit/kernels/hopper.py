"""A persistent, warp-specialised GEMM for Hopper (sm_90) in Pallas Mosaic GPU, for GEMMs whose
output never needs to exist: each [tm, tn] f32 tile goes to an epilogue (the loss head's exp-sum,
the MLP's SiLU(gate)·up) that writes what the caller keeps.

a [M, K] (rows) times b's tn-column tiles, K in tk steps. A block holds two wgmma warpgroups and a
producer warpgroup whose TMA loads run `stages` steps ahead, on one of two schedules:

* in step (the default): both warpgroups work on the same b tile, tm rows each (a block: 2 tm
  rows); the producer fills one ring of slots through all of the block's tiles, each slot read by
  both warpgroups; both run the epilogue while the tensor cores wait (the loads of the next
  tile's first steps go on meanwhile).
* ping-pong (`Tiles.pingpong`): each warpgroup owns whole tiles (the block's tm rows, alternate b
  tiles); the producer fills one ring of slots in tile order, so one warpgroup's wgmma steps start
  as the other's end and each epilogue runs beside the other's wgmma (FlashAttention-3's
  schedule). The head's exp-sum runs ~7 % faster by it (200.5-204.8 against 215.2-224.5 us
  per ablation alone, on an H200); the MLP ties (docs/benchmarks.md).

Blocks are persistent, one per SM: `groups` blocks sit side by side on the same rows, each on its
own range of b's tiles, and all blocks move through the rows together, in rounds, so the rows'
tiles and b's stay in L2 (with a grid of row blocks, 132 blocks on different rows fell out of L2:
485 against 631-658 TFLOP/s on the head). With cluster 2, pairs of those blocks form a cluster and
each loads half of the rows' tile for both (TMA multicast): half the rows' traffic from L2.
Mosaic GPU needs a GPU to compile, so these kernels are tested on one (tests/test_fused_*.py,
GPU-only cases) and in the benchmark call; on CPU, the MLP kernel's program runs in Pallas's
Mosaic GPU interpreter (single blocks) and both kernels are traced to jaxprs (tests/test_fused_mlp.py,
tests/test_hopper.py).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Tiles(NamedTuple):
    """rows per warpgroup's tile, b columns per tile, K per pipeline step, pipeline stages, blocks
    side by side on the same rows, blocks per cluster (1 or 2), and the schedule: the warpgroups
    in step on one tile (a block's rows: 2 tm) or ping-pong on alternate tiles (tm)."""
    tm: int
    tn: int
    tk: int
    stages: int
    groups: int
    cluster: int = 1
    pingpong: bool = False

    @property
    def rows(self) -> int:
        """A block's rows (a's rows must be a multiple)."""
        return self.tm if self.pingpong else 2 * self.tm


class Tile(NamedTuple):
    """Where an epilogue's tile sits: b's tile index n, a count j of the warpgroup's tiles
    (alternating buffers use its parity), the warpgroup's first row and index, and whether the
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


class _Task(NamedTuple):
    """One tile of a block's work: its first row, b tile, whether it is real, index in the row block."""
    row0: jax.Array
    n: jax.Array
    real: jax.Array
    j: jax.Array


class _Work:
    """A block's (a cluster's) share: whole rounds of `in_flight` row blocks, `ranges` blocks side
    by side on each (each on a range of b's tiles, split between a cluster's members), then a last
    round for the row blocks left over, each split between `units // rest` blocks on narrower
    ranges, so it keeps every SM busy rather than a few: the engine's chunks leave 10 of 66 row
    blocks for a 28th round of the head at 448 ablations, 3 % of its time idle otherwise.
    Python ints are fixed by the shapes; the block's own values are traced."""

    def __init__(self, t: Tiles, n_tiles: int, n_row_blocks: int, units: int, unit, member):
        import jax.experimental.pallas as pl
        self.t, self.n_tiles, self.member = t, n_tiles, member
        ranges = t.groups // t.cluster
        self.in_flight = units // ranges
        self.full, rest = divmod(n_row_blocks, self.in_flight)
        split = min(units // rest, n_tiles) if rest else 1
        self.per_range = (pl.cdiv(n_tiles, ranges), pl.cdiv(n_tiles, split))   # a whole round's, the last's
        self.per_block = tuple(pl.cdiv(r, t.cluster) for r in self.per_range)
        self.slot, self.rng = jax.lax.div(unit, ranges), jax.lax.rem(unit, ranges)
        self.last_block, self.last_rng = jax.lax.div(unit, split), jax.lax.rem(unit, split)
        in_last = (self.last_block < rest).astype(jnp.int32)   # 1 if the block has a row block in the last round
        self.row_blocks = self.full + in_last
        self.tasks = self.full * self.per_block[0] + in_last * self.per_block[1]

    def count(self, r: jax.Array) -> jax.Array:
        """Tiles in the block's r-th row block."""
        return jnp.where(r < self.full, *self.per_block)

    def task(self, r: jax.Array, j: jax.Array) -> _Task:
        """The j-th tile of the block's r-th row block."""
        last = r >= self.full
        row_block = jnp.where(last, self.full * self.in_flight + self.last_block, r * self.in_flight + self.slot)
        first = jnp.where(last, self.last_rng * self.per_range[1], self.rng * self.per_range[0])
        end = jnp.minimum(first + jnp.where(last, self.per_range[1], self.per_range[0]), self.n_tiles)
        n = first + j * self.t.cluster + self.member
        return _Task(row_block * self.t.rows, jnp.minimum(n, end - 1), n < end, j)   # a repeat keeps a pair in step

    def flat(self, i: jax.Array) -> _Task:
        """The block's i-th tile in order."""
        r = jnp.minimum(jax.lax.div(i, self.per_block[0]), self.full)
        return self.task(r, i - r * self.per_block[0])


def gemm(name: str, a: jax.Array, b: jax.Array, extra: tuple[jax.Array, ...], *, t: Tiles, b_is_kn: bool,
         out_type, scratch: dict, epilogue: Callable, setup: Callable | None = None,
         prologue: Callable | None = None, finish: Callable | None = None, parts: int = 1):
    """Runs the kernel (named `name` in profiles); returns out_type's arrays, written by the epilogue.

    a [M, K] with M a multiple of t.rows; b [K, Nb] (b_is_kn) or [Nb, K], Nb a multiple
    of tn. extra: more inputs, passed as refs. scratch: name -> SMEM/Barrier shapes every
    warpgroup sees. finish(z [tm, tn] f32, early) gives the tile's value y once its k-steps are
    done (default: z); epilogue(y, tile: Tile, extra_refs, out_refs, scratch_refs, part) writes
    the tile's results (only when tile.real), in `parts` calls (part 0, 1, ...).
    setup(row, wg, extra_refs, scratch_refs) (ping-pong only) runs when warpgroup wg moves to its
    next tm rows, starting at row. prologue(tile, extra_refs) (either schedule) runs before a tile's
    k-steps, so what it loads arrives beside them; its value is finish's `early` (None without).
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu
    M, K = a.shape
    n_tiles, k_steps = (b.shape[1] if b_is_kn else b.shape[0]) // t.tn, K // t.tk
    units = jax.local_devices()[0].core_count // t.groups * (t.groups // t.cluster)   # blocks (clusters), <= 1 per SM

    def kernel(a_ref, b_ref, *refs):
        member = jax.lax.axis_index("cluster") if t.cluster > 1 else 0
        work = _Work(t, n_tiles, M // t.rows, units, jax.lax.axis_index("block"), member)
        _ring(t, a_ref, b_ref, refs[:len(extra)], refs[len(extra):], b_is_kn=b_is_kn, k_steps=k_steps,
                 work=work, scratch=scratch, epilogue=epilogue, setup=setup, prologue=prologue,
                 finish=finish or (lambda z, early: z), parts=parts)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel.__name__ = name   # Mosaic GPU names the kernel after its body
    cluster = dict(cluster=(t.cluster,), cluster_names=("cluster",)) if t.cluster > 1 else {}
    return plgpu.kernel(kernel, out_type=out_type, grid=(units,), grid_names=("block",),
                        num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        **cluster)(a, b, *extra)


def _ring(t: Tiles, a_ref, b_ref, extra_refs, out_refs, *, b_is_kn, k_steps, work: _Work, scratch,
          epilogue, setup, prologue, finish, parts):
    """Both schedules on one ring of `stages` slots filled in task order through all of the
    block's tiles: global step c = task * k_steps + k uses slot c % stages, and the producer
    refills it once the last use's warpgroups (of both blocks, with clusters) released it, so it
    loads the next tile's first steps while the warpgroups finish a tile and run its epilogue.
    It waits for the last steps' releases before the block exits (with 2-block clusters the
    partner's warpgroups arrive on this block's barriers: without the wait, one that exits first
    faults the other).

    in step: both warpgroups read every slot (tm rows each of its 2 tm), on one ready and one
    consumed barrier per slot. (As one `emit_pipeline_warp_specialized` per tile, each tile's
    loads started only after the last one's quiesce; on an H100 the ring ran the MLP 0.1-0.4 %
    faster alone and in engine chunks, with the same results bit for bit: docs/benchmarks.md.)
    ping-pong: warpgroup w runs tasks w, w + 2, ... (whole [tm, tn] tiles), on ready and
    consumed barriers per warpgroup and slot, so each warpgroup's barrier phases count only its
    own tasks; setup runs at its first tile of a row block."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    pp = t.pingpong
    if setup is not None and not pp:
        raise NotImplementedError("hopper: setup is ping-pong's hook")
    S, dt = t.stages, a_ref.dtype
    rem, div = jax.lax.rem, jax.lax.div
    # the barrier of global step c in slot s: per warpgroup (the step's owner) in ping-pong
    barrier = (lambda c, s: rem(div(c, k_steps), 2) * S + s) if pp else (lambda c, s: s)
    tf = swizzled(min(t.tk, t.tn), dt)
    multicast = dict(collective_axes="cluster") if t.cluster > 1 else {}
    consumed_type = (functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",)) if t.cluster > 1
                     else plgpu.Barrier)   # with multicast, a slot is free once both blocks are done
    readers = dict(num_barriers=2 * S) if pp else dict(num_arrivals=2, num_barriers=S)

    @functools.partial(pl.run_scoped, a_smem=plgpu.SMEM((S, t.rows, t.tk), dt, **tf),
                       b_smem=plgpu.SMEM((S, *((t.tk, t.tn) if b_is_kn else (t.tn, t.tk))), dt, **tf),
                       ready=plgpu.Barrier(num_arrivals=2, num_barriers=2 * S if pp else S),
                       consumed=consumed_type(**readers), **scratch, collective_axes="wg")
    def scope(a_smem, b_smem, ready, consumed, **sc):
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, work.tasks)
            def _task(i):
                w = work.flat(i)

                @pl.loop(0, k_steps)
                def _step(k):
                    c = i * k_steps + k
                    s = rem(c, S)

                    @pl.when(c >= S)
                    def _():
                        plgpu.barrier_wait(consumed.at[barrier(c - S, s)])

                    ks, cols = pl.ds(k * t.tk, t.tk), pl.ds(w.n * t.tn, t.tn)
                    plgpu.copy_gmem_to_smem(a_ref.at[pl.ds(w.row0, t.rows), ks], a_smem.at[s], ready.at[barrier(c, s)],
                                            **multicast)
                    plgpu.copy_gmem_to_smem(b_ref.at[ks, cols] if b_is_kn else b_ref.at[cols, ks], b_smem.at[s],
                                            ready.at[barrier(c, s)])

            total = work.tasks * k_steps

            @pl.loop(jnp.maximum(total - S, 0), total)
            def _drain(c):   # the last steps' releases: a cluster partner must not arrive on an exited block
                plgpu.barrier_wait(consumed.at[barrier(c, rem(c, S))])

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            mine = (lambda s: wg * S + s) if pp else (lambda s: s)   # this warpgroup's barrier of slot s

            def k_steps_into(acc, own):
                """Task own's k-steps into acc; its [tm, tn] f32 value once done, its last slot released."""
                def step(k, carry):
                    c = own * k_steps + k
                    s = rem(c, S)
                    plgpu.barrier_wait(ready.at[mine(s)])
                    b_s = b_smem.at[s]
                    plgpu.wgmma(acc, a_smem.at[s] if pp else a_smem.at[s].at[pl.ds(wg * t.tm, t.tm)],
                                b_s if b_is_kn else b_s.transpose((1, 0)))
                    plgpu.wgmma_wait(1)   # step k - 1's wgmma is done: release its slot
                    pl.when(k > 0)(lambda: plgpu.barrier_arrive(consumed.at[mine(rem(c - 1, S))]))
                    return carry

                jax.lax.fori_loop(0, k_steps, step, 0)
                plgpu.wgmma_wait(0)
                z = acc[...]
                plgpu.barrier_arrive(consumed.at[mine(rem((own + 1) * k_steps - 1, S))])
                return z

            def tile_of(i, w):   # where the warpgroup's i-th tile, task w, sits
                return Tile(w.n, i, w.row0 if pp else w.row0 + wg * t.tm, wg, w.real)

            @pl.loop(0, div(work.tasks - wg + 1, 2) if pp else work.tasks)
            def _tile(i):
                own = 2 * i + wg if pp else i
                w = work.flat(own)
                if setup is not None:   # a warpgroup's first tile in a row block has j 0 or 1
                    pl.when(w.j < 2)(lambda: setup(w.row0, wg, extra_refs, sc))

                def run(acc):
                    tile = tile_of(i, w)
                    early = None if prologue is None else prologue(tile, extra_refs)   # loads beside the k-steps
                    y = finish(k_steps_into(acc, own), early)
                    for part in range(parts):
                        epilogue(y, tile, extra_refs, out_refs, sc, part)

                pl.run_scoped(run, plgpu.ACC((t.tm, t.tn), jnp.float32))
