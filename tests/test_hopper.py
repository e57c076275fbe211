"""The Hopper GEMM on CPU: its division of work between persistent blocks (kernels/hopper.py
`_Work`), plain integer arithmetic evaluated here for every block and tile at once and checked
against a direct enumeration of the output's (row block, b tile) pairs; and both kernels traced
to jaxprs (no compile), so an error in their Python is caught here. Compiling and running them
needs a Hopper GPU (tests/test_fused_*.py, GPU-only cases)."""
from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.kernels import fused_loss, fused_mlp, hopper

HEAD, MLP = fused_loss.HOPPER, fused_mlp.TILES   # the kernels' own tiles


@pytest.mark.parametrize("t, n_tiles, row_blocks, cores", [
    (HEAD, 1187, 1792, 132),                  # the head at 448 ablations x 512 tokens: 27 rounds + 10 row blocks
    (MLP, 38, 1216, 132),                     # the MLP at 304 ablations
    (HEAD._replace(groups=4), 297, 8, 132),   # fewer row blocks than blocks
    (MLP._replace(groups=6), 38, 5, 114),     # another GPU's SM count
    (HEAD._replace(groups=4), 1187, 100, 114),
])
def test_every_tile_once_and_blocks_balanced(t, n_tiles, row_blocks, cores):
    units = cores // t.groups * (t.groups // t.cluster)
    unit, member = jnp.arange(units)[:, None, None], jnp.arange(t.cluster)[None, :, None]
    work = hopper._Work(t, n_tiles, row_blocks, units, unit, member)
    tasks = np.broadcast_to(np.asarray(work.tasks), (units, t.cluster, 1))[:, :, 0]   # [units, cluster]
    i = jnp.arange(int(tasks.max()))[None, None, :]
    live = np.asarray(i) < tasks[:, :, None]
    task = hopper._Task(*(np.broadcast_to(np.asarray(v), live.shape) for v in work.flat(i)))
    real = live & task.real
    pairs = np.stack([task.row0 // t.rows, task.n], -1)[real]
    covered = np.zeros((row_blocks, n_tiles), int)
    np.add.at(covered, (pairs[:, 0], pairs[:, 1]), 1)
    assert (covered == 1).all()                                      # every output tile once, none twice
    assert (task.row0[live] % t.rows == 0).all()
    # the members of a cluster run the same number of tiles on the same rows (their loads are shared)
    assert (tasks == tasks[:, :1]).all()
    assert (task.row0[:, 0][live[:, 0]] == task.row0[:, -1][live[:, -1]]).all()
    # balanced: the last round's row blocks are shared out, so no block runs half a row block's
    # tiles more than an even share (one block per left-over row block would run a whole one more)
    ideal = row_blocks * n_tiles / (units * t.cluster)
    assert tasks.max() - ideal <= n_tiles / t.cluster / 2, (tasks.max(), ideal)
    # task(r, j) is flat's view by row block: the first tile of each row block starts at j 0
    r = jnp.arange(int(np.asarray(work.row_blocks).max()))[None, None, :]
    assert (np.asarray(work.task(r, 0).j) == 0).all()


@pytest.mark.parametrize("name", ["mlp", "head", "mlp single blocks"])
def test_kernels_trace_on_cpu(name, monkeypatch):
    """Each kernel's jaxpr: one wgmma per k-step in its consumers, the rows' loads multicast
    exactly when blocks form clusters, a's slot holding a block's rows (2 tm in step, tm
    ping-pong), b's tile [tk, tn] (the MLP's weight) or [tn, tk] (the head's embedding, K-major),
    and the producer's release waits in its loop and its drain."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    class Hopper:   # what hopper.gemm asks of the device
        core_count = 132

    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [Hopper()])
    load = plgpu.load
    if "idx" in inspect.signature(load).parameters and \
            inspect.signature(load).parameters["idx"].default is inspect.Parameter.empty:
        monkeypatch.setattr(plgpu, "load", lambda src, idx=..., **kw: load(src, idx, **kw))   # jax < 0.11
    sds = jax.ShapeDtypeStruct
    x, w = sds((2048, 896), jnp.bfloat16), sds((896, 4864), jnp.bfloat16)
    t = {"mlp": MLP, "head": HEAD, "mlp single blocks": MLP._replace(cluster=1)}[name]
    if name == "head":
        jaxpr = jax.make_jaxpr(lambda h, v, s: fused_loss._hopper_partials(h, v, s, t))(
            x, sds((151936, 896), jnp.bfloat16), sds((2048,), jnp.float32))
    else:
        jaxpr = jax.make_jaxpr(lambda a, s, g, u: fused_mlp._product(a, s, g, u, t))(x, sds((2048,), jnp.float32), w, w)
    text = str(jaxpr)
    assert text.count("wgmma_ref") == 1
    tile_copies = [line for line in text.splitlines()
                   if "copy_gmem_to_smem" in line and re.search(r"\[\w+:\w+\+\d+,\w+:\w+\+\d+\]", line)]
    rows_copy = tile_copies[0]   # the producer loads a's slot first, then b's
    assert ("collective_axes=('cluster',)" in rows_copy) == (t.cluster > 1), rows_copy
    assert re.search(rf"\[\w+:\w+\+{t.rows},\w+:\w+\+{t.tk}\]", rows_copy), rows_copy
    assert "collective_axes" not in tile_copies[1]   # b's tile: each block its own
    b_box = (t.tn, t.tk) if name == "head" else (t.tk, t.tn)
    assert re.search(rf"\[\w+:\w+\+{b_box[0]},\w+:\w+\+{b_box[1]}\]", tile_copies[1]), tile_copies[1]
    assert text.count("barrier_wait") >= 3   # producer: a slot's release and the drain; consumers: a step's loads
    if name != "head":   # the prologue loads the rows' RMSNorm scales, one per row of the warpgroup's tile
        assert f"f32[{t.tm}] = load[" in text
