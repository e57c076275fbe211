"""A process of a two-process run dies: the survivor ends with one clear error line, in bounded time.

Both processes run the CLI on the tiny model (2 CPU devices each, a 2x2 mesh, gloo). The one
that dies runs the CLI with Stage 2 replaced by its death, after Stage 1's collectives:
- worker: process 1 SIGKILLs itself, as a process killed by the system;
- coordinator: process 0 SIGKILLs itself; the coordination service it started
  (jaxcrit/dist/coordinator.py) must outlive it, so that the survivor speaks before jax's client aborts;
- coordinator_host: process 0 SIGSTOPs itself and the test its service, as a host that went down
  without closing its connections: nothing answers, nothing fails.
The survivor must exit with code 4 within mesh.peer_timeout (5 s) plus a margin, print exactly
one `jaxcrit: error:` line naming what it lost, and neither hang nor abort in jax.distributed's
C++ code (no "Terminating process", no stack trace, no Python traceback). Process 1 writes
nothing, so as a survivor it must leave no workdir behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_multiprocess import _port
from tiny_run import build_model, config_file

REPO = Path(__file__).resolve().parents[1]
DIE_AT_STAGE2 = ("import os, signal, sys; import jaxcrit.critical.stage2 as s; "
                 "s.grow = lambda *a, **k: os.kill(os.getpid(), signal.{}); "
                 "from jaxcrit.main import main; sys.exit(main(sys.argv))")


def _state(pid: int) -> tuple[str, int]:
    """A process's state letter and parent from /proc; ('', 0) once it is gone."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return "", 0
    return state, int(parent)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    """The tiny model and its config, shared by the three cases."""
    d = tmp_path_factory.mktemp("tiny")
    return config_file(d / "cfg.py", build_model(d / "model"), stage1__batch=4, baselines__names=(), scan__sites=(),
                       map__enabled=False, engine__chunk=8)


@pytest.mark.parametrize("dies, death, said", [
    (1, "SIGKILL", "process 1/2 sent no sign of life"),
    (0, "SIGKILL", "process 0/2 (the coordinator, localhost:{port}) sent no sign of life"),
    (0, "SIGSTOP", "the coordinator at localhost:{port} did not answer"),
], ids=["worker", "coordinator", "coordinator_host"])
def test_survivor_ends_with_one_line(cfg, tmp_path, dies, death, said):
    port = _port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    procs = []
    for i in range(2):
        head = ["-c", DIE_AT_STAGE2.format(death)] if i == dies else ["-m", "jaxcrit.main"]
        procs.append(subprocess.Popen(
            [sys.executable, *head, f"--config={cfg}", f"--workdir={tmp_path / f'p{i}'}", "--config.mesh.shape=(2,2)",
             f"--config.mesh.coordinator=localhost:{port}", "--config.mesh.num_processes=2",
             f"--config.mesh.process_id={i}", "--config.mesh.peer_timeout=5"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    dead, alive = procs[dies], procs[1 - dies]
    frozen = []
    try:
        while dead.poll() is None and _state(dead.pid)[0] != "T":
            time.sleep(0.05)
        died = time.monotonic()
        if death == "SIGSTOP":   # and its coordination service with it
            frozen = [dead.pid] + [int(d) for d in os.listdir("/proc") if d.isdigit() and _state(int(d))[1] == dead.pid]
            for pid in frozen[1:]:
                os.kill(pid, signal.SIGSTOP)
        else:
            assert dead.returncode == -9, dead.stderr.read()[-3000:]
        out, err = alive.communicate(timeout=60)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    waited = time.monotonic() - died
    errors = [line for line in err.splitlines() if line.startswith("jaxcrit: error:")]
    assert alive.returncode == 4, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert waited < 5 + 15, waited
    assert not any(s in err for s in ("Terminating process", "Check failure", "Traceback", "stack trace")), err[-3000:]
    assert said.format(port=port) in errors[0], errors[0]
    if dies == 0:
        assert not (tmp_path / "p1").exists()
