"""Several processes (hosts) running one pipeline: all compute, process 0 reads and writes.

Every process runs the same stages on the same global arrays. Decisions that depend on the
workdir (does a stage's result exist, is a unit of resume state kept) are made by process 0 and
broadcast, so every process takes the same branch and meets the same collectives; only process
0 writes files. Tested on CPU as two local processes of four devices each (gloo collectives).

A process that dies ends the run: every process beats (a counter in jax.distributed's key-value
store) every `mesh.peer_timeout / 10` seconds and watches the others' beats from a daemon thread.
A peer whose beat stops for `mesh.peer_timeout` seconds, a peer that reports its own error
(`fail`), or a store that fails or stops answering for that long ends this process with one
`jaxcrit: error:` line naming what it lost (exit code 4), even while the main thread waits in a
collective. jax.distributed's own heartbeat timeout is set longer, so its abort (a C++ fatal
error and a stack trace) does not come first; its shutdown barrier is skipped on failure.
Process 0 is no exception: jax hosts the store inside it, so its death would abort every other
process at once; here the store lives in a process of its own beside it (coordinator.py), which
outlives it, so process 0's death is one more silent peer. A store that stops answering (process
0's host down or cut off) ends the others after `mesh.peer_timeout` too. What stays jax's: the
service's own process killed on a living host (its connections close and jax's client aborts).
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

from jaxcrit.dist import coordinator
from jaxcrit.errors import JaxcritError

PEER_FAILED = 4   # exit code of a process ended because another one failed
_KEY = "jaxcrit/"
_watch: "_Watchdog | None" = None


def start(c: ConfigDict) -> None:
    """jax.distributed.initialize from mesh.coordinator/num_processes/process_id, or with the
    cluster's own description (SLURM, TPU, Kubernetes, Open MPI) when mesh.distributed alone is
    set; with several processes, process 0 first starts the coordination service in a process of
    its own (coordinator.py), and every process its watchdog."""
    global _watch
    m = c.mesh
    if m.coordinator:   # CPU devices of several processes talk through gloo (GPUs use NCCL regardless)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        address, n, index, local = m.coordinator, m.num_processes, m.process_id, None
    elif m.distributed:
        address, n, index, local = _cluster()
    else:
        return
    # jax's client aborts when a heartbeat gets no answer within heartbeat_timeout / 2 (plus 1 s), its
    # service when a process sent none for heartbeat_timeout: the watchdog (peer_timeout and a beat
    # or two) speaks first
    heartbeat = 2 * m.peer_timeout + 10
    bind = coordinator.start(address, n, heartbeat) if n > 1 and index == 0 else None
    jax.distributed.initialize(address, n, index, local, cluster_detection_method="deactivate",
                               heartbeat_timeout_seconds=heartbeat, coordinator_bind_address=bind)
    if jax.process_count() > 1 and _watch is None:
        _watch = _Watchdog(m.peer_timeout)
        _watch.start()


def _cluster() -> tuple[str, int, int, list[int] | None]:
    """The coordinator address, process count, this process's index and its local device ids, as
    jax.distributed.initialize would detect them (process 0 needs the address before jax starts)."""
    from jax._src import clusters
    address, n, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        os.environ.get("JAX_COORDINATOR_ADDRESS"), None, None, None, None, 300)   # jax's initialization_timeout
    if None in (address, n, index):
        raise JaxcritError("mesh.distributed=True but jax recognises no cluster here (SLURM, TPU, Open MPI, "
                           "Kubernetes); give --config.mesh.coordinator=HOST:PORT --config.mesh.num_processes=N "
                           "--config.mesh.process_id=I instead")
    return address, n, index, local


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
    """For an error that may be a dead peer's echo (a collective that lost its connection): returns
    once every other process has beaten since, so the error is this process's own; a dead peer
    makes the watchdog end this process first. Gives up after twice the timeout."""
    if _watch is None:
        return
    since = time.monotonic()
    first = None   # the others' beats in the first answer after `since`
    while time.monotonic() - since < 2 * _watch.timeout:
        answered, state = _watch.answer
        if answered > since:
            beats = {p: state.get(f"{_KEY}beat/{p}") for p in range(_watch.n)
                     if p != _watch.me and f"{_KEY}done/{p}" not in state}
            first = first or beats
            if all(beats.get(p) != first[p] for p in first):
                return
        time.sleep(_watch.beat)


class _Watchdog(threading.Thread):
    """Watches the others' beats and the store's answers; ends this process when one is gone.

    The round trips to the store run in a thread of their own (`_beat`), so that a store that
    stops answering (process 0's host down or cut off) leaves the watching free to say so."""

    def __init__(self, timeout: int):
        super().__init__(daemon=True, name="jaxcrit-watchdog")
        from jax._src import distributed   # the client jax.distributed made (multihost_utils reads it too)
        self.client = distributed.global_state.client
        self.address = distributed.global_state.coordinator_address
        self.timeout, self.beat = timeout, max(timeout / 10, 0.2)
        self.me, self.n = jax.process_index(), jax.process_count()
        self.lock = threading.Lock()
        self.stopped = False
        # the store's last answer: when it came, the jaxcrit/ keys it held
        self.answer: tuple[float, dict[str, str]] = (time.monotonic(), {})
        self.lost = ""   # the store's error, once a round trip failed

    def stop(self, key: str, value: str) -> None:
        """No more beats or watching; leaves `key` for the others to read."""
        with self.lock:
            self.stopped = True
        try:
            self.client.key_value_set(key, value, allow_overwrite=True)
        except Exception:   # the store is gone: nobody is left to tell
            pass

    def _end(self, why: str, hint: str = "") -> None:
        with self.lock:
            if self.stopped:
                return
            print(f"jaxcrit: error: [process {who()}] {why}; this process stops too{hint}", file=sys.stderr, flush=True)
            os._exit(PEER_FAILED)

    def _beat(self) -> None:
        """Round trips to the store: this process's beat counter up, every jaxcrit/ key down."""
        count = 0
        while not self.stopped:
            try:
                self.client.key_value_set(f"{_KEY}beat/{self.me}", str(count), allow_overwrite=True)
                state = dict(self.client.key_value_dir_get(_KEY))
            except Exception as e:
                self.lost = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                return
            self.answer = (time.monotonic(), state)
            count += 1
            time.sleep(self.beat)

    def run(self) -> None:
        threading.Thread(target=self._beat, daemon=True, name="jaxcrit-beat").start()
        resume = "; run the same command again to resume from the workdir"
        seen: dict[int, tuple[str, float]] = {}
        while not self.stopped:
            time.sleep(self.beat)
            now, (answered, state) = time.monotonic(), self.answer
            if self.lost:
                self._end(f"lost the coordinator at {self.address}: {self.lost}; process 0's log says why", resume)
            if now - answered > self.timeout:
                self._end(f"the coordinator at {self.address} did not answer for {now - answered:.0f} s "
                          f"(mesh.peer_timeout {self.timeout}): process 0's host is down or cut off", resume)
            for key, value in state.items():
                if key.startswith(f"{_KEY}failed/"):
                    self._end(f"process {key.rsplit('/', 1)[1]}/{self.n} failed: {value}")
            for p in range(self.n):
                if p == self.me or f"{_KEY}done/{p}" in state:
                    continue
                beat = state.get(f"{_KEY}beat/{p}", "")
                last = seen.get(p)
                if last is None or last[0] != beat:
                    seen[p] = (beat, answered)
                elif now - last[1] > self.timeout:
                    name = f"process {p}/{self.n}" + (f" (the coordinator, {self.address})" if p == 0 else "")
                    self._end(f"{name} sent no sign of life for {now - last[1]:.0f} s "
                              f"(mesh.peer_timeout {self.timeout}): it died or hangs; its own log says why", resume)
