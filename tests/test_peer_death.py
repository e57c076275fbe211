"""A process of a two-process run dies: the survivor ends with one clear error line, in bounded time.

Both processes run the CLI on the tiny model (2 CPU devices each, a 2x2 mesh, gloo). The one
that dies runs the CLI with Stage 2 replaced by an immediate os._exit(1), so it stops without a
word after Stage 1's collectives, as a process killed by the system would. The survivor must
exit with code 4 within mesh.peer_timeout (5 s) plus a margin, print one `jaxcrit: error:` line
naming the dead process, and neither hang nor abort in jax.distributed's C++ shutdown.
(When process 0 dies, jax.distributed's client aborts the others at once with its own message;
docs/launch.md says so.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_multiprocess import _port
from tiny_run import build_model, config_file

REPO = Path(__file__).resolve().parents[1]
DIE_AT_STAGE2 = ("import os, sys; import jaxcrit.critical.stage2 as s; s.grow = lambda *a, **k: os._exit(1); "
                 "from jaxcrit.main import main; sys.exit(main(sys.argv))")


def test_survivor_ends_with_one_line(tmp_path, dies=1):
    model = build_model(tmp_path / "model")
    cfg = config_file(tmp_path / "cfg.py", model, stage1__batch=4, baselines__names=(), scan__sites=(),
                      map__enabled=False, engine__chunk=8)
    port = _port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    procs = []
    for i in range(2):
        head = ["-c", DIE_AT_STAGE2] if i == dies else ["-m", "jaxcrit.main"]
        procs.append(subprocess.Popen(
            [sys.executable, *head, f"--config={cfg}", f"--workdir={tmp_path / 'run'}", "--config.mesh.shape=(2,2)",
             f"--config.mesh.coordinator=localhost:{port}", "--config.mesh.num_processes=2",
             f"--config.mesh.process_id={i}", "--config.mesh.peer_timeout=5"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    dead, alive = procs[dies], procs[1 - dies]
    dead.wait(timeout=300)
    died = time.monotonic()
    assert dead.returncode == 1, dead.stderr.read()[-3000:]
    out, err = alive.communicate(timeout=60)
    waited = time.monotonic() - died
    errors = [line for line in err.splitlines() if line.startswith("jaxcrit: error:")]
    assert alive.returncode == 4, err[-3000:]
    assert len(errors) == 1 and f"process {dies}/2" in errors[0], err[-3000:]
    assert waited < 5 + 15, waited
    assert "Terminating process" not in err and "Check failure" not in err
