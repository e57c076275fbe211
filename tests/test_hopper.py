"""The Hopper GEMM's division of work between persistent blocks (models/hopper.py `_Work`), on
CPU: the plan is plain integer arithmetic, evaluated here for every block and tile at once and
checked against a direct enumeration of the output's (row block, b tile) pairs. The kernels
themselves need a Hopper GPU (tests/test_fused_*.py, GPU-only cases)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.models import fused_loss, fused_mlp, hopper

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
