"""Several processes (hosts) running one pipeline: all compute, process 0 reads and writes.

Every process runs the same stages on the same global arrays. Decisions that depend on the
workdir (does a stage's result exist, is a unit of resume state kept) are made by process 0 and
broadcast, so every process takes the same branch and meets the same collectives; only process
0 writes files. Tested on CPU as two local processes of four devices each (gloo collectives).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict


def start(c: ConfigDict) -> None:
    """jax.distributed.initialize from mesh.coordinator/num_processes/process_id, or with the
    cluster's own description (SLURM, TPU, Kubernetes, Open MPI) when mesh.distributed alone is set."""
    m = c.mesh
    if m.coordinator:   # CPU devices of several processes talk through gloo (GPUs use NCCL regardless)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(m.coordinator, m.num_processes, m.process_id)
    elif m.distributed:
        jax.distributed.initialize()


def writer() -> bool:
    """Whether this process writes result files, state and plots (process 0)."""
    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """Process 0's flag, on every process."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as a numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
