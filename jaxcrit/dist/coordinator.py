"""jax.distributed's coordination service in a process of its own, beside process 0.

jax hosts the service (the key-value store, barriers, heartbeats) inside process 0. When process
0 dies the service dies with it, and jax's client in every other process aborts at once with a C++
fatal error and a stack trace ("Terminating process because the JAX distributed service detected
fatal errors"). That client's error callback is not usable from Python in jaxlib 0.10 (a Python
callable given as `missed_heartbeat_callback` ends in std::bad_cast and std::terminate), and the
abort is not an exception, so it can be neither replaced nor caught. Hosted here instead, the
service outlives process 0: process 0's death is then one more silent peer, and the watchdogs
(processes.py) end the others with their own line.

Process 0 starts this process (`start`) before `jax.distributed.initialize`, which still starts
an in-process service in process 0 but on a loopback port of the system's choosing that nobody
connects to; every client, process 0's too, connects to HOST:PORT, served here. The service
stops when process 0 says so after jax's shutdown barrier (a clean end). When process 0 ends
without saying so (it failed, was killed, or its watchdog ended it), the service stays up for
jax's heartbeat timeout, so that the others can still read process 0's failure or notice its
silence; by then they have ended and the service would have given up on process 0 anyway.

    python -c "<_MAIN>" BIND_ADDRESS NUM_PROCESSES HEARTBEAT_TIMEOUT_S   (what `start` runs)
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time

import jax
from jax._src.lib import _jax

from jaxcrit.errors import JaxcritError

_STOP = "stop\n"
_MAIN = "import sys; from jaxcrit.dist.coordinator import main; sys.exit(main(sys.argv))"


def start(address: str, num_processes: int, heartbeat_timeout: int) -> str:
    """Starts the service for `num_processes` processes on the port of `address` (HOST:PORT);
    returns the address process 0's own jax service should bind instead (loopback, unused)."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "[::]:" + address.rpartition(":")[2])   # as jax binds it
    proc = subprocess.Popen([sys.executable, "-c", _MAIN, bind, str(num_processes), str(heartbeat_timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)   # a Ctrl-C meant for process 0 must not take the service along
    said = proc.stdout.readline().strip()
    if said != "ready":
        status = proc.wait()
        raise JaxcritError(f"the coordination service could not start on {bind}: "
                           f"{said or f'exit status {status}'}; is mesh.coordinator's port free on process 0's host?")
    atexit.register(_stop, proc)   # runs before jax's exit handler (registered earlier), which shuts down its client
    return "127.0.0.1:0"


def _stop(proc: subprocess.Popen) -> None:
    """A clean end of process 0: jax's shutdown barrier (every process reached its end), then the service."""
    try:
        jax.distributed.shutdown()
    finally:
        proc.stdin.write(_STOP)
        proc.stdin.close()
        proc.wait()


def main(argv: list[str]) -> int:
    """The service process: 'ready' on stdout once listening, then runs until process 0 ends."""
    bind, num_processes, heartbeat_timeout = argv[1], int(argv[2]), int(argv[3])
    try:
        service = _jax.get_distributed_runtime_service(bind, num_processes, heartbeat_timeout=heartbeat_timeout)
    except Exception as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, flush=True)
        return 1
    print("ready", flush=True)
    if sys.stdin.readline() == _STOP:
        service.shutdown()
        return 0
    time.sleep(heartbeat_timeout)   # process 0 ended without a word: the others' watchdogs still need the store
    os._exit(0)   # without the service's teardown, which could wait on a process still connected
