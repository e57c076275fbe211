"""Several processes (hosts) running one pipeline: all compute, process 0 reads and writes.

Every process runs the same stages on the same global arrays. Decisions that depend on the
workdir (does a stage's result exist, is a unit of resume state kept) are made by process 0 and
broadcast, so every process takes the same branch and meets the same collectives; only process
0 writes files. Tested on CPU as two local processes of four devices each (gloo collectives).

A process that dies ends the run: every process beats (a counter in jax.distributed's key-value
store, hosted by process 0) every `mesh.peer_timeout / 10` seconds and watches the others' beats
from a daemon thread. A peer whose beat stops for `mesh.peer_timeout` seconds, a peer that
reports its own error (`fail`), or a coordinator that no longer answers ends this process with
one `jaxcrit: error:` line naming the process (exit code 4), even while the main thread waits
in a collective. jax.distributed's own heartbeat timeout is set longer, so its abort (a C++
fatal error and a stack trace) does not come first; its shutdown barrier is skipped on failure.
One case stays jax's: when process 0 dies, the coordination service it hosts goes with it and
jax.distributed's client aborts every other process at once ("Terminating process because the
JAX distributed service detected fatal errors ... another task died", then a C++ stack trace;
the client's callback for this cannot be set from Python in jaxlib 0.10).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

PEER_FAILED = 4   # exit code of a process ended because another one failed
_KEY = "jaxcrit/"
_watch: "_Watchdog | None" = None


def start(c: ConfigDict) -> None:
    """jax.distributed.initialize from mesh.coordinator/num_processes/process_id, or with the
    cluster's own description (SLURM, TPU, Kubernetes, Open MPI) when mesh.distributed alone is
    set; then the watchdog (several processes only)."""
    global _watch
    m = c.mesh
    timeouts = dict(heartbeat_timeout_seconds=2 * m.peer_timeout + 10)
    if m.coordinator:   # CPU devices of several processes talk through gloo (GPUs use NCCL regardless)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(m.coordinator, m.num_processes, m.process_id, **timeouts)
    elif m.distributed:
        jax.distributed.initialize(**timeouts)
    if jax.process_count() > 1 and _watch is None:
        _watch = _Watchdog(m.peer_timeout)
        _watch.start()


def several() -> bool:
    """Whether this run has several processes (and the watchdog runs)."""
    return _watch is not None


def who() -> str:
    """'i/n' of this process."""
    return f"{jax.process_index()}/{jax.process_count()}"


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


def done() -> None:
    """This process finished its part: the others stop watching its beat."""
    if _watch is not None:
        _watch.stop(f"{_KEY}done/{jax.process_index()}", "done")


def fail(line: str, code: int) -> int:
    """Ends the run after an error on this process: prints `line`; with several processes, tells
    the others (their watchdogs end them) and exits at once, without the shutdown barrier that
    would wait for them."""
    print(line, file=sys.stderr, flush=True)
    if _watch is None:
        return code
    _watch.stop(f"{_KEY}failed/{jax.process_index()}", line)
    os._exit(code)


def wait_for_peers() -> None:
    """Gives the watchdog a timeout's time to find a dead peer (it then ends this process): for an
    error that may be a dead peer's echo, such as a collective that lost its connection."""
    if _watch is not None:
        _watch.dead.wait(_watch.timeout + 2 * _watch.beat)


class _Watchdog(threading.Thread):
    """Beats into the key-value store and ends this process when another process is gone."""

    def __init__(self, timeout: int):
        super().__init__(daemon=True, name="jaxcrit-watchdog")
        from jax._src import distributed   # the client jax.distributed made (multihost_utils reads it too)
        self.client = distributed.global_state.client
        self.timeout, self.beat = timeout, max(timeout / 10, 0.2)
        self.me, self.n = jax.process_index(), jax.process_count()
        self.dead = threading.Event()
        self.lock = threading.Lock()
        self.stopped = False

    def stop(self, key: str, value: str) -> None:
        """No more beats or watching; leaves `key` for the others to read."""
        with self.lock:
            self.stopped = True
            try:
                self.client.key_value_set(key, value, allow_overwrite=True)
            except Exception:   # the coordinator is gone: nobody is left to tell
                pass

    def _end(self, why: str) -> None:
        with self.lock:
            if self.stopped:
                return
            self.dead.set()
            print(f"jaxcrit: error: [process {who()}] {why}; this process stops too", file=sys.stderr, flush=True)
            os._exit(PEER_FAILED)

    def run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        count = 0
        while True:
            with self.lock:
                if self.stopped:
                    return
                try:
                    self.client.key_value_set(f"{_KEY}beat/{self.me}", str(count), allow_overwrite=True)
                    state = dict(self.client.key_value_dir_get(_KEY))
                except Exception as e:   # process 0 hosts the store: it is gone, or unreachable
                    state, err = None, str(e).splitlines()[0][:200]
            if state is None:
                self._end(f"lost the coordinator (process 0/{self.n}): {err}")
            count += 1
            now = time.monotonic()
            for key, value in state.items():
                if key.startswith(f"{_KEY}failed/"):
                    self._end(f"process {key.rsplit('/', 1)[1]}/{self.n} failed: {value}")
            for p in range(self.n):
                if p == self.me or f"{_KEY}done/{p}" in state:
                    continue
                beat = state.get(f"{_KEY}beat/{p}", "")
                last = seen.get(p)
                if last is None or last[0] != beat:
                    seen[p] = (beat, now)
                elif now - last[1] > self.timeout:
                    self._end(f"process {p}/{self.n} sent no sign of life for {now - last[1]:.0f} s "
                              f"(mesh.peer_timeout {self.timeout}): it died or hangs; its own log says why")
            time.sleep(self.beat)
